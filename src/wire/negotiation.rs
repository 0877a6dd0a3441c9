//! The documents of the negotiation endpoints: the terms, and the requests and answers of
//! opening, funding and closing a channel (see `docs/HTTP.md`). The server writes them and
//! the client reads them with these same types.
//!
//! Scripts, keys and transactions travel as hex strings; amounts as integers of the unit their
//! name ends with (`_sat`, `_msat`); lock times as their consensus `u32`.

use bitcoin::Txid;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ChannelId;
use crate::MilliSats;
use crate::channel::{ChainTip, ChannelState, LifetimeBounds};

/// Where the terms document is served by default (an RFC 8615 well-known URI).
pub const TERMS_PATH: &str = "/.well-known/payment-channel";

/// The server's terms, `GET /.well-known/payment-channel`: what channels it accepts, at which
/// prices, and where its endpoints are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TermsDocument {
    /// The document's version: 1.
    #[serde(default)]
    pub version: u32,
    /// `bitcoin-channel`.
    #[serde(default)]
    pub scheme: String,
    /// The network, as Bitcoin Core names it (`main`, `test`, `signet`, `regtest`).
    pub network: String,
    /// The prices the server publishes (free-form; see `RoutePrices::describe`).
    #[serde(default)]
    pub prices: Value,
    /// The smallest channel value, in sat.
    pub min_value_sat: u64,
    /// The largest channel value, in sat.
    pub max_value_sat: u64,
    /// Lifetime bounds for block-height expiries.
    pub lifetime_blocks: LifetimeBounds,
    /// Lifetime bounds for timestamp expiries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_seconds: Option<LifetimeBounds>,
    /// The lowest fee rate of payments and refunds, in sat/vB.
    #[serde(default)]
    pub min_fee_rate_sat_per_vb: u64,
    /// The highest fee rate of payments and refunds, in sat/vB.
    #[serde(default)]
    pub max_fee_rate_sat_per_vb: u64,
    /// The lowest fee rate of a funding transaction, in sat/vB.
    pub funding_min_fee_rate_sat_per_vb: u64,
    /// The smallest server output a payment may have, in sat.
    #[serde(default)]
    pub dust_limit_sat: u64,
    /// The script every payment pays the server to (hex).
    pub server_script: String,
    /// The chain tip the server sees.
    pub tip: ChainTip,
    /// Where the negotiation endpoints are: paths on the server's origin.
    pub endpoints: Endpoints,
}

/// The negotiation endpoints of a [`TermsDocument`]; `{id}` stands for a channel id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Endpoints {
    /// `POST`: propose a channel ([`OpenRequest`] → [`OpenResponse`]).
    pub open: String,
    /// `POST`: have the refund signed ([`RefundRequest`] → [`RefundResponse`]).
    pub refund: String,
    /// `POST`: hand over the signed funding ([`FundRequest`] → [`FundResponse`]).
    pub fund: String,
    /// `GET`: a channel's [`ChannelSnapshot`](super::ChannelSnapshot).
    #[serde(default)]
    pub channel: String,
    /// `POST`, with a payment of the channel as proof: close cooperatively
    /// ([`CloseResponse`]).
    pub close: String,
    /// `POST`, with a better payment of the channel in `Payment-Channel`: store it, charge
    /// nothing ([`PaymentAnswer`]); how a client tops up a metered stream.
    #[serde(default)]
    pub payment: String,
}

impl Endpoints {
    /// The endpoints under `prefix` (for example `/payment-channel`).
    pub fn under(prefix: &str) -> Self {
        Self {
            open: format!("{prefix}/open"),
            refund: format!("{prefix}/refund"),
            fund: format!("{prefix}/fund"),
            channel: format!("{prefix}/channels/{{id}}"),
            close: format!("{prefix}/channels/{{id}}/close"),
            payment: format!("{prefix}/payment"),
        }
    }
}

/// The answer to `POST …/payment`: the payment is the channel's best (or an earlier one was
/// better), and what is left to spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PaymentAnswer {
    /// The channel.
    pub channel: ChannelId,
    /// What the payment handed over pays the server.
    pub paid_msat: MilliSats,
    /// The channel's balance now.
    pub balance_msat: MilliSats,
}

