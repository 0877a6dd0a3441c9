//! The paying client against servers that lie or fail on purpose (issue #23, part B): a
//! `/fund` that keeps the funding and fails, redirects off the origin, a far tip, the close
//! margin switch. Each test fails on the code before its fix.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Amount, Network, Transaction};
use common::counting::{Counting, get_work, http_client};
use common::http::serve;
use common::{p2wpkh, secret};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::chain::follow_tip;
use paychan::chain::sim::SimulatedChain;
use paychan::channel::Terms;
use paychan::client::{
    ClientError, ClientStore, KeyWallet, MemoryClientStore, Payer, PayerBuilder, PaymentLayer,
    PaymentService, SpendingPolicy,
};
use paychan::server::{Negotiation, PaywallLayer};
use paychan::store::MemoryStore;
use serde_json::Value;
use tower::ServiceBuilder;

const PRICE: MilliSats = MilliSats::from_msat(150_000);
const WALLET: Amount = Amount::from_sat(500_000);

struct Server {
    chain: SimulatedChain,
    origin: String,
}

/// An honest server on a fresh simulated chain (`/work` costs [`PRICE`]), its router passed
/// through `wrap` (a layer that makes it lie).
async fn server(wrap: impl FnOnce(Router) -> Router) -> Server {
    let chain = SimulatedChain::new();
    let paywall = common::paywall(&chain, PRICE, Amount::from_sat(1_000)).await;
    let app = Router::new().route("/work", get(|| async { "done" })).layer(paywall);
    let addr = serve(wrap(app)).await;
    Server { chain, origin: format!("http://{addr}") }
}

fn policy() -> SpendingPolicy {
    SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(200_000))
}

/// A wallet with one coin of [`WALLET`] on `chain`.
fn funded_wallet(chain: &SimulatedChain) -> KeyWallet {
    let wallet = KeyWallet::new(secret(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), WALLET);
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    wallet
}

/// A payer for `server` funded by `wallet`: 50 000 sat channels.
fn builder(server: &Server, wallet: &KeyWallet) -> PayerBuilder<MemoryClientStore> {
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    Payer::builder(&server.origin, Network::Regtest, key)
        .policy(policy())
        .wallet(wallet.clone())
        .channel_value(Amount::from_sat(50_000))
}

fn paying_client<S: ClientStore + 'static>(payer: &Payer<S>) -> PaymentService<Counting, S> {
    let inner = Counting { http: http_client(), refusals: Arc::default() };
    ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(inner)
}

// --- 1. `/fund` failing or timing out ---------------------------------------------------------

/// How a lying `/fund` answers once the server kept (and broadcast) the funding.
#[derive(Clone, Copy)]
enum FundLie {
    /// 502, every time.
    BadGateway,
    /// 502 the first time, the server's own answer after.
    BadGatewayOnce,
    /// No answer at all.
    Silence,
}

#[derive(Clone)]
struct FundSpy {
    lie: FundLie,
    fundings: Arc<Mutex<Vec<Transaction>>>,
}

