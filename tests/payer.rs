//! The paying client over real loopback HTTP: `Payer` behind `PaymentLayer` (hyper-util) and
//! `PaymentMiddleware` (reqwest), against the server's layer on the simulated chain.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Message, Secp256k1};
use bitcoin::{Amount, Network, OutPoint};
use bytes::Bytes;
use common::counting::{Counting, Http, get_work, http_client};
use common::http::serve;
use common::{p2wpkh, secret};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::chain::sim::SimulatedChain;
use paychan::chain::{TxStatus, follow_tip, policy};
use paychan::channel::{LifetimeBounds, Terms};
use paychan::client::{
    ClientError, ClientStore, FileClientStore, KeyWallet, MemoryClientStore, MisbehaviorKind,
    Payer, PayerBuilder, PaymentLayer, PaymentService, PolicyRefusal, ServiceTransport,
    SpendingPolicy,
};
use paychan::server::{Negotiation, PaywallLayer, Pricing, RoutePrices};
use paychan::store::MemoryStore;
use paychan::wire::PAYMENT_CHANNEL;
use serde_json::Value;
use tower::{Service, ServiceBuilder, ServiceExt};

const PRICE: MilliSats = MilliSats::from_msat(150_000);
const WALLET: Amount = Amount::from_sat(500_000);

type Edit = fn(&mut Value);
type Expect = fn(&PolicyRefusal) -> bool;

/// Rewrites the JSON answer of the endpoint whose path ends with `path` (a server that lies)
/// or, without an edit, drops the `Payment-Channel` header of requests to it (a misconfigured
/// proxy).
#[derive(Clone, Copy)]
struct Tamper {
    path: &'static str,
    edit: Option<Edit>,
}

async fn tamper(State(t): State<Option<Tamper>>, request: Request, next: Next) -> Response {
    let mut request = request;
    let hit = t.filter(|t| request.uri().path().ends_with(t.path));
    let edit = match hit {
        Some(Tamper { edit: Some(edit), .. }) => edit,
        Some(Tamper { edit: None, .. }) => {
            request.headers_mut().remove(PAYMENT_CHANNEL);
            return next.run(request).await;
        }
        None => return next.run(request).await,
    };
    let response = next.run(request).await;
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    edit(&mut value);
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(value.to_string()))
}

/// The default policy, accepting this server's price.
fn policy() -> SpendingPolicy {
    SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(200_000))
}

struct Server {
    chain: SimulatedChain,
    origin: String,
}

async fn server_with(terms: Terms, bundle: Amount, lie: Option<Tamper>) -> Server {
    server_priced(PRICE, terms, bundle, lie).await
}

/// A server whose `/work` and `/dear` cost what `pricing` says.
async fn server_priced<P: Pricing<Body>>(
    pricing: P,
    terms: Terms,
    bundle: Amount,
    lie: Option<Tamper>,
) -> Server {
    server_priced_with(pricing, terms, bundle, lie, |app| app).await
}

/// [`server_priced`], its router passed through `wrap` (another layer on top).
async fn server_priced_with<P: Pricing<Body>>(
    pricing: P,
    terms: Terms,
    bundle: Amount,
    lie: Option<Tamper>,
    wrap: impl FnOnce(Router) -> Router,
) -> Server {
    let chain = SimulatedChain::new();
    let master = Xpriv::new_master(Network::Regtest, &[0x5e; 32]).unwrap();
    let negotiation =
        Negotiation::new(Network::Regtest, terms, master, p2wpkh(&secret(2)), chain.clone());
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let paywall = PaywallLayer::new(MemoryStore::new(), pricing, tip)
        .with_prepaid_top_up(MilliSats::from_sat(bundle).unwrap())
        .with_negotiation(negotiation);
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .route("/dear", get(|| async { "dear" }))
        .layer(paywall)
        .layer(from_fn_with_state(lie, tamper));
    let addr = serve(wrap(app)).await;
    Server { chain, origin: format!("http://{addr}") }
}

async fn server() -> Server {
    server_with(Terms::default(), Amount::from_sat(1_000), None).await
}

struct Wallet {
    wallet: KeyWallet,
}

fn funded_wallet(chain: &SimulatedChain) -> Wallet {
    let wallet = KeyWallet::new(secret(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), WALLET);
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    Wallet { wallet }
}

/// A payer for `server` funded by `wallet`: 50 000 sat channels, the test policy.
fn builder(server: &Server, wallet: &Wallet) -> PayerBuilder<MemoryClientStore> {
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    Payer::builder(&server.origin, Network::Regtest, key)
        .policy(policy())
        .wallet(wallet.wallet.clone())
        .channel_value(Amount::from_sat(50_000))
}

fn payer_with<S: ClientStore>(
    server: &Server,
    wallet: &Wallet,
    store: S,
    policy: SpendingPolicy,
) -> Payer<S> {
    builder(server, wallet).store(store).policy(policy).build().unwrap()
}

fn paying_client<S: ClientStore + 'static>(
    payer: &Payer<S>,
) -> (PaymentService<Counting, S>, Arc<AtomicUsize>) {
    let refusals = Arc::new(AtomicUsize::new(0));
    let inner = Counting { http: http_client(), refusals: Arc::clone(&refusals) };
    (ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(inner), refusals)
}

/// Requests `/work` until one is not served (at most `most` served): how many were served, and
/// the first answer that was not a 200.
async fn until_refused<S: ClientStore + 'static>(
    client: &mut PaymentService<Counting, S>,
    origin: &str,
    most: usize,
) -> (usize, Result<(StatusCode, String), ClientError>) {
    let mut served = 0;
    loop {
        match get_work(client, origin).await {
            Ok((StatusCode::OK, _)) => served += 1,
            other => return (served, other),
        }
        assert!(served < most, "served {served} requests: the policy must end this");
    }
}

/// The first request against a server that lies on `path` (the answer rewritten by `edit`):
/// its result, after checking that the wallet funded nothing.
async fn first_request_to_a_liar(
    what: &str,
    path: &'static str,
    edit: Edit,
) -> Result<(StatusCode, String), ClientError> {
    let lie = Tamper { path, edit: Some(edit) };
    let server = server_with(Terms::default(), Amount::from_sat(1_000), Some(lie)).await;
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert_eq!(wallet.wallet.balance(), WALLET, "{what}: nothing was funded");
    result
}

/// A server whose every request costs more than a first payment prepays, lying as `lie`
/// says, and a payer for it (funded, accepting that price): the server, the wallet, the payer.
async fn greedy_liar(lie: Tamper) -> (Server, Wallet, Payer) {
    let price = MilliSats::from_msat(1_000_000);
    let server = server_priced(price, Terms::default(), Amount::from_sat(1_000), Some(lie)).await;
    let wallet = funded_wallet(&server.chain);
    let policy = policy().with_max_per_request(price);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy);
    (server, wallet, payer)
}

