//! The client's loss bound against servers that lie (issue #23): whatever a server answers,
//! the server amount of every payment the client signs on a channel stays within
//! `max(first payment, what the client counted) + one price + max_prepaid`.
//!
//! Each server here is the real stack (negotiation, paywall, memory store, simulated chain)
//! behind a middleware that lies the way its test says. Every test failed on the client
//! before the bound (the amounts in the comments are what that client signed).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, Network};
use bytes::Bytes;
use common::counting::{Counting, http_client};
use common::http::serve;
use common::secret;
use futures_util::StreamExt as _;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::chain::sim::SimulatedChain;
use paychan::client::{
    ClientError, KeyWallet, MemoryClientStore, MisbehaviorKind, Payer, PaymentLayer,
    PaymentService, SpendingPolicy,
};
use paychan::wire::{self, ChannelId, PAYMENT_CHANNEL};
use serde_json::{Value, json};
use tower::{Service, ServiceBuilder, ServiceExt};

/// What the client is quoted for `/job`.
const QUOTE: MilliSats = MilliSats::from_msat(2_000);
/// The policy's `max_prepaid`.
const PREPAID: Amount = Amount::from_sat(1_000);
/// The first payment of a channel: the dust threshold of the server's P2WPKH output.
const FIRST: Amount = Amount::from_sat(294);

/// How the server lies on `/job` (and `/stream`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lie {
    /// Every paid request: 402 `insufficient-balance`, "everything is spent".
    Storm,
    /// Serves this many paid requests, then the storm.
    PumpAfter(usize),
    /// Charges its real price but quotes [`QUOTE`] in its 402s; sends no balance header and
    /// no receipt.
    QuoteLowHideCharges,
    /// Charges its real price but quotes [`QUOTE`] in its 402s (balance headers kept).
    QuoteLow,
    /// Serves, without a balance header and without a receipt.
    NoReceipts,
    /// `/stream`: a metered SSE stream that asks for a top-up and sends no unit.
    AskWithoutSending,
    /// `/stream`: one event, then nothing (the client cuts it); `/job`: the storm.
    CutStreamsThenStorm,
}

struct Liar {
    lie: Lie,
    /// Paid requests that reached the server.
    served: AtomicUsize,
    /// The highest server amount of any payment the server was handed (a liar knows it).
    latest: AtomicU64,
}

fn server_amount(header: &http::HeaderValue) -> Option<(ChannelId, Amount)> {
    let payment = wire::decode_payment(header.as_bytes()).ok()?;
    let id = ChannelId::new(payment.input.first()?.previous_output);
    Some((id, paychan::channel::server_amount(&payment)))
}

/// The forged 402: everything paid is spent, pay `price` more, or a bundle more.
fn all_spent(id: ChannelId, paid: Amount, price: MilliSats) -> Value {
    let paid_msat = paid.to_sat() * 1_000;
    json!({
        "type": "urn:paychan:problem:insufficient-balance",
        "title": "Payment Required", "status": 402, "detail": "top up",
        "code": "insufficient-balance",
        "price_msat": price.to_msat(),
        "channel": {
            "channel": id.to_string(), "state": "open",
            "paid_msat": paid_msat, "spent_msat": paid_msat, "balance_msat": 0,
            "price_msat": price.to_msat(), "capacity_left_sat": 0,
            "min_server_amount_sat": paid.to_sat() + price.to_msat().div_ceil(1_000),
            "suggested_server_amount_sat": paid.to_sat() + 5_000,
            "expiry": 0, "close_by": 0
        }
    })
}

