//! The billing event log (`[events]`): every change of a channel, appended as one JSON line,
//! fsync'd, with an id that is the same however often it is computed.
//!
//! The log is kept by **reconciling against the store**, not by hooks in the request path: a
//! task lists the channels every `interval_secs`, compares each with what the log already
//! says of it (rebuilt from the log at start), and appends the differences. The store is
//! the truth (every node, the settlement task and `paychan close` write there), so nothing
//! that happened is missed while the proxy was down, and a crash between a change and its
//! line only delays the line. An event's id is the SHA-256 of the channel, its sequence number
//! in the channel's events and its kind: after a restart the next event of a channel gets the
//! number the log says, so no event is written twice and none is lost.
//!
//! What the store says, and the event it becomes:
//!
//! | event       | when the task sees                                                 |
//! | ----------- | ------------------------------------------------------------------ |
//! | `opened`    | a channel it did not know (funded, its first payment taken)        |
//! | `funded`    | the channel open: its funding has the confirmations asked for      |
//! | `topped_up` | the best payment pays more (top-ups between two passes: one event) |
//! | `usage`     | what requests consumed changed, at most every `usage_interval_secs` |
//! | `closing`   | the channel closing (the client, the operator, or its margin)      |
//! | `closed`    | the close broadcast (`txid`)                                       |
//! | `settled`   | the close confirmed (`txid`)                                       |
//! | `refunded`  | the channel failed where its refund is valid: the refund spent it  |
//! | `failed`    | the channel failed before its expiry: its funding never confirmed  |

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use paychan::MilliSats;
use paychan::bitcoin::Txid;
use paychan::bitcoin::hashes::{Hash as _, sha256};
use paychan::chain::ChainBackend;
use paychan::channel::ChainTip;
use paychan::channel::ChannelState;
use paychan::store::{ChannelRecord, ChannelStore};
use paychan::wire::ChannelId;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::Error;

/// What happened to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    Opened,
    Funded,
    ToppedUp,
    Usage,
    Closing,
    Closed,
    Settled,
    Refunded,
    Failed,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "opened",
            Self::Funded => "funded",
            Self::ToppedUp => "topped_up",
            Self::Usage => "usage",
            Self::Closing => "closing",
            Self::Closed => "closed",
            Self::Settled => "settled",
            Self::Refunded => "refunded",
            Self::Failed => "failed",
        }
    }
}

/// One line of the log, and the body of one webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Event {
    /// Hex SHA-256 of `channel/seq/kind`: stable across restarts, the receiver's dedup key.
    pub(crate) id: String,
    pub(crate) kind: Kind,
    pub(crate) channel: ChannelId,
    /// The channel's events so far, from 0.
    pub(crate) seq: u64,
    /// The client's key of the channel (compressed, hex): the customer.
    pub(crate) client_key: String,
    /// The channel's state after this event's step: `funded` open, `closing` closing, `closed`
    /// closed, `settled` settled, `refunded`/`failed` failed; `opened`, `topped_up` and
    /// `usage` the state before the pass's later steps (pending for a new channel), else the
    /// store's. Not always the store's state at `time`: a log cut after any line rebuilds
    /// what the next pass needs to emit the rest.
    pub(crate) state: ChannelState,
    /// What the client's best payment pays the server, then.
    pub(crate) paid_msat: MilliSats,
    /// What requests had consumed, then.
    pub(crate) spent_msat: MilliSats,
    /// `paid_msat` minus the channel's previous event's (negative after a fair close).
    pub(crate) paid_delta_msat: i64,
    /// `spent_msat` minus the channel's previous event's.
    pub(crate) spent_delta_msat: i64,
    /// The close transaction (`closed`, `settled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) txid: Option<Txid>,
    /// When the task saw the change (Unix seconds): within `interval_secs` of it.
    pub(crate) time: u64,
}

/// The id of a channel's `seq`-th event, of kind `kind`.
fn event_id(channel: ChannelId, seq: u64, kind: Kind) -> String {
    let text = format!("{channel}/{seq}/{}", kind.as_str());
    sha256::Hash::hash(text.as_bytes()).to_string()
}

/// Now, in Unix seconds.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// `after - before` in msat, signed.
fn delta(after: MilliSats, before: MilliSats) -> i64 {
    let delta = i128::from(after.to_msat()) - i128::from(before.to_msat());
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}

