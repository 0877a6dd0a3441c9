//! [`Receipt`]: the server's signed statement of what one request was charged.

use core::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bitcoin::hashes::{Hash, HashEngine, sha256};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::secp256k1::{Message, PublicKey, SecretKey, ecdsa::Signature};
use serde::{Deserialize, Serialize};

use super::ChannelId;
use crate::MilliSats;

/// The response header that carries the [`Receipt`] of a paid request.
pub const PAYMENT_RECEIPT: &str = "payment-receipt";

/// The request header with the [`digest`](Receipt::digest) (hex) of the latest receipt the
/// client holds on the channel: the server links the new receipt to it
/// ([`Receipt::prev`]).
pub const PAYMENT_RECEIPT_PREV: &str = "payment-receipt-prev";

/// The request header with which a client accepts receipts signed in batches: `<held>/<max>`,
/// it holds `held` unsigned receipts on the channel since the last signed one and accepts at
/// most `max` in a row ([`UnsignedReceipts`]). Without it, every receipt is signed.
pub const PAYMENT_RECEIPT_UNSIGNED: &str = "payment-receipt-unsigned";

/// What a client says in [`PAYMENT_RECEIPT_UNSIGNED`]: it holds `held` unsigned receipts on
/// the channel since its last signed one, and accepts at most `max` in a row. Every receipt
/// states the channel's whole spent, so the client's proof of what it was charged is its last
/// signed receipt; the unsigned ones after it are claims, checked link by link and added up
/// as any receipt is. (A signed receipt's [`prev`](Receipt::prev) fixes the order in which the
/// client held the receipts before it; the server signs the digest the client names without
/// knowing it, so the links prove that order, not what unsigned receipts said.)
///
/// ```
/// use paychan::wire::UnsignedReceipts;
///
/// let said = UnsignedReceipts::parse(b"30/64").unwrap();
/// assert_eq!(said, UnsignedReceipts { held: 30, max: 64 });
/// assert_eq!(said.to_string(), "30/64");
/// // The server signs the receipt that would reach its batch (1 024 by default, 8 below) or
/// // half the client's max in a row (the other half is room for requests in flight),
/// // whichever comes first.
/// assert!(!said.must_sign(1_024) && UnsignedReceipts { held: 31, max: 64 }.must_sign(1_024));
/// assert!(UnsignedReceipts { held: 7, max: 64 }.must_sign(8), "the server's batch of 8");
/// assert!(UnsignedReceipts { held: 0, max: 1 }.must_sign(32), "max 1: every receipt");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsignedReceipts {
    /// Unsigned receipts the client holds since its last signed one.
    pub held: u32,
    /// The most it accepts in a row.
    pub max: u32,
}

impl UnsignedReceipts {
    /// Reads a header value `<held>/<max>` (decimal, ASCII whitespace around it); `None` for
    /// anything else.
    pub fn parse(value: &[u8]) -> Option<Self> {
        // Read on every paid request that asks for batches: bytes, no `str` parsing.
        let value = value.trim_ascii();
        let slash = value.iter().position(|b| *b == b'/')?;
        let number = |digits: &[u8]| {
            digits.first()?;
            digits.iter().try_fold(0u32, |n, b| match b {
                b'0'..=b'9' => n.checked_mul(10)?.checked_add(u32::from(b - b'0')),
                _ => None,
            })
        };
        Some(Self { held: number(&value[..slash])?, max: number(&value[slash + 1..])? })
    }

    /// Whether the next receipt must be signed under a server batch of `batch` receipts: it
    /// would be the `held + 1`th unsigned in a row, and that reaches the smaller of `batch`
    /// and half the client's `max` (requests already in flight carry an older `held`: the
    /// other half is their room, so an honest server never leaves more than `max`).
    pub fn must_sign(&self, batch: u32) -> bool {
        self.held.saturating_add(1) >= (self.max / 2).min(batch)
    }
}

impl fmt::Display for UnsignedReceipts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.held, self.max)
    }
}

/// The compact form of an unsigned receipt ([`Receipt::encode_unsigned`]) written on the
/// stack: the server writes one on most paid responses, with no `String` to allocate.
pub(crate) struct Compact {
    bytes: [u8; Self::MAX],
    len: usize,
}

impl Compact {
    /// `u1,` and two `u64` in decimal (20 digits at most each) with a comma between.
    const MAX: usize = 3 + 20 + 1 + 20;