/// The server's view of a channel.
async fn server_channel(server: &Server, id: &str) -> Value {
    let http: Http = http_client();
    let uri = format!("{}/payment-channel/channels/{id}", server.origin);
    let response = http.get(uri.parse().unwrap()).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_on_the_first_402_tops_up_and_settles_exactly() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let (mut client, refusals) = paying_client(&payer);
    for _ in 0..20 {
        let (status, body) = get_work(&mut client, &server.origin).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "done"));
    }
    // One 402 to open, then one per exhausted prepaid bundle (294 sat, then 1 000 sat more).
    let metered = PRICE.checked_mul(20).unwrap().to_sat_ceil();
    let committed = payer.committed().await.unwrap();
    assert!(committed >= metered, "{committed} paid for {metered} of work");
    assert!(committed <= metered + Amount::from_sat(1_000) + PRICE.to_sat_ceil());
    assert!(refusals.load(Ordering::SeqCst) >= 2);
    let channel = payer.channel().await.unwrap().expect("a channel");
    let view = server_channel(&server, &channel.id().to_string()).await;
    assert_eq!(view["paid_msat"], committed.to_sat() * 1_000);
    assert_eq!(view["spent_msat"], metered.to_sat() * 1_000);
    // Every answer carried a receipt, linked to the one before; the server signs them in
    // batches (its first on the channel at once), with K2: the last signed one, which the
    // payer verified, states what the server had spent by then.
    let receipt = payer.latest_receipt().expect("a verified receipt");
    assert_eq!((receipt.channel, receipt.price_msat), (channel.id(), PRICE));
    assert!(receipt.spent() <= MilliSats::from_sat(metered).unwrap());
    assert!(receipt.is_for("GET", "/work"));
    let k2 = channel.channel.params().server_key.0;
    assert_eq!(receipt.verify(&k2), Ok(()));

    // A fair close: the server gets what it metered, the prepaid rest comes back.
    let closed = client.close().await.unwrap();
    assert_eq!(closed.server_amount, metered);
    // The close's receipt, signed and linked to the last receipt held, is the final proof:
    // everything the channel was charged.
    let proof = payer.latest_receipt().expect("the close's receipt");
    assert!(
        proof.is_signed()
            && proof.is_for("POST", &format!("/payment-channel/channels/{}/close", channel.id()))
    );
    assert_eq!(proof.spent(), MilliSats::from_sat(metered).unwrap());
    assert_eq!(proof.verify(&k2), Ok(()));
    server.chain.mine(1);
    assert!(matches!(server.chain.tx_status(&closed.txid), TxStatus::Confirmed { .. }));
    let settlement = server.chain.get_transaction(&closed.txid).unwrap();
    let funding = server.chain.get_transaction(&channel.channel.outpoint().txid).unwrap();
    let spent = funding.output[channel.channel.outpoint().vout as usize].clone();
    settlement.verify(|_| Some(spent.clone())).expect("consensus accepts the settlement");
    policy::check_standard(&settlement, &[spent]).expect("standard");
    let out = |vout| server.chain.utxo(&OutPoint::new(closed.txid, vout)).unwrap();
    assert_eq!(out(0).value, metered, "the server received exactly what it metered");
    assert_eq!(out(0).script_pubkey, p2wpkh(&secret(2)));
    assert_eq!(out(1).value, closed.client_amount);
    assert_eq!(closed.client_amount + metered + closed.fee, Amount::from_sat(50_000));
    // The channel is retired: the next request opens a new one.
    assert!(payer.channel().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refund_recovers_the_money_after_expiry() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet).lifetime_blocks(150).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    server.chain.mine(1);
    let channel = payer.channel().await.unwrap().unwrap();
    assert_eq!(channel.refund_if_expired(&server.chain).await.unwrap(), None, "not yet");

    let expiry = channel.channel.params().expiry.to_consensus_u32();
    server.chain.mine(expiry - server.chain.tip().height);
    let txid = channel.refund_if_expired(&server.chain).await.unwrap().expect("broadcast");
    server.chain.mine(1);
    assert!(matches!(server.chain.tx_status(&txid), TxStatus::Confirmed { .. }));
    let back = server.chain.utxo(&OutPoint::new(txid, 0)).unwrap();
    let params = channel.channel.params();
    assert_eq!(back.value, params.value - params.refund_fee());
    assert_eq!(back.script_pubkey, params.client_script);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_refund_signature_aborts_before_the_funding_is_signed() {
    fn forge(answer: &mut Value) {
        // A well-formed signature, by another key, over another message.
        let secp = Secp256k1::new();
        let sig = secp.sign_ecdsa(&Message::from_digest([7; 32]), &secret(0x44));
        let mut der = sig.serialize_der().to_vec();
        der.push(1);
        answer["signature"] = der.iter().map(|b| format!("{b:02x}")).collect::<String>().into();
    }
    let lie = Tamper { path: "/payment-channel/refund", edit: Some(forge) };
    let server = server_with(Terms::default(), Amount::from_sat(1_000), Some(lie)).await;
    let wallet = funded_wallet(&server.chain);
    let store = MemoryClientStore::new();
    let payer = payer_with(&server, &wallet, store.clone(), policy());
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert!(matches!(result, Err(ClientError::InvalidRefundSignature)), "{result:?}");
    assert!(server.chain.mempool_txids().is_empty(), "no funding was broadcast");
    assert_eq!(wallet.wallet.balance(), WALLET, "the wallet got its coin back");
    assert!(store.list().await.unwrap().is_empty(), "no channel was saved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_that_differs_from_the_request_is_refused() {
    let lies: [(&str, Edit); 4] = [
        ("value", |v| v["value_sat"] = (v["value_sat"].as_u64().unwrap() + 1).into()),
        ("expiry", |v| v["expiry"] = (v["expiry"].as_u64().unwrap() + 1).into()),
        ("witness_script", |v| v["witness_script"] = "5151ae".into()),
        ("client_script", |v| {
            v["client_script"] = p2wpkh(&secret(0x66)).to_hex_string().into();
        }),
    ];
    for (what, edit) in lies {
        let result = first_request_to_a_liar(what, "/payment-channel/open", edit).await;
        assert!(matches!(result, Err(ClientError::ServerMisbehaved(_))), "{what}: {result:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terms_beyond_the_policy_are_refused_before_anything_is_funded() {
    let mut large = Terms::default();
    large.min_value = Amount::from_sat(200_000);
    large.max_value = Amount::from_sat(300_000);
    let mut long = Terms::default();
    long.blocks = LifetimeBounds { min: 5_000, max: 6_000, close_margin: 36 };
    let cases: [(Terms, Expect); 2] = [
        (large, |r| matches!(r, PolicyRefusal::ChannelTooLarge { .. })),
        (long, |r| matches!(r, PolicyRefusal::LifetimeTooLong { blocks: 5_000, max: 4_320 })),
    ];
    for (terms, expected) in cases {
        let server = server_with(terms, Amount::from_sat(1_000), None).await;
        let wallet = funded_wallet(&server.chain);
        let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
        let (mut client, _) = paying_client(&payer);
        match get_work(&mut client, &server.origin).await {
            Err(ClientError::Policy(refusal)) => assert!(expected(&refusal), "{refusal:?}"),
            other => panic!("expected a policy refusal, got {other:?}"),
        }
        assert_eq!(wallet.wallet.balance(), WALLET);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_limits_are_typed_refusals() {
    // Auto-open off: the first 402 is a refusal; an explicit open is allowed.
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let off = policy().with_auto_open(false);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), off);
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert!(matches!(result, Err(ClientError::Policy(PolicyRefusal::AutoOpenDisabled))));
    client.open().await.unwrap();
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);

    // A price above the per-request maximum.
    let cheap = SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(100_000));
    let payer = payer_with(&server, &funded_wallet(&server.chain), MemoryClientStore::new(), cheap);
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert!(matches!(result, Err(ClientError::Policy(PolicyRefusal::PriceTooHigh { .. }))));

    // The total budget: never exceeded, and the request that would exceed it is refused.
    let budget = policy().with_max_total(Amount::from_sat(1_000));
    let payer =
        payer_with(&server, &funded_wallet(&server.chain), MemoryClientStore::new(), budget);
    let (mut client, _) = paying_client(&payer);
    let (served, refusal) = until_refused(&mut client, &server.origin, 100).await;
    assert!(
        matches!(refusal, Err(ClientError::Policy(PolicyRefusal::BudgetExhausted { .. }))),
        "{refusal:?}"
    );
    // The budget counts the payments and the funding's fee (issue #12).
    let (committed, fees) = (payer.committed().await.unwrap(), payer.funding_fees().await.unwrap());
    assert!(committed + fees <= Amount::from_sat(1_000), "{committed} + {fees}");
    let affordable = (1_000 - fees.to_sat()) / 150;
    assert!(served as u64 >= affordable, "{affordable} requests at 150 sat, served {served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_channel_and_never_overpay() {
    // The server suggests prepaying 6 000 sat, the client allows it: one top-up serves all.
    let server = server_with(Terms::default(), Amount::from_sat(6_000), None).await;
    let wallet = funded_wallet(&server.chain);
    let policy = policy().with_max_prepaid(Amount::from_sat(6_000));
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy);
    let (client, _) = paying_client(&payer);
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let mut client = client.clone();
            let origin = server.origin.clone();
            tokio::spawn(async move { get_work(&mut client, &origin).await })
        })
        .collect();
    for task in tasks {
        let (status, body) = task.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let channel = payer.channel().await.unwrap().unwrap();
    let committed = payer.committed().await.unwrap();
    assert_eq!(committed, channel.paid(), "one channel, opened once");
    let metered = PRICE.checked_mul(32).unwrap().to_sat_ceil();
    assert!(committed <= metered + Amount::from_sat(6_000) + PRICE.to_sat_ceil(), "{committed}");
    let view = server_channel(&server, &channel.id().to_string()).await;
    assert_eq!(view["paid_msat"], committed.to_sat() * 1_000);
    assert_eq!(view["spent_msat"], metered.to_sat() * 1_000);
    let funding_fee = WALLET - wallet.wallet.balance() - Amount::from_sat(50_000);
    assert!(funding_fee < Amount::from_sat(1_000), "one funding, fee {funding_fee}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_balance_is_topped_up_before_the_next_402() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet)
        .top_up_below(MilliSats::from_msat(400_000), Amount::from_sat(1_000))
        .build()
        .unwrap();
    let (mut client, refusals) = paying_client(&payer);
    client.open().await.unwrap();
    for _ in 0..25 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(refusals.load(Ordering::SeqCst), 0, "the balance never ran out");
    let committed = payer.committed().await.unwrap();
    let metered = PRICE.checked_mul(25).unwrap().to_sat_ceil();
    assert!(committed >= metered && committed <= metered + Amount::from_sat(1_400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_resumes_its_channel_from_a_file_store() {
    let dir = std::env::temp_dir().join(format!("paychan-payer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let store = FileClientStore::open(&dir).unwrap();
    let payer = payer_with(&server, &wallet, store, policy());
    let (mut client, _) = paying_client(&payer);
    for _ in 0..3 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    }
    let before = payer.channel().await.unwrap().unwrap();
    drop((client, payer));

    let payer = payer_with(&server, &wallet, FileClientStore::open(&dir).unwrap(), policy());
    let (mut client, refusals) = paying_client(&payer);
    assert_eq!(payer.channel().await.unwrap(), Some(before.clone()));
    assert_eq!(payer.committed().await.unwrap(), before.paid());
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    assert_eq!(refusals.load(Ordering::SeqCst), 0, "no new channel was needed");
    // A second channel gets a key index of its own.
    client.open().await.unwrap();
    let second = payer.channel().await.unwrap().unwrap();
    assert_ne!(second.key_index, before.key_index);
    assert_ne!(second.channel.params().client_key, before.channel.params().client_key);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_other_servers_carry_no_payment() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let (mut client, _) = paying_client(&payer);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    let other = serve(Router::new().route(
        "/work",
        get(|headers: http::HeaderMap| async move {
            format!("header: {}", headers.contains_key(PAYMENT_CHANNEL))
        }),
    ))
    .await;
    let (status, body) = get_work(&mut client, &format!("http://{other}")).await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "header: false"));
    assert!(matches!(
        Payer::builder(
            "ftp://example.com",
            Network::Regtest,
            Xpriv::new_master(Network::Regtest, &[1; 32]).unwrap()
        )
        .build(),
        Err(ClientError::InvalidOrigin(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_header_is_an_error_not_a_channel_per_request() {
    let proxy = Tamper { path: "/work", edit: None };
    let server = server_with(Terms::default(), Amount::from_sat(1_000), Some(proxy)).await;
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let (mut client, _) = paying_client(&payer);
    for _ in 0..3 {
        let result = get_work(&mut client, &server.origin).await;
        assert!(
            matches!(&result, Err(ClientError::Rejected { code, .. }) if code == "payment-required"),
            "{result:?}"
        );
    }
    let funded = WALLET - wallet.wallet.balance();
    assert!(funded > Amount::from_sat(50_000) && funded < Amount::from_sat(51_000), "one channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_wallet_no_channel_is_opened() {
    let server = server().await;
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    let payer =
        Payer::builder(&server.origin, Network::Regtest, key).policy(policy()).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert!(matches!(result, Err(ClientError::NoWallet)), "{result:?}");
    let result =
        payer.close_via(&ServiceTransport::<_, Full<Bytes>>::new(client.get_ref().clone())).await;
    assert!(matches!(result, Err(ClientError::NoChannel)), "{result:?}");
    // Built without a transport, it cannot open or close by itself.
    assert!(matches!(payer.open().await, Err(ClientError::NoTransport)));
    assert!(matches!(payer.close().await, Err(ClientError::NoTransport)));
}

#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reqwest_middleware_pays_like_the_layer() {
    use paychan::client::{PaymentMiddleware, ReqwestTransport};

    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let client =
        PaymentMiddleware::client(payer.clone(), reqwest::Client::builder()).unwrap().build();
    for _ in 0..10 {
        let response = client.get(format!("{}/work", server.origin)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "done");
    }
    let metered = PRICE.checked_mul(10).unwrap().to_sat_ceil();
    let committed = payer.committed().await.unwrap();
    assert!(committed >= metered && committed <= metered + Amount::from_sat(1_150));

    let closed = payer.close_via(&ReqwestTransport::new().unwrap()).await.unwrap();
    assert_eq!(closed.server_amount, metered, "a fair close");
    server.chain.mine(1);
    assert!(matches!(server.chain.tx_status(&closed.txid), TxStatus::Confirmed { .. }));

    // A policy refusal comes back as the middleware's error.
    let payer = payer_with(
        &server,
        &funded_wallet(&server.chain),
        MemoryClientStore::new(),
        policy().with_auto_open(false),
    );
    let client = PaymentMiddleware::client(payer, reqwest::Client::builder()).unwrap().build();
    let error = client.get(format!("{}/work", server.origin)).send().await.unwrap_err();
    assert!(error.to_string().contains("automatically"), "{error}");
}

/// Security review C7: terms whose lifetime bounds are inverted, or whose endpoints are not
/// paths on the server's origin (`@host/x` would move the request to another host), are a
/// misbehaving server, not a panic nor a request elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terms_that_would_panic_or_redirect_the_client_are_refused() {
    let lies: [(&str, Edit); 2] = [
        ("inverted bounds", |v| v["lifetime_blocks"]["min"] = 100_000.into()),
        ("another host", |v| v["endpoints"]["open"] = "@127.0.0.2:9/open".into()),
    ];
    for (what, edit) in lies {
        let result = first_request_to_a_liar(what, "/.well-known/payment-channel", edit).await;
        assert!(matches!(result, Err(ClientError::ServerMisbehaved(_))), "{what}: {result:?}");
    }
}

/// Security review C2, C3, C5: fee rates the server sets are capped by the policy (funding,
/// and the channel's rate that the refund and every payment pay), and a 402 asking for more
/// than the request's price plus `max_prepaid` is refused, whatever the body says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_set_fee_rates_and_top_ups_are_bounded_by_the_policy() {
    let lies: [(&str, &'static str, Edit); 2] = [
        ("funding fee rate", "/.well-known/payment-channel", |v| {
            v["funding_min_fee_rate_sat_per_vb"] = 20_000.into()
        }),
        ("channel fee rate", "/payment-channel/open", |v| {
            // Consistent, so that only the rate is wrong: the refund's 138 vB at 700 sat/vB.
            v["min_fee_rate_sat_per_vb"] = 700.into();
            v["max_fee_rate_sat_per_vb"] = 1_000.into();
            v["refund_fee_sat"] = (138 * 700).into();
        }),
    ];
    for (what, path, edit) in lies {
        let result = first_request_to_a_liar(what, path, edit).await;
        assert!(
            matches!(result, Err(ClientError::Policy(PolicyRefusal::FeeRateTooHigh { .. }))),
            "{what}: {result:?}"
        );
    }

    // A 402 that asks for the whole channel for one 150-sat request.
    let lie = Tamper {
        path: "/work",
        edit: Some(|v| {
            if v["code"] == "insufficient-balance" {
                v["channel"]["min_server_amount_sat"] = 90_000.into();
                v["channel"]["suggested_server_amount_sat"] = 90_000.into();
            }
        }),
    };
    let server = server_with(Terms::default(), Amount::from_sat(1_000), Some(lie)).await;
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let (mut client, _) = paying_client(&payer);
    let (_, refusal) = until_refused(&mut client, &server.origin, 50).await;
    assert!(
        matches!(refusal, Err(ClientError::Policy(PolicyRefusal::TopUpTooLarge { .. }))),
        "{refusal:?}"
    );
    let paid = payer.committed().await.unwrap();
    assert!(paid < Amount::from_sat(5_000), "the client paid {paid}, never the 90 000 asked");
}

/// Review C1: a server whose terms put the tip a million blocks ahead would have the client
/// lock its coins for ~19 years. A client with its own chain view refuses before anything is
/// funded; an honest server's channel gets its lock time from the client's tip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_time_comes_from_the_clients_own_tip() {
    let lie = Tamper {
        path: "/.well-known/payment-channel",
        edit: Some(|terms| {
            let height = terms["tip"]["height"].as_u64().unwrap();
            terms["tip"]["height"] = (height + 1_000_000).into();
        }),
    };
    let liar = server_with(Terms::default(), Amount::from_sat(1_000), Some(lie)).await;
    let wallet = funded_wallet(&liar.chain);
    let payer = builder(&liar, &wallet).chain(liar.chain.clone()).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &liar.origin).await;
    assert!(
        matches!(&result, Err(ClientError::ServerMisbehaved(what)) if what.kind == MisbehaviorKind::TipSkew),
        "{result:?}"
    );
    assert_eq!(wallet.wallet.balance(), WALLET, "nothing was funded");

    let honest = server().await;
    let wallet = funded_wallet(&honest.chain);
    let payer = builder(&honest, &wallet).chain(honest.chain.clone()).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    assert_eq!(get_work(&mut client, &honest.origin).await.unwrap().0, StatusCode::OK);
    let status = payer.status().await.unwrap().expect("a channel");
    let own = honest.chain.tip().height;
    assert_eq!(status.expiry.to_consensus_u32(), own + 1_008, "the client's default lifetime");
}

/// The user trial of issue #12: a 50-sat route served from the prepaid balance to a client
/// whose `max_per_request` is 10 sat. The balance the server reports shows the overcharge:
/// the request was served (what was prepaid is the bound), and the payer pays it no more.
///
/// The same server claiming that every answer is a metered stream (`Payment-Channel-Stream`
/// on plain answers) or a free replay (`Idempotent-Replayed`) is judged the same: a claim is
/// not a stream, and a request without an idempotency key is never a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_charges_more_than_the_policy_is_paid_no_more() {
    for claims_streams in [false, true] {
        overcharged(claims_streams).await;
    }
}

async fn overcharged(claims_streams: bool) {
    let prices = RoutePrices::new()
        .route(http::Method::GET, "/work", MilliSats::from_msat(5_000))
        .route(http::Method::GET, "/dear", MilliSats::from_msat(50_000));
    let wrap = move |app: Router| {
        if !claims_streams {
            return app;
        }
        app.layer(axum::middleware::map_response(|mut response: Response| async move {
            let claim = http::HeaderValue::from_static("sse; per-event=1");
            response.headers_mut().insert(paychan::wire::PAYMENT_CHANNEL_STREAM, claim);
            // And that it is a replay, free: a request without an idempotency key is not.
            let replay = http::HeaderValue::from_static("true");
            response.headers_mut().insert(paychan::wire::IDEMPOTENT_REPLAYED, replay);
            response
        }))
    };
    let server =
        server_priced_with(prices, Terms::default(), Amount::from_sat(1_000), None, wrap).await;
    let wallet = funded_wallet(&server.chain);
    let policy = SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(10_000));
    // A proactive top-up would trigger after the overcharge drained the balance: it must not.
    let payer = builder(&server, &wallet)
        .policy(policy)
        .top_up_below(MilliSats::from_sat(Amount::from_sat(2_000)).unwrap(), Amount::from_sat(500))
        .build()
        .unwrap();
    let (mut client, _) = paying_client(&payer);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    let committed = payer.committed().await.unwrap();
    let dear = http::Request::get(format!("{}/dear", server.origin)).body(Full::default()).unwrap();
    let served = client.ready().await.unwrap().call(dear).await.unwrap();
    assert_eq!(served.status(), StatusCode::OK, "served from the prepaid balance");
    let status = payer.status().await.unwrap().expect("a channel");
    let charged = MilliSats::from_sat(status.paid).unwrap().saturating_sub(status.balance.unwrap());
    assert_eq!(charged, MilliSats::from_msat(55_000), "what the server reports it spent");

    let result = get_work(&mut client, &server.origin).await;
    assert!(
        matches!(result, Err(ClientError::Overcharged { charged, allowed })
            if charged == MilliSats::from_msat(55_000) && allowed == MilliSats::from_msat(20_000)),
        "{result:?}"
    );
    assert_eq!(payer.committed().await.unwrap(), committed, "nothing more was paid");
    // The loss is bounded by what was prepaid: the price of the request that opened the
    // channel (or the refused one) plus the policy's max_prepaid.
    assert!(committed <= Amount::from_sat(5) + Amount::from_sat(1_000) + Amount::from_sat(330));
}

/// Review C4: a server that answers `unknown-channel` to every paid request makes the client
/// open a channel per request; the policy's `max_opens` (3 an hour by default) ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_forgets_every_channel_gets_max_opens_channels() {
    let lie = Tamper {
        path: "/work",
        edit: Some(|problem| {
            problem["code"] = "unknown-channel".into();
            problem.as_object_mut().unwrap().remove("channel");
        }),
    };
    let (server, wallet, payer) = greedy_liar(lie).await;
    let (mut client, _) = paying_client(&payer);
    for n in 1..=3 {
        server.chain.mine(1); // the wallet's change confirms: each funding is served at once
        let result = get_work(&mut client, &server.origin).await;
        assert!(matches!(result, Err(ClientError::Rejected { .. })), "request {n}: {result:?}");
    }
    server.chain.mine(1);
    let result = get_work(&mut client, &server.origin).await;
    assert!(
        matches!(result, Err(ClientError::Policy(PolicyRefusal::TooManyOpens { count: 3, .. }))),
        "{result:?}"
    );
    let locked = WALLET - wallet.wallet.balance();
    assert!(locked < Amount::from_sat(3 * 50_000 + 3 * 1_000), "three channels at most: {locked}");
}

/// Review C6: a redirect to another origin (reqwest follows it) is answered there with a 402;
/// that answer is not the server's, so it drives no payment: no channel is opened for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_elsewhere_never_drives_a_payment() {
    use paychan::client::PaymentMiddleware;

    let chain = SimulatedChain::new();
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    // Another paywalled origin, which answers a payable 402 to a header it does not know, and
    // counts the requests it sees.
    let seen = Arc::new(AtomicUsize::new(0));
    let count = {
        let seen = Arc::clone(&seen);
        move |request: Request, next: Next| {
            seen.fetch_add(1, Ordering::SeqCst);
            next.run(request)
        }
    };
    let elsewhere = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(
            PaywallLayer::new(MemoryStore::new(), PRICE, tip.clone())
                .with_negotiation(common::negotiation(&chain, 0x5f)),
        )
        .layer(axum::middleware::from_fn(count));
    let target = format!("http://{}/work", serve(elsewhere).await);
    let negotiation = common::negotiation(&chain, 0x5e);
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .route(
            "/moved",
            get(move || {
                let target = target.clone();
                async move { axum::response::Redirect::temporary(&target) }
            }),
        )
        .layer(
            // `/moved` is free: only the other origin's answer could ask for money.
            PaywallLayer::new(
                MemoryStore::new(),
                RoutePrices::new().route(http::Method::GET, "/work", PRICE),
                tip,
            )
            .with_negotiation(negotiation),
        );
    let server = Server { origin: format!("http://{}", serve(app).await), chain };
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    // A client that follows every redirect, wrongly declared safe: the answer of the other
    // origin must still drive no payment.
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(PaymentMiddleware::new(payer.clone()).redirects_checked())
        .build();
    let served = client.get(format!("{}/work", server.origin)).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    let (channel, committed) = (payer.channel().await.unwrap(), payer.committed().await.unwrap());
    let balance = wallet.wallet.balance();

    let moved = client.get(format!("{}/moved", server.origin)).send().await.unwrap();
    assert_eq!(moved.status(), StatusCode::PAYMENT_REQUIRED, "the other origin's answer, as it is");
    assert_eq!(payer.channel().await.unwrap(), channel, "no channel opened for it");
    assert_eq!(payer.committed().await.unwrap(), committed, "nothing paid for it");
    assert_eq!(wallet.wallet.balance(), balance, "nothing funded for it");

    // With the middleware's redirect policy the header never leaves: the redirect itself is
    // the answer, and the other origin sees no request.
    let before = seen.load(Ordering::SeqCst);
    assert!(before > 0, "the redirect was followed above");
    let http = reqwest::Client::builder()
        .redirect(PaymentMiddleware::redirect_policy(&payer))
        .build()
        .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(http)
        .with(PaymentMiddleware::new(payer.clone()).redirects_checked())
        .build();
    let moved = client.get(format!("{}/moved", server.origin)).send().await.unwrap();
    assert_eq!(moved.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(seen.load(Ordering::SeqCst), before, "nothing reached the other origin");
    let served = client.get(format!("{}/work", server.origin)).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK, "requests at home are paid as before");
}

/// A slow-loris server: its `/open` never answers. The client gives up after its negotiation
/// timeout, with nothing funded, and its other requests are not held by the stalled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_stalls_the_client_no_longer_than_its_timeout() {
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let stall = |request: Request, next: Next| async move {
        if request.uri().path().ends_with("/open") {
            std::future::pending::<()>().await;
        }
        next.run(request).await
    };
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(PaywallLayer::new(MemoryStore::new(), PRICE, tip).with_negotiation(negotiation))
        .layer(axum::middleware::from_fn(stall));
    let server = Server { origin: format!("http://{}", serve(app).await), chain };
    let wallet = funded_wallet(&server.chain);
    let payer =
        builder(&server, &wallet).negotiation_timeout(Duration::from_millis(300)).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    // Without the client's timeout this would wait forever; the guard turns that into a failure.
    let result =
        tokio::time::timeout(Duration::from_secs(60), get_work(&mut client, &server.origin))
            .await
            .expect("the client gave up by itself");
    assert!(
        matches!(&result, Err(ClientError::Transport(e)) if e.to_string().contains("no answer")),
        "{result:?}"
    );
    assert_eq!(wallet.wallet.balance(), WALLET, "nothing was funded");
}

