//! The end-to-end demo, over real loopback HTTP, in one process: an axum API behind
//! `PaywallLayer` (memory store, simulated chain) and a hyper-util client behind
//! `PaymentLayer`. The client opens a channel on its first 402, pays for every request, tops
//! up when the prepaid balance runs out, closes cooperatively; a block is mined and the
//! settlement is checked against what was paid.
//!
//! Run with `cargo run --example demo`. The chain is simulated (no network) but checks every
//! transaction with Bitcoin Core's consensus interpreter and relay policy. The keys are fixed
//! demo keys: never use them for real coins.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, Network, OutPoint, ScriptBuf, Transaction};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use paychan::chain::TxStatus;
use paychan::chain::sim::SimulatedChain;
use paychan::client::{
    KeyWallet, MemoryClientStore, Payer, PaymentLayer, ServiceTransport, SpendingPolicy,
};
use paychan::server::Paid;
use paychan::wire::{PAYMENT_CHANNEL, PAYMENT_CHANNEL_BALANCE};
use paychan::{Merchant, MilliSats};
use tower::{Service, ServiceBuilder, ServiceExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What one request costs.
pub(crate) const PRICE: MilliSats = MilliSats::from_msat(150_000);
/// How many requests the client makes.
pub(crate) const REQUESTS: u64 = 12;
/// The client wallet's one coin.
pub(crate) const WALLET: Amount = Amount::from_sat(250_000);
/// The channel the client opens.
pub(crate) const CHANNEL: Amount = Amount::from_sat(50_000);

fn demo_key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).expect("non-zero demo key")
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let public = CompressedPublicKey(key.public_key(&Secp256k1::new()));
    ScriptBuf::new_p2wpkh(&public.wpubkey_hash())
}

/// The API: `GET /joke`, one [`PRICE`] each, with the negotiation endpoints and the
/// settlement task (a `Merchant`: it closes every channel on chain before its refund is valid,
/// whether the client closes it or not).
pub(crate) async fn app(chain: SimulatedChain) -> Router {
    let master = Xpriv::new_master(Network::Regtest, b"paychan demo server").expect("seed");
    let paid = Merchant::new(Network::Regtest, master, p2wpkh(&demo_key(0x22)), chain)
        .with_cpfp_key(demo_key(0x22))
        // Short passes for the simulated chain; a real node's blocks need the defaults only.
        .with_intervals(Duration::from_millis(100), Duration::from_secs(1))
        .start(PRICE)
        .await
        .expect("the simulated chain answers");
    Router::new().route("/joke", get(joke)).layer(paid.layer())
}

async fn joke(paid: Paid) -> String {
    format!("a satoshi walks into a bar (charged {})", paid.price)
}

/// What the demo did, checked against the chain.
#[derive(Debug)]
pub(crate) struct Summary {
    pub(crate) served: u64,
    pub(crate) payments: usize,
    pub(crate) client_paid: Amount,
    pub(crate) settlement: Transaction,
    pub(crate) server_received: Amount,
    pub(crate) client_back: Amount,
    pub(crate) settlement_fee: Amount,
    pub(crate) funding_fee: Amount,
    pub(crate) wallet_after: Amount,
}