/// What the log says of a channel: its last event's values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Seen {
    state: Option<ChannelState>,
    paid: MilliSats,
    spent: MilliSats,
    next_seq: u64,
    /// A `funded` since the last `failed` or `refunded`.
    funded: bool,
    last_time: u64,
}

impl Seen {
    fn apply(&mut self, event: &Event) {
        self.state = Some(event.state);
        self.paid = event.paid_msat;
        self.spent = event.spent_msat;
        self.next_seq = event.seq + 1;
        self.last_time = event.time;
        match event.kind {
            Kind::Funded => self.funded = true,
            Kind::Failed | Kind::Refunded => self.funded = false,
            _ => {}
        }
    }
}

/// A channel as the store shows it now.
#[derive(Debug, Clone)]
struct Observed {
    id: ChannelId,
    client_key: String,
    state: ChannelState,
    paid: MilliSats,
    spent: MilliSats,
    /// The client's refund is valid at the tip (only asked of a channel newly failed).
    refund_valid: bool,
    /// The close transaction's id (closed and settled channels).
    close: Option<Txid>,
}

/// Where a state is on the way to settled (a failed channel starts again, rescued).
fn rank(state: Option<ChannelState>) -> u8 {
    match state {
        None => 0,
        Some(ChannelState::Closing) => 2,
        Some(ChannelState::Closed) => 3,
        Some(ChannelState::Settled) => 4,
        Some(_) => 1,
    }
}

/// The kinds of the events that take the log from `seen` to `now`, in order. `usage_due`:
/// the channel's last event is `usage_interval_secs` old.
fn changes(seen: Option<&Seen>, now: &Observed, usage_due: bool) -> Vec<Kind> {
    let mut kinds = Vec::new();
    let before = seen.and_then(|seen| seen.state);
    if seen.is_none() {
        kinds.push(Kind::Opened);
    } else if seen.is_some_and(|seen| now.paid > seen.paid) {
        kinds.push(Kind::ToppedUp);
    }
    if before != Some(now.state) {
        match now.state {
            ChannelState::Open if !seen.is_some_and(|seen| seen.funded) => {
                kinds.push(Kind::Funded);
            }
            ChannelState::Closing | ChannelState::Closed | ChannelState::Settled => {
                let path = [
                    (ChannelState::Closing, Kind::Closing),
                    (ChannelState::Closed, Kind::Closed),
                    (ChannelState::Settled, Kind::Settled),
                ];
                let (from, to) = (rank(before), rank(Some(now.state)));
                kinds.extend(path.into_iter().filter_map(|(state, kind)| {
                    (from < rank(Some(state)) && rank(Some(state)) <= to).then_some(kind)
                }));
            }
            ChannelState::Failed if now.refund_valid => kinds.push(Kind::Refunded),
            ChannelState::Failed => kinds.push(Kind::Failed),
            _ => {}
        }
    }
    if kinds.is_empty() && usage_due && seen.is_some_and(|seen| seen.spent != now.spent) {
        kinds.push(Kind::Usage);
    }
    kinds
}

/// The state a channel is in after the step of `kind`: a step's own state (`funded`: open,
/// `closing`, `closed`, `settled`, `refunded` and `failed`: failed); `opened`, `topped_up` and
/// `usage` keep the state before the pass's steps (`before`, pending for a new channel) when
/// one follows in the pass (`steps_follow`), else they carry `now`. So a log cut after any
/// line of a pass rebuilds a [`Seen`] from which the next pass emits exactly the lines cut.
fn state_after(
    kind: Kind,
    before: Option<ChannelState>,
    now: ChannelState,
    steps_follow: bool,
) -> ChannelState {
    match kind {
        Kind::Funded => ChannelState::Open,
        Kind::Closing => ChannelState::Closing,
        Kind::Closed => ChannelState::Closed,
        Kind::Settled => ChannelState::Settled,
        Kind::Refunded | Kind::Failed => ChannelState::Failed,
        Kind::Opened | Kind::ToppedUp | Kind::Usage if steps_follow => {
            before.unwrap_or(ChannelState::Pending)
        }
        Kind::Opened | Kind::ToppedUp | Kind::Usage => now,
    }
}

