//! A paid audio stream over a WebSocket, priced per second (the 2014 project's "streaming
//! music" case): the handshake is charged up front by `PaywallLayer`, then every second of
//! audio is debited before it is sent (`StreamMeter::charge`). When the balance runs out the
//! server sends the problem document as a text frame and holds; the client answers it with a
//! top-up (`PaidStream::top_up`, a side request to `POST /payment-channel/payment`) and the
//! music resumes. The last text frame is the signed receipt of the whole stream; the channel is
//! then closed fairly and the settlement checked on the simulated chain.
//!
//! The same recording can be downloaded as a plain HTTP byte stream priced per kibibyte,
//! `GET /track.raw?seconds=N` (`StreamMeter::bytes`): a client behind `PaymentLayer` counts
//! the bytes and tops up ahead of the server's need.
//!
//! Run with `cargo run --example audio_stream`. The keys are fixed demo keys.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, Network, OutPoint, ScriptBuf};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use paychan::chain::sim::SimulatedChain;
use paychan::client::{KeyWallet, MemoryClientStore, Payer, ServiceTransport, SpendingPolicy};
use paychan::server::{RoutePrices, StreamMeter};
use paychan::wire::RECEIPT_EVENT;
use paychan::wire::{PAYMENT_CHANNEL, Problem, Receipt};
use paychan::{Merchant, MilliSats};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The price of tuning in (the handshake).
pub(crate) const TUNE_IN: MilliSats = MilliSats::from_msat(1_000);
/// The price of each second of audio.
pub(crate) const PER_SECOND: MilliSats = MilliSats::from_msat(20_000);
/// The price of each KiB downloaded.
pub(crate) const PER_KIB: MilliSats = MilliSats::from_msat(2_000);
/// How many seconds the client listens to.
pub(crate) const SECONDS: u64 = 40;
/// The client wallet's one coin, and the channel it opens.
pub(crate) const WALLET: Amount = Amount::from_sat(250_000);
pub(crate) const CHANNEL: Amount = Amount::from_sat(50_000);

fn demo_key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).expect("non-zero demo key")
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    let public = CompressedPublicKey(key.public_key(&Secp256k1::new()));
    ScriptBuf::new_p2wpkh(&public.wpubkey_hash())
}

/// The API: `GET /listen?seconds=N`, a WebSocket: [`TUNE_IN`] up front, [`PER_SECOND`] for
/// each binary frame of one second of (synthetic) audio; `GET /track.raw?seconds=N`, the same
/// audio as a download, [`TUNE_IN`] up front and [`PER_KIB`] per KiB.
pub(crate) async fn app(chain: SimulatedChain) -> Router {
    let master = Xpriv::new_master(Network::Regtest, b"paychan radio server").expect("seed");
    let prices = RoutePrices::new().route(Method::GET, "/listen", TUNE_IN).route(
        Method::GET,
        "/track.raw",
        TUNE_IN,
    );
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
        .route("/listen", get(listen))
        .route("/track.raw", get(download))
        .layer(paid.layer().with_stream_hold(Duration::from_secs(5)))
}

/// The `seconds=N` of a query (10 by default, an hour at most).
fn seconds(uri: &Uri) -> u64 {
    let seconds = uri.query().and_then(|q| q.strip_prefix("seconds=")).and_then(|n| n.parse().ok());
    seconds.unwrap_or(10).min(3_600)
}

async fn listen(upgrade: WebSocketUpgrade, meter: StreamMeter, uri: Uri) -> Response {
    let seconds = seconds(&uri);
    upgrade.on_upgrade(move |socket| play(socket, meter, seconds))
}

/// The recording as a download, each second's bytes paid before they are sent.
async fn download(meter: StreamMeter, uri: Uri) -> axum::body::Body {
    let chunks = (0..seconds(&uri)).map(|_| Ok::<_, std::convert::Infallible>(second_of_audio()));
    axum::body::Body::from_stream(meter.bytes(futures_util::stream::iter(chunks), PER_KIB))
}

/// One second of 8 kHz 8-bit audio: a 440 Hz square wave.
fn second_of_audio() -> Bytes {
    (0..8_000u32).map(|i| if (i * 440 / 4_000) % 2 == 0 { 0x60 } else { 0xa0 }).collect()
}

