//! Everything that crosses the network, typed once for the server and the client: the
//! `Payment-Channel` header and channel ids (here), the [`Problem`] document of every refusal
//! with its [`ProblemCode`]s and the [`ChannelSnapshot`] it carries, and the negotiation
//! documents ([`TermsDocument`], [`OpenRequest`] … [`CloseResponse`]). `docs/HTTP.md` is the
//! prose version.
//!
//! A request carries the client's latest signed payment transaction (T3) in the
//! `Payment-Channel` header, as base64 (RFC 4648, standard alphabet, padded) of its consensus
//! serialisation, segwit marker and witness included. The witness of its single input is one
//! item: the client's DER signature followed by the `SIGHASH_ALL` byte. A value longer than
//! [`MAX_HEADER_LEN`] is refused before it is decoded. See `docs/PROTOCOL.md`.
//!
//! # Examples
//!
//! ```
//! use bitcoin::{Amount, OutPoint, ScriptBuf, Transaction, TxIn, TxOut, absolute, transaction};
//! use paychan::wire;
//!
//! let tx = Transaction {
//!     version: transaction::Version::TWO,
//!     lock_time: absolute::LockTime::ZERO,
//!     input: vec![TxIn::default()],
//!     output: vec![TxOut { value: Amount::from_sat(1_000), script_pubkey: ScriptBuf::new() }],
//! };
//! let header = wire::encode_payment(&tx);
//! assert_eq!(wire::decode_payment(header.as_bytes())?, tx);
//! assert!(wire::decode_payment(b"not base64!").is_err());
//! # Ok::<(), wire::DecodeError>(())
//! ```

use core::fmt;
use core::str::FromStr;

use crate::MilliSats;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bitcoin::{OutPoint, Transaction, consensus};
use serde::{Deserialize, Serialize};

mod negotiation;
mod prices;
mod problem;
mod receipt;

#[cfg(feature = "runtime")]
pub(crate) use receipt::Compact;

pub use negotiation::{
    CloseRequest, CloseResponse, Endpoints, FundRequest, FundResponse, OpenRequest, OpenResponse,
    PaymentAnswer, RefundRequest, RefundResponse, TERMS_PATH, TermsDocument,
};
#[cfg(feature = "runtime")]
pub(crate) use prices::PathPattern;
pub use prices::PriceList;
pub use problem::{ChannelSnapshot, PROBLEM_JSON, PROBLEM_TYPE_PREFIX, Problem, ProblemCode};
pub use receipt::{
    PAYMENT_RECEIPT, PAYMENT_RECEIPT_PREV, PAYMENT_RECEIPT_UNSIGNED, Receipt, ReceiptError,
    UnsignedReceipts, request_digest,
};

/// The response header of a metered stream ([`StreamMeter`](crate::server::StreamMeter)):
/// `sse; per-event=<msat>` for SSE events (watch for the `payment-required` event), or
/// `bytes; per-kib=<msat>` for a byte stream (count the bytes and top up ahead).
pub const PAYMENT_CHANNEL_STREAM: &str = "payment-channel-stream";

/// The SSE event a metered stream sends when the balance runs out: its data is the problem
/// document (`insufficient-balance`, with the channel's snapshot and the unit's price), and the
/// stream holds until the client tops up on the payment endpoint or the hold elapses.
pub const TOP_UP_EVENT: &str = "payment-required";

/// The SSE event that ends a metered stream: its data is the signed [`Receipt`] of the whole
/// request (its price is everything the request was charged, up front and per unit).
pub const RECEIPT_EVENT: &str = "payment-receipt";

/// The request header naming an operation the client may retry
/// (draft-ietf-httpapi-idempotency-key-header).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The response header of a replayed response: `true`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The unit of a metered stream and its price: the value of [`PAYMENT_CHANNEL_STREAM`].
///
/// # Examples
///
/// ```
/// use paychan::MilliSats;
/// use paychan::wire::StreamUnit;
///
/// let unit: StreamUnit = "bytes; per-kib=100".parse().unwrap();
/// assert_eq!(unit, StreamUnit::Kib(MilliSats::from_msat(100)));
/// assert_eq!(unit.to_string(), "bytes; per-kib=100");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamUnit {
    /// Each SSE event costs this much.
    Event(MilliSats),
    /// Each 1 024 bytes cost this much, charged to the millisatoshi.
    Kib(MilliSats),
}

