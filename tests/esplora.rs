//! `Esplora` against a loopback server that answers like the Esplora REST API (plain-text txids
//! and hashes, JSON documents, Core's `sendrawtransaction` error relayed in a 400 body),
//! backed by the simulated chain.
#![cfg(feature = "esplora")]

mod common;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Amount, FeeRate, OutPoint, Transaction, Txid};
use common::{core_error, p2wpkh, public, secret, spend};
use paychan::chain::esplora::Esplora;
use paychan::chain::sim::SimulatedChain;
use paychan::chain::{ChainBackend, ChainError, RejectReason, TxStatus};
use serde_json::json;

fn tip_hash(height: u32) -> String {
    format!("{height:064x}")
}

async fn broadcast(State(chain): State<SimulatedChain>, body: String) -> Response {
    let Ok(tx) = deserialize_hex::<Transaction>(body.trim()) else {
        return (
            StatusCode::BAD_REQUEST,
            "sendrawtransaction RPC error: {\"code\":-22,\"message\":\"TX decode failed\"}",
        )
            .into_response();
    };
    match chain.submit(&tx) {
        Ok(txid) => txid.to_string().into_response(),
        Err(ChainError::Rejected { reason, message }) => {
            let (code, message) = core_error(reason, &message);
            let error = json!({ "code": code, "message": message });
            (StatusCode::BAD_REQUEST, format!("sendrawtransaction RPC error: {error}"))
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn status(State(chain): State<SimulatedChain>, Path(txid): Path<Txid>) -> Response {
    match chain.tx_status(&txid) {
        TxStatus::Confirmed { height, .. } => Json(
            json!({ "confirmed": true, "block_height": height, "block_hash": tip_hash(height) }),
        )
        .into_response(),
        TxStatus::InMempool => Json(json!({ "confirmed": false })).into_response(),
        _ => (StatusCode::NOT_FOUND, "Transaction not found").into_response(),
    }
}

async fn transaction(State(chain): State<SimulatedChain>, Path(txid): Path<Txid>) -> Response {
    match chain.get_transaction(&txid) {
        Some(tx) => {
            let vout: Vec<_> = tx.output.iter().map(|o| json!({ "scriptpubkey": o.script_pubkey.to_hex_string(), "value": o.value.to_sat() })).collect();
            Json(json!({ "txid": txid, "vout": vout })).into_response()
        }
        None => (StatusCode::NOT_FOUND, "Transaction not found").into_response(),
    }
}

async fn outspend(
    State(chain): State<SimulatedChain>,
    Path((txid, vout)): Path<(Txid, u32)>,
) -> Response {
    Json(json!({ "spent": chain.utxo(&OutPoint { txid, vout }).is_none() })).into_response()
}

/// `GET /scripthash/:hash/utxo`: the hash is SHA-256 of the script in byte order.
async fn script_utxos(State(chain): State<SimulatedChain>, Path(hash): Path<String>) -> Response {
    use bitcoin::hashes::{Hash, sha256};
    // The scripts the tests use: P2WPKH of the first test keys.
    let script = (1..=16).map(|n| p2wpkh(&secret(n))).find(|script| {
        let digest = sha256::Hash::hash(script.as_bytes()).to_byte_array();
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>() == hash
    });
    let Some(script) = script else { return Json(json!([])).into_response() };
    let found = ChainBackend::unspent_outputs_of(&chain, &script).await.unwrap();
    let tip = chain.tip().height;
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
    Json(json!(utxos)).into_response()
}

async fn fake_esplora(chain: SimulatedChain) -> String {
    format!("http://{}/api", common::http::serve(fake_app(chain)).await)
}

/// The fake Esplora's routes, under `/api`.
fn fake_app(chain: SimulatedChain) -> Router {
    Router::new()
        .route("/api/scripthash/{hash}/utxo", get(script_utxos))
        .route("/api/tx", post(broadcast))
        .route("/api/tx/{txid}/status", get(status))
        .route("/api/tx/{txid}", get(transaction))
        .route("/api/tx/{txid}/outspend/{vout}", get(outspend))
        .route(
            "/api/blocks/tip/hash",
            get(|State(chain): State<SimulatedChain>| async move { tip_hash(chain.tip().height) }),
        )
        .route(
            "/api/block/{hash}",
            get(|State(chain): State<SimulatedChain>, Path(hash): Path<String>| async move {
                let tip = chain.tip();
                assert_eq!(hash, tip_hash(tip.height));
                Json(
                    json!({ "id": hash, "height": tip.height, "mediantime": tip.median_time_past }),
                )
            }),
        )
        .route(
            "/api/fee-estimates",
            get(|| async { Json(json!({ "1": 87.882, "6": 10.5, "144": 1.0 })) }),
        )
        .with_state(chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_and_reads_state_like_esplora() {
    let chain = SimulatedChain::new();
    let esplora = Esplora::new(&fake_esplora(chain.clone()).await).unwrap();
    assert_eq!(esplora.tip().await.unwrap(), chain.tip());

    let coin = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    assert_eq!(esplora.unspent_output(&coin.0).await.unwrap(), Some(coin.1.clone()));
    let tx = spend(coin.clone(), 99_000, 0);
    let txid = esplora.broadcast(&tx).await.unwrap();
    assert_eq!(esplora.tx_status(&txid).await.unwrap(), TxStatus::InMempool);
    assert_eq!(esplora.unspent_output(&coin.0).await.unwrap(), None);
    let reject = |e: ChainError| e.reject_reason().expect("a typed rejection");
    assert_eq!(
        reject(esplora.broadcast(&spend(coin.clone(), 98_000, 0)).await.unwrap_err()),
        RejectReason::Conflict
    );
    chain.mine(3);
    assert_eq!(esplora.tip().await.unwrap(), chain.tip());
    assert_eq!(
        esplora.tx_status(&txid).await.unwrap(),
        TxStatus::Confirmed { height: chain.tip().height - 2, confirmations: 3 }
    );
    assert_eq!(
        reject(esplora.broadcast(&spend(coin, 98_000, 0)).await.unwrap_err()),
        RejectReason::MissingInputs
    );
    let fresh = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    let locked = spend(fresh.clone(), 99_000, chain.tip().height + 5);
    assert_eq!(reject(esplora.broadcast(&locked).await.unwrap_err()), RejectReason::NonFinal);
    assert_eq!(
        reject(esplora.broadcast(&spend(fresh, 100_000, 0)).await.unwrap_err()),
        RejectReason::FeeTooLow
    );
    let unknown = Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros());
    assert_eq!(esplora.tx_status(&unknown).await.unwrap(), TxStatus::Unknown);
    assert_eq!(esplora.unspent_output(&OutPoint { txid: unknown, vout: 0 }).await.unwrap(), None);

    // The outputs of a script, mempool included, with their depth.
    // Here: the first spend's output (3 confirmations), `fresh` (1), and a spend in the
    // mempool (0), whose input is no longer unspent.
    let pending = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    esplora.broadcast(&spend(pending.clone(), 99_000, 0)).await.unwrap();
    let script = p2wpkh(&secret(3));
    let found = esplora.unspent_outputs_of(&script).await.unwrap();
    assert_eq!(found, chain.unspent_outputs_of(&script).await.unwrap());
    let mut depths: Vec<_> = found.iter().map(|(_, utxo)| utxo.confirmations).collect();
    depths.sort_unstable();
    assert_eq!(depths, [0, 1, 3]);
    assert!(
        found
            .iter()
            .all(|(outpoint, utxo)| *outpoint != pending.0 && utxo.output.script_pubkey == script)
    );

    // The nearest target at or below the one asked: 6 blocks → 10.5 sat/vB = 2 625 sat/kwu.
    assert_eq!(esplora.estimate_fee_rate(6).await.unwrap(), FeeRate::from_sat_per_kwu(2_625));
    assert_eq!(esplora.estimate_fee_rate(100).await.unwrap(), FeeRate::from_sat_per_kwu(2_625));
    assert_eq!(esplora.estimate_fee_rate(1_000).await.unwrap(), FeeRate::from_sat_per_kwu(250));

    let closed = Esplora::new("http://127.0.0.1:9/api").unwrap();
    assert!(matches!(closed.tip().await, Err(ChainError::Unavailable { .. })));
}

/// With the `tls` feature an `https://` Esplora works, and its certificate is checked: the
/// same fake behind TLS with a self-signed certificate is refused until that certificate is
/// trusted.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_esplora_is_reached_and_its_certificate_checked() {
    use std::sync::Arc;

    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let chain = SimulatedChain::new();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = fake_app(chain.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    let url = format!("https://localhost:{port}/api");
    let untrusted = Esplora::new(&url).unwrap().tip().await.unwrap_err();
    assert!(untrusted.to_string().contains("certificate"), "{untrusted}");
    let trusted = Esplora::new(&url).unwrap().with_root_certificate(&cert).unwrap();
    chain.mine(2);
    assert_eq!(trusted.tip().await.unwrap(), chain.tip());
    let coin = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    let txid = trusted.broadcast(&spend(coin, 99_000, 0)).await.unwrap();
    assert_eq!(trusted.tx_status(&txid).await.unwrap(), TxStatus::InMempool);
    assert!(Esplora::new("http://localhost:1").unwrap().with_root_certificate(&cert).is_err());
}
