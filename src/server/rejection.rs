//! Why the metering layer refused a request, and the problem document it answers with.

use core::fmt;

use http::{Response, StatusCode};

use crate::MilliSats;
use crate::channel::{ChannelState, PaymentError};
use crate::store::StoreError;
use crate::wire::{ChannelSnapshot, DecodeError, Problem, ProblemCode};

/// Why the layer refused a request. Rendered as an RFC 9457 `application/problem+json`
/// response and also attached to that response's extensions, so outer layers (metrics,
/// logging) can see the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No `Payment-Channel` header on a priced request: open a channel.
    PaymentRequired,
    /// The header does not decode.
    Header(DecodeError),
    /// The payment breaks a protocol rule.
    Payment(PaymentError),
    /// The payment spends an outpoint that is not a channel of this server.
    UnknownChannel,
    /// The channel is no longer open (closing, closed, failed).
    ChannelNotOpen(ChannelState),
    /// The channel's funding is waiting for its confirmations: retry later.
    ChannelPending,
    /// The channel's balance does not cover the price: sign a payment that pays more.
    InsufficientBalance,
    /// The channel store could not be reached; nothing was served or changed.
    StoreUnavailable,
    /// The route is not in the price table, which refuses unlisted requests
    /// ([`Unlisted::Refuse`](super::Unlisted::Refuse)).
    RouteNotPriced,
    /// The `Idempotency-Key` header is not 1 to 255 visible ASCII characters.
    IdempotencyKeyInvalid,
    /// The `Idempotency-Key` belongs to another request on this channel.
    IdempotencyKeyReused,
    /// The request holding the `Idempotency-Key` is still being served.
    IdempotencyKeyInProgress,
    /// The request with the `Idempotency-Key` was served, but its response was not kept.
    IdempotentResponseUnavailable,
}

impl RejectionKind {
    /// The stable, machine-readable code; the problem `type` is
    /// [`PROBLEM_TYPE_PREFIX`](crate::wire::PROBLEM_TYPE_PREFIX) followed by it.
    pub fn code(&self) -> ProblemCode {
        match self {
            Self::PaymentRequired => ProblemCode::PaymentRequired,
            Self::Header(e) => ProblemCode::from_static(e.code()),
            Self::Payment(e) => ProblemCode::from_static(e.code()),
            Self::UnknownChannel => ProblemCode::UnknownChannel,
            Self::ChannelNotOpen(_) => ProblemCode::ChannelNotOpen,
            Self::ChannelPending => ProblemCode::ChannelPending,
            Self::InsufficientBalance => ProblemCode::InsufficientBalance,
            Self::StoreUnavailable => ProblemCode::StoreUnavailable,
            Self::RouteNotPriced => ProblemCode::RouteNotPriced,
            Self::IdempotencyKeyInvalid => ProblemCode::IdempotencyKeyInvalid,
            Self::IdempotencyKeyReused => ProblemCode::IdempotencyKeyReused,
            Self::IdempotencyKeyInProgress => ProblemCode::IdempotencyKeyInProgress,
            Self::IdempotentResponseUnavailable => ProblemCode::IdempotentResponseUnavailable,
        }
    }

    /// The HTTP status: 402 when paying (more, or on a new channel) is the way forward, 400
    /// for malformed input and rule violations, 503 when the store is down.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::PaymentRequired
            | Self::UnknownChannel
            | Self::ChannelNotOpen(_)
            | Self::InsufficientBalance
            | Self::Payment(PaymentError::Closing { .. }) => StatusCode::PAYMENT_REQUIRED,
            Self::Header(_) | Self::Payment(_) | Self::IdempotencyKeyInvalid => {
                StatusCode::BAD_REQUEST
            }
            Self::ChannelPending
            | Self::IdempotencyKeyReused
            | Self::IdempotencyKeyInProgress
            | Self::IdempotentResponseUnavailable => StatusCode::CONFLICT,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RouteNotPriced => StatusCode::NOT_FOUND,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::PaymentRequired => "Payment required: open a payment channel",
            Self::Header(_) => "Malformed Payment-Channel header",
            Self::Payment(PaymentError::Closing { .. }) => "Channel is closing: open a new channel",
            Self::Payment(_) => "Payment refused",
            Self::UnknownChannel => "Unknown payment channel: open a new channel",
            Self::ChannelNotOpen(_) => "Payment channel is not open: open a new channel",
            Self::ChannelPending => "Payment channel funding is not confirmed yet: retry later",
            Self::InsufficientBalance => "Insufficient channel balance: top up",
            Self::StoreUnavailable => "Channel store unavailable",
            Self::RouteNotPriced => "This route is not offered",
            Self::IdempotencyKeyInvalid => {
                "Idempotency-Key must be 1 to 255 visible ASCII characters"
            }
            Self::IdempotencyKeyReused => "Idempotency-Key was used by another request",
            Self::IdempotencyKeyInProgress => {
                "The request with this Idempotency-Key is still being served: retry later"
            }
            Self::IdempotentResponseUnavailable => {
                "The request with this Idempotency-Key was served, but its response was not kept"
            }
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(e) => e.fmt(f),
            Self::Payment(e) => e.fmt(f),
            Self::ChannelNotOpen(state) => write!(f, "channel is {state:?}"),
            other => f.write_str(other.title()),
        }
    }
}

/// A refused request: what went wrong and, for a known channel, its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    kind: RejectionKind,
    channel: Option<ChannelSnapshot>,
    price: Option<MilliSats>,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind, channel: Option<ChannelSnapshot>) -> Self {
        Self { kind, channel, price: None }
    }

    /// Records the price of the refused request (a client checks it before paying).
    pub(crate) fn with_price(mut self, price: MilliSats) -> Self {
        self.price = Some(price);
        self
    }

    /// The price of the refused request, when it was priced.
    pub fn price(&self) -> Option<MilliSats> {
        self.price
    }

    /// Why the request was refused.
    pub fn kind(&self) -> &RejectionKind {
        &self.kind
    }

    /// The channel's state, if the request named a known channel.
    pub fn channel(&self) -> Option<&ChannelSnapshot> {
        self.channel.as_ref()
    }

    /// The problem document of this refusal; `terms_url` is where the terms document lives.
    pub fn problem(&self, terms_url: &str) -> Problem {
        Problem::new(self.kind.status(), self.kind.code(), &self.kind)
            .with_title(self.kind.title())
            .with_price(self.price)
            .with_channel(self.channel.clone())
            .with_terms(terms_url)
    }

    /// Renders the problem+json response (with the `WWW-Authenticate` challenge of a 402),
    /// this rejection in its extensions.
    pub(crate) fn into_response<B: From<String>>(self, terms_url: &str) -> Response<B> {
        let mut response = self.problem(terms_url).to_response();
        response.extensions_mut().insert(self);
        response
    }
}

impl From<StoreError> for Rejection {
    fn from(error: StoreError) -> Self {
        let kind = match error {
            StoreError::NotFound => RejectionKind::UnknownChannel,
            _ => RejectionKind::StoreUnavailable,
        };
        Self::new(kind, None)
    }
}