impl fmt::Display for StreamUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Event(price) => write!(f, "sse; per-event={}", price.to_msat()),
            Self::Kib(price) => write!(f, "bytes; per-kib={}", price.to_msat()),
        }
    }
}

impl FromStr for StreamUnit {
    type Err = ParseStreamUnitError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (kind, price) = value.split_once(';').ok_or(ParseStreamUnitError)?;
        let (name, price) = price.trim().split_once('=').ok_or(ParseStreamUnitError)?;
        let price = MilliSats::from_msat(price.trim().parse().map_err(|_| ParseStreamUnitError)?);
        match (kind.trim(), name.trim()) {
            ("sse", "per-event") => Ok(Self::Event(price)),
            ("bytes", "per-kib") => Ok(Self::Kib(price)),
            _ => Err(ParseStreamUnitError),
        }
    }
}

/// A `Payment-Channel-Stream` value that is not a [`StreamUnit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseStreamUnitError;

impl fmt::Display for ParseStreamUnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a stream unit (`sse; per-event=<msat>` or `bytes; per-kib=<msat>`)")
    }
}

impl std::error::Error for ParseStreamUnitError {}

/// What `bytes` bytes cost at `per_kib` per 1 024 bytes, rounded up to the millisatoshi.
pub(crate) fn per_kib_cost(per_kib: MilliSats, bytes: u64) -> MilliSats {
    let msat = u128::from(per_kib.to_msat()) * u128::from(bytes);
    MilliSats::from_msat(u64::try_from(msat.div_ceil(1024)).unwrap_or(u64::MAX))
}

/// The request header that carries the client's latest signed payment.
pub const PAYMENT_CHANNEL: &str = "payment-channel";

/// The response header that carries the channel's balance after the request, in msat.
pub const PAYMENT_CHANNEL_BALANCE: &str = "payment-channel-balance";

/// The longest `Payment-Channel` header value accepted, in bytes.
pub const MAX_HEADER_LEN: usize = 1024;

/// Why a `Payment-Channel` header value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value is longer than [`MAX_HEADER_LEN`].
    TooLong {
        /// Length of the value in bytes.
        len: usize,
    },
    /// The value is not padded standard base64.
    Base64,
    /// The bytes are not exactly one consensus-serialised transaction.
    Transaction,
}

impl DecodeError {
    /// The stable, machine-readable name of this failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLong { .. } => "header-too-long",
            Self::Base64 => "header-not-base64",
            Self::Transaction => "header-not-a-transaction",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { len } => {
                write!(f, "header is {len} bytes, more than the {MAX_HEADER_LEN} allowed")
            }
            Self::Base64 => f.write_str("header is not padded standard base64 (RFC 4648)"),
            Self::Transaction => f.write_str("header is not one consensus-encoded transaction"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Encodes a signed payment as a `Payment-Channel` header value.
pub fn encode_payment(payment: &Transaction) -> String {
    STANDARD.encode(consensus::serialize(payment))
}

/// Decodes a `Payment-Channel` header value.
///
/// # Errors
///
/// [`DecodeError`]: too long, not base64, or not exactly one transaction (trailing bytes are
/// refused).
pub fn decode_payment(value: &[u8]) -> Result<Transaction, DecodeError> {
    decode_payment_encoded(value).map(|(payment, _encoded)| payment)
}

/// [`decode_payment`], keeping the payment's consensus serialization (the header's bytes):
/// decoding is strict (no trailing bytes, minimal integers, no empty witness record), so
/// they are exactly what serializing the payment would give.
pub(crate) fn decode_payment_encoded(value: &[u8]) -> Result<(Transaction, Vec<u8>), DecodeError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(DecodeError::TooLong { len: value.len() });
    }
    let bytes = STANDARD.decode(value).map_err(|_| DecodeError::Base64)?;
    let payment = consensus::deserialize(&bytes).map_err(|_| DecodeError::Transaction)?;
    Ok((payment, bytes))
}

/// A channel's id: its funding outpoint, written `txid:vout`.
///
/// # Examples
///
/// ```
/// use paychan::wire::ChannelId;
///
/// let id: ChannelId =
///     "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b:1".parse()?;
/// assert_eq!(id.outpoint().vout, 1);
/// assert_eq!(id.to_string().parse::<ChannelId>()?, id);
/// # Ok::<(), paychan::wire::ParseChannelIdError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ChannelId(OutPoint);

impl ChannelId {
    /// The channel funded at `outpoint`.
    pub const fn new(outpoint: OutPoint) -> Self {
        Self(outpoint)
    }

