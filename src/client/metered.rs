//! Reading a metered stream as a paying client, without I/O: the server's
//! `Payment-Channel-Stream` header says how the stream is metered. An SSE stream's
//! `payment-required` events ask for a top-up and its closing `payment-receipt` is to be
//! checked, both taken out of what the caller reads; a byte stream's bytes are counted and the
//! channel is topped up ahead of the server's need.
//!
//! What a stream may cost the client is its own count: the units it received at the
//! advertised price (at most `max_per_request` each), the unit held, and the policy's
//! `max_prepaid`. A stream's top-ups, one at a time, never add more than that, whatever the
//! server's documents say.
//!
//! [`MeteredStream`] decides; its driver does the I/O and the top-ups (one at a time, which
//! the driver enforces: it may have one on its way) and tells it what they added. The Rust
//! [`PaidBody`](super::PaidBody) and the browser client (`web/`) drive the same type.

use bitcoin::Amount;

use super::SpendingPolicy;
use crate::MilliSats;
use crate::wire::{Problem, RECEIPT_EVENT, StreamUnit, TOP_UP_EVENT, per_kib_cost};

/// The longest SSE event the client holds back while looking for the end of it; a longer
/// one is passed on as it comes (the server's own events are small).
const MAX_EVENT: usize = 64 * 1024;

/// How far ahead of a byte stream the client tops up: when what it estimates is left covers
/// fewer than `LOW_WATER_KIB` KiB, it pays for `AHEAD_KIB` KiB more (at most the policy's
/// `max_prepaid`).
const LOW_WATER_KIB: u64 = 64;
const AHEAD_KIB: u64 = 256;

/// What the driver of a [`MeteredStream`] does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// The stream delivered units worth this much more (the client's own count): count it
    /// in the loss bound and the charge watch.
    Delivered(MilliSats),
    /// The server asked for a top-up (an SSE `payment-required` event): answer `problem` as
    /// a 402, adding at most `cap` (zero: hand the latest payment over again, adding nothing)
    /// — unless a top-up of the stream is on its way.
    TopUp {
        /// The server's problem document.
        problem: Problem,
        /// The most the top-up may add.
        cap: Amount,
    },
    /// A byte stream runs low: pay this much more ahead (within the loss bound) — unless a
    /// top-up of the stream is on its way.
    TopUpAhead(Amount),
    /// The SSE stream's closing receipt: check it; it may state at most `bound`.
    Receipt {
        /// The event's data.
        value: Vec<u8>,
        /// The most its price may be.
        bound: MilliSats,
    },
}

/// One metered stream, followed as it is read.
///
/// # Examples
///
/// ```
/// use paychan::MilliSats;
/// use paychan::client::SpendingPolicy;
/// use paychan::client::metered::{MeteredStream, StreamEvent};
///
/// let policy = SpendingPolicy::default();
/// let mut stream = MeteredStream::new(Some("sse; per-event=1000"), Some("text/event-stream"), &policy, None)
///     .expect("a metered SSE stream");
/// let mut events = Vec::new();
/// let out = stream.push(b"data: a\n\ndata: b\n\n", &mut events);
/// assert_eq!(out, b"data: a\n\ndata: b\n\n");
/// let one = StreamEvent::Delivered(MilliSats::from_msat(1_000));
/// assert_eq!(events, [one.clone(), one]);
/// ```
#[derive(Debug, Clone)]
pub struct MeteredStream {
    unit: StreamUnit,
    /// `Some` for an SSE stream.
    sse: Option<SseScanner>,
    /// Events (SSE) or bytes received.
    received: u64,
    /// What they cost at the advertised price.
    delivered: MilliSats,
    /// A byte stream's estimate of what is left to spend.
    left: MilliSats,
    /// What the stream's top-ups added (the client's numbers), as its driver last said.
    added: MilliSats,
    /// What of `added` `left` counts: only what they added, once they are done (a top-up may
    /// add less than asked: the loss bound lowers it).
    credited: MilliSats,
    max_prepaid: MilliSats,
    max_per_request: MilliSats,
    /// Whether the SSE stream's receipt came.
    receipted: bool,
    /// Whether the server ended the stream.
    finished: bool,
}

