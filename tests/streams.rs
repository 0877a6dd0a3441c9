//! Metered streams driven in process, where "sent" is exact: a unit is debited when the body
//! is polled for it. Streams cut at every point, a stream that runs out (in-band event, hold,
//! end), a top-up during the hold, concurrent streams on one channel on every store, the
//! payment endpoint, and shadow mode.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use bytes::Bytes;
use common::Setup;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use paychan::MilliSats;
use paychan::server::{PaywallLayer, RoutePrices, StreamMeter};
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::TOP_UP_EVENT;
use paychan::wire::{self, ChannelId, PaymentAnswer, Problem, ProblemCode, StreamUnit};
use tower::ServiceExt;

/// The price of a stream up front.
const PROMPT: MilliSats = MilliSats::from_msat(300_000);
/// The price of each SSE event.
const UNIT: MilliSats = MilliSats::from_msat(10_000);
/// The price of each KiB of a byte stream, and its chunks.
const PER_KIB: MilliSats = MilliSats::from_msat(1_000);
const CHUNK: usize = 1_000;
const CHUNKS: usize = 6;
/// Events in a stream, unless the query says `n=`.
const EVENTS: usize = 5;

fn count(uri: &Uri, default: usize) -> usize {
    uri.query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(default)
}

/// `/tokens?n=N` (SSE, [`UNIT`] per event) and `/bytes?n=N` (chunks of [`CHUNK`] bytes,
/// [`PER_KIB`]), both [`PROMPT`] up front, on `store`, holding `hold` for a top-up.
fn app<S: ChannelStore + Clone>(store: S, setup: &Setup, hold: Duration) -> Router {
    let (tip_tx, tip) = tokio::sync::watch::channel(setup.tip());
    std::mem::forget(tip_tx); // the tip stays where it is for the test's life
    let prices = RoutePrices::new().route(Method::GET, "/tokens", PROMPT).route(
        Method::GET,
        "/bytes",
        PROMPT,
    );
    Router::new()
        .route(
            "/tokens",
            get(|meter: StreamMeter, uri: Uri| async move {
                let events = (0..count(&uri, EVENTS))
                    .map(|i| Ok::<_, Infallible>(Event::default().data(i.to_string())));
                Sse::new(meter.sse(futures_util::stream::iter(events), UNIT))
            }),
        )
        .route(
            "/bytes",
            get(|meter: StreamMeter, uri: Uri| async move {
                let chunks = (0..count(&uri, CHUNKS))
                    .map(|i| Ok::<_, Infallible>(Bytes::from(vec![i as u8; CHUNK])));
                Body::from_stream(meter.bytes(futures_util::stream::iter(chunks), PER_KIB))
            }),
        )
        .layer(PaywallLayer::new(store, prices, tip).with_stream_hold(hold))
}

/// A channel in `store` whose best payment pays `paid_sat`; its payment headers.
async fn channel<S: ChannelStore>(store: &S, setup: &Setup, paid_sat: u64) -> ChannelId {
    let record = ChannelRecord::open(setup.channel.clone(), 0, setup.pay(paid_sat));
    let id = record.id();
    store.create(record).await.unwrap();
    id
}

fn get_paid(path: &str, header: &str) -> Request<Body> {
    Request::get(path).header(wire::PAYMENT_CHANNEL, header).body(Body::empty()).unwrap()
}

async fn spent<S: ChannelStore>(store: &S, id: ChannelId) -> MilliSats {
    store.load(id).await.unwrap().unwrap().spent
}

/// What `bytes` bytes cost at [`PER_KIB`], computed here from the definition.
fn bytes_cost(bytes: usize) -> MilliSats {
    MilliSats::from_msat((bytes as u64 * PER_KIB.to_msat()).div_ceil(1024))
}

/// The SSE events of `text`: (event name, data).
fn events(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            let field = |name: &str| {
                block.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().to_owned()
            };
            (field("event: "), field("data: "))
        })
        .collect()
}

