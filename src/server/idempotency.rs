//! Retries that never pay twice: [`Idempotency`] keeps the first paid response of each
//! `Idempotency-Key` and replays it.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bitcoin::hashes::{Hash, HashEngine, sha256};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::rejection::RejectionKind;
use crate::store::ops::IdempotencyClaim;
use crate::wire::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

/// The longest `Idempotency-Key`.
const MAX_KEY_LEN: usize = 255;

/// How the layer keeps the responses of requests with an `Idempotency-Key` (see
/// [`PaywallLayer::with_idempotency`](super::PaywallLayer::with_idempotency)).
///
/// A priced `POST`, `PUT`, `PATCH` or `DELETE` with an `Idempotency-Key` claims the key on its
/// channel in the same atomic store operation as its debit. The response is kept for
/// [`ttl`](Self::with_ttl) when it is at most [`max_response`](Self::with_max_response) bytes with a
/// known length; a retry with the same key gets it again, marked `Idempotent-Replayed: true`,
/// and pays nothing. A retry while the first request is still being served, or a request that
/// reuses the key with another method, path, `Content-Type`, `Content-Length` or
/// `Content-Digest`, gets **409**. A response that was not kept (too large, or streamed) is
/// never served again: its retry gets 409 `idempotent-response-unavailable`. A request whose
/// charge was given back (a 5xx) releases its key. A claim whose request never finished (the
/// node died) lapses after [`in_progress`](Self::with_in_progress); a retry then runs, and pays,
/// again.
///
/// The layer does not read request bodies: a client that wants the body in the fingerprint
/// sends `Content-Digest` (RFC 9530).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use paychan::server::Idempotency;
///
/// let keep = Idempotency::default().with_ttl(Duration::from_secs(3_600)).with_max_response(64 * 1024);
/// assert_eq!(keep.max_response_len(), 64 * 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Idempotency {
    ttl: Duration,
    max_response: usize,
    in_progress: Duration,
}

impl Default for Idempotency {
    /// Responses kept 24 hours, up to 256 KiB each; claims lapse after 5 minutes.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3_600),
            max_response: 256 * 1024,
            in_progress: Duration::from_secs(300),
        }
    }
}

impl Idempotency {
    /// How long a response is kept for replay.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The largest response body kept, in bytes.
    pub fn with_max_response(mut self, bytes: usize) -> Self {
        self.max_response = bytes;
        self
    }

    /// How long a claim holds while its request is being served.
    pub fn with_in_progress(mut self, lapse: Duration) -> Self {
        self.in_progress = lapse;
        self
    }

    /// The largest response body kept, in bytes.
    pub fn max_response_len(&self) -> usize {
        self.max_response
    }

    /// When a response kept now expires, in milliseconds since the Unix epoch.
    pub(super) fn keep_until(&self) -> u64 {
        now_ms().saturating_add(millis(self.ttl))
    }

    /// The claim `request` makes, if it is an unsafe method with an `Idempotency-Key`.
    ///
    /// # Errors
    ///
    /// [`RejectionKind::IdempotencyKeyInvalid`] for a malformed key.
    pub(super) fn claim<B>(
        &self,
        request: &Request<B>,
        path_and_query: &str,
    ) -> Result<Option<IdempotencyClaim>, RejectionKind> {
        if !matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
        {
            return Ok(None);
        }
        let Some(value) = request.headers().get(IDEMPOTENCY_KEY) else { return Ok(None) };
        let key = parse_key(value).ok_or(RejectionKind::IdempotencyKeyInvalid)?;
        let now = now_ms();
        let fingerprint = fingerprint(request, path_and_query);
        Ok(Some(IdempotencyClaim::new(
            key,
            fingerprint,
            now,
            now.saturating_add(millis(self.in_progress)),
        )))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    crate::store::now_ms()
}

/// The key: 1 to 255 visible ASCII characters, optionally as a structured-field string
/// (`"…"`).
fn parse_key(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?.trim();
    let text = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    let valid = !text.is_empty()
        && text.len() <= MAX_KEY_LEN
        && text.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    valid.then_some(text)
}

/// What identifies a request under its key: SHA-256 of the method, the path and query, and
/// the headers that describe the body.
fn fingerprint<B>(request: &Request<B>, path_and_query: &str) -> [u8; 32] {
    let mut engine = sha256::Hash::engine();
    engine.input(request.method().as_str().as_bytes());
    engine.input(b"\n");
    engine.input(path_and_query.as_bytes());
    for name in ["content-type", "content-length", "content-digest", "repr-digest"] {
        engine.input(b"\n");
        if let Some(value) = request.headers().get(name) {
            engine.input(value.as_bytes());
        }
    }
    sha256::Hash::from_engine(engine).to_byte_array()
}

/// Headers a replay does not repeat: the connection's own, the body's length (the replay
/// sets its own), and the payment's, which described the first request (a replay charges
/// nothing).
const NOT_KEPT: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
    crate::wire::PAYMENT_CHANNEL_BALANCE,
    crate::wire::PAYMENT_RECEIPT,
    crate::wire::PAYMENT_CHANNEL_STREAM,
];