/// Hands every `/fund` to the server (which broadcasts the funding and opens the channel),
/// records the funding, and answers as `lie` says.
async fn lying_fund(State(spy): State<FundSpy>, request: Request, next: Next) -> Response {
    if !request.uri().path().ends_with("/fund") {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let value: Value = serde_json::from_slice(&bytes).unwrap();
    let funding: Transaction = deserialize_hex(value["funding_tx"].as_str().unwrap()).unwrap();
    let first = {
        let mut fundings = spy.fundings.lock().unwrap();
        fundings.push(funding);
        fundings.len() == 1
    };
    let answer = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    match spy.lie {
        FundLie::BadGatewayOnce if !first => answer,
        FundLie::BadGateway | FundLie::BadGatewayOnce => {
            (StatusCode::BAD_GATEWAY, "upstream went away").into_response()
        }
        FundLie::Silence => std::future::pending().await,
    }
}

/// The distinct fundings the server was handed.
fn distinct(fundings: &Mutex<Vec<Transaction>>) -> Vec<Transaction> {
    let mut distinct: Vec<Transaction> = Vec::new();
    for tx in fundings.lock().unwrap().iter() {
        if !distinct.iter().any(|d| d.compute_txid() == tx.compute_txid()) {
            distinct.push(tx.clone());
        }
    }
    distinct
}

async fn fund_keeps_the_funding_and_fails(lie: FundLie) {
    let spy = FundSpy { lie, fundings: Arc::default() };
    let layer = spy.clone();
    let server = server(move |app| app.layer(from_fn_with_state(layer, lying_fund))).await;
    let wallet = funded_wallet(&server.chain);
    let store = MemoryClientStore::new();
    let payer = builder(&server, &wallet)
        .negotiation_timeout(Duration::from_millis(500))
        .store(store.clone())
        .build()
        .unwrap();
    let mut client = paying_client(&payer);
    for _ in 0..3 {
        let answer = get_work(&mut client, &server.origin).await;
        assert!(answer.is_err(), "nothing can be served: {answer:?}");
    }
    let fundings = distinct(&spy.fundings);
    assert!(!fundings.is_empty());
    for tx in &fundings {
        let inputs: Vec<_> = tx.input.iter().map(|i| i.previous_output.to_string()).collect();
        println!("funding {} spends {inputs:?}", tx.compute_txid());
    }
    // Every two fundings the client signed spend a common coin: at most one can confirm.
    for (i, a) in fundings.iter().enumerate() {
        for b in &fundings[i + 1..] {
            let common = a
                .input
                .iter()
                .any(|x| b.input.iter().any(|y| x.previous_output == y.previous_output));
            assert!(common, "{} and {} can both confirm", a.compute_txid(), b.compute_txid());
        }
    }
    // The chain agrees: the server broadcast the first; no other one is accepted beside it.
    let accepted = fundings.iter().filter(|tx| server.chain.submit(tx).is_ok()).count();
    assert_eq!(accepted, 1, "{} fundings signed", fundings.len());
    // What the server may hold counts: each channel's first payment and funding fee.
    let channels = store.list().await.unwrap();
    assert_eq!(channels.len(), fundings.len());
    let paid: Amount = channels.iter().map(|c| c.paid()).sum();
    let fees: Amount = channels.iter().map(|c| c.funding_fee).sum();
    assert!(paid > Amount::ZERO && fees > Amount::ZERO);
    assert_eq!(payer.committed().await.unwrap(), paid);
    assert_eq!(payer.funding_fees().await.unwrap(), fees);
    assert!(channels.iter().all(|c| c.unacknowledged_funding.is_some() && !c.closed));
    // The wallet counts no change of a funding in doubt as a coin (its only coin is spent by
    // the funding the server broadcast).
    assert_eq!(wallet.balance(), Amount::ZERO);
    // Until the chain shows which one went out: then its change is the wallet's.
    let broadcast =
        fundings.iter().find(|tx| server.chain.mempool_txids().contains(&tx.compute_txid()));
    let change =
        broadcast.unwrap().output.iter().find(|o| o.script_pubkey == wallet.script_pubkey());
    assert_eq!(wallet.sync(&server.chain, 0).await.unwrap(), change.unwrap().value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fund_that_keeps_the_funding_and_answers_502_leaves_one_funding_that_can_confirm() {
    fund_keeps_the_funding_and_fails(FundLie::BadGateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fund_that_keeps_the_funding_and_never_answers_leaves_one_funding_that_can_confirm() {
    fund_keeps_the_funding_and_fails(FundLie::Silence).await;
}

/// A `/fund` whose answer is lost once is sent again with the same funding (it is
/// idempotent): the request is served on the one channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_fund_answer_is_retried_with_the_same_funding() {
    let spy = FundSpy { lie: FundLie::BadGatewayOnce, fundings: Arc::default() };
    let layer = spy.clone();
    let server = server(move |app| app.layer(from_fn_with_state(layer, lying_fund))).await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet).build().unwrap();
    let mut client = paying_client(&payer);
    let answer = get_work(&mut client, &server.origin).await.unwrap();
    assert_eq!(answer, (StatusCode::OK, "done".to_owned()));
    assert_eq!(spy.fundings.lock().unwrap().len(), 2, "sent twice");
    assert_eq!(distinct(&spy.fundings).len(), 1, "the same funding");
    let channel = payer.channel().await.unwrap().expect("a channel");
    assert_eq!(channel.unacknowledged_funding, None);
    assert_eq!(wallet.balance(), WALLET - Amount::from_sat(50_000) - channel.funding_fee);
}

// --- 2. Redirects -------------------------------------------------------------------------

/// Another origin: answers everything with 200 and counts the requests that carried the
/// payment header or a payment in their body.
async fn foreign_origin() -> (String, Arc<Mutex<usize>>) {
    let leaks = Arc::new(Mutex::new(0));
    let count = Arc::clone(&leaks);
    let app = Router::new().fallback(move |request: Request| {
        let count = Arc::clone(&count);
        async move {
            let header = request.headers().contains_key(paychan::wire::PAYMENT_CHANNEL);
            let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap();
            if header || String::from_utf8_lossy(&body).contains("payment") {
                *count.lock().unwrap() += 1;
            }
            "{}"
        }
    });
    (format!("http://{}", serve(app).await), leaks)
}

/// `path` (on the server) redirects with a 307 to the same path at `elsewhere`.
fn redirect_to(elsewhere: String, path: &'static str) -> impl FnOnce(Router) -> Router {
    move |app: Router| {
        app.layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            let elsewhere = elsewhere.clone();
            async move {
                if request.uri().path().ends_with(path) {
                    let target = format!("{elsewhere}{}", request.uri().path());
                    return axum::response::Redirect::temporary(&target).into_response();
                }
                next.run(request).await
            }
        }))
    }
}

