//! The negotiation endpoints over real loopback HTTP, on the simulated chain: terms, open,
//! refund, fund, paid requests and a cooperative close that settles — and the refusals.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::{Amount, Network, Transaction, ecdsa};
use common::client::{funding_and_refund, params_from};
use common::http::{Reply, call, serve};
use common::{p2wpkh, public, secret};
use paychan::MilliSats;
use paychan::chain::TxStatus;
use paychan::chain::sim::SimulatedChain;
use paychan::server::{Negotiation, PaywallLayer};
use paychan::store::MemoryStore;
use paychan::wire::{self, ChannelId};
use serde_json::{Value, json};
use tokio::sync::watch;

const PRICE: MilliSats = MilliSats::from_msat(100_000);

struct Server {
    addr: SocketAddr,
    chain: SimulatedChain,
}

async fn server(open_limit: u32) -> Server {
    server_with(|negotiation| negotiation.with_open_rate_limit(open_limit, Duration::from_secs(60)))
        .await
}

async fn server_with(
    configure: impl FnOnce(Negotiation<SimulatedChain>) -> Negotiation<SimulatedChain>,
) -> Server {
    let chain = SimulatedChain::new();
    let (_tip_tx, tip) = watch::channel(chain.tip());
    std::mem::forget(_tip_tx); // the tip stays fixed for these tests
    let negotiation = common::negotiation(&chain, 7);
    let negotiation = configure(negotiation);
    let app = Router::new()
        .route("/paid", get(|| async { "paid content" }))
        .layer(PaywallLayer::new(MemoryStore::new(), PRICE, tip).with_negotiation(negotiation));
    Server { addr: serve(app).await, chain }
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> Reply {
        call(self.addr, "POST", &format!("/payment-channel/{path}"), &[], Some(&body)).await
    }

    async fn open(&self, value: u64, blocks: u32) -> Reply {
        self.open_from(value, blocks, &[]).await
    }

    async fn open_from(&self, value: u64, blocks: u32, headers: &[(&str, &str)]) -> Reply {
        let expiry = self.chain.tip().height + blocks;
        let body = json!({
            "client_pubkey": public(&secret(1)).to_string(),
            "value_sat": value,
            "expiry": expiry,
            "client_script": p2wpkh(&secret(1)).to_hex_string(),
        });
        call(self.addr, "POST", "/payment-channel/open", headers, Some(&body)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_refund_fund_pay_and_close_over_http() {
    let srv = server(10).await;
    let terms = call(srv.addr, "GET", "/.well-known/payment-channel", &[], None).await;
    assert_eq!(terms.status, 200);
    let terms = terms.json();
    assert_eq!(terms["network"], "regtest");
    assert_eq!(terms["endpoints"]["open"], "/payment-channel/open");
    assert_eq!(terms["min_value_sat"], 10_000);

    let open = srv.open(100_000, 200).await;
    assert_eq!(open.status, 200, "{}", open.body);
    let open = open.json();
    let params = params_from(&open);
    assert_eq!(params.funding_script_pubkey().to_hex_string(), open["funding_script_pubkey"]);
    let (unsigned, signed, refund) = funding_and_refund(&srv.chain, &params);

    // Funding before the refund is signed is refused.
    let channel = params.clone().at(refund.input[0].previous_output);
    let mut first = channel.build_payment(Amount::from_sat(1_000)).unwrap();
    channel.sign_payment(&mut first, &secret(1)).unwrap();
    let fund = json!({ "proposal": open["proposal"], "funding_tx": serialize_hex(&signed), "payment": wire::encode_payment(&first) });
    assert_eq!(srv.post("fund", fund.clone()).await.status, 409);

    // A refund with the wrong lock time is refused with its rule's code.
    let mut bad = refund.clone();
    bad.lock_time = LockTime::from_consensus(bad.lock_time.to_consensus_u32() + 1);
    let reply = srv
        .post("refund", json!({ "proposal": open["proposal"], "funding_tx": serialize_hex(&unsigned), "refund_tx": serialize_hex(&bad) }))
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    assert_eq!(reply.json()["type"], "urn:paychan:problem:refund-wrong-lock-time");

    let reply = srv
        .post("refund", json!({ "proposal": open["proposal"], "funding_tx": serialize_hex(&unsigned), "refund_tx": serialize_hex(&refund) }))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = reply.json();
    let signature: Vec<u8> = (0..reply["signature"].as_str().unwrap().len() / 2)
        .map(|i| {
            u8::from_str_radix(&reply["signature"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect();
    let signature = ecdsa::Signature::from_slice(&signature).unwrap();
    params
        .verify_refund_signature(&refund, &signature)
        .expect("the client verifies the refund signature");
    let id: ChannelId = reply["channel"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.outpoint(), channel.outpoint());

    let reply = srv.post("fund", fund).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.json()["balance_msat"], 1_000_000);
    assert_eq!(srv.chain.tx_status(&id.outpoint().txid), TxStatus::InMempool);

    // Ten requests at 100 sat are paid by the first 1 000 sat; the eleventh is a 402.
    let header = wire::encode_payment(&first);
    for _ in 0..10 {
        let reply = call(srv.addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let reply = call(srv.addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
    assert_eq!(reply.status, 402);
    assert_eq!(reply.json()["channel"]["min_server_amount_sat"], 1_100);
    let status = call(srv.addr, "GET", &format!("/payment-channel/channels/{id}"), &[], None).await;
    assert_eq!(status.json()["spent_msat"], 1_000_000);

    // Cooperative close: the client proves itself with a payment of the channel.
    let refused = srv.post(&format!("channels/{id}/close"), json!({})).await;
    assert_eq!(refused.status, 401);
    let reply = call(
        srv.addr,
        "POST",
        &format!("/payment-channel/channels/{id}/close"),
        &[("payment-channel", &header)],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = reply.json();
    let close: Transaction = deserialize_hex(reply["close_tx"].as_str().unwrap()).unwrap();
    srv.chain.mine(1);
    assert!(matches!(srv.chain.tx_status(&close.compute_txid()), TxStatus::Confirmed { .. }));
    assert_eq!(close.output[0].value, Amount::from_sat(1_000));
    assert_eq!(close.output[0].script_pubkey, p2wpkh(&secret(2)));
    // No more service on a closed channel.
    let reply = call(srv.addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
    assert_eq!(reply.json()["type"], "urn:paychan:problem:channel-not-open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_rate_limit() {
    let srv = server(3).await;
    let reply = srv.open(1_000, 200).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["type"], "urn:paychan:problem:value-out-of-bounds");
    let reply = srv.open(100_000, 10).await;
    assert_eq!(reply.json()["type"], "urn:paychan:problem:expiry-out-of-bounds");
    let reply = srv.post("open", json!({ "client_pubkey": "zz" })).await;
    assert!(reply.status >= 400 && reply.status < 500, "{}", reply.status);
    let reply = srv
        .post("refund", json!({ "proposal": 12345, "funding_tx": "00", "refund_tx": "00" }))
        .await;
    assert_eq!(reply.status, 400, "malformed transactions are refused first");
    let reply = srv.post("fund", json!({ "proposal": 12345, "funding_tx": serialize_hex(&Transaction {
        version: bitcoin::transaction::Version::TWO, lock_time: LockTime::ZERO, input: vec![], output: vec![] }), "payment": "AAAA" })).await;
    assert_eq!(reply.status, 400);
    // Two refused openings counted; the third is allowed, the fourth within the window from
    // this address is refused.
    assert_eq!(srv.open(100_000, 200).await.status, 200);
    let reply = srv.open(100_000, 200).await;
    assert_eq!(reply.status, 429, "{}", reply.body);
    assert_eq!(reply.json()["type"], "urn:paychan:problem:rate-limited");
}

/// Security review S5, S6, S12 and S16: proposals expire and are capped per client (the client
/// address taken from a trusted proxy's header), `/fund` checks what needs no chain lookup
/// first and bounds the inputs, a repeated `/fund` answers as the first, and a malformed body
/// gets a problem document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_abuse_is_bounded_and_fund_is_idempotent() {
    let srv = server_with(|n| {
        n.with_proposal_limits(Duration::from_millis(300), 2)
            .with_client_ip_header(http::HeaderName::from_static("x-forwarded-for"))
    })
    .await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    // The proxy appends the real address: the last one counts, not what the client wrote.
    let a = from("6.6.6.6, 1.1.1.1");
    assert_eq!(srv.open_from(100_000, 200, &a).await.status, 200);
    let first = srv.open_from(100_000, 200, &from("1.1.1.1")).await;
    assert_eq!(first.status, 200);
    let full = srv.open_from(100_000, 200, &from("9.9.9.9, 1.1.1.1")).await;
    assert_eq!((full.status, full.json()["code"].as_str()), (429, Some("too-many-pending")));
    assert_eq!(srv.open_from(100_000, 200, &from("2.2.2.2")).await.status, 200);
    // Proposals expire: the address may open again, and an expired proposal is unknown.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(srv.open_from(100_000, 200, &a).await.status, 200);
    let params = params_from(&first.json());
    let (unsigned, _, refund) = funding_and_refund(&srv.chain, &params);
    let expired = json!({ "proposal": first.json()["proposal"], "funding_tx": serialize_hex(&unsigned), "refund_tx": serialize_hex(&refund) });
    let reply = srv.post("refund", expired).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (404, Some("unknown-proposal")));

    // A malformed body is a problem document, not axum's plain text.
    let reply = srv.post("fund", json!({ "proposal": "x" })).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    assert_eq!(reply.json()["code"], "bad-request");

    // A full channel: open, refund, then /fund tries.
    let open = srv.open_from(100_000, 200, &from("3.3.3.3")).await.json();
    let params = params_from(&open);
    let (unsigned, signed, refund) = funding_and_refund(&srv.chain, &params);
    let reply = srv.post("refund", json!({ "proposal": open["proposal"], "funding_tx": serialize_hex(&unsigned), "refund_tx": serialize_hex(&refund) })).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let channel = params.clone().at(refund.input[0].previous_output);
    let mut payment = channel.build_payment(Amount::from_sat(1_000)).unwrap();
    channel.sign_payment(&mut payment, &secret(1)).unwrap();
    let fund = |funding: &Transaction| json!({ "proposal": open["proposal"], "funding_tx": serialize_hex(funding), "payment": wire::encode_payment(&payment) });

    // Another transaction (its inputs unknown to the chain): refused for its txid, before
    // any input is looked up.
    let mut other = signed.clone();
    other.input[0].previous_output.vout += 7;
    let reply = srv.post("fund", fund(&other)).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (400, Some("funding-txid-mismatch")));
    // Too many inputs to look up.
    let mut wide = signed.clone();
    wide.input = vec![signed.input[0].clone(); 65];
    let reply = srv.post("fund", fund(&wide)).await;
    assert_eq!(reply.status, 400);

    let reply = srv.post("fund", fund(&signed)).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let again = srv.post("fund", fund(&signed)).await;
    assert_eq!((again.status, again.json()), (201, reply.json()), "a retry answers as the first");
    assert_eq!(srv.chain.tx_status(&signed.compute_txid()), TxStatus::InMempool);
}

/// Review 2026-12 (server side): behind a trusted front proxy every client's peer is the
/// proxy; with `Merchant::with_client_ip_header` (what `paychan serve` sets with
/// `trust_forwarded_for`) the per-client open rate counts the clients the front names, not
/// the front. Without it the eleventh open in a minute is refused for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_behind_a_front_proxy_limits_each_client_not_the_proxy() {
    for (header, refused) in [(true, 0), (false, 2)] {
        let chain = SimulatedChain::new();
        let master = bitcoin::bip32::Xpriv::new_master(Network::Regtest, &[0x42; 32]).unwrap();
        let merchant =
            paychan::Merchant::new(Network::Regtest, master, p2wpkh(&secret(2)), chain.clone());
        let merchant = if header {
            merchant.with_client_ip_header(http::HeaderName::from_static("x-forwarded-for"))
        } else {
            merchant
        };
        let paid = merchant.start(PRICE).await.unwrap();
        let app = Router::new().route("/paid", get(|| async { "ok" })).layer(paid.layer());
        let srv = Server { addr: serve(app).await, chain };
        let mut statuses = Vec::new();
        for n in 0..12 {
            let client = format!("198.51.100.{n}");
            statuses
                .push(srv.open_from(100_000, 200, &[("x-forwarded-for", &client)]).await.status);
        }
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), refused, "{statuses:?}");
        assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    }
}
