//! The layer and the client service driven in process with `oneshot`, no sockets: refusing
//! unlisted routes, a store that fails on script (every refusal is a 503 and changes
//! nothing), and the client's pay-and-retry loop against the server's own router.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use common::hooked::{Hooked, Op};
use common::{Setup, secret};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::bitcoin::{Amount, Network, bip32::Xpriv};
use paychan::chain::follow_tip;
use paychan::chain::sim::SimulatedChain;
use paychan::channel::ChainTip;
use paychan::client::{KeyWallet, Payer, PaymentLayer, SpendingPolicy};
use paychan::server::Paid;
use paychan::server::{PaywallLayer, RoutePrices, Unlisted};
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::{self, Problem, ProblemCode};
use tower::{Service, ServiceBuilder, ServiceExt};

const PRICE: MilliSats = MilliSats::from_msat(100_000);

/// A handler that counts its calls.
fn counted(calls: &Arc<AtomicUsize>) -> axum::routing::MethodRouter {
    let calls = calls.clone();
    get(move |request: axum::extract::Request| async move {
        calls.fetch_add(1, Ordering::SeqCst);
        let paid = request.extensions().get::<Paid>();
        paid.map_or_else(|| "free".to_owned(), |paid| paid.balance.to_string())
    })
}

async fn problem(response: Response<Body>) -> Problem {
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Problem::from_body(status, &body)
}