/// The server vanished: once the refund is final, the payer broadcasts it by itself through
/// its chain view (only once: the funding is spent then), and retires the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payer_refunds_expired_channels_by_itself() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let without_chain = builder(&server, &wallet).build().unwrap();
    assert!(matches!(without_chain.refund_expired().await, Err(ClientError::NoChainView)));
    let payer =
        builder(&server, &wallet).lifetime_blocks(150).chain(server.chain.clone()).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    server.chain.mine(1);
    assert_eq!(payer.refund_expired().await.unwrap(), vec![], "not yet");
    let channel = payer.channel().await.unwrap().unwrap();

    let expiry = channel.channel.params().expiry.to_consensus_u32();
    server.chain.mine(expiry - server.chain.tip().height);
    let refunded = payer.refund_expired().await.unwrap();
    assert_eq!(refunded.len(), 1);
    server.chain.mine(1);
    assert!(matches!(server.chain.tx_status(&refunded[0]), TxStatus::Confirmed { .. }));
    let back = server.chain.utxo(&OutPoint::new(refunded[0], 0)).unwrap();
    let params = channel.channel.params();
    assert_eq!(back.value, params.value - params.refund_fee());
    assert_eq!(payer.refund_expired().await.unwrap(), vec![], "the funding is spent now");
    assert_eq!(payer.channel().await.unwrap(), None, "the refunded channel is retired");
}