/// Sends `seconds` of audio, each second paid before it is sent.
async fn play(mut socket: WebSocket, meter: StreamMeter, seconds: u64) {
    for _ in 0..seconds {
        let paid = match meter.charge(PER_SECOND).await {
            Ok(_) => true,
            // Out of balance: tell the client (the problem document says how much to pay) and
            // wait for its top-up.
            Err(exhausted) if exhausted.can_top_up() => {
                if socket.send(Message::Text(exhausted.to_json().into())).await.is_err() {
                    return;
                }
                meter.wait_and_charge(PER_SECOND).await.is_ok()
            }
            Err(_) => false,
        };
        if !paid || socket.send(Message::Binary(second_of_audio())).await.is_err() {
            break;
        }
    }
    if let Some(receipt) = meter.receipt().await {
        let frame = serde_json::json!({ "type": RECEIPT_EVENT, "receipt": receipt.encode() });
        let _ = socket.send(Message::Text(frame.to_string().into())).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// What the example did.
#[derive(Debug)]
pub(crate) struct Summary {
    pub(crate) seconds: u64,
    pub(crate) top_ups: usize,
    pub(crate) receipt: Receipt,
    pub(crate) server_received: Amount,
    pub(crate) client_back: Amount,
    pub(crate) settlement_fee: Amount,
}

/// Serves [`app`] on a loopback port and listens for [`SECONDS`] seconds.
pub(crate) async fn run(verbose: bool) -> Result<Summary, Error> {
    let chain = SimulatedChain::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = app(chain.clone()).await.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, server).await });

    let wallet = KeyWallet::new(demo_key(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), WALLET);
    wallet.add_coin(coin, chain.utxo(&coin).ok_or("faucet")?);
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let payer = Payer::builder(
        &format!("http://{addr}"),
        Network::Regtest,
        Xpriv::new_master(Network::Regtest, &[0x11; 32])?,
    )
    .store(MemoryClientStore::new())
    .wallet(wallet)
    .channel_value(CHANNEL)
    .transport(ServiceTransport::<_, Full<Bytes>>::new(http))
    .policy(
        SpendingPolicy::default()
            .with_max_per_request(MilliSats::from_msat(50_000))
            .with_max_prepaid(Amount::from_sat(200))
            .with_max_total(Amount::from_sat(5_000)),
    )
    .build()?;
    payer.open().await?;

    let path = format!("/listen?seconds={SECONDS}");
    let stream = payer.stream(&Method::GET, &path).await?;
    let mut handshake = format!("ws://{addr}{path}").into_client_request()?;
    handshake.headers_mut().insert(PAYMENT_CHANNEL, stream.header().clone());
    let (mut socket, _) = tokio_tungstenite::connect_async(handshake).await?;
    let (mut seconds, mut top_ups, mut receipt) = (0, 0, None);
    while let Some(message) = socket.next().await {
        match message? {
            tungstenite::Message::Binary(_audio) => {
                // What the client counts bounds what it tops up.
                stream.received(PER_SECOND);
                seconds += 1;
            }
            tungstenite::Message::Text(text) => {
                if let Ok(problem) = serde_json::from_str::<Problem>(&text) {
                    let answer = stream.top_up(&problem).await?;
                    top_ups += 1;
                    if verbose {
                        println!("  second {seconds}: topped up, {} left", answer.balance_msat);
                    }
                } else {
                    let frame: serde_json::Value = serde_json::from_str(&text)?;
                    let value = frame["receipt"].as_str().ok_or("an unknown text frame")?;
                    receipt = Some(stream.receipt(value.as_bytes())?);
                }
            }
            tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    let _ = socket.close(None).await;
    drop(stream);
    let receipt = receipt.ok_or("the stream ended without a receipt")?;

    let closed = payer.close().await?;
    chain.mine(1);
    let received =
        |vout: u32| chain.utxo(&OutPoint::new(closed.txid, vout)).map_or(Amount::ZERO, |o| o.value);
    Ok(Summary {
        seconds,
        top_ups,
        receipt,
        server_received: received(0),
        client_back: received(1),
        settlement_fee: closed.fee,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let s = run(true).await?;
    let metered = TUNE_IN
        .checked_add(PER_SECOND.checked_mul(SECONDS).ok_or("overflow")?)
        .ok_or("overflow")?;
    println!("\nsummary");
    println!("  seconds heard        {} at {PER_SECOND} each, {TUNE_IN} to tune in", s.seconds);
    println!("  top-ups              {}", s.top_ups);
    println!("  the stream's receipt charged {}", s.receipt.price_msat);
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
