//! Retries that never pay twice (`Idempotency-Key`), driven in process on every store: a
//! retry replays the first paid response without a debit, a reused key is refused, racing
//! retries run the handler once, a refunded 5xx releases its key, an unkept response is
//! never served again, and the client's receipt checks take a replay in their stride.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use common::Setup;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use paychan::MilliSats;
use paychan::server::{Idempotency, PaywallLayer};
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::IDEMPOTENT_REPLAYED;
use paychan::wire::{self, ChannelId, Problem, ProblemCode};
use tower::ServiceExt;

const PRICE: MilliSats = MilliSats::from_msat(5_000);

/// `/work` (counts its calls; `?fail` answers 500, `?big` 2 KiB, `?slow` waits), priced
/// [`PRICE`], keeping responses up to 1 KiB.
fn app<S: ChannelStore + Clone>(store: S, setup: &Setup, calls: &Arc<AtomicUsize>) -> Router {
    let (tip_tx, tip) = tokio::sync::watch::channel(setup.tip());
    std::mem::forget(tip_tx);
    let calls = calls.clone();
    let handler = post(move |uri: http::Uri| async move {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        match uri.query() {
            Some("fail") => (StatusCode::INTERNAL_SERVER_ERROR, "failed".to_owned()),
            Some("big") => (StatusCode::OK, "x".repeat(2_048)),
            Some("slow") => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                (StatusCode::CREATED, format!("call {n}"))
            }
            _ => (StatusCode::CREATED, format!("call {n}")),
        }
    });
    let layer = PaywallLayer::new(store, PRICE, tip)
        .with_idempotency(Idempotency::default().with_max_response(1_024));
    Router::new().route("/work", handler).layer(layer)
}

async fn channel<S: ChannelStore>(store: &S, setup: &Setup, sat: u64) -> (ChannelId, String) {
    let record = ChannelRecord::open(setup.channel.clone(), 0, setup.pay(sat));
    let id = record.id();
    store.create(record).await.unwrap();
    (id, wire::encode_payment(&setup.pay(sat)))
}

fn request(path: &str, header: &str, key: Option<&str>) -> Request<Body> {
    let mut request = Request::post(path).header(wire::PAYMENT_CHANNEL, header);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from("body")).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8(body.to_vec()).unwrap())
}

fn code(status: StatusCode, body: &str) -> ProblemCode {
    Problem::from_body(status, body.as_bytes()).code
}

async fn spent<S: ChannelStore>(store: &S, id: ChannelId) -> MilliSats {
    store.load(id).await.unwrap().unwrap().spent
}

