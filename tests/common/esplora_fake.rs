//! A loopback Esplora server backed by the simulated chain, answering what electrs answers —
//! not what the backend would like. Each route follows electrs's REST handler (`src/rest.rs`
//! of Blockstream/electrs, `new-index` branch, and of mempool/electrs; see docs/PRODUCTION.md,
//! "Esplora"):
//!
//! * `GET /tx/:txid/status` is only the confirming block: `{"confirmed":false}` for a
//!   transaction in the mempool **and** for one the server never saw or that left the mempool
//!   (`Query::get_tx_status` → `TransactionStatus::from(chain.tx_confirming_block(txid))`);
//! * `GET /tx/:txid` looks in the chain, then the mempool (`Query::lookup_txn`) and answers
//!   `404 Transaction not found` for neither; its JSON carries `status`;
//! * `GET /tx/:txid/outspend/:vout` answers `{"spent":false}` for any output it does not know
//!   spent, existing or not (`Query::lookup_spend`);
//! * `POST /tx` relays Core's `sendrawtransaction` error in a 400 body: older electrs as
//!   `sendrawtransaction RPC error: {"code":-26,"message":"…"}`, newer Blockstream electrs (whose
//!   error kind carries the code) as `sendrawtransaction RPC error -26: …`; in Bitcoin Core
//!   28+'s words where a run against a real electrs saw them (docs/ESPLORA-RUN.md: a refused
//!   replacement, outputs already in the UTXO set, the mempool minimum, undecodable hex);
//! * `POST /txs/package` (Core's `submitpackage`, its JSON answer relayed with 200) exists only
//!   on newer servers; any route a server does not have answers
//!   `404 endpoint does not exist "/path"` (the router's last arm);
//! * `GET /fee-estimates` is Core's `estimatesmartfee` per target, which Core never answers
//!   below its mempool minimum;
//! * `GET /block-height/:height` is the block's hash as text, `404 Block not found` above the
//!   tip; block 0 is the genesis block of the network the fake stands for (regtest unless
//!   [`serve_with_genesis`] says otherwise; the other blocks' hashes are made up).
#![allow(dead_code, unreachable_pub)]

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{OutPoint, Transaction, Txid};
use paychan::chain::sim::SimulatedChain;
use paychan::chain::{ChainBackend, ChainError, RejectReason, TxStatus};
use serde_json::json;

/// Which electrs the fake answers as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Without `POST /txs/package`; Core's errors relayed as JSON (electrs of 2021–2024).
    Old,
    /// With `POST /txs/package`; Core's errors relayed as `RPC error <code>: <message>`.
    New,
}

#[derive(Clone)]
struct Fake {
    chain: SimulatedChain,
    flavor: Flavor,
    /// The scripts `GET /scripthash/:hash/utxo` can answer for (the tests' keys).
    scripts: Vec<bitcoin::ScriptBuf>,
    /// Block 0's hash, as text.
    genesis: String,
}

/// The genesis block hash of `network`, as Esplora writes it.
pub fn genesis_of(network: bitcoin::Network) -> String {
    bitcoin::constants::genesis_block(network).block_hash().to_string()
}

/// `GET /block-height/:height`: the block's hash, as text.
async fn block_at(State(fake): State<Fake>, Path(height): Path<u32>) -> Response {
    match height {
        0 => fake.genesis.into_response(),
        height if height <= fake.chain.tip().height => tip_hash(height).into_response(),
        _ => not_found("Block not found"),
    }
}

pub fn tip_hash(height: u32) -> String {
    format!("{height:064x}")
}

fn json(value: serde_json::Value) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

fn not_found(message: &str) -> Response {
    (StatusCode::NOT_FOUND, message.to_owned()).into_response()
}

/// Core's error for a rejection, relayed the way `flavor` relays it.
fn relayed(flavor: Flavor, method: &str, error: &ChainError) -> Response {
    let (code, message) = match error {
        ChainError::Rejected { reason, message } => super::core_error(*reason, message),
        other => return (StatusCode::BAD_REQUEST, other.to_string()).into_response(),
    };
    relayed_as(flavor, method, code, &message)
}

