//! The browser demo's server: a paid JSON API, the channel negotiation, the settlement task,
//! an Esplora-compatible chain view, and the page with the browser client. Shared by the
//! example (`main.rs`) and the end-to-end test in Chromium (`tests/browser.rs`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use paychan::bitcoin::bip32::Xpriv;
use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
use paychan::bitcoin::{CompressedPublicKey, Network, ScriptBuf};
use paychan::chain::{ChainBackend, ChainError};
use paychan::server::Paid;
use paychan::server::{RoutePrices, StreamMeter, chain_view};
use paychan::store::MemoryStore;
use paychan::wire::ChannelId;
use paychan::{Merchant, MilliSats, Started};
use serde_json::{Value, json};

/// What one API call costs: 5 sat.
pub(crate) const PRICE: MilliSats = MilliSats::from_msat(5_000);

/// What one media request costs: 10 sat, for the two seconds of audio it is answered with
/// (5 sat a second). More than the first payment's 294 sat covers within two minutes: a
/// listener's channel is topped up as it plays.
pub(crate) const CHUNK: MilliSats = MilliSats::from_msat(10_000);

/// The seconds of audio in one answer (two: a media element asks half as often as for one,
/// and a reloaded page has its metadata sooner).
const CHUNK_SECONDS: u32 = 2;

/// What one event of the metered stream `GET /api/ticker` costs, and its price up front: 1 sat.
pub(crate) const TICK: MilliSats = MilliSats::from_msat(1_000);

/// The demo server on `chain` (regtest), serving the browser client's files from `web`
/// (the repository's `web/` folder, with `pkg/` built by `web/build.sh`), and its merchant
/// (whose settlement task runs until it is stopped).
pub(crate) async fn app<C: ChainBackend + Clone + 'static>(
    chain: C,
    web: PathBuf,
) -> Result<(Router, Started<MemoryStore, RoutePrices>), ChainError> {
    let prices = RoutePrices::new()
        .route(http::Method::GET, "/api/fortune", PRICE)
        .route(http::Method::GET, "/api/ticker", TICK)
        .route(http::Method::GET, "/media/{*file}", CHUNK);
    let master = Xpriv::new_master(Network::Regtest, b"paychan browser demo master seed")
        .expect("a 32-byte seed");
    let payout_key = SecretKey::from_slice(&[0x33; 32]).expect("a demo key");
    let payout = CompressedPublicKey(payout_key.public_key(&Secp256k1::new()));
    let paid = Merchant::new(
        Network::Regtest,
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain.clone(),
    )
    .with_cpfp_key(payout_key)
    .with_prices(prices.describe())
    .with_intervals(Duration::from_millis(500), Duration::from_secs(5))
    .start(prices)
    .await?;
    let files = Router::new()
        .route("/", get(|State(web): State<PathBuf>| file(web, "demo/index.html")))
        .route("/js/{name}", get(|State(web), Path(name): Path<String>| js(web, name)))
        .route("/listen", get(|State(web): State<PathBuf>| file(web, "demo/listen.html")))
        .route("/pkg/{name}", get(|State(web), Path(name): Path<String>| pkg(web, name)))
        .with_state(web);
    // The layer serves the negotiation endpoints and meters `/api/fortune`; the page, the
    // client's files and the chain view are not in the price table: free (`Unlisted::Free`).
    let router = Router::new()
        .route("/api/fortune", get(fortune))
        .route("/api/ticker", get(ticker))
        .route("/media/tone.wav", {
            let pacing = Pacing::default();
            get(move |paid: Paid, headers: HeaderMap| tone(pacing.clone(), paid, headers))
        })
        .merge(files)
        .nest("/chain", chain_view(chain, Network::Regtest))
        // A fallback of its own, so that the layer (applied to the routes there are) also
        // sees the paths no route has: its negotiation endpoints.
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(paid.layer());
    Ok((router, paid))
}

const FORTUNES: [&str; 5] = [
    "A satoshi saved is a satoshi earned.",
    "You will pay exactly for what you use.",
    "The refund is signed before the funding: sleep well.",
    "Small channels, small worries.",
    "Every request is a receipt of trust.",
];

