//! The webhook (`[events] webhook_url`): every line of the event log POSTed, in order, signed
//! with HMAC-SHA256, retried with capped exponential backoff until the receiver answers 2xx.
//!
//! A cursor file next to the log (`<log>.cursor`) holds how far the log has been delivered;
//! it is written (and renamed into place) after each 2xx. Delivery is **at least once**: a
//! crash between the 2xx and the cursor's write sends that event again, with the same id.
//! Receivers dedupe by `id` (or `Paychan-Event-Id`).
//!
//! Only the log's **synced** length is read (the event log publishes it after each fsync):
//! a line written but not yet on disk, which a failed sync or a power loss can take back, is
//! never sent. A cursor beyond the log at start (its tail lost in a crash, or the log
//! replaced) restarts delivery at the log's end, with a warning: the events lost are written
//! again by the next pass, with the same ids, and sent again (at least once).
//!
//! The signature, `Paychan-Signature: t=<unix seconds>,v1=<hex>`, is
//! `HMAC-SHA256(secret, "<t>.<body>")`: the receiver recomputes it over the raw body, compares
//! in constant time, and refuses a `t` too far from its clock (a replay).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use http_body_util::Full;
use paychan::bitcoin::hashes::{Hash as _, HashEngine as _, hmac, sha256};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::Notify;

use crate::events::unix_now;
use crate::{Error, net};

/// The signature header.
pub(crate) const SIGNATURE: &str = "paychan-signature";
/// The event's id, as in the body.
pub(crate) const EVENT_ID: &str = "paychan-event-id";

/// The first retry waits this long; each next one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// `Paychan-Signature`'s value for `body` sent at `t` (Unix seconds).
pub(crate) fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut engine = hmac::HmacEngine::<sha256::Hash>::new(secret);
    engine.input(format!("{t}.").as_bytes());
    engine.input(body);
    format!("t={t},v1={}", hmac::Hmac::from_engine(engine))
}

/// The deliverer: the log's lines from the cursor on, one POST each.
pub(crate) struct Webhook {
    url: Uri,
    secret: Vec<u8>,
    log: PathBuf,
    cursor: PathBuf,
    /// The log's synced length ([`crate::events::EventLog::synced`]): read no further.
    synced: Arc<AtomicU64>,
    client: net::HttpClient<Full<Bytes>>,
    /// Woken by the reconciler after an append; the log is also read every `interval`.
    appended: Arc<Notify>,
    interval: Duration,
    metrics: crate::events::Metrics,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &shown(&self.url))
            .field("secret", &"<redacted>")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// `url` as logged and printed: webhook URLs often carry a secret (a token in the path or the
/// query, a password), so only the scheme and host are shown ([`crate::redact`] on them).
pub(crate) fn shown(url: &Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("http");
    let host = url.authority().map_or("", http::uri::Authority::as_str);
    let rest = url.path_and_query().map_or("", |p| p.as_str());
    let rest = if rest.is_empty() || rest == "/" { rest } else { "/…" };
    format!("{}{rest}", crate::redact(&format!("{scheme}://{host}")))
}

/// Where the delivery of the log at `log` stands.
fn cursor_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".cursor");
    PathBuf::from(name)
}

impl Webhook {
    /// The deliverer of `log`, whose synced length is `synced`; a cursor beyond it (the log
    /// cut by a crash) is moved back to it, with a warning.
    pub(crate) fn new(
        url: Uri,
        secret: Vec<u8>,
        log: PathBuf,
        synced: Arc<AtomicU64>,
        appended: Arc<Notify>,
        interval: Duration,
    ) -> Result<Self, Error> {
        let cursor = cursor_path(&log);
        let client = net::client(&[])?;
        let metrics = crate::events::Metrics::default();
        let webhook =
            Self { url, secret, log, cursor, synced, client, appended, interval, metrics };
        let length = webhook.synced.load(Ordering::Acquire);
        if let Ok(delivered) = webhook.read_cursor()
            && delivered > length
        {
            let (log, cursor) = (webhook.log.display(), webhook.cursor.display());
            let reason = "webhook: the cursor is beyond the log (its end lost in a crash, or \
                          the log replaced): delivery restarts at the log's end; events \
                          written again are sent again, with the same ids";
            tracing::warn!(%log, %cursor, delivered, length, "{reason}");
            webhook.write_cursor(length)?;
        }
        Ok(webhook)
    }

