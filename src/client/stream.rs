//! Reading a metered stream as a paying client ([`PaidBody`]): the server's
//! `Payment-Channel-Stream` header says how the stream is metered. An SSE stream's
//! `payment-required` events are answered with a top-up and its closing `payment-receipt`
//! is checked, both taken out of what the caller reads; a byte stream's bytes are counted and
//! the channel topped up ahead of the server's need.
//!
//! What a stream may cost the client is its own count: the units it received at the
//! advertised price (at most `max_per_request` each), the unit held, and the policy's
//! `max_prepaid`. A stream's top-ups, one at a time, never add more than that, whatever the
//! server's documents say.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bitcoin::Amount;
use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::payer::CurrentPayment;
use super::{ClientStore, Payer, SpendingPolicy, Transport};
use crate::MilliSats;
use crate::server::{RECEIPT_EVENT, TOP_UP_EVENT};
use crate::wire::{PAYMENT_CHANNEL_STREAM, Problem, StreamUnit, per_kib_cost};

/// The longest SSE event the client holds back while looking for the end of it; a longer
/// one is passed on as it comes (the server's own events are small).
const MAX_EVENT: usize = 64 * 1024;

/// How far ahead of a byte stream the client tops up: when what it estimates is left covers
/// fewer than `LOW_WATER_KIB` KiB, it pays for `AHEAD_KIB` KiB more (at most the policy's
/// `max_prepaid`).
const LOW_WATER_KIB: u64 = 64;
const AHEAD_KIB: u64 = 256;

/// One stream's top-ups: what they added (the client's own numbers) and whether one is on
/// its way. Shared with the background task that makes it.
#[derive(Debug, Default)]
pub(crate) struct TopUps {
    added_msat: AtomicU64,
    in_flight: AtomicBool,
}

impl TopUps {
    /// Claims the right to make the next top-up; `false` while one is on its way.
    fn start(&self) -> bool {
        !self.in_flight.swap(true, Ordering::AcqRel)
    }

    /// The top-up made (or failed): it added `added`.
    fn done(&self, added: Amount) {
        let added = MilliSats::from_sat(added).unwrap_or(MilliSats::MAX);
        self.added_msat.fetch_add(added.to_msat(), Ordering::Relaxed);
        self.in_flight.store(false, Ordering::Release);
    }

    fn added(&self) -> MilliSats {
        MilliSats::from_msat(self.added_msat.load(Ordering::Relaxed))
    }
}

/// What the payer does for a stream; the store's type erased.
pub(crate) trait StreamHooks: Send + Sync + 'static {
    /// Answers an in-band top-up request in the background, adding at most `cap`; records
    /// what it added in `top_ups` and clears its in-flight mark.
    fn top_up(&self, problem: Problem, cap: Amount, top_ups: Arc<TopUps>);
    /// Pays `amount` more ahead of a byte stream in the background, on the stream's channel
    /// only; records it in `top_ups`.
    fn top_up_by(&self, amount: Amount, top_ups: Arc<TopUps>);
    /// The stream delivered units worth `cost` (the client's count).
    fn delivered(&self, cost: MilliSats);
    /// Checks the stream's receipt; it may state at most `bound`.
    fn receipt(&self, value: &[u8], bound: MilliSats);
    /// A stream starts.
    fn started(&self);
    /// An SSE stream ended (the server ended it) without a receipt.
    fn no_receipt(&self);
    /// The stream ended (`early`: the client dropped it before the server ended it).
    fn ended(&self, early: bool);
}

/// The payer's hooks for one stream: the request it answers and the transport for top-ups.
pub(crate) struct Hooks<St> {
    pub(crate) payer: Payer<St>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) sent: CurrentPayment,
    pub(crate) method: String,
    pub(crate) path: String,
    /// The receipt digest the request linked to.
    pub(crate) prev: Option<[u8; 32]>,
}

/// Runs `task` on the current tokio runtime; without one (a body polled elsewhere), nothing
/// is paid and the mark is cleared.
fn spawn(top_ups: Arc<TopUps>, task: impl Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(task)),
        Err(_) => {
            tracing::warn!("a metered stream read outside a tokio runtime: no top-up");
            top_ups.done(Amount::ZERO);
        }
    }
}

