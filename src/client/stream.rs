//! Reading a metered stream as a paying client ([`PaidBody`]): the server's
//! `Payment-Channel-Stream` header says how the stream is metered. An SSE stream's
//! `payment-required` events are answered with a top-up and its closing `payment-receipt`
//! is checked, both taken out of what the caller reads; a byte stream's bytes are counted and
//! the channel topped up ahead of the server's need.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// fewer than `LOW_WATER_KIB` KiB, it pays for `AHEAD_KIB` KiB more.
const LOW_WATER_KIB: u64 = 64;
const AHEAD_KIB: u64 = 256;

/// What the payer does for a stream; the store's type erased.
pub(crate) trait StreamHooks: Send + Sync + 'static {
    /// Answers an in-band top-up request (in the background), adding what it paid more to
    /// `topped`.
    fn top_up(&self, problem: Problem, topped: Arc<AtomicU64>);
    /// Pays `amount` more ahead of a byte stream (in the background).
    fn top_up_by(&self, amount: Amount);
    /// Checks the stream's receipt.
    fn receipt(&self, value: &[u8]);
    /// A stream starts.
    fn started(&self);
    /// An SSE stream ended (the server ended it) without a receipt.
    fn no_receipt(&self);
    /// The stream ended or was dropped.
    fn ended(&self);
}

/// The payer's hooks for one stream: the request it answers and the transport for top-ups.
pub(crate) struct Hooks<St> {
    pub(crate) payer: Payer<St>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) sent: CurrentPayment,
    pub(crate) method: String,
    pub(crate) path: String,
}

impl<St: ClientStore + 'static> StreamHooks for Hooks<St> {
    fn top_up(&self, problem: Problem, topped: Arc<AtomicU64>) {
        let (payer, transport) = (self.payer.clone(), Arc::clone(&self.transport));
        tokio::spawn(async move {
            match payer.top_up_via(&*transport, &problem).await {
                Ok(answer) => {
                    // Against what the server said was paid: an understatement only makes
                    // the stream's budget run out sooner.
                    let before = problem.channel.as_ref().map_or(MilliSats::ZERO, |c| c.paid_msat);
                    let added = answer.paid_msat.saturating_sub(before);
                    topped.fetch_add(added.to_msat(), Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "a stream's top-up failed"),
            }
        });
    }

    fn top_up_by(&self, amount: Amount) {
        let (payer, transport) = (self.payer.clone(), Arc::clone(&self.transport));
        tokio::spawn(async move {
            if let Err(e) = payer.top_up_by_via(&*transport, amount).await {
                tracing::warn!(error = %e, "a top-up ahead of a byte stream failed");
            }
        });
    }

    fn receipt(&self, value: &[u8]) {
        let _checked = self.payer.note_stream_receipt(&self.sent, value, &self.method, &self.path);
    }

    fn started(&self) {
        self.payer.stream_started(&self.sent);
    }

    fn no_receipt(&self) {
        self.payer.note_missing_receipt("a metered stream that ended without a receipt");
    }

    fn ended(&self) {
        self.payer.stream_ended(&self.sent);
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

/// Splits an SSE byte stream into events and takes the payment events out.
#[derive(Debug, Default)]
pub(crate) struct SseScanner {
    buffer: Vec<u8>,
}

impl SseScanner {
    /// Feeds `chunk`; returns what passes on to the caller (whole events, ours taken out) and
    /// adds ours to `found`.
    pub(crate) fn push(&mut self, chunk: &[u8], found: &mut Vec<Found>) -> Bytes {
        self.buffer.extend_from_slice(chunk);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some((end, next)) = first_event(&self.buffer[start..]) {
            match ours(&self.buffer[start..start + end]) {
                Some(Found::Data) => {
                    found.push(Found::Data);
                    out.extend_from_slice(&self.buffer[start..start + next]);
                }
                Some(event) => found.push(event),
                None => out.extend_from_slice(&self.buffer[start..start + next]),
            }
            start += next;
        }
        self.buffer.drain(..start);
        if self.buffer.len() > MAX_EVENT {
            out.append(&mut self.buffer);
        }
        Bytes::from(out)
    }

    /// The stream ended: what was held back.
    pub(crate) fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.buffer))
    }
}

/// The first whole event of `data`: where its lines end and where the next event starts
/// (after the blank line; `\n`, `\r\n` and `\r` all end lines).
fn first_event(data: &[u8]) -> Option<(usize, usize)> {
    let mut line = 0;
    let mut at = 0;
    while let Some(offset) = data[at..].iter().position(|b| matches!(b, b'\n' | b'\r')) {
        let end = at + offset;
        let next = match data[end] {
            b'\r' => match data.get(end + 1) {
                Some(b'\n') => end + 2,
                Some(_) => end + 1,
                None => return None, // a `\n` may follow
            },
            _ => end + 1,
        };
        if end == line {
            return Some((end, next));
        }
        line = next;
        at = next;
    }
    None
}