/// The events of `kinds` for `now`: the first carries the change since `seen`, each the state
/// after its own step ([`state_after`]).
fn events(seen: Option<&Seen>, now: &Observed, kinds: &[Kind], time: u64) -> Vec<Event> {
    let (mut paid, mut spent) =
        seen.map_or((MilliSats::ZERO, MilliSats::ZERO), |s| (s.paid, s.spent));
    let first = seen.map_or(0, |seen| seen.next_seq);
    let before = seen.and_then(|seen| seen.state);
    let is_step = |kind: &Kind| !matches!(kind, Kind::Opened | Kind::ToppedUp | Kind::Usage);
    let mut events = Vec::with_capacity(kinds.len());
    for (n, (seq, kind)) in (first..).zip(kinds.iter().copied()).enumerate() {
        let txid = matches!(kind, Kind::Closed | Kind::Settled).then_some(now.close).flatten();
        let steps_follow = kinds[n + 1..].iter().any(is_step);
        events.push(Event {
            id: event_id(now.id, seq, kind),
            kind,
            channel: now.id,
            seq,
            client_key: now.client_key.clone(),
            state: state_after(kind, before, now.state, steps_follow),
            paid_msat: now.paid,
            spent_msat: now.spent,
            paid_delta_msat: delta(now.paid, paid),
            spent_delta_msat: delta(now.spent, spent),
            txid,
            time,
        });
        (paid, spent) = (now.paid, now.spent);
    }
    events
}

/// Reads the events of the log at `path` (none if it does not exist). A last line without its
/// newline (a write cut by a crash) is not an event; its length is returned with them.
pub(crate) fn read(path: &Path) -> Result<(Vec<Event>, u64), Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(format!("events log {}: {error}", path.display()).into()),
    };
    let complete = text.rfind('\n').map_or(0, |end| end + 1);
    let mut events = Vec::new();
    for (n, line) in text[..complete].lines().enumerate() {
        let event = serde_json::from_str(line)
            .map_err(|e| format!("events log {}:{}: {e}", path.display(), n + 1))?;
        events.push(event);
    }
    Ok((events, (text.len() - complete) as u64))
}

/// The log, open for appending.
#[derive(Debug, Clone)]
pub(crate) struct EventLog {
    file: Arc<Mutex<File>>,
    /// The log's length on disk: what is synced (set at open and after each synced append).
    /// The deliverer reads no further, so it never sends a line a failed sync (or a power
    /// loss) takes back.
    synced: Arc<AtomicU64>,
}

impl EventLog {
    /// Opens (creates) the log at `path` and reads its events; a line cut by a crash is
    /// removed.
    pub(crate) fn open(path: &Path) -> Result<(Self, Vec<Event>), Error> {
        let (events, cut) = read(path)?;
        let cannot = |e: std::io::Error| format!("events log {}: {e}", path.display());
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(cannot)?;
        let mut length = file.metadata().map_err(cannot)?.len();
        if cut > 0 {
            let path = path.display();
            tracing::warn!(%path, bytes = cut, "events log: removing a line cut by a crash");
            length -= cut;
            file.set_len(length).and_then(|()| file.sync_data()).map_err(cannot)?;
        }
        let synced = Arc::new(AtomicU64::new(length));
        Ok((Self { file: Arc::new(Mutex::new(file)), synced }, events))
    }

    /// The log's synced length, kept up to date by [`append`](Self::append).
    pub(crate) fn synced(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.synced)
    }

    /// Appends `events`, one JSON line each, and syncs them to disk; on failure the log is
    /// cut back to where it was (no half line stays).
    pub(crate) async fn append(&self, events: &[Event]) -> Result<(), Error> {
        let mut text = String::new();
        for event in events {
            text.push_str(&serde_json::to_string(event)?);
            text.push('\n');
        }
        let (file, synced) = (Arc::clone(&self.file), Arc::clone(&self.synced));
        let written = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            let length = file.seek(SeekFrom::End(0))?;
            let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_data());
            match written {
                Ok(()) => synced.store(length + text.len() as u64, Ordering::Release),
                Err(_) => {
                    let _ = file.set_len(length);
                }
            }
            written
        });
        Ok(written.await??)
    }
}

/// What the event tasks count, for `/metrics` (clones share the values).
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics {
    pub(crate) logged: prometheus_client::metrics::counter::Counter,
    pub(crate) delivered: prometheus_client::metrics::counter::Counter,
    pub(crate) failures: prometheus_client::metrics::counter::Counter,
    /// Complete lines after the webhook's cursor, at its last read, less those sent since.
    pub(crate) pending: prometheus_client::metrics::gauge::Gauge,
}

