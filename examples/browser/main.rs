//! The browser client's demo: a page that pays for a JSON API over a payment channel.
//!
//! ```sh
//! bash web/build.sh                    # the wasm and its bindings (once)
//! cargo run --example browser          # then open http://127.0.0.1:3000
//! ```
//!
//! The page (`web/demo/index.html`) connects with `paychan.connect`, shows a deposit address,
//! and on a simulated chain (the default, which mines a block every 10 seconds) a "faucet"
//! button deposits 200 000 sat and mines a block. Each "fortune" is a `client.fetch` of `GET /api/fortune`, at 5 sat: the first one
//! opens the channel, later ones top up on 402. The page shows the channel, the balance,
//! each payment, a refund export and a fair close.
//!
//! With `--regtest`, it runs on a Bitcoin Core regtest node instead:
//! `PAYCHAN_BITCOIND_URL` (default `http://127.0.0.1:18443`) and the node's cookie file
//! `PAYCHAN_BITCOIND_COOKIE` (default `~/.bitcoin/regtest/.cookie`); send coins to the page's
//! deposit address with `bitcoin-cli -regtest sendtoaddress <address> 0.002` and mine a block.
//!
//! `PAYCHAN_ADDR` sets the address (default `127.0.0.1:3000`). The keys are fixed demo keys:
//! never use them for real coins.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use paychan::bitcoin::{Address, Amount, Network};
use paychan::chain::bitcoind::{Auth, BitcoindRpc};
use paychan::chain::sim::SimulatedChain;

mod app;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr =
        std::env::var("PAYCHAN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into()).parse()?;
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    if !web.join("pkg/paychan_web_bg.wasm").exists() {
        eprintln!("note: web/pkg is missing; build the browser client first: bash web/build.sh");
    }
    let app = if std::env::args().any(|arg| arg == "--regtest") {
        let url = std::env::var("PAYCHAN_BITCOIND_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:18443".into());
        let cookie =
            std::env::var("PAYCHAN_BITCOIND_COOKIE").map(PathBuf::from).unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".bitcoin/regtest/.cookie")
            });
        app::app(BitcoindRpc::new(&url, Auth::CookieFile(cookie))?, web).await?.0
    } else {
        let chain = SimulatedChain::new();
        // A block every 10 seconds, as a real chain would (fundings confirm, closes settle).
        let miner = chain.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                miner.mine(1);
            }
        });
        let faucet =
            Router::new().route("/faucet/{address}", post(faucet)).with_state(chain.clone());
        app::app(chain, web).await?.0.merge(faucet)
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("browser demo: open http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
    Ok(())
}

/// The simulated chain's faucet: 200 000 sat to `address`, then a block.
async fn faucet(
    State(chain): State<SimulatedChain>,
    Path(address): Path<String>,
) -> Result<String, (StatusCode, String)> {
    let bad = |e: String| (StatusCode::BAD_REQUEST, e);
    let address = address
        .parse::<Address<_>>()
        .map_err(|e| bad(e.to_string()))?
        .require_network(Network::Regtest)
        .map_err(|e| bad(e.to_string()))?;
    let outpoint = chain.faucet(address.script_pubkey(), Amount::from_sat(200_000));
    chain.mine(1);
    Ok(outpoint.to_string())
}