/// The same, with nobody asking: the payer's refund task finds the final refund by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refund_task_brings_the_money_back_by_itself() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer =
        builder(&server, &wallet).lifetime_blocks(150).chain(server.chain.clone()).build().unwrap();
    let (mut client, _) = paying_client(&payer);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    let channel = payer.channel().await.unwrap().unwrap();
    let task = tokio::spawn(payer.clone().refund_when_final(Duration::from_millis(10)));
    let expiry = channel.channel.params().expiry.to_consensus_u32();
    server.chain.mine(expiry - server.chain.tip().height);
    let funding = channel.channel.outpoint();
    let refunded = tokio::time::timeout(Duration::from_secs(60), async {
        while server.chain.utxo(&funding).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    task.abort();
    assert!(refunded.is_ok(), "the task broadcast the refund");
    server.chain.mine(1);
    let refund_txid = channel.refund.compute_txid();
    assert!(matches!(server.chain.tx_status(&refund_txid), TxStatus::Confirmed { .. }));
}

/// Locked value and funding fees count: the fee of each funding is part of the budget
/// (`funding_fees`), and a new channel that would lock more than `max_locked` in channels
/// whose money is not back is refused, whoever asks for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_value_and_funding_fees_count_against_the_policy() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let policy = policy().with_max_locked(Amount::from_sat(120_000));
    // The payer's own transport: it opens and closes with no request to pay for.
    let payer = builder(&server, &wallet)
        .policy(policy)
        .transport(ServiceTransport::<_, Full<Bytes>>::new(http_client()))
        .build()
        .unwrap();
    payer.open().await.unwrap();
    server.chain.mine(1);
    payer.open().await.unwrap();
    server.chain.mine(1);
    let fees = payer.funding_fees().await.unwrap();
    assert_eq!(
        WALLET - wallet.wallet.balance(),
        Amount::from_sat(2 * 50_000) + fees,
        "the wallet paid two channels and exactly the fees the payer counts"
    );
    assert!(fees > Amount::ZERO);
    let third = payer.open().await;
    assert!(
        matches!(
            third,
            Err(ClientError::Policy(PolicyRefusal::LockedTooMuch { locked, .. }))
                if locked == Amount::from_sat(100_000)
        ),
        "{third:?}"
    );

    // A channel closed cooperatively is no longer locked.
    payer.close().await.unwrap();
    server.chain.mine(1);
    payer.open().await.expect("room again after a close");
}