/// Serves [`app`] on a loopback port and runs the client against it.
pub(crate) async fn run(verbose: bool) -> Result<Summary, Error> {
    let say = |line: String| {
        if verbose {
            println!("{line}");
        }
    };
    let chain = SimulatedChain::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = app(chain.clone()).await.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, server).await });
    say(format!("API listening on http://{addr}: GET /joke costs {PRICE}"));

    // The client: a wallet with one coin, a key for its channels, and a spending policy.
    let wallet = KeyWallet::new(demo_key(0x33));
    let (coin, output) = (chain.faucet(wallet.script_pubkey(), WALLET), WALLET);
    wallet.add_coin(coin, chain.utxo(&coin).ok_or("faucet")?);
    say(format!(
        "client wallet holds {output} on a simulated regtest chain at height {}",
        chain.tip().height
    ));
    let payer = Payer::builder(
        &format!("http://{addr}"),
        Network::Regtest,
        Xpriv::new_master(Network::Regtest, &[0x11; 32])?,
    )
    .store(MemoryClientStore::new())
    .wallet(wallet.clone())
    .channel_value(CHANNEL)
    .policy(
        SpendingPolicy::default()
            .with_max_per_request(MilliSats::from_msat(200_000))
            .with_max_prepaid(Amount::from_sat(1_000))
            .with_max_total(Amount::from_sat(10_000)),
    )
    .build()?;

    // A hyper-util client; the inner service logs every exchange on the wire.
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let wire = tower::service_fn(move |request: Request<Full<Bytes>>| {
        let http = http.clone();
        async move {
            let line = format!("{} {}", request.method(), request.uri().path());
            let paid =
                if request.headers().contains_key(PAYMENT_CHANNEL) { " + payment" } else { "" };
            let response = http.request(request).await?;
            if verbose {
                let balance =
                    response.headers().get(PAYMENT_CHANNEL_BALANCE).and_then(|v| v.to_str().ok());
                let balance = balance.map(|b| format!(", balance {b} msat")).unwrap_or_default();
                println!("  {line}{paid} -> {}{balance}", response.status());
            }
            Ok::<_, hyper_util::client::legacy::Error>(response)
        }
    });
    let mut client =
        ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(wire.clone());

    let mut served = 0;
    let mut payments = 0;
    let mut last_paid = Amount::ZERO;
    for n in 1..=REQUESTS {
        say(format!("request {n}"));
        let request = Request::get(format!("http://{addr}/joke")).body(Full::default())?;
        let response = client.ready().await?.call(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            return Err(format!("request {n}: {status} {}", String::from_utf8_lossy(&body)).into());
        }
        served += 1;
        let paid = payer.channel().await?.map_or(Amount::ZERO, |c| c.paid());
        if paid != last_paid {
            payments += 1;
            say(format!("  the client signed a payment of {} sat in total", paid.to_sat()));
            last_paid = paid;
        }
    }

    say("closing the channel fairly: the client signs a payment of what was metered".into());
    let closed = payer.close_via(&ServiceTransport::<_, Full<Bytes>>::new(wire)).await?;
    chain.mine(1);
    let TxStatus::Confirmed { confirmations, .. } = chain.tx_status(&closed.txid) else {
        return Err("the settlement did not confirm".into());
    };
    say(format!("settlement {} confirmed ({confirmations} confirmation)", closed.txid));
    let settlement = chain.get_transaction(&closed.txid).ok_or("settlement missing")?;
    let received =
        |vout: u32| chain.utxo(&OutPoint::new(closed.txid, vout)).map_or(Amount::ZERO, |o| o.value);
    let channel = payer.committed().await?;
    let funding_fee = WALLET - wallet.balance() - CHANNEL;
    Ok(Summary {
        served,
        payments,
        client_paid: channel,
        server_received: received(0),
        client_back: received(1),
        settlement_fee: closed.fee,
        funding_fee,
        wallet_after: wallet.balance(),
        settlement,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let s = run(true).await?;
    let metered = PRICE.checked_mul(s.served).ok_or("overflow")?;
    println!("\nsummary");
    println!("  requests served      {} at {PRICE} = {metered}", s.served);
    println!(
        "  payments signed      {} (one per channel change; each one replaces the last)",
        s.payments
    );
    println!(
        "  sats signed          {} sat (prepaid and unused: {} sat, returned by the fair close)",
        s.client_paid.to_sat(),
        (s.client_paid - metered.to_sat_ceil()).to_sat()
    );
    println!("  settlement txid      {}", s.settlement.compute_txid());
    println!("  server received      {} sat", s.server_received.to_sat());
    println!(
        "  client got back      {} sat from the channel (settlement fee {} sat)",
        s.client_back.to_sat(),
        s.settlement_fee.to_sat()
    );
    println!(
        "  client wallet        {} sat -> {} sat + {} sat back (funding fee {} sat)",
        WALLET.to_sat(),
        s.wallet_after.to_sat(),
        s.client_back.to_sat(),
        s.funding_fee.to_sat()
    );
    // The books balance to the satoshi: the server received what it metered, nothing
    // prepaid is lost.
    assert_eq!(s.server_received, metered.to_sat_ceil(), "the server received what it metered");
    assert_eq!(s.client_back + s.server_received + s.settlement_fee, CHANNEL);
    assert_eq!(
        s.wallet_after + s.client_back + s.server_received + s.settlement_fee + s.funding_fee,
        WALLET
    );
    Ok(())
}