    pub(crate) fn new(price: MilliSats, balance: MilliSats) -> Self {
        let mut compact = Self { bytes: [0; Self::MAX], len: 0 };
        let (mut price_digits, mut balance_digits) = (itoa::Buffer::new(), itoa::Buffer::new());
        for part in [
            b"u1,",
            price_digits.format(price.to_msat()).as_bytes(),
            b",",
            balance_digits.format(balance.to_msat()).as_bytes(),
        ] {
            compact.bytes[compact.len..compact.len + part.len()].copy_from_slice(part);
            compact.len += part.len();
        }
        compact
    }

    /// ASCII: `u1,`, digits and a comma.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The tag of the receipt's signed hash (a BIP-0340 style tagged hash: no Bitcoin
/// transaction hash, nor any other use of the key, can collide with it).
const TAG: &[u8] = b"paychan/receipt/v1";

/// The server's signed statement of what one paid request was charged: the channel, the
/// request (method and path), the price charged (net of what a 5xx or an
/// [`ActualCost`](crate::server::ActualCost) gave back), what the payment the request carried
/// pays the server, and the channel's balance afterwards. It is signed with the channel's
/// server key K2, which the client knows from the 2-of-2 script, so the client can verify it
/// and keep it as proof of how it was metered.
///
/// `paid − balance` is what the server had spent of the channel when it answered (its
/// cumulative charge). The client checks it against the prices it accepted.
///
/// On the wire: the `Payment-Receipt` header, base64url (no padding) of the JSON document.
///
/// # Examples
///
/// ```
/// use paychan::MilliSats;
/// use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
/// use paychan::wire::{ChannelId, Receipt};
///
/// let key = SecretKey::from_slice(&[3; 32]).unwrap();
/// let k2 = key.public_key(&Secp256k1::new());
/// let channel: ChannelId = format!("{}:0", "ab".repeat(32)).parse().unwrap();
/// let receipt = Receipt::new(channel, "GET", "/weather?city=Oslo", MilliSats::from_msat(2_000),
///     MilliSats::from_msat(50_000_000), MilliSats::from_msat(49_990_000)).sign(&key);
/// let header = receipt.encode();
/// let read = Receipt::decode(header.as_bytes()).unwrap();
/// assert!(read.verify(&k2).is_ok());
/// assert_eq!(read.spent(), MilliSats::from_msat(10_000));
/// assert!(read.is_for("GET", "/weather?city=Oslo"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Receipt {
    /// The format's version: 1.
    pub v: u8,
    /// The channel charged.
    pub channel: ChannelId,
    /// SHA-256 of `METHOD SP path-and-query`, hex: the request charged.
    pub request: String,
    /// What the request was charged.
    pub price_msat: MilliSats,
    /// What the payment the request carried pays the server.
    pub paid_msat: MilliSats,
    /// The channel's balance after the request.
    pub balance_msat: MilliSats,
    /// The digest (hex) of the receipt the client held when it sent the request
    /// ([`PAYMENT_RECEIPT_PREV`]): each receipt links to the one before, as the client saw
    /// them. Absent when the client sent none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// The server's ECDSA signature (compact, 64 bytes, hex) over [`digest`](Self::digest),
    /// with the channel's server key K2. Empty (absent on the wire) for a receipt the server
    /// left unsigned, to a client that accepts receipts signed in batches
    /// ([`UnsignedReceipts`]): the next signed receipt states the whole spent again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sig: String,
}

/// Why a receipt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReceiptError {
    /// Not base64url JSON of a version-1 receipt, or too long.
    Malformed,
    /// The signature is missing, malformed, or not K2's over this receipt.
    Signature,
}

impl fmt::Display for ReceiptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "the receipt is not a version-1 receipt",
            Self::Signature => "the receipt's signature is not the channel's server key's",
        })
    }
}

impl std::error::Error for ReceiptError {}

/// The longest `Payment-Receipt` value read.
const MAX_RECEIPT_LEN: usize = 2048;

/// SHA-256 of `METHOD SP path-and-query`, hex.
pub fn request_digest(method: &str, path_and_query: &str) -> String {
    let mut engine = sha256::Hash::engine();
    engine.input(method.as_bytes());
    engine.input(b" ");
    engine.input(path_and_query.as_bytes());
    sha256::Hash::from_engine(engine).to_string()
}

