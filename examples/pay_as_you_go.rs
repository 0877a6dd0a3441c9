//! Pay-as-you-go API: an axum service with per-route prices, behind the layer a `Merchant`
//! starts (it also serves the channel negotiation endpoints and runs the settlement task).
//!
//! Run with `cargo run --example pay_as_you_go` (binds `PAYCHAN_ADDR`, default
//! `127.0.0.1:3000`), then `curl -i localhost:3000/weather` for a 402 and
//! `curl localhost:3000/.well-known/payment-channel` for the terms. The chain is simulated
//! (in-process, consensus-checked); the server's master key is a fixed demo key.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use http::Method;
use paychan::bitcoin::{CompressedPublicKey, Network, ScriptBuf, bip32::Xpriv, secp256k1};
use paychan::chain::sim::SimulatedChain;
use paychan::server::Paid;
use paychan::server::RoutePrices;
use paychan::{Merchant, MilliSats};
use serde_json::{Value, json};

/// The API: `GET /weather` (0.5 sat), `POST /translate` (20 sat), `GET /health` (free).
pub(crate) async fn app(chain: SimulatedChain) -> Router {
    let prices = RoutePrices::new()
        .route(Method::GET, "/weather", MilliSats::from_msat(500))
        .route(Method::POST, "/translate", MilliSats::from_msat(20_000));
    let master =
        Xpriv::new_master(Network::Regtest, b"paychan demo server master seed").expect("seed");
    let payout_key = secp256k1::SecretKey::from_slice(&[0x22; 32]).expect("demo key");
    let payout = CompressedPublicKey(payout_key.public_key(&secp256k1::Secp256k1::new()));
    // The layer, the negotiation endpoints and the settlement task, on one store and key.
    let paid = Merchant::new(
        Network::Regtest,
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain,
    )
    .with_cpfp_key(payout_key)
    .with_prices(prices.describe())
    .with_intervals(Duration::from_millis(250), Duration::from_secs(5))
    .start(prices)
    .await
    .expect("the simulated chain answers");
    Router::new()
        .route("/weather", get(weather))
        .route("/translate", post(translate))
        .route("/health", get(|| async { "ok" }))
        .layer(paid.layer())
}

async fn weather(paid: Paid) -> Json<Value> {
    Json(json!({ "forecast": "sunny", "charged_msat": paid.price, "balance_msat": paid.balance }))
}

async fn translate(paid: Paid, body: String) -> Json<Value> {
    let shouted = body.to_uppercase();
    Json(json!({ "translation": shouted, "charged_msat": paid.price }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr =
        std::env::var("PAYCHAN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into()).parse()?;
    let app = app(SimulatedChain::new()).await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("pay_as_you_go listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}