impl MeteredStream {
    /// A response's stream, from its `Payment-Channel-Stream` and `Content-Type` headers,
    /// under `policy`; `balance` is its `Payment-Channel-Balance`. `None` when the server does
    /// not meter it as a stream the client accepts — a unit price within `max_per_request`,
    /// and for SSE a `text/event-stream` body: such a body is passed on as it is (and, as any
    /// answer, judged request by request).
    pub fn new(
        unit: Option<&str>,
        content_type: Option<&str>,
        policy: &SpendingPolicy,
        balance: Option<MilliSats>,
    ) -> Option<Self> {
        let max_per_request = policy.max_per_request();
        let unit = unit.and_then(|value| value.parse::<StreamUnit>().ok())?;
        let is_sse = content_type.is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        let sse = match unit {
            StreamUnit::Event(price) if price <= max_per_request && is_sse => {
                Some(SseScanner::default())
            }
            StreamUnit::Kib(price) if price <= max_per_request => None,
            _ => return None,
        };
        Some(Self {
            unit,
            sse,
            received: 0,
            delivered: MilliSats::ZERO,
            left: balance.unwrap_or(MilliSats::ZERO),
            added: MilliSats::ZERO,
            credited: MilliSats::ZERO,
            max_prepaid: MilliSats::from_sat(policy.max_prepaid()).unwrap_or(MilliSats::MAX),
            max_per_request,
            receipted: false,
            finished: false,
        })
    }

    /// Whether it is an SSE stream (else a byte stream).
    pub fn is_sse(&self) -> bool {
        self.sse.is_some()
    }

    /// Whether the server ended the stream ([`finish`](Self::finish)).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The unit's price.
    pub fn price(&self) -> MilliSats {
        match self.unit {
            StreamUnit::Event(price) | StreamUnit::Kib(price) => price,
        }
    }

    /// What the received units cost now.
    fn cost(&self) -> MilliSats {
        match self.unit {
            StreamUnit::Event(price) => price.checked_mul(self.received).unwrap_or(MilliSats::MAX),
            StreamUnit::Kib(price) => per_kib_cost(price, self.received),
        }
    }

    /// The stream's finished top-ups added `added` in all (the client's own numbers, also for
    /// a top-up whose hand-over failed: the server may hold it).
    pub fn top_ups_added(&mut self, added: MilliSats) {
        self.added = self.added.max(added);
    }

    /// What the stream's top-ups may still add: what it delivered, the unit held, and
    /// `max_prepaid`, less what its top-ups already added.
    pub fn room(&self) -> MilliSats {
        self.delivered
            .saturating_add(self.price())
            .saturating_add(self.max_prepaid)
            .saturating_sub(self.added)
    }

    /// Counts in `left` what the stream's finished top-ups added since last time.
    fn credit(&mut self) {
        self.left = self.left.saturating_add(self.added.saturating_sub(self.credited));
        self.credited = self.added;
    }

    fn count(&mut self, units: u64, events: &mut Vec<StreamEvent>) {
        self.credit();
        self.received = self.received.saturating_add(units);
        let cost = self.cost();
        let new = cost.saturating_sub(self.delivered);
        self.delivered = cost;
        self.left = self.left.saturating_sub(new);
        if new > MilliSats::ZERO {
            events.push(StreamEvent::Delivered(new));
        }
    }

