//! The client against an honest server across a restart and streamed uploads, and against a
//! server that answers closes it never broadcasts (review of issue #23: each failed before).

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, Network};
use common::counting::{Counting, http_client};
use common::http::serve;
use common::secret;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::chain::sim::SimulatedChain;
use paychan::client::{
    ClientError, ClientStore, KeyWallet, MemoryClientStore, Payer, PaymentLayer, PaymentService,
    SpendingPolicy,
};
use tower::{Service, ServiceBuilder, ServiceExt};

const PRICE: MilliSats = MilliSats::from_msat(150_000);

async fn honest_server() -> (SimulatedChain, String) {
    let chain = SimulatedChain::new();
    let paywall = common::paywall(&chain, PRICE, Amount::from_sat(1_000)).await;
    let app = Router::new().route("/work", get(|| async { "done" })).layer(paywall);
    let addr = serve(app).await;
    (chain, format!("http://{addr}"))
}

fn payer(origin: &str, wallet: &KeyWallet, store: MemoryClientStore) -> Payer<MemoryClientStore> {
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    Payer::builder(origin, Network::Regtest, key)
        .policy(SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(200_000)))
        .wallet(wallet.clone())
        .channel_value(Amount::from_sat(50_000))
        .store(store)
        .build()
        .unwrap()
}

fn client<S: ClientStore + 'static>(payer: &Payer<S>) -> PaymentService<Counting, S> {
    let inner = Counting { http: http_client(), refusals: Arc::new(AtomicUsize::new(0)) };
    ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(inner)
}

async fn work<S: ClientStore + 'static>(
    client: &mut PaymentService<Counting, S>,
    origin: &str,
) -> Result<StatusCode, ClientError> {
    let request = http::Request::get(format!("{origin}/work")).body(Full::default()).unwrap();
    let response = client.ready().await?.call(request).await?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// R1: a payer restarted on its store counts from the latest payment with
/// `max(latest, counted)`, not `latest + counted`: once an honest server's spent at the restart
/// exceeds `max_prepaid`, the restarted payer can buy only about `max_prepaid` (plus what
/// was prepaid) before every top-up is refused with `BoundExceeded`, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_payer_is_not_stuck_with_an_honest_server() {
    let (chain, origin) = honest_server().await;
    let wallet = KeyWallet::new(secret(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), Amount::from_sat(500_000));
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    let store = MemoryClientStore::new();
    let first = payer(&origin, &wallet, store.clone());
    let mut c = client(&first);
    for n in 0..20 {
        assert_eq!(work(&mut c, &origin).await.unwrap(), StatusCode::OK, "before restart {n}");
    }
    drop((c, first));
    // The same client, restarted (a deploy, a crash): the channel is loaded from its store.
    let second = payer(&origin, &wallet, store);
    let mut c = client(&second);
    for n in 0..60 {
        let answer = work(&mut c, &origin).await;
        assert!(
            matches!(answer, Ok(StatusCode::OK)),
            "request {n} after the restart to an honest server: {answer:?}"
        );
    }
}

/// An honest server whose every route costs [`PRICE`]: `/work`, `/old` (a 308 to `/work`) and
/// `POST /upload`.
async fn honest_server_with_redirect_and_upload() -> (SimulatedChain, String) {
    let chain = SimulatedChain::new();
    let paywall = common::paywall(&chain, PRICE, Amount::from_sat(1_000)).await;
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .route("/old", get(|| async { axum::response::Redirect::permanent("/work") }))
        .route("/upload", axum::routing::post(|| async { "stored" }))
        .layer(paywall);
    let addr = serve(app).await;
    (chain, format!("http://{addr}"))
}

fn funded(chain: &SimulatedChain) -> KeyWallet {
    let wallet = KeyWallet::new(secret(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), Amount::from_sat(500_000));
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    wallet
}

/// R2: the reqwest middleware follows same-origin redirects with the payment header (its own
/// `redirect_policy`); an honest server charges each hop, the client counts one answer: the
/// gap grows by a price per redirected request until every top-up is `BoundExceeded`.
/// Known, not fixed (pre-existing): reqwest follows a same-origin redirect with the payment
/// header and the paywall charges both hops, while the client sees one answer.
#[ignore = "known: a same-origin redirect is charged twice and counted once (docs/SECURITY.md)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_origin_redirects_do_not_strand_the_middleware() {
    use paychan::client::PaymentMiddleware;
    let (chain, origin) = honest_server_with_redirect_and_upload().await;
    let wallet = funded(&chain);
    let payer = payer(&origin, &wallet, MemoryClientStore::new());
    let client = PaymentMiddleware::client(payer, reqwest::Client::builder()).unwrap().build();
    for n in 0..30 {
        let answer = client.get(format!("{origin}/old")).send().await;
        let status = answer.as_ref().map(reqwest::Response::status).map_err(|e| e.to_string());
        assert_eq!(status, Ok(StatusCode::OK), "redirected request {n} to an honest server");
    }
}

