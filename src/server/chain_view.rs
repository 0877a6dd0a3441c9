//! [`chain_view`]: an Esplora-compatible read view of the server's chain backend, for browser
//! clients that have no chain view of their own (a demo, regtest, an operator's own users).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Address, Network, Transaction, Txid};
use http::StatusCode;
use serde_json::json;

use crate::chain::{ChainBackend, ChainError, TxStatus};
use crate::wire::{Problem, ProblemCode};

/// The largest transaction `POST /tx` takes, in hex characters (100 kB, Core's standard
/// weight limit for one transaction is 400 000 WU).
const MAX_TX_HEX: usize = 200_000;

/// The subset of the [Esplora HTTP API](https://github.com/Blockstream/esplora/blob/master/API.md)
/// a browser client needs, answered from `chain` for addresses of `network`:
///
/// | route | answer |
/// |---|---|
/// | `GET /blocks/tip/height` | the tip's height (text) |
/// | `GET /address/{address}/utxo` | the address's unspent outputs: `[{txid, vout, value, status: {confirmed, block_height}}]` ([`ChainBackend::unspent_outputs_of`]) |
/// | `GET /tx/{txid}/status`, `GET /tx/{txid}` | `{confirmed, block_height}`; **404 for a transaction the backend does not know** (Esplora's `/status` answers `{"confirmed": false}`; its `GET /tx/{txid}`, the transaction, answers 404 too) |
/// | `POST /tx` | broadcasts the hex body; the txid (text) |
///
/// Refusals are RFC 9457 problem documents: 400 for what does not parse or what the chain
/// refuses, 503 when the backend cannot be reached.
///
/// **For regtest, signet and demos: not a mainnet service.** What a client believes from it
/// is the paying server's word. A coin it invents makes a funding no node accepts, and a value
/// it changes makes the funding's signatures invalid (BIP-143 signatures commit to the amount
/// they spend). But the tip decides the refund's lock time: a server that writes a tip far
/// *ahead* in its terms and here locks the client's money for as long as it likes (the client's
/// check that the two agree does not help when the server writes both), and it can claim a
/// settlement was broadcast. So the browser client refuses a chain view on the paying server's
/// origin on any network but regtest unless told to trust it (`trustServerChainView`); give it
/// an independent one (a public Esplora, or your own). On Bitcoin Core, `unspent_outputs_of`
/// is `scantxoutset`, which scans the whole UTXO set (one scan at a time: concurrent address
/// queries wait their turn here) and sees confirmed outputs only. Mount it under a prefix with
/// [`Router::nest`].
///
/// # Examples
///
/// ```
/// use axum::Router;
/// use paychan::bitcoin::Network;
/// use paychan::chain::sim::SimulatedChain;
/// use paychan::server::chain_view;
///
/// let app: Router = Router::new().nest("/chain", chain_view(SimulatedChain::new(), Network::Regtest));
/// ```
pub fn chain_view<C: ChainBackend + Clone + 'static>(chain: C, network: Network) -> Router {
    Router::new()
        .route("/blocks/tip/height", get(tip::<C>))
        .route("/address/{address}/utxo", get(utxos::<C>))
        .route("/tx/{txid}/status", get(status::<C>))
        .route("/tx/{txid}", get(status::<C>))
        .route("/tx", post(broadcast::<C>))
        .with_state((chain, network, Arc::new(tokio::sync::Mutex::new(()))))
}

/// The chain, the network, and the one scan of the UTXO set at a time.
type ViewState<C> = State<(C, Network, Arc<tokio::sync::Mutex<()>>)>;

fn unavailable(error: ChainError) -> Problem {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, ProblemCode::ChainUnavailable, error)
}

fn bad(detail: impl fmt::Display) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, ProblemCode::BadRequest, detail)
}

async fn tip<C: ChainBackend>(State((chain, _, _)): ViewState<C>) -> Result<String, Problem> {
    Ok(chain.tip().await.map_err(unavailable)?.height.to_string())
}

async fn utxos<C: ChainBackend>(
    State((chain, network, scan)): ViewState<C>,
    Path(address): Path<String>,
) -> Result<Response, Problem> {
    let address = Address::from_str(&address)
        .map_err(|e| bad(format_args!("address: {e}")))?
        .require_network(network)
        .map_err(|_| bad(format_args!("the address is not for {network}")))?;
    let tip = chain.tip().await.map_err(unavailable)?.height;
    let coins = {
        let _one_at_a_time = scan.lock().await;
        chain.unspent_outputs_of(&address.script_pubkey()).await.map_err(unavailable)?
    };
    // Coins a transaction may spend now: an immature coinbase would make the funding invalid.
    let coins: Vec<_> = coins
        .iter()
        .filter(|(_, utxo)| utxo.is_spendable())
        .map(|(outpoint, utxo)| {
            let height = (utxo.confirmations > 0)
                .then(|| tip.saturating_add(1).saturating_sub(utxo.confirmations));
            json!({
                "txid": outpoint.txid,
                "vout": outpoint.vout,
                "value": utxo.output.value.to_sat(),
                "status": { "confirmed": height.is_some(), "block_height": height },
            })
        })
        .collect();
    Ok(axum::Json(coins).into_response())
}

async fn status<C: ChainBackend>(
    State((chain, _, _)): ViewState<C>,
    Path(txid): Path<String>,
) -> Result<Response, Problem> {
    let txid = Txid::from_str(&txid).map_err(|e| bad(format_args!("txid: {e}")))?;
    let body = match chain.tx_status(&txid).await.map_err(unavailable)? {
        TxStatus::Unknown => {
            return Err(Problem::new(StatusCode::NOT_FOUND, ProblemCode::BadRequest, "unknown"));
        }
        TxStatus::InMempool => json!({ "confirmed": false }),
        TxStatus::Confirmed { height, .. } => json!({ "confirmed": true, "block_height": height }),
    };
    Ok(axum::Json(body).into_response())
}

async fn broadcast<C: ChainBackend>(
    State((chain, _, _)): ViewState<C>,
    body: String,
) -> Result<String, Problem> {
    let hex = body.trim();
    if hex.len() > MAX_TX_HEX {
        return Err(bad("the transaction is too large"));
    }
    let tx: Transaction =
        deserialize_hex(hex).map_err(|e| bad(format_args!("transaction: {e}")))?;
    match chain.broadcast(&tx).await {
        Ok(txid) => Ok(txid.to_string()),
        Err(e) if e.reject_reason().is_some() => {
            Err(bad(format_args!("the chain refused it: {e}")))
        }
        Err(e) => Err(unavailable(e)),
    }
}
