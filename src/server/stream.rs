//! Metering while a response streams: [`StreamMeter`].

use core::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::response::sse::Event;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::StatusCode;
use http::request::Parts;
use tower::BoxError;

use crate::MilliSats;
use crate::wire::{ChannelId, Problem, ProblemCode, Receipt};

use crate::wire::{RECEIPT_EVENT, TOP_UP_EVENT};

/// How long a stream waits for a top-up by default.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(10);

pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The request a receipt is for: its method and path, and the receipt the client linked it
/// to (`Payment-Receipt-Prev`). Taken from every paid request when the layer gives receipts,
/// so it copies nothing (the path and the link share the request's bytes) and decodes the
/// link only for a full receipt: most receipts go unsigned, in the compact form, which
/// states neither.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) method: http::Method,
    pub(super) path: http::uri::PathAndQuery,
    /// The client's `Payment-Receipt-Prev`, as sent.
    pub(super) prev: Option<http::HeaderValue>,
    /// What the client said of its unsigned receipts (`None`: it wants every one signed).
    pub(super) unsigned: Option<crate::wire::UnsignedReceipts>,
}

impl Target {
    /// The digest the client linked its request to; a malformed link is no link (the client
    /// sees the receipt unlinked).
    fn prev(&self) -> Option<[u8; 32]> {
        use bitcoin::hex::FromHex as _;
        <[u8; 32]>::from_hex(self.prev.as_ref()?.to_str().ok()?).ok()
    }

    /// The unsigned receipt of this request on `channel`.
    pub(super) fn receipt(
        &self,
        channel: ChannelId,
        price: MilliSats,
        paid: MilliSats,
        balance: MilliSats,
    ) -> Receipt {
        let receipt =
            Receipt::new(channel, self.method.as_str(), self.path.as_str(), price, paid, balance);
        match self.prev() {
            Some(prev) => receipt.with_prev(prev),
            None => receipt,
        }
    }
}

/// What a [`StreamMeter`] needs of the layer (its store, its refusals, its signer), with the
/// store's type erased.
pub(super) trait Units: Send + Sync {
    /// Debits `amount` atomically: the balance left, or the refusal's problem document.
    fn debit(
        &self,
        channel: ChannelId,
        amount: MilliSats,
    ) -> BoxFuture<'_, Result<MilliSats, Problem>>;

    /// Debits `amount` atomically, in one store operation: `Some(balance)`, or `None` if it
    /// was refused (nothing changed; no problem document is built).
    fn try_debit(&self, channel: ChannelId, amount: MilliSats) -> BoxFuture<'_, Option<MilliSats>>;

    /// The signed receipt of `method path` having been charged `charged` in all, with the
    /// channel's paid and balance as they are now.
    fn receipt(
        &self,
        channel: ChannelId,
        target: &Target,
        charged: MilliSats,
    ) -> BoxFuture<'_, Option<Receipt>>;
}