/// A kept response, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    /// 0: served and paid, but not kept.
    status: u16,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: String,
}

/// The stored form of a response that was not kept.
pub(super) fn unavailable() -> Vec<u8> {
    serde_json::to_vec(&Kept { status: 0, headers: Vec::new(), body: String::new() })
        .unwrap_or_default()
}

/// The stored form of a response with `parts` and `body`.
pub(super) fn encode(parts: &http::response::Parts, body: &[u8]) -> Vec<u8> {
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| !NOT_KEPT.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str().to_owned(), STANDARD.encode(value.as_bytes())))
        .collect();
    let kept = Kept { status: parts.status.as_u16(), headers, body: STANDARD.encode(body) };
    serde_json::to_vec(&kept).unwrap_or_default()
}

/// The response `stored` replays, or why there is none.
pub(super) fn replay<B: From<Bytes>>(stored: &[u8]) -> Result<Response<B>, RejectionKind> {
    let kept: Kept =
        serde_json::from_slice(stored).map_err(|_| RejectionKind::IdempotentResponseUnavailable)?;
    let status = StatusCode::from_u16(kept.status)
        .map_err(|_| RejectionKind::IdempotentResponseUnavailable)?;
    let body =
        STANDARD.decode(kept.body).map_err(|_| RejectionKind::IdempotentResponseUnavailable)?;
    let mut response = Response::new(B::from(Bytes::from(body)));
    *response.status_mut() = status;
    for (name, value) in kept.headers {
        let name = HeaderName::try_from(name).ok();
        let value = STANDARD.decode(value).ok().and_then(|v| HeaderValue::try_from(v).ok());
        if let Some((name, value)) = name.zip(value) {
            response.headers_mut().append(name, value);
        }
    }
    response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_up_to_255_characters() {
        let key = |text: &str| parse_key(&HeaderValue::from_str(text).unwrap()).map(str::to_owned);
        assert_eq!(
            key("8e03978e-40d5-43e8-bc93-6894a57f9324").as_deref(),
            Some("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(key("\"abc\"").as_deref(), Some("abc"), "a structured-field string");
        assert_eq!(key(&"k".repeat(255)).map(|k| k.len()), Some(255));
        for bad in ["", "\"\"", "a b", "tab\there", &"k".repeat(256)] {
            assert_eq!(key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_fingerprint_covers_method_path_and_body_description() {
        let request = |method: Method, path: &str, headers: &[(&str, &str)]| {
            let mut request = Request::builder().method(method).uri(path);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request.body(()).unwrap();
            fingerprint(&request, path)
        };
        let base = request(Method::POST, "/a", &[("content-length", "3")]);
        assert_eq!(base, request(Method::POST, "/a", &[("content-length", "3"), ("x-other", "1")]));
        for other in [
            request(Method::PUT, "/a", &[("content-length", "3")]),
            request(Method::POST, "/a?x=1", &[("content-length", "3")]),
            request(Method::POST, "/a", &[("content-length", "4")]),
            request(
                Method::POST,
                "/a",
                &[("content-length", "3"), ("content-digest", "sha-256=:x:")],
            ),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_kept_response_replays_byte_for_byte() {
        let response = Response::builder()
            .status(StatusCode::CREATED)
            .header("x-one", "1")
            .header("x-two", HeaderValue::from_bytes(b"\xff\xfe").unwrap())
            .body(())
            .unwrap();
        let (parts, ()) = response.into_parts();
        let stored = encode(&parts, b"\x00binary");
        let replayed: Response<Bytes> = replay(&stored).unwrap();
        assert_eq!(replayed.status(), StatusCode::CREATED);
        assert_eq!(replayed.headers()["x-two"].as_bytes(), b"\xff\xfe");
        assert_eq!(replayed.headers()[IDEMPOTENT_REPLAYED], "true");
        assert_eq!(replayed.body().as_ref(), b"\x00binary");
        assert_eq!(
            replay::<Bytes>(&unavailable()).unwrap_err(),
            RejectionKind::IdempotentResponseUnavailable
        );
        assert_eq!(
            replay::<Bytes>(b"garbage").unwrap_err(),
            RejectionKind::IdempotentResponseUnavailable
        );
    }
}