/// The payment event in `lines`, if it is one.
fn ours(lines: &[u8]) -> Option<Found> {
    let text = std::str::from_utf8(lines).ok()?;
    let (mut name, mut data) = ("", Vec::new());
    for line in text.lines() {
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

/// A byte stream's count: what the client estimates is left to spend.
#[derive(Debug)]
struct ByteCount {
    per_kib: MilliSats,
    seen: u64,
    left: MilliSats,
}

/// An SSE stream's count: the events received, what they cost, and what the stream's
/// top-ups added.
#[derive(Debug)]
struct EventCount {
    per_event: MilliSats,
    events: u64,
    max_prepaid: MilliSats,
    topped: Arc<AtomicU64>,
}

impl EventCount {
    /// Whether one more in-band top-up is within the stream's budget: what its top-ups added
    /// so far may not exceed the events received and the one held, plus the policy's
    /// prepaid allowance. A server that asks again and again without sending gets nothing.
    fn may_top_up(&self) -> bool {
        let owed = self.per_event.checked_mul(self.events.saturating_add(1));
        let budget = owed.map_or(MilliSats::MAX, |owed| owed.saturating_add(self.max_prepaid));
        MilliSats::from_msat(self.topped.load(Ordering::Relaxed)) <= budget
    }
}

/// How the client follows one metered stream.
struct Watch {
    hooks: Box<dyn StreamHooks>,
    sse: Option<(SseScanner, Option<EventCount>)>,
    bytes: Option<ByteCount>,
    /// Whether the SSE stream's receipt came.
    receipted: bool,
}

impl Watch {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        if let Some(count) = &mut self.bytes {
            let seen = count.seen.saturating_add(chunk.len() as u64);
            let cost = per_kib_cost(count.per_kib, seen)
                .saturating_sub(per_kib_cost(count.per_kib, count.seen));
            count.seen = seen;
            count.left = count.left.saturating_sub(cost);
            let low = count.per_kib.checked_mul(LOW_WATER_KIB).unwrap_or(MilliSats::MAX);
            if count.left < low {
                let ahead = count.per_kib.checked_mul(AHEAD_KIB).unwrap_or(MilliSats::MAX);
                let amount = ahead.to_sat_ceil().max(Amount::ONE_SAT);
                count.left = count
                    .left
                    .saturating_add(MilliSats::from_sat(amount).unwrap_or(MilliSats::MAX));
                self.hooks.top_up_by(amount);
            }
        }
        let Some((scanner, count)) = &mut self.sse else { return chunk };
        let mut found = Vec::new();
        let out = scanner.push(&chunk, &mut found);
        if let Some(count) = count {
            count.events += found.iter().filter(|f| matches!(f, Found::Data)).count() as u64;
        }
        for event in found {
            match event {
                Found::TopUp(problem) => match count {
                    Some(count) if count.may_top_up() => {
                        self.hooks.top_up(problem, Arc::clone(&count.topped));
                    }
                    _ => tracing::warn!("a stream asked for more than it sent: no top-up"),
                },
                Found::Receipt(value) => {
                    self.receipted = true;
                    self.hooks.receipt(&value);
                }
                Found::Data => {}
            }
        }
        out
    }

    /// The server ended the stream: what was held back.
    fn finish(&mut self) -> Bytes {
        let Some((scanner, _)) = self.sse.as_mut() else { return Bytes::new() };
        if !self.receipted {
            self.hooks.no_receipt();
        }
        scanner.finish()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.hooks.ended();
    }
}

pin_project! {
    /// The body of a response from [`PaymentService`](super::PaymentService): the server's
    /// body as it is, but for a metered stream (see
    /// [`StreamMeter`](crate::server::StreamMeter)), which the client pays as it reads: an SSE
    /// stream's `payment-required` events are answered with a top-up and its
    /// `payment-receipt` is checked, both taken out of what the caller reads; a byte stream
    /// is counted and the channel topped up ahead of the server's need.
    pub struct PaidBody<B> {
        #[pin]
        inner: B,
        watch: Option<Box<Watch>>,
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
        Self { inner, watch: None }
    }

    /// `inner`, a response with `headers` to a request the payer paid: watched when the
    /// server meters it as a stream (and its unit price is within `max_per_request`).
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
        let Some(unit) = unit else { return Self::plain(inner) };
        let (sse, bytes) = match unit {
            StreamUnit::Event(per_event) => {
                // In-band top-ups only for a unit price the policy accepts.
                let count = (per_event <= max_per_request).then(|| EventCount {
                    per_event,
                    events: 0,
                    max_prepaid: MilliSats::from_sat(policy.max_prepaid())
                        .unwrap_or(MilliSats::MAX),
                    topped: Arc::default(),
                });
                (Some((SseScanner::default(), count)), None)
            }
            StreamUnit::Kib(per_kib) if per_kib <= max_per_request => {
                let left = balance.unwrap_or(MilliSats::ZERO);
                (None, Some(ByteCount { per_kib, seen: 0, left }))
            }
            _ => (None, None),
        };
        hooks.started();
        let watch = Watch { hooks: Box::new(hooks), sse, bytes, receipted: false };
        Self { inner, watch: Some(Box::new(watch)) }
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
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
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
        self.watch.is_none() && self.inner.is_end_stream()
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

    /// Hooks that count top-ups, each adding `adds` msat, at once.
    struct Counting {
        top_ups: Arc<AtomicU64>,
        adds: u64,
        ahead: Arc<std::sync::Mutex<Vec<Amount>>>,
    }

    impl StreamHooks for Counting {
        fn top_up(&self, _: Problem, topped: Arc<AtomicU64>) {
            self.top_ups.fetch_add(1, Ordering::Relaxed);
            topped.fetch_add(self.adds, Ordering::Relaxed);
        }
        fn top_up_by(&self, amount: Amount) {
            self.ahead.lock().unwrap().push(amount);
        }
        fn receipt(&self, _: &[u8]) {}
        fn started(&self) {}
        fn no_receipt(&self) {
            self.ahead.lock().unwrap().push(Amount::ZERO); // noted as a zero top-up
        }
        fn ended(&self) {}
    }

    fn watch(
        adds: u64,
        sse: bool,
        balance: MilliSats,
    ) -> (Watch, Arc<AtomicU64>, Arc<std::sync::Mutex<Vec<Amount>>>) {
        let top_ups = Arc::new(AtomicU64::new(0));
        let ahead = Arc::default();
        let hooks = Counting { top_ups: top_ups.clone(), adds, ahead: Arc::clone(&ahead) };
        let per_unit = MilliSats::from_msat(1_000);
        let count = EventCount {
            per_event: per_unit,
            events: 0,
            max_prepaid: MilliSats::from_msat(10_000),
            topped: Arc::default(),
        };
        let (sse, bytes) = if sse {
            (Some((SseScanner::default(), Some(count))), None)
        } else {
            (None, Some(ByteCount { per_kib: per_unit, seen: 0, left: balance }))
        };
        (Watch { hooks: Box::new(hooks), sse, bytes, receipted: false }, top_ups, ahead)
    }

    #[test]
    fn a_stream_that_asks_without_sending_gets_a_bounded_top_up() {
        let ask = format!(
            "event: {TOP_UP_EVENT}\ndata: {}\n\n",
            r#"{"status":402,"code":"insufficient-balance","detail":"more"}"#
        );
        // Each top-up adds a unit and the whole prepaid allowance: two, then nothing.
        let (mut w, top_ups, _) = watch(11_000, true, MilliSats::ZERO);
        for _ in 0..10 {
            w.data(Bytes::from(ask.clone()));
        }
        assert_eq!(top_ups.load(Ordering::Relaxed), 2);
        // Events received earn their price back: one more top-up per 11 events here.
        for _ in 0..11 {
            w.data(Bytes::from_static(b"data: token\n\n"));
        }
        w.data(Bytes::from(ask.clone()));
        w.data(Bytes::from(ask));
        assert_eq!(top_ups.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn an_sse_stream_the_server_ends_without_a_receipt_is_reported() {
        let (mut w, _, noted) = watch(0, true, MilliSats::ZERO);
        w.data(Bytes::from_static(b"data: token\n\n"));
        w.finish();
        assert_eq!(*noted.lock().unwrap(), [Amount::ZERO], "reported once");
        let (mut w, _, noted) = watch(0, true, MilliSats::ZERO);
        w.data(Bytes::from(format!("data: token\n\nevent: {RECEIPT_EVENT}\ndata: r\n\n")));
        w.finish();
        assert!(noted.lock().unwrap().is_empty(), "a receipt came");
    }

    #[test]
    fn a_byte_stream_is_topped_up_ahead_by_its_own_count() {
        // 1 sat a KiB; 100 KiB prepaid; the client pays 256 KiB more when under 64 KiB left.
        let (mut w, _, ahead) = watch(0, false, MilliSats::from_msat(100_000));
        for _ in 0..36 {
            w.data(Bytes::from(vec![0; 1024]));
        }
        assert!(ahead.lock().unwrap().is_empty(), "64 KiB left: not yet");
        w.data(Bytes::from(vec![0; 1024]));
        assert_eq!(*ahead.lock().unwrap(), [Amount::from_sat(256)]);
        for _ in 0..256 {
            w.data(Bytes::from(vec![0; 1024]));
        }
        assert_eq!(ahead.lock().unwrap().len(), 2, "and again 256 KiB later");
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
    }
}
