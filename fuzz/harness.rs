//! What each fuzz target does with its input, shared by the `cargo fuzz` targets
//! (`fuzz/fuzz_targets/*.rs`, coverage-guided, nightly) and by `tests/fuzz_corpus.rs`, which
//! replays the kept corpus (`fuzz/corpus/<target>/`) and a bounded random run on stable Rust in
//! every `cargo test`.
//!
//! Each function feeds network input to one of the server's parsers or validators. None may
//! panic, and each checks the invariant that makes its answer safe: an accepted payment can be
//! co-signed into a close that Bitcoin Core's interpreter accepts; an accepted refund completes
//! into a valid spend of the funding output; a negotiation answer is never a 5xx other than
//! 503 and every refusal is a problem document.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::sync::OnceLock;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::deserialize;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Transaction, TxOut, Txid};
use paychan::channel::{ChainTip, Channel, ChannelParams, PaymentCheck, Terms};

const TIP: ChainTip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
const VALUE: Amount = Amount::from_sat(100_000);

fn key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).expect("non-zero")
}

fn public(key: &SecretKey) -> CompressedPublicKey {
    CompressedPublicKey(key.public_key(&Secp256k1::new()))
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    ScriptBuf::new_p2wpkh(&public(key).wpubkey_hash())
}

/// One channel every target checks against: client key 1, server key 2, 100 000 sat,
/// expiring 1 000 blocks after the tip; its unsigned funding spends one P2WPKH coin of key 9.
pub struct Fixture {
    pub terms: Terms,
    pub params: ChannelParams,
    pub funding: Transaction,
    pub coin: TxOut,
    pub channel: Channel,
    /// A valid payment of 1 000 sat: the channel's best.
    pub best: Transaction,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let terms = Terms::default();
        let params = terms
            .agree(
                public(&key(1)),
                public(&key(2)),
                VALUE,
                LockTime::from_height(TIP.height + 1_000).expect("height"),
                p2wpkh(&key(1)),
                p2wpkh(&key(2)),
                TIP,
            )
            .expect("default terms");
        let coin = TxOut { value: Amount::from_sat(150_000), script_pubkey: p2wpkh(&key(9)) };
        let change = TxOut { value: Amount::from_sat(49_000), script_pubkey: p2wpkh(&key(9)) };
        let prevout = OutPoint { txid: Txid::from_byte_array([7; 32]), vout: 0 };
        let (funding, outpoint) = params.build_funding(&[prevout], Some(change));
        let channel = params.clone().at(outpoint);
        let mut best = channel.build_payment(Amount::from_sat(1_000)).expect("buildable");
        channel.sign_payment(&mut best, &key(1)).expect("client key");
        Fixture { terms, params, funding, coin, channel, best }
    })
}

use bitcoin::hashes::Hash as _;

/// The `Payment-Channel` header decoder: any bytes, no panic; what decodes re-encodes to the
/// same header.
pub fn header(data: &[u8]) {
    if let Ok(tx) = paychan::wire::decode_payment(data) {
        assert_eq!(paychan::wire::encode_payment(&tx).as_bytes(), data, "one encoding per payment");
    }
}

/// A header checked as a payment of the fixture's channel, with and without a best payment.
/// An accepted increase co-signs into a close that Bitcoin Core's interpreter accepts.
pub fn payment(data: &[u8]) {
    let Ok(tx) = paychan::wire::decode_payment(data) else { return };
    let f = fixture();
    for best in [None, Some(&f.best)] {
        if let Ok(PaymentCheck::Increase { server_amount, .. }) =
            f.channel.check_payment(best, &tx, TIP)
        {
            assert_eq!(tx.output[0].value, server_amount);
            let close =
                f.channel.close_transaction(&tx, &key(2)).expect("an accepted payment co-signs");
            let funding = TxOut { value: VALUE, script_pubkey: f.params.funding_script_pubkey() };
            let outpoint = f.channel.outpoint();
            close
                .verify(|op| (*op == outpoint).then(|| funding.clone()))
                .expect("the close of an accepted payment is valid");
        }
    }
    let _ = f.channel.verify_client_signature(&tx);
}