/// Charges a paid request further while its response streams: per token, per second of
/// audio, per SSE event, per kibibyte, per WebSocket message.
///
/// The layer hands one to every paid request (an axum extractor, or
/// `request.extensions().get::<StreamMeter>()`). The route's price is charged up front as
/// usual — the least a stream costs, kept even if the client leaves before the first unit;
/// each unit is then debited **before it is sent**, in one atomic store operation, so every
/// store keeps "served never exceeds paid" for streams as for requests. A client that
/// disconnects has paid for every unit the server wrote (the one in flight included) and for
/// nothing after.
///
/// When the balance runs out, [`wait_and_charge`](Self::wait_and_charge) holds for
/// [`hold`](Self::hold) while the client tops up through the payment endpoint
/// (`POST <prefix>/payment` with the new payment in `Payment-Channel`), then resumes, or gives
/// up. [`sse`](Self::sse) and [`bytes`](Self::bytes) do all of this for a stream of SSE events
/// or of bytes; a WebSocket handler calls [`charge`](Self::charge) per message and sends
/// [`Exhausted::to_json`] as a text frame when it must wait (see `examples/audio_stream.rs`).
///
/// # Examples
///
/// An SSE route priced per token:
///
/// ```
/// use axum::response::sse::{Event, Sse};
/// use axum::{Router, routing::get};
/// use paychan::MilliSats;
/// use paychan::server::StreamMeter;
///
/// async fn tokens(meter: StreamMeter) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
///     let words = ["pay", "as", "you", "go"].map(|w| Ok(Event::default().data(w)));
///     Sse::new(meter.sse(futures_util::stream::iter(words), MilliSats::from_msat(50)))
/// }
/// let app: Router = Router::new().route("/tokens", get(tokens));
/// ```
#[derive(Clone)]
pub struct StreamMeter {
    units: Arc<dyn Units>,
    channel: ChannelId,
    hold: Duration,
    /// One allocation per request (the meter is made for every paid request).
    shared: Arc<Shared>,
}

/// What the clones of one request's meter share.
struct Shared {
    /// In the one allocation, not behind its own.
    target: Option<Target>,
    charged: AtomicU64,
    /// Set by [`sse`](StreamMeter::sse) or [`bytes`](StreamMeter::bytes): the
    /// `Payment-Channel-Stream` header the layer adds to the response.
    metered: OnceLock<http::HeaderValue>,
}

impl fmt::Debug for StreamMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamMeter")
            .field("channel", &self.channel)
            .field("hold", &self.hold)
            .field("charged", &self.charged())
            .finish_non_exhaustive()
    }
}

/// Why a [`StreamMeter`] could not charge a unit: the channel's balance is short (the client
/// may top up), the channel is no longer open, or the store failed. Nothing was debited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    problem: Problem,
}

impl Exhausted {
    /// The problem document: `insufficient-balance` with the channel's snapshot (the least a
    /// top-up must pay), or why the channel cannot pay any more.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }

    /// Whether a top-up can cure it (the balance is short; the channel is open).
    pub fn can_top_up(&self) -> bool {
        self.problem.code == ProblemCode::InsufficientBalance
    }

    /// The problem document as JSON: for a WebSocket text frame, say.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.problem).unwrap_or_default()
    }

    /// The in-band SSE event, [`TOP_UP_EVENT`], carrying the problem document.
    pub fn to_event(&self) -> Event {
        Event::default().event(TOP_UP_EVENT).data(self.to_json())
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the stream cannot be charged: {}", self.problem.detail)
    }
}

impl std::error::Error for Exhausted {}

impl StreamMeter {
    pub(super) fn new(
        units: Arc<dyn Units>,
        channel: ChannelId,
        hold: Duration,
        target: Option<Target>,
        up_front: MilliSats,
    ) -> Self {
        let charged = AtomicU64::new(up_front.to_msat());
        let shared = Arc::new(Shared { target, charged, metered: OnceLock::new() });
        Self { units, channel, hold, shared }
    }

    /// The request's receipt target, when the layer gives receipts.
    pub(super) fn target(&self) -> Option<&Target> {
        self.shared.target.as_ref()
    }

    /// The channel charged.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// How long [`wait_and_charge`](Self::wait_and_charge) waits for a top-up
    /// ([`PaywallLayer::with_stream_hold`](super::PaywallLayer::with_stream_hold)).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// What the request has been charged so far: its price up front and every unit since
    /// (before a 5xx or [`ActualCost`](super::ActualCost) gave any of the price back).
    pub fn charged(&self) -> MilliSats {
        MilliSats::from_msat(self.shared.charged.load(Ordering::Relaxed))
    }

