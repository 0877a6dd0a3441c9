//! The opening handshake: terms, open, refund, fund.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use bitcoin::absolute::LockTime;
use bitcoin::hex::DisplayHex as _;
use bitcoin::{Amount, CompressedPublicKey, OutPoint, Transaction, TxOut};

use super::{
    MAX_FUNDING_INPUTS, Proposal, Shared, bad, body, broke, chain_problem, hex_script, hex_tx,
    store_problem, unknown_proposal,
};
use crate::chain::ChainBackend;
use crate::channel::{ChannelParams, ChannelState};
use crate::store::{ChannelRecord, ChannelStore};
use crate::wire::{
    self, ChannelId, Endpoints, FundRequest, FundResponse, OpenRequest, OpenResponse, Problem,
    ProblemCode, RefundRequest, RefundResponse, TermsDocument,
};

pub(super) async fn terms<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
) -> Result<Json<TermsDocument>, Problem> {
    let t = s.terms().await?;
    let n = &s.negotiation;
    Ok(Json(TermsDocument {
        version: 1,
        scheme: "bitcoin-channel".to_owned(),
        network: n.network.to_core_arg().to_owned(),
        prices: n.prices.get(),
        min_value_sat: t.min_value.to_sat(),
        max_value_sat: t.max_value.to_sat(),
        lifetime_blocks: t.blocks,
        lifetime_seconds: Some(t.seconds),
        min_fee_rate_sat_per_vb: t.min_fee_rate.to_sat_per_vb_ceil(),
        max_fee_rate_sat_per_vb: t.max_fee_rate.to_sat_per_vb_floor(),
        funding_min_fee_rate_sat_per_vb: t.funding_min_fee_rate.to_sat_per_vb_ceil(),
        dust_limit_sat: n.payout_script.minimal_non_dust().to_sat(),
        server_script: n.payout_script.to_hex_string(),
        tip: s.tip(),
        endpoints: Endpoints::under(&n.prefix),
    }))
}

pub(super) async fn open<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    req: Result<Json<OpenRequest>, JsonRejection>,
) -> Result<Json<OpenResponse>, Problem> {
    let req = body(req)?;
    let client = s.client(connect, &headers);
    if !s.allow_open(client) {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            ProblemCode::RateLimited,
            "too many channel openings",
        ));
    }
    s.make_room(client)?;
    let client_key: CompressedPublicKey = req
        .client_pubkey
        .parse()
        .map_err(|e| bad(ProblemCode::BadRequest, format!("client_pubkey: {e}")))?;
    let client_script = hex_script(&req.client_script)?;
    let terms = s.terms().await?;
    let index = s.store.next_key_index().await.map_err(store_problem)?;
    let server_key = crate::channel::sig::public_key(&s.key(index)?);
    let params = terms
        .agree(
            client_key,
            server_key,
            Amount::from_sat(req.value_sat),
            LockTime::from_consensus(req.expiry),
            client_script,
            s.negotiation.payout_script.clone(),
            s.tip(),
        )
        .map_err(|e| broke(e.code(), e))?;
    let response = OpenResponse {
        proposal: index,
        server_pubkey: server_key.to_string(),
        witness_script: params.witness_script().to_hex_string(),
        funding_script_pubkey: params.funding_script_pubkey().to_hex_string(),
        funding_address: params.funding_address(s.negotiation.network).to_string(),
        value_sat: params.value.to_sat(),
        expiry: params.expiry.to_consensus_u32(),
        close_margin: params.close_margin,
        client_script: params.client_script.to_hex_string(),
        server_script: params.server_script.to_hex_string(),
        min_fee_rate_sat_per_vb: params.min_fee_rate.to_sat_per_vb_ceil(),
        max_fee_rate_sat_per_vb: params.max_fee_rate.to_sat_per_vb_floor(),
        refund_fee_sat: params.refund_fee().to_sat(),
        payment_fee_sat: params.payment_fee(true).to_sat(),
        min_server_amount_sat: params.min_server_amount().to_sat(),
    };
    s.pending.insert(
        index,
        Proposal { params, funding_outpoint: None, client, created: Instant::now() },
    );
    Ok(Json(response))
}

pub(super) async fn refund<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    req: Result<Json<RefundRequest>, JsonRejection>,
) -> Result<Json<RefundResponse>, Problem> {
    let req = body(req)?;
    let funding = hex_tx(&req.funding_tx, "funding_tx")?;
    let refund = hex_tx(&req.refund_tx, "refund_tx")?;
    let mut proposal =
        s.pending.get_mut(&req.proposal).filter(|p| s.live(p)).ok_or_else(unknown_proposal)?;
    let checked = proposal
        .params
        .check_refund(&s.negotiation.terms, &funding, &refund, s.tip())
        .map_err(|e| broke(e.code(), e))?;
    let outpoint = checked.funding_outpoint();
    let signature = checked
        .sign(&s.key(req.proposal)?)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, ProblemCode::Signing, e))?;
    proposal.funding_outpoint = Some(outpoint);
    Ok(Json(RefundResponse {
        channel: ChannelId::new(outpoint),
        signature: signature.to_vec().to_lower_hex_string(),
    }))
}