/// A consensus-encoded refund checked against the fixture's unsigned funding; an accepted one
/// completes into a spend Bitcoin Core's interpreter accepts.
pub fn refund(data: &[u8]) {
    let Ok(tx) = deserialize::<Transaction>(data) else { return };
    let f = fixture();
    let Ok(checked) = f.params.check_refund(&f.terms, &f.funding, &tx, TIP) else { return };
    let outpoint = checked.funding_outpoint();
    let server = checked.sign(&key(2)).expect("server key");
    let complete = f.params.complete_refund(&tx, &key(1), &server).expect("client key");
    let funding = TxOut { value: VALUE, script_pubkey: f.params.funding_script_pubkey() };
    complete
        .verify(|op| (*op == outpoint).then(|| funding.clone()))
        .expect("an accepted refund completes into a valid spend");
}

/// A consensus-encoded funding checked against the fixture (every input said to spend the
/// fixture's coin).
pub fn funding(data: &[u8]) {
    let Ok(tx) = deserialize::<Transaction>(data) else { return };
    let f = fixture();
    let prevouts = vec![f.coin.clone(); tx.input.len().min(100)];
    let outpoint = OutPoint { txid: tx.compute_txid(), vout: 0 };
    let _ = f.params.check_funding(&f.terms, outpoint, &tx, &prevouts);
    let _ = f.params.check_funding(&f.terms, f.channel.outpoint(), &tx, &prevouts);
}

/// A request to the negotiation endpoints (served by `PaywallLayer` on a memory store and the
/// simulated chain): the first byte picks the endpoint, the rest is the body.
pub fn negotiation(data: &[u8]) {
    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let Some((&pick, body)) = data.split_first() else { return };
    let f = fixture();
    let id = paychan::wire::ChannelId::new(f.channel.outpoint());
    let (method, path) = match pick % 7 {
        0 => ("POST", "/payment-channel/open".to_owned()),
        1 => ("POST", "/payment-channel/refund".to_owned()),
        2 => ("POST", "/payment-channel/fund".to_owned()),
        3 => ("POST", format!("/payment-channel/channels/{id}/close")),
        4 => ("GET", format!("/payment-channel/channels/{}", String::from_utf8_lossy(body))),
        5 => ("GET", "/.well-known/payment-channel".to_owned()),
        _ => ("GET", "/paid".to_owned()),
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(
            path.parse::<http::Uri>()
                .unwrap_or_else(|_| "/payment-channel/x".parse().expect("uri")),
        )
        .header("content-type", "application/json");
    if pick % 7 >= 3
        && let Ok(value) = http::HeaderValue::from_bytes(body)
    {
        request = request.header(paychan::wire::PAYMENT_CHANNEL, value);
    }
    let request = request.body(Body::from(body.to_vec())).expect("request");
    let (app, runtime) = server();
    let response = runtime.block_on(app.clone().oneshot(request)).expect("infallible");
    let status = response.status();
    assert!(!status.is_server_error() || status == 503, "{status} for {path}");
    if status.is_client_error() && status != 404 && status != 405 {
        let content_type = response.headers().get("content-type").cloned();
        let body = runtime.block_on(response.into_body().collect()).expect("body").to_bytes();
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{status} for {path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

fn server() -> &'static (axum::Router, tokio::runtime::Runtime) {
    static SERVER: OnceLock<(axum::Router, tokio::runtime::Runtime)> = OnceLock::new();
    SERVER.get_or_init(|| {
        use bitcoin::bip32::Xpriv;
        use paychan::chain::sim::SimulatedChain;
        use paychan::server::{Negotiation, PaywallLayer};
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let chain = SimulatedChain::new();
        let master = Xpriv::new_master(bitcoin::Network::Regtest, &[3; 32]).expect("seed");
        let negotiation = Negotiation::new(
            bitcoin::Network::Regtest,
            Terms::default(),
            master,
            p2wpkh(&key(2)),
            chain.clone(),
        )
        .with_open_rate_limit(u32::MAX, std::time::Duration::from_secs(60));
        let (_tip, tip) = tokio::sync::watch::channel(chain.tip());
        std::mem::forget(_tip);
        let app =
            axum::Router::new().route("/paid", axum::routing::get(|| async { "paid" })).layer(
                PaywallLayer::new(
                    paychan::store::MemoryStore::new(),
                    paychan::MilliSats::from_msat(1_000),
                    tip,
                )
                .with_negotiation(negotiation),
            );
        (app, runtime)
    })
}