/// Core's error relayed as `flavor` relays it: `code` and `message` as given.
fn relayed_as(flavor: Flavor, method: &str, code: i64, message: &str) -> Response {
    let body = match flavor {
        Flavor::Old => {
            let error = json!({ "code": code, "message": message });
            format!("{method} RPC error: {error}")
        }
        Flavor::New => format!("{method} RPC error {code}: {message}"),
    };
    (StatusCode::BAD_REQUEST, body).into_response()
}

/// The fee `tx` pays, its inputs looked up on the chain (confirmed or in the mempool).
fn fee_of(chain: &SimulatedChain, tx: &Transaction) -> Option<u64> {
    let mut inputs = 0u64;
    for input in &tx.input {
        let previous = chain.get_transaction(&input.previous_output.txid)?;
        inputs += previous.output.get(input.previous_output.vout as usize)?.value.to_sat();
    }
    inputs.checked_sub(tx.output.iter().map(|o| o.value.to_sat()).sum())
}

/// A fee rate as Core prints one (`CFeeRate::ToString`): sat per 1 000 vB, in BTC.
fn btc_per_kvb(fee: u64, vsize: usize) -> String {
    let per_kvb = fee * 1_000 / vsize as u64;
    format!("{}.{:08} BTC/kvB", per_kvb / 100_000_000, per_kvb % 100_000_000)
}

/// What Bitcoin Core 28 and later (full replace-by-fee) answers for `tx` spending an output a
/// mempool transaction spends, as the real electrs run relayed it (docs/ESPLORA-RUN.md):
/// `insufficient fee, rejecting replacement <txid>; new feerate … <= old feerate …`. `None`
/// where Core would have replaced the conflict (the simulated chain never replaces).
fn replacement_refused(chain: &SimulatedChain, tx: &Transaction) -> Option<String> {
    let conflict = chain.mempool_txids().into_iter().find_map(|txid| {
        let other = chain.get_transaction(&txid)?;
        let spends =
            |i: &bitcoin::TxIn| tx.input.iter().any(|j| j.previous_output == i.previous_output);
        other.input.iter().any(spends).then_some(other)
    })?;
    let (new, old) = (fee_of(chain, tx)?, fee_of(chain, &conflict)?);
    let (new_vsize, old_vsize) = (tx.vsize(), conflict.vsize());
    // new / new_vsize <= old / old_vsize, as Core compares them.
    (u128::from(new) * old_vsize as u128 <= u128::from(old) * new_vsize as u128).then(|| {
        format!(
            "insufficient fee, rejecting replacement {}; new feerate {} <= old feerate {}",
            conflict.compute_txid(),
            btc_per_kvb(new, new_vsize),
            btc_per_kvb(old, old_vsize)
        )
    })
}

async fn broadcast(State(fake): State<Fake>, body: String) -> Response {
    let method = "sendrawtransaction";
    let Ok(tx) = deserialize_hex::<Transaction>(body.trim()) else {
        // Core's answer to hex that is no transaction, as the real electrs relayed it.
        let message = "TX decode failed. Make sure the tx has at least one input.";
        return relayed_as(fake.flavor, method, -22, message);
    };
    match fake.chain.submit(&tx) {
        Ok(txid) => txid.to_string().into_response(),
        // Core 28+'s words where the run saw them (the code is the same as `core_error`'s).
        Err(error @ ChainError::Rejected { reason: RejectReason::Conflict, .. }) => {
            match replacement_refused(&fake.chain, &tx) {
                Some(message) => relayed_as(fake.flavor, method, -26, &message),
                None => relayed(fake.flavor, method, &error),
            }
        }
        Err(ChainError::Rejected { reason: RejectReason::AlreadyConfirmed, .. }) => {
            relayed_as(fake.flavor, method, -27, "Transaction outputs already in utxo set")
        }
        // The simulated chain words a refusal below the mempool minimum as Core does
        // (`mempool min fee not met, <fee> < <minimum fee>`, in sat).
        Err(ChainError::Rejected { reason: RejectReason::FeeTooLow, message })
            if message.starts_with("mempool min fee not met") =>
        {
            relayed_as(fake.flavor, method, -26, &message)
        }
        Err(error) => relayed(fake.flavor, method, &error),
    }
}