/// R3: a request whose body cannot be cloned is sent once by the reqwest middleware, with the
/// payment header, and its answer is never counted (no `answered`). An honest server charges
/// it; the client's count falls behind by a price per upload until what the bound lets it
/// prepay is all used by its counted requests: from then on every upload is answered 402
/// (returned, never paid), for good, while the honest server's balance was only ever short
/// because of the client's own undercount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_uploads_do_not_strand_the_middleware() {
    use paychan::client::PaymentMiddleware;
    let (chain, origin) = honest_server_with_redirect_and_upload().await;
    let wallet = funded(&chain);
    let payer = payer(&origin, &wallet, MemoryClientStore::new());
    let client = PaymentMiddleware::client(payer, reqwest::Client::builder()).unwrap().build();
    let mut uploads = Vec::new();
    for n in 0..30 {
        // A body reqwest cannot clone (a stream: a file, a pipe).
        let body = reqwest::Body::wrap(Full::new(bytes::Bytes::from_static(b"data")));
        let upload = client.post(format!("{origin}/upload")).body(body).send().await;
        uploads.push(upload.unwrap().status());
        let answer = client.get(format!("{origin}/work")).send().await;
        let status = answer.as_ref().map(reqwest::Response::status).map_err(|e| e.to_string());
        assert_eq!(status, Ok(StatusCode::OK), "request {n} to an honest server after uploads");
    }
    assert!(
        uploads[15..].contains(&StatusCode::OK),
        "no upload served in the last 15, each followed by a served request: {uploads:?}"
    );
}

/// A server that forces a switch on every paid request (402 `channel-not-open`) and answers
/// every close with the client's own latest payment, which it never broadcasts.
async fn closes_without_broadcast(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = request.uri().path().to_owned();
    let payment = request
        .headers()
        .get(paychan::wire::PAYMENT_CHANNEL)
        .and_then(|h| paychan::wire::decode_payment(h.as_bytes()).ok());
    match (path.as_str(), payment) {
        (p, Some(tx)) if p.ends_with("/close") => {
            let id = paychan::wire::ChannelId::new(tx.input[0].previous_output);
            let body = serde_json::json!({
                "channel": id.to_string(),
                "txid": tx.compute_txid().to_string(),
                "server_amount_sat": tx.output[0].value.to_sat(),
                "close_tx": bitcoin::consensus::encode::serialize_hex(&tx),
                "state": "closed",
            });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        ("/work", Some(_)) => {
            let body = serde_json::json!({
                "type": "urn:paychan:problem:channel-not-open", "title": "Payment Required",
                "status": 402, "detail": "closing", "code": "channel-not-open",
            });
            let mut response = (StatusCode::PAYMENT_REQUIRED, body.to_string()).into_response();
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/problem+json"),
            );
            response
        }
        _ => next.run(request).await,
    }
}

/// R5: the switch's fair close (F5) marks the old channel closed on the server's word: a
/// server that answers the close with the client's own payment and never broadcasts it keeps
/// the channel's value locked until the refund, yet `max_locked` no longer counts it (before
/// the switch closed, the old channel was retired but counted). Forcing a switch per request
/// (within `max_opens`) locks channel after channel past `max_locked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_the_server_never_broadcasts_still_counts_as_locked() {
    let chain = SimulatedChain::new();
    let paywall = common::paywall(&chain, PRICE, Amount::from_sat(1_000)).await;
    let app = Router::new()
        .route("/work", get(|| async { "done" }))
        .layer(paywall)
        .layer(axum::middleware::from_fn(closes_without_broadcast));
    let origin = format!("http://{}", serve(app).await);
    let wallet = funded(&chain);
    let store = MemoryClientStore::new();
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    let policy = SpendingPolicy::default()
        .with_max_per_request(MilliSats::from_msat(200_000))
        .with_max_locked(Amount::from_sat(120_000))
        .with_max_opens(20, Duration::from_secs(3_600));
    let payer = Payer::builder(&origin, Network::Regtest, key)
        .policy(policy)
        .wallet(wallet.clone())
        .channel_value(Amount::from_sat(50_000))
        .store(store.clone())
        .build()
        .unwrap();
    let mut c = client(&payer);
    for _ in 0..6 {
        let _ = work(&mut c, &origin).await;
    }
    let channels = store.list().await.unwrap();
    let live: Vec<_> = channels
        .iter()
        .filter(|ch| chain.utxo(&ch.channel.outpoint()).is_some())
        .map(|ch| (ch.closed, ch.channel.params().value))
        .collect();
    let locked: Amount = live.iter().map(|(_, value)| *value).sum();
    assert!(
        locked <= Amount::from_sat(120_000),
        "{locked} in channels whose funding is unspent (closed marks: {live:?}), max_locked 120 000"
    );
}
