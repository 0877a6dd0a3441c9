//! A streamed completion priced per token: an SSE endpoint behind `PaywallLayer` charges a
//! small price up front and then every token as it goes out (`StreamMeter::sse`). The client,
//! a hyper-util client behind `PaymentLayer`, reads the stream as any SSE stream; when the
//! prepaid balance runs out mid-stream the server sends a `payment-required` event and holds,
//! the client's layer tops up on the side (`POST /payment-channel/payment`) without the caller
//! seeing the event, and the stream resumes. The stream ends with a signed receipt of all it
//! cost; the channel is closed fairly and the settlement checked on the simulated chain.
//!
//! Run with `cargo run --example sse_tokens`. The keys are fixed demo keys.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, Network, OutPoint, ScriptBuf};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use paychan::chain::sim::SimulatedChain;
use paychan::client::{
    KeyWallet, MemoryClientStore, Payer, PaymentLayer, ServiceTransport, SpendingPolicy,
};
use paychan::server::{RoutePrices, StreamMeter};
use paychan::wire::Receipt;
use paychan::{Merchant, MilliSats};
use tower::{Service, ServiceBuilder, ServiceExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The price of a completion up front (the prompt).
pub(crate) const PROMPT: MilliSats = MilliSats::from_msat(1_000);
/// The price of each token streamed.
pub(crate) const PER_TOKEN: MilliSats = MilliSats::from_msat(50_000);
/// How many tokens the client asks for.
pub(crate) const TOKENS: u64 = 60;
/// The client wallet's one coin, and the channel it opens.
pub(crate) const WALLET: Amount = Amount::from_sat(250_000);
pub(crate) const CHANNEL: Amount = Amount::from_sat(50_000);

pub(crate) const TEXT: &str = "a payment channel lets a client pay a server in many small steps \
    while only two transactions ever reach the chain";

fn demo_key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).expect("non-zero demo key")
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let public = CompressedPublicKey(key.public_key(&Secp256k1::new()));
    ScriptBuf::new_p2wpkh(&public.wpubkey_hash())
}

/// The API: `GET /generate?tokens=N`, [`PROMPT`] up front and [`PER_TOKEN`] per SSE event.
pub(crate) async fn app(chain: SimulatedChain) -> Router {
    let master = Xpriv::new_master(Network::Regtest, b"paychan sse server").expect("seed");
    let prices = RoutePrices::new().route(http::Method::GET, "/generate", PROMPT);
    // The layer, the negotiation endpoints and the settlement task that collects on chain.
    let paid = Merchant::new(Network::Regtest, master, p2wpkh(&demo_key(0x22)), chain)
        .with_cpfp_key(demo_key(0x22))
        .with_prices(prices.describe())
        // Short passes for the simulated chain; a real node's blocks need the defaults only.
        .with_intervals(Duration::from_millis(100), Duration::from_secs(1))
        .start(prices)
        .await
        .expect("the simulated chain answers");
    Router::new()
        .route("/generate", get(generate))
        .layer(paid.layer().with_stream_hold(Duration::from_secs(5)))
}

