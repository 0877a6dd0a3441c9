//! An API node on a durable or shared store: run several of these against one PostgreSQL or
//! Redis, or one on a SQLite file that survives a crash.
//!
//! Run with `cargo run --all-features --example durable_server`. Configuration:
//! - `PAYCHAN_ADDR` — where to listen (default `127.0.0.1:3000`; port 0 picks one);
//! - `PAYCHAN_STORE` — `memory` (default), `sqlite:<path>`, `postgres:<url>` or `redis:<url>`;
//! - `PAYCHAN_REDIS_PREFIX` — the Redis key prefix (default `{paychan}:`).
//!
//! `GET /paid` costs 100 sat. Every node derives the same keys (a fixed demo master key), so
//! any node can serve and close any channel. The chain is simulated and per process.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, Network, ScriptBuf};
use paychan::MilliSats;
use paychan::chain::follow_tip;
use paychan::chain::sim::SimulatedChain;
use paychan::channel::Terms;
use paychan::server::{Negotiation, Paid, PaywallLayer};
use paychan::store::{ChannelStore, MemoryStore};

/// The price of `GET /paid`.
pub(crate) const PRICE: MilliSats = MilliSats::from_msat(100_000);

/// The API on `store`.
pub(crate) async fn app<St: ChannelStore>(store: St, chain: SimulatedChain) -> Router {
    let master = Xpriv::new_master(Network::Regtest, b"paychan durable server seed").expect("seed");
    let payout = CompressedPublicKey(
        SecretKey::from_slice(&[0x25; 32]).expect("key").public_key(&Secp256k1::new()),
    );
    let negotiation = Negotiation::new(
        Network::Regtest,
        Terms::default(),
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain.clone(),
    );
    let tip =
        follow_tip(chain, Duration::from_millis(250)).await.expect("the simulated chain answers");
    Router::new()
        .route("/paid", get(|paid: Paid| async move { paid.balance.to_string() }))
        .layer(PaywallLayer::new(store, PRICE, tip).with_negotiation(negotiation))
}

async fn serve(app: Router, addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // Tests wait for this line.
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr =
        std::env::var("PAYCHAN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into()).parse()?;
    let store = std::env::var("PAYCHAN_STORE").unwrap_or_else(|_| "memory".into());
    let chain = SimulatedChain::new();
    match store.split_once(':').unwrap_or((store.as_str(), "")) {
        ("memory", _) => serve(app(MemoryStore::new(), chain).await, addr).await,
        #[cfg(feature = "sqlite")]
        ("sqlite", path) => {
            serve(app(paychan::store::SqliteStore::open(path)?, chain).await, addr).await
        }
        #[cfg(feature = "postgres")]
        ("postgres", url) => {
            let store = paychan::store::PostgresStore::connect(url).await?;
            serve(app(store, chain).await, addr).await
        }
        #[cfg(feature = "redis")]
        ("redis", url) => {
            let mut store = paychan::store::RedisStore::connect(url).await?;
            if let Ok(prefix) = std::env::var("PAYCHAN_REDIS_PREFIX") {
                store = store.with_prefix(prefix);
            }
            serve(app(store, chain).await, addr).await
        }
        _ => Err(format!("unsupported PAYCHAN_STORE {store:?} (is its cargo feature on?)").into()),
    }
}