/// More lies, each bounded by the policy: a 402 whose snapshot names another channel with a
/// huge minimum (no top-up of our channel; a new channel at most, within `max_opens`), and a
/// server that answers 402 to every payment (at most two top-ups per request, then the 402 is
/// returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_snapshots_and_402_loops_stay_within_the_policy() {
    // A snapshot of another channel, asking for everything.
    let forged = Tamper {
        path: "/work",
        edit: Some(|problem| {
            if let Some(channel) = problem.get_mut("channel") {
                channel["channel"] =
                    "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b:0".into();
                channel["min_server_amount_sat"] = 49_000.into();
                channel["suggested_server_amount_sat"] = 49_000.into();
            }
        }),
    };
    let (server, _wallet, payer) = greedy_liar(forged).await;
    let (mut client, _) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert!(matches!(result, Err(ClientError::Rejected { .. })), "{result:?}");
    let paid = payer.channel().await.unwrap().map(|c| c.paid()).unwrap_or_default();
    assert!(paid < Amount::from_sat(1_000), "no payment towards the forged minimum: {paid}");

    // Every payment refused with a minimum one sat above what was paid: a 402 loop.
    let greedy = Tamper {
        path: "/work",
        edit: Some(|problem| {
            if let Some(channel) = problem.get_mut("channel") {
                let paid = channel["paid_msat"].as_u64().unwrap_or(0) / 1_000;
                channel["min_server_amount_sat"] = (paid + 1).into();
                channel["suggested_server_amount_sat"] = (paid + 1).into();
                problem["code"] = "insufficient-balance".into();
            }
        }),
    };
    let (server, _wallet, payer) = greedy_liar(greedy).await;
    let (mut client, refusals) = paying_client(&payer);
    let result = get_work(&mut client, &server.origin).await;
    assert!(
        matches!(result, Ok((StatusCode::PAYMENT_REQUIRED, _)) | Err(ClientError::Rejected { .. })),
        "the loop ends: {result:?}"
    );
    assert!(refusals.load(Ordering::SeqCst) <= 4, "at most four sends");
    let committed = payer.committed().await.unwrap();
    assert!(committed <= Amount::from_sat(294 + 2), "two one-sat top-ups at most: {committed}");
}