/// `POST …/open`: the client's proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The client's key K1 (compressed, hex).
    pub client_pubkey: String,
    /// The channel's value, in sat.
    pub value_sat: u64,
    /// The requested refund lock time: a height (< 500 000 000) or a Unix time.
    pub expiry: u32,
    /// Where the client's change and refund go (hex).
    pub client_script: String,
}

/// The answer to `POST …/open`: the agreed channel, which the client checks field by field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenResponse {
    /// The proposal's number, to quote in `/refund` and `/fund`.
    pub proposal: u32,
    /// The server's fresh key K2 for this channel (compressed, hex).
    pub server_pubkey: String,
    /// `2 K1 K2 2 CHECKMULTISIG` (hex).
    pub witness_script: String,
    /// The P2WSH output the funding must pay (hex).
    pub funding_script_pubkey: String,
    /// The same as an address.
    pub funding_address: String,
    /// The channel's value, in sat.
    pub value_sat: u64,
    /// The refund's lock time.
    pub expiry: u32,
    /// Payments are refused this many blocks (or seconds) before the expiry.
    pub close_margin: u32,
    /// The client's script (hex).
    pub client_script: String,
    /// The server's script (hex).
    pub server_script: String,
    /// The channel's lowest fee rate, in sat/vB.
    pub min_fee_rate_sat_per_vb: u64,
    /// The channel's highest fee rate, in sat/vB.
    pub max_fee_rate_sat_per_vb: u64,
    /// The refund's fee, in sat.
    pub refund_fee_sat: u64,
    /// A payment's fee with change, in sat.
    pub payment_fee_sat: u64,
    /// The smallest server amount of any payment, in sat.
    pub min_server_amount_sat: u64,
}

/// `POST …/refund`: the refund to sign, against the unsigned funding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    /// The [`OpenResponse::proposal`].
    pub proposal: u32,
    /// The unsigned funding transaction (hex).
    pub funding_tx: String,
    /// The unsigned refund transaction (hex).
    pub refund_tx: String,
}

/// The answer to `POST …/refund`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundResponse {
    /// The channel the funding will create.
    pub channel: ChannelId,
    /// The server's signature of the refund (DER, hex, without the sighash byte).
    pub signature: String,
}

/// `POST …/fund`: the signed funding and the first payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundRequest {
    /// The [`OpenResponse::proposal`].
    pub proposal: u32,
    /// The signed funding transaction (hex).
    pub funding_tx: String,
    /// The first payment, in `Payment-Channel` header form (base64).
    pub payment: String,
}

/// The answer to `POST …/fund`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundResponse {
    /// The new channel.
    pub channel: ChannelId,
    /// Its balance: what the first payment prepaid.
    pub balance_msat: MilliSats,
}

/// The body of `POST …/channels/{id}/close` (optional: `{}` closes at the best payment).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRequest {
    /// A fair settlement: a payment of the channel that pays the server what it metered
    /// (rounded up to the satoshi), encoded as the `Payment-Channel` header is. The server
    /// settles with it instead of the best payment, and the unused prepaid amount goes back
    /// to the client; one that pays less than what was spent is refused (409
    /// `payment-below-spent`, with the channel's snapshot), nothing changed. On a channel
    /// already closing it is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fair_payment: Option<String>,
    /// The digest (hex) of the latest receipt the client holds on the channel, as
    /// `Payment-Receipt-Prev` names it: the close's receipt links to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

/// The answer to `POST …/channels/{id}/close`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseResponse {
    /// The channel.
    pub channel: ChannelId,
    /// The settlement transaction's id.
    pub txid: Txid,
    /// What it pays the server, in sat.
    pub server_amount_sat: u64,
    /// The co-signed settlement transaction (hex).
    pub close_tx: String,
    /// `closed` once broadcast, `closing` while the server retries the broadcast.
    pub state: ChannelState,
    /// The close's receipt, always signed: the request `POST <this path>`, price 0, the proof
    /// payment the request carried and the channel's balance as every receipt states it (paid
    /// − spent), linked to the request's `prev`: the client's final proof of what the
    /// channel was charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<super::Receipt>,
}