/// Streams `tokens` words of [`TEXT`], one SSE event each.
async fn generate(
    meter: StreamMeter,
    uri: Uri,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let tokens = uri
        .query()
        .and_then(|q| q.strip_prefix("tokens="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10usize)
        .min(10_000);
    let words = TEXT.split(' ').cycle().take(tokens).map(str::to_owned);
    let events = futures_util::stream::iter(words).then(|word| async move {
        tokio::time::sleep(Duration::from_millis(2)).await; // the model thinking
        Ok(Event::default().data(word))
    });
    Sse::new(meter.sse(events, PER_TOKEN))
}

/// What the example did.
#[derive(Debug)]
pub(crate) struct Summary {
    pub(crate) tokens: Vec<String>,
    /// The in-band top-ups the client's layer made on the side.
    pub(crate) top_ups: usize,
    /// The receipt that ended the stream.
    pub(crate) receipt: Receipt,
    pub(crate) client_paid: Amount,
    pub(crate) server_received: Amount,
    pub(crate) client_back: Amount,
    pub(crate) settlement_fee: Amount,
}

/// Serves [`app`] on a loopback port and streams [`TOKENS`] tokens through a paying client.
pub(crate) async fn run(verbose: bool) -> Result<Summary, Error> {
    let chain = SimulatedChain::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = app(chain.clone()).await.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, server).await });

    let wallet = KeyWallet::new(demo_key(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), WALLET);
    wallet.add_coin(coin, chain.utxo(&coin).ok_or("faucet")?);
    let payer = Payer::builder(
        &format!("http://{addr}"),
        Network::Regtest,
        Xpriv::new_master(Network::Regtest, &[0x11; 32])?,
    )
    .store(MemoryClientStore::new())
    .wallet(wallet)
    .channel_value(CHANNEL)
    .policy(
        SpendingPolicy::default()
            .with_max_per_request(MilliSats::from_msat(100_000))
            .with_max_prepaid(Amount::from_sat(1_000))
            .with_max_total(Amount::from_sat(10_000)),
    )
    .build()?;

    // A hyper-util client that counts the side requests handing over top-ups.
    let top_ups = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&top_ups);
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let wire = tower::service_fn(move |request: Request<Full<Bytes>>| {
        if request.uri().path() == "/payment-channel/payment" {
            counted.fetch_add(1, Ordering::Relaxed);
        }
        http.request(request)
    });
    let mut client =
        ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(wire.clone());

    let request =
        Request::get(format!("http://{addr}/generate?tokens={TOKENS}")).body(Full::default())?;
    let response = client.ready().await?.call(request).await?;
    if response.status() != StatusCode::OK || !response.body().is_metered() {
        return Err(format!("GET /generate: {}", response.status()).into());
    }
    let mut body = response.into_body();
    let mut tokens = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        for line in std::str::from_utf8(&data)?.lines() {
            if let Some(word) = line.strip_prefix("data: ") {
                if verbose {
                    print!("{word} ");
                }
                tokens.push(word.to_owned());
            }
        }
    }
    if verbose {
        println!();
    }
    let receipt = payer.latest_receipt().ok_or("the stream ended without a receipt")?;

    let closed = payer.close_via(&ServiceTransport::<_, Full<Bytes>>::new(wire)).await?;
    chain.mine(1);
    let received =
        |vout: u32| chain.utxo(&OutPoint::new(closed.txid, vout)).map_or(Amount::ZERO, |o| o.value);
    Ok(Summary {
        tokens,
        top_ups: top_ups.load(Ordering::Relaxed),
        receipt,
        client_paid: payer.committed().await?,
        server_received: received(0),
        client_back: received(1),
        settlement_fee: closed.fee,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let s = run(true).await?;
    let metered =
        PROMPT.checked_add(PER_TOKEN.checked_mul(TOKENS).ok_or("overflow")?).ok_or("overflow")?;
    println!("\nsummary");
    println!("  tokens received      {} at {PER_TOKEN} each, {PROMPT} up front", s.tokens.len());
    println!("  in-band top-ups      {}", s.top_ups);
    println!(
        "  the stream's receipt charged {} (signed by the server's channel key)",
        s.receipt.price_msat
    );
    println!("  sats signed          {} sat", s.client_paid.to_sat());
    println!("  server received      {} sat", s.server_received.to_sat());
    println!(
        "  client got back      {} sat (settlement fee {} sat)",
        s.client_back.to_sat(),
        s.settlement_fee.to_sat()
    );
    assert_eq!(s.receipt.price_msat, metered, "the receipt states what the stream cost");
    assert_eq!(s.server_received, metered.to_sat_ceil(), "the server received what it metered");
    assert_eq!(s.client_back + s.server_received + s.settlement_fee, CHANNEL);
    Ok(())
}