/// The close answer claims another settlement than the client's latest payment: another
/// transaction, or a txid that is not the transaction's. Either is a typed misbehaviour. The
/// server can only broadcast payments the client signed, so what the client gives up is what
/// its latest payment pays: here the server did broadcast it, and it is mined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_is_not_the_latest_payment_is_named() {
    fn another_transaction(answer: &mut Value) {
        use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
        let hex = answer["close_tx"].as_str().unwrap();
        let mut close: bitcoin::Transaction = deserialize_hex(hex).unwrap();
        close.output[0].value += Amount::ONE_SAT;
        answer["close_tx"] = Value::from(serialize_hex(&close));
    }
    fn another_txid(answer: &mut Value) {
        answer["txid"] = Value::from("11".repeat(32));
    }
    for (what, edit) in
        [("another transaction", another_transaction as Edit), ("another txid", another_txid)]
    {
        let lie = Tamper { path: "/close", edit: Some(edit) };
        let server = server_with(Terms::default(), Amount::from_sat(1_000), Some(lie)).await;
        let wallet = funded_wallet(&server.chain);
        let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
        let (mut client, _) = paying_client(&payer);
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
        let latest = payer.channel().await.unwrap().unwrap().latest.unwrap();
        let result = client.close().await;
        assert!(
            matches!(&result, Err(ClientError::ServerMisbehaved(m)) if m.kind == MisbehaviorKind::WrongSettlement),
            "{what}: {result:?}"
        );
        server.chain.mine(1);
        let status = server.chain.tx_status(&latest.compute_txid());
        assert!(
            matches!(status, TxStatus::Confirmed { .. }),
            "{what}: the latest payment is mined"
        );
    }
}

/// A server signing receipts as `signing` says, whose receipts `lie` rewrites (with the
/// channel's K2; `None`: not a receipt).
async fn receipt_server(
    signing: paychan::server::ReceiptSigning,
    lie: impl Fn(
        paychan::wire::Receipt,
        &paychan::bitcoin::secp256k1::SecretKey,
    ) -> Option<paychan::wire::Receipt>
    + Clone
    + Send
    + Sync
    + 'static,
) -> Server {
    use paychan::channel::channel_key;
    use paychan::store::ChannelStore;
    use paychan::wire::{PAYMENT_RECEIPT, Receipt};

    let chain = SimulatedChain::new();
    let master = Xpriv::new_master(Network::Regtest, &[0x5e; 32]).unwrap();
    let negotiation = common::negotiation(&chain, 0x5e);
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let store = MemoryStore::new();
    let lying = {
        let store = store.clone();
        move |request: Request, next: Next| {
            let (store, lie) = (store.clone(), lie.clone());
            // What a compact unsigned receipt leaves out, as the client knows it: the payment
            // the request carried and the receipt it named.
            let payment = request
                .headers()
                .get(paychan::wire::PAYMENT_CHANNEL)
                .and_then(|v| paychan::wire::decode_payment(v.as_bytes()).ok());
            let prev = request.headers().get(paychan::wire::PAYMENT_RECEIPT_PREV).and_then(|v| {
                <[u8; 32] as paychan::bitcoin::hex::FromHex>::from_hex(v.to_str().ok()?).ok()
            });
            async move {
                let mut response = next.run(request).await;
                let Some(value) = response.headers().get(PAYMENT_RECEIPT) else {
                    return response;
                };
                let payment = payment.expect("a paid request");
                let channel = paychan::wire::ChannelId::new(payment.input[0].previous_output);
                let paid = MilliSats::from_sat(paychan::channel::server_amount(&payment)).unwrap();
                let request = ("GET", "/work");
                let receipt =
                    Receipt::decode_for(value.as_bytes(), channel, request, paid, prev).unwrap();
                let record = store.load(receipt.channel).await.unwrap().unwrap();
                let k2 = channel_key(&master, record.key_index).unwrap();
                let value = lie(receipt, &k2).map_or("bm90IGEgcmVjZWlwdA".into(), |r| r.encode());
                response.headers_mut().insert(PAYMENT_RECEIPT, value.parse().unwrap());
                response
            }
        }
    };
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(
            PaywallLayer::new(store, PRICE, tip)
                .with_negotiation(negotiation)
                .with_receipt_signing(signing),
        )
        .layer(axum::middleware::from_fn(lying));
    Server { origin: format!("http://{}", serve(app).await), chain }
}

/// Receipts that do not verify or add up: forged (another key), for another request, stating
/// another payment than the request carried, understating the price (so the spent they state
/// exceeds what the receipts charged), or not a receipt at all. Each is refused: the request
/// it came with was answered, and the payer pays the server nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_that_do_not_verify_or_add_up_stop_the_payer() {
    use paychan::bitcoin::secp256k1::SecretKey;

    use paychan::wire::{Receipt, request_digest};

    type Lie = fn(Receipt, &SecretKey) -> Option<Receipt>;
    let forged: Lie = |r, _| Some(r.sign(&SecretKey::from_slice(&[9; 32]).unwrap()));
    let elsewhere: Lie = |mut r, k2| {
        r.request = request_digest("GET", "/dear");
        Some(r.sign(k2))
    };
    let other_payment: Lie = |mut r, k2| {
        r.paid_msat = r.paid_msat.checked_add(MilliSats::from_msat(1_000)).unwrap();
        r.balance_msat = r.balance_msat.checked_add(MilliSats::from_msat(1_000)).unwrap();
        Some(r.sign(k2))
    };
    let understated: Lie = |mut r, k2| {
        r.price_msat = MilliSats::from_msat(1);
        Some(r.sign(k2))
    };
    let garbage: Lie = |_, _| None;
    for (what, lie) in [
        ("forged", forged),
        ("for another request", elsewhere),
        ("another payment", other_payment),
        ("an understated price", understated),
        ("not a receipt", garbage),
    ] {
        let server = receipt_server(paychan::server::ReceiptSigning::Every, lie).await;
        let wallet = funded_wallet(&server.chain);
        let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
        let (mut client, _) = paying_client(&payer);
        let (status, _) = get_work(&mut client, &server.origin).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{what}: the request itself was answered");
        let committed = payer.committed().await.unwrap();
        let next = get_work(&mut client, &server.origin).await;
        assert!(
            matches!(&next, Err(ClientError::ServerMisbehaved(m)) if m.kind == MisbehaviorKind::BadReceipt),
            "{what}: {next:?}"
        );
        assert_eq!(payer.committed().await.unwrap(), committed, "{what}: nothing more paid");
        assert!(payer.latest_receipt().is_none(), "{what}: no receipt kept");
    }
}