    /// Counts deliveries, failures and what waits in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: crate::events::Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The byte offset of the first undelivered line (0 without a cursor file).
    fn read_cursor(&self) -> Result<u64, Error> {
        match std::fs::read_to_string(&self.cursor) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|e| format!("{}: not a byte offset ({e})", self.cursor.display()).into()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(error) => Err(format!("{}: {error}", self.cursor.display()).into()),
        }
    }

    /// Records that the log is delivered up to `offset`: a new file renamed over the old.
    fn write_cursor(&self, offset: u64) -> Result<(), Error> {
        use std::io::Write as _;
        let fresh = self.cursor.with_extension("cursor.new");
        let mut file = std::fs::File::create(&fresh)?;
        writeln!(file, "{offset}")?;
        file.sync_data()?;
        std::fs::rename(&fresh, &self.cursor)?;
        Ok(())
    }

    /// The complete lines of the log from `offset` to its synced length.
    async fn lines_from(&self, offset: u64) -> Result<Vec<Bytes>, Error> {
        let mut file = match tokio::fs::File::open(&self.log).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let length = self.synced.load(Ordering::Acquire);
        if offset > length {
            return Err(format!(
                "{} says {offset} bytes were delivered, but {} has {length}: was the log \
                 replaced? Fix or remove the cursor",
                self.cursor.display(),
                self.log.display()
            )
            .into());
        }
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        let mut text = Vec::new();
        file.take(length - offset).read_to_end(&mut text).await?;
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |end| end + 1);
        let text = Bytes::from(text).slice(..complete);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(end) = text[start..].iter().position(|b| *b == b'\n') {
            lines.push(text.slice(start..start + end));
            start += end + 1;
        }
        Ok(lines)
    }

    /// POSTs one event; `Ok` on a 2xx.
    async fn post(&self, body: Bytes) -> Result<(), String> {
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|event| event.get("id")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        let request = http::Request::post(self.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, concat!("paychan/", env!("CARGO_PKG_VERSION")))
            .header(SIGNATURE, signature(&self.secret, unix_now(), &body))
            .header(EVENT_ID, id)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(ATTEMPT_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("answered {}", response.status())),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
        }
    }

    /// Delivers the log, forever: each line until a 2xx, in order.
    pub(crate) async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let before = self.read_cursor().ok();
            match self.deliver().await.map_err(|error| error.to_string()) {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    tokio::select! {
                        () = self.appended.notified() => {}
                        () = tokio::time::sleep(self.interval) => {}
                    }
                }
                Err(error) => {
                    // An event that went through since the last failure: the next one's
                    // retries start again from the first wait.
                    if self.read_cursor().ok() != before {
                        backoff = FIRST_BACKOFF;
                    }
                    let url = shown(&self.url);
                    tracing::warn!(%error, %url, retry_in = ?backoff, "webhook: delivery failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Delivers every complete line after the cursor; stops at the first failure.
    async fn deliver(&self) -> Result<(), Error> {
        let mut offset = self.read_cursor()?;
        let lines = self.lines_from(offset).await?;
        self.metrics.pending.set(i64::try_from(lines.len()).unwrap_or(i64::MAX));
        for line in lines {
            offset += line.len() as u64 + 1;
            if let Err(error) = self.post(line).await {
                self.metrics.failures.inc();
                return Err(error.into());
            }
            self.write_cursor(offset)?;
            self.metrics.delivered.inc();
            self.metrics.pending.dec();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};

    /// What the receiver saw: each attempt's event id and whether its signature held.
    #[derive(Default)]
    struct Received {
        attempts: Mutex<Vec<(String, bool)>>,
    }

    /// Checks the signature as a receiver would (the docs' recipe); answers 500 to the first
    /// attempt of every event, 200 to the next.
    async fn receive(
        State(received): State<Arc<Received>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let header = headers[SIGNATURE].to_str().unwrap();
        let (t, v1) = header.split_once(',').unwrap();
        let t: u64 = t.strip_prefix("t=").unwrap().parse().unwrap();
        let expected = signature(b"whsec-test-secret", t, &body);
        let valid = expected.split_once(",v1=").unwrap().1 == v1.strip_prefix("v1=").unwrap();
        let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let id = event["id"].as_str().unwrap().to_owned();
        assert_eq!(headers[EVENT_ID], id.as_str());
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        let mut attempts = received.attempts.lock().unwrap();
        let first = !attempts.iter().any(|(seen, _)| *seen == id);
        attempts.push((id, valid));
        if first {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        StatusCode::OK
    }

    #[test]
    fn the_url_is_shown_without_its_secrets() {
        for (url, expected) in [
            ("https://billing.example/", "https://billing.example/"),
            (
                "https://u:pw@billing.example:8443/hook/T0K3N?key=s3cr3t",
                "https://u:…@billing.example:8443/…",
            ),
        ] {
            let url: Uri = url.parse().unwrap();
            assert_eq!(shown(&url), expected);
            let debug = format!(
                "{:?}",
                Webhook::new(
                    url,
                    Vec::new(),
                    "x".into(),
                    Arc::default(),
                    Arc::default(),
                    Duration::ZERO
                )
                .unwrap()
            );
            assert!(!debug.contains("T0K3N") && !debug.contains("pw@"), "{debug}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut engine = hmac::HmacEngine::<sha256::Hash>::new(b"Jefe");
        engine.input(b"what do ya want for nothing?");
        assert_eq!(
            hmac::Hmac::<sha256::Hash>::from_engine(engine).to_string(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let signed = signature(b"Jefe", 1_700_000_000, b"{}");
        let mut engine = hmac::HmacEngine::<sha256::Hash>::new(b"Jefe");
        engine.input(b"1700000000.{}");
        assert_eq!(signed, format!("t=1700000000,v1={}", hmac::Hmac::from_engine(engine)));
        assert_ne!(signed, signature(b"Jeff", 1_700_000_000, b"{}"));
    }

    #[tokio::test]
    async fn events_are_signed_retried_and_delivered_in_order_once() {
        let dir = std::env::temp_dir().join(format!("paychan-webhook-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("events.jsonl");
        let lines = ["{\"id\":\"a\",\"n\":1}", "{\"id\":\"b\",\"n\":2}"];
        // The second line is followed by half of a third, cut by a crash: not sent.
        std::fs::write(&log, format!("{}\n{}\n{{\"id\":\"c", lines[0], lines[1])).unwrap();
        let received = Arc::new(Received::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Uri = format!("http://{}/hook", listener.local_addr().unwrap()).parse().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&received));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let webhook = |synced_len: usize| {
            let (notify, synced) = (Arc::new(Notify::new()), Arc::new(AtomicU64::new(0)));
            synced.store(synced_len as u64, Ordering::Release);
            let secret = b"whsec-test-secret".to_vec();
            let day = Duration::from_secs(3600);
            let webhook = Webhook::new(url.clone(), secret, log.clone(), synced, notify, day);
            webhook.unwrap()
        };
        // What `run` does between its waits: deliver until the first failure. Only the synced
        // length is read: b, written but not yet synced, waits.
        let a_len = lines[0].len() + 1;
        let deliverer = webhook(a_len);
        assert!(deliverer.deliver().await.is_err(), "a: 500");
        deliverer.deliver().await.unwrap();
        assert_eq!(received.attempts.lock().unwrap().len(), 2, "a: 200; b not synced");
        deliverer.synced.store((a_len + lines[1].len() + 1) as u64, Ordering::Release);
        assert!(deliverer.deliver().await.is_err(), "b: 500");
        deliverer.deliver().await.unwrap();
        let attempts = received.attempts.lock().unwrap().clone();
        let expected = [("a", true), ("a", true), ("b", true), ("b", true)];
        let attempts: Vec<(&str, bool)> =
            attempts.iter().map(|(id, v)| (id.as_str(), *v)).collect();
        assert_eq!(attempts, expected, "each event refused once, then accepted, in order");
        let cursor = std::fs::read_to_string(cursor_path(&log)).unwrap();
        assert_eq!(cursor.trim(), (lines[0].len() + lines[1].len() + 2).to_string());
        // A restarted deliverer sends nothing that was accepted.
        let whole = std::fs::metadata(&log).unwrap().len() as usize;
        webhook(whole).deliver().await.unwrap();
        assert_eq!(received.attempts.lock().unwrap().len(), 4);
        // The log's end lost in a crash (b gone): the cursor goes back to the log's end, and
        // b written again is sent again, with its id.
        let deliverer = webhook(a_len);
        assert_eq!(deliverer.read_cursor().unwrap(), a_len as u64);
        deliverer.synced.store((a_len + lines[1].len() + 1) as u64, Ordering::Release);
        assert!(deliverer.deliver().await.is_ok(), "b again: 200");
        assert_eq!(received.attempts.lock().unwrap().last().unwrap().0, "b");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
