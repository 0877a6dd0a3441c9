//! The problem document (RFC 9457) of every refusal, its codes, and the channel snapshot it
//! carries.

use core::fmt;
use core::str::FromStr;
use std::borrow::Cow;

use bitcoin::Amount;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ChannelId;
use crate::MilliSats;
use crate::channel::ChannelState;

/// The prefix of every problem `type` this crate sends; the code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:paychan:problem:";

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The longest body a client reads as a problem document's `detail` when the body is not one.
const RAW_DETAIL_LEN: usize = 200;

macro_rules! problem_codes {
    ($($(#[$doc:meta])* $variant:ident => $code:literal,)*) => {
        /// The machine-readable reason of a refusal: the `code` of a [`Problem`], and the
        /// last part of its `type` (after [`PROBLEM_TYPE_PREFIX`]).
        ///
        /// Codes a client acts on have their own variant; the protocol core's rules (a
        /// payment, refund or funding that breaks one) are [`Rule`](Self::Rule), named by the
        /// core error's `code()`. A code this version does not know parses as `Rule` too.
        ///
        /// # Examples
        ///
        /// ```
        /// use paychan::wire::ProblemCode;
        ///
        /// let code: ProblemCode = "insufficient-balance".parse().unwrap();
        /// assert_eq!(code, ProblemCode::InsufficientBalance);
        /// assert_eq!(code.as_str(), "insufficient-balance");
        /// let rule: ProblemCode = "payment-fee-too-low".parse().unwrap();
        /// assert_eq!(rule.as_str(), "payment-fee-too-low");
        /// ```
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ProblemCode {
            $($(#[$doc])* $variant,)*
            /// A rule of the protocol core the input broke (`payment-fee-too-low`,
            /// `refund-wrong-lock-time`, `header-not-base64`, …), or a code this version does
            /// not know.
            Rule(Cow<'static, str>),
        }

        impl ProblemCode {
            /// The code as sent.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $code,)*
                    Self::Rule(code) => code,
                }
            }

            /// The code for `code`, a static name such as a core error's `code()`: the named
            /// variant when there is one, else [`Rule`](Self::Rule), without allocating.
            pub fn from_static(code: &'static str) -> Self {
                match code {
                    $($code => Self::$variant,)*
                    other => Self::Rule(Cow::Borrowed(other)),
                }
            }
        }

        impl FromStr for ProblemCode {
            type Err = core::convert::Infallible;

            fn from_str(code: &str) -> Result<Self, Self::Err> {
                Ok(match code {
                    $($code => Self::$variant,)*
                    other => Self::Rule(Cow::Owned(other.to_owned())),
                })
            }
        }
    };
}

problem_codes! {
    /// A priced request without a payment: open a channel (or, from the close endpoint,
    /// send a payment of the channel as proof).
    PaymentRequired => "payment-required",
    /// The channel's balance does not cover the price: sign a payment that pays more.
    InsufficientBalance => "insufficient-balance",
    /// The payment or the path names a channel this server does not have.
    UnknownChannel => "unknown-channel",
    /// The channel is closing, closed, settled or failed: open a new one.
    ChannelNotOpen => "channel-not-open",
    /// The channel is past its close margin: open a new one.
    ChannelClosing => "payment-channel-closing",
    /// The channel's funding is waiting for its confirmations: retry later.
    ChannelPending => "channel-pending",
    /// The channel store could not be reached; nothing was served or changed.
    StoreUnavailable => "store-unavailable",
    /// The chain backend could not be reached.
    ChainUnavailable => "chain-unavailable",
    /// A negotiation body or path that does not parse.
    BadRequest => "bad-request",
    /// Too many channel openings from this client address.
    RateLimited => "rate-limited",
    /// Too many proposals waiting for their funding.
    TooManyPending => "too-many-pending",
    /// No live proposal with this number: open again.
    UnknownProposal => "unknown-proposal",
    /// `/fund` before the refund was signed.
    RefundNotSigned => "refund-not-signed",
    /// The chain backend refused the funding transaction.
    FundingRejected => "funding-rejected",
    /// A funding input the chain backend does not know as unspent.
    FundingMissingInputs => "funding-missing-inputs",
    /// A funding with more inputs than the server looks up.
    FundingTooManyInputs => "funding-too-many-inputs",
    /// A close proved with a payment older than the channel's best.
    StaleProof => "stale-proof",
    /// A close of a channel without a payment.
    NoPayment => "no-payment",
    /// The server could not derive the channel's key.
    KeyDerivation => "key-derivation",
    /// The server could not sign.
    Signing => "signing",
    /// The server could not build the close.
    Close => "close",
    /// The route is not offered: the price table refuses requests it does not list.
    RouteNotPriced => "route-not-priced",
    /// 400: an `Idempotency-Key` that is empty, longer than 255 characters, or not visible
    /// ASCII.
    IdempotencyKeyInvalid => "idempotency-key-invalid",
    /// 409: the `Idempotency-Key` was used by another request (another method, path or body
    /// fingerprint) on this channel.
    IdempotencyKeyReused => "idempotency-key-reused",
    /// 409: the request that claimed this `Idempotency-Key` is still being served: retry later.
    IdempotencyKeyInProgress => "idempotency-key-in-progress",
    /// 409: the request with this `Idempotency-Key` was served and paid, but its response was
    /// too large (or streamed) to keep: it cannot be replayed, nor served again unpaid.
    IdempotentResponseUnavailable => "idempotent-response-unavailable",
    /// 502: the API behind a paying proxy (`paychan serve`) did not answer; nothing was
    /// charged for the request.
    UpstreamUnavailable => "upstream-unavailable",
}

impl ProblemCode {
    /// The problem `type` URI of this code.
    pub fn type_uri(&self) -> String {
        format!("{PROBLEM_TYPE_PREFIX}{}", self.as_str())
    }
}

impl PartialEq<str> for ProblemCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ProblemCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ProblemCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ProblemCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Ok(code.parse().unwrap_or_else(|never| match never {}))
    }
}

/// A channel's state as a client needs it to resynchronise and top up: part of every
/// refusal that concerns a known channel, and the answer of `GET …/channels/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    /// The channel (funding outpoint).
    pub channel: ChannelId,
    /// Its state.
    pub state: ChannelState,
    /// What the best payment pays the server, in msat.
    pub paid_msat: MilliSats,
    /// What requests consumed, in msat, with what the server's nodes hold in leases
    /// (`leased_msat`): what a fair close must pay.
    pub spent_msat: MilliSats,
    /// The part of `spent_msat` the server's nodes hold in leases, reserved for the requests
    /// they serve and not yet settled, with what leases of nodes that died held (absent:
    /// none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leased_msat: MilliSats,
    /// paid − spent (with leases), in msat: what requests can draw on.
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
    /// A server amount that also prepays the configured top-up (`PaywallLayer::with_prepaid_top_up`), in sat.
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

fn is_zero(amount: &MilliSats) -> bool {
    amount.is_zero()
}

/// An RFC 9457 problem document: the body of every refusal, from the metering layer and from
/// the negotiation endpoints alike. The server renders it with
/// [`to_response`](Self::to_response); a client reads it with [`from_body`](Self::from_body).
///
/// # Examples
///
/// ```
/// use http::StatusCode;
/// use paychan::wire::{Problem, ProblemCode};
///
/// let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, ProblemCode::RateLimited, "slow down");
/// let response = problem.to_response::<String>();
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// let read = Problem::from_body(response.status(), response.body().as_bytes());
/// assert_eq!(read, problem);
/// assert_eq!(read.code, ProblemCode::RateLimited);
///
/// // A body that is not a problem document still gives a problem, with the body as detail.
/// let raw = Problem::from_body(StatusCode::BAD_GATEWAY, b"upstream down");
/// assert_eq!((raw.status, raw.detail.as_str()), (502, "upstream down"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Problem {
    /// `urn:paychan:problem:<code>`.
    #[serde(rename = "type", default)]
    pub type_uri: String,
    /// A short human-readable summary.
    #[serde(default)]
    pub title: String,
    /// The HTTP status.
    #[serde(default)]
    pub status: u16,
    /// What went wrong, for people.
    #[serde(default)]
    pub detail: String,
    /// What went wrong, for programs.
    pub code: ProblemCode,
    /// The price of the refused request, when it was priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_msat: Option<MilliSats>,
    /// The channel's state, when the request named a known channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Box<ChannelSnapshot>>,
    /// Where the terms document is (on refusals of the metering layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<String>,
}