/// The whole behaviour on one store.
async fn retries_never_pay_twice<S: ChannelStore + Clone>(store: S) {
    let setup = Setup::new();
    setup.open();
    let (id, header) = channel(&store, &setup, 1_000).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(store.clone(), &setup, &calls);
    let calls_now = || calls.load(Ordering::SeqCst);

    // The first request is served and charged; its retry gets the same answer, free.
    let first = send(&app, request("/work", &header, Some("op-1"))).await;
    assert_eq!((first.0, first.2.as_str()), (StatusCode::CREATED, "call 1"));
    assert!(!first.1.contains_key(IDEMPOTENT_REPLAYED));
    let retry = send(&app, request("/work", &header, Some("op-1"))).await;
    assert_eq!((retry.0, retry.2.as_str()), (StatusCode::CREATED, "call 1"));
    assert_eq!(retry.1[IDEMPOTENT_REPLAYED], "true");
    assert!(first.1.contains_key(wire::PAYMENT_CHANNEL_BALANCE));
    assert!(!retry.1.contains_key(wire::PAYMENT_CHANNEL_BALANCE), "a replay charges nothing");
    assert_eq!((calls_now(), spent(&store, id).await), (1, PRICE), "served and paid once");

    // The same key for another request: 409, nothing charged or run.
    let other = send(&app, request("/work?other", &header, Some("op-1"))).await;
    assert_eq!(other.0, StatusCode::CONFLICT);
    assert_eq!(code(other.0, &other.2), ProblemCode::IdempotencyKeyReused);
    // A malformed key: 400, nothing changed.
    let bad = send(&app, request("/work", &header, Some("has space"))).await;
    assert_eq!(code(bad.0, &bad.2), ProblemCode::IdempotencyKeyInvalid);
    assert_eq!((calls_now(), spent(&store, id).await), (1, PRICE));

    // Retries racing the first request: the handler runs once, the others are told to wait,
    // and once it is done they get its answer.
    let racing: Vec<_> = (0..6)
        .map(|_| {
            let (app, header) = (app.clone(), header.clone());
            tokio::spawn(
                async move { send(&app, request("/work?slow", &header, Some("op-2"))).await },
            )
        })
        .collect();
    let mut statuses = Vec::new();
    for task in racing {
        let (status, _, body) = task.await.unwrap();
        if status == StatusCode::CONFLICT {
            assert_eq!(code(status, &body), ProblemCode::IdempotencyKeyInProgress);
        }
        statuses.push(status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CREATED).count(), 1, "{statuses:?}");
    assert_eq!((calls_now(), spent(&store, id).await), (2, PRICE.checked_mul(2).unwrap()));
    let after = send(&app, request("/work?slow", &header, Some("op-2"))).await;
    assert_eq!((after.0, after.2.as_str()), (StatusCode::CREATED, "call 2"));
    assert_eq!(calls_now(), 2);

    // A refunded 5xx releases its key: the retry runs (and pays) again.
    let failed = send(&app, request("/work?fail", &header, Some("op-3"))).await;
    assert_eq!(failed.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(spent(&store, id).await, PRICE.checked_mul(2).unwrap(), "the 5xx was given back");
    let again = send(&app, request("/work?fail", &header, Some("op-3"))).await;
    assert!(!again.1.contains_key(IDEMPOTENT_REPLAYED));
    assert_eq!(calls_now(), 4);

    // A response too large to keep is served once, never again.
    let big = send(&app, request("/work?big", &header, Some("op-4"))).await;
    assert_eq!((big.0, big.2.len()), (StatusCode::OK, 2_048));
    let big_again = send(&app, request("/work?big", &header, Some("op-4"))).await;
    assert_eq!(code(big_again.0, &big_again.2), ProblemCode::IdempotentResponseUnavailable);
    assert_eq!((calls_now(), spent(&store, id).await), (5, PRICE.checked_mul(3).unwrap()));

    // Without a key every request is a new one.
    for _ in 0..2 {
        send(&app, request("/work", &header, None)).await;
    }
    assert_eq!((calls_now(), spent(&store, id).await), (7, PRICE.checked_mul(5).unwrap()));
}

for_each_store!(retries_never_pay_twice_on, retries_never_pay_twice);

#[tokio::test]
async fn a_refused_request_claims_nothing_and_its_paid_retry_runs() {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    let (id, _) = channel(&store, &setup, 300).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(store.clone(), &setup, &calls);
    // 300 sat paid, 5 sat a call: spend it all.
    let header = wire::encode_payment(&setup.pay(300));
    for _ in 0..60 {
        assert_eq!(send(&app, request("/work", &header, None)).await.0, StatusCode::CREATED);
    }
    let refused = send(&app, request("/work", &header, Some("op"))).await;
    assert_eq!(refused.0, StatusCode::PAYMENT_REQUIRED);
    // Topped up (a new payment with the key): the request runs and is charged once.
    let topped = wire::encode_payment(&setup.pay(400));
    let served = send(&app, request("/work", &topped, Some("op"))).await;
    assert_eq!(served.0, StatusCode::CREATED);
    let replay = send(&app, request("/work", &topped, Some("op"))).await;
    assert_eq!(replay.1[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(spent(&store, id).await, PRICE.checked_mul(61).unwrap());
    assert_eq!(store.load(id).await.unwrap().unwrap().paid(), MilliSats::from_msat(400_000));
}

#[tokio::test]
async fn without_idempotency_the_key_is_ignored() {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    let (id, header) = channel(&store, &setup, 1_000).await;
    let (_tip_tx, tip) = tokio::sync::watch::channel(setup.tip());
    let app = Router::new()
        .route("/work", post(|| async { "done" }))
        .layer(PaywallLayer::new(store.clone(), PRICE, tip).without_idempotency());
    for _ in 0..2 {
        let (status, headers, _) = send(&app, request("/work", &header, Some("op"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!headers.contains_key(IDEMPOTENT_REPLAYED));
    }
    assert_eq!(spent(&store, id).await, PRICE.checked_mul(2).unwrap());
}

/// The client goes away while its request is served (the future is dropped): the key is
/// marked served but not kept, so the retry is refused at once and never charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_mid_way_is_never_charged_again() {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    let (id, header) = channel(&store, &setup, 1_000).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(store.clone(), &setup, &calls);
    let abandoned = app.clone().oneshot(request("/work?slow", &header, Some("op")));
    assert!(tokio::time::timeout(Duration::from_millis(50), abandoned).await.is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = send(&app, request("/work?slow", &header, Some("op"))).await;
    assert_eq!(code(retry.0, &retry.2), ProblemCode::IdempotentResponseUnavailable);
    assert_eq!(spent(&store, id).await, PRICE, "charged once");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