pub(super) async fn fund<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    req: Result<Json<FundRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<FundResponse>), Problem> {
    let req = body(req)?;
    let funding = hex_tx(&req.funding_tx, "funding_tx")?;
    let payment = wire::decode_payment(req.payment.as_bytes()).map_err(|e| broke(e.code(), e))?;
    let proposal = match s.proposal(req.proposal) {
        Ok(proposal) => proposal,
        // A retry of a /fund that succeeded: answer as then.
        Err(unknown) => return already_funded(&s, &funding, &payment).await.ok_or(unknown)?,
    };
    let outpoint = proposal.funding_outpoint.ok_or_else(|| {
        Problem::new(
            StatusCode::CONFLICT,
            ProblemCode::RefundNotSigned,
            "have the refund signed first",
        )
    })?;
    // Checks that need no chain backend come first.
    let found = funding.compute_txid();
    if found != outpoint.txid {
        let e = crate::channel::FundingError::TxidMismatch { expected: outpoint.txid, found };
        return Err(broke(e.code(), e));
    }
    if funding.input.len() > MAX_FUNDING_INPUTS {
        return Err(bad(
            ProblemCode::FundingTooManyInputs,
            format_args!("at most {MAX_FUNDING_INPUTS} inputs"),
        ));
    }
    let params = proposal.params;
    let channel = params.clone().at(outpoint);
    // With no best payment, every valid payment is an increase.
    if let Err(e) = channel.check_payment(None, &payment, s.tip()) {
        return Err(broke(e.code(), e));
    }
    let state = funding_state(&*s, &params, outpoint, &funding).await?;
    let record = ChannelRecord::open(channel, req.proposal, payment)
        .with_funded_at(s.tip().height)
        .with_state(state);
    let id = record.id();
    let balance = record.balance();
    match s.store.create(record).await {
        Ok(()) | Err(crate::store::StoreError::AlreadyExists) => {}
        Err(e) => return Err(store_problem(e)),
    }
    s.pending.remove(&req.proposal);
    Ok((StatusCode::CREATED, Json(FundResponse { channel: id, balance_msat: balance })))
}

/// The state a funded channel starts in: broadcasts `funding` after checking it against its
/// inputs, or, when its output is already on the chain (a retried `/fund` whose record could
/// not be stored), checks only that output.
async fn funding_state<C: ChainBackend, St: ChannelStore>(
    s: &Shared<C, St>,
    params: &ChannelParams,
    outpoint: OutPoint,
    funding: &Transaction,
) -> Result<ChannelState, Problem> {
    let chain = &s.negotiation.chain;
    let policy = &s.negotiation.funding;
    Ok(match chain.unspent(&outpoint).await.map_err(chain_problem)? {
        // Already broadcast (a /fund whose record could not be stored, retried): the node
        // took the funding, so only its output is left to check.
        Some(utxo) => {
            if utxo.output.script_pubkey != params.funding_script_pubkey()
                || utxo.output.value != params.value
            {
                let e = crate::channel::FundingError::WrongOutputScript;
                return Err(broke(e.code(), e));
            }
            if utxo.confirmations >= policy.min_confirmations() {
                ChannelState::Open
            } else {
                ChannelState::Pending
            }
        }
        None => {
            let mut prevouts: Vec<TxOut> = Vec::with_capacity(funding.input.len());
            let mut depths = Vec::with_capacity(funding.input.len());
            for input in &funding.input {
                let utxo = chain
                    .unspent(&input.previous_output)
                    .await
                    .map_err(chain_problem)?
                    .ok_or_else(|| bad(ProblemCode::FundingMissingInputs, input.previous_output))?;
                prevouts.push(utxo.output);
                depths.push(utxo.confirmations);
            }
            params
                .check_funding(&s.terms().await?, outpoint, funding, &prevouts)
                .map_err(|e| broke(e.code(), e))?;
            // Broadcast before the channel exists: a channel is never open without its funding.
            chain.broadcast(funding).await.map_err(chain_problem)?;
            policy.initial_state(params.value, funding, &depths)
        }
    })
}

/// The answer to a repeated `/fund` of a channel that exists: same funding, same first
/// payment.
async fn already_funded<C, St: ChannelStore>(
    s: &Shared<C, St>,
    funding: &Transaction,
    payment: &Transaction,
) -> Option<Result<(StatusCode, Json<FundResponse>), Problem>> {
    let outpoint = payment.input.first()?.previous_output;
    if outpoint.txid != funding.compute_txid() {
        return None;
    }
    let id = ChannelId::new(outpoint);
    let record = match s.store.load(id).await {
        Ok(record) => record?,
        Err(e) => return Some(Err(store_problem(e))),
    };
    // Only the holder of the first payment gets the answer again.
    record.channel.verify_client_signature(payment).ok()?;
    Some(Ok((
        StatusCode::CREATED,
        Json(FundResponse { channel: id, balance_msat: record.balance() }),
    )))
}