impl Problem {
    /// A problem with `status`, `code` and `detail`, titled by the status's reason phrase.
    pub fn new(status: StatusCode, code: ProblemCode, detail: impl fmt::Display) -> Self {
        Self {
            type_uri: code.type_uri(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.to_string(),
            code,
            price_msat: None,
            channel: None,
            terms: None,
        }
    }

    /// The same problem with another title.
    #[must_use]
    pub fn with_title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// The same problem with the refused request's price.
    #[must_use]
    pub fn with_price(mut self, price: Option<MilliSats>) -> Self {
        self.price_msat = price;
        self
    }

    /// The same problem with the channel's state.
    #[must_use]
    pub fn with_channel(mut self, channel: Option<ChannelSnapshot>) -> Self {
        self.channel = channel.map(Box::new);
        self
    }

    /// The same problem pointing to the terms document at `terms`.
    #[must_use]
    pub fn with_terms(mut self, terms: impl Into<String>) -> Self {
        self.terms = Some(terms.into());
        self
    }

    /// The HTTP status (500 if the document holds no valid status).
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Reads the body of a refusal with `status`. A body that is not a problem document (a
    /// proxy's error page, say) gives a problem whose code is empty and whose detail is the
    /// body's first 200 bytes.
    ///
    /// The status is the response's, whatever the body says.
    pub fn from_body(status: StatusCode, body: &[u8]) -> Self {
        let parsed: Result<Self, _> = serde_json::from_slice(body);
        parsed.map(|problem| Self { status: status.as_u16(), ..problem }).unwrap_or_else(|_| {
            let detail = String::from_utf8_lossy(&body[..body.len().min(RAW_DETAIL_LEN)]);
            let mut problem = Self::new(status, ProblemCode::Rule(Cow::Borrowed("")), detail);
            problem.type_uri = String::new();
            problem
        })
    }

    /// The response carrying this problem: its status, `Content-Type:
    /// application/problem+json`, `Cache-Control: no-store`, and for a 402 pointing to the
    /// terms a `WWW-Authenticate: Payment method="bitcoin-channel", …` challenge (see
    /// `docs/HTTP.md`).
    pub fn to_response<B: From<String>>(&self) -> Response<B> {
        let json = serde_json::to_string(self).expect("problem documents serialise");
        let mut response = Response::new(B::from(json));
        let status = self.status_code();
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::PAYMENT_REQUIRED
            && let Some(challenge) = self.challenge()
            && let Ok(value) = HeaderValue::try_from(challenge)
        {
            headers.insert(WWW_AUTHENTICATE, value);
        }
        response
    }

    /// The `WWW-Authenticate` challenge of a 402 that points to the terms.
    fn challenge(&self) -> Option<String> {
        let terms = self.terms.as_deref()?;
        let mut challenge = format!(
            "Payment method=\"bitcoin-channel\", intent=\"session\", code=\"{}\", terms=\"{terms}\"",
            self.code
        );
        if let Some(price) = self.price_msat {
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
        Some(challenge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_code_round_trips_and_unknown_codes_are_rules() {
        for code in ["payment-required", "insufficient-balance", "payment-channel-closing", "close"]
        {
            let parsed: ProblemCode = code.parse().unwrap();
            assert!(!matches!(parsed, ProblemCode::Rule(_)), "{code}");
            assert_eq!(parsed, ProblemCode::from_static(code));
            assert_eq!(parsed.as_str(), code);
        }
        let future: ProblemCode = "some-future-code".parse().unwrap();
        assert_eq!(future, ProblemCode::Rule(Cow::Borrowed("some-future-code")));
        let json = serde_json::to_string(&ProblemCode::ChannelPending).unwrap();
        assert_eq!(json, "\"channel-pending\"");
    }

    #[test]
    fn a_non_problem_body_is_kept_as_detail_and_truncated() {
        let body = vec![b'x'; 1_000];
        let problem = Problem::from_body(StatusCode::BAD_GATEWAY, &body);
        assert_eq!(problem.detail.len(), RAW_DETAIL_LEN);
        assert_eq!(problem.code.as_str(), "");
        assert_eq!(problem.status_code(), StatusCode::BAD_GATEWAY);
    }
}