/// The reqwest middleware on a default reqwest client (which follows every redirect): the
/// payment header never reaches another origin; built with `PaymentMiddleware::client` it pays
/// at home and hands the redirect back.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reqwest_middleware_never_sends_the_header_off_the_origin() {
    use paychan::client::PaymentMiddleware;

    let (elsewhere, leaks) = foreign_origin().await;
    let server = server(redirect_to(elsewhere, "/moved")).await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet).build().unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(PaymentMiddleware::new(payer.clone()))
        .build();
    for path in ["/work", "/moved", "/work", "/moved"] {
        let _ = client.get(format!("{}{path}", server.origin)).send().await;
    }
    assert_eq!(*leaks.lock().unwrap(), 0, "the header reached another origin");

    let client = PaymentMiddleware::client(payer, reqwest::Client::builder()).unwrap().build();
    let served = client.get(format!("{}/work", server.origin)).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let moved = client.get(format!("{}/moved", server.origin)).send().await.unwrap();
    assert_eq!(moved.status(), StatusCode::TEMPORARY_REDIRECT, "the redirect, as it is");
    assert_eq!(*leaks.lock().unwrap(), 0, "the header reached another origin");
}

/// The payer's own transport: a 307 on the close endpoint to another origin is a refusal, and
/// the header stays at home.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_redirected_elsewhere_does_not_carry_the_header() {
    use paychan::client::ReqwestTransport;

    let (elsewhere, leaks) = foreign_origin().await;
    let server = server(redirect_to(elsewhere, "/close")).await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet).transport(ReqwestTransport::new().unwrap()).build();
    let payer = payer.unwrap();
    let mut client = paying_client(&payer);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    let closed = payer.close().await;
    assert!(
        matches!(closed, Err(ClientError::Rejected { status: StatusCode::TEMPORARY_REDIRECT, .. })),
        "{closed:?}"
    );
    assert_eq!(*leaks.lock().unwrap(), 0, "the close reached another origin");
    assert!(payer.channel().await.unwrap().is_some(), "the channel is still the payer's");
}

