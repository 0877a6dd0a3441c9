//! The metering layer over real loopback HTTP: payment, 402s with resync numbers, top-up, every rejection
//! class with its state untouched, give-backs, and concurrency on one channel.

mod common;

use std::sync::Arc;

use std::net::SocketAddr;

use axum::routing::get;
use axum::{Extension, Router};
use bitcoin::Transaction;
use common::http::{Reply, call};
use common::{Setup, p2wpkh, secret};
use http::{Method, StatusCode};
use paychan::MilliSats;
use paychan::channel::ChannelState;
use paychan::server::{ActualCost, Paid, PaywallLayer, RoutePrices};
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::{self, ChannelId};
use serde_json::Value;
use tokio::sync::watch;

const PRICE: MilliSats = MilliSats::from_msat(250_000);

struct Api {
    setup: Setup,
    store: MemoryStore,
    app: SocketAddr,
    id: ChannelId,
    tip: watch::Sender<paychan::channel::ChainTip>,
}

/// A funded channel whose first payment pays `first_sat`, behind an API priced at 250 sat.
fn api(first_sat: u64) -> Api {
    let setup = Setup::new();
    setup.open();
    let store = MemoryStore::new();
    let first = setup.pay(first_sat);
    let record = ChannelRecord::open(setup.channel.clone(), 0, first);
    let id = record.id();
    futures_now(store.create(record)).unwrap();
    let (tip, tip_rx) = watch::channel(setup.tip());
    let prices = RoutePrices::new()
        .route(Method::GET, "/paid", PRICE)
        .route(Method::GET, "/boom", PRICE)
        .route(Method::GET, "/cached", PRICE);
    let app = Router::new()
        .route(
            "/paid",
            get(|paid: Paid| async move { format!("{} {}", paid.channel, paid.balance) }),
        )
        .route("/free", get(|| async { "free" }))
        .route("/boom", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }))
        .route(
            "/cached",
            get(|| async { (Extension(ActualCost(MilliSats::from_msat(50_000))), "cached") }),
        )
        .layer(PaywallLayer::new(store.clone(), prices, tip_rx));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(listener, app).await.unwrap();
    });
    Api { setup, store, app: addr, id, tip }
}

fn status(reply: &Reply) -> StatusCode {
    StatusCode::from_u16(reply.status).unwrap()
}

fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    match std::pin::pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("memory store answers at once"),
    }
}

/// A GET over a real loopback connection.
async fn get_with(app: &SocketAddr, path: &str, header: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> =
        header.map(|h| (wire::PAYMENT_CHANNEL, h)).into_iter().collect();
    call(*app, "GET", path, &headers, None).await
}

async fn json(reply: Reply) -> Value {
    reply.json()
}

fn balance(reply: &Reply) -> u64 {
    reply.header(wire::PAYMENT_CHANNEL_BALANCE).expect("balance header").parse().unwrap()
}

impl Api {
    fn header(&self, tx: &Transaction) -> String {
        wire::encode_payment(tx)
    }
    fn pay(&self, sat: u64) -> String {
        self.header(&self.setup.pay(sat))
    }
    async fn record(&self) -> ChannelRecord {
        self.store.load(self.id).await.unwrap().unwrap()
    }
}

