//! Each example's `app()` served on a real loopback socket and driven by a client: open a
//! channel, pay, run out, top up; and every server example collects on chain by itself: its
//! settlement task closes a channel it served, with nobody asking, before the refund is valid.

mod common;

#[allow(dead_code)]
#[path = "../examples/demo.rs"]
mod demo;

#[allow(dead_code)]
#[path = "../examples/pay_as_you_go.rs"]
mod pay_as_you_go;

#[allow(dead_code)]
#[path = "../examples/wrap_hyper_service.rs"]
mod wrap_hyper_service;

#[allow(dead_code)]
#[path = "../examples/metered_internal_api.rs"]
mod metered_internal_api;

#[allow(dead_code)]
#[path = "../examples/sse_tokens.rs"]
mod sse_tokens;

#[allow(dead_code)]
#[path = "../examples/audio_stream.rs"]
mod audio_stream;

#[allow(dead_code)]
#[path = "../examples/durable_server.rs"]
mod durable_server;

use bitcoin::Transaction;
use common::client::{Opened, open_channel};
use common::http::{call, serve};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use paychan::chain::sim::SimulatedChain;

/// Mines to the channel's close margin and waits for the example's settlement task to close
/// it (nobody else does: the client never asks); mines the close and returns it, checked: it
/// spends the funding with both signatures and pays the server `paid_sat`.
async fn closed_by_the_server(
    chain: &SimulatedChain,
    opened: &Opened,
    paid_sat: u64,
) -> Transaction {
    let funding = opened.channel.outpoint();
    let params = opened.channel.params();
    while !params.is_closing(chain.tip()) {
        chain.mine(1);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let close = loop {
        let close = chain
            .mempool_txids()
            .into_iter()
            .filter_map(|txid| chain.get_transaction(&txid))
            .find(|tx| tx.input.iter().any(|input| input.previous_output == funding));
        if let Some(close) = close {
            break close;
        }
        assert!(std::time::Instant::now() < deadline, "no settlement task closed {funding}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(!params.refund_is_valid(chain.tip()), "closed before the refund is valid");
    chain.mine(1);
    assert!(matches!(
        chain.tx_status(&close.compute_txid()),
        paychan::chain::TxStatus::Confirmed { .. }
    ));
    assert_eq!(close.input[0].witness.len(), 4, "the 2-of-2 witness");
    assert_eq!(paychan::channel::server_amount(&close).to_sat(), paid_sat);
    close
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_settles_exactly_what_was_paid() {
    let s = demo::run(false).await.expect("the demo runs");
    assert_eq!(s.served, demo::REQUESTS);
    let metered = demo::PRICE.checked_mul(demo::REQUESTS).unwrap().to_sat_ceil();
    assert!(s.client_paid >= metered, "{} paid for {metered}", s.client_paid);
    assert!(
        s.client_paid <= metered + bitcoin::Amount::from_sat(1_000) + demo::PRICE.to_sat_ceil()
    );
    // The fair close: the server received what it metered; the prepaid rest came back.
    assert_eq!(s.server_received, metered, "the server received exactly what it metered");
    assert!(s.client_paid > metered, "something was prepaid, and returned");
    assert_eq!(s.client_back + s.server_received + s.settlement_fee, demo::CHANNEL);
    assert_eq!(
        s.wallet_after + s.client_back + s.server_received + s.settlement_fee + s.funding_fee,
        demo::WALLET
    );
    assert!(s.payments >= 2, "an opening payment and at least one top-up");
    assert!(s.settlement.input[0].witness.len() == 4, "co-signed 2-of-2 witness");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_as_you_go_charges_per_route() {
    let chain = SimulatedChain::new();
    let addr = serve(pay_as_you_go::app(chain.clone()).await).await;
    assert_eq!(call(addr, "GET", "/health", &[], None).await.status, 200);
    assert_eq!(call(addr, "GET", "/weather", &[], None).await.status, 402);
    let terms = call(addr, "GET", "/.well-known/payment-channel", &[], None).await.json();
    assert_eq!(terms["prices"]["routes"].as_array().unwrap().len(), 2);

    // 300 sat prepaid: 600 weather calls at 0.5 sat, or 15 translations at 20 sat.
    let opened = open_channel(addr, &chain, 100_000, 300).await;
    let header = opened.header(300);
    for _ in 0..15 {
        let reply =
            call(addr, "POST", "/translate", &[("payment-channel", &header)], Some(&"hi".into()))
                .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let reply = call(addr, "GET", "/weather", &[("payment-channel", &header)], None).await;
    assert_eq!(reply.status, 402);
    assert_eq!(reply.json()["channel"]["min_server_amount_sat"], 301);
    let reply =
        call(addr, "GET", "/weather", &[("payment-channel", &opened.header(301))], None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("payment-channel-balance"), Some("500"));
    closed_by_the_server(&chain, &opened, 301).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrap_hyper_service_meters_a_plain_service_fn() {
    let chain = SimulatedChain::new();
    let service = wrap_hyper_service::app(chain.clone()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    assert_eq!(call(addr, "GET", "/anything", &[], None).await.status, 402);
    let opened = open_channel(addr, &chain, 50_000, 294).await;
    let header = opened.header(294);
    for _ in 0..294 {
        let reply = call(addr, "GET", "/anything", &[("payment-channel", &header)], None).await;
        assert_eq!(reply.status, 200);
        assert!(reply.body.starts_with("hello, channel "), "{}", reply.body);
    }
    assert_eq!(
        call(addr, "GET", "/anything", &[("payment-channel", &header)], None).await.status,
        402
    );
    closed_by_the_server(&chain, &opened, 294).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metered_internal_api_reports_usage_per_team() {
    let chain = SimulatedChain::new();
    let addr = serve(metered_internal_api::app(chain.clone()).await).await;
    let team_a = open_channel(addr, &chain, 50_000, 1_000).await;
    let team_b = open_channel(addr, &chain, 50_000, 2_000).await;
    let body: serde_json::Value = "row\nrow\nrow".into();
    let cost = 2_000 + body.to_string().len() as u64; // 2 sat a call + 1 msat a body byte
    let reply =
        call(addr, "POST", "/reports", &[("payment-channel", &team_a.header(1_000))], Some(&body))
            .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["charged_msat"], cost);
    let usage = call(addr, "GET", "/usage", &[], None).await.json();
    let teams = usage["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 2);
    let a = teams.iter().find(|t| t["channel"] == team_a.channel.outpoint().to_string()).unwrap();
    assert_eq!(a["spent_msat"], cost);
    assert_eq!(a["balance_msat"], 1_000_000 - cost);
    let b = teams.iter().find(|t| t["channel"] == team_b.channel.outpoint().to_string()).unwrap();
    assert_eq!(b["spent_msat"], 0);
    closed_by_the_server(&chain, &team_a, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_server_serves_from_its_store_and_collects() {
    let chain = SimulatedChain::new();
    let store = paychan::store::MemoryStore::new();
    let addr = serve(durable_server::app(store, chain.clone()).await).await;
    let opened = open_channel(addr, &chain, 50_000, 300).await;
    let header = opened.header(300);
    for left in [200_000, 100_000, 0] {
        let reply = call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, format!("{left} msat").as_str()));
    }
    assert_eq!(call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await.status, 402);
    closed_by_the_server(&chain, &opened, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_tokens_streams_every_token_and_tops_up_in_band() {
    let s = sse_tokens::run(false).await.expect("the example runs");
    let expected: Vec<&str> =
        sse_tokens::TEXT.split(' ').cycle().take(sse_tokens::TOKENS as usize).collect();
    assert_eq!(s.tokens, expected, "every token in order, and no payment event");
    assert!(s.top_ups >= 2, "the stream ran out and was topped up in band: {}", s.top_ups);
    let metered = sse_tokens::PER_TOKEN
        .checked_mul(sse_tokens::TOKENS)
        .and_then(|tokens| tokens.checked_add(sse_tokens::PROMPT))
        .unwrap();
    assert_eq!(s.receipt.price_msat, metered, "the closing receipt states the whole stream");
    assert_eq!(s.server_received, metered.to_sat_ceil(), "a fair close at what was metered");
    assert!(s.client_paid > s.server_received, "something was prepaid, and came back");
    assert_eq!(s.client_back + s.server_received + s.settlement_fee, sse_tokens::CHANNEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_stream_is_paid_per_second_over_a_websocket() {
    let s = audio_stream::run(false).await.expect("the example runs");
    assert_eq!(s.seconds, audio_stream::SECONDS);
    assert!(s.top_ups >= 2, "top-up frames answered: {}", s.top_ups);
    let metered = audio_stream::PER_SECOND
        .checked_mul(audio_stream::SECONDS)
        .and_then(|audio| audio.checked_add(audio_stream::TUNE_IN))
        .unwrap();
    assert_eq!(s.receipt.price_msat, metered);
    assert_eq!(s.server_received, metered.to_sat_ceil());
    assert_eq!(s.client_back + s.server_received + s.settlement_fee, audio_stream::CHANNEL);
}

/// A payer with a funded wallet for the server at `addr` on `chain`.
fn funded_payer(chain: &SimulatedChain, addr: std::net::SocketAddr) -> paychan::client::Payer {
    use paychan::client::{KeyWallet, Payer, SpendingPolicy};
    let wallet = KeyWallet::new(common::secret(0x44));
    let coin = chain.faucet(wallet.script_pubkey(), bitcoin::Amount::from_sat(250_000));
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    let key = bitcoin::bip32::Xpriv::new_master(bitcoin::Network::Regtest, &[0x45; 32]).unwrap();
    Payer::builder(&format!("http://{addr}"), bitcoin::Network::Regtest, key)
        .wallet(wallet)
        .channel_value(bitcoin::Amount::from_sat(50_000))
        .policy(
            SpendingPolicy::default()
                .with_max_per_request(paychan::MilliSats::from_msat(100_000))
                .with_max_prepaid(bitcoin::Amount::from_sat(200))
                .with_max_total(bitcoin::Amount::from_sat(5_000)),
        )
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_priced_per_kib_is_counted_and_topped_up_ahead() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use paychan::client::{PaymentLayer, ServiceTransport};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Service, ServiceExt};

    let chain = SimulatedChain::new();
    let addr = serve(audio_stream::app(chain.clone()).await).await;
    let payer = funded_payer(&chain, addr);
    let top_ups = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = top_ups.clone();
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let wire = tower::service_fn(move |request: http::Request<Full<Bytes>>| {
        if request.uri().path() == "/payment-channel/payment" {
            counted.fetch_add(1, Ordering::Relaxed);
        }
        http.request(request)
    });
    let mut client =
        tower::ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(wire.clone());
    let request = http::Request::get(format!("http://{addr}/track.raw?seconds=40"))
        .body(Full::default())
        .unwrap();
    let response = client.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.body().is_metered());
    let body = response.into_body().collect().await.expect("the download completes").to_bytes();
    assert_eq!(body.len(), 40 * 8_000);
    assert!(top_ups.load(Ordering::Relaxed) >= 1, "the client paid ahead of the stream");

    // The fair close settles at what the server metered: up front and every byte.
    let cost = (body.len() as u64 * audio_stream::PER_KIB.to_msat()).div_ceil(1024);
    let metered = audio_stream::TUNE_IN.checked_add(paychan::MilliSats::from_msat(cost)).unwrap();
    let closed = payer.close_via(&ServiceTransport::<_, Full<Bytes>>::new(wire)).await.unwrap();
    assert_eq!(closed.server_amount, metered.to_sat_ceil());
    assert!(payer.committed().await.unwrap() > closed.server_amount, "the rest came back");
}

#[cfg(feature = "reqwest")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reqwest_middleware_reads_a_metered_sse_stream() {
    use paychan::client::PaymentMiddleware;

    let chain = SimulatedChain::new();
    let addr = serve(sse_tokens::app(chain.clone()).await).await;
    let payer = funded_payer(&chain, addr);
    let client =
        PaymentMiddleware::client(payer.clone(), reqwest::Client::builder()).unwrap().build();
    let response = client.get(format!("http://{addr}/generate?tokens=30")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().path(), "/generate", "the response keeps its URL");
    let text = response.text().await.unwrap();
    let tokens = text.lines().filter(|line| line.starts_with("data: ")).count();
    assert_eq!(tokens, 30, "{text}");
    assert!(!text.contains("payment-"), "the payment events are the middleware's: {text}");
    let metered =
        sse_tokens::PER_TOKEN.checked_mul(30).unwrap().checked_add(sse_tokens::PROMPT).unwrap();
    assert_eq!(payer.latest_receipt().unwrap().price_msat, metered);
    let closed = payer.close_via(&paychan::client::ReqwestTransport::new().unwrap()).await.unwrap();
    assert_eq!(closed.server_amount, metered.to_sat_ceil());
}

/// A client retry with the same `Idempotency-Key` is answered from the server's record: not
/// charged again, and the replayed receipt does not trip the client's receipt checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_retry_with_an_idempotency_key_is_replayed_not_charged() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use paychan::client::PaymentLayer;
    use paychan::wire::IDEMPOTENT_REPLAYED;
    use tower::{Service, ServiceExt};

    let chain = SimulatedChain::new();
    let addr = serve(pay_as_you_go::app(chain.clone()).await).await;
    let payer = funded_payer(&chain, addr);
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut client =
        tower::ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(http);
    let mut translate = async |key: &str| {
        let request = http::Request::post(format!("http://{addr}/translate"))
            .header("idempotency-key", key)
            .body(Full::from("hello"))
            .unwrap();
        let response = client.ready().await.unwrap().call(request).await.unwrap();
        let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (replayed, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
    };
    let (replayed, first) = translate("order-1").await;
    assert!(!replayed);
    let spent = || async { payer.status().await.unwrap().unwrap().balance };
    let balance = spent().await;
    let (replayed, again) = translate("order-1").await;
    assert!(replayed, "the retry is the first answer, replayed");
    assert_eq!(again, first);
    // The payer still trusts the server: the replayed receipt was not taken for a new one.
    let (replayed, _) = translate("order-2").await;
    assert!(!replayed);
    let price = paychan::MilliSats::from_msat(20_000);
    let balance = balance.unwrap().checked_sub(price);
    assert_eq!(spent().await, balance, "the next request is the only one charged since the first");
    let receipt = payer.latest_receipt().expect("receipts checked");
    assert_eq!(receipt.price_msat, paychan::MilliSats::from_msat(20_000));
}

/// A WebSocket server that charges without sending and asks for more, again and again: the
/// client's `PaidStream` pays one unit and `max_prepaid` beyond what it received, then no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_asks_without_sending_gets_a_bounded_top_up() {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::Full;
    use paychan::client::{ClientError, ServiceTransport};
    use paychan::server::{PaywallLayer, RoutePrices, StreamMeter};
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

    let price = paychan::MilliSats::from_msat(20_000);
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x61);
    let tip = paychan::chain::follow_tip(chain.clone(), std::time::Duration::from_millis(100))
        .await
        .unwrap();
    let prices = RoutePrices::new().route(http::Method::GET, "/drain", price);
    let drain = move |upgrade: WebSocketUpgrade, meter: StreamMeter| async move {
        upgrade.on_upgrade(move |mut socket| async move {
            for _ in 0..5 {
                // Spend the whole balance without sending anything, then ask.
                while meter.charge(price).await.is_ok() {}
                let Err(exhausted) = meter.charge(price).await else { return };
                if socket.send(Message::Text(exhausted.to_json().into())).await.is_err() {
                    return;
                }
                let _ = meter.wait_and_charge(price).await;
            }
        })
    };
    let app = axum::Router::new().route("/drain", axum::routing::get(drain)).layer(
        PaywallLayer::new(paychan::store::MemoryStore::new(), prices, tip)
            .with_negotiation(negotiation)
            .with_stream_hold(std::time::Duration::from_millis(500)),
    );
    let addr = serve(app).await;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let key = bitcoin::bip32::Xpriv::new_master(bitcoin::Network::Regtest, &[0x62; 32]).unwrap();
    let wallet = paychan::client::KeyWallet::new(common::secret(0x63));
    let coin = chain.faucet(wallet.script_pubkey(), bitcoin::Amount::from_sat(250_000));
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    let payer =
        paychan::client::Payer::builder(&format!("http://{addr}"), bitcoin::Network::Regtest, key)
            .wallet(wallet)
            .channel_value(bitcoin::Amount::from_sat(50_000))
            .transport(ServiceTransport::<_, Full<Bytes>>::new(http))
            .policy(
                paychan::client::SpendingPolicy::default()
                    .with_max_per_request(paychan::MilliSats::from_msat(50_000))
                    .with_max_prepaid(bitcoin::Amount::from_sat(200)),
            )
            .build()
            .unwrap();
    payer.open().await.unwrap();
    let stream = payer.stream(&http::Method::GET, "/drain").await.unwrap();
    let mut handshake = format!("ws://{addr}/drain").into_client_request().unwrap();
    handshake.headers_mut().insert(paychan::wire::PAYMENT_CHANNEL, stream.header().clone());
    let (mut socket, _) = tokio_tungstenite::connect_async(handshake).await.unwrap();
    let committed = payer.committed().await.unwrap();
    let mut outcomes = Vec::new();
    while let Some(Ok(tungstenite::Message::Text(text))) = socket.next().await {
        let problem: paychan::wire::Problem = serde_json::from_str(&text).unwrap();
        outcomes.push(stream.top_up(&problem).await.map(|_| ()));
    }
    assert!(outcomes.len() >= 2, "{outcomes:?}");
    assert!(outcomes[0].is_ok(), "the first request is paid: {outcomes:?}");
    assert!(
        outcomes[1..].iter().all(|o| matches!(o, Err(ClientError::Policy(_)))),
        "nothing more without units received: {outcomes:?}"
    );
    // One unit and max_prepaid at most, for nothing received.
    let paid_more = payer.committed().await.unwrap() - committed;
    assert!(paid_more <= bitcoin::Amount::from_sat(20 + 200), "{paid_more}");
}