impl Receipt {
    /// An unsigned receipt of `method path_and_query` on `channel`.
    pub fn new(
        channel: ChannelId,
        method: &str,
        path_and_query: &str,
        price: MilliSats,
        paid: MilliSats,
        balance: MilliSats,
    ) -> Self {
        Self {
            v: 1,
            channel,
            request: request_digest(method, path_and_query),
            price_msat: price,
            paid_msat: paid,
            balance_msat: balance,
            prev: None,
            sig: String::new(),
        }
    }

    /// The same receipt, linked to the receipt whose digest is `prev`.
    #[must_use]
    pub fn with_prev(mut self, prev: [u8; 32]) -> Self {
        self.prev = Some(prev.to_lower_hex_string());
        self
    }

    /// The digest of [`prev`](Self::prev), when there is a valid one.
    pub fn prev_digest(&self) -> Option<[u8; 32]> {
        <[u8; 32]>::try_from(Vec::<u8>::from_hex(self.prev.as_deref()?).ok()?).ok()
    }

    /// Whether the server signed this receipt ([`sig`](Self::sig) is not empty; whether the
    /// signature verifies is [`verify`](Self::verify)'s answer).
    pub fn is_signed(&self) -> bool {
        !self.sig.is_empty()
    }

    /// What the server had spent of the channel: `paid − balance`.
    pub fn spent(&self) -> MilliSats {
        self.paid_msat.saturating_sub(self.balance_msat)
    }

    /// Whether the receipt is for `method path_and_query`.
    pub fn is_for(&self, method: &str, path_and_query: &str) -> bool {
        self.request == request_digest(method, path_and_query)
    }

    /// The signed hash: `SHA256(SHA256(tag) ‖ SHA256(tag) ‖ message)` with the tag
    /// `paychan/receipt/v1` and the message `txid (32, internal order) ‖ vout (u32 LE) ‖
    /// request (32) ‖ price_msat ‖ paid_msat ‖ balance_msat (u64 LE each)`, followed by
    /// `prev (32)` when the receipt links to a previous one. `None` for a malformed
    /// `request` or `prev`.
    pub fn digest(&self) -> Option<[u8; 32]> {
        let request = <[u8; 32]>::try_from(Vec::<u8>::from_hex(&self.request).ok()?).ok()?;
        let tag = sha256::Hash::hash(TAG);
        let mut engine = sha256::Hash::engine();
        engine.input(tag.as_byte_array());
        engine.input(tag.as_byte_array());
        let outpoint = self.channel.outpoint();
        engine.input(outpoint.txid.as_byte_array());
        engine.input(&outpoint.vout.to_le_bytes());
        engine.input(&request);
        for amount in [self.price_msat, self.paid_msat, self.balance_msat] {
            engine.input(&amount.to_msat().to_le_bytes());
        }
        if self.prev.is_some() {
            engine.input(&self.prev_digest()?);
        }
        Some(sha256::Hash::from_engine(engine).to_byte_array())
    }

    /// Signs the receipt with `key` (the channel's K2).
    pub fn sign(mut self, key: &SecretKey) -> Self {
        if let Some(digest) = self.digest() {
            let signature = crate::channel::sig::sign_ecdsa(&Message::from_digest(digest), key);
            self.sig = signature.serialize_compact().to_lower_hex_string();
        }
        self
    }

    /// Checks the signature against `server_key` (the channel's K2).
    ///
    /// # Errors
    ///
    /// [`ReceiptError::Signature`].
    pub fn verify(&self, server_key: &PublicKey) -> Result<(), ReceiptError> {
        let digest = self.digest().ok_or(ReceiptError::Malformed)?;
        let signature = Vec::<u8>::from_hex(&self.sig)
            .ok()
            .and_then(|bytes| Signature::from_compact(&bytes).ok())
            .ok_or(ReceiptError::Signature)?;
        let message = Message::from_digest(digest);
        match crate::channel::sig::verify_ecdsa(&message, &signature, server_key) {
            true => Ok(()),
            false => Err(ReceiptError::Signature),
        }
    }