/// The same for the funding: a 307 on `/fund` sends neither the funding's first payment nor
/// anything else elsewhere.
#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fund_redirected_elsewhere_does_not_carry_the_payment() {
    use paychan::client::ReqwestTransport;

    let (elsewhere, leaks) = foreign_origin().await;
    let server = server(redirect_to(elsewhere, "/fund")).await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet).transport(ReqwestTransport::new().unwrap()).build();
    let opened = payer.unwrap().open().await;
    assert!(opened.is_err(), "{opened:?}");
    assert_eq!(*leaks.lock().unwrap(), 0, "the funding's payment reached another origin");
}

// --- 3. Tips ------------------------------------------------------------------------------

/// The terms report a tip 100 000 blocks ahead of the chain.
async fn far_tip(request: Request, next: Next) -> Response {
    let terms =
        request.uri().path().ends_with("/terms") || request.uri().path().contains("well-known");
    let response = next.run(request).await;
    if !terms {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if let Some(height) = value["tip"]["height"].as_u64() {
        value["tip"]["height"] = (height + 100_000).into();
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(value.to_string()))
}

/// A server on `network` whose terms report a tip 100 000 blocks ahead.
async fn far_tip_server(network: Network) -> Server {
    let chain = SimulatedChain::new();
    let master = Xpriv::new_master(network, &[0x5e; 32]).unwrap();
    let negotiation =
        Negotiation::new(network, Terms::default(), master, p2wpkh(&secret(2)), chain.clone());
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let paywall = PaywallLayer::new(MemoryStore::new(), PRICE, tip)
        .with_prepaid_top_up(MilliSats::from_sat(Amount::from_sat(1_000)).unwrap())
        .with_negotiation(negotiation);
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(paywall)
        .layer(axum::middleware::from_fn(far_tip));
    Server { chain, origin: format!("http://{}", serve(app).await) }
}

/// On a real network, a payer without a chain view does not take the server's word for the
/// tip: it opens nothing (a tip 100 000 blocks ahead would lock the refund about two years).
/// With its own chain view the far tip is refused; with `trust_server_tip(true)` it is
/// trusted, as asked, and `max_locked` still counts the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_tip_cannot_lock_the_refund_for_years() {
    let server = far_tip_server(Network::Signet).await;
    let wallet = funded_wallet(&server.chain);
    let key = Xpriv::new_master(Network::Signet, &[0x11; 32]).unwrap();
    let builder = || {
        Payer::builder(&server.origin, Network::Signet, key)
            .policy(policy())
            .wallet(wallet.clone())
            .channel_value(Amount::from_sat(50_000))
    };
    let mut client = paying_client(&builder().build().unwrap());
    let answer = get_work(&mut client, &server.origin).await;
    assert!(matches!(answer, Err(ClientError::NoChainView)), "{answer:?}");
    assert_eq!(wallet.balance(), WALLET, "nothing funded");

    let mut client = paying_client(&builder().chain(server.chain.clone()).build().unwrap());
    let answer = get_work(&mut client, &server.origin).await;
    assert!(
        matches!(&answer, Err(ClientError::ServerMisbehaved(m)) if m.kind == paychan::client::MisbehaviorKind::TipSkew),
        "{answer:?}"
    );
    assert_eq!(wallet.balance(), WALLET, "nothing funded");

    // Trusted on purpose (documented): the payer goes on with the server's tip (which this
    // server's own negotiation then refuses as out of its bounds).
    let payer = builder().trust_server_tip(true).build().unwrap();
    let answer = get_work(&mut paying_client(&payer), &server.origin).await;
    assert!(!matches!(answer, Err(ClientError::NoChainView)), "{answer:?}");
}