/// The `[events]` settings the tasks need.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) log_file: PathBuf,
    pub(crate) interval: Duration,
    pub(crate) usage_every: Duration,
}

/// Full listings (every state) at start and every this many passes (1 h at the default 5 s);
/// in between, the settled and failed channels are not read, only those the log last saw
/// active (each loaded by id when the active listing misses it). Rare because a full listing
/// reads every channel that ever settled or failed, and on SQLite it holds the one
/// connection that requests' debits queue behind; it only catches a channel that left the
/// settled or failed states without the log seeing it active (a failed channel rescued and
/// closed between two passes).
const FULL_EVERY: u64 = 720;

/// The states a pass lists every time.
const ACTIVE: [ChannelState; 4] =
    [ChannelState::Pending, ChannelState::Open, ChannelState::Closing, ChannelState::Closed];

/// The task that appends what changed in the store to the log.
#[derive(Debug)]
pub(crate) struct Reconciler<St, C> {
    store: St,
    chain: C,
    log: EventLog,
    seen: HashMap<ChannelId, Seen>,
    usage_every: u64,
    passes: u64,
    appended: Arc<Notify>,
    metrics: Metrics,
}

impl<St: ChannelStore, C: ChainBackend> Reconciler<St, C> {
    /// Opens the log of `settings` and rebuilds what it says of each channel.
    pub(crate) fn new(
        settings: &Settings,
        store: St,
        chain: C,
        appended: Arc<Notify>,
        metrics: Metrics,
    ) -> Result<Self, Error> {
        let (log, events) = EventLog::open(&settings.log_file)?;
        let mut seen: HashMap<ChannelId, Seen> = HashMap::new();
        for event in &events {
            seen.entry(event.channel).or_default().apply(event);
        }
        let usage_every = settings.usage_every.as_secs();
        Ok(Self { store, chain, log, seen, usage_every, passes: 0, appended, metrics })
    }