    /// The header value: base64url (no padding) of the JSON document.
    ///
    /// Written by hand, byte for byte what `serde_json` writes for this type (a test checks
    /// it): every paid response encodes one, and this is several times faster.
    pub fn encode(&self) -> String {
        use core::fmt::Write as _;
        let plain = |s: &str| s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
        if ![&self.request, &self.sig].into_iter().chain(&self.prev).all(|s| plain(s)) {
            // Characters JSON escapes: only in a receipt read from elsewhere.
            return URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default());
        }
        let mut json = String::with_capacity(320);
        let _ = write!(
            json,
            r#"{{"v":{},"channel":"{}","request":"{}","price_msat":{},"paid_msat":{},"balance_msat":{}"#,
            self.v,
            self.channel,
            self.request,
            self.price_msat.to_msat(),
            self.paid_msat.to_msat(),
            self.balance_msat.to_msat()
        );
        if let Some(prev) = &self.prev {
            let _ = write!(json, r#","prev":"{prev}""#);
        }
        if !self.sig.is_empty() {
            let _ = write!(json, r#","sig":"{}""#, self.sig);
        }
        json.push('}');
        URL_SAFE_NO_PAD.encode(json)
    }

    /// The compact form of an unsigned receipt: `u1,<price_msat>,<balance_msat>`. Everything
    /// else an unsigned receipt states, the client knows: the channel and the payment its
    /// request carried, the request, and the `prev` it named. So the server sends only what
    /// it charged and the balance; [`decode_for`](Self::decode_for) completes the receipt, and
    /// its [`digest`](Self::digest) is the full form's.
    ///
    /// ```
    /// use paychan::MilliSats;
    /// use paychan::wire::{ChannelId, Receipt};
    ///
    /// let channel: ChannelId = format!("{}:0", "ab".repeat(32)).parse().unwrap();
    /// let msat = MilliSats::from_msat;
    /// let value = Receipt::encode_unsigned(msat(2_000), msat(48_000));
    /// assert_eq!(value, "u1,2000,48000");
    /// let read = Receipt::decode_for(value.as_bytes(), channel, ("GET", "/w"), msat(50_000), None).unwrap();
    /// let full = Receipt::new(channel, "GET", "/w", msat(2_000), msat(50_000), msat(48_000));
    /// assert_eq!((read.digest(), read.is_signed()), (full.digest(), false));
    /// ```
    pub fn encode_unsigned(price: MilliSats, balance: MilliSats) -> String {
        String::from_utf8_lossy(Compact::new(price, balance).as_bytes()).into_owned()
    }

    /// Reads a `Payment-Receipt` value in either form, for the request `method path_and_query`
    /// on `channel` that carried a payment of `paid` and named `prev`: the full form
    /// ([`decode`](Self::decode); the caller checks it states these), or the compact form of
    /// an unsigned receipt ([`encode_unsigned`](Self::encode_unsigned)), completed from them.
    ///
    /// # Errors
    ///
    /// [`ReceiptError::Malformed`].
    pub fn decode_for(
        value: &[u8],
        channel: ChannelId,
        (method, path_and_query): (&str, &str),
        paid: MilliSats,
        prev: Option<[u8; 32]>,
    ) -> Result<Self, ReceiptError> {
        let Some(compact) = value.strip_prefix(b"u1,") else { return Self::decode(value) };
        // Two u64 in decimal at most: 20 digits each, no leading zero but a lone `0`.
        if compact.len() > 41 {
            return Err(ReceiptError::Malformed);
        }
        let number = |digits: &[u8]| {
            let text = core::str::from_utf8(digits).ok()?;
            let all_digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            let canonical = all_digits && (text == "0" || !text.starts_with('0'));
            canonical.then(|| text.parse().ok().map(MilliSats::from_msat)).flatten()
        };
        let mut fields = compact.split(|b| *b == b',');
        let (Some(price), Some(balance), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(ReceiptError::Malformed);
        };
        let (price, balance) = number(price).zip(number(balance)).ok_or(ReceiptError::Malformed)?;
        let receipt = Self::new(channel, method, path_and_query, price, paid, balance);
        Ok(match prev {
            Some(prev) => receipt.with_prev(prev),
            None => receipt,
        })
    }

    /// Reads a header value written by [`encode`](Self::encode) (the signature is not
    /// checked: see [`verify`](Self::verify)).
    ///
    /// # Errors
    ///
    /// [`ReceiptError::Malformed`].
    pub fn decode(value: &[u8]) -> Result<Self, ReceiptError> {
        if value.len() > MAX_RECEIPT_LEN {
            return Err(ReceiptError::Malformed);
        }
        let json = URL_SAFE_NO_PAD.decode(value).map_err(|_| ReceiptError::Malformed)?;
        let receipt: Self = serde_json::from_slice(&json).map_err(|_| ReceiptError::Malformed)?;
        if receipt.v != 1 || receipt.digest().is_none() {
            return Err(ReceiptError::Malformed);
        }
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::secp256k1::Secp256k1;

    use super::*;

    fn receipt() -> Receipt {
        let channel: ChannelId = format!("{}:1", "11".repeat(32)).parse().unwrap();
        let msat = MilliSats::from_msat;
        Receipt::new(channel, "GET", "/joke", msat(150_000), msat(2_350_000), msat(550_000))
    }

    #[test]
    fn a_forged_or_altered_receipt_does_not_verify() {
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let k2 = key.public_key(&Secp256k1::new());
        let signed = receipt().sign(&key);
        assert_eq!(signed.verify(&k2), Ok(()));
        let other = SecretKey::from_slice(&[8; 32]).unwrap();
        assert_eq!(receipt().sign(&other).verify(&k2), Err(ReceiptError::Signature));
        assert_eq!(receipt().verify(&k2), Err(ReceiptError::Signature), "unsigned");
        let mut cheaper = signed.clone();
        cheaper.balance_msat = MilliSats::ZERO;
        assert_eq!(cheaper.verify(&k2), Err(ReceiptError::Signature), "altered");
        let mut elsewhere = signed.clone();
        elsewhere.request = request_digest("GET", "/other");
        assert_eq!(elsewhere.verify(&k2), Err(ReceiptError::Signature));
        assert_eq!(Receipt::decode(b"not base64 json"), Err(ReceiptError::Malformed));
        assert_eq!(Receipt::decode(&[b'A'; 4096]), Err(ReceiptError::Malformed));
        assert_eq!(Receipt::decode(signed.encode().as_bytes()), Ok(signed.clone()));
        // A link is signed too: changing it, or garbling it, breaks the receipt.
        let linked = receipt().with_prev([5; 32]).sign(&key);
        assert_eq!(linked.verify(&k2), Ok(()));
        assert_ne!(linked.digest(), signed.digest());
        let mut relinked = linked.clone();
        relinked.prev = Some("06".repeat(32));
        assert_eq!(relinked.verify(&k2), Err(ReceiptError::Signature));
        relinked.prev = Some("zz".into());
        assert_eq!(relinked.verify(&k2), Err(ReceiptError::Malformed));
        assert_eq!(Receipt::decode(linked.encode().as_bytes()), Ok(linked));
    }

    /// An unsigned receipt travels without `sig`, reads back unsigned, and does not verify;
    /// signing it later signs the same digest (the signature is not part of it).
    #[test]
    fn an_unsigned_receipt_has_no_sig_on_the_wire() {
        let unsigned = receipt().with_prev([5; 32]);
        let header = unsigned.encode();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(&header).unwrap()).unwrap();
        assert!(!json.contains("sig"), "{json}");
        let read = Receipt::decode(header.as_bytes()).unwrap();
        assert!(!read.is_signed());
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        assert_eq!(read.verify(&key.public_key(&Secp256k1::new())), Err(ReceiptError::Signature));
        let signed = read.clone().sign(&key);
        assert!(signed.is_signed());
        assert_eq!(signed.digest(), read.digest());
    }

    /// The hand-written encoding is serde_json's, byte for byte, with and without `prev` and
    /// `sig`, and for a receipt whose strings need escaping.
    #[test]
    fn encode_writes_what_serde_json_writes() {
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let serde = |r: &Receipt| URL_SAFE_NO_PAD.encode(serde_json::to_vec(r).unwrap());
        let mut odd = receipt();
        odd.request = "a\"b\\c\u{1}".into();
        for r in [
            receipt(),
            receipt().sign(&key),
            receipt().with_prev([9; 32]),
            receipt().with_prev([9; 32]).sign(&key),
            odd,
        ] {
            assert_eq!(r.encode(), serde(&r), "{r:?}");
        }
    }

    /// The compact form reads exactly two decimal amounts, nothing else.
    #[test]
    fn a_malformed_compact_receipt_is_refused() {
        let channel = receipt().channel;
        let msat = MilliSats::from_msat;
        let long = format!("u1,{}1,2", "0".repeat(100_000));
        for bad in [
            long.as_str(),
            "u1,01,2",
            "u1,1, 2",
            "u1,+1,2",
            "u1,",
            "u1,1",
            "u1,1,",
            "u1,,1",
            "u1,1,2,3",
            "u1,-1,2",
            "u1,1,2x",
            "u1,99999999999999999999,1",
            "u2,1,2",
        ] {
            let read = Receipt::decode_for(bad.as_bytes(), channel, ("GET", "/"), msat(1), None);
            assert_eq!(read, Err(ReceiptError::Malformed), "{bad:?}");
        }
        let read = Receipt::decode_for(b"u1,0,5", channel, ("GET", "/"), msat(5), None).unwrap();
        assert_eq!(
            (read.price_msat, read.balance_msat, read.paid_msat),
            (msat(0), msat(5), msat(5))
        );
    }

    #[test]
    fn the_compact_form_writes_any_amount_and_reads_back() {
        let channel = receipt().channel;
        for (price, balance) in [(0, 0), (1, 9), (10, 1_000_000), (u64::MAX, u64::MAX)] {
            let (price, balance) = (MilliSats::from_msat(price), MilliSats::from_msat(balance));
            let value = Receipt::encode_unsigned(price, balance);
            assert_eq!(value, format!("u1,{},{}", price.to_msat(), balance.to_msat()));
            let read = Receipt::decode_for(value.as_bytes(), channel, ("GET", "/"), balance, None);
            let read = read.unwrap();
            assert_eq!((read.price_msat, read.balance_msat), (price, balance), "{value}");
        }
    }

    #[test]
    fn the_unsigned_header_reads_only_two_decimals() {
        for bad in ["", "3", "3/", "/4", "-1/4", "+1/4", "3/4/5", "0x3/4", "3/99999999999"] {
            assert_eq!(UnsignedReceipts::parse(bad.as_bytes()), None, "{bad:?}");
        }
        let nbsp = "\u{a0}3/4";
        for bad in [&b"4294967296/1"[..], b"1/4294967296", b"\xff/1", b"1 /2", b"1/\t2x"] {
            assert_eq!(UnsignedReceipts::parse(bad), None, "{bad:?}");
        }
        assert_eq!(UnsignedReceipts::parse(nbsp.as_bytes()), None, "only ASCII whitespace");
        let said = |held, max| Some(UnsignedReceipts { held, max });
        assert_eq!(UnsignedReceipts::parse(b" 0/0 "), said(0, 0));
        assert_eq!(UnsignedReceipts::parse(b"\t017/2048"), said(17, 2_048));
        assert_eq!(UnsignedReceipts::parse(b"4294967295/4294967295"), said(u32::MAX, u32::MAX));
        assert!(UnsignedReceipts { held: 0, max: 0 }.must_sign(32), "max 0: every receipt");
    }

    /// The test vector of docs/HTTP.md: key 0x07…07, this receipt, this digest and signature
    /// (RFC 6979 deterministic nonces make the signature reproducible).
    #[test]
    fn the_documented_vector() {
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let signed = receipt().sign(&key);
        let digest = signed.digest().unwrap().to_lower_hex_string();
        let vector: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/receipt-vector.json")).unwrap();
        assert_eq!(vector["digest"], digest);
        assert_eq!(vector["receipt"], serde_json::to_value(&signed).unwrap());
        assert_eq!(vector["header"], signed.encode());
        assert_eq!(signed.request, request_digest("GET", "/joke"));
        // The next receipt, left unsigned (batches), linked to this one.
        let next = vector["next_unsigned"].clone();
        let msat = MilliSats::from_msat;
        let channel = signed.channel;
        let unsigned =
            Receipt::new(channel, "GET", "/joke", msat(150_000), msat(2_350_000), msat(400_000))
                .with_prev(signed.digest().unwrap());
        assert_eq!(next["receipt"], serde_json::to_value(&unsigned).unwrap());
        assert_eq!(next["header"], unsigned.encode());
        assert_eq!(next["digest"], unsigned.digest().unwrap().to_lower_hex_string());
        assert!(!unsigned.is_signed() && next["receipt"].get("sig").is_none());
        // On the wire an unsigned receipt is its compact form, completed by the client.
        assert_eq!(next["compact"], Receipt::encode_unsigned(msat(150_000), msat(400_000)));
        let completed = Receipt::decode_for(
            next["compact"].as_str().unwrap().as_bytes(),
            channel,
            ("GET", "/joke"),
            msat(2_350_000),
            signed.digest(),
        )
        .unwrap();
        assert_eq!(completed, unsigned);
        assert_eq!(next["request_header"], "payment-receipt-unsigned: 0/128");
    }
}