impl<St: ClientStore + 'static> StreamHooks for Hooks<St> {
    fn top_up(&self, problem: Problem, cap: Amount, top_ups: Arc<TopUps>) {
        let (payer, transport) = (self.payer.clone(), Arc::clone(&self.transport));
        let channel = self.sent.id;
        let task_top_ups = Arc::clone(&top_ups);
        spawn(top_ups, async move {
            let (added, answer) =
                payer.top_up_capped(&*transport, &problem, Some(cap), Some(channel)).await;
            if let Err(e) = answer {
                tracing::warn!(error = %e, "a stream's top-up failed");
            }
            // Counted also when the hand-over failed: the server may hold the payment.
            task_top_ups.done(added);
        });
    }

    fn top_up_by(&self, amount: Amount, top_ups: Arc<TopUps>) {
        let (payer, transport) = (self.payer.clone(), Arc::clone(&self.transport));
        let channel = self.sent.id;
        let task_top_ups = Arc::clone(&top_ups);
        spawn(top_ups, async move {
            let (added, answer) = payer.top_up_by_on(&*transport, channel, amount).await;
            if let Err(e) = answer {
                tracing::warn!(error = %e, "a top-up ahead of a byte stream failed");
            }
            task_top_ups.done(added);
        });
    }

    fn delivered(&self, cost: MilliSats) {
        self.payer.note_streamed(&self.sent, cost);
    }

    fn receipt(&self, value: &[u8], bound: MilliSats) {
        let request = (self.method.as_str(), self.path.as_str());
        let _checked = self.payer.note_stream_receipt(&self.sent, value, request, self.prev, bound);
    }

    fn started(&self) {
        self.payer.stream_started();
    }

    fn no_receipt(&self) {
        self.payer.note_missing_receipt("a metered stream that ended without a receipt");
    }

    fn ended(&self, early: bool) {
        self.payer.stream_ended(&self.sent, early);
    }
}

/// Something of ours found in an SSE stream.
#[derive(Debug, PartialEq)]
pub(crate) enum Found {
    TopUp(Problem),
    Receipt(Vec<u8>),
    /// An event of the application's with data (passed on).
    Data,
}

/// Splits an SSE byte stream into events and takes the payment events out. Each byte is
/// looked at once.
#[derive(Debug)]
pub(crate) struct SseScanner {
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
    pub(crate) fn push(&mut self, chunk: &[u8], found: &mut Vec<Found>) -> Bytes {
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
        Bytes::from(out)
    }

