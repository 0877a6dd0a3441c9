//! `BitcoindRpc` against a loopback server that answers like Bitcoin Core's JSON-RPC
//! (HTTP basic auth, JSON-RPC 1.0 envelopes, HTTP 500 with `error{code,message}`), backed by
//! the simulated chain so that every verdict — and Core's error code and reject reason for it —
//! is realistic.
#![cfg(feature = "bitcoind")]

mod common;

use std::net::SocketAddr;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Amount, Denomination, FeeRate, OutPoint, Transaction};
use common::{core_error, public, secret, spend};
use paychan::chain::bitcoind::{Auth, BitcoindRpc};
use paychan::chain::sim::SimulatedChain;
use paychan::chain::{ChainBackend, ChainError, RejectReason, TxStatus};
use serde_json::{Value, json};

fn rpc_error(id: &Value, code: i64, message: &str) -> Response {
    let body = json!({ "result": null, "error": { "code": code, "message": message }, "id": id });
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

fn btc(amount: Amount) -> Value {
    serde_json::from_str(&amount.display_in(Denomination::Bitcoin).to_string()).unwrap()
}

async fn core(
    State(chain): State<SimulatedChain>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    // "user:pass" in basic auth.
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Basic dXNlcjpwYXNz") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let id = req["id"].clone();
    let params = &req["params"];
    let ok =
        |result: Value| Json(json!({ "result": result, "error": null, "id": id })).into_response();
    match req["method"].as_str().unwrap_or_default() {
        "getblockchaininfo" => {
            let tip = chain.tip();
            ok(json!({ "chain": "regtest", "blocks": tip.height, "headers": tip.height, "mediantime": tip.median_time_past }))
        }
        "sendrawtransaction" => {
            let Ok(tx) = deserialize_hex::<Transaction>(params[0].as_str().unwrap_or_default()) else {
                return rpc_error(&id, -22, "TX decode failed");
            };
            match chain.submit(&tx) {
                Ok(txid) => ok(json!(txid)),
                Err(ChainError::Rejected { reason, message }) => {
                    let (code, message) = core_error(reason, &message);
                    rpc_error(&id, code, &message)
                }
                Err(e) => rpc_error(&id, -1, &e.to_string()),
            }
        }
        "getrawtransaction" => {
            let txid = params[0].as_str().unwrap_or_default().parse().unwrap();
            match (chain.tx_status(&txid), chain.get_transaction(&txid)) {
                (TxStatus::Confirmed { confirmations, .. }, Some(_)) => ok(json!({ "txid": txid, "confirmations": confirmations })),
                (TxStatus::InMempool, Some(_)) => ok(json!({ "txid": txid })),
                _ => rpc_error(&id, -5, "No such mempool or blockchain transaction. Use gettransaction for wallet transactions."),
            }
        }
        "estimatesmartfee" => match params[0].as_u64() {
            Some(1) => ok(json!({ "errors": ["Insufficient data or no feerate found"], "blocks": 2 })),
            Some(blocks) => ok(json!({ "feerate": 0.00002345, "blocks": blocks })),
            None => rpc_error(&id, -1, "estimatesmartfee conf_target"),
        },
        "gettxout" => {
            let outpoint = OutPoint { txid: params[0].as_str().unwrap().parse().unwrap(), vout: params[1].as_u64().unwrap() as u32 };
            match ChainBackend::unspent(&chain, &outpoint).await.unwrap() {
                Some(utxo) => ok(json!({ "value": btc(utxo.output.value), "confirmations": utxo.confirmations, "scriptPubKey": { "hex": utxo.output.script_pubkey.to_hex_string() } })),
                None => ok(Value::Null),
            }
        }
        _ => (StatusCode::NOT_FOUND, Json(json!({ "result": null, "error": { "code": -32601, "message": "Method not found" }, "id": id }))).into_response(),
    }
}

async fn fake_core(chain: SimulatedChain) -> SocketAddr {
    let app = axum::Router::new().route("/", post(core)).with_state(chain);
    common::http::serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_and_reads_state_like_bitcoin_core() {
    let chain = SimulatedChain::new();
    let addr = fake_core(chain.clone()).await;
    let rpc =
        BitcoindRpc::new(&format!("http://{addr}"), Auth::UserPass("user".into(), "pass".into()))
            .unwrap();

    assert_eq!(rpc.tip().await.unwrap(), chain.tip());
    let coin = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    assert_eq!(rpc.unspent_output(&coin.0).await.unwrap(), Some(coin.1.clone()));

    let tx = spend(coin.clone(), 99_000, 0);
    let txid = rpc.broadcast(&tx).await.unwrap();
    assert_eq!(rpc.broadcast(&tx).await.unwrap(), txid, "already in the mempool is success");
    assert_eq!(rpc.tx_status(&txid).await.unwrap(), TxStatus::InMempool);
    assert_eq!(rpc.unspent_output(&coin.0).await.unwrap(), None, "spent in the mempool");
    let reject = |e: ChainError| e.reject_reason().expect("a typed rejection");
    assert_eq!(
        reject(rpc.broadcast(&spend(coin.clone(), 98_000, 0)).await.unwrap_err()),
        RejectReason::Conflict
    );
    chain.mine(2);
    assert_eq!(
        rpc.tx_status(&txid).await.unwrap(),
        TxStatus::Confirmed { height: chain.tip().height - 1, confirmations: 2 }
    );
    assert_eq!(reject(rpc.broadcast(&tx).await.unwrap_err()), RejectReason::AlreadyConfirmed);
    assert_eq!(
        reject(rpc.broadcast(&spend(coin, 98_000, 0)).await.unwrap_err()),
        RejectReason::MissingInputs
    );

    let fresh = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    let locked = spend(fresh.clone(), 99_000, chain.tip().height + 5);
    assert_eq!(reject(rpc.broadcast(&locked).await.unwrap_err()), RejectReason::NonFinal);
    assert_eq!(
        reject(rpc.broadcast(&spend(fresh.clone(), 100_000, 0)).await.unwrap_err()),
        RejectReason::FeeTooLow
    );
    assert_eq!(
        reject(rpc.broadcast(&spend(fresh, 100_001, 0)).await.unwrap_err()),
        RejectReason::ValueCreation
    );
    let unknown = bitcoin::Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros());
    assert_eq!(rpc.tx_status(&unknown).await.unwrap(), TxStatus::Unknown);

    // 0.00002345 BTC/kvB = 2 345 sat/kvB = 586.25 sat/kwu, rounded up.
    assert_eq!(rpc.estimate_fee_rate(6).await.unwrap(), FeeRate::from_sat_per_kwu(587));
    assert!(matches!(rpc.estimate_fee_rate(1).await, Err(ChainError::Unavailable { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_unreachable_nodes() {
    let chain = SimulatedChain::new();
    let addr = fake_core(chain.clone()).await;
    let wrong =
        BitcoindRpc::new(&format!("http://{addr}"), Auth::UserPass("user".into(), "nope".into()))
            .unwrap();
    assert!(matches!(wrong.tip().await, Err(ChainError::Unavailable { .. })));

    let cookie = std::env::temp_dir().join(format!("paychan-cookie-{}", std::process::id()));
    std::fs::write(&cookie, "user:pass\n").unwrap();
    let rpc = BitcoindRpc::new(&format!("http://{addr}"), Auth::CookieFile(cookie)).unwrap();
    assert_eq!(rpc.tip().await.unwrap(), chain.tip());

    let closed =
        BitcoindRpc::new("http://127.0.0.1:9", Auth::UserPass("u".into(), "p".into())).unwrap();
    assert!(matches!(closed.tip().await, Err(ChainError::Unavailable { .. })));
}