    /// A byte stream: a top-up ahead when the estimate of what is left runs low (within the
    /// stream's budget, as in-band top-ups are). Call it once before the first byte too: a
    /// balance already below the mark pays ahead at once.
    pub fn ahead(&mut self, events: &mut Vec<StreamEvent>) {
        if self.sse.is_some() {
            return;
        }
        let low = self.price().checked_mul(LOW_WATER_KIB).unwrap_or(MilliSats::MAX);
        let low = low.min(self.max_prepaid);
        let ahead = self.price().checked_mul(AHEAD_KIB).unwrap_or(MilliSats::MAX);
        let amount = ahead.min(self.max_prepaid).min(self.room()).to_sat_floor();
        self.credit();
        // `left` grows by what the top-up adds once it is done, not by what was asked: the
        // loss bound may let it add less, and the client must ask again as it reads.
        if self.left < low && amount > Amount::ZERO {
            events.push(StreamEvent::TopUpAhead(amount));
        }
    }

    /// Reads `chunk`: returns what passes on to the caller (for SSE, whole events with the
    /// payment events taken out) and adds to `events` what to do.
    pub fn push(&mut self, chunk: &[u8], events: &mut Vec<StreamEvent>) -> Vec<u8> {
        let Some(scanner) = &mut self.sse else {
            self.count(chunk.len() as u64, events);
            self.ahead(events);
            return chunk.to_vec();
        };
        let mut found = Vec::new();
        let out = scanner.push(chunk, &mut found);
        for event in found {
            match event {
                Found::Data => self.count(1, events),
                Found::TopUp(problem) => {
                    // Zero when the stream asked for more than it sent: then the driver only
                    // hands the latest payment over again (the server may not have it: an
                    // earlier hand-over failed), adding nothing.
                    let cap = self.room().to_sat_floor();
                    events.push(StreamEvent::TopUp { problem, cap });
                }
                Found::Receipt(value) => {
                    self.receipted = true;
                    // The price up front (within `max_per_request`), what was received, and
                    // the unit in flight.
                    let bound = self
                        .delivered
                        .saturating_add(self.max_per_request)
                        .saturating_add(self.price());
                    events.push(StreamEvent::Receipt { value, bound });
                }
            }
        }
        out
    }

    /// The server ended the stream: what was held back, and whether an SSE stream ended
    /// without its receipt.
    pub fn finish(&mut self) -> (Vec<u8>, bool) {
        self.finished = true;
        let Some(scanner) = self.sse.as_mut() else { return (Vec::new(), false) };
        (scanner.finish(), !self.receipted)
    }
}

/// Something of ours found in an SSE stream.
#[derive(Debug, Clone, PartialEq)]
enum Found {
    TopUp(Problem),
    Receipt(Vec<u8>),
    /// An event of the application's with data (passed on).
    Data,
}

/// Splits an SSE byte stream into events and takes the payment events out. Each byte is
/// looked at once.
#[derive(Debug, Clone)]
struct SseScanner {
    /// The current event's bytes so far.
    buffer: Vec<u8>,
    /// Where the scan goes on in `buffer`.
    scan: usize,
    /// Where the current line starts in `buffer` (`None`: mid-line after a flush).
    line: Option<usize>,
    /// An event too long to hold was passed on: the rest of it is passed on unread.
    skipping: bool,
}

impl Default for SseScanner {
    fn default() -> Self {
        Self { buffer: Vec::new(), scan: 0, line: Some(0), skipping: false }
    }
}