    /// The stream ended: what was held back.
    pub(crate) fn finish(&mut self) -> Bytes {
        self.scan = 0;
        self.line = Some(0);
        Bytes::from(std::mem::take(&mut self.buffer))
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

/// How the client follows one metered stream.
struct Watch {
    hooks: Box<dyn StreamHooks>,
    unit: StreamUnit,
    /// `Some` for an SSE stream.
    sse: Option<SseScanner>,
    /// Events (SSE) or bytes received.
    received: u64,
    /// What they cost at the advertised price.
    delivered: MilliSats,
    /// A byte stream's estimate of what is left to spend.
    left: MilliSats,
    /// What of the stream's top-ups `left` counts: only what they added, once they are done
    /// (a top-up may add less than asked: the loss bound lowers it).
    credited: MilliSats,
    max_prepaid: MilliSats,
    max_per_request: MilliSats,
    top_ups: Arc<TopUps>,
    /// Whether the SSE stream's receipt came.
    receipted: bool,
    /// Whether the server ended the stream.
    finished: bool,
}

impl Watch {
    /// The unit's price.
    fn price(&self) -> MilliSats {
        match self.unit {
            StreamUnit::Event(price) | StreamUnit::Kib(price) => price,
        }
    }

    /// What the cost of `received` units is now.
    fn cost(&self) -> MilliSats {
        match self.unit {
            StreamUnit::Event(price) => price.checked_mul(self.received).unwrap_or(MilliSats::MAX),
            StreamUnit::Kib(price) => per_kib_cost(price, self.received),
        }
    }

    /// What the stream's top-ups may still add: what it delivered, the unit held, and
    /// `max_prepaid`, less what its top-ups already added.
    fn room(&self) -> MilliSats {
        self.delivered
            .saturating_add(self.price())
            .saturating_add(self.max_prepaid)
            .saturating_sub(self.top_ups.added())
    }

    /// Counts in `left` what the stream's finished top-ups added since last time.
    fn credit(&mut self) {
        let added = self.top_ups.added();
        self.left = self.left.saturating_add(added.saturating_sub(self.credited));
        self.credited = added;
    }

    fn count(&mut self, units: u64) {
        self.credit();
        self.received = self.received.saturating_add(units);
        let cost = self.cost();
        let new = cost.saturating_sub(self.delivered);
        self.delivered = cost;
        self.left = self.left.saturating_sub(new);
        if new > MilliSats::ZERO {
            self.hooks.delivered(new);
        }
    }

    /// A byte stream: tops up ahead when the estimate runs low.
    fn ahead(&mut self) {
        let low = self.price().checked_mul(LOW_WATER_KIB).unwrap_or(MilliSats::MAX);
        let low = low.min(self.max_prepaid);
        let ahead = self.price().checked_mul(AHEAD_KIB).unwrap_or(MilliSats::MAX);
        // Within the stream's budget, as in-band top-ups are.
        let amount = ahead.min(self.max_prepaid).min(self.room()).to_sat_floor();
        self.credit();
        if self.left >= low || amount == Amount::ZERO || !self.top_ups.start() {
            return;
        }
        // `left` grows by what the top-up adds once it is done, not by what was asked: the
        // loss bound may let it add less, and the client must ask again as it reads.
        self.hooks.top_up_by(amount, Arc::clone(&self.top_ups));
    }

    fn data(&mut self, chunk: Bytes) -> Bytes {
        let Some(scanner) = &mut self.sse else {
            self.count(chunk.len() as u64);
            self.ahead();
            return chunk;
        };
        let mut found = Vec::new();
        let out = scanner.push(&chunk, &mut found);
        for event in found {
            match event {
                Found::Data => self.count(1),
                Found::TopUp(problem) => {
                    let room = self.room().to_sat_floor();
                    if room == Amount::ZERO || !self.top_ups.start() {
                        tracing::warn!("a stream asked for more than it sent, or asked twice");
                    } else {
                        self.hooks.top_up(problem, room, Arc::clone(&self.top_ups));
                    }
                }
                Found::Receipt(value) => {
                    self.receipted = true;
                    // The price up front (within `max_per_request`), what was received, and
                    // the unit in flight.
                    let bound = self
                        .delivered
                        .saturating_add(self.max_per_request)
                        .saturating_add(self.price());
                    self.hooks.receipt(&value, bound);
                }
            }
        }
        out
    }

    /// The server ended the stream: what was held back.
    fn finish(&mut self) -> Bytes {
        self.finished = true;
        let Some(scanner) = self.sse.as_mut() else { return Bytes::new() };
        let rest = scanner.finish();
        if !self.receipted {
            self.hooks.no_receipt();
        }
        rest
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.hooks.ended(!self.finished);
    }
}

pin_project! {
    /// The body of a response from [`PaymentService`](super::PaymentService): the server's
    /// body as it is, but for a metered stream (see
    /// [`StreamMeter`](crate::server::StreamMeter)), which the client pays as it reads: an SSE
    /// stream's `payment-required` events are answered with a top-up and its
    /// `payment-receipt` is checked, both taken out of what the caller reads; a byte stream
    /// is counted and the channel topped up ahead of the server's need. A stream's top-ups
    /// together never add more than what it delivered (at the advertised unit price), the
    /// unit held, and the policy's `max_prepaid`.
    pub struct PaidBody<B> {
        #[pin]
        inner: B,
        watch: Option<Box<Watch>>,
        done: bool,
    }
}

impl<B> std::fmt::Debug for PaidBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaidBody").field("metered", &self.watch.is_some()).finish_non_exhaustive()
    }
}

impl<B> PaidBody<B> {
    /// A body passed on as it is.
    pub(crate) fn plain(inner: B) -> Self {
        Self { inner, watch: None, done: false }
    }

