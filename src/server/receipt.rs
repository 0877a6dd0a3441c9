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