async fn fortune(paid: Paid) -> Json<Value> {
    let n = (paid.balance.to_msat() / PRICE.to_msat()) as usize % FORTUNES.len();
    Json(json!({
        "fortune": FORTUNES[n],
        "charged_msat": paid.price,
        "balance_msat": paid.balance,
    }))
}

/// `GET /api/ticker?n=N`: a metered SSE stream of `N` events (at most 10 000), [`TICK`] each,
/// every event debited before it is sent; when the balance runs out the stream asks for a
/// top-up in band (`payment-required`) and holds; it ends with its signed receipt.
async fn ticker(
    meter: StreamMeter,
    uri: http::Uri,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let n = uri
        .query()
        .and_then(|q| q.strip_prefix("n="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10u32)
        .min(10_000);
    let events = futures_util::stream::iter(0..n)
        .map(|tick| Ok(Event::default().data(format!("{{\"tick\":{tick}}}"))));
    Sse::new(meter.sse(events, TICK))
}

async fn js(web: PathBuf, name: String) -> Response {
    match name.as_str() {
        "paychan.js" | "paychan.d.ts" | "qr.js" | "qr.d.ts" => {
            file(web, &format!("js/{name}")).await
        }
        // Served from /js/ but controls the whole origin (registered with `scope: '/'`).
        "paychan-sw.js" => {
            let mut response = file(web, "js/paychan-sw.js").await;
            response.headers_mut().insert("service-worker-allowed", HeaderValue::from_static("/"));
            response
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn pkg(web: PathBuf, name: String) -> Response {
    match name.as_str() {
        "paychan_web.js" | "paychan_web_bg.wasm" | "paychan_web.d.ts" => {
            file(web, &format!("pkg/{name}")).await
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A file of the `web/` folder, by a name from the fixed lists above (no path from the
/// request reaches the file system).
async fn file(web: PathBuf, name: &str) -> Response {
    // Small files, read whole: a demo, not a file server.
    let kind = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        _ => "text/plain; charset=utf-8",
    };
    match std::fs::read(web.join(name)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-store")], bytes)
            .into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            format!("{name} is missing: build the browser client first (bash web/build.sh)"),
        )
            .into_response(),
    }
}

/// The audio: 8 kHz, 8-bit mono PCM (8 000 bytes a second), two minutes of a tune made here.
const RATE: u32 = 8_000;
const SECONDS: u32 = 120;
const WAV_HEADER: u32 = 44;
const WAV_LEN: u32 = WAV_HEADER + RATE * SECONDS;

/// How far ahead of real time a channel's audio is served at once: a media element buffers as
/// fast as it is answered, and a listener should pay for what it hears, not for the whole file.
/// Chromium reads about 24 s of this WAV before it says the metadata is loaded (measured: it
/// asks second after second from the start): a shorter lead held a reloaded page for 12 s.
const AHEAD_SECONDS: u32 = 28;

/// Per channel, the second of audio its stream started at and when: after the first
/// `AHEAD_SECONDS`, seconds are served at twice real time (at real time exactly, Chromium waits
/// for a long buffer before it plays). A seek (backwards, or more than 8 s forwards) starts
/// the clock again, and answers at once the requests still held for the stream before it (a
/// page that reloaded left them behind; held, they would keep the browser's connections to
/// the server busy and the new page waiting).
#[derive(Clone, Default)]
struct Pacing(Arc<Mutex<HashMap<ChannelId, Paced>>>);

/// A channel's stream: when it (re)started, at which second, the last second asked, and what
/// wakes the requests held for it when a seek starts another.
struct Paced {
    origin: Instant,
    first: u32,
    last: u32,
    restarted: Arc<tokio::sync::Notify>,
}

impl Pacing {
    /// When second `k` of `channel`'s stream may be served, and what says the stream was
    /// restarted meanwhile (created under the lock: a restart right after is not missed).
    fn due(&self, channel: ChannelId, k: u32) -> (Instant, tokio::sync::futures::OwnedNotified) {
        let mut streams = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if streams.len() > 10_000 {
            streams.clear(); // a demo's bound on memory
        }
        let now = Instant::now();
        let fresh = || Paced { origin: now, first: k, last: k, restarted: Arc::default() };
        let paced = streams.entry(channel).or_insert_with(fresh);
        if k < paced.last || k > paced.last + 8 {
            paced.restarted.notify_waiters();
            *paced = fresh();
            return (now, Arc::clone(&paced.restarted).notified_owned());
        }
        paced.last = k;
        let ahead = (k - paced.first).saturating_sub(AHEAD_SECONDS);
        let due = paced.origin + Duration::from_millis(u64::from(ahead) * 500);
        (due, Arc::clone(&paced.restarted).notified_owned())
    }
}

/// `GET /media/tone.wav`: two seconds of audio per request, whatever range is asked: a 206 for
/// the asked range cut to 16 000 bytes, so a media element asks again as it plays, and each
/// request ([`CHUNK`]) is paid; paced to real time ([`Pacing`]). Without a `Range` header:
/// 416 (a media element always sends one).
async fn tone(pacing: Pacing, paid: Paid, headers: HeaderMap) -> Response {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(parse_range);
    let Some((start, end)) = range.filter(|(start, _)| *start < WAV_LEN) else {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{WAV_LEN}"))],
            "ask for a byte range (Range: bytes=0-): each answer is one paid second",
        )
            .into_response();
    };
    let end = end.unwrap_or(WAV_LEN - 1).min(WAV_LEN - 1).min(start + CHUNK_SECONDS * RATE - 1);
    let (due, restarted) = pacing.due(paid.channel, start / RATE);
    tokio::select! {
        () = tokio::time::sleep_until(due.into()) => {}
        () = restarted => {}
    }
    let bytes: Vec<u8> = (start..=end).map(wav_byte).collect();
    (
        StatusCode::PARTIAL_CONTENT,
        [
            (header::CONTENT_TYPE, "audio/wav".to_owned()),
            (header::ACCEPT_RANGES, "bytes".to_owned()),
            (header::CONTENT_RANGE, format!("bytes {start}-{end}/{WAV_LEN}")),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        bytes,
    )
        .into_response()
}

/// `bytes=a-` or `bytes=a-b` (one range; anything else is not understood).
fn parse_range(value: &str) -> Option<(u32, Option<u32>)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = if end.trim().is_empty() { None } else { Some(end.trim().parse().ok()?) };
    if end.is_some_and(|end| end < start) {
        return None;
    }
    Some((start, end))
}

/// Byte `i` of the WAV file: the RIFF header, then the samples.
fn wav_byte(i: u32) -> u8 {
    if i < WAV_HEADER {
        let data = RATE * SECONDS;
        let mut header = Vec::with_capacity(44);
        header.extend_from_slice(b"RIFF");
        header.extend_from_slice(&(36 + data).to_le_bytes());
        header.extend_from_slice(b"WAVEfmt ");
        header.extend_from_slice(&16u32.to_le_bytes());
        header.extend_from_slice(&1u16.to_le_bytes()); // PCM
        header.extend_from_slice(&1u16.to_le_bytes()); // mono
        header.extend_from_slice(&RATE.to_le_bytes());
        header.extend_from_slice(&RATE.to_le_bytes()); // bytes per second
        header.extend_from_slice(&1u16.to_le_bytes()); // block align
        header.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
        header.extend_from_slice(b"data");
        header.extend_from_slice(&data.to_le_bytes());
        return header[i as usize];
    }
    // A pentatonic tune, one note a second, with a soft attack and decay.
    const NOTES: [f64; 8] = [261.63, 293.66, 329.63, 392.0, 440.0, 392.0, 329.63, 293.66];
    let n = i - WAV_HEADER;
    let (second, at) = (n / RATE, f64::from(n % RATE) / f64::from(RATE));
    let freq = NOTES[(second as usize) % NOTES.len()];
    let envelope = (at * 20.0).min(1.0) * (1.0 - at).powf(0.7);
    let t = f64::from(n) / f64::from(RATE);
    let sample = (2.0 * std::f64::consts::PI * freq * t).sin() * 0.5 * envelope;
    (128.0 + sample * 127.0).round().clamp(0.0, 255.0) as u8
}
