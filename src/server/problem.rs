use core::fmt;

use bitcoin::Amount;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::MilliSats;
use crate::channel::PaymentError;
use crate::store::{ChannelRecord, ChannelState, StoreError};
use crate::wire::{ChannelId, DecodeError};

/// The prefix of every problem `type` this crate sends; the code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:paychan:problem:";

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
}

impl RejectionKind {
    /// The stable, machine-readable code; the problem `type` is
    /// [`PROBLEM_TYPE_PREFIX`] followed by it.
    pub fn code(&self) -> &'static str {
        match self {
            Self::PaymentRequired => "payment-required",
            Self::Header(e) => e.code(),
            Self::Payment(e) => e.code(),
            Self::UnknownChannel => "unknown-channel",
            Self::ChannelNotOpen(_) => "channel-not-open",
            Self::ChannelPending => "channel-pending",
            Self::InsufficientBalance => "insufficient-balance",
            Self::StoreUnavailable => "store-unavailable",
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
            Self::Header(_) | Self::Payment(_) => StatusCode::BAD_REQUEST,
            Self::ChannelPending => StatusCode::CONFLICT,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
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

/// A channel's state as a client needs it to resynchronise and top up: part of every
/// rejection that concerns a known channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    /// The channel (funding outpoint).
    pub channel: ChannelId,
    /// Its state.
    pub state: ChannelState,
    /// What the best payment pays the server, in msat.
    pub paid_msat: MilliSats,
    /// What requests consumed, in msat.
    pub spent_msat: MilliSats,
    /// paid − spent, in msat.
    pub balance_msat: MilliSats,
    /// The price of this request, in msat.
    pub price_msat: MilliSats,
    /// How much more the channel can ever pay the server, in sat.
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub capacity_left_sat: Amount,
    /// The smallest server amount a new payment must carry for this request, in sat (absent
    /// when the channel cannot pay it: open a new channel).
    #[serde(
        default,
        with = "bitcoin::amount::serde::as_sat::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_server_amount_sat: Option<Amount>,
    /// A server amount that also prepays the configured bundle, in sat.
    #[serde(
        default,
        with = "bitcoin::amount::serde::as_sat::opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub suggested_server_amount_sat: Option<Amount>,
    /// The refund's lock time (height or timestamp).
    pub expiry: u32,
    /// Payments are refused from this height or timestamp on.
    pub close_by: u32,
}

impl ChannelSnapshot {
    /// Computes the snapshot of `record` for a request costing `price`, suggesting `bundle`
    /// more than the minimum.
    pub fn new(record: &ChannelRecord, price: MilliSats, bundle: MilliSats) -> Self {
        let params = record.channel.params();
        let paid = record.paid_amount();
        let max = params.max_server_amount();
        let needed = record.spent.checked_add(price).map(MilliSats::to_sat_ceil);
        let min = needed
            .map(|needed| needed.max(paid + Amount::ONE_SAT).max(params.min_server_amount()))
            .filter(|min| *min <= max);
        let suggested = min.map(|min| {
            min.checked_add(bundle.to_sat_ceil()).map_or(max, |suggested| suggested.min(max))
        });
        let expiry = params.expiry.to_consensus_u32();
        Self {
            channel: record.id(),
            state: record.state,
            paid_msat: record.paid(),
            spent_msat: record.spent,
            balance_msat: record.balance(),
            price_msat: price,
            capacity_left_sat: max.checked_sub(paid).unwrap_or(Amount::ZERO),
            min_server_amount_sat: min,
            suggested_server_amount_sat: suggested,
            expiry,
            close_by: expiry.saturating_sub(params.close_margin),
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

#[derive(Serialize)]
struct Body<'a> {
    r#type: String,
    title: &'static str,
    status: u16,
    detail: String,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_msat: Option<MilliSats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a ChannelSnapshot>,
    terms: &'a str,
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

    /// Renders the problem+json response; `terms_url` is where the terms document lives.
    pub(crate) fn into_response<B: From<String>>(self, terms_url: &str) -> Response<B> {
        let status = self.kind.status();
        let body = Body {
            r#type: format!("{PROBLEM_TYPE_PREFIX}{}", self.kind.code()),
            title: self.kind.title(),
            status: status.as_u16(),
            detail: self.kind.to_string(),
            code: self.kind.code(),
            price_msat: self.price,
            channel: self.channel.as_ref(),
            terms: terms_url,
        };
        let json = serde_json::to_string(&body).expect("problem bodies serialise");
        let mut response = Response::new(B::from(json));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::PAYMENT_REQUIRED
            && let Ok(value) = HeaderValue::try_from(self.challenge(terms_url))
        {
            headers.insert(WWW_AUTHENTICATE, value);
        }
        response.extensions_mut().insert(self);
        response
    }

    /// The `WWW-Authenticate` challenge of a 402.
    fn challenge(&self, terms_url: &str) -> String {
        let mut challenge = format!(
            "Payment method=\"bitcoin-channel\", intent=\"session\", code=\"{}\", terms=\"{terms_url}\"",
            self.kind.code()
        );
        if let Some(price) = self.price {
            challenge.push_str(&format!(", price_msat=\"{}\"", price.to_msat()));
        }
        if let Some(snapshot) = &self.channel {
            challenge.push_str(&format!(", channel=\"{}\"", snapshot.channel));
            if let Some(min) = snapshot.min_server_amount_sat {
                challenge.push_str(&format!(", min_server_amount=\"{}\"", min.to_sat()));
            }
            if let Some(suggested) = snapshot.suggested_server_amount_sat {
                challenge
                    .push_str(&format!(", suggested_server_amount=\"{}\"", suggested.to_sat()));
            }
        }
        challenge
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