    /// Returns the funding outpoint.
    pub const fn outpoint(&self) -> OutPoint {
        self.0
    }
}

impl From<OutPoint> for ChannelId {
    fn from(outpoint: OutPoint) -> Self {
        Self(outpoint)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.txid, self.0.vout)
    }
}

/// A string that is not `txid:vout`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseChannelIdError;

impl fmt::Display for ParseChannelIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected a channel id as `txid:vout` (64 hex digits, a colon, a number)")
    }
}

impl std::error::Error for ParseChannelIdError {}

impl FromStr for ChannelId {
    type Err = ParseChannelIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (txid, vout) = s.split_once(':').ok_or(ParseChannelIdError)?;
        if txid.len() != 64 || vout.is_empty() || !vout.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseChannelIdError);
        }
        Ok(Self(OutPoint {
            txid: txid.parse().map_err(|_| ParseChannelIdError)?,
            vout: vout.parse().map_err(|_| ParseChannelIdError)?,
        }))
    }
}

impl From<ChannelId> for String {
    fn from(id: ChannelId) -> Self {
        id.to_string()
    }
}

impl TryFrom<String> for ChannelId {
    type Error = ParseChannelIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_long_values_before_decoding() {
        let long = vec![b'A'; MAX_HEADER_LEN + 4];
        assert_eq!(decode_payment(&long), Err(DecodeError::TooLong { len: MAX_HEADER_LEN + 4 }));
    }

    #[test]
    fn refuses_unpadded_url_safe_and_garbage() {
        let tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![bitcoin::TxIn::default()],
            output: vec![bitcoin::TxOut {
                value: bitcoin::Amount::ZERO,
                script_pubkey: bitcoin::ScriptBuf::from_bytes(vec![0x51]),
            }],
        };
        let good = encode_payment(&tx);
        assert!(good.ends_with('='), "fixture must exercise padding: {good}");
        let unpadded = good.trim_end_matches('=');
        assert_eq!(decode_payment(unpadded.as_bytes()), Err(DecodeError::Base64));
        assert_eq!(decode_payment(b"@@@@"), Err(DecodeError::Base64));
        assert_eq!(decode_payment(b"AAAA"), Err(DecodeError::Transaction));
        let mut trailing = consensus::serialize(&tx);
        trailing.push(0);
        assert_eq!(
            decode_payment(STANDARD.encode(trailing).as_bytes()),
            Err(DecodeError::Transaction)
        );
    }

    /// What `decode_payment_encoded` keeps is what a store stores in place of serializing the
    /// payment: a header decodes only from the canonical serialization, so the two agree.
    #[test]
    fn a_payment_decodes_only_from_its_canonical_serialization() {
        let mut input = bitcoin::TxIn::default();
        input.witness.push([0x30; 71]);
        let tx = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![input],
            output: vec![bitcoin::TxOut {
                value: bitcoin::Amount::from_sat(1_000),
                script_pubkey: bitcoin::ScriptBuf::from_bytes(vec![0x51]),
            }],
        };
        let canonical = consensus::serialize(&tx);
        let (decoded, encoded) =
            decode_payment_encoded(STANDARD.encode(&canonical).as_bytes()).unwrap();
        assert_eq!((decoded, &encoded), (tx.clone(), &canonical));
        // The input count (after version, marker and flag) as a non-minimal compact size.
        let mut padded = canonical[..6].to_vec();
        padded.extend_from_slice(&[0xfd, 0x01, 0x00]);
        padded.extend_from_slice(&canonical[7..]);
        // The segwit marker and flag with no witness at all.
        let mut bare = tx;
        bare.input[0].witness.clear();
        let mut flagged = consensus::serialize(&bare);
        flagged.splice(4..4, [0x00, 0x01]);
        let at = flagged.len() - 4;
        flagged.insert(at, 0x00);
        for other in [padded, flagged] {
            assert_eq!(
                decode_payment_encoded(STANDARD.encode(&other).as_bytes()),
                Err(DecodeError::Transaction)
            );
        }
    }

    #[test]
    fn channel_ids_round_trip_and_refuse_junk() {
        let id: ChannelId =
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b:0".parse().unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
        for bad in [
            "",
            "abc:1",
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b",
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b:",
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b:-1",
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b:99999999999",
        ] {
            assert!(bad.parse::<ChannelId>().is_err(), "{bad}");
        }
    }
}