    /// `inner`, a response with `headers` to a request the payer paid: watched when the
    /// server meters it as a stream the client accepts — a unit price within
    /// `max_per_request`, and for SSE a `text/event-stream` body. Anything else is passed on
    /// as it is (and, as any answer, judged request by request).
    pub(crate) fn paid(
        inner: B,
        headers: &HeaderMap,
        hooks: impl StreamHooks,
        policy: &SpendingPolicy,
        balance: Option<MilliSats>,
    ) -> Self {
        let max_per_request = policy.max_per_request();
        let unit = headers
            .get(PAYMENT_CHANNEL_STREAM)
            .and_then(|value| value.to_str().ok()?.parse::<StreamUnit>().ok());
        let is_sse = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim_start().starts_with("text/event-stream"));
        let sse = match unit {
            Some(StreamUnit::Event(price)) if price <= max_per_request && is_sse => {
                Some(SseScanner::default())
            }
            Some(StreamUnit::Kib(price)) if price <= max_per_request => None,
            _ => return Self::plain(inner),
        };
        hooks.started();
        let mut watch = Watch {
            hooks: Box::new(hooks),
            unit: unit.unwrap_or(StreamUnit::Kib(MilliSats::ZERO)),
            sse,
            received: 0,
            delivered: MilliSats::ZERO,
            left: balance.unwrap_or(MilliSats::ZERO),
            credited: MilliSats::ZERO,
            max_prepaid: MilliSats::from_sat(policy.max_prepaid()).unwrap_or(MilliSats::MAX),
            max_per_request,
            top_ups: Arc::default(),
            receipted: false,
            finished: false,
        };
        if watch.sse.is_none() {
            // A balance already below the mark: pay ahead before the first byte.
            watch.ahead();
        }
        Self { inner, watch: Some(Box::new(watch)), done: false }
    }

    /// Whether the body is a metered stream the client pays as it reads.
    pub fn is_metered(&self) -> bool {
        self.watch.is_some()
    }
}

impl<B> Body for PaidBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    *this.done = true;
                    let rest = this.watch.as_mut().map(|watch| watch.finish()).unwrap_or_default();
                    *this.watch = None;
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            };
            let frame = match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    match this.watch.as_mut() {
                        Some(watch) => watch.data(data),
                        None => data,
                    }
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => return Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Err(_) => continue,
                },
            };
            if !frame.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.watch.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.watch.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}

#[cfg(test)]
mod tests {
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

    /// What the hooks were asked to do.
    #[derive(Default)]
    struct Asked {
        /// The caps of in-band top-ups.
        top_ups: Vec<Amount>,
        /// The amounts of top-ups ahead.
        ahead: Vec<Amount>,
        receipts: Vec<MilliSats>,
        no_receipt: usize,
        delivered: MilliSats,
    }

    /// Hooks that record what they are asked; the test finishes the top-ups.
    #[derive(Clone, Default)]
    struct Recording(Arc<std::sync::Mutex<Asked>>);

    impl StreamHooks for Recording {
        fn top_up(&self, _: Problem, cap: Amount, _: Arc<TopUps>) {
            self.0.lock().unwrap().top_ups.push(cap);
        }
        fn top_up_by(&self, amount: Amount, _: Arc<TopUps>) {
            self.0.lock().unwrap().ahead.push(amount);
        }
        fn delivered(&self, cost: MilliSats) {
            let mut asked = self.0.lock().unwrap();
            asked.delivered = asked.delivered.saturating_add(cost);
        }
        fn receipt(&self, _: &[u8], bound: MilliSats) {
            self.0.lock().unwrap().receipts.push(bound);
        }
        fn started(&self) {}
        fn no_receipt(&self) {
            self.0.lock().unwrap().no_receipt += 1;
        }
        fn ended(&self, _: bool) {}
    }

    /// A watch of an SSE stream (or a byte stream) at 1 sat a unit, `max_prepaid` 10 sat.
    fn watch(sse: bool, balance: MilliSats) -> (Watch, Recording) {
        let hooks = Recording::default();
        let price = MilliSats::from_msat(1_000);
        let watch = Watch {
            hooks: Box::new(hooks.clone()),
            unit: if sse { StreamUnit::Event(price) } else { StreamUnit::Kib(price) },
            sse: sse.then(SseScanner::default),
            received: 0,
            delivered: MilliSats::ZERO,
            left: balance,
            credited: MilliSats::ZERO,
            max_prepaid: MilliSats::from_msat(10_000),
            max_per_request: MilliSats::from_msat(5_000),
            top_ups: Arc::default(),
            receipted: false,
            finished: false,
        };
        (watch, hooks)
    }

