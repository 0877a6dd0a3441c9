//! A channel's status, and the cooperative close.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hex::FromHex;

use super::{Shared, bad, broke, store_problem};
use crate::MilliSats;
use crate::chain::ChainBackend;
use crate::channel::{ChannelState, PaymentError};
use crate::settlement::{CloseOutcome, close_now};
use crate::store::{ChannelRecord, ChannelStore};
use crate::wire::{
    self, ChannelId, ChannelSnapshot, CloseRequest, CloseResponse, PAYMENT_CHANNEL, Problem,
    ProblemCode, Receipt,
};

/// The `{id}` of the path: a percent-decoding failure is a problem document like any other.
fn parse_id(id: Result<Path<String>, PathRejection>) -> Result<ChannelId, Problem> {
    let Path(id) = id.map_err(|e| bad(ProblemCode::BadRequest, e.body_text()))?;
    id.parse().map_err(|e| bad(ProblemCode::BadRequest, e))
}

async fn load<C, St: ChannelStore>(
    s: &Shared<C, St>,
    id: ChannelId,
) -> Result<ChannelRecord, Problem> {
    s.store
        .load(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, ProblemCode::UnknownChannel, id))
}

pub(super) async fn status<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ChannelSnapshot>, Problem> {
    let record = load(&s, parse_id(id)?).await?;
    Ok(Json(record.snapshot(MilliSats::ZERO, MilliSats::ZERO)))
}

/// `POST {prefix}/channels/{id}/close`: the caller proves it is the client by sending a
/// payment of the channel in the `Payment-Channel` header.
pub(super) async fn close<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    id: Result<Path<String>, PathRejection>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<CloseResponse>), Problem> {
    let id = parse_id(id)?;
    let request: CloseRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CloseRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(ProblemCode::BadRequest, e))?
    };
    let fair = match &request.fair_payment {
        Some(encoded) => {
            Some(wire::decode_payment(encoded.as_bytes()).map_err(|e| broke(e.code(), e))?)
        }
        None => None,
    };
    let record = load(&s, id).await?;
    let proven = proof(&record, &headers)?;
    if let Some(fair) = fair {
        fair_close(&s, record, fair).await?;
    }
    // The one closing procedure (the settlement task's): freeze, read again, co-sign the best
    // payment, broadcast. A close the chain does not take now stays queued for the task.
    let outcome = close_now(&*s.store, &s.negotiation.chain, &s.negotiation.master, id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, ProblemCode::UnknownChannel, id))?;
    let (status, close, state) = match outcome {
        CloseOutcome::Closed { close, .. } => (StatusCode::OK, close, ChannelState::Closed),
        CloseOutcome::Queued { close, .. } => (StatusCode::ACCEPTED, close, ChannelState::Closing),
        CloseOutcome::Failed => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                ProblemCode::ChannelNotOpen,
                "the channel cannot be closed (no payment to close with, or its funding is \
                 spent or gone): it failed",
            ));
        }
        CloseOutcome::NotClosable(state) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                ProblemCode::ChannelNotOpen,
                format_args!("the channel is {}", state.as_str()),
            ));
        }
    };
    let prev = request.prev.as_deref().and_then(|hex| <[u8; 32]>::from_hex(hex).ok());
    let receipt = close_receipt(&s, id, uri.path(), proven, prev).await;
    Ok((
        status,
        Json(CloseResponse {
            channel: id,
            txid: close.compute_txid(),
            server_amount_sat: crate::channel::server_amount(&close).to_sat(),
            close_tx: serialize_hex(&close),
            state,
            receipt,
        }),
    ))
}

/// The caller's proof that it is the client: a payment of this channel in `Payment-Channel`,
/// signed with K1, paying at least the best (an old header someone captured does not close).
/// What it pays the server.
fn proof(record: &ChannelRecord, headers: &HeaderMap) -> Result<bitcoin::Amount, Problem> {
    let proof = headers.get(PAYMENT_CHANNEL).ok_or_else(|| {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            ProblemCode::PaymentRequired,
            "send a payment of this channel",
        )
    })?;
    let proof = wire::decode_payment(proof.as_bytes()).map_err(|e| broke(e.code(), e))?;
    match proof.input.first().map(|i| i.previous_output) {
        Some(outpoint) if outpoint == record.channel.outpoint() => {}
        Some(found) => {
            let e = PaymentError::WrongOutpoint { found };
            return Err(broke(e.code(), e));
        }
        None => {
            let e = PaymentError::InputCount { found: 0 };
            return Err(broke(e.code(), e));
        }
    }
    record.channel.verify_client_signature(&proof).map_err(|e| broke(e.code(), e))?;
    let best = record.paid_amount();
    let proven = crate::channel::server_amount(&proof);
    if best > proven {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            ProblemCode::StaleProof,
            format_args!("the payment pays {proven}, the latest {best}: send the latest to close"),
        ));
    }
    Ok(proven)
}

/// A fair settlement moves the channel to closing with it in one atomic store operation,
/// which also requires that it covers what was spent then: a bad or short one is refused with
/// the channel untouched. On a channel already closing it is ignored (its close may be out
/// already): the close is at the best payment.
async fn fair_close<C, St: ChannelStore>(
    s: &Shared<C, St>,
    record: ChannelRecord,
    fair: bitcoin::Transaction,
) -> Result<(), Problem> {
    if !matches!(record.state, ChannelState::Pending | ChannelState::Open) {
        return Ok(());
    }
    let fair_problem = |record: &ChannelRecord, e: PaymentError| {
        let status = match e {
            PaymentError::BelowSpent { .. } => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        Problem::new(status, ProblemCode::from_static(e.code()), e)
            .with_channel(Some(record.snapshot(MilliSats::ZERO, MilliSats::ZERO)))
    };
    let checked = record
        .channel
        .check_fair_payment(fair, record.spent)
        .map_err(|e| fair_problem(&record, e))?;
    let found = checked.server_amount();
    let id = record.id();
    if found < record.paid_amount()
        && !s.store.close_with(id, checked).await.map_err(store_problem)?
    {
        // Not closed: it spent more meanwhile, or another close moved it on.
        let now = load(s, id).await?;
        if matches!(now.state, ChannelState::Pending | ChannelState::Open) {
            let min = now.channel.params().min_server_amount();
            // What is leased counts: a node may serve it until it is given back.
            let needed = now.committed().to_sat_ceil().max(min);
            return Err(fair_problem(&now, PaymentError::BelowSpent { needed, found }));
        }
    }
    Ok(())
}

/// The close's receipt (see [`CloseResponse::receipt`]): `POST path`, price 0, the proof's
/// `proven` paid, the balance as every receipt states it (paid − spent: what live leases hold
/// counts as unspent until settled, so no receipt overstates the spent), linked to `prev`,
/// signed with the channel's K2. `None` if the channel cannot be read again or its key not
/// derived (the close stands; the client lacks only its last proof).
async fn close_receipt<C, St: ChannelStore>(
    s: &Shared<C, St>,
    id: ChannelId,
    path: &str,
    proven: bitcoin::Amount,
    prev: Option<[u8; 32]>,
) -> Option<Receipt> {
    let record = s.store.load(id).await.ok()??;
    let key = crate::channel::channel_key(&s.negotiation.master, record.key_index).ok()?;
    let paid = MilliSats::from_sat(proven)?;
    let receipt =
        Receipt::new(id, "POST", path, MilliSats::ZERO, paid, paid.saturating_sub(record.spent));
    Some(prev.map_or(receipt.clone(), |prev| receipt.with_prev(prev)).sign(&key))
}