/// The fair close corrects a stale estimate: a server whose answers under-report what it
/// spent (no receipts, a balance header 1 sat too high) refuses the client's first fair
/// settlement as short; the client reads the channel's exact spent and settles at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_close_from_a_stale_estimate_settles_at_the_exact_spent() {
    use paychan::wire::{PAYMENT_CHANNEL_BALANCE, PAYMENT_RECEIPT};

    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let understate = |request: Request, next: Next| async move {
        let mut response = next.run(request).await;
        let headers = response.headers_mut();
        headers.remove(PAYMENT_RECEIPT);
        if let Some(balance) = headers.get(PAYMENT_CHANNEL_BALANCE) {
            let higher = balance.to_str().unwrap().parse::<u64>().unwrap() + 1_000;
            headers.insert(PAYMENT_CHANNEL_BALANCE, higher.into());
        }
        response
    };
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(PaywallLayer::new(MemoryStore::new(), PRICE, tip).with_negotiation(negotiation))
        .layer(axum::middleware::from_fn(understate));
    let server = Server { origin: format!("http://{}", serve(app).await), chain };
    let wallet = funded_wallet(&server.chain);
    let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
    let (mut client, _) = paying_client(&payer);
    for _ in 0..3 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    }
    let committed = payer.committed().await.unwrap();
    let metered = PRICE.checked_mul(3).unwrap().to_sat_ceil();
    assert!(committed > metered);
    let closed = client.close().await.unwrap();
    assert_eq!(closed.server_amount, metered, "settled at the exact spent, not the estimate");
    assert_eq!(closed.client_amount + metered + closed.fee, Amount::from_sat(50_000));
}

/// `require_receipts`: a server that sends none is treated as one whose receipts do not
/// verify; without the setting it is judged by its balance header alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_that_requires_receipts_stops_paying_a_server_that_sends_none() {
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let paywall = PaywallLayer::new(MemoryStore::new(), PRICE, tip)
        .with_negotiation(negotiation)
        .without_receipts();
    let app = Router::new().route("/work", get(|| async { "done" })).layer(paywall);
    let server = Server { origin: format!("http://{}", serve(app).await), chain };
    for require in [false, true] {
        let wallet = funded_wallet(&server.chain);
        let payer = builder(&server, &wallet).require_receipts(require).build().unwrap();
        let (mut client, _) = paying_client(&payer);
        let (status, _) = get_work(&mut client, &server.origin).await.unwrap();
        assert_eq!(status, StatusCode::OK, "the request itself is answered");
        let next = get_work(&mut client, &server.origin).await;
        if require {
            assert!(
                matches!(&next, Err(ClientError::ServerMisbehaved(m)) if m.kind == MisbehaviorKind::BadReceipt),
                "{next:?}"
            );
        } else {
            assert_eq!(next.unwrap().0, StatusCode::OK);
        }
    }
}

/// The idle close: a payer that sends nothing for a while closes its channel fairly by
/// itself; the server settles at what it metered, and the next request opens a new channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_channel_is_closed_fairly_by_the_payer() {
    let server = server().await;
    let wallet = funded_wallet(&server.chain);
    let payer = builder(&server, &wallet)
        .transport(ServiceTransport::<_, Full<Bytes>>::new(http_client()))
        .build()
        .unwrap();
    let (mut client, _) = paying_client(&payer);
    for _ in 0..3 {
        assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    }
    let first = payer.channel().await.unwrap().expect("a channel");
    let idle = tokio::spawn(payer.clone().close_when_idle(Duration::from_millis(600)));
    // Busy: requests every 100 ms keep the channel open.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        get_work(&mut client, &server.origin).await.unwrap();
    }
    assert_eq!(payer.channel().await.unwrap().map(|c| c.id()), Some(first.id()));
    // Idle: closed, at what was metered (8 requests), rounded up to the satoshi.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(payer.channel().await.unwrap().is_none(), "the idle channel was closed");
    let snapshot = server_channel(&server, &first.id().to_string()).await;
    assert_ne!(snapshot["state"], "open", "{snapshot}");
    let metered = PRICE.checked_mul(8).unwrap().to_sat_ceil();
    assert_eq!(snapshot["paid_msat"], metered.to_sat() * 1_000, "settled at the metered amount");
    // The next request opens a new channel (the wallet's change confirmed: served at once).
    server.chain.mine(1);
    assert_eq!(get_work(&mut client, &server.origin).await.unwrap().0, StatusCode::OK);
    let second = payer.channel().await.unwrap().expect("a new channel");
    assert_ne!(second.id(), first.id());
    idle.abort();
}

/// Receipts signed in batches: every answer carries a receipt linked to the one before, and
/// the server signs the receipt that would be the batch's last unsigned in a row (by its
/// count and the client's), or the client's own maximum when it is smaller; the payer
/// accepts the unsigned ones link by link and keeps the last signed one as its proof. A
/// server that stops signing is paid no more once the client holds its maximum of unsigned
/// receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_come_signed_in_batches_and_a_server_that_stops_signing_is_paid_no_more() {
    use paychan::server::ReceiptSigning;
    use paychan::wire::Receipt;

    let batches = ReceiptSigning::Batched { every: 8, within: Duration::from_secs(3_600) };
    for (what, max, stops, signed_at) in [
        ("batches of 8", 128, false, vec![1, 9, 17, 25, 33]),
        (
            "half the client's max of 6",
            6,
            false,
            vec![1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40],
        ),
        ("a server that stops signing", 3, true, vec![]),
    ] {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<Receipt>::new()));
        let server = receipt_server(batches, {
            let seen = Arc::clone(&seen);
            move |mut r: Receipt, _: &paychan::bitcoin::secp256k1::SecretKey| {
                if stops {
                    r.sig.clear();
                }
                seen.lock().unwrap().push(r.clone());
                Some(r)
            }
        })
        .await;
        let wallet = funded_wallet(&server.chain);
        let payer = payer_with(
            &server,
            &wallet,
            MemoryClientStore::new(),
            policy().with_max_unsigned_receipts(max),
        );
        let (mut client, _) = paying_client(&payer);
        let mut outcome = Ok(());
        for _ in 0..40 {
            if let Err(e) = get_work(&mut client, &server.origin).await {
                outcome = Err(e);
                break;
            }
        }
        let seen = seen.lock().unwrap().clone();
        if stops {
            // Three unsigned receipts are accepted; the fourth stops the payer, whose next
            // request fails before it leaves.
            assert_eq!(seen.len(), 4, "{what}");
            assert!(
                matches!(&outcome, Err(ClientError::ServerMisbehaved(m)) if m.kind == MisbehaviorKind::BadReceipt),
                "{what}: {outcome:?}"
            );
            assert!(payer.latest_receipt().is_none(), "{what}: no signed receipt");
            continue;
        }
        assert!(outcome.is_ok(), "{what}: {outcome:?}");
        let signed: Vec<usize> = (1..=seen.len()).filter(|n| seen[n - 1].is_signed()).collect();
        assert_eq!(signed, signed_at, "{what}: the receipts signed");
        for pair in seen.windows(2) {
            assert_eq!(
                pair[1].prev_digest(),
                pair[0].digest(),
                "{what}: each links to the one before"
            );
        }
        let last_signed = seen[signed_at.last().unwrap() - 1].clone();
        assert_eq!(payer.latest_receipt(), Some(last_signed), "{what}: the proof kept");
    }
}