#[tokio::test]
async fn free_routes_pass_and_priced_routes_need_a_channel() {
    let api = api(1_000);
    let free = get_with(&api.app, "/free", None).await;
    assert_eq!(status(&free), StatusCode::OK);
    assert!(free.header(wire::PAYMENT_CHANNEL_BALANCE).is_none());

    let response = get_with(&api.app, "/paid", None).await;
    assert_eq!(status(&response), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(response.header("content-type"), Some("application/problem+json"));
    assert_eq!(response.header("cache-control"), Some("no-store"));
    let challenge = response.header("www-authenticate").unwrap().to_owned();
    assert!(challenge.starts_with("Payment method=\"bitcoin-channel\""), "{challenge}");
    assert!(challenge.contains("terms=\"/.well-known/payment-channel\""), "{challenge}");
    let body = json(response).await;
    assert_eq!(body["type"], "urn:paychan:problem:payment-required");
    assert_eq!(body["status"], 402);
}

/// A pricing whose table changes between its two answers (a reload that lists a route the old
/// table refused): asked `price` then `refuses`, the request would be neither priced nor
/// refused, and served free. The layer asks `priced`, one answer from one view.
#[tokio::test]
async fn the_layer_prices_and_refuses_from_one_answer() {
    use paychan::server::{Priced, Pricing};
    #[derive(Clone)]
    struct Reloading(Arc<std::sync::atomic::AtomicBool>);
    impl<B> Pricing<B> for Reloading {
        // The old table: unlisted; the reload lands right after.
        fn price(&self, _: &http::Request<B>) -> Option<MilliSats> {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            None
        }
        fn refuses(&self, _: &http::Request<B>) -> bool {
            !self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
        // One snapshot: the old table, which refuses it.
        fn priced(&self, _: &http::Request<B>) -> Priced {
            Priced::Refused
        }
    }
    let (_tx, tip) =
        watch::channel(paychan::channel::ChainTip { height: 100, median_time_past: 0 });
    let pricing = Reloading(Arc::default());
    let layer = PaywallLayer::new(MemoryStore::new(), pricing, tip);
    let app =
        common::http::serve(Router::new().route("/new", get(|| async { "served" })).layer(layer))
            .await;
    let reply = get_with(&app, "/new", None).await;
    assert_eq!(status(&reply), StatusCode::NOT_FOUND, "refused, never served free");
    assert_eq!(json(reply).await["code"], "route-not-priced");
}

#[tokio::test]
async fn pays_until_the_allocation_runs_out_then_tops_up() {
    let api = api(1_000);
    let header = api.pay(1_000);
    for served in 1..=4u64 {
        let response = get_with(&api.app, "/paid", Some(&header)).await;
        assert_eq!(status(&response), StatusCode::OK);
        assert_eq!(balance(&response), 1_000_000 - served * 250_000);
    }
    let response = get_with(&api.app, "/paid", Some(&header)).await;
    assert_eq!(status(&response), StatusCode::PAYMENT_REQUIRED);
    let challenge = response.header("www-authenticate").unwrap().to_owned();
    assert!(challenge.contains(&format!("channel=\"{}\"", api.id)), "{challenge}");
    assert!(challenge.contains("min_server_amount=\"1250\""), "{challenge}");
    let body = json(response).await;
    assert_eq!(body["type"], "urn:paychan:problem:insufficient-balance");
    let channel = &body["channel"];
    assert_eq!(channel["channel"], api.id.to_string());
    assert_eq!(channel["paid_msat"], 1_000_000);
    assert_eq!(channel["spent_msat"], 1_000_000);
    assert_eq!(channel["balance_msat"], 0);
    assert_eq!(channel["price_msat"], 250_000);
    assert_eq!(channel["min_server_amount_sat"], 1_250);
    assert_eq!(channel["suggested_server_amount_sat"], 2_250);
    let max = api.setup.params.max_server_amount().to_sat();
    assert_eq!(channel["capacity_left_sat"], max - 1_000);
    assert_eq!(channel["expiry"], api.setup.params.expiry.to_consensus_u32());

    // Top up to the minimum the server asked for: exactly one more request.
    let response = get_with(&api.app, "/paid", Some(&api.pay(1_250))).await;
    assert_eq!(status(&response), StatusCode::OK);
    assert_eq!(balance(&response), 0);
    assert_eq!(api.record().await.paid_amount().to_sat(), 1_250);
}

#[tokio::test]
async fn every_rejection_has_its_type_and_changes_nothing() {
    let api = api(1_000);
    let before = api.record().await;
    let mut wrong_script =
        api.setup.channel.build_payment(bitcoin::Amount::from_sat(5_000)).unwrap();
    wrong_script.output[0].script_pubkey = p2wpkh(&secret(5));
    let wrong_script = api.setup.resign(wrong_script);
    let mut forged = api.setup.pay(5_000);
    forged.input[0].witness = api.setup.pay(6_000).input[0].witness.clone();
    let mut stranger = api.setup.pay(5_000);
    stranger.input[0].previous_output.vout = 9;
    // Signed with SIGHASH_SINGLE instead of SIGHASH_ALL: the server could not trust the rest.
    let mut wrong_sighash = api.setup.pay(5_000);
    let sighash = bitcoin::sighash::SighashCache::new(&wrong_sighash)
        .p2wsh_signature_hash(
            0,
            &api.setup.params.witness_script(),
            api.setup.params.value,
            bitcoin::EcdsaSighashType::Single,
        )
        .unwrap();
    let signature = bitcoin::ecdsa::Signature {
        signature: bitcoin::secp256k1::Secp256k1::new()
            .sign_ecdsa(&bitcoin::secp256k1::Message::from(sighash), &api.setup.client),
        sighash_type: bitcoin::EcdsaSighashType::Single,
    };
    wrong_sighash.input[0].witness = bitcoin::Witness::from_slice(&[signature.to_vec()]);
    let closing_before = api.setup.pay(9_000);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("%%%".into(), StatusCode::BAD_REQUEST, "header-not-base64"),
        ("A".repeat(2_000), StatusCode::BAD_REQUEST, "header-too-long"),
        ("AAAA".into(), StatusCode::BAD_REQUEST, "header-not-a-transaction"),
        (api.header(&stranger), StatusCode::PAYMENT_REQUIRED, "unknown-channel"),
        (api.header(&wrong_script), StatusCode::BAD_REQUEST, "payment-wrong-server-script"),
        (api.header(&forged), StatusCode::BAD_REQUEST, "payment-signature"),
        (api.header(&wrong_sighash), StatusCode::BAD_REQUEST, "payment-signature"),
    ];
    for (header, expected, code) in cases {
        let response = get_with(&api.app, "/paid", Some(&header)).await;
        assert_eq!(status(&response), expected, "{code}");
        assert_eq!(response.header("content-type"), Some("application/problem+json"));
        let body = json(response).await;
        assert_eq!(body["type"], format!("urn:paychan:problem:{code}"));
        assert_eq!(body["code"], code);
        assert_eq!(api.record().await, before, "{code} changed the channel");
    }

    // Inside the close margin a new payment is refused with 402 and the state is untouched.
    let expiry = api.setup.params.expiry.to_consensus_u32();
    let mut tip = api.setup.tip();
    tip.height = expiry - api.setup.params.close_margin;
    api.tip.send(tip).unwrap();
    let response = get_with(&api.app, "/paid", Some(&api.header(&closing_before))).await;
    assert_eq!(status(&response), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(json(response).await["type"], "urn:paychan:problem:payment-channel-closing");
    assert_eq!(api.record().await, before);

    // A channel that is no longer open.
    api.store.transition(api.id, ChannelState::Open, ChannelState::Closing).await.unwrap();
    let response = get_with(&api.app, "/paid", Some(&api.pay(1_000))).await;
    assert_eq!(status(&response), StatusCode::PAYMENT_REQUIRED);
    let body = json(response).await;
    assert_eq!(body["type"], "urn:paychan:problem:channel-not-open");
    assert_eq!(body["channel"]["state"], "closing");
}

#[tokio::test]
async fn an_older_payment_identifies_but_never_downgrades() {
    let api = api(1_000);
    let old = api.pay(1_000);
    let response = get_with(&api.app, "/paid", Some(&api.pay(3_000))).await;
    assert_eq!(status(&response), StatusCode::OK);
    let response = get_with(&api.app, "/paid", Some(&old)).await;
    assert_eq!(status(&response), StatusCode::OK, "a request that raced the top-up is served");
    assert_eq!(balance(&response), 3_000_000 - 2 * 250_000);
    assert_eq!(api.record().await.paid_amount().to_sat(), 3_000, "the best payment is kept");
}

#[tokio::test]
async fn server_errors_and_actual_costs_give_money_back() {
    let api = api(1_000);
    let header = api.pay(1_000);
    let response = get_with(&api.app, "/boom", Some(&header)).await;
    assert_eq!(status(&response), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(balance(&response), 1_000_000, "a 5xx is not charged");
    let response = get_with(&api.app, "/cached", Some(&header)).await;
    assert_eq!(status(&response), StatusCode::OK);
    assert_eq!(balance(&response), 1_000_000 - 50_000, "only the actual cost is charged");
    assert_eq!(api.record().await.spent, MilliSats::from_msat(50_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_served_exactly_what_was_paid() {
    let api = Arc::new(api(2_500));
    let header = api.pay(2_500); // 2 500 sat at 250 sat a request: exactly 10
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (app, header) = (api.app, header.clone());
            tokio::spawn(async move { status(&get_with(&app, "/paid", Some(&header)).await) })
        })
        .collect();
    let mut served = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::OK => served += 1,
            StatusCode::PAYMENT_REQUIRED => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(served, 2_500 / 250);
    assert_eq!(api.record().await.balance(), MilliSats::ZERO);
}

#[tokio::test]
async fn follow_tip_tracks_the_chain() {
    let chain = paychan::chain::sim::SimulatedChain::new();
    let mut tip = paychan::chain::follow_tip(chain.clone(), std::time::Duration::from_millis(5))
        .await
        .unwrap();
    assert_eq!(*tip.borrow(), chain.tip());
    chain.mine(3);
    // Bounded wait: the poller runs every 5 ms.
    tokio::time::timeout(std::time::Duration::from_secs(10), tip.changed()).await.unwrap().unwrap();
    assert_eq!(tip.borrow().height, chain.tip().height);
}

#[tokio::test]
async fn the_layer_also_works_on_a_single_route() {
    let api = api(1_000);
    let (_tx, tip) = watch::channel(api.setup.tip());
    let app = Router::new()
        .route(
            "/priced",
            get(|paid: Paid| async move { paid.balance.to_string() }).layer(PaywallLayer::new(
                api.store.clone(),
                PRICE,
                tip,
            )),
        )
        .route("/open", get(|| async { "free" }));
    let addr = common::http::serve(app).await;
    assert_eq!(get_with(&addr, "/open", None).await.status, 200);
    assert_eq!(get_with(&addr, "/priced", None).await.status, 402);
    let reply = get_with(&addr, "/priced", Some(&api.pay(1_000))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "750000 msat");
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_and_recovers() {
    let api = api(1_000);
    // A store that can be switched off.
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = down.clone();
    let store = common::hooked::Hooked::failing(api.store.clone(), move |_| {
        switch.load(std::sync::atomic::Ordering::SeqCst)
    });
    let (_tx, tip) = watch::channel(api.setup.tip());
    let app = Router::new().route("/priced", get(|| async { "served" })).layer(PaywallLayer::new(
        store.clone(),
        PRICE,
        tip,
    ));
    let addr = common::http::serve(app).await;
    let header = api.pay(1_000);
    assert_eq!(get_with(&addr, "/priced", Some(&header)).await.status, 200);

    down.store(true, std::sync::atomic::Ordering::SeqCst);
    for header in [header.clone(), api.pay(2_000)] {
        let reply = get_with(&addr, "/priced", Some(&header)).await;
        assert_eq!(reply.status, 503, "no free service while the store is down");
        assert_eq!(reply.json()["type"], "urn:paychan:problem:store-unavailable");
    }
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let reply = get_with(&addr, "/priced", Some(&header)).await;
    assert_eq!(reply.status, 200, "recovers by itself");
    assert_eq!(balance(&reply), 1_000_000 - 2 * 250_000, "nothing was charged during the outage");
}

/// Issue #28: a new payment on a channel this node has verified a payment of is checked
/// against the terms it kept and costs **one** store operation (`pay`: stored if better,
/// debited if open, atomically); an older payment that raced it is served without
/// displacing the better one from the fast path; and the refusals on that path are the
/// loaded path's, with the channel untouched.
#[tokio::test]
async fn a_new_payment_on_a_known_channel_is_one_store_operation() {
    use common::hooked::{Hooked, Op};
    let api = api(1_000);
    let ops = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ops.clone();
    let store = Hooked::new(api.store.clone(), move |op| {
        seen.lock().unwrap().push(op);
        Box::pin(std::future::ready(Ok(())))
    });
    let (tip_tx, tip) = watch::channel(api.setup.tip());
    let app = Router::new()
        .route("/priced", get(|| async { "served" }))
        .layer(PaywallLayer::new(store, PRICE, tip));
    let addr = common::http::serve(app).await;
    let request = async |header: &str| {
        ops.lock().unwrap().clear();
        let reply = get_with(&addr, "/priced", Some(header)).await;
        (reply, std::mem::take(&mut *ops.lock().unwrap()))
    };

    let (first, second) = (api.pay(2_000), api.pay(3_000));
    let (reply, ops) = request(&first).await;
    assert_eq!((reply.status, ops), (200, vec![Op::Load, Op::Pay]), "first contact: loaded");
    let (reply, ops) = request(&second).await;
    assert_eq!((reply.status, ops), (200, vec![Op::Pay]), "known terms: one operation");
    assert_eq!(balance(&reply), 3_000_000 - 2 * 250_000);
    let (reply, ops) = request(&second).await;
    assert_eq!((reply.status, ops), (200, vec![Op::Debit]), "verified: the fast path");

    // The older payment (a request that raced the top-up): served, nothing downgraded, no
    // write (it pays less than the cached header, which the store holds), and the better
    // payment keeps its place on the fast path.
    let (reply, ops) = request(&first).await;
    assert_eq!((reply.status, ops), (200, vec![Op::Debit]));
    assert_eq!(balance(&reply), 3_000_000 - 4 * 250_000);
    assert_eq!(api.record().await.paid_amount().to_sat(), 3_000, "the best payment is kept");
    let (reply, ops) = request(&second).await;
    assert_eq!((reply.status, ops), (200, vec![Op::Debit]), "still the fast path");

    // Refusals on known terms: the channel's state loaded for the problem, nothing changed.
    let before = api.record().await;
    let mut forged = api.setup.pay(5_000);
    forged.input[0].witness = api.setup.pay(6_000).input[0].witness.clone();
    let (reply, ops) = request(&api.header(&forged)).await;
    assert_eq!((reply.status, ops), (400, vec![Op::Load]));
    let body = reply.json();
    assert_eq!(body["code"], "payment-signature");
    assert_eq!(body["channel"]["state"], "open", "with the channel's state");
    assert_eq!(api.record().await, before);

    let mut closing = api.setup.tip();
    closing.height = api.setup.params.expiry.to_consensus_u32() - api.setup.params.close_margin;
    tip_tx.send(closing).unwrap();
    let (reply, ops) = request(&api.pay(5_000)).await;
    assert_eq!((reply.status, ops), (402, vec![Op::Load]));
    assert_eq!(reply.json()["code"], "payment-channel-closing");
    assert_eq!(api.record().await, before);
    // The best payment, stored by another node on the same store, sent here inside the
    // margin: served, as a loaded channel serves its best itself (only the record can tell
    // a repeat).
    let elsewhere = api.setup.pay(4_000);
    let stored = api.store.store_payment(api.id, elsewhere.clone()).await.unwrap();
    assert!(matches!(stored, paychan::store::ops::StorePayment::Stored { .. }));
    let (reply, ops) = request(&api.header(&elsewhere)).await;
    assert_eq!((reply.status, ops), (200, vec![Op::Load, Op::Debit]));
    tip_tx.send(api.setup.tip()).unwrap();

    api.store.transition(api.id, ChannelState::Open, ChannelState::Closing).await.unwrap();
    let before = api.record().await;
    let (reply, ops) = request(&api.pay(5_000)).await;
    assert_eq!(reply.status, 402);
    assert_eq!(ops[0], Op::Pay, "known terms: the store refuses");
    let body = reply.json();
    assert_eq!(body["code"], "channel-not-open");
    assert_eq!(body["channel"]["state"], "closing");
    assert_eq!(api.record().await, before, "a closing channel's best never changes");
    // A channel that is not open is refused for that first, as a loaded one is, whatever
    // the payment.
    let (reply, ops) = request(&api.header(&forged)).await;
    assert_eq!((reply.status, ops), (402, vec![Op::Load]));
    assert_eq!(reply.json()["code"], "channel-not-open");
    assert_eq!(api.record().await, before);
}

/// Security review S9, S11 and S1 over HTTP: `HEAD` runs the `GET` handler, so it is priced
/// like `GET`; the inner service never sees the bearer header; a payment padded with a
/// scriptSig is refused with the books untouched.
#[tokio::test]
async fn head_is_priced_the_header_is_not_forwarded_and_a_script_sig_is_refused() {
    let api = api(1_000);
    let prices = RoutePrices::new().route(Method::GET, "/echo", PRICE);
    let (_tip, tip_rx) = watch::channel(api.setup.tip());
    let echo = || {
        get(|headers: http::HeaderMap| async move {
            format!("header seen: {}", headers.contains_key(wire::PAYMENT_CHANNEL))
        })
    };
    let app = Router::new()
        .route("/echo", echo())
        .route("/free-echo", echo())
        .layer(PaywallLayer::new(api.store.clone(), prices, tip_rx));
    let addr = common::http::serve(app).await;
    let header = api.pay(1_000);

    assert_eq!(call(addr, "HEAD", "/echo", &[], None).await.status, 402);
    let head = call(addr, "HEAD", "/echo", &[(wire::PAYMENT_CHANNEL, &header)], None).await;
    assert_eq!(status(&head), StatusCode::OK);
    assert_eq!(balance(&head), 750_000, "HEAD is charged like GET");
    let get = get_with(&addr, "/echo", Some(&header)).await;
    assert_eq!(get.body, "header seen: false");
    assert_eq!(balance(&get), 500_000);
    // Nor on a free route (clients send the header with every request to the origin).
    let free = get_with(&addr, "/free-echo", Some(&header)).await;
    assert_eq!((free.status, free.body.as_str()), (200, "header seen: false"));

    // Told to forward it, the layer leaves the header to the inner service, on the new
    // payment's path and on the fast path alike.
    let (_tip2, tip_rx) = watch::channel(api.setup.tip());
    let forwarding = Router::new()
        .route(
            "/echo",
            axum::routing::get(|headers: http::HeaderMap| async move {
                format!("header seen: {}", headers.contains_key(wire::PAYMENT_CHANNEL))
            }),
        )
        .layer(
            PaywallLayer::new(
                api.store.clone(),
                RoutePrices::new().route(Method::GET, "/echo", PRICE),
                tip_rx,
            )
            .with_payment_header_forwarded(true),
        );
    let forwarding = common::http::serve(forwarding).await;
    let better = api.pay(1_500);
    for left in [750_000, 500_000] {
        let seen = get_with(&forwarding, "/echo", Some(&better)).await;
        assert_eq!(seen.body, "header seen: true");
        assert_eq!(balance(&seen), left);
    }

    let before = api.record().await;
    let mut padded = api.setup.pay(2_000);
    padded.input[0].script_sig = bitcoin::ScriptBuf::from_bytes(vec![0x00]);
    let refused = get_with(&addr, "/echo", Some(&api.header(&padded))).await;
    assert_eq!(status(&refused), StatusCode::BAD_REQUEST);
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    assert_eq!(json(refused).await["code"], "payment-script-sig");
    assert_eq!(api.record().await, before, "the channel is untouched");
}

/// The master key the receipt tests' layers sign with (each channel's K2 derives from it).
fn receipts_master() -> bitcoin::bip32::Xpriv {
    bitcoin::bip32::Xpriv::new_master(bitcoin::Network::Regtest, &[9; 32]).unwrap()
}

/// `setup`'s channel open on a fresh memory store, and `routes` behind a layer charging
/// `price` that gives receipts signed as `signing` says, served on loopback.
async fn serve_with_receipts(
    setup: &Setup,
    routes: Router,
    price: MilliSats,
    signing: paychan::server::ReceiptSigning,
) -> (MemoryStore, std::net::SocketAddr) {
    setup.open();
    let store = MemoryStore::new();
    store.create(ChannelRecord::open(setup.channel.clone(), 0, setup.pay(10_000))).await.unwrap();
    let (tip, tip_rx) = watch::channel(setup.tip());
    std::mem::forget(tip); // the tip stays where it is for the test's life
    let layer = PaywallLayer::new(store.clone(), price, tip_rx)
        .with_receipts(receipts_master())
        .with_receipt_signing(signing);
    let app = routes.layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (store, addr)
}

/// The receipt links to the digest the request names in `Payment-Receipt-Prev`, whatever
/// the case of its hex, on every path that signs one: every receipt signed, a receipt of a
/// batch that comes due (a client that accepts at most 2 in a row gets each signed), and the
/// receipt that ends a metered stream. A malformed link (not 64 hex digits) is no link: the
/// receipt comes unlinked, and the request is served and charged as any other.
#[tokio::test]
async fn a_receipt_links_to_the_named_digest_and_a_malformed_one_is_no_link() {
    use axum::response::sse::{Event, Sse};
    use paychan::server::{ReceiptSigning, StreamMeter};
    use paychan::wire::{PAYMENT_RECEIPT, PAYMENT_RECEIPT_PREV, PAYMENT_RECEIPT_UNSIGNED, Receipt};

    let digest = [0xab_u8; 32];
    let lower = "ab".repeat(32);
    let upper = lower.to_uppercase();
    let short = "ab".repeat(31);
    let not_hex = format!("{}zz", "ab".repeat(31));
    let links = [
        (Some(lower.as_str()), Some(digest)),
        (Some(upper.as_str()), Some(digest)),
        (Some(short.as_str()), None),
        (Some(not_hex.as_str()), None),
        (None, None),
    ];
    for (signing, said) in [(ReceiptSigning::Every, None), (ReceiptSigning::default(), Some("0/2"))]
    {
        let tokens = |meter: StreamMeter| async move {
            let events =
                ["a", "b"].map(|w| Ok::<_, std::convert::Infallible>(Event::default().data(w)));
            Sse::new(meter.sse(futures_util::stream::iter(events), MilliSats::from_msat(1_000)))
        };
        let routes =
            Router::new().route("/paid", get(|| async { "ok" })).route("/tokens", get(tokens));
        let setup = Setup::new();
        let (store, addr) = serve_with_receipts(&setup, routes, PRICE, signing).await;
        let id = wire::ChannelId::new(setup.channel.outpoint());
        let header = wire::encode_payment(&setup.pay(10_000));
        for (prev, expected) in links {
            let mut headers = vec![(wire::PAYMENT_CHANNEL, header.as_str())];
            headers.extend(prev.map(|prev| (PAYMENT_RECEIPT_PREV, prev)));
            headers.extend(said.map(|said| (PAYMENT_RECEIPT_UNSIGNED, said)));
            let before = store.load(id).await.unwrap().unwrap().unspent();
            let reply = call(addr, "GET", "/paid", &headers, None).await;
            assert_eq!(status(&reply), StatusCode::OK, "{prev:?}");
            let value = reply.header(PAYMENT_RECEIPT).unwrap();
            let receipt = Receipt::decode(value.as_bytes()).unwrap();
            assert!(receipt.is_signed(), "{signing:?}: {value}");
            assert_eq!(receipt.prev_digest(), expected, "{signing:?}, {prev:?}");
            let after = store.load(id).await.unwrap().unwrap().unspent();
            assert_eq!(after, before.saturating_sub(PRICE), "charged the price, {prev:?}");
            // The stream's closing receipt, its last event, links to the same digest.
            let reply = call(addr, "GET", "/tokens", &headers, None).await;
            assert_eq!(status(&reply), StatusCode::OK, "{prev:?}");
            let closing = reply.body.split("event: payment-receipt\ndata: ").nth(1);
            let closing = closing.and_then(|rest| rest.lines().next()).expect("a closing receipt");
            let closing = Receipt::decode(closing.as_bytes()).unwrap();
            assert!(closing.is_signed());
            assert_eq!(closing.prev_digest(), expected, "the stream's, {signing:?}, {prev:?}");
        }
    }
}

/// A client that sends a stale or fixed count of the unsigned receipts it holds (here always
/// 0, of at most 256) still gets no more in a row than half what it accepts: the node's own
/// count stops there too, whatever its batch (1 024 by default).
#[tokio::test]
async fn a_client_that_does_not_count_gets_no_more_unsigned_than_it_accepts() {
    use paychan::server::ReceiptSigning;
    use paychan::wire::{PAYMENT_RECEIPT, PAYMENT_RECEIPT_UNSIGNED};

    let within = std::time::Duration::from_secs(3_600);
    let batches = ReceiptSigning::Batched { every: 1_024, within };
    let setup = Setup::new();
    let routes = Router::new().route("/paid", get(|| async { "ok" }));
    let (_, addr) = serve_with_receipts(&setup, routes, MilliSats::from_msat(1_000), batches).await;
    let header = wire::encode_payment(&setup.pay(10_000));
    let headers = [(wire::PAYMENT_CHANNEL, header.as_str()), (PAYMENT_RECEIPT_UNSIGNED, "0/256")];
    let (mut run, mut longest, mut signed) = (0, 0, 0);
    for _ in 0..300 {
        let reply = call(addr, "GET", "/paid", &headers, None).await;
        assert_eq!(status(&reply), StatusCode::OK);
        match reply.header(PAYMENT_RECEIPT).unwrap().starts_with("u1,") {
            true => run += 1,
            false => (run, signed) = (0, signed + 1),
        }
        longest = longest.max(run);
    }
    assert_eq!(longest, 127, "at most half of 256 in a row, less the one signed");
    assert_eq!(signed, 3, "the first, then every 128th");
}

/// Who gets signed receipts: a client that does not send `Payment-Receipt-Unsigned` (every
/// client before batches) gets every receipt signed, and so does a malformed header; one
/// that sends it gets the node's first signed and then batches, signed at once when it says
/// it holds half as many as it accepts (or its max is 1 or less); `ReceiptSigning::Every` signs every
/// receipt whatever the client says. Signed ones verify under the channel's K2.
#[tokio::test]
async fn receipts_are_signed_for_any_client_that_does_not_ask_for_batches() {
    use paychan::server::ReceiptSigning;
    use paychan::wire::{PAYMENT_RECEIPT, PAYMENT_RECEIPT_UNSIGNED, Receipt};

    let k2 = paychan::channel::channel_key(&receipts_master(), 0).unwrap();
    let k2 = k2.public_key(&bitcoin::secp256k1::Secp256k1::new());
    let batched = ReceiptSigning::default();
    for (signing, said, expected) in [
        (batched, None, [true; 4]),
        (batched, Some("garbage"), [true; 4]),
        (batched, Some("0/128"), [true, false, false, false]),
        (batched, Some("63/128"), [true; 4]),
        (batched, Some("2/3"), [true; 4]),
        (ReceiptSigning::Every, Some("0/128"), [true; 4]),
    ] {
        let setup = Setup::new();
        let routes = Router::new().route("/paid", get(|| async { "ok" }));
        let (_, addr) = serve_with_receipts(&setup, routes, PRICE, signing).await;
        let header = wire::encode_payment(&setup.pay(10_000));
        let mut headers = vec![(wire::PAYMENT_CHANNEL, header.as_str())];
        headers.extend(said.map(|said| (PAYMENT_RECEIPT_UNSIGNED, said)));
        let mut signed = [false; 4];
        for slot in &mut signed {
            let reply = call(addr, "GET", "/paid", &headers, None).await;
            assert_eq!(status(&reply), StatusCode::OK);
            let value = reply.header(PAYMENT_RECEIPT).unwrap();
            // An unsigned one comes in the compact form, which the client completes.
            let (channel, paid) = (setup.channel.outpoint(), MilliSats::from_msat(10_000_000));
            let channel = wire::ChannelId::new(channel);
            let receipt =
                Receipt::decode_for(value.as_bytes(), channel, ("GET", "/paid"), paid, None);
            let receipt = receipt.unwrap();
            assert_eq!(value.starts_with("u1,"), !receipt.is_signed(), "{value}");
            *slot = receipt.is_signed();
            if receipt.is_signed() {
                assert_eq!(receipt.verify(&k2), Ok(()), "{said:?}");
            }
        }
        assert_eq!(signed, expected, "{signing:?} for a client that says {said:?}");
    }
}