fn get_with(path: &str, header: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(header) = header {
        request = request.header(wire::PAYMENT_CHANNEL, header);
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn a_table_that_refuses_unlisted_routes_never_serves_them() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (_tip, tip) =
        tokio::sync::watch::channel(ChainTip { height: 800_000, median_time_past: 0 });
    let prices = RoutePrices::new().route(Method::GET, "/listed", PRICE);
    let app = |unlisted| {
        Router::new().route("/listed", counted(&calls)).route("/forgotten", counted(&calls)).layer(
            PaywallLayer::new(MemoryStore::new(), prices.clone().unlisted(unlisted), tip.clone()),
        )
    };

    let refused = app(Unlisted::Refuse).oneshot(get_with("/forgotten", None)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert_eq!(problem(refused).await.code, ProblemCode::RouteNotPriced);
    let listed = app(Unlisted::Refuse).oneshot(get_with("/listed", None)).await.unwrap();
    assert_eq!(listed.status(), StatusCode::PAYMENT_REQUIRED, "a listed route is charged");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "neither reached the handler");

    let free = app(Unlisted::Free).oneshot(get_with("/forgotten", None)).await.unwrap();
    assert_eq!(free.status(), StatusCode::OK, "free by default");
    let charged = app(Unlisted::Price(PRICE)).oneshot(get_with("/forgotten", None)).await.unwrap();
    assert_eq!(charged.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Shadow mode: priced requests are served unpaid and counted at their price (a payment
/// header is ignored and not passed on), free routes stay free and uncounted, refused routes
/// stay refused, and the store is never asked.
#[tokio::test]
async fn shadow_mode_serves_unpaid_and_counts_what_it_would_charge() {
    let (_tip, tip) =
        tokio::sync::watch::channel(ChainTip { height: 800_000, median_time_past: 0 });
    let prices = RoutePrices::new()
        .route(Method::GET, "/listed", PRICE)
        .route(Method::GET, "/health", MilliSats::ZERO)
        .unlisted(Unlisted::Refuse);
    // A store that fails every operation: shadow mode never asks it.
    let script = Script {
        load: AtomicBool::new(true),
        pay: AtomicBool::new(true),
        debit: AtomicBool::new(true),
    };
    let store = failing(&Arc::new(script));
    let layer = PaywallLayer::new(store, prices, tip).with_shadow_mode();
    let tally = layer.shadow_tally().expect("shadow mode");
    let handler = get(|request: axum::extract::Request| async move {
        let paid = request.extensions().get::<Paid>().copied();
        let header = request.headers().contains_key(wire::PAYMENT_CHANNEL);
        format!("{:?} {header}", paid.map(|p| (p.shadow, p.price.to_msat(), p.balance.to_msat())))
    });
    let app = Router::new()
        .route("/listed", handler.clone())
        .route("/health", handler.clone())
        .route("/forgotten", handler)
        .layer(layer);
    let body = |response: Response<Body>| async move {
        let status = response.status();
        (
            status,
            String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec())
                .unwrap(),
        )
    };
    for header in [None, Some("not-even-a-payment")] {
        let served = body(app.clone().oneshot(get_with("/listed", header)).await.unwrap()).await;
        assert_eq!(served, (StatusCode::OK, "Some((true, 100000, 0)) false".to_owned()));
    }
    let free = body(app.clone().oneshot(get_with("/health", None)).await.unwrap()).await;
    assert_eq!(free, (StatusCode::OK, "None false".to_owned()));
    let refused = app.clone().oneshot(get_with("/forgotten", None)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    assert_eq!((tally.requests(), tally.would_have_charged()), (2, MilliSats::from_msat(200_000)));
}

/// Which store operations fail.
#[derive(Default)]
struct Script {
    load: AtomicBool,
    pay: AtomicBool,
    debit: AtomicBool,
}

/// A memory store whose operations fail when the script says so.
fn failing(script: &Arc<Script>) -> Hooked {
    let script = Arc::clone(script);
    Hooked::failing(MemoryStore::new(), move |op| {
        let flag = match op {
            Op::Load => &script.load,
            Op::StorePayment | Op::Pay => &script.pay,
            Op::Debit | Op::DebitOnce => &script.debit,
            _ => return false,
        };
        flag.load(Ordering::SeqCst)
    })
}

#[tokio::test]
async fn every_store_failure_is_a_503_that_serves_nothing_and_changes_nothing() {
    let setup = Setup::new();
    setup.open();
    let script = Arc::<Script>::default();
    let store = failing(&script);
    let record = ChannelRecord::open(setup.channel.clone(), 0, setup.pay(1_000));
    let id = record.id();
    store.create(record).await.unwrap();
    let (_tip, tip) = tokio::sync::watch::channel(setup.tip());
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route("/paid", counted(&calls)).layer(PaywallLayer::new(
        store.clone(),
        PRICE,
        tip,
    ));
    let header = |sat| wire::encode_payment(&setup.pay(sat));
    let before = store.inner.load(id).await.unwrap();

    // A new payment: the load fails, then the one "store and debit" operation fails.
    for flag in [&script.load, &script.pay] {
        flag.store(true, Ordering::SeqCst);
        let response = app.clone().oneshot(get_with("/paid", Some(&header(2_000)))).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(problem(response).await.code, ProblemCode::StoreUnavailable);
        assert_eq!(store.inner.load(id).await.unwrap(), before, "nothing changed");
        flag.store(false, Ordering::SeqCst);
    }
    // The payment whose "store and debit" failed was not taken as verified: sent again, it is
    // stored this time.
    let better = header(2_000);
    let served = app.clone().oneshot(get_with("/paid", Some(&better))).await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let stored = store.inner.load(id).await.unwrap().unwrap();
    assert_eq!(stored.paid_amount(), Amount::from_sat(2_000), "the better payment is stored");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The fast path (a header already verified): its debit fails.
    let known = better;
    let after_one = store.inner.load(id).await.unwrap();
    script.debit.store(true, Ordering::SeqCst);
    let response = app.clone().oneshot(get_with("/paid", Some(&known))).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(store.inner.load(id).await.unwrap(), after_one, "nothing changed");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the request whose debit succeeded ran");

    // Recovered: the next request is served and charged once.
    script.debit.store(false, Ordering::SeqCst);
    let response = app.oneshot(get_with("/paid", Some(&known))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let spent = store.inner.load(id).await.unwrap().unwrap().spent;
    assert_eq!(spent, PRICE.checked_mul(2).unwrap());
}

/// A payer for `http://api.test` with a funded wallet: 50 000 sat channels.
fn payer(chain: &SimulatedChain) -> Payer {
    let wallet = KeyWallet::new(secret(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), Amount::from_sat(500_000));
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    Payer::builder("http://api.test", Network::Regtest, key)
        .wallet(wallet)
        .channel_value(Amount::from_sat(50_000))
        .policy(SpendingPolicy::default().with_max_per_request(PRICE))
        .build()
        .unwrap()
}

/// The client's `PaymentLayer` over the server's own router as its HTTP client: the first
/// request opens a channel, later ones pay from it and top up, all without a socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_pays_and_retries_against_the_router_in_process() {
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::new().route("/work", counted(&calls)).layer(
        PaywallLayer::new(store.clone(), PRICE, tip)
            .with_prepaid_top_up(MilliSats::from_msat(500_000))
            .with_negotiation(negotiation),
    );
    let (sent, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (sent_, refused_) = (sent.clone(), refused.clone());
    // The "HTTP client": the router itself.
    let http = tower::service_fn(move |request: Request<Full<Bytes>>| {
        sent_.fetch_add(1, Ordering::SeqCst);
        let (router, refused) = (router.clone(), refused_.clone());
        async move {
            let response = router.oneshot(request.map(Body::new)).await?;
            if response.status() == StatusCode::PAYMENT_REQUIRED {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let payer = payer(&chain);
    let mut client = ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(http);

    for n in 1..=12 {
        let request = Request::get("http://api.test/work").body(Full::default()).unwrap();
        let response = client.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 12, "every request ran once");
    let channel = payer.channel().await.unwrap().expect("a channel was opened");
    let id = channel.id();
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!(record.spent, PRICE.checked_mul(12).unwrap(), "charged once per request");
    assert_eq!(record.paid_amount(), channel.paid(), "the server holds the client's latest");
    assert_eq!(payer.committed().await.unwrap(), channel.paid(), "the client's books agree");
    // Each 402 cost one retry; opening the channel cost four negotiation calls (terms, open,
    // refund, fund); nothing else was sent.
    let refused = refused.load(Ordering::SeqCst);
    assert!(refused >= 2, "one 402 opened the channel, at least one topped it up: {refused}");
    assert_eq!(sent.load(Ordering::SeqCst), 12 + refused + 4);
}

/// The layer's builder calls may come in any order: a terms URL set after the negotiation is
/// where the terms are served, and where 402 challenges point.
#[tokio::test]
async fn the_terms_url_may_be_set_after_the_negotiation() {
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let (_tip, tip) = tokio::sync::watch::channel(chain.tip());
    let original = PaywallLayer::new(MemoryStore::new(), PRICE, tip).with_negotiation(negotiation);
    let layer = original.clone().with_terms_url("/terms.json");
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route("/paid", counted(&calls)).layer(layer);

    let terms = app.clone().oneshot(get_with("/terms.json", None)).await.unwrap();
    assert_eq!(terms.status(), StatusCode::OK);
    let body = terms.into_body().collect().await.unwrap().to_bytes();
    let terms: wire::TermsDocument = serde_json::from_slice(&body).unwrap();
    assert_eq!(terms.endpoints.open, "/payment-channel/open");
    let old = app.clone().oneshot(get_with("/.well-known/payment-channel", None)).await.unwrap();
    assert_eq!(old.status(), StatusCode::PAYMENT_REQUIRED, "the default URL is just a route now");
    assert_eq!(problem(old).await.terms.as_deref(), Some("/terms.json"));

    // The layer it was cloned from keeps its own terms URL, and its own endpoints.
    let original = Router::new().route("/paid", counted(&calls)).layer(original);
    let terms = original.clone().oneshot(get_with(wire::TERMS_PATH, None)).await.unwrap();
    assert_eq!(terms.status(), StatusCode::OK);
    let moved = original.oneshot(get_with("/terms.json", None)).await.unwrap();
    assert_eq!(moved.status(), StatusCode::PAYMENT_REQUIRED);
}

/// The negotiation endpoints mounted as a router of their own, beside a metered route, on the
/// same store: unmetered themselves, and a channel they fund is the one the layer charges.
#[tokio::test]
async fn the_negotiation_router_can_be_mounted_on_its_own() {
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let (_tip, tip) = tokio::sync::watch::channel(chain.tip());
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/paid", counted(&calls))
        .layer(PaywallLayer::new(store.clone(), PRICE, tip.clone()))
        .merge(negotiation.into_router(store.clone(), tip, wire::TERMS_PATH));

    let terms = app.clone().oneshot(get_with(wire::TERMS_PATH, None)).await.unwrap();
    assert_eq!(terms.status(), StatusCode::OK, "the terms are not metered");
    let open = Request::post("/payment-channel/open")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let refused = app.clone().oneshot(open).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(problem(refused).await.code, ProblemCode::BadRequest);
    let unpaid = app.clone().oneshot(get_with("/paid", None)).await.unwrap();
    assert_eq!(unpaid.status(), StatusCode::PAYMENT_REQUIRED, "the route is still metered");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // A client opens through the mounted router and is charged by the layer.
    let payer = payer(&chain);
    let http = tower::service_fn(move |request: Request<Full<Bytes>>| {
        app.clone().oneshot(request.map(Body::new))
    });
    let mut client = ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(http);
    let request = Request::get("http://api.test/paid").body(Full::default()).unwrap();
    let response = client.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = payer.channel().await.unwrap().expect("opened").id();
    assert_eq!(store.load(id).await.unwrap().unwrap().spent, PRICE, "charged on the same store");
}