/// Linked receipts: each request names the digest of the latest receipt the client holds
/// (`Payment-Receipt-Prev`) and the server signs its receipt with that link, so the client's
/// receipts form a chain; a server that drops or changes a link is paid no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_link_to_the_previous_one_and_a_broken_link_stops_the_payer() {
    use paychan::bitcoin::secp256k1::SecretKey;

    use paychan::wire::Receipt;

    type Lie = fn(Receipt, &SecretKey) -> Receipt;
    let honest: Lie = |r, _| r;
    let unlinked: Lie = |mut r, k2| {
        r.prev = None;
        r.sign(k2)
    };
    let relinked: Lie = |mut r, k2| {
        if r.prev.is_some() {
            r.prev = Some("07".repeat(32));
        }
        r.sign(k2)
    };
    for (what, lie) in [("honest", honest), ("unlinked", unlinked), ("relinked", relinked)] {
        let server =
            receipt_server(paychan::server::ReceiptSigning::Every, move |r, k2| Some(lie(r, k2)))
                .await;
        let wallet = funded_wallet(&server.chain);
        let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
        let (mut client, _) = paying_client(&payer);
        let mut chain_of = Vec::new();
        let mut outcome = Ok(());
        for _ in 0..4 {
            match get_work(&mut client, &server.origin).await {
                Ok(_) => chain_of.push(payer.latest_receipt().unwrap()),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if what == "honest" {
            assert!(outcome.is_ok(), "{outcome:?}");
            assert_eq!(chain_of[0].prev, None, "the first receipt links to nothing");
            for pair in chain_of.windows(2) {
                assert_eq!(pair[1].prev_digest(), pair[0].digest(), "each links to the one before");
            }
        } else {
            assert!(
                matches!(&outcome, Err(ClientError::ServerMisbehaved(m)) if m.kind == MisbehaviorKind::BadReceipt),
                "{what}: {outcome:?}"
            );
        }
    }
}

/// Two API nodes serving one channel from leases of a shared store ([`Leased`]), the requests
/// alternating between them: to the payer they are one server. Balances and receipts count
/// leases as unspent (no overcharge is seen, every receipt verifies and links, also by a
/// payer restarted while one node holds a lease the other does not see), and the fair close
/// pays exactly what was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leased_nodes_look_like_one_server_to_the_payer() {
    use paychan::channel::ChannelState;
    use paychan::store::{ChannelStore, LeaseConfig, Leased};
    let chain = SimulatedChain::new();
    let master = Xpriv::new_master(Network::Regtest, &[0x5e; 32]).unwrap();
    let tip = follow_tip(chain.clone(), Duration::from_millis(50)).await.unwrap();
    let shared = MemoryStore::new();
    // Leases of up to four requests, given back after 100 ms unused.
    let config = LeaseConfig::default()
        .with_max_lease(PRICE.checked_mul(4).unwrap())
        .with_idle(Duration::from_millis(100));
    let nodes =
        [Leased::with_config(shared.clone(), config), Leased::with_config(shared.clone(), config)];
    let routers: Vec<Router> = nodes
        .iter()
        .map(|store| {
            let negotiation = Negotiation::new(
                Network::Regtest,
                Terms::default(),
                master,
                p2wpkh(&secret(2)),
                chain.clone(),
            );
            let paywall = PaywallLayer::new(store.clone(), PRICE, tip.clone())
                .with_prepaid_top_up(MilliSats::from_sat(Amount::from_sat(3_000)).unwrap())
                .with_negotiation(negotiation)
                // The last receipt is checked against the leases: every one signed.
                .with_receipt_signing(paychan::server::ReceiptSigning::Every);
            Router::new().route("/work", get(|| async { "done" })).layer(paywall)
        })
        .collect();
    // Paid requests alternate (or go to the node `route` names); the negotiation (whose
    // proposals live in one node's memory) and the close go to the first node.
    const ALTERNATE: usize = 2;
    let route = Arc::new(AtomicUsize::new(ALTERNATE));
    let (routing, turn) = (route.clone(), Arc::new(AtomicUsize::new(0)));
    let alternate = tower::service_fn(move |request: Request| {
        let negotiation = request.uri().path().starts_with(paychan::server::DEFAULT_PREFIX);
        let node = match routing.load(Ordering::SeqCst) {
            _ if negotiation => 0,
            ALTERNATE => turn.fetch_add(1, Ordering::SeqCst) % 2,
            node => node,
        };
        routers[node].clone().oneshot(request)
    });
    let addr = serve(Router::new().fallback_service(alternate)).await;
    let server = Server { chain, origin: format!("http://{addr}") };
    let wallet = funded_wallet(&server.chain);
    let client_store = MemoryClientStore::new();
    // Prepaying 20 requests at a time, so that leases are not cut short by the balance.
    let prepaid = policy().with_max_prepaid(Amount::from_sat(3_000));
    let payer = builder(&server, &wallet)
        .store(client_store.clone())
        .policy(prepaid.clone())
        .require_receipts(true)
        .build()
        .unwrap();
    let (mut client, _) = paying_client(&payer);
    let sent = std::cell::Cell::new(0);
    let work = async |client: &mut PaymentService<Counting, MemoryClientStore>| {
        let answer = get_work(client, &server.origin).await;
        let n = sent.get();
        assert!(matches!(&answer, Ok((StatusCode::OK, _))), "request {n}: {answer:?}");
        sent.set(n + 1);
    };
    for _ in 0..20 {
        work(&mut client).await;
    }
    // Both nodes give their leases back; then the second serves several requests from a new
    // lease, which the first does not see.
    assert_eq!(nodes[0].return_all().await + nodes[1].return_all().await, 0);
    let transport = ServiceTransport::<_, Full<Bytes>>::new(client.get_ref().clone());
    payer.top_up_by_via(&transport, Amount::from_sat(3_000)).await.unwrap();
    route.store(1, Ordering::SeqCst);
    for _ in 0..5 {
        work(&mut client).await;
    }
    let used = nodes[1].held().1;
    assert!(used >= PRICE.checked_mul(3).unwrap(), "the second node used its lease: {used}");
    // A payer restarted on the same client store picks the channel up. Its first answer comes
    // from the first node, which does not see what the second used of its lease; the
    // second's answers do: not an overcharge.
    let payer = builder(&server, &wallet)
        .store(client_store)
        .policy(prepaid)
        .require_receipts(true)
        .build()
        .unwrap();
    let (mut client, _) = paying_client(&payer);
    route.store(0, Ordering::SeqCst);
    work(&mut client).await;
    route.store(ALTERNATE, Ordering::SeqCst);
    while sent.get() < 40 {
        work(&mut client).await;
    }
    let held = nodes[0].held().0.saturating_add(nodes[1].held().0);
    assert!(!held.is_zero(), "the nodes serve from leases");
    let metered = PRICE.checked_mul(40).unwrap();
    let receipt = payer.latest_receipt().expect("a verified receipt");
    assert!(receipt.spent() <= metered, "receipts count leases as unspent");

    let closed = client.close().await.unwrap();
    assert_eq!(closed.server_amount, metered.to_sat_ceil(), "exactly what was served");
    let record = shared.load(closed.channel).await.unwrap().unwrap();
    assert_ne!(record.state, ChannelState::Open);
    assert_eq!(record.committed(), metered, "spent, or used of a lease not given back yet");
    // The leases still held go back when idle: then all of it is spent.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let record = shared.load(closed.channel).await.unwrap().unwrap();
    assert_eq!((record.spent, record.leased), (metered, MilliSats::ZERO));
}

/// A server that asks for another scheme (an L402 or MPP challenge, an x402 body) gets a clear
/// refusal naming it, and nothing is paid: no channel is opened, no wallet coin spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_402_of_another_payment_scheme_is_named_and_nothing_is_paid() {
    use axum::http::header::WWW_AUTHENTICATE;
    use axum::response::IntoResponse;

    for (challenge, body, scheme) in [
        (Some(r#"L402 macaroon="AGIAJEem", invoice="lnbcrt10u1p""#), "", "L402"),
        (Some(r#"Payment method="tempo", intent="charge""#), "", r#"Payment method="tempo""#),
        (None, r#"{"x402Version":1,"error":"X-PAYMENT header is required","accepts":[]}"#, "x402"),
    ] {
        let app = Router::new().route(
            "/work",
            get(move || async move {
                let mut response = (StatusCode::PAYMENT_REQUIRED, body).into_response();
                if let Some(challenge) = challenge {
                    response.headers_mut().insert(WWW_AUTHENTICATE, challenge.parse().unwrap());
                }
                response
            }),
        );
        let chain = SimulatedChain::new();
        let server = Server { origin: format!("http://{}", serve(app).await), chain };
        let wallet = funded_wallet(&server.chain);
        let payer = payer_with(&server, &wallet, MemoryClientStore::new(), policy());
        let (mut client, _) = paying_client(&payer);
        let error = get_work(&mut client, &server.origin).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::ForeignScheme { scheme: s } if s == scheme),
            "{error:?}"
        );
        assert!(error.to_string().contains("paychan pays bitcoin-channel"), "{error}");
        assert!(payer.channel().await.unwrap().is_none(), "no channel opened");
        assert_eq!(payer.committed().await.unwrap(), Amount::ZERO, "nothing paid");
    }
}