/// `POST /txs/package`: a JSON list of hex transactions, answered with `submitpackage`'s JSON.
async fn package(State(fake): State<Fake>, uri: Uri, body: String) -> Response {
    if fake.flavor == Flavor::Old {
        return no_route(uri).await;
    }
    let Ok(hexes) = serde_json::from_str::<Vec<String>>(&body) else {
        return (StatusCode::BAD_REQUEST, "invalid JSON").into_response();
    };
    // mempool/electrs's checks before it asks Core (`src/rest.rs`, the `POST /txs/package`
    // arm), then Core's refusals of the whole call, as the real run saw them.
    let refused = |message: String| (StatusCode::BAD_REQUEST, message).into_response();
    if hexes.len() > 25 {
        return refused("Exceeded maximum of 25 transactions".into());
    }
    for (index, hex) in hexes.iter().enumerate() {
        if !(120..800_000).contains(&hex.len()) {
            return refused(format!("Invalid transaction size for item {index}"));
        }
        if hex.len() % 2 == 1 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return refused(format!("Invalid transaction hex for item {index}"));
        }
    }
    if hexes.is_empty() {
        let message = "Array must contain between 1 and 25 transactions.";
        return relayed_as(fake.flavor, "submitpackage", -8, message);
    }
    let mut txs = Vec::new();
    for hex in &hexes {
        let Ok(tx) = deserialize_hex::<Transaction>(hex) else {
            let message =
                format!("TX decode failed: {hex} Make sure the tx has at least one input.");
            return relayed_as(fake.flavor, "submitpackage", -22, &message);
        };
        txs.push(tx);
    }
    // The fake takes one parent and its child (what the backend sends).
    if txs.len() != 2 {
        return refused("RPC error".into());
    }
    let result = |tx: &Transaction, error: Option<String>| {
        let mut entry = json!({ "txid": tx.compute_txid() });
        if let Some(error) = error {
            entry["error"] = json!(error);
        }
        (tx.compute_wtxid().to_string(), entry)
    };
    let (message, results) = match fake.chain.submit_package(&txs[0], &txs[1]) {
        Ok(_) => ("success", vec![result(&txs[0], None), result(&txs[1], None)]),
        Err(error) => {
            let text = match &error {
                ChainError::Rejected { reason, message } => super::core_error(*reason, message).1,
                other => other.to_string(),
            };
            ("transaction failed", vec![result(&txs[0], Some(text)), result(&txs[1], None)])
        }
    };
    let results: serde_json::Map<String, serde_json::Value> = results.into_iter().collect();
    json(json!({ "package_msg": message, "tx-results": results, "replaced-transactions": [] }))
}

fn status_json(chain: &SimulatedChain, txid: &Txid) -> serde_json::Value {
    match chain.tx_status(txid) {
        TxStatus::Confirmed { height, .. } => json!({
            "confirmed": true, "block_height": height, "block_hash": tip_hash(height),
            "block_time": paychan::chain::sim::GENESIS_TIME + 600 * height,
        }),
        // In the mempool, never seen, or evicted: electrs cannot tell them apart here.
        _ => json!({ "confirmed": false }),
    }
}

async fn status(State(fake): State<Fake>, Path(txid): Path<Txid>) -> Response {
    json(status_json(&fake.chain, &txid))
}

async fn transaction(State(fake): State<Fake>, Path(txid): Path<Txid>) -> Response {
    let Some(tx) = fake.chain.get_transaction(&txid) else {
        return not_found("Transaction not found");
    };
    let vin: Vec<_> = tx
        .input
        .iter()
        .map(|i| {
            json!({
                "txid": i.previous_output.txid, "vout": i.previous_output.vout,
                "is_coinbase": i.previous_output.is_null(),
            })
        })
        .collect();
    let vout: Vec<_> = tx
        .output
        .iter()
        .map(|o| json!({ "scriptpubkey": o.script_pubkey.to_hex_string(), "value": o.value.to_sat() }))
        .collect();
    json(json!({
        "txid": txid, "version": tx.version.0, "locktime": tx.lock_time.to_consensus_u32(),
        "vin": vin, "vout": vout, "weight": tx.weight().to_wu(),
        "status": status_json(&fake.chain, &txid),
    }))
}

async fn outspend(State(fake): State<Fake>, Path((txid, vout)): Path<(Txid, u32)>) -> Response {
    let exists =
        fake.chain.get_transaction(&txid).is_some_and(|tx| (vout as usize) < tx.output.len());
    let spent = exists && fake.chain.utxo(&OutPoint { txid, vout }).is_none();
    json(json!({ "spent": spent }))
}

