//! Each example's `app()` served on a real loopback socket and driven by a client: open a
//! channel, pay, run out, top up.

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

use common::client::open_channel;
use common::http::{call, serve};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use paychan::chain::sim::SimulatedChain;

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
}