#[tokio::test]
async fn every_cut_of_an_sse_stream_charges_exactly_the_events_sent() {
    let setup = Setup::new();
    setup.open();
    // Cut after k events, for every k: before the first, in the middle, after the last, and
    // read to the end.
    for k in 0..=EVENTS + 1 {
        let store = MemoryStore::new();
        let id = channel(&store, &setup, 1_000).await;
        let app = app(store.clone(), &setup, Duration::from_millis(50));
        let header = wire::encode_payment(&setup.pay(1_000));
        let response = app.oneshot(get_paid("/tokens", &header)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let unit = response.headers()[wire::PAYMENT_CHANNEL_STREAM].to_str().unwrap();
        assert_eq!(unit.parse::<StreamUnit>(), Ok(StreamUnit::Event(UNIT)));
        assert_eq!(spent(&store, id).await, PROMPT, "only the price up front before any event");
        let mut body = response.into_body();
        let mut received = 0;
        for _ in 0..k {
            match body.frame().await {
                Some(frame) => received += usize::from(frame.unwrap().is_data()),
                None => break,
            }
        }
        drop(body); // the client leaves
        assert_eq!(received, k.min(EVENTS));
        let expected = PROMPT.checked_add(UNIT.checked_mul(received as u64).unwrap()).unwrap();
        assert_eq!(spent(&store, id).await, expected, "cut after {k} events");
    }
}

#[tokio::test]
async fn every_cut_of_a_byte_stream_charges_exactly_the_bytes_sent() {
    let setup = Setup::new();
    setup.open();
    for k in 0..=CHUNKS {
        let store = MemoryStore::new();
        let id = channel(&store, &setup, 1_000).await;
        let app = app(store.clone(), &setup, Duration::from_millis(50));
        let header = wire::encode_payment(&setup.pay(1_000));
        let response = app.oneshot(get_paid("/bytes", &header)).await.unwrap();
        assert_eq!(response.headers()[wire::PAYMENT_CHANNEL_STREAM], "bytes; per-kib=1000");
        let mut body = response.into_body();
        let mut received = 0;
        for _ in 0..k {
            received += body.frame().await.unwrap().unwrap().into_data().unwrap().len();
        }
        drop(body);
        assert_eq!(received, k * CHUNK);
        // Charged on the running total, rounded up once: never a rounding per chunk.
        let expected = PROMPT.checked_add(bytes_cost(received)).unwrap();
        assert_eq!(spent(&store, id).await, expected, "cut after {k} chunks");
    }
}

#[tokio::test]
async fn a_stream_out_of_balance_says_so_in_band_and_ends_after_the_hold() {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    // 320 sat: the price up front and two events.
    let id = channel(&store, &setup, 320).await;
    let app = app(store.clone(), &setup, Duration::from_millis(50));
    let header = wire::encode_payment(&setup.pay(320));
    let response = app.clone().oneshot(get_paid("/tokens", &header)).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let events = events(std::str::from_utf8(&body).unwrap());
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[..2], [("".into(), "0".into()), ("".into(), "1".into())]);
    assert_eq!(events[2].0, TOP_UP_EVENT);
    let problem: Problem = serde_json::from_str(&events[2].1).unwrap();
    assert_eq!(problem.code, ProblemCode::InsufficientBalance);
    assert_eq!(problem.price_msat, Some(UNIT), "the top-up event quotes the unit's price");
    let snapshot = problem.channel.unwrap();
    assert_eq!(snapshot.channel, id);
    assert_eq!(snapshot.spent_msat, MilliSats::from_msat(320_000));
    assert_eq!(snapshot.min_server_amount_sat, Some(bitcoin::Amount::from_sat(330)));
    assert_eq!(spent(&store, id).await, MilliSats::from_msat(320_000), "nothing unpaid was sent");

    // A byte stream cannot say so in band: it is cut (an error, not an end), all paid for.
    let store = MemoryStore::new();
    let id = channel(&store, &setup, 302).await; // the price up front and 2 000 bytes
    let app = self::app(store.clone(), &setup, Duration::from_millis(50));
    let response = app.oneshot(get_paid("/bytes", &wire::encode_payment(&setup.pay(302)))).await;
    let mut body = response.unwrap().into_body();
    let mut received = 0;
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().unwrap().len(),
            Some(Err(error)) => break error,
            None => panic!("a cut byte stream must not end as if complete"),
        }
    };
    assert!(error.to_string().to_lowercase().contains("insufficient"), "{error}");
    assert!(
        received > 0
            && bytes_cost(received).checked_add(PROMPT).unwrap() <= MilliSats::from_msat(302_000)
    );
    assert_eq!(received, 2 * CHUNK, "2 sat pay for two chunks of 1 000 bytes");
    assert_eq!(spent(&store, id).await, PROMPT.checked_add(bytes_cost(received)).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_during_the_hold_resumes_the_stream() {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    let id = channel(&store, &setup, 320).await;
    let app = app(store.clone(), &setup, Duration::from_secs(10));
    let header = wire::encode_payment(&setup.pay(320));
    let response = app.clone().oneshot(get_paid("/tokens?n=5", &header)).await.unwrap();
    let mut body = response.into_body();
    let mut text = String::new();
    while !text.contains(TOP_UP_EVENT) {
        let frame = body.frame().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
    }
    // The stream holds; the client hands a better payment over on the side.
    let better = wire::encode_payment(&setup.pay(400));
    let request = Request::post("/payment-channel/payment")
        .header(wire::PAYMENT_CHANNEL, &better)
        .body(Body::empty())
        .unwrap();
    let answer = app.oneshot(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: PaymentAnswer =
        serde_json::from_slice(&answer.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!((answer.channel, answer.paid_msat), (id, MilliSats::from_msat(400_000)));
    assert_eq!(answer.balance_msat, MilliSats::from_msat(400_000 - 320_000));
    let rest = body.collect().await.unwrap().to_bytes();
    text.push_str(std::str::from_utf8(&rest).unwrap());
    let data: Vec<String> =
        events(&text).into_iter().filter(|(name, _)| name.is_empty()).map(|(_, d)| d).collect();
    assert_eq!(data, ["0", "1", "2", "3", "4"], "the held event and the rest, in order");
    let expected = PROMPT.checked_add(UNIT.checked_mul(5).unwrap()).unwrap();
    assert_eq!(spent(&store, id).await, expected);
}

/// Two streams and a burst of plain requests on one channel, with no top-up: together they
/// are served exactly what was paid.
async fn concurrent_streams_are_served_exactly_what_was_paid<S: ChannelStore + Clone>(store: S) {
    let setup = Setup::new();
    setup.open();
    // Two prices up front and seven events: 670 sat.
    let id = channel(&store, &setup, 670).await;
    let app = app(store.clone(), &setup, Duration::from_millis(100));
    let header = wire::encode_payment(&setup.pay(670));
    // Both streams start (each is charged its price up front), then race for the balance.
    let start = || app.clone().oneshot(get_paid("/tokens?n=10", &header));
    let (a, b) = (start().await.unwrap(), start().await.unwrap());
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    let read = |response: axum::response::Response| async move {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let events = events(std::str::from_utf8(&body).unwrap());
        events.iter().filter(|(name, _)| name.is_empty()).count()
    };
    let (a, b) = tokio::join!(tokio::spawn(read(a)), tokio::spawn(read(b)));
    let served = a.unwrap() + b.unwrap();
    assert_eq!(served, 7, "seven events paid for, seven sent");
    assert_eq!(
        spent(&store, id).await,
        MilliSats::from_msat(670_000),
        "spent exactly what was paid"
    );
    let refused = app.oneshot(get_paid("/tokens", &header)).await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::PAYMENT_REQUIRED,
        "nothing left for the price up front"
    );
}

for_each_store!(concurrent_streams_on, concurrent_streams_are_served_exactly_what_was_paid);

#[tokio::test]
async fn the_payment_endpoint_stores_a_better_payment_and_charges_nothing() {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    let id = channel(&store, &setup, 500).await;
    let app = app(store.clone(), &setup, Duration::from_millis(50));
    let post = |header: Option<String>| {
        let mut request = Request::post("/payment-channel/payment");
        if let Some(header) = header {
            request = request.header(wire::PAYMENT_CHANNEL, header);
        }
        app.clone().oneshot(request.body(Body::empty()).unwrap())
    };
    let before = store.load(id).await.unwrap();
    for (header, status, code) in [
        (None, StatusCode::PAYMENT_REQUIRED, ProblemCode::PaymentRequired),
        (
            Some("garbage".to_owned()),
            StatusCode::BAD_REQUEST,
            ProblemCode::from_static("header-not-base64"),
        ),
    ] {
        let response = post(header).await.unwrap();
        assert_eq!(response.status(), status);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(Problem::from_body(status, &body).code, code);
        assert_eq!(store.load(id).await.unwrap(), before, "a refusal changes nothing");
    }
    // A better payment: stored, nothing charged.
    let response = post(Some(wire::encode_payment(&setup.pay(800)))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[wire::PAYMENT_CHANNEL_BALANCE], "800000");
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!((record.paid(), record.spent), (MilliSats::from_msat(800_000), MilliSats::ZERO));
    // An older one: identification only, the best stays.
    let response = post(Some(wire::encode_payment(&setup.pay(600)))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(store.load(id).await.unwrap().unwrap().paid(), MilliSats::from_msat(800_000));
    // Other methods on the path are the application's.
    let get = app.oneshot(Request::get("/payment-channel/payment").body(Body::empty()).unwrap());
    assert_eq!(get.await.unwrap().status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shadow_mode_streams_everything_and_counts_every_unit() {
    let setup = Setup::new();
    let (_tip_tx, tip) = tokio::sync::watch::channel(setup.tip());
    let prices = RoutePrices::new().route(Method::GET, "/tokens", PROMPT);
    let layer = PaywallLayer::new(MemoryStore::new(), prices, tip).with_shadow_mode();
    let tally = layer.shadow_tally().unwrap();
    let app: Router = Router::new()
        .route(
            "/tokens",
            get(|meter: StreamMeter| async move {
                let events =
                    (0..3).map(|i| Ok::<_, Infallible>(Event::default().data(i.to_string())));
                Sse::new(meter.sse(futures_util::stream::iter(events), UNIT))
            }),
        )
        .layer(layer);
    let response = app.oneshot(Request::get("/tokens").body(Body::empty()).unwrap()).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(events(std::str::from_utf8(&body).unwrap()).len(), 3);
    let expected = PROMPT.checked_add(UNIT.checked_mul(3).unwrap()).unwrap();
    assert_eq!((tally.requests(), tally.would_have_charged()), (1, expected));
}
