//! The browser demo's server: a paid JSON API, the channel negotiation, the settlement task,
//! an Esplora-compatible chain view, and the page with the browser client. Shared by the
//! example (`main.rs`) and the end-to-end test in Chromium (`tests/browser.rs`).

use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use paychan::bitcoin::bip32::Xpriv;
use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
use paychan::bitcoin::{CompressedPublicKey, Network, ScriptBuf};
use paychan::chain::{ChainBackend, ChainError};
use paychan::server::{RoutePrices, chain_view};
use paychan::store::MemoryStore;
use paychan::{Merchant, MilliSats, Paid, Started};
use serde_json::{Value, json};

/// What one API call costs: 5 sat.
pub(crate) const PRICE: MilliSats = MilliSats::from_msat(5_000);

/// The demo server on `chain` (regtest), serving the browser client's files from `web`
/// (the repository's `web/` folder, with `pkg/` built by `web/build.sh`), and its merchant
/// (whose settlement task runs until it is stopped).
pub(crate) async fn app<C: ChainBackend + Clone + 'static>(
    chain: C,
    web: PathBuf,
) -> Result<(Router, Started<MemoryStore, RoutePrices>), ChainError> {
    let prices = RoutePrices::new().route(http::Method::GET, "/api/fortune", PRICE);
    let master = Xpriv::new_master(Network::Regtest, b"paychan browser demo master seed")
        .expect("a 32-byte seed");
    let payout_key = SecretKey::from_slice(&[0x33; 32]).expect("a demo key");
    let payout = CompressedPublicKey(payout_key.public_key(&Secp256k1::new()));
    let paid = Merchant::new(
        Network::Regtest,
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain.clone(),
    )
    .with_cpfp_key(payout_key)
    .with_prices(prices.describe())
    .with_intervals(Duration::from_millis(500), Duration::from_secs(5))
    .start(prices)
    .await?;
    let files = Router::new()
        .route("/", get(|State(web): State<PathBuf>| file(web, "demo/index.html")))
        .route("/js/{name}", get(|State(web), Path(name): Path<String>| js(web, name)))
        .route("/pkg/{name}", get(|State(web), Path(name): Path<String>| pkg(web, name)))
        .with_state(web);
    // The layer serves the negotiation endpoints and meters `/api/fortune`; the page, the
    // client's files and the chain view are not in the price table: free (`Unlisted::Free`).
    let router = Router::new()
        .route("/api/fortune", get(fortune))
        .merge(files)
        .nest("/chain", chain_view(chain, Network::Regtest))
        // A fallback of its own, so that the layer (applied to the routes there are) also
        // sees the paths no route has: its negotiation endpoints.
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(paid.layer());
    Ok((router, paid))
}

const FORTUNES: [&str; 5] = [
    "A satoshi saved is a satoshi earned.",
    "You will pay exactly for what you use.",
    "The refund is signed before the funding: sleep well.",
    "Small channels, small worries.",
    "Every request is a receipt of trust.",
];

async fn fortune(paid: Paid) -> Json<Value> {
    let n = (paid.balance.to_msat() / PRICE.to_msat()) as usize % FORTUNES.len();
    Json(json!({
        "fortune": FORTUNES[n],
        "charged_msat": paid.price,
        "balance_msat": paid.balance,
    }))
}

async fn js(web: PathBuf, name: String) -> Response {
    match name.as_str() {
        "paychan.js" | "paychan.d.ts" => file(web, &format!("js/{name}")).await,
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn pkg(web: PathBuf, name: String) -> Response {
    match name.as_str() {
        "paychan_web.js" | "paychan_web_bg.wasm" | "paychan_web.d.ts" => {
            file(web, &format!("pkg/{name}")).await
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A file of the `web/` folder, by a name from the fixed lists above (no path from the
/// request reaches the file system).
async fn file(web: PathBuf, name: &str) -> Response {
    // Small files, read whole: a demo, not a file server.
    let kind = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        _ => "text/plain; charset=utf-8",
    };
    match std::fs::read(web.join(name)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-store")], bytes)
            .into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            format!("{name} is missing: build the browser client first (bash web/build.sh)"),
        )
            .into_response(),
    }
}