/// `GET /scripthash/:hash/utxo`: the hash is SHA-256 of the script in byte order.
async fn script_utxos(State(fake): State<Fake>, Path(hash): Path<String>) -> Response {
    use bitcoin::hashes::{Hash, sha256};
    let script = fake.scripts.iter().find(|script| {
        let digest = sha256::Hash::hash(script.as_bytes()).to_byte_array();
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>() == hash
    });
    let Some(script) = script else { return json(json!([])) };
    let found = ChainBackend::unspent_outputs_of(&fake.chain, script).await.unwrap();
    let tip = fake.chain.tip().height;
    let utxos: Vec<_> = found
        .into_iter()
        .map(|(outpoint, utxo)| {
            let status = match utxo.confirmations {
                0 => json!({ "confirmed": false }),
                depth => json!({ "confirmed": true, "block_height": tip + 1 - depth }),
            };
            json!({
                "txid": outpoint.txid, "vout": outpoint.vout,
                "value": utxo.output.value.to_sat(), "status": status,
            })
        })
        .collect();
    json(json!(utxos))
}

/// Core's `estimatesmartfee` for 1, 6 and 144 blocks (87.882, 10.5 and 1 sat/vB), each raised
/// to the mempool minimum as Core does.
async fn fee_estimates(State(fake): State<Fake>) -> Response {
    let floor = fake.chain.mempool_min_fee_rate().to_sat_per_kwu() as f64 / 250.0;
    json(json!({ "1": 87.882f64.max(floor), "6": 10.5f64.max(floor), "144": 1.0f64.max(floor) }))
}

async fn no_route(uri: Uri) -> Response {
    not_found(&format!("endpoint does not exist {:?}", uri.path()))
}

/// The fake's routes, under `/api`. `scripts` are those `GET /scripthash/:hash/utxo` knows.
pub fn app(chain: SimulatedChain, flavor: Flavor, scripts: Vec<bitcoin::ScriptBuf>) -> Router {
    app_with_genesis(chain, flavor, scripts, genesis_of(bitcoin::Network::Regtest))
}

/// The fake's routes, its block 0 `genesis` (a hash as text).
pub fn app_with_genesis(
    chain: SimulatedChain,
    flavor: Flavor,
    scripts: Vec<bitcoin::ScriptBuf>,
    genesis: String,
) -> Router {
    let fake = Fake { chain, flavor, scripts, genesis };
    Router::new()
        .route("/api/scripthash/{hash}/utxo", get(script_utxos))
        .route("/api/tx", post(broadcast))
        .route("/api/txs/package", post(package))
        .route("/api/tx/{txid}/status", get(status))
        .route("/api/tx/{txid}", get(transaction))
        .route("/api/tx/{txid}/outspend/{vout}", get(outspend))
        .route(
            "/api/blocks/tip/hash",
            get(|State(fake): State<Fake>| async move { tip_hash(fake.chain.tip().height) }),
        )
        .route(
            "/api/block/{hash}",
            get(|State(fake): State<Fake>, Path(hash): Path<String>| async move {
                let tip = fake.chain.tip();
                assert_eq!(hash, tip_hash(tip.height));
                json(
                    json!({ "id": hash, "height": tip.height, "mediantime": tip.median_time_past }),
                )
            }),
        )
        .route("/api/fee-estimates", get(fee_estimates))
        .route("/api/block-height/{height}", get(block_at))
        .fallback(no_route)
        .with_state(fake)
}

/// Serves the fake on a loopback port: its API URL (`http://127.0.0.1:<port>/api`).
pub async fn serve(chain: SimulatedChain, flavor: Flavor) -> String {
    serve_with_genesis(chain, flavor, genesis_of(bitcoin::Network::Regtest)).await
}

/// Serves the fake as a server whose block 0 is `genesis` (a hash as text): another
/// network's chain, or none known.
pub async fn serve_with_genesis(chain: SimulatedChain, flavor: Flavor, genesis: String) -> String {
    let scripts = (1..=16).map(|n| super::p2wpkh(&super::secret(n))).collect();
    let app = app_with_genesis(chain, flavor, scripts, genesis);
    format!("http://{}/api", super::http::serve(app).await)
}
