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

use super::metered::{MeteredStream, StreamEvent};
use super::payer::CurrentPayment;
use super::{ClientStore, Payer, SpendingPolicy, Transport};
use crate::MilliSats;
use crate::wire::{PAYMENT_CHANNEL_STREAM, Problem};

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

/// How the client follows one metered stream: the [`MeteredStream`] decides, the hooks act,
/// one top-up at a time.
struct Watch {
    hooks: Box<dyn StreamHooks>,
    stream: MeteredStream,
    top_ups: Arc<TopUps>,
}

impl Watch {
    /// Acts on what the stream decided.
    fn act(&mut self, events: Vec<StreamEvent>) {
        for event in events {
            match event {
                StreamEvent::Delivered(cost) => self.hooks.delivered(cost),
                StreamEvent::TopUp { problem, cap } => match self.claim(cap, true) {
                    Some(cap) => self.hooks.top_up(problem, cap, Arc::clone(&self.top_ups)),
                    None => tracing::warn!("a stream asked for a top-up while one is on its way"),
                },
                StreamEvent::TopUpAhead(amount) => {
                    if let Some(amount) = self.claim(amount, false) {
                        self.hooks.top_up_by(amount, Arc::clone(&self.top_ups));
                    }
                }
                StreamEvent::Receipt { value, bound } => self.hooks.receipt(&value, bound),
            }
        }
    }

    /// Claims the stream's one top-up for at most `amount`: what it may add now, by what the
    /// top-ups finished so far added (one may have finished since the chunk was read), or
    /// `None` when one is on its way, or when there is no room and `zero` (a top-up that only
    /// hands the latest payment over again) is not wanted.
    fn claim(&mut self, amount: Amount, zero: bool) -> Option<Amount> {
        if !self.top_ups.start() {
            return None;
        }
        self.stream.top_ups_added(self.top_ups.added());
        let amount = amount.min(self.stream.room().to_sat_floor());
        if amount == Amount::ZERO && !zero {
            self.top_ups.done(Amount::ZERO);
            return None;
        }
        Some(amount)
    }

    /// A byte stream: tops up ahead when the estimate runs low.
    fn ahead(&mut self) {
        self.stream.top_ups_added(self.top_ups.added());
        let mut events = Vec::new();
        self.stream.ahead(&mut events);
        self.act(events);
    }

    fn data(&mut self, chunk: Bytes) -> Bytes {
        self.stream.top_ups_added(self.top_ups.added());
        let mut events = Vec::new();
        let out = self.stream.push(&chunk, &mut events);
        self.act(events);
        if self.stream.is_sse() { Bytes::from(out) } else { chunk }
    }

    /// The server ended the stream: what was held back.
    fn finish(&mut self) -> Bytes {
        let (rest, missing_receipt) = self.stream.finish();
        if missing_receipt {
            self.hooks.no_receipt();
        }
        Bytes::from(rest)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.hooks.ended(!self.stream.finished());
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
        let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
        let unit = header(PAYMENT_CHANNEL_STREAM);
        let content_type = header(http::header::CONTENT_TYPE.as_str());
        let Some(stream) = MeteredStream::new(unit, content_type, policy, balance) else {
            return Self::plain(inner);
        };
        hooks.started();
        let mut watch = Watch { hooks: Box::new(hooks), stream, top_ups: Arc::default() };
        // A byte stream whose balance is already below the mark: pay ahead before the first
        // byte.
        watch.ahead();
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

    /// What the hooks were asked to do.
    #[derive(Default)]
    struct Asked {
        /// The caps of in-band top-ups.
        top_ups: Vec<Amount>,
        /// The amounts of top-ups ahead.
        ahead: Vec<Amount>,
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
        fn delivered(&self, _: MilliSats) {}
        fn receipt(&self, _: &[u8], _: MilliSats) {}
        fn started(&self) {}
        fn no_receipt(&self) {}
        fn ended(&self, _: bool) {}
    }

    /// A watch of an SSE stream (or a byte stream) at 1 sat a unit, `max_prepaid` 10 sat.
    fn watch(sse: bool, balance: MilliSats) -> (Watch, Recording) {
        let hooks = Recording::default();
        let stream = crate::client::metered::tests::stream(sse, balance);
        (Watch { hooks: Box::new(hooks.clone()), stream, top_ups: Arc::default() }, hooks)
    }

    fn ask() -> Bytes {
        Bytes::from(crate::client::metered::tests::ask())
    }

    #[test]
    fn a_stream_that_asks_without_sending_gets_one_bounded_top_up_at_a_time() {
        let (mut w, hooks) = watch(true, MilliSats::ZERO);
        // A burst in one chunk: one top-up, capped at a unit and `max_prepaid`.
        let burst: Vec<u8> = (0..10).flat_map(|_| ask().to_vec()).collect();
        w.data(Bytes::from(burst));
        assert_eq!(hooks.0.lock().unwrap().top_ups, [Amount::from_sat(11)]);
        // It added all of that (the client's own number): nothing more without units, only
        // the latest payment handed over again.
        w.top_ups.done(Amount::from_sat(11));
        w.data(ask());
        assert_eq!(hooks.0.lock().unwrap().top_ups, [Amount::from_sat(11), Amount::ZERO]);
        w.top_ups.done(Amount::ZERO);
        // Three events received earn three units of room.
        w.data(Bytes::from_static(b"data: a\n\ndata: b\n\ndata: c\n\n"));
        w.data(ask());
        let asked = hooks.0.lock().unwrap().top_ups.clone();
        assert_eq!(asked, [Amount::from_sat(11), Amount::ZERO, Amount::from_sat(3)]);
    }

    #[test]
    fn a_byte_stream_is_topped_up_ahead_one_at_a_time() {
        let (mut w, hooks) = watch(false, MilliSats::from_msat(100_000));
        let kib = || Bytes::from(vec![0; 1024]);
        for _ in 0..91 {
            w.data(kib());
        }
        assert_eq!(hooks.0.lock().unwrap().ahead, [Amount::from_sat(10)]);
        w.data(kib());
        assert_eq!(hooks.0.lock().unwrap().ahead.len(), 1, "one at a time");
        w.top_ups.done(Amount::from_sat(10));
        for _ in 0..8 {
            w.data(kib());
        }
        assert_eq!(hooks.0.lock().unwrap().ahead.len(), 1);
        w.data(kib());
        assert_eq!(hooks.0.lock().unwrap().ahead.len(), 2, "low again: again");
    }
}
