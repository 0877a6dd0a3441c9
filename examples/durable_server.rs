//! An API node on a durable or shared store: run several of these against one PostgreSQL or
//! Redis, or one on a SQLite file that survives a crash.
//!
//! Run with `cargo run --all-features --example durable_server`. Configuration:
//! - `PAYCHAN_ADDR` — where to listen (default `127.0.0.1:3000`; port 0 picks one);
//! - `PAYCHAN_STORE` — `memory` (default), `sqlite:<path>`, `postgres:<url>` or `redis:<url>`;
//! - `PAYCHAN_REDIS_PREFIX` — the Redis key prefix (default `{paychan}:`);
//! - `PAYCHAN_LEASES` — set (to anything) to serve debits from leases ([`Leased`]), with
//!   `PAYCHAN_LEASE_MAX_MSAT`, `PAYCHAN_LEASE_IDLE_MS` and `PAYCHAN_LEASE_TTL_SECS` if set;
//! - `PAYCHAN_NO_SETTLEMENT` — set only by `tests/durability.rs` (its channels are on no
//!   chain): no settlement task.
//!
//! Every node runs the settlement task on the shared store (a `Merchant`): the store's
//! atomic state changes let several tasks work side by side, and a restarted node closes what
//! is left to close.
//! SIGTERM or Ctrl-C stops it gracefully: requests in flight finish, then its leases are given
//! back.
//! `GET /paid` costs 100 sat. Every node derives the same keys (a fixed demo master key), so
//! any node can serve and close any channel. The chain is simulated and per process; real nodes
//! share one Bitcoin Core (or Esplora) backend.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, Network, ScriptBuf};
use paychan::chain::sim::SimulatedChain;
use paychan::server::Paid;
use paychan::store::{ChannelStore, LeaseConfig, Leased, MemoryStore};
use paychan::{Merchant, MilliSats};

/// The price of `GET /paid`.
pub(crate) const PRICE: MilliSats = MilliSats::from_msat(100_000);

/// The API on `store`.
pub(crate) async fn app<St: ChannelStore + Clone>(store: St, chain: SimulatedChain) -> Router {
    let master = Xpriv::new_master(Network::Regtest, b"paychan durable server seed").expect("seed");
    let payout = CompressedPublicKey(
        SecretKey::from_slice(&[0x25; 32]).expect("key").public_key(&Secp256k1::new()),
    );
    // The layer, the negotiation endpoints and the settlement task, all on `store`: a
    // restarted server picks up the channels it must still close.
    let paid = Merchant::new(
        Network::Regtest,
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain,
    )
    .with_store(store)
    // Short passes for the simulated chain; a real node's blocks need the defaults only.
    .with_intervals(Duration::from_millis(250), Duration::from_secs(1))
    // Off only for tests/durability.rs, which writes channels straight into the store, on no
    // chain: this node's simulated chain would find no funding and suspend them.
    .with_settlement(std::env::var_os("PAYCHAN_NO_SETTLEMENT").is_none())
    .start(PRICE)
    .await
    .expect("the simulated chain answers");
    Router::new()
        .route("/paid", get(|paid: Paid| async move { paid.balance.to_string() }))
        .layer(paid.layer())
}

/// Serves the API on `store` (through leases when `PAYCHAN_LEASES` is set) until SIGTERM or
/// Ctrl-C.
async fn serve<St: ChannelStore + Clone>(
    store: St,
    chain: SimulatedChain,
    addr: SocketAddr,
) -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PAYCHAN_LEASES").is_none() {
        return listen(app(store, chain).await, addr).await;
    }
    let number = |name: &str| std::env::var(name).ok().and_then(|value| value.parse::<u64>().ok());
    let mut config = LeaseConfig::default();
    if let Some(msat) = number("PAYCHAN_LEASE_MAX_MSAT") {
        config = config.with_max_lease(MilliSats::from_msat(msat));
    }
    if let Some(ms) = number("PAYCHAN_LEASE_IDLE_MS") {
        config = config.with_idle(Duration::from_millis(ms));
    }
    if let Some(secs) = number("PAYCHAN_LEASE_TTL_SECS") {
        config = config.with_ttl(Duration::from_secs(secs));
    }
    let leased = Leased::with_config(store, config);
    let served = listen(app(leased.clone(), chain).await, addr).await;
    leased.return_all().await;
    served
}

async fn listen(app: Router, addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // Tests wait for this line.
    println!("listening on http://{}", listener.local_addr()?);
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr =
        std::env::var("PAYCHAN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into()).parse()?;
    let store = std::env::var("PAYCHAN_STORE").unwrap_or_else(|_| "memory".into());
    let chain = SimulatedChain::new();
    match store.split_once(':').unwrap_or((store.as_str(), "")) {
        ("memory", _) => serve(MemoryStore::new(), chain, addr).await,
        #[cfg(feature = "sqlite")]
        ("sqlite", path) => serve(paychan::store::SqliteStore::open(path)?, chain, addr).await,
        #[cfg(feature = "postgres")]
        ("postgres", url) => {
            let store = paychan::store::PostgresStore::connect(url).await?;
            serve(store, chain, addr).await
        }
        #[cfg(feature = "redis")]
        ("redis", url) => {
            let mut store = paychan::store::RedisStore::connect(url).await?;
            if let Ok(prefix) = std::env::var("PAYCHAN_REDIS_PREFIX") {
                store = store.with_prefix(prefix);
            }
            serve(store, chain, addr).await
        }
        _ => Err(format!("unsupported PAYCHAN_STORE {store:?} (is its cargo feature on?)").into()),
    }
}