    /// Runs a pass every `interval`, forever.
    pub(crate) async fn run(mut self, interval: Duration) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "events: pass failed; retried at the next");
            }
        }
    }

    /// Lists the channels, appends the events of what changed; returns how many.
    pub(crate) async fn pass(&mut self) -> Result<usize, Error> {
        let states: &[ChannelState] =
            if self.passes.is_multiple_of(FULL_EVERY) { &ChannelState::ALL } else { &ACTIVE };
        self.passes += 1;
        let mut records: HashMap<ChannelId, ChannelRecord> = HashMap::new();
        for state in states {
            records.extend(self.store.list(*state).await?.into_iter().map(|r| (r.id(), r)));
        }
        // Channels the log last saw active that the listing missed: settled, failed, or moved
        // between two of its reads.
        let missed: Vec<ChannelId> = self
            .seen
            .iter()
            .filter(|(id, seen)| {
                seen.state.is_some_and(|s| ACTIVE.contains(&s)) && !records.contains_key(id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in missed {
            if let Some(record) = self.store.load(id).await? {
                records.insert(id, record);
            }
        }
        let mut ids: Vec<ChannelId> = records.keys().copied().collect();
        ids.sort();
        let (now, mut tip) = (unix_now(), None);
        let mut batch = Vec::new();
        for id in ids {
            let Some(observed) = self.observe(&records[&id], &mut tip).await else { continue };
            let seen = self.seen.get(&id);
            let due = seen.is_some_and(|s| now.saturating_sub(s.last_time) >= self.usage_every);
            let kinds = changes(seen, &observed, due);
            batch.extend(events(seen, &observed, &kinds, now));
        }
        if batch.is_empty() {
            return Ok(0);
        }
        self.log.append(&batch).await?;
        for event in &batch {
            self.seen.entry(event.channel).or_default().apply(event);
        }
        self.appended.notify_one();
        self.metrics.logged.inc_by(batch.len() as u64);
        Ok(batch.len())
    }

    /// `record` as an [`Observed`]; `None` when whether its refund is valid cannot be told
    /// now (the chain did not answer: the channel waits for the next pass).
    async fn observe(
        &self,
        record: &ChannelRecord,
        tip: &mut Option<Result<ChainTip, String>>,
    ) -> Option<Observed> {
        let id = record.id();
        let newly_failed = record.state == ChannelState::Failed
            && self.seen.get(&id).and_then(|seen| seen.state) != Some(ChannelState::Failed);
        let refund_valid = if newly_failed {
            if tip.is_none() {
                *tip = Some(self.chain.tip().await.map_err(|e| e.to_string()));
            }
            match tip.as_ref()? {
                Ok(tip) => record.channel.params().refund_is_valid(*tip),
                Err(error) => {
                    let reason =
                        "events: the chain's tip is unknown; the failure is recorded later";
                    tracing::warn!(%error, channel = %id, "{reason}");
                    return None;
                }
            }
        } else {
            false
        };
        // The best payment's txid: the close's, without signing it (the signatures are not
        // part of a txid).
        let close = crate::console::close_txid(record);
        Some(Observed {
            id,
            client_key: record.channel.params().client_key.to_string(),
            state: record.state,
            paid: record.paid(),
            spent: record.spent,
            refund_valid,
            close,
        })
    }
}

/// Starts the reconciler and, with a webhook, its deliverer: `[events]` of the config. The
/// log is read (and a cut line removed) and the secret checked before this returns.
pub(crate) fn spawn<St, C>(
    events: &crate::config::Events,
    network: paychan::bitcoin::Network,
    store: St,
    chain: C,
    metrics: &Metrics,
) -> Result<Vec<tokio::task::JoinHandle<()>>, Error>
where
    St: ChannelStore + 'static,
    C: ChainBackend + Send + Sync + 'static,
{
    let settings = &events.settings;
    let appended = Arc::new(Notify::new());
    // Everything that can fail, before any task starts (the deliverer checks its cursor
    // against the log as opened, before a pass appends).
    let reconciler =
        Reconciler::new(settings, store, chain, Arc::clone(&appended), metrics.clone())?;
    let webhook = match &events.webhook {
        Some((url, secret_file)) => {
            let secret = crate::keys::read_secret(secret_file, network)?;
            let (log, interval) = (settings.log_file.clone(), settings.interval);
            let synced = reconciler.log.synced();
            let webhook =
                crate::webhook::Webhook::new(url.clone(), secret, log, synced, appended, interval);
            Some(webhook?.with_metrics(metrics.clone()))
        }
        None => None,
    };
    let (log, channels) = (settings.log_file.display(), reconciler.seen.len());
    tracing::info!(%log, channels, "events: log opened");
    let mut tasks = vec![tokio::spawn(reconciler.run(settings.interval))];
    tasks.extend(webhook.map(|webhook| tokio::spawn(webhook.run())));
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(state: ChannelState, paid: u64, spent: u64) -> Observed {
        Observed {
            id: "0000000000000000000000000000000000000000000000000000000000000001:0"
                .parse()
                .unwrap(),
            client_key: "02".repeat(33),
            state,
            paid: MilliSats::from_msat(paid),
            spent: MilliSats::from_msat(spent),
            refund_valid: false,
            close: None,
        }
    }

    /// Applies `now` to `seen` as a pass does; returns the kinds.
    fn step(seen: &mut Option<Seen>, now: &Observed, usage_due: bool) -> Vec<Kind> {
        let kinds = changes(seen.as_ref(), now, usage_due);
        for event in events(seen.as_ref(), now, &kinds, 1) {
            seen.get_or_insert_with(Seen::default).apply(&event);
        }
        kinds
    }

    #[test]
    fn a_channels_life_is_one_event_per_change() {
        use ChannelState::*;
        let mut seen = None;
        assert_eq!(step(&mut seen, &observed(Pending, 2_000, 0), true), [Kind::Opened]);
        assert_eq!(step(&mut seen, &observed(Pending, 2_000, 0), true), []);
        assert_eq!(step(&mut seen, &observed(Open, 2_000, 1_000), false), [Kind::Funded]);
        // Two top-ups between passes are one event; usage only when due.
        assert_eq!(step(&mut seen, &observed(Open, 9_000, 1_000), true), [Kind::ToppedUp]);
        assert_eq!(step(&mut seen, &observed(Open, 9_000, 3_000), false), []);
        assert_eq!(step(&mut seen, &observed(Open, 9_000, 3_000), true), [Kind::Usage]);
        // Suspended and back: no second `funded`.
        assert_eq!(step(&mut seen, &observed(Pending, 9_000, 3_000), true), []);
        assert_eq!(step(&mut seen, &observed(Open, 9_000, 3_000), true), []);
        // Closed and settled between two passes: each step is an event, in order.
        assert_eq!(
            step(&mut seen, &observed(Settled, 9_000, 4_000), false),
            [Kind::Closing, Kind::Closed, Kind::Settled]
        );
        assert_eq!(step(&mut seen, &observed(Settled, 9_000, 4_000), true), []);
        assert_eq!(seen.unwrap().next_seq, 7);
    }

    #[test]
    fn a_failure_after_the_expiry_is_the_refund() {
        use ChannelState::*;
        let mut seen = None;
        step(&mut seen, &observed(Open, 2_000, 0), false);
        let mut failed = observed(Failed, 2_000, 0);
        assert_eq!(step(&mut seen.clone(), &failed, false), [Kind::Failed]);
        failed.refund_valid = true;
        assert_eq!(step(&mut seen, &failed, false), [Kind::Refunded]);
        // Rescued: its funding confirmed after all.
        assert_eq!(step(&mut seen, &observed(Open, 2_000, 0), false), [Kind::Funded]);
    }

    #[test]
    fn the_first_event_of_a_pass_carries_the_change() {
        use ChannelState::*;
        let mut seen = None;
        step(&mut seen, &observed(Open, 2_000, 0), false);
        let now = observed(Closing, 5_000, 4_000);
        let kinds = changes(seen.as_ref(), &now, false);
        let batch = events(seen.as_ref(), &now, &kinds, 9);
        let deltas: Vec<_> =
            batch.iter().map(|e| (e.kind, e.paid_delta_msat, e.spent_delta_msat)).collect();
        assert_eq!(deltas, [(Kind::ToppedUp, 3_000, 4_000), (Kind::Closing, 0, 0)]);
        // Ids are the channel's sequence: the same after a restart, distinct within it.
        assert_eq!(batch[0].id, event_id(now.id, 2, Kind::ToppedUp));
        assert_ne!(batch[0].id, batch[1].id);
        // A fair close pays less than the best: a negative delta, never a top-up.
        let fair = observed(Closing, 1_500, 0);
        assert_eq!(changes(seen.as_ref(), &fair, true), [Kind::Closing]);
        assert_eq!(events(seen.as_ref(), &fair, &[Kind::Closing], 9)[0].paid_delta_msat, -500);
    }

    /// A pass's events cut after any line (a crash before the fsync): the log read back, the
    /// next pass emits exactly the lines cut, with the ids and values the uncut log has.
    #[test]
    fn a_pass_cut_after_any_line_is_completed_by_the_next() {
        use ChannelState::*;
        let mut open = None;
        step(&mut open, &observed(Open, 2_000, 0), false);
        let mut failed = open.clone();
        step(&mut failed, &observed(Failed, 2_000, 0), false);
        let mut settled = observed(Settled, 9_000, 4_000);
        settled.close = Some(Txid::all_zeros());
        let mut refunded = observed(Failed, 2_000, 0);
        refunded.refund_valid = true;
        let passes = [
            (None, observed(Open, 2_000, 0), 2),
            (None, settled.clone(), 4),
            (None, refunded, 2),
            (open, settled, 4),
            (failed, observed(Open, 5_000, 1_000), 2),
        ];
        for (before, now, count) in passes {
            let kinds = changes(before.as_ref(), &now, false);
            let whole = events(before.as_ref(), &now, &kinds, 9);
            assert_eq!(whole.len(), count, "{kinds:?}");
            for cut in 1..whole.len() {
                let mut seen = before.clone();
                for event in &whole[..cut] {
                    seen.get_or_insert_with(Seen::default).apply(event);
                }
                let rest = changes(seen.as_ref(), &now, false);
                let rest = events(seen.as_ref(), &now, &rest, 9);
                assert_eq!(rest, whole[cut..], "{kinds:?} cut after {cut}");
            }
        }
    }

    #[tokio::test]
    async fn a_line_cut_by_a_crash_is_removed_and_the_log_read_back() {
        let dir = std::env::temp_dir().join(format!("paychan-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let now = observed(ChannelState::Open, 2_000, 0);
        let written = events(None, &now, &[Kind::Opened, Kind::Funded], 7);
        let (log, read) = EventLog::open(&path).unwrap();
        assert!(read.is_empty());
        log.append(&written).await.unwrap();
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"id\":\"cut").unwrap();
        let (log, read) = EventLog::open(&path).unwrap();
        assert_eq!(read, written);
        let length = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(log.synced().load(Ordering::Acquire), length(), "the cut line is not synced");
        log.append(&written[..1]).await.unwrap();
        assert_eq!(read_log_len(&path), 3, "appended after the cut line, which is gone");
        assert_eq!(log.synced().load(Ordering::Acquire), length(), "published after the sync");
        std::fs::write(&path, "{}\n").unwrap();
        let error = EventLog::open(&path).unwrap_err().to_string();
        assert!(error.contains("events.jsonl:1"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A channel of 100 000 sat whose first payment pays the server `sat`, at `vout`.
    fn record(vout: u32, sat: u64) -> ChannelRecord {
        use paychan::bitcoin::absolute::LockTime;
        use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
        use paychan::bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf};
        let secp = Secp256k1::new();
        let key =
            |b| CompressedPublicKey(SecretKey::from_slice(&[b; 32]).unwrap().public_key(&secp));
        let script = |b| ScriptBuf::new_p2wpkh(&key(b).wpubkey_hash());
        let params = paychan::channel::Terms::default()
            .agree(
                key(1),
                key(2),
                Amount::from_sat(100_000),
                LockTime::from_height(2_008).unwrap(),
                script(1),
                script(2),
                ChainTip { height: 1_000, median_time_past: 0 },
            )
            .unwrap();
        let channel = params.at(OutPoint { txid: Txid::all_zeros(), vout });
        ChannelRecord::open(channel, 0, payment(sat))
    }

    /// A payment paying the server `sat` (the store only compares amounts).
    fn payment(sat: u64) -> paychan::bitcoin::Transaction {
        use paychan::bitcoin::{Amount, ScriptBuf, Transaction, TxOut, absolute, transaction};
        let output = TxOut { value: Amount::from_sat(sat), script_pubkey: ScriptBuf::new() };
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: Vec::new(),
            output: vec![output],
        }
    }

    type TestReconciler =
        Reconciler<paychan::store::MemoryStore, paychan::chain::sim::SimulatedChain>;

    /// A fresh folder `name` for a log, its settings, an empty store.
    fn fixture(name: &str) -> (PathBuf, Settings, paychan::store::MemoryStore) {
        let dir = std::env::temp_dir().join(format!("paychan-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let settings = Settings {
            log_file: dir.join("events.jsonl"),
            interval: Duration::from_secs(1),
            usage_every: Duration::ZERO,
        };
        (dir, settings, paychan::store::MemoryStore::new())
    }

    /// A reconciler (as after a restart) on the log of `settings`.
    fn reconciler(settings: &Settings, store: &paychan::store::MemoryStore) -> TestReconciler {
        let chain = paychan::chain::sim::SimulatedChain::new();
        let (appended, metrics) = (Arc::default(), Metrics::default());
        Reconciler::new(settings, store.clone(), chain, appended, metrics).unwrap()
    }

    /// The reconciler on a log whose last pass lost its tail in a crash (only its first line
    /// kept): the next pass writes exactly the lines lost, with the uncut log's ids.
    #[tokio::test]
    async fn a_pass_cut_by_a_crash_is_completed_after_the_restart() {
        use ChannelState as S;
        let (dir, settings, store) = fixture("cut-pass");
        let a = record(0, 2);
        let a_id = a.id();
        store.create(a).await.unwrap();
        let ids = || -> Vec<String> {
            read(&settings.log_file).unwrap().0.into_iter().map(|e| e.id).collect()
        };
        let mut kept = 0;
        for (moves, count) in [
            (&[][..], 2),
            (&[(S::Open, S::Closing), (S::Closing, S::Closed), (S::Closed, S::Settled)][..], 3),
        ] {
            for (from, to) in moves {
                assert!(store.transition(a_id, *from, *to).await.unwrap());
            }
            assert_eq!(reconciler(&settings, &store).pass().await.unwrap(), count);
            let uncut = ids();
            // The pass's first line kept, the rest lost before the fsync.
            let text = std::fs::read_to_string(&settings.log_file).unwrap();
            let first_line: usize = text.split_inclusive('\n').take(kept + 1).map(str::len).sum();
            std::fs::write(&settings.log_file, &text[..first_line]).unwrap();
            assert_eq!(reconciler(&settings, &store).pass().await.unwrap(), count - 1);
            assert_eq!(ids(), uncut);
            kept += count;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The reconciler against a real store: a restart (a new reconciler on the same log)
    /// appends exactly what changed while it was down, a pass that is not a full listing
    /// still finds a channel that left the active states, and nothing is written twice.
    #[tokio::test]
    async fn a_restart_appends_only_what_changed_meanwhile() {
        let (dir, settings, store) = fixture("reconcile");
        let reconciler = || reconciler(&settings, &store);
        let (a, b) = (record(0, 2), record(1, 3));
        let (a_id, b_id) = (a.id(), b.id());
        store.create(a).await.unwrap();
        let mut first = reconciler();
        assert_eq!(first.pass().await.unwrap(), 2, "opened, funded");
        assert_eq!(first.pass().await.unwrap(), 0);
        let _ = store.debit(a_id, MilliSats::from_msat(1_500)).await.unwrap();
        assert_eq!(first.pass().await.unwrap(), 1, "usage");
        drop(first);

        // While down: a top-up and the whole close of a; b opened.
        let _ = store.store_payment(a_id, payment(5)).await.unwrap();
        use ChannelState as S;
        for (from, to) in [(S::Open, S::Closing), (S::Closing, S::Closed), (S::Closed, S::Settled)]
        {
            assert!(store.transition(a_id, from, to).await.unwrap());
        }
        store.create(b).await.unwrap();
        let mut second = reconciler();
        assert_eq!(second.pass().await.unwrap(), 6, "topped_up, closing, closed, settled; b");
        assert_eq!(second.pass().await.unwrap(), 0, "a settled channel is not seen again");
        // b fails before its expiry: found by the active listing's miss, not a full one.
        assert!(store.transition(b_id, S::Open, S::Failed).await.unwrap());
        assert_eq!(second.pass().await.unwrap(), 1);
        assert_eq!(second.passes % FULL_EVERY, 3, "not a full listing");

        let (events, _) = read(&settings.log_file).unwrap();
        let kinds = |id| -> Vec<Kind> {
            events.iter().filter(|e| e.channel == id).map(|e| e.kind).collect()
        };
        use Kind::*;
        assert_eq!(kinds(a_id), [Opened, Funded, Usage, ToppedUp, Closing, Closed, Settled]);
        assert_eq!(kinds(b_id), [Opened, Funded, Failed]);
        let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), events.len());
        let top_up = events.iter().find(|e| e.kind == ToppedUp).unwrap();
        assert_eq!((top_up.paid_delta_msat, top_up.paid_msat.to_msat()), (3_000, 5_000));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The close's txid is the best payment's: the reconciler need not sign the close.
    #[test]
    fn the_close_txid_is_the_best_payments() {
        use paychan::bitcoin::absolute::LockTime;
        use paychan::bitcoin::bip32::Xpriv;
        use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
        use paychan::bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf};
        let secp = Secp256k1::new();
        let master = Xpriv::new_master(paychan::bitcoin::Network::Regtest, &[7; 32]).unwrap();
        let (client, server) = (
            SecretKey::from_slice(&[1; 32]).unwrap(),
            paychan::channel::channel_key(&master, 0).unwrap(),
        );
        let key = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
        let script = |k: &SecretKey| ScriptBuf::new_p2wpkh(&key(k).wpubkey_hash());
        let tip = ChainTip { height: 1_000, median_time_past: 0 };
        let expiry = LockTime::from_height(2_008).unwrap();
        let params = paychan::channel::Terms::default()
            .agree(
                key(&client),
                key(&server),
                Amount::from_sat(100_000),
                expiry,
                script(&client),
                script(&server),
                tip,
            )
            .unwrap();
        let channel = params.at(OutPoint { txid: Txid::all_zeros(), vout: 0 });
        let mut best = channel.build_payment(Amount::from_sat(1_000)).unwrap();
        channel.sign_payment(&mut best, &client).unwrap();
        let mut record = ChannelRecord::open(channel, 0, best);
        assert_eq!(crate::console::close_txid(&record), None, "open: no close");
        record.state = ChannelState::Closed;
        let signed = record.close_transaction(&master).unwrap().compute_txid();
        assert_eq!(crate::console::close_txid(&record), Some(signed));
    }

    fn read_log_len(path: &Path) -> usize {
        let (events, cut) = read(path).unwrap();
        assert_eq!(cut, 0);
        events.len()
    }
}