/// F8: without a chain view the payer cannot tell whether a refund is valid (the server's
/// tip could be far ahead), so every channel not closed counts against `max_locked`, however
/// many blocks the server says have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_chain_view_every_channel_not_closed_counts_as_locked() {
    use paychan::client::{PolicyRefusal, ServiceTransport};

    let server = server(|app| app).await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet)
        .policy(policy().with_max_locked(Amount::from_sat(60_000)))
        .transport(ServiceTransport::<_, Full<bytes::Bytes>>::new(http_client()))
        .build()
        .unwrap();
    payer.open().await.unwrap();
    // Past the first channel's expiry by the server's tip.
    server.chain.mine(1_100);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = payer.open().await;
    assert!(
        matches!(second, Err(ClientError::Policy(PolicyRefusal::LockedTooMuch { .. }))),
        "{second:?}"
    );
}

// --- 4. The switch at the close margin; 5. a close from a fresh process -----------------------

/// Waits until the server's terms report the chain's tip (the server follows it by polling).
async fn until_the_server_sees(server: &Server, height: u32) {
    let http = http_client();
    let uri: http::Uri = format!("{}{}", server.origin, paychan::wire::TERMS_PATH).parse().unwrap();
    for _ in 0..200 {
        let response = http.get(uri.clone()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let terms: Value = serde_json::from_slice(&body).unwrap();
        if terms["tip"]["height"].as_u64() == Some(u64::from(height)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server never saw height {height}");
}

/// The transaction in the mempool that spends `outpoint`.
fn spender(chain: &SimulatedChain, outpoint: bitcoin::OutPoint) -> Option<Transaction> {
    chain
        .mempool_txids()
        .into_iter()
        .filter_map(|txid| chain.get_transaction(&txid))
        .find(|tx| tx.input.iter().any(|input| input.previous_output == outpoint))
}

/// F5: an honest server refuses new payments inside its close margin; the payer switches to a
/// new channel by itself, and first closes the old one fairly: the server gets what it served
/// on it, not the whole latest payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_switch_at_the_close_margin_closes_the_old_channel_fairly() {
    let server = server(|app| app).await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet).lifetime_blocks(200).build().unwrap();
    let mut client = paying_client(&payer);
    let mut served = 0;
    for _ in 0..3 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
        served += 1;
    }
    let old = payer.channel().await.unwrap().unwrap();
    let expiry = old.channel.params().expiry.to_consensus_u32();
    let margin = old.channel.params().close_margin;
    server.chain.mine(expiry - margin - server.chain.tip().height);
    until_the_server_sees(&server, expiry - margin).await;
    // Served from the old channel until the server asks for a new one.
    let mut switched = false;
    for _ in 0..20 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
        let now = payer.channel().await.unwrap().unwrap();
        if now.id() != old.id() {
            switched = true;
            break;
        }
        served += 1;
    }
    assert!(switched, "the payer moved to a new channel");
    let close = spender(&server.chain, old.channel.outpoint()).expect("the old channel closed");
    let metered = PRICE.checked_mul(served).unwrap().to_sat_ceil();
    assert_eq!(close.output[0].value, metered, "the server got what it served on it");
    let latest = old.paid();
    assert!(metered < latest, "the whole latest payment ({latest}) was not taken");
}

/// `paychan client close` runs in a new process: a payer with the store but no report of the
/// channel. Its close is fair all the same: it pays what was served, not the latest payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_a_fresh_payer_is_fair() {
    use paychan::client::ServiceTransport;

    let server = server(|app| app).await;
    let wallet = funded_wallet(&server.chain);
    let store = MemoryClientStore::new();
    let payer = builder(&server, &wallet).store(store.clone()).build().unwrap();
    let mut client = paying_client(&payer);
    for _ in 0..10 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    }
    let latest = payer.channel().await.unwrap().unwrap().paid();
    drop((client, payer));

    let fresh = builder(&server, &wallet)
        .store(store)
        .transport(ServiceTransport::<_, Full<bytes::Bytes>>::new(http_client()))
        .build()
        .unwrap();
    let closed = fresh.close().await.unwrap();
    let metered = PRICE.checked_mul(10).unwrap().to_sat_ceil();
    assert_eq!(closed.server_amount, metered, "a fair close (the latest paid {latest})");
    assert!(metered < latest);
}