fn problem_response(body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::PAYMENT_REQUIRED)
        .header("content-type", "application/problem+json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn lying(State(liar): State<Arc<Liar>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let paid = request.headers().get(PAYMENT_CHANNEL).and_then(server_amount);
    if let Some((_, amount)) = paid {
        liar.latest.fetch_max(amount.to_sat(), Ordering::SeqCst);
    }
    match (liar.lie, path.as_str(), paid) {
        (Lie::CutStreamsThenStorm, "/stream", Some(_)) => {
            let body = futures_util::stream::once(async { Ok::<_, std::io::Error>("data: 1\n\n") })
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok("")
                }));
            Response::builder()
                .header("content-type", "text/event-stream")
                .header(wire::PAYMENT_CHANNEL_STREAM, "sse; per-event=2000")
                .body(Body::from_stream(body))
                .unwrap()
        }
        (Lie::Storm | Lie::CutStreamsThenStorm, "/job", Some((id, _)))
            if liar.lie == Lie::Storm || liar.served.fetch_add(1, Ordering::SeqCst) >= 1 =>
        {
            problem_response(&all_spent(id, latest(&liar), QUOTE))
        }
        (Lie::PumpAfter(n), "/job", Some((id, _))) => {
            if liar.served.fetch_add(1, Ordering::SeqCst) < n {
                next.run(request).await
            } else {
                problem_response(&all_spent(id, latest(&liar), QUOTE))
            }
        }
        (Lie::QuoteLow | Lie::QuoteLowHideCharges, "/job", _) => {
            let response = next.run(request).await;
            let (mut parts, body) = response.into_parts();
            if liar.lie == Lie::QuoteLowHideCharges {
                parts.headers.remove(wire::PAYMENT_CHANNEL_BALANCE);
                parts.headers.remove(wire::PAYMENT_RECEIPT);
            }
            if parts.status != StatusCode::PAYMENT_REQUIRED {
                return Response::from_parts(parts, body);
            }
            let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let mut value: Value = serde_json::from_slice(&bytes).unwrap();
            value["price_msat"] = json!(QUOTE.to_msat());
            if value["channel"].is_object() {
                value["channel"]["price_msat"] = json!(QUOTE.to_msat());
            }
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(value.to_string()))
        }
        (Lie::NoReceipts, "/job", _) => {
            let mut response = next.run(request).await;
            response.headers_mut().remove(wire::PAYMENT_CHANNEL_BALANCE);
            response.headers_mut().remove(wire::PAYMENT_RECEIPT);
            response
        }
        (Lie::AskWithoutSending, "/stream", Some((id, _))) => {
            // Each stream waits its turn so the previous top-up has landed, then asks for
            // the price of one event on top of the latest payment, and sends nothing.
            let turn = liar.served.fetch_add(1, Ordering::SeqCst) as u64;
            tokio::time::sleep(Duration::from_millis(300 * turn)).await;
            let ask = all_spent(id, latest(&liar), QUOTE);
            let event = format!("event: payment-required\ndata: {ask}\n\n");
            let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(event) })
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                    Ok(String::new())
                }));
            Response::builder()
                .header("content-type", "text/event-stream")
                .header(wire::PAYMENT_CHANNEL_STREAM, "sse; per-event=2000")
                .body(Body::from_stream(body))
                .unwrap()
        }
        _ => next.run(request).await,
    }
}

fn latest(liar: &Liar) -> Amount {
    Amount::from_sat(liar.latest.load(Ordering::SeqCst))
}

struct Server {
    chain: SimulatedChain,
    origin: String,
    liar: Arc<Liar>,
}

/// The real server stack pricing every request at `price`, behind the liar.
async fn lying_server(lie: Lie, price: MilliSats) -> Server {
    let chain = SimulatedChain::new();
    let paywall = common::paywall(&chain, price, PREPAID).await;
    let liar = Arc::new(Liar { lie, served: AtomicUsize::new(0), latest: AtomicU64::new(0) });
    let app = Router::new()
        .route("/job", get(|| async { "done" }))
        .layer(paywall)
        .layer(from_fn_with_state(Arc::clone(&liar), lying));
    let addr = serve(app).await;
    Server { chain, origin: format!("http://{addr}"), liar }
}

/// The default policy but for a smaller channel: 10 sat a request at most, 1 000 sat prepaid.
fn policy() -> SpendingPolicy {
    SpendingPolicy::default().with_max_prepaid(PREPAID)
}