impl SseScanner {
    /// Feeds `chunk`; returns what passes on to the caller (whole events, ours taken out) and
    /// adds ours, and a [`Found::Data`] for each event of the application's, to `found`.
    fn push(&mut self, chunk: &[u8], found: &mut Vec<Found>) -> Vec<u8> {
        self.buffer.extend_from_slice(chunk);
        let mut out = Vec::new();
        // Where the current event starts, where to look next, where the current line starts.
        let (mut event, mut at, mut line) = (0, self.scan, self.line);
        loop {
            let Some(offset) = self.buffer[at..].iter().position(|b| matches!(b, b'\n' | b'\r'))
            else {
                at = self.buffer.len();
                break;
            };
            let end = at + offset;
            let next = match (self.buffer[end], self.buffer.get(end + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                // A `\n` may follow: look again with the next chunk.
                (b'\r', None) => {
                    at = end;
                    break;
                }
                _ => end + 1,
            };
            if line == Some(end) {
                // A blank line: the event `event..end` is whole.
                let kind = if self.skipping { None } else { ours(&self.buffer[event..end]) };
                match kind {
                    Some(Found::Data) => {
                        found.push(Found::Data);
                        out.extend_from_slice(&self.buffer[event..next]);
                    }
                    Some(ours) => found.push(ours),
                    None => out.extend_from_slice(&self.buffer[event..next]),
                }
                self.skipping = false;
                event = next;
            }
            line = Some(next);
            at = next;
        }
        self.buffer.drain(..event);
        self.scan = at - event;
        self.line = line.map(|line| line.saturating_sub(event));
        if self.buffer.len() > MAX_EVENT {
            // Too long to be ours: pass it on, and the rest of the event unread.
            self.line = (self.line == Some(self.buffer.len())).then_some(0);
            out.append(&mut self.buffer);
            self.scan = 0;
            self.skipping = true;
        }
        out
    }

    /// The stream ended: what was held back.
    fn finish(&mut self) -> Vec<u8> {
        self.scan = 0;
        self.line = Some(0);
        std::mem::take(&mut self.buffer)
    }
}

/// The payment event in `lines`, if it is one; [`Found::Data`] for an event of the
/// application's with data. Lines end with `\r\n`, `\n` or `\r`.
fn ours(lines: &[u8]) -> Option<Found> {
    let text = std::str::from_utf8(lines).ok()?;
    let (mut name, mut data) = ("", Vec::new());
    for line in text.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = value,
            "data" => data.push(value),
            _ => {}
        }
    }
    let has_data = !data.is_empty();
    let data = data.join("\n");
    match name {
        TOP_UP_EVENT => serde_json::from_str(&data).ok().map(Found::TopUp),
        RECEIPT_EVENT => Some(Found::Receipt(data.into_bytes())),
        _ if has_data => Some(Found::Data),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn scan(chunks: &[&str]) -> (String, Vec<Found>) {
        let mut scanner = SseScanner::default();
        let (mut out, mut found) = (Vec::new(), Vec::new());
        for chunk in chunks {
            out.extend_from_slice(&scanner.push(chunk.as_bytes(), &mut found));
        }
        out.extend_from_slice(&scanner.finish());
        (String::from_utf8(out).unwrap(), found)
    }

    #[test]
    fn payment_events_are_taken_out_whatever_the_chunking_and_line_endings() {
        let problem = r#"{"type":"urn:paychan:problem:insufficient-balance","title":"Payment Required","status":402,"detail":"d","code":"insufficient-balance"}"#;
        let stream = format!(
            "data: one\n\nevent: {TOP_UP_EVENT}\ndata: {problem}\n\r\ndata: two\r\n\r\n: keep-alive\r\rid: 3\ndata: a\ndata: b\n\nevent: {RECEIPT_EVENT}\ndata: abc\n\n"
        );
        let expected = "data: one\n\ndata: two\r\n\r\n: keep-alive\r\rid: 3\ndata: a\ndata: b\n\n";
        for split in 0..stream.len() {
            let (out, found) = scan(&[&stream[..split], &stream[split..]]);
            assert_eq!(out, expected, "split at {split}");
            let ours: Vec<&Found> = found.iter().filter(|f| **f != Found::Data).collect();
            assert_eq!(ours.len(), 2, "split at {split}");
            assert!(matches!(ours[0], Found::TopUp(p) if p.detail == "d"));
            assert_eq!(*ours[1], Found::Receipt(b"abc".to_vec()));
            assert_eq!(found.len(), 5, "three events of the application's with data");
        }
        let bytes: Vec<String> = stream.chars().map(String::from).collect();
        let (out, found) = scan(&bytes.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!((out.as_str(), found.len()), (expected, 5));
    }

    /// A stream of an SSE stream (or a byte stream) at 1 sat a unit, `max_prepaid` 10 sat,
    /// `max_per_request` 5 sat (the Rust `Watch`'s tests follow it too).
    pub(crate) fn stream(sse: bool, balance: MilliSats) -> MeteredStream {
        let policy = SpendingPolicy::default()
            .with_max_prepaid(Amount::from_sat(10))
            .with_max_per_request(MilliSats::from_msat(5_000));
        let (unit, kind) = if sse {
            ("sse; per-event=1000", "text/event-stream")
        } else {
            ("bytes; per-kib=1000", "audio/wav")
        };
        MeteredStream::new(Some(unit), Some(kind), &policy, Some(balance)).unwrap()
    }

    /// An SSE `payment-required` event (the Rust `Watch`'s tests read it too).
    pub(crate) fn ask() -> Vec<u8> {
        let problem = r#"{"status":402,"code":"insufficient-balance","detail":"more"}"#;
        format!("event: {TOP_UP_EVENT}\ndata: {problem}\n\n").into_bytes()
    }

    /// The top-ups asked for in `events`: in-band caps and amounts ahead.
    fn asked(events: &[StreamEvent]) -> (Vec<Amount>, Vec<Amount>) {
        let mut out = (Vec::new(), Vec::new());
        for event in events {
            match event {
                StreamEvent::TopUp { cap, .. } => out.0.push(*cap),
                StreamEvent::TopUpAhead(amount) => out.1.push(*amount),
                _ => {}
            }
        }
        out
    }

    fn delivered(events: &[StreamEvent]) -> MilliSats {
        events
            .iter()
            .map(|e| match e {
                StreamEvent::Delivered(cost) => *cost,
                _ => MilliSats::ZERO,
            })
            .fold(MilliSats::ZERO, MilliSats::saturating_add)
    }

    #[test]
    fn a_stream_that_asks_without_sending_gets_bounded_top_ups() {
        let mut s = stream(true, MilliSats::ZERO);
        let mut events = Vec::new();
        // A burst in one chunk: each ask capped at a unit and `max_prepaid` (the driver runs
        // one at a time).
        let burst: Vec<u8> = (0..10).flat_map(|_| ask()).collect();
        s.push(&burst, &mut events);
        assert_eq!(asked(&events).0, [Amount::from_sat(11); 10]);
        // It added all of that (the client's own number): nothing more without units (the
        // latest payment is only handed over again).
        s.top_ups_added(MilliSats::from_msat(11_000));
        events.clear();
        s.push(&ask(), &mut events);
        assert_eq!(asked(&events).0, [Amount::ZERO]);
        events.clear();
        // Three events received earn three units of room.
        s.push(b"data: a\n\ndata: b\n\ndata: c\n\n", &mut events);
        assert_eq!(delivered(&events), MilliSats::from_msat(3_000));
        s.push(&ask(), &mut events);
        assert_eq!(asked(&events).0, [Amount::from_sat(3)]);
        // The closing receipt may state what was counted, the price up front and a unit.
        events.clear();
        s.push(format!("event: {RECEIPT_EVENT}\ndata: r\n\n").as_bytes(), &mut events);
        assert_eq!(
            events,
            [StreamEvent::Receipt {
                value: b"r".to_vec(),
                bound: MilliSats::from_msat(3_000 + 5_000 + 1_000)
            }]
        );
    }

    #[test]
    fn an_sse_stream_the_server_ends_without_a_receipt_is_reported() {
        let mut s = stream(true, MilliSats::ZERO);
        s.push(b"data: token\n\n", &mut Vec::new());
        assert_eq!(s.finish(), (Vec::new(), true));
        let mut s = stream(true, MilliSats::ZERO);
        s.push(
            format!("data: token\n\nevent: {RECEIPT_EVENT}\ndata: r\n\n").as_bytes(),
            &mut Vec::new(),
        );
        assert_eq!(s.finish(), (Vec::new(), false), "a receipt came");
        assert!(s.finished());
    }

    #[test]
    fn a_byte_stream_is_topped_up_ahead_by_its_own_count() {
        // 1 sat a KiB, 100 KiB prepaid, `max_prepaid` 10 sat: under 10 sat left (the mark is
        // 64 KiB's worth or `max_prepaid`, the less), the client pays 10 sat ahead.
        let mut s = stream(false, MilliSats::from_msat(100_000));
        let kib = vec![0; 1024];
        let mut events = Vec::new();
        for _ in 0..90 {
            s.push(&kib, &mut events);
        }
        assert!(asked(&events).1.is_empty(), "10 sat left: not yet");
        s.push(&kib, &mut events);
        assert_eq!(asked(&events).1, [Amount::from_sat(10)]);
        // Asked again while low (the driver starts one at a time).
        s.push(&kib, &mut events);
        assert_eq!(asked(&events).1.len(), 2);
        events.clear();
        s.top_ups_added(MilliSats::from_msat(10_000));
        // 18 sat's worth was left after the first; under 10 again 9 KiB later.
        for _ in 0..8 {
            s.push(&kib, &mut events);
        }
        assert!(asked(&events).1.is_empty());
        s.push(&kib, &mut events);
        assert_eq!(asked(&events).1.len(), 1, "low again: again");
        assert_eq!(delivered(&events), MilliSats::from_msat(9_000));
    }

    #[test]
    fn top_ups_ahead_stay_within_the_stream_budget() {
        // Nothing delivered, nothing left: one unit and `max_prepaid` at most, then nothing
        // until bytes come.
        let mut s = stream(false, MilliSats::ZERO);
        let mut events = Vec::new();
        s.ahead(&mut events);
        assert_eq!(asked(&events).1, [Amount::from_sat(10)]);
        s.top_ups_added(MilliSats::from_msat(10_000));
        s.credit();
        s.left = MilliSats::ZERO;
        events.clear();
        s.ahead(&mut events);
        assert_eq!(asked(&events).1, [Amount::from_sat(1)]);
    }

    #[test]
    fn a_garbled_or_unfinished_event_is_passed_on() {
        let garbled = format!("event: {TOP_UP_EVENT}\ndata: not json\n\n");
        assert_eq!(scan(&[&garbled]), (garbled.clone(), vec![]));
        assert_eq!(scan(&["data: cut"]), ("data: cut".to_owned(), vec![]));
        assert_eq!(scan(&[": comment\n\n"]), (": comment\n\n".to_owned(), vec![]));
        let long = format!("data: {}", "x".repeat(MAX_EVENT + 1));
        let mut scanner = SseScanner::default();
        assert_eq!(scanner.push(long.as_bytes(), &mut Vec::new()).len(), long.len());
        // The rest of the long event is passed on unread, even if it looks like ours.
        let mut found = Vec::new();
        let tail = format!("x\nevent: {RECEIPT_EVENT}\ndata: r\n\ndata: next\n\n");
        assert_eq!(scanner.push(tail.as_bytes(), &mut found), tail.as_bytes());
        assert_eq!(found, [Found::Data], "the next event is read again");
    }

    #[test]
    fn payment_events_with_lone_carriage_returns_are_ours() {
        // (A last `\r` is known to end a line once the next byte comes.)
        let stream = format!("event: {RECEIPT_EVENT}\rdata: r\r\rdata: x\r\rdata: y");
        let (out, found) = scan(&[&stream]);
        assert_eq!(out, "data: x\r\rdata: y");
        assert_eq!(found, [Found::Receipt(b"r".to_vec()), Found::Data]);
    }

    #[test]
    fn a_stream_the_client_does_not_accept_is_not_metered() {
        let policy = SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(5_000));
        let sse = Some("text/event-stream");
        assert!(MeteredStream::new(Some("sse; per-event=5001"), sse, &policy, None).is_none());
        assert!(
            MeteredStream::new(Some("sse; per-event=1"), Some("text/plain"), &policy, None)
                .is_none()
        );
        assert!(MeteredStream::new(Some("garbage"), sse, &policy, None).is_none());
        assert!(MeteredStream::new(None, sse, &policy, None).is_none());
        assert!(MeteredStream::new(Some("bytes; per-kib=1"), None, &policy, None).is_some());
    }
}