    fn ask() -> Bytes {
        let problem = r#"{"status":402,"code":"insufficient-balance","detail":"more"}"#;
        Bytes::from(format!("event: {TOP_UP_EVENT}\ndata: {problem}\n\n"))
    }

    #[test]
    fn a_stream_that_asks_without_sending_gets_one_bounded_top_up_at_a_time() {
        let (mut w, hooks) = watch(true, MilliSats::ZERO);
        // A burst in one chunk: one top-up, capped at a unit and `max_prepaid`.
        let burst: Vec<u8> = (0..10).flat_map(|_| ask().to_vec()).collect();
        w.data(Bytes::from(burst));
        assert_eq!(hooks.0.lock().unwrap().top_ups, [Amount::from_sat(11)]);
        // It added all of that (the client's own number): nothing more without units.
        w.top_ups.done(Amount::from_sat(11));
        w.data(ask());
        assert_eq!(hooks.0.lock().unwrap().top_ups.len(), 1);
        // Three events received earn three units of room.
        w.data(Bytes::from_static(b"data: a\n\ndata: b\n\ndata: c\n\n"));
        assert_eq!(hooks.0.lock().unwrap().delivered, MilliSats::from_msat(3_000));
        w.data(ask());
        assert_eq!(hooks.0.lock().unwrap().top_ups, [Amount::from_sat(11), Amount::from_sat(3)]);
        // The closing receipt may state what was counted, the price up front and a unit.
        w.data(Bytes::from(format!("event: {RECEIPT_EVENT}\ndata: r\n\n")));
        assert_eq!(hooks.0.lock().unwrap().receipts, [MilliSats::from_msat(3_000 + 5_000 + 1_000)]);
    }

    #[test]
    fn an_sse_stream_the_server_ends_without_a_receipt_is_reported() {
        let (mut w, hooks) = watch(true, MilliSats::ZERO);
        w.data(Bytes::from_static(b"data: token\n\n"));
        w.finish();
        assert_eq!(hooks.0.lock().unwrap().no_receipt, 1);
        let (mut w, hooks) = watch(true, MilliSats::ZERO);
        w.data(Bytes::from(format!("data: token\n\nevent: {RECEIPT_EVENT}\ndata: r\n\n")));
        w.finish();
        assert_eq!(hooks.0.lock().unwrap().no_receipt, 0, "a receipt came");
    }

    #[test]
    fn a_byte_stream_is_topped_up_ahead_by_its_own_count_one_at_a_time() {
        // 1 sat a KiB, 100 KiB prepaid, `max_prepaid` 10 sat: under 10 sat left (the mark is
        // 64 KiB's worth or `max_prepaid`, the less), the client pays 10 sat ahead.
        let (mut w, hooks) = watch(false, MilliSats::from_msat(100_000));
        let kib = || Bytes::from(vec![0; 1024]);
        for _ in 0..90 {
            w.data(kib());
        }
        assert!(hooks.0.lock().unwrap().ahead.is_empty(), "10 sat left: not yet");
        w.data(kib());
        assert_eq!(hooks.0.lock().unwrap().ahead, [Amount::from_sat(10)]);
        w.data(kib());
        assert_eq!(hooks.0.lock().unwrap().ahead.len(), 1, "one at a time");
        w.top_ups.done(Amount::from_sat(10));
        // 19 sat's worth was left after the first; under 10 again 10 KiB later.
        for _ in 0..8 {
            w.data(kib());
        }
        assert_eq!(hooks.0.lock().unwrap().ahead.len(), 1);
        w.data(kib());
        assert_eq!(hooks.0.lock().unwrap().ahead.len(), 2, "low again: again");
        assert_eq!(hooks.0.lock().unwrap().delivered, MilliSats::from_msat(101_000));
    }

    #[test]
    fn top_ups_ahead_stay_within_the_stream_budget() {
        // Nothing delivered, nothing left: one unit and `max_prepaid` at most, then nothing
        // until bytes come.
        let (mut w, hooks) = watch(false, MilliSats::ZERO);
        w.ahead();
        assert_eq!(hooks.0.lock().unwrap().ahead, [Amount::from_sat(10)]);
        w.top_ups.done(Amount::from_sat(10));
        w.credit();
        w.left = MilliSats::ZERO;
        w.ahead();
        assert_eq!(hooks.0.lock().unwrap().ahead, [Amount::from_sat(10), Amount::from_sat(1)]);
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
}