    /// Debits `amount` now, atomically, without waiting: the balance left.
    ///
    /// # Errors
    ///
    /// [`Exhausted`] when the balance is short, the channel is not open or the store failed;
    /// nothing was debited.
    pub async fn charge(&self, amount: MilliSats) -> Result<MilliSats, Exhausted> {
        if amount == MilliSats::ZERO {
            return Ok(MilliSats::ZERO);
        }
        let balance = self
            .units
            .debit(self.channel, amount)
            .await
            .map_err(|problem| Exhausted { problem })?;
        self.shared.charged.fetch_add(amount.to_msat(), Ordering::Relaxed);
        Ok(balance)
    }

    /// Debits `amount`, waiting up to [`hold`](Self::hold) for a top-up while the balance is
    /// short (the store is asked again at growing intervals, so a top-up that reached any node
    /// of a shared store counts).
    ///
    /// # Errors
    ///
    /// The last [`Exhausted`] when the hold elapsed, or at once when the channel is not open
    /// or the store failed; nothing was debited.
    pub async fn wait_and_charge(&self, amount: MilliSats) -> Result<MilliSats, Exhausted> {
        let exhausted = match self.charge(amount).await {
            Err(exhausted) if exhausted.can_top_up() => exhausted,
            done => return done,
        };
        // While holding, one store operation per try (no problem document is built).
        let deadline = tokio::time::Instant::now() + self.hold;
        let mut pause = Duration::from_millis(10);
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(exhausted);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(250));
            if amount == MilliSats::ZERO {
                return Ok(MilliSats::ZERO);
            }
            if let Some(balance) = self.units.try_debit(self.channel, amount).await {
                self.shared.charged.fetch_add(amount.to_msat(), Ordering::Relaxed);
                return Ok(balance);
            }
        }
    }

    /// The signed receipt of everything the request was charged so far, when the layer signs
    /// receipts.
    pub async fn receipt(&self) -> Option<Receipt> {
        let target = self.shared.target.as_ref()?;
        self.units.receipt(self.channel, target, self.charged()).await
    }

    /// The `Payment-Channel-Stream` value of the response, once [`sse`](Self::sse) or
    /// [`bytes`](Self::bytes) metered its body.
    pub(super) fn stream_header(&self) -> Option<http::HeaderValue> {
        self.shared.metered.get().cloned()
    }

    fn set_stream_header(&self, unit: StreamUnit) {
        if let Ok(value) = http::HeaderValue::try_from(unit.to_string()) {
            let _ = self.shared.metered.set(value);
        }
    }

    /// The final SSE event: the request's receipt, if the layer signs receipts.
    async fn receipt_event(&self) -> Option<Event> {
        let receipt = self.receipt().await?;
        Some(Event::default().event(RECEIPT_EVENT).data(receipt.encode()))
    }

    /// Meters a stream of SSE events at `per_event` each, every event debited before it is
    /// sent. When the balance runs out the client gets a [`TOP_UP_EVENT`] and the stream
    /// holds (see [`wait_and_charge`](Self::wait_and_charge)); topped up, it resumes with the
    /// event it held; otherwise it ends. When the stream ends — its events done, or not paid
    /// for — the last event is the [`RECEIPT_EVENT`], when the layer signs receipts (not after
    /// an error of the application's stream, nor to a client gone). Each `Ok` event is one
    /// unit: give each data (a client counts the events with data). Keep-alive
    /// comments added by [`Sse::keep_alive`](axum::response::sse::Sse::keep_alive) are free.
    pub fn sse<S, E>(
        self,
        events: S,
        per_event: MilliSats,
    ) -> impl Stream<Item = Result<Event, E>> + Send + 'static
    where
        S: Stream<Item = Result<Event, E>> + Send + 'static,
        E: Send + 'static,
    {
        self.set_stream_header(StreamUnit::Event(per_event));
        enum Step {
            Next,
            Held(Event),
            End,
            Done,
        }
        let start = (Box::pin(events), self, Step::Next);
        futures_util::stream::unfold(start, move |(mut events, meter, step)| async move {
            let step = match step {
                Step::Done => return None,
                Step::End => Step::End,
                Step::Held(event) => match meter.wait_and_charge(per_event).await {
                    Ok(_) => return Some((Ok(event), (events, meter, Step::Next))),
                    Err(_) => Step::End,
                },
                Step::Next => match events.next().await {
                    None => Step::End,
                    Some(Err(e)) => return Some((Err(e), (events, meter, Step::Next))),
                    Some(Ok(event)) => match meter.charge(per_event).await {
                        Ok(_) => return Some((Ok(event), (events, meter, Step::Next))),
                        Err(exhausted) => {
                            let next =
                                if exhausted.can_top_up() { Step::Held(event) } else { Step::End };
                            return Some((Ok(exhausted.to_event()), (events, meter, next)));
                        }
                    },
                },
            };
            debug_assert!(matches!(step, Step::End));
            let receipt = meter.receipt_event().await?;
            Some((Ok(receipt), (events, meter, Step::Done)))
        })
    }

    /// Meters a byte stream at `per_kib` per 1 024 bytes, charged to the millisatoshi (the
    /// running total rounded up), each chunk debited before it is sent. A byte stream has no
    /// room for an in-band event: when the balance runs out it holds (see
    /// [`wait_and_charge`](Self::wait_and_charge)) while the client tops up by itself — it
    /// knows the price and counts the bytes (see
    /// [`Payer::top_up_by`](crate::client::Payer::top_up_by)) — and ends with an error (the
    /// response is cut, never ended as if complete) if no top-up comes.
    pub fn bytes<S, E>(
        self,
        chunks: S,
        per_kib: MilliSats,
    ) -> impl Stream<Item = Result<Bytes, BoxError>> + Send + 'static
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + Send + 'static,
    {
        self.set_stream_header(StreamUnit::Kib(per_kib));
        let start = (Box::pin(chunks), self, 0u64, false);
        futures_util::stream::unfold(start, move |(mut chunks, meter, sent, failed)| async move {
            if failed {
                return None;
            }
            let chunk = match chunks.next().await? {
                Ok(chunk) => chunk,
                Err(e) => return Some((Err(e.into()), (chunks, meter, sent, true))),
            };
            let total = sent.saturating_add(chunk.len() as u64);
            let cost = per_kib_cost(per_kib, total).saturating_sub(per_kib_cost(per_kib, sent));
            match meter.wait_and_charge(cost).await {
                Ok(_) => Some((Ok(chunk), (chunks, meter, total, false))),
                Err(exhausted) => Some((Err(exhausted.into()), (chunks, meter, sent, true))),
            }
        })
    }
}

use crate::wire::{StreamUnit, per_kib_cost};

impl<S: Send + Sync> FromRequestParts<S> for StreamMeter {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<StreamMeter>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no `StreamMeter` in the request: is `PaywallLayer` on this route, and is it priced?",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_charged_to_the_millisatoshi_rounded_up_on_the_running_total() {
        let price = MilliSats::from_msat(100);
        assert_eq!(per_kib_cost(price, 0), MilliSats::ZERO);
        assert_eq!(per_kib_cost(price, 1), MilliSats::from_msat(1));
        assert_eq!(per_kib_cost(price, 1024), MilliSats::from_msat(100));
        assert_eq!(per_kib_cost(price, 1536), MilliSats::from_msat(150));
        // Ten chunks of 100 bytes cost what one chunk of 1 000 bytes costs.
        let chunked: u64 = (0..10)
            .map(|i| {
                per_kib_cost(price, (i + 1) * 100).to_msat()
                    - per_kib_cost(price, i * 100).to_msat()
            })
            .sum();
        assert_eq!(chunked, per_kib_cost(price, 1000).to_msat());
        assert_eq!(per_kib_cost(MilliSats::MAX, u64::MAX), MilliSats::MAX);
    }
}