fn payer(server: &Server, require_receipts: bool) -> Payer {
    let wallet = KeyWallet::new(secret(0x33));
    let coin = server.chain.faucet(wallet.script_pubkey(), Amount::from_sat(500_000));
    wallet.add_coin(coin, server.chain.utxo(&coin).unwrap());
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    Payer::builder(&server.origin, Network::Regtest, key)
        .policy(policy())
        .wallet(wallet)
        .channel_value(Amount::from_sat(100_000))
        .require_receipts(require_receipts)
        .build()
        .unwrap()
}

fn client(payer: &Payer) -> PaymentService<Counting, MemoryClientStore> {
    let inner = Counting { http: http_client(), refusals: Arc::default() };
    ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(inner)
}

async fn fetch(
    client: &mut PaymentService<Counting, MemoryClientStore>,
    url: String,
) -> Result<(StatusCode, Bytes), ClientError> {
    let request = http::Request::get(url).body(Full::default()).unwrap();
    let response = client.ready().await?.call(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Ok((status, body))
}

/// What the server holds: the server amount of the client's latest payment.
async fn signed(payer: &Payer) -> Amount {
    payer.channel().await.unwrap().map_or(Amount::ZERO, |channel| channel.paid())
}

/// The bound for `served` answers at the quote.
fn bound(served: u64) -> Amount {
    let counted = QUOTE.checked_mul(served).unwrap().to_sat_ceil();
    FIRST.max(counted) + QUOTE.to_sat_ceil() + PREPAID
}

/// Sends `/job` `n` times: the answers served, and the last error.
async fn jobs(server: &Server, payer: &Payer, n: usize) -> (u64, Option<ClientError>) {
    let mut client = client(payer);
    let (mut served, mut last) = (0, None);
    for _ in 0..n {
        match fetch(&mut client, format!("{}/job", server.origin)).await {
            Ok((StatusCode::OK, _)) => served += 1,
            Ok((status, _)) => panic!("unexpected {status}"),
            Err(error) => last = Some(error),
        }
    }
    (served, last)
}

fn names_claim_and_count(error: &ClientError) {
    let ClientError::BoundExceeded(exceeded) = error else {
        panic!("expected the loss bound to stop the payment, got {error:?}");
    };
    assert!(exceeded.claimed.is_some(), "the error names the server's claim: {error}");
    let text = error.to_string();
    assert!(text.contains("claims") && text.contains("counted"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_402_storm_gets_one_price_and_max_prepaid_beyond_the_first_payment() {
    // Before the bound: 20 334 sat signed for nothing served.
    let server = lying_server(Lie::Storm, QUOTE).await;
    let payer = payer(&server, false);
    let (served, last) = jobs(&server, &payer, 10).await;
    assert_eq!(served, 0);
    names_claim_and_count(&last.expect("refused"));
    let signed = signed(&payer).await;
    assert!(signed <= bound(0), "signed {signed} for nothing served, bound {}", bound(0));
    assert_eq!(payer.committed().await.unwrap(), signed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_402_pump_after_serving_gets_no_more_than_what_was_counted() {
    // Before the bound: 20 334 sat signed for 20 requests served.
    let server = lying_server(Lie::PumpAfter(20), QUOTE).await;
    let payer = payer(&server, false);
    let (served, last) = jobs(&server, &payer, 40).await;
    assert_eq!(served, 20);
    names_claim_and_count(&last.expect("refused"));
    let signed = signed(&payer).await;
    assert!(signed <= bound(served), "signed {signed} for {served} served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_above_the_quote_without_balance_or_receipt_are_bounded_by_the_count() {
    // Before the bound: 5 247 sat signed for 300 requests quoted at 2 sat (600 sat).
    let server = lying_server(Lie::QuoteLowHideCharges, MilliSats::from_msat(15_000)).await;
    let payer = payer(&server, false);
    let (served, last) = jobs(&server, &payer, 300).await;
    let signed = signed(&payer).await;
    println!("15 sat against a 2 sat quote, no headers: {served} served, {signed} signed");
    assert!(signed <= bound(served), "signed {signed} for {served} served at the quote");
    // The server charges 15 sat: the bound stops it well before 300 requests.
    assert!(served < 300, "{served}");
    assert!(matches!(last, Some(ClientError::BoundExceeded(_))), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_above_the_quote_below_max_per_request_are_noticed() {
    // Before the bound: 5 sat a request against a 2 sat quote went unnoticed.
    let server = lying_server(Lie::QuoteLow, MilliSats::from_msat(5_000)).await;
    let payer = payer(&server, false);
    let (served, last) = jobs(&server, &payer, 400).await;
    let signed = signed(&payer).await;
    println!("5 sat against a 2 sat quote: {served} served, {signed} signed");
    assert!(signed <= bound(served), "signed {signed} for {served} served at the quote");
    assert!(served < 400, "{served}");
    assert!(last.is_some(), "the client noticed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_receipts_stop_at_the_first_paid_answer_without_one() {
    let server = lying_server(Lie::NoReceipts, QUOTE).await;
    let payer = payer(&server, true);
    let mut client = client(&payer);
    let first = fetch(&mut client, format!("{}/job", server.origin)).await.unwrap();
    assert_eq!(first.0, StatusCode::OK);
    match fetch(&mut client, format!("{}/job", server.origin)).await {
        Err(ClientError::ServerMisbehaved(m)) => assert_eq!(m.kind, MisbehaviorKind::BadReceipt),
        other => panic!("the payer goes on paying a server without receipts: {other:?}"),
    }
    // Without requiring receipts the same server is still bounded by the count.
    let server = lying_server(Lie::NoReceipts, QUOTE).await;
    let payer = self::payer(&server, false);
    let (served, _) = jobs(&server, &payer, 5).await;
    assert_eq!(served, 5);
    assert!(signed(&payer).await <= bound(served));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_ask_without_sending_share_one_allowance_per_channel() {
    // Before the bound: 5 304 sat signed over five streams that sent nothing.
    let server = lying_server(Lie::AskWithoutSending, QUOTE).await;
    let payer = payer(&server, false);
    let mut client = client(&payer);
    // Open the channel on a paid request first.
    let (status, _) = fetch(&mut client, format!("{}/job", server.origin)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut client = self::client(&payer);
        let url = format!("{}/stream", server.origin);
        streams.push(tokio::spawn(async move { fetch(&mut client, url).await.map(|r| r.0) }));
    }
    for stream in streams {
        let _ = stream.await.unwrap();
    }
    // Top-ups run in the background: give the last ones time to finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signed = signed(&payer).await;
    assert!(signed <= bound(1), "signed {signed} over streams that sent nothing");
    assert!(server.liar.served.load(Ordering::SeqCst) == 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_client_cuts_do_not_raise_what_it_allows() {
    let server = lying_server(Lie::CutStreamsThenStorm, QUOTE).await;
    let payer = payer(&server, false);
    let mut client = client(&payer);
    // One paid request opens the channel and is served.
    let (status, _) = fetch(&mut client, format!("{}/job", server.origin)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    // Five streams, each cut by the client after its first event.
    for _ in 0..5 {
        let request =
            http::Request::get(format!("{}/stream", server.origin)).body(Full::default()).unwrap();
        let response = client.ready().await.unwrap().call(request).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.expect("one event").expect("read");
        assert!(first.data_ref().is_some_and(|data| data.starts_with(b"data: 1")));
        drop(body);
    }
    // Then the storm: what the cut streams delivered counts, their cuts do not.
    let (served, last) = jobs(&server, &payer, 10).await;
    assert_eq!(served, 0);
    names_claim_and_count(&last.expect("refused"));
    let counted = QUOTE.checked_add(MilliSats::from_msat(5 * 2_000)).unwrap();
    let most = FIRST.max(counted.to_sat_ceil()) + QUOTE.to_sat_ceil() + PREPAID;
    let signed = signed(&payer).await;
    assert!(signed <= most, "signed {signed} after five cut streams, bound {most}");
}
