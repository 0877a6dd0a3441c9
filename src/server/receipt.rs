use std::time::Duration;

use axum::extract::FromRequestParts;
use http::StatusCode;
use http::request::Parts;

use crate::MilliSats;
use crate::wire::ChannelId;

/// The receipt of a paid request, handed to the inner service as a request extension (and to
/// axum handlers as an extractor).
///
/// # Examples
///
/// ```
/// use axum::{Router, routing::get};
/// use paychan::server::Paid;
///
/// async fn handler(paid: Paid) -> String {
///     format!("charged {} to {}; {} left", paid.price, paid.channel, paid.balance)
/// }
/// let app: Router = Router::new().route("/", get(handler));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Paid {
    /// The channel that paid.
    pub channel: ChannelId,
    /// What this request was charged (before any [`ActualCost`] adjustment).
    pub price: MilliSats,
    /// The channel's balance after the charge.
    pub balance: MilliSats,
    /// Set when the layer is in [shadow mode](super::PaywallLayer::with_shadow_mode): nothing was
    /// charged, `price` is what would have been, `channel` is the null outpoint and `balance`
    /// zero.
    pub shadow: bool,
}

impl Paid {
    /// The receipt of a request served in shadow mode at `price`.
    pub(crate) fn shadow(price: MilliSats) -> Self {
        let channel = ChannelId::new(bitcoin::OutPoint::null());
        Self { channel, price, balance: MilliSats::ZERO, shadow: true }
    }
}

/// What a layer in [shadow mode](super::PaywallLayer::with_shadow_mode) would have charged since it was
/// built. Cheap to read at any time; shared by every clone of the layer.
#[derive(Debug, Default)]
pub struct ShadowTally {
    requests: std::sync::atomic::AtomicU64,
    msat: std::sync::atomic::AtomicU64,
}

impl ShadowTally {
    pub(crate) fn record(&self, price: MilliSats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.msat.fetch_add(price.to_msat(), Relaxed);
    }

    /// Priced requests served without payment.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What they would have been charged.
    pub fn would_have_charged(&self) -> MilliSats {
        MilliSats::from_msat(self.msat.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl super::stream::Units for ShadowTally {
    /// Shadow mode: every unit is served, and counted.
    fn debit(
        &self,
        _: ChannelId,
        amount: MilliSats,
    ) -> super::stream::BoxFuture<'_, Result<MilliSats, crate::wire::Problem>> {
        self.msat.fetch_add(amount.to_msat(), std::sync::atomic::Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(MilliSats::ZERO)))
    }

    fn try_debit(
        &self,
        channel: ChannelId,
        amount: MilliSats,
    ) -> super::stream::BoxFuture<'_, Option<MilliSats>> {
        let debited = super::stream::Units::debit(self, channel, amount);
        Box::pin(async move { debited.await.ok() })
    }

    fn receipt(
        &self,
        _: ChannelId,
        _: &super::stream::Target,
        _: MilliSats,
    ) -> super::stream::BoxFuture<'_, Option<crate::wire::Receipt>> {
        Box::pin(std::future::ready(None))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Paid {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Paid>().copied().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no `Paid` receipt in the request: is `PaywallLayer` on this route, and is it priced?",
        ))
    }
}

/// Put in a response's extensions by a handler whose work cost less than it was charged: the
/// layer gives the difference back to the channel. A cost above the charge is ignored (the
/// price is a reservation, never exceeded).
///
/// # Examples
///
/// ```
/// use axum::response::IntoResponse;
/// use paychan::MilliSats;
/// use paychan::server::ActualCost;
///
/// async fn handler() -> impl IntoResponse {
///     // Served from cache: charge a tenth.
///     (axum::Extension(ActualCost(MilliSats::from_msat(100))), "cached answer")
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActualCost(pub MilliSats);

/// When the layer signs the receipt of a paid response ([`PaywallLayer::with_receipt_signing`]).
///
/// Every paid response carries a receipt, linked to the one before it, each stating the
/// channel's whole spent; what a client can prove is its last signed receipt, whichever mode.
/// Signing costs one ECDSA signature (about 30 µs here); batches make it a small share of
/// that per request.
///
/// [`PaywallLayer::with_receipt_signing`]: super::PaywallLayer::with_receipt_signing
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiptSigning {
    /// Every receipt is signed.
    Every,
    /// Receipts are signed in batches, for clients that accept it (they send
    /// `Payment-Receipt-Unsigned`, [`UnsignedReceipts`](crate::wire::UnsignedReceipts); to any
    /// other client every receipt is signed). This node signs a channel's receipt when it
    /// would be the `every`-th unsigned in a row, or reach half the client's own maximum, by
    /// the client's count or this node's, when `within` passed since this node last
    /// signed one of the channel's (and on its first), and at the end of every metered stream.
    Batched {
        /// The longest run of unsigned receipts.
        every: u32,
        /// The longest time between two signed receipts of a channel on one node.
        within: Duration,
    },
}

impl Default for ReceiptSigning {
    /// Batches of 1 024 within 1 second: a client's proof is at most a second or 1 024
    /// receipts old, whichever comes first. The second binds below 1 024 requests a second
    /// on a channel; above, one signature serves 1 024 requests (~35 µs to sign: ~0.03 µs a
    /// request, under 1 % of a bare HTTP request here, where a batch of 128 cost ~0.3 µs).
    /// The default client
    /// ([`SpendingPolicy::max_unsigned_receipts`](crate::client::SpendingPolicy::max_unsigned_receipts),
    /// 2 048) asks for a signature by the time it holds 1 024 unsigned (half its maximum, the
    /// other half room for requests in flight); the node's own count covers clients that do
    /// not count.
    fn default() -> Self {
        Self::Batched { every: 1_024, within: Duration::from_secs(1) }
    }
}
