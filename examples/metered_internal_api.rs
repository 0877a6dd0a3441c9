//! Metered billing for an internal API: each team opens one channel and pays per call, priced
//! by request size; `GET /usage` reports what every team has paid and used.
//!
//! Run with `cargo run --example metered_internal_api` (binds `PAYCHAN_ADDR`, default
//! `127.0.0.1:3000`). The chain is simulated.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, Network, ScriptBuf};
use http::Request;
use http::header::CONTENT_LENGTH;
use paychan::chain::sim::SimulatedChain;
use paychan::channel::ChannelState;
use paychan::server::Paid;
use paychan::store::{ChannelStore, MemoryStore};
use paychan::{Merchant, MilliSats};
use serde_json::{Value, json};

/// 2 sat per call plus 1 msat per byte of request body; `/usage` is free.
pub(crate) fn price<B>(request: &Request<B>) -> Option<MilliSats> {
    if request.uri().path() == "/usage" {
        return None;
    }
    let bytes = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    MilliSats::from_msat(2_000).checked_add(MilliSats::from_msat(bytes))
}

/// The internal API, its store (for the usage report) and its negotiation endpoints.
pub(crate) async fn app(chain: SimulatedChain) -> Router {
    let store = MemoryStore::new();
    let master = Xpriv::new_master(Network::Regtest, b"paychan internal api seed").expect("seed");
    let payout = CompressedPublicKey(
        SecretKey::from_slice(&[0x24; 32]).expect("key").public_key(&Secp256k1::new()),
    );
    // The layer, the negotiation endpoints and the settlement task that collects on chain,
    // on the store the usage report reads.
    let paid = Merchant::new(
        Network::Regtest,
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain,
    )
    .with_store(store.clone())
    .with_prices(json!({ "per_call_msat": 2_000, "per_body_byte_msat": 1 }))
    // Short passes for the simulated chain; a real node's blocks need the defaults only.
    .with_intervals(Duration::from_millis(250), Duration::from_secs(1))
    .start(price::<axum::body::Body>)
    .await
    .expect("the simulated chain answers");
    Router::new()
        .route("/reports", post(report))
        .route("/usage", get(usage))
        .with_state(store)
        .layer(paid.layer())
}

async fn report(paid: Paid, body: String) -> Json<Value> {
    Json(
        json!({ "team_channel": paid.channel, "rows": body.lines().count(), "charged_msat": paid.price }),
    )
}

/// Usage per team (channel): what it paid, used and has left.
async fn usage(State(store): State<MemoryStore>) -> Json<Value> {
    let channels = store.list(ChannelState::Open).await.unwrap_or_default();
    let teams: Vec<Value> = channels
        .iter()
        .map(|record| {
            json!({
                "channel": record.id(),
                "paid_msat": record.paid(),
                "spent_msat": record.spent,
                "balance_msat": record.balance(),
            })
        })
        .collect();
    Json(json!({ "teams": teams }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr =
        std::env::var("PAYCHAN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into()).parse()?;
    let app = app(SimulatedChain::new()).await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("metered_internal_api listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}
