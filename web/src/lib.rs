//! paychan's browser client, the Rust half: the client's sans-IO steps
//! (`paychan::client::steps`), the channel core and the loss bound, compiled to wasm and bound
//! for JavaScript. `js/paychan.js` drives it: it does every `fetch`, reads the chain view, and
//! saves to IndexedDB **before** anything this module signed leaves the page.
//!
//! Nothing here does I/O, and nothing here draws randomness: keys come in as 32 bytes the page
//! drew with `crypto.getRandomValues`. Amounts cross as numbers of satoshis (or millisatoshis
//! where the protocol counts them), every one below 2^53; documents cross as JSON strings in
//! the forms of `docs/HTTP.md`.
//!
//! Two classes:
//! - [`Opening`]: one channel being opened, step by step (terms → proposal → funding →
//!   refund → fund);
//! - [`Session`]: a funded channel being paid on (402s, served answers, the fair close, the
//!   refund), saved and loaded as [`Session::state`]'s JSON.

#![forbid(unsafe_code)]

mod psbt;

/// talc, not std's dlmalloc: smaller (see `Cargo.toml`). Single-threaded wasm only.
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static TALC: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

use std::str::FromStr;

use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::secp256k1::SecretKey;
use bitcoin::{
    Address, Amount, CompressedPublicKey, FeeRate, Network, OutPoint, ScriptBuf, Transaction,
    TxOut, ecdsa,
};
use paychan::MilliSats;
use paychan::channel::{ChainTip, ChannelParams, server_amount};
use paychan::client::charges::{ChargeWatch, SentPayment};
use paychan::client::metered::{MeteredStream, StreamEvent};
use paychan::client::steps::{self, Ask, StepError};
use paychan::client::{ClientChannel, LossBound, SpendingPolicy};
use paychan::wire::{
    self, ChannelId, ChannelSnapshot, CloseRequest, CloseResponse, FundRequest, OpenRequest,
    OpenResponse, PriceList, Problem, ProblemCode, RefundRequest, RefundResponse, TermsDocument,
};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

/// An error for JavaScript: its message says what and why.
fn error(what: impl std::fmt::Display) -> JsError {
    JsError::new(&what.to_string())
}

fn json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, JsError> {
    serde_json::from_str(text).map_err(|e| error(format!("{what}: {e}")))
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("documents serialize")
}

fn secret(hex: &str) -> Result<SecretKey, JsError> {
    SecretKey::from_str(hex).map_err(|_| error("a key must be 32 bytes of hex, below the order"))
}

fn network(name: &str) -> Result<Network, JsError> {
    Network::from_core_arg(name).map_err(|_| error(format!("unknown network {name:?}")))
}

fn public(key: &SecretKey) -> CompressedPublicKey {
    paychan::channel::sig::public_key(key)
}

fn p2wpkh(key: &SecretKey) -> ScriptBuf {
    ScriptBuf::new_p2wpkh(&public(key).wpubkey_hash())
}

fn sat(amount: f64, what: &str) -> Result<Amount, JsError> {
    if amount.is_finite() && amount >= 0.0 && amount.fract() == 0.0 && amount < 2f64.powi(53) {
        Ok(Amount::from_sat(amount as u64))
    } else {
        Err(error(format!("{what} must be a whole number of satoshis")))
    }
}

/// The payment scheme a 402 asks for when it is not paychan's (`L402`, `x402`, another
/// `Payment` method), from its `WWW-Authenticate` value (`""` when absent) and its body; `undefined`
/// for a paychan 402 (the Rust client's rule, `client::steps::foreign_scheme`).
#[wasm_bindgen(js_name = foreignScheme)]
pub fn foreign_scheme(www_authenticate: &str, body: &str) -> Option<String> {
    let challenges: Vec<&str> =
        Some(www_authenticate).filter(|value| !value.is_empty()).into_iter().collect();
    steps::foreign_scheme(&challenges, body.as_bytes())
}

/// The spending policy, in the page's words: every field optional, the Rust client's
/// defaults otherwise (`SpendingPolicy::default`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyJson {
    max_channel_value_sat: Option<u64>,
    max_per_request_msat: Option<u64>,
    max_total_sat: Option<u64>,
    max_prepaid_sat: Option<u64>,
    max_lifetime_blocks: Option<u32>,
    max_fee_rate_sat_per_vb: Option<u64>,
    max_locked_sat: Option<u64>,
    /// A paid answer without a receipt stops the payments (the Rust `require_receipts`).
    require_receipts: Option<bool>,
    max_unsigned_receipts: Option<u32>,
}

/// The policy, and whether it requires receipts.
fn policy_and_receipts(text: &str) -> Result<(SpendingPolicy, bool), JsError> {
    let p: PolicyJson =
        if text.trim().is_empty() { PolicyJson::default() } else { json(text, "policy")? };
    let receipts = p.require_receipts.unwrap_or(false);
    let mut policy = SpendingPolicy::default();
    if let Some(v) = p.max_channel_value_sat {
        policy = policy.with_max_channel_value(Amount::from_sat(v));
    }
    if let Some(v) = p.max_per_request_msat {
        policy = policy.with_max_per_request(MilliSats::from_msat(v));
    }
    if let Some(v) = p.max_total_sat {
        policy = policy.with_max_total(Amount::from_sat(v));
    }
    if let Some(v) = p.max_prepaid_sat {
        policy = policy.with_max_prepaid(Amount::from_sat(v));
    }
    if let Some(v) = p.max_unsigned_receipts {
        policy = policy.with_max_unsigned_receipts(v);
    }
    if let Some(v) = p.max_lifetime_blocks {
        policy = policy.with_max_lifetime_blocks(v);
    }
    if let Some(v) = p.max_fee_rate_sat_per_vb {
        let rate = FeeRate::from_sat_per_vb(v).ok_or_else(|| error("maxFeeRateSatPerVb"))?;
        policy = policy.with_max_fee_rate(rate);
    }
    if let Some(v) = p.max_locked_sat {
        policy = policy.with_max_locked(Amount::from_sat(v));
    }
    Ok((policy, receipts))
}

/// The public key (hex) of the 32-byte secret `secret` (hex).
///
/// # Errors
///
/// When `secret` is not a valid key.
#[wasm_bindgen(js_name = publicKey)]
pub fn public_key(secret_hex: &str) -> Result<String, JsError> {
    Ok(public(&secret(secret_hex)?).to_string())
}

/// The P2WPKH address of `secret_hex` on `network` (`main`, `test`, `signet`, `regtest`, as
/// the terms name it): where the user deposits the coins that fund channels.
///
/// # Errors
///
/// When the key or the network is not valid.
#[wasm_bindgen(js_name = depositAddress)]
pub fn deposit_address(secret_hex: &str, network_name: &str) -> Result<String, JsError> {
    let key = secret(secret_hex)?;
    Ok(Address::p2wpkh(&public(&key), network(network_name)?).to_string())
}

/// The output script (hex) of [`deposit_address`]: what a chain view lists coins by.
///
/// # Errors
///
/// When the key is not valid.
#[wasm_bindgen(js_name = depositScript)]
pub fn deposit_script(secret_hex: &str) -> Result<String, JsError> {
    Ok(p2wpkh(&secret(secret_hex)?).to_hex_string())
}

/// A coin of the deposit key, as an Esplora-compatible chain view lists it
/// (`GET /address/:address/utxo`).
#[derive(Debug, Deserialize)]
struct Coin {
    txid: bitcoin::Txid,
    vout: u32,
    value: u64,
}

/// One channel being opened. The page drives it:
///
/// 1. `new Opening(terms, policy, ownTip, k1, depositKey, spent, locked)` checks the terms;
///    `request()` is the body of `POST terms.endpoints.open`;
/// 2. `propose(answer)` checks the server's proposal field by field;
/// 3. `fund(coins)` builds the unsigned funding from the deposit's coins and returns the
///    body of `POST …/refund`;
/// 4. `refundSigned(answer)` verifies the server's refund signature (nothing is signed
///    before) and returns the [`Session`] whose `state()` the page saves **before** step 5;
/// 5. `fundRequest(session)` signs the funding: the body of `POST …/fund`. The page saves
///    the session again (the signed funding is now the server's to broadcast) before it
///    sends it.
#[wasm_bindgen]
pub struct Opening {
    terms: TermsDocument,
    network: Network,
    policy: SpendingPolicy,
    /// Whether the policy requires receipts.
    require_receipts: bool,
    tip: ChainTip,
    k1: SecretKey,
    deposit: SecretKey,
    value: Amount,
    expiry: u32,
    first: Amount,
    spent: Amount,
    params: Option<(u32, ChannelParams)>,
    funding: Option<(steps::Funding, OutPoint)>,
}

#[wasm_bindgen]
impl Opening {
    /// Checks the server's `terms` (JSON) under `policy` (JSON, see `docs/BROWSER.md`) for a
    /// channel on `network_name`, against the page's own chain tip `own_tip` (from its chain
    /// view, never the server's word alone), for `lifetime_blocks` (by default
    /// 1 008, within the terms' bounds), with the fresh channel key `k1_hex` and the
    /// deposit key `deposit_hex`; `spent_sat` is what the page already spent (payments and
    /// fees, for the budget) and `locked_sat` the value of its channels whose money is not
    /// back yet (for `maxLockedSat`), `opened_ms` the times (`Date.now()`) it opened channels
    /// with this server and `now_ms` now (for the policy's `max_opens`: 3 an hour by
    /// default). Change and the refund go to the deposit key.
    ///
    /// # Errors
    ///
    /// Why the terms or the policy refuse.
    #[wasm_bindgen(constructor)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        terms_json: &str,
        policy_json: &str,
        network_name: &str,
        own_tip: u32,
        lifetime_blocks: Option<u32>,
        k1_hex: &str,
        deposit_hex: &str,
        spent_sat: f64,
        locked_sat: f64,
        opened_ms: &[f64],
        now_ms: f64,
    ) -> Result<Opening, JsError> {
        let terms: TermsDocument = json(terms_json, "terms")?;
        let network = network(network_name)?;
        let (policy, require_receipts) = policy_and_receipts(policy_json)?;
        let lifetime = lifetime_blocks.unwrap_or(steps::DEFAULT_LIFETIME_BLOCKS);
        // The page opens by itself, on a 402: an automatic open for the policy.
        let plan =
            steps::plan_open(&terms, network, &policy, None, lifetime, true).map_err(error)?;
        let own = ChainTip { height: own_tip, median_time_past: 0 };
        steps::check_tip(&terms, own).map_err(error)?;
        // The policy's max_opens: the times (ms) the page opened channels with this server.
        let (_, period) = policy.max_opens();
        let period_ms = period.as_millis() as f64;
        let recent = opened_ms.iter().filter(|at| now_ms - **at < period_ms).count();
        steps::check_opens(&policy, recent).map_err(error)?;
        let spent = sat(spent_sat, "spent")?;
        let first = steps::first_payment(&terms, &policy, spent).map_err(error)?;
        policy.check_lock(sat(locked_sat, "locked")?, plan.value).map_err(error)?;
        let (k1, deposit) = (secret(k1_hex)?, secret(deposit_hex)?);
        if k1 == deposit {
            return Err(error("the channel key must not be the deposit key"));
        }
        Ok(Opening {
            expiry: own_tip.saturating_add(plan.lifetime),
            terms,
            network,
            policy,
            require_receipts,
            tip: own,
            k1,
            deposit,
            value: plan.value,
            first,
            spent,
            params: None,
            funding: None,
        })
    }

    /// The body of `POST terms.endpoints.open` (JSON).
    pub fn request(&self) -> String {
        to_json(&OpenRequest {
            client_pubkey: public(&self.k1).to_string(),
            value_sat: self.value.to_sat(),
            expiry: self.expiry,
            client_script: p2wpkh(&self.deposit).to_hex_string(),
        })
    }

    /// The channel's value in satoshis (the deposit must hold it and the funding fee).
    #[wasm_bindgen(getter, js_name = valueSat)]
    pub fn value_sat(&self) -> f64 {
        self.value.to_sat() as f64
    }

    /// Checks the server's answer to the open request (JSON).
    ///
    /// # Errors
    ///
    /// The first field that differs from the request or the terms.
    pub fn propose(&mut self, answer_json: &str) -> Result<(), JsError> {
        let proposal: OpenResponse = json(answer_json, "open answer")?;
        let params = steps::check_proposal(
            &proposal,
            &self.terms,
            self.tip,
            public(&self.k1),
            self.value,
            self.expiry,
            &p2wpkh(&self.deposit),
        )
        .map_err(error)?;
        let policy = &self.policy;
        policy.check_fee_rate(params.min_fee_rate).map_err(error)?;
        self.params = Some((proposal.proposal, params));
        Ok(())
    }

    /// Builds the unsigned funding from the deposit's `coins` (JSON, a chain view's
    /// `[{txid, vout, value}]`, largest first is best) and returns the body of
    /// `POST terms.endpoints.refund` (JSON).
    ///
    /// # Errors
    ///
    /// Before [`propose`](Self::propose), when the coins cannot pay the channel and the fee,
    /// or when the fee and the first payment are beyond the budget.
    pub fn fund(&mut self, coins_json: &str) -> Result<String, JsError> {
        let (_, params) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let mut coins: Vec<Coin> = json(coins_json, "coins")?;
        coins.sort_by_key(|coin| std::cmp::Reverse(coin.value));
        let script = p2wpkh(&self.deposit);
        let coins: Vec<_> = coins
            .iter()
            .map(|c| {
                let output =
                    TxOut { value: Amount::from_sat(c.value), script_pubkey: script.clone() };
                (OutPoint::new(c.txid, c.vout), output)
            })
            .collect();
        let rate = FeeRate::from_sat_per_vb(self.terms.funding_min_fee_rate_sat_per_vb)
            .ok_or_else(|| error("the terms' funding fee rate"))?;
        self.policy.check_fee_rate(rate).map_err(error)?;
        let output = TxOut { value: params.value, script_pubkey: params.funding_script_pubkey() };
        let (funding, _) =
            steps::funding_from_coins(&coins, output.clone(), script, rate).map_err(error)?;
        self.funded_by(funding, &output)
    }

    /// The channel's funding output, for funding from the user's own wallet (after
    /// [`propose`](Self::propose)), as JSON `{address, amountSat, feeRateSatPerVb}`: the
    /// wallet makes an **unsigned** PSBT paying exactly `amountSat` to `address` (at least
    /// `feeRateSatPerVb`, native SegWit inputs), which [`fund_psbt`](Self::fund_psbt) takes.
    ///
    /// # Errors
    ///
    /// Before `propose`.
    #[wasm_bindgen(js_name = fundingOutput)]
    pub fn funding_output(&self) -> Result<String, JsError> {
        let (_, params) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let script = params.funding_script_pubkey();
        let address = Address::from_script(&script, self.network).map_err(error)?;
        Ok(format!(
            r#"{{"address":"{address}","amountSat":{},"feeRateSatPerVb":{}}}"#,
            params.value.to_sat(),
            self.terms.funding_min_fee_rate_sat_per_vb
        ))
    }

    /// Takes the user's wallet's unsigned funding PSBT (base64, BIP 174) paying
    /// [`funding_output`](Self::funding_output): it must pay it exactly once and spend only
    /// native SegWit coins whose `witness_utxo` it carries (their signatures cannot change the
    /// transaction's id, which the refund spends); its fee counts in the budget. Returns the
    /// body of `POST terms.endpoints.refund` (JSON), as [`fund`](Self::fund) does. After
    /// [`refund_signed`](Self::refund_signed) the wallet signs the same PSBT, and
    /// [`fund_request_signed`](Self::fund_request_signed) takes it back.
    ///
    /// # Errors
    ///
    /// Before `propose`, for a PSBT that does not parse or cannot fund the channel, or when
    /// its fee and the first payment are beyond the budget.
    #[wasm_bindgen(js_name = fundPsbt)]
    pub fn fund_psbt(&mut self, psbt_base64: &str) -> Result<String, JsError> {
        let (_, params) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let funding = read_psbt(psbt_base64)?;
        let output = TxOut { value: params.value, script_pubkey: params.funding_script_pubkey() };
        self.funded_by(funding, &output)
    }

    /// Takes the user's wallet's signed (and finalized) funding PSBT (base64): the
    /// transaction [`fund_psbt`](Self::fund_psbt) took, whose refund the server signed.
    /// Returns the body of `POST …/fund` (JSON) carrying `session`'s first payment; `session`
    /// keeps the signed funding as unacknowledged until [`Session::funded`]. Save
    /// `session.state()` before sending.
    ///
    /// # Errors
    ///
    /// Before [`refund_signed`](Self::refund_signed), for a PSBT that does not parse, is
    /// another transaction, or has an input the wallet did not sign and finalize.
    #[wasm_bindgen(js_name = fundRequestSigned)]
    pub fn fund_request_signed(
        &self,
        session: &mut Session,
        signed_base64: &str,
    ) -> Result<String, JsError> {
        let (proposal, _) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let (_, outpoint) = self.funding.as_ref().ok_or_else(|| error("fund first"))?;
        if session.channel.channel.outpoint() != *outpoint {
            return Err(error("the session is another channel's"));
        }
        let signed = read_psbt(signed_base64)?;
        let funding = steps::signed_funding(signed, *outpoint).map_err(error)?;
        fund_body(session, *proposal, funding)
    }

    /// Verifies the server's refund signature (the answer to `POST …/refund`, JSON), completes
    /// the refund, and signs the first payment: the [`Session`] the page saves before it
    /// signs the funding. `origin` is the server's.
    ///
    /// # Errors
    ///
    /// When the signature does not verify: abandon the channel; nothing was signed.
    #[wasm_bindgen(js_name = refundSigned)]
    pub fn refund_signed(&self, answer_json: &str, origin: &str) -> Result<Session, JsError> {
        let (_, params) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let (funding, outpoint) = self.funding.as_ref().ok_or_else(|| error("fund first"))?;
        let answer: RefundResponse = json(answer_json, "refund answer")?;
        let invalid =
            || error("the server's refund signature does not verify: abandon the channel");
        let signature = Vec::<u8>::from_hex(&answer.signature)
            .ok()
            .and_then(|bytes| ecdsa::Signature::from_slice(&bytes).ok())
            .ok_or_else(invalid)?;
        let refund = params.build_refund(*outpoint, params.refund_fee());
        params.verify_refund_signature(&refund, &signature).map_err(|_| invalid())?;
        let refund = params.complete_refund(&refund, &self.k1, &signature).map_err(error)?;
        let mut channel = ClientChannel::new(params.clone().at(*outpoint), 0, refund);
        channel.server = origin.to_owned();
        channel.funding_fee = funding.fee().ok_or_else(|| error("the funding's fee"))?;
        let mut session = Session::started(
            channel,
            self.k1,
            (&self.policy, self.require_receipts),
            self.first,
            &self.terms,
        )?;
        // This channel's spending is its funding fee and its payments; the page's other
        // channels count for the budget beside it.
        session.elsewhere = self.spent;
        session.pay_to(self.first)?;
        Ok(session)
    }

    /// Signs the funding with the deposit key and returns the body of `POST …/fund` (JSON),
    /// carrying `session`'s first payment; `session` keeps the signed funding as
    /// unacknowledged until [`Session::funded`]. Save `session.state()` before sending.
    ///
    /// # Errors
    ///
    /// Before [`refund_signed`](Self::refund_signed), or when a coin is not the deposit's.
    #[wasm_bindgen(js_name = fundRequest)]
    pub fn fund_request(&self, session: &mut Session) -> Result<String, JsError> {
        let (proposal, _) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let (funding, outpoint) = self.funding.as_ref().ok_or_else(|| error("fund first"))?;
        if session.channel.channel.outpoint() != *outpoint {
            return Err(error("the session is another channel's"));
        }
        let mut funding = funding.clone();
        steps::sign_p2wpkh_inputs(&mut funding, &self.deposit).map_err(error)?;
        fund_body(session, *proposal, funding.tx)
    }

    /// The network of the channel (as the terms name it).
    #[wasm_bindgen(getter)]
    pub fn network(&self) -> String {
        self.network.to_core_arg().to_owned()
    }
}

impl Opening {
    /// Takes `funding` (unsigned) of the channel output `output`: checks it, counts its fee in
    /// the budget with the first payment, and returns the body of `POST …/refund` (JSON).
    fn funded_by(&mut self, funding: steps::Funding, output: &TxOut) -> Result<String, JsError> {
        let (proposal, params) = self.params.as_ref().ok_or_else(|| error("propose first"))?;
        let outpoint = steps::check_funding(&funding, output).map_err(error)?;
        let fee = funding.fee().ok_or_else(|| error("the funding's fee: a coin is unknown"))?;
        let cost = self.first.checked_add(fee).unwrap_or(Amount::MAX);
        self.policy.check_spend(self.spent, cost).map_err(error)?;
        let refund = params.build_refund(outpoint, params.refund_fee());
        let request = RefundRequest {
            proposal: *proposal,
            funding_tx: serialize_hex(&funding.tx),
            refund_tx: serialize_hex(&refund),
        };
        self.funding = Some((funding, outpoint));
        Ok(to_json(&request))
    }
}

/// A receipt digest from the page (`Payment-Receipt-Prev`, hex), if any.
fn hex32(prev: Option<String>) -> Result<Option<[u8; 32]>, JsError> {
    prev.as_deref()
        .map(<[u8; 32]>::from_hex)
        .transpose()
        .map_err(|_| error("prev is not 32 bytes of hex"))
}

/// A metered stream being read ([`Session::meter`]): it says what its bytes cost and what to
/// pay, as the Rust client's `PaidBody` does with the same `MeteredStream`. The page runs one
/// top-up of the stream at a time.
#[wasm_bindgen]
pub struct Meter {
    stream: MeteredStream,
    channel: String,
    pending: Vec<StreamEvent>,
    /// The problem of the last top-up the stream asked for.
    problem: Option<Problem>,
    missing_receipt: bool,
}

#[wasm_bindgen]
impl Meter {
    /// Reads `chunk` after the stream's top-ups added `added_msat` in all (what
    /// `Session.streamTopUp` and `topUpAhead` added; also for a hand-over that failed).
    /// Returns what passes on to the reader (an SSE stream's payment events taken out); what
    /// to do next is in [`events`](Self::events).
    pub fn push(&mut self, chunk: &[u8], added_msat: f64) -> Vec<u8> {
        self.stream.top_ups_added(MilliSats::from_msat(added_msat.max(0.0) as u64));
        self.stream.push(chunk, &mut self.pending)
    }

    /// A byte stream before its first byte: pays ahead when the balance is already low.
    pub fn start(&mut self) {
        self.stream.ahead(&mut self.pending);
    }

    /// What to do, as JSON, since the last call: `[{"delivered": msat}, {"topUp": true,
    /// "capSat": n}, {"ahead": sat}, {"receipt": value, "boundMsat": n}]`. A top-up's
    /// problem stays here for `Session.streamTopUp(meter, capSat)`. The page runs one top-up
    /// of the stream at a time and skips the others.
    pub fn events(&mut self) -> String {
        let mut out = String::from("[");
        for event in self.pending.drain(..) {
            if out.len() > 1 {
                out.push(',');
            }
            match event {
                StreamEvent::Delivered(cost) => {
                    out += &format!(r#"{{"delivered":{}}}"#, cost.to_msat());
                }
                StreamEvent::TopUp { problem, cap } => {
                    self.problem = Some(problem);
                    out += &format!(r#"{{"topUp":true,"capSat":{}}}"#, cap.to_sat());
                }
                StreamEvent::TopUpAhead(amount) => {
                    out += &format!(r#"{{"ahead":{}}}"#, amount.to_sat());
                }
                StreamEvent::Receipt { value, bound } => {
                    let value = to_json(&String::from_utf8_lossy(&value));
                    out += &format!(r#"{{"receipt":{value},"boundMsat":{}}}"#, bound.to_msat());
                }
                _ => out += "null",
            }
        }
        out.push(']');
        out
    }

    /// The server ended the stream: what was held back. Then
    /// [`missing_receipt`](Self::missing_receipt) says whether an SSE stream ended without
    /// its receipt.
    pub fn finish(&mut self) -> Vec<u8> {
        let (rest, missing) = self.stream.finish();
        self.missing_receipt = missing;
        rest
    }

    /// Whether it is an SSE stream (else a byte stream).
    #[wasm_bindgen(getter, js_name = isSse)]
    pub fn is_sse(&self) -> bool {
        self.stream.is_sse()
    }

    /// Whether the server ended the stream.
    #[wasm_bindgen(getter)]
    pub fn finished(&self) -> bool {
        self.stream.finished()
    }

    /// Whether an SSE stream the server ended had no receipt.
    #[wasm_bindgen(getter, js_name = missingReceipt)]
    pub fn missing_receipt(&self) -> bool {
        self.missing_receipt
    }

    /// The channel the stream's request paid on.
    #[wasm_bindgen(getter)]
    pub fn channel(&self) -> String {
        self.channel.clone()
    }
}

/// A PSBT in base64 (BIP 174's text form).
fn read_psbt(base64_text: &str) -> Result<steps::Funding, JsError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_text.trim())
        .map_err(|_| error("the PSBT is not base64"))?;
    psbt::read(&bytes).map_err(|why| error(format!("the PSBT does not parse: {why}")))
}

/// The body of `POST …/fund` with the signed `funding` and `session`'s first payment; the
/// session keeps the funding as unacknowledged.
fn fund_body(
    session: &mut Session,
    proposal: u32,
    funding: Transaction,
) -> Result<String, JsError> {
    let payment = session.header().ok_or_else(|| error("no first payment"))?;
    let funding_tx = serialize_hex(&funding);
    session.channel.unacknowledged_funding = Some(funding);
    Ok(to_json(&FundRequest { proposal, funding_tx, payment }))
}

/// What [`Session::state`] saves: the channel (its transactions in consensus hex, which the
/// wasm reads and writes anyway; the Rust client's `ClientChannel` spells each one out field
/// by field, and reading that form would add ~7 KB gzip to the module), its key, and the
/// budget spent.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    channel: SavedChannel,
    /// The channel key K1 (hex). In IndexedDB: see the threat model in `docs/BROWSER.md`.
    key: String,
    /// Payments and fees spent with this channel, in satoshis.
    spent_sat: u64,
    /// The server's price table, when its terms publish one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prices: Option<serde_json::Value>,
    /// What the loss bound counted served on the channel, in msat: a load goes on from it
    /// (`LossBound::restore`), so a reload does not hand a lying server `maxPrepaidSat` more.
    #[serde(default)]
    counted_msat: u64,
    /// The channel's first payment, in satoshis: the loss bound's floor.
    #[serde(default)]
    first_sat: u64,
}

/// A `ClientChannel` as the page saves it: the same fields, transactions in consensus hex.
#[derive(Debug, Serialize, Deserialize)]
struct SavedChannel {
    channel: paychan::channel::Channel,
    refund: String,
    latest: Option<String>,
    server: String,
    retired: bool,
    closed: bool,
    funding_fee_sat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unacknowledged_funding: Option<String>,
}

impl SavedChannel {
    fn new(channel: &ClientChannel) -> Self {
        Self {
            channel: channel.channel.clone(),
            refund: serialize_hex(&channel.refund),
            latest: channel.latest.as_ref().map(serialize_hex),
            server: channel.server.clone(),
            retired: channel.retired,
            closed: channel.closed,
            funding_fee_sat: channel.funding_fee.to_sat(),
            unacknowledged_funding: channel.unacknowledged_funding.as_ref().map(serialize_hex),
        }
    }

    fn read(self) -> Result<ClientChannel, JsError> {
        let tx = |hex: &str| -> Result<Transaction, JsError> {
            deserialize_hex(hex).map_err(|_| error("saved channel: a transaction does not parse"))
        };
        let mut channel = ClientChannel::new(self.channel, 0, tx(&self.refund)?);
        channel.latest = self.latest.as_deref().map(tx).transpose()?;
        channel.server = self.server;
        channel.retired = self.retired;
        channel.closed = self.closed;
        channel.funding_fee = Amount::from_sat(self.funding_fee_sat);
        channel.unacknowledged_funding =
            self.unacknowledged_funding.as_deref().map(tx).transpose()?;
        Ok(channel)
    }
}

/// The payment a request carried, as [`Session::send`] gives it to the page.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Sent {
    header: String,
    prev: Option<String>,
    /// `Payment-Receipt-Unsigned`: the unsigned receipts held, and the most accepted.
    unsigned: String,
    paid_sat: u64,
}

/// A funded channel being paid on.
#[wasm_bindgen]
pub struct Session {
    channel: ClientChannel,
    key: SecretKey,
    policy: SpendingPolicy,
    bound: LossBound,
    /// Payments and fees spent with this channel.
    spent: Amount,
    /// Payments and fees spent with the client's other channels: with `spent`, what the
    /// policy's budget (`maxTotalSat`) counts.
    elsewhere: Amount,
    prices: Option<serde_json::Value>,
    /// What the server says it charged (balances, receipts), judged against the policy.
    charges: ChargeWatch,
    /// The channel's first payment (the loss bound's floor), saved with it.
    first: Amount,
}

impl Session {
    fn started(
        channel: ClientChannel,
        key: SecretKey,
        (policy, require_receipts): (&SpendingPolicy, bool),
        first: Amount,
        terms: &TermsDocument,
    ) -> Result<Session, JsError> {
        let mut bound = LossBound::new(policy);
        bound.start(channel.id(), first);
        let prices = (!terms.prices.is_null()).then(|| terms.prices.clone());
        bound.price_list(prices.as_ref().and_then(PriceList::from_terms));
        let spent = channel.funding_fee;
        let elsewhere = Amount::ZERO;
        let mut charges = ChargeWatch::new(policy).require_receipts(require_receipts);
        charges.watch_new(channel.id());
        let policy = policy.clone();
        Ok(Session { channel, key, policy, bound, spent, elsewhere, prices, charges, first })
    }

    /// Signs a payment of `total` to the server: the new latest payment.
    fn pay_to(&mut self, total: Amount) -> Result<(), JsError> {
        let paid = self.channel.paid();
        if total <= paid {
            return Err(error(format!("{total} is not more than the {paid} already paid")));
        }
        let channel = &self.channel.channel;
        let mut payment = channel.build_payment(total).map_err(error)?;
        channel.sign_payment(&mut payment, &self.key).map_err(error)?;
        self.channel.latest = Some(payment);
        self.spent = self.spent.checked_add(total - paid).unwrap_or(Amount::MAX);
        Ok(())
    }
}

#[wasm_bindgen]
impl Session {
    /// A channel saved by [`state`](Self::state), paid on under `policy` (JSON). The loss
    /// bound goes on from the count saved with it, its floor raised to what was paid less
    /// `maxPrepaidSat` (`LossBound::restore`): save the count soon after every answer.
    ///
    /// # Errors
    ///
    /// When `state` is not a saved session.
    pub fn load(state_json: &str, policy_json: &str) -> Result<Session, JsError> {
        Self::loaded(state_json, policy_json, None)
    }

    /// The channel saved by another context of the page (a tab, the Service Worker) that paid
    /// on it since this one last saved, with what this one counted and has not saved yet
    /// (`unsaved_msat`). That context saved its count with its payment, so the count goes on
    /// from it and this one's units: the floor is not raised to what was paid less
    /// `maxPrepaidSat`, as [`load`](Self::load) does after a reload (that would hand a lying
    /// server one more price each time two contexts take turns).
    ///
    /// # Errors
    ///
    /// When `state` is not a saved session.
    pub fn resync(
        state_json: &str,
        policy_json: &str,
        unsaved_msat: f64,
    ) -> Result<Session, JsError> {
        let unsaved = MilliSats::from_msat(unsaved_msat.max(0.0) as u64);
        Self::loaded(state_json, policy_json, Some(unsaved))
    }
}

impl Session {
    /// [`Session::load`], or [`Session::resync`] with `unsaved` counted here.
    fn loaded(
        state_json: &str,
        policy_json: &str,
        unsaved: Option<MilliSats>,
    ) -> Result<Session, JsError> {
        let saved: Saved = json(state_json, "saved channel")?;
        let (policy, require_receipts) = policy_and_receipts(policy_json)?;
        let key = secret(&saved.key)?;
        let channel = saved.channel.read()?;
        if channel.channel.params().client_key != public(&key) {
            return Err(error("the saved key is not the channel's client key"));
        }
        let mut bound = LossBound::new(&policy);
        let counted = MilliSats::from_msat(saved.counted_msat);
        let first = Amount::from_sat(saved.first_sat);
        match unsaved {
            // The floor stays the first payment (`restore` with nothing paid to lift it).
            Some(unsaved) => {
                bound.restore(channel.id(), Amount::ZERO, counted.saturating_add(unsaved), first);
            }
            None => bound.restore(channel.id(), channel.paid(), counted, first),
        }
        bound.price_list(saved.prices.as_ref().and_then(PriceList::from_terms));
        // A loaded channel is watched from the first balance the server reports (as the Rust
        // payer after a restart).
        let charges = ChargeWatch::new(&policy).require_receipts(require_receipts);
        Ok(Session {
            charges,
            first,
            spent: Amount::from_sat(saved.spent_sat),
            elsewhere: Amount::ZERO,
            channel,
            key,
            policy,
            bound,
            prices: saved.prices,
        })
    }
}

#[wasm_bindgen]
impl Session {
    /// What to save (JSON), before any header this session returned leaves the page.
    pub fn state(&self) -> String {
        to_json(&Saved {
            channel: SavedChannel::new(&self.channel),
            key: self.key.secret_bytes().to_lower_hex_string(),
            spent_sat: self.spent.to_sat(),
            prices: self.prices.clone(),
            counted_msat: self.bound.counted().to_msat(),
            first_sat: self.first.to_sat(),
        })
    }

    /// The channel's id (`txid:vout`).
    #[wasm_bindgen(getter)]
    pub fn id(&self) -> String {
        self.channel.id().to_string()
    }

    /// The server's origin.
    #[wasm_bindgen(getter)]
    pub fn server(&self) -> String {
        self.channel.server.clone()
    }

    /// The `Payment-Channel` header of the latest payment.
    pub fn header(&self) -> Option<String> {
        self.channel.header()
    }

    /// What the latest payment pays the server, in satoshis.
    #[wasm_bindgen(getter, js_name = paidSat)]
    pub fn paid_sat(&self) -> f64 {
        self.channel.paid().to_sat() as f64
    }

    /// The channel's value, in satoshis.
    #[wasm_bindgen(getter, js_name = valueSat)]
    pub fn value_sat(&self) -> f64 {
        self.channel.channel.params().value.to_sat() as f64
    }

    /// Payments and fees spent with this channel, in satoshis.
    #[wasm_bindgen(getter, js_name = spentSat)]
    pub fn spent_sat(&self) -> f64 {
        self.spent.to_sat() as f64
    }

    /// Payments and fees spent with the client's other channels, in satoshis: set it after
    /// [`load`](Self::load), for the policy's budget.
    #[wasm_bindgen(getter, js_name = spentElsewhereSat)]
    pub fn spent_elsewhere_sat(&self) -> f64 {
        self.elsewhere.to_sat() as f64
    }

    /// Sets [`spent_elsewhere_sat`](Self::spent_elsewhere_sat).
    ///
    /// # Errors
    ///
    /// When `sat` is not a whole number of satoshis.
    #[wasm_bindgen(setter, js_name = spentElsewhereSat)]
    pub fn set_spent_elsewhere_sat(&mut self, sat: f64) -> Result<(), JsError> {
        self.elsewhere = self::sat(sat, "spentElsewhereSat")?;
        Ok(())
    }

    /// What the client counted served on the channel, in millisatoshis (the loss bound's
    /// count).
    #[wasm_bindgen(getter, js_name = countedMsat)]
    pub fn counted_msat(&self) -> f64 {
        self.bound.counted().to_msat() as f64
    }

    /// Whether the channel is retired (closed, or refused by the server).
    #[wasm_bindgen(getter)]
    pub fn retired(&self) -> bool {
        self.channel.retired
    }

    /// Whether the channel's money is back or settled.
    #[wasm_bindgen(getter)]
    pub fn closed(&self) -> bool {
        self.channel.closed
    }

    /// Stops paying on the channel (its refund is kept): the server did not acknowledge the
    /// funding, or refused the channel.
    pub fn retire(&mut self) {
        self.channel.retired = true;
    }

    /// The server acknowledged the funding (`POST …/fund` answered 2xx).
    pub fn funded(&mut self) {
        self.channel.unacknowledged_funding = None;
    }

    /// The signed funding (hex) while the server has not acknowledged it.
    #[wasm_bindgen(getter, js_name = unacknowledgedFunding)]
    pub fn unacknowledged_funding(&self) -> Option<String> {
        self.channel.unacknowledged_funding.as_ref().map(serialize_hex)
    }

    /// The payment the next request carries, as JSON `{"header", "prev", "unsigned",
    /// "paidSat"}`: send `header` as `Payment-Channel`, `prev` (when not `null`) as
    /// `Payment-Receipt-Prev`, the receipt the server's receipt links to, and `unsigned` as
    /// `Payment-Receipt-Unsigned` (the server may sign in batches); give `paidSat` and `prev` back to
    /// [`answered`](Self::answered). `undefined` before the first payment.
    ///
    /// # Errors
    ///
    /// When the server charged more than the policy allows or signed a receipt that does not
    /// verify or add up: it is paid no more.
    pub fn send(&mut self) -> Result<Option<String>, JsError> {
        self.charges.check().map_err(error)?;
        let Some(header) = self.channel.header() else { return Ok(None) };
        let id = self.channel.id();
        self.charges.note_send(id);
        let prev = self.charges.latest_receipt_digest(id).map(|d| d.to_lower_hex_string());
        let unsigned = self.charges.unsigned_receipts(id).to_string();
        Ok(Some(to_json(&Sent { header, prev, unsigned, paid_sat: self.channel.paid().to_sat() })))
    }

    /// The server answered `method path`, sent with the payment of `paid_sat` linking to the
    /// receipt `prev` (both from [`send`](Self::send)), with `status`, its
    /// `Payment-Channel-Balance` header `balance` and its `Payment-Receipt` header `receipt`
    /// (each `undefined` when absent). Counts a served, priced request (the loss bound's
    /// count), checks the balance and the receipt (the [`ChargeWatch`] of the Rust client).
    /// Returns why the server is paid no more, or `undefined`.
    ///
    /// # Errors
    ///
    /// When `paid_sat` or `prev` are not what `send` returned.
    #[allow(clippy::too_many_arguments)]
    pub fn answered(
        &mut self,
        paid_sat: f64,
        prev: Option<String>,
        method: &str,
        path: &str,
        status: u16,
        balance: Option<String>,
        receipt: Option<String>,
    ) -> Result<Option<String>, JsError> {
        let id = self.channel.id();
        let payment = self.sent_payment(paid_sat)?;
        let prev = hex32(prev)?;
        let trusted = self.charges.check().is_ok();
        // A malformed balance is no balance (as the Rust client).
        let balance = balance.and_then(|b| b.trim().parse().ok()).map(MilliSats::from_msat);
        let metered = balance.is_some() || receipt.is_some();
        let counted = self.bound.served(id, method, path, status, metered).is_some();
        match receipt {
            // A replayed answer (neither counted nor with a balance) charged nothing now.
            Some(receipt) if balance.is_some() || counted => {
                let request = (method, path);
                let _checked =
                    self.charges.note_receipt(&payment, receipt.as_bytes(), request, prev);
            }
            Some(_) => {}
            None if counted => {
                self.charges.note_missing_receipt("a paid answer without a receipt");
            }
            None => {}
        }
        if let Some(balance) = balance {
            let current = self.channel.paid() == payment.paid;
            self.charges.note_answer(&payment, balance, current);
        }
        Ok(match self.charges.check() {
            Err(why) if trusted => Some(why.to_string()),
            _ => None,
        })
    }

    /// A metered stream answered a request paid on this channel: its `Payment-Channel-Stream`
    /// header `unit`, its `Content-Type` and its `Payment-Channel-Balance` (msat). A [`Meter`]
    /// that follows it as the page reads, or `undefined` when it is not a stream the client
    /// accepts (a unit price beyond `maxPerRequestMsat`, SSE without `text/event-stream`):
    /// such a body is read as it is.
    pub fn meter(
        &mut self,
        unit: Option<String>,
        content_type: Option<String>,
        balance_msat: Option<f64>,
    ) -> Option<Meter> {
        let balance = balance_msat.filter(|m| m.is_finite() && *m >= 0.0);
        let balance = balance.map(|m| MilliSats::from_msat(m as u64));
        let stream =
            MeteredStream::new(unit.as_deref(), content_type.as_deref(), &self.policy, balance)?;
        self.charges.stream_started();
        let channel = self.channel.id().to_string();
        Some(Meter { stream, channel, pending: Vec::new(), problem: None, missing_receipt: false })
    }

    /// A metered stream on the channel delivered units worth `cost_msat` (the page's count,
    /// from [`Meter::push`]): counted in the loss bound and the charge watch.
    pub fn streamed(&mut self, cost_msat: f64) {
        let cost = MilliSats::from_msat(cost_msat.max(0.0) as u64);
        let id = self.channel.id();
        self.bound.streamed(id, cost);
        self.charges.note_streamed(id, cost);
    }

    /// A metered stream on the channel ended: `early` when the page stopped reading before
    /// the server ended it (its unread units are allowed once per channel), `missing_receipt`
    /// when an SSE stream ended without its receipt. Returns why the server is paid no more,
    /// or `undefined`.
    #[wasm_bindgen(js_name = streamEnded)]
    pub fn stream_ended(&mut self, early: bool, missing_receipt: bool) -> Option<String> {
        let trusted = self.charges.check().is_ok();
        self.charges.stream_ended(self.channel.id(), early);
        if missing_receipt {
            self.charges.note_missing_receipt("a metered stream that ended without a receipt");
        }
        match self.charges.check() {
            Err(why) if trusted => Some(why.to_string()),
            _ => None,
        }
    }

    /// The last `payment-required` event of `meter`'s stream on this channel, adding at most
    /// `cap_sat` ([`Meter::events`] gives it): the top-up, as for a 402, within the policy and
    /// the loss bound. Returns the new `Payment-Channel` header to hand over on the payment
    /// endpoint (save `state()` first), with what it added: `{"header", "addedSat"}`.
    ///
    /// # Errors
    ///
    /// When the policy or the bound refuses, or the event is not a top-up request of this
    /// channel.
    #[wasm_bindgen(js_name = streamTopUp)]
    pub fn stream_top_up(&mut self, meter: &Meter, cap_sat: f64) -> Result<String, JsError> {
        self.charges.check().map_err(error)?;
        if meter.channel != self.channel.id().to_string() {
            return Err(error("the stream paid on another channel"));
        }
        let problem = meter.problem.clone().ok_or_else(|| error("the stream asked for nothing"))?;
        if let Some(price) = problem.price_msat {
            self.policy.check_price(price).map_err(error)?;
        }
        let id = self.channel.id();
        let snapshot = match &problem.channel {
            Some(snapshot)
                if problem.code == ProblemCode::InsufficientBalance
                    && snapshot.channel == id
                    && snapshot.min_server_amount_sat.is_some() =>
            {
                steps::quoted(*snapshot.clone(), &problem)
            }
            _ => return Err(error("not a top-up request of this channel")),
        };
        let before = self.channel.paid();
        let cap = sat(cap_sat, "cap")?;
        if cap == Amount::ZERO {
            // No room: only the latest payment, handed over again (an earlier hand-over may
            // have failed), adding nothing.
            return Ok(format!(r#"{{"header":{},"addedSat":0}}"#, to_json(&self.header())));
        }
        self.top_up(&snapshot, Some(cap))?;
        let added = self.channel.paid() - before;
        Ok(format!(r#"{{"header":{},"addedSat":{}}}"#, to_json(&self.header()), added.to_sat()))
    }

    /// A metered stream's closing receipt (`value`, the event's data) for `method path`,
    /// sent with the payment of `paid_sat` linking to `prev` (from [`send`](Self::send)); it
    /// may state at most `bound_msat` ([`Meter::push`] gives it). Returns why the server is
    /// paid no more, or `undefined`.
    ///
    /// # Errors
    ///
    /// When `paid_sat` or `prev` are not what `send` returned.
    #[wasm_bindgen(js_name = streamReceipt)]
    #[allow(clippy::too_many_arguments)]
    pub fn stream_receipt(
        &mut self,
        paid_sat: f64,
        prev: Option<String>,
        method: &str,
        path: &str,
        value: &str,
        bound_msat: f64,
    ) -> Result<Option<String>, JsError> {
        let payment = self.sent_payment(paid_sat)?;
        let prev = hex32(prev)?;
        let bound = MilliSats::from_msat(bound_msat.max(0.0) as u64);
        let request = (method, path);
        Ok(self
            .charges
            .note_stream_receipt(&payment, value.as_bytes(), request, prev, bound)
            .err()
            .map(|why| why.to_string()))
    }

    /// The latest receipt the server signed and this session verified (JSON, the wire form
    /// of `docs/HTTP.md`): proof of what the channel had been charged when it was issued.
    #[wasm_bindgen(getter, js_name = latestReceipt)]
    pub fn latest_receipt(&self) -> Option<String> {
        self.charges.latest_signed_receipt().map(to_json)
    }

    /// Receipts verified on the channel since it was opened or loaded.
    #[wasm_bindgen(getter)]
    pub fn receipts(&self) -> f64 {
        self.charges.receipts() as f64
    }

    /// The server answered `method path` with a 402 whose body is `problem_json`. Returns
    /// what to do, as JSON: `{"do":"retry","header":…}` after a top-up (save `state()` first,
    /// then send again with the header), `{"do":"open"}` when the server no longer knows
    /// the channel (open a new one), or `{"do":"retry","header":…}` with the latest payment
    /// when it already pays enough.
    ///
    /// # Errors
    ///
    /// When the policy or the loss bound refuses, or the problem is not one a payment fixes.
    #[wasm_bindgen(js_name = paymentRequired)]
    pub fn payment_required(
        &mut self,
        method: &str,
        path: &str,
        problem_json: &str,
    ) -> Result<String, JsError> {
        self.charges.check().map_err(error)?;
        let problem: Problem = json(problem_json, "402 problem")?;
        if let Some(price) = problem.price_msat {
            self.policy.check_price(price).map_err(error)?;
            self.bound.quote(method, path, price);
        }
        let id = self.channel.id();
        let snapshot = problem
            .channel
            .as_deref()
            .filter(|s| s.channel == id && s.min_server_amount_sat.is_some())
            .cloned();
        match (&problem.code, snapshot) {
            (ProblemCode::InsufficientBalance, Some(snapshot)) => {
                let snapshot: ChannelSnapshot = steps::quoted(snapshot, &problem);
                self.top_up(&snapshot, None)?;
                Ok(format!(r#"{{"do":"retry","header":{}}}"#, to_json(&self.header())))
            }
            (
                ProblemCode::InsufficientBalance
                | ProblemCode::UnknownChannel
                | ProblemCode::ChannelNotOpen
                | ProblemCode::ChannelClosing,
                _,
            ) => {
                self.channel.retired = true;
                Ok(r#"{"do":"open"}"#.to_owned())
            }
            _ => Err(error(format!(
                "the server refused ({} {}): {}",
                problem.status, problem.code, problem.detail
            ))),
        }
    }

    /// Pays `amount_sat` more ahead of any request, as far as the loss bound allows. Returns
    /// the new header, or `undefined` when the bound allows nothing more. Save `state()` first.
    ///
    /// # Errors
    ///
    /// When the policy refuses.
    #[wasm_bindgen(js_name = topUpAhead)]
    pub fn top_up_ahead(&mut self, amount_sat: f64) -> Result<Option<String>, JsError> {
        self.charges.check().map_err(error)?;
        let paid = self.channel.paid();
        let target = paid.checked_add(sat(amount_sat, "amount")?).unwrap_or(Amount::MAX);
        let target = target.min(self.channel.channel.params().max_server_amount());
        let before = self.channel.paid();
        self.pay_within_bound(target, Ask::AHEAD)?;
        Ok((self.channel.paid() > before).then(|| self.header()).flatten())
    }

    /// The body of `POST terms.endpoints.close` (JSON): a fair settlement at `spent_msat` (what
    /// the server reported spent: its balance header, a receipt, or the channel's snapshot),
    /// or none (the close at the latest payment) when it is `undefined`.
    ///
    /// # Errors
    ///
    /// When the key does not sign.
    #[wasm_bindgen(js_name = closeRequest)]
    pub fn close_request(&self, spent_msat: Option<f64>) -> Result<String, JsError> {
        let spent = spent_msat
            .filter(|m| m.is_finite() && *m >= 0.0)
            .map(|m| MilliSats::from_msat(m as u64));
        let fair = self.fair(spent)?;
        let prev = self.charges.latest_receipt_digest(self.channel.id());
        Ok(to_json(&CloseRequest {
            fair_payment: fair.as_ref().map(wire::encode_payment),
            // The close's receipt links to the latest receipt held (see `check_close`).
            prev: prev.map(|prev| prev.to_lower_hex_string()),
        }))
    }

    /// Checks the server's answer to the close (JSON), sent to `path` with
    /// [`close_request`](Self::close_request)`(spent_msat)`: the settlement must be one of
    /// this client's payments that pays no more than the latest. The close's signed receipt,
    /// when there is one, is judged as any receipt (a bad one: the server is paid no more; the
    /// close stands) and becomes the latest proof. Retires the channel (marked closed when the
    /// page sees the settlement on chain). Returns `{txid, serverSat, clientSat, feeSat}`.
    ///
    /// # Errors
    ///
    /// When the settlement is not the client's.
    #[wasm_bindgen(js_name = checkClose)]
    pub fn check_close(
        &mut self,
        answer_json: &str,
        spent_msat: Option<f64>,
        path: Option<String>,
    ) -> Result<String, JsError> {
        let answer: CloseResponse = json(answer_json, "close answer")?;
        let close: Transaction =
            deserialize_hex(&answer.close_tx).map_err(|_| error("close: no close_tx"))?;
        if close.compute_txid() != answer.txid {
            return Err(error("the server misbehaved: the settlement's txid does not match"));
        }
        let spent = spent_msat
            .filter(|m| m.is_finite() && *m >= 0.0)
            .map(|m| MilliSats::from_msat(m as u64));
        let fair = self.fair(spent)?;
        let latest = self.channel.latest.as_ref().ok_or_else(|| error("no payment yet"))?;
        let settlement =
            steps::check_settlement(&self.channel.channel, latest, fair.as_ref(), &close)
                .map_err(error)?;
        if let (Some(receipt), Some(path)) = (&answer.receipt, path) {
            // The proof the close carried: the latest payment.
            let payment = self.sent_payment(self.channel.paid().to_sat() as f64)?;
            let prev = self.charges.latest_receipt_digest(payment.channel);
            let value = receipt.encode();
            let _verdict_kept =
                self.charges.note_close_receipt(&payment, value.as_bytes(), &path, prev);
        }
        self.channel.retired = true;
        Ok(format!(
            r#"{{"txid":"{}","serverSat":{},"clientSat":{},"feeSat":{}}}"#,
            answer.txid,
            settlement.server_amount.to_sat(),
            settlement.client_amount.to_sat(),
            settlement.fee.to_sat()
        ))
    }

    /// The channel's money is back or settled (the settlement or the refund is on chain).
    #[wasm_bindgen(js_name = markClosed)]
    pub fn mark_closed(&mut self) {
        self.channel.retired = true;
        self.channel.closed = true;
    }

    /// The fully signed refund (hex): valid once the chain reaches
    /// [`refund_height`](Self::refund_height); broadcast it with any node or explorer.
    #[wasm_bindgen(js_name = refundTx)]
    pub fn refund_tx(&self) -> String {
        serialize_hex(&self.channel.refund)
    }

    /// The height from which the refund can be mined (the channel's lock time).
    #[wasm_bindgen(getter, js_name = refundHeight)]
    pub fn refund_height(&self) -> u32 {
        self.channel.channel.params().expiry.to_consensus_u32()
    }

    /// The funding output (`txid:vout`), the channel's id.
    #[wasm_bindgen(getter)]
    pub fn outpoint(&self) -> String {
        self.channel.channel.outpoint().to_string()
    }

    /// What the latest payment pays the server, from its transaction: for checks.
    #[wasm_bindgen(js_name = latestServerSat)]
    pub fn latest_server_sat(&self) -> f64 {
        self.channel.latest.as_ref().map_or(0, |tx| server_amount(tx).to_sat()) as f64
    }
}

impl Session {
    /// The payment of `paid_sat` on this channel, as the charge watch judges its answers.
    fn sent_payment(&self, paid_sat: f64) -> Result<SentPayment, JsError> {
        let server_key = self.channel.channel.params().server_key.0;
        Ok(SentPayment::new(self.channel.id(), sat(paid_sat, "paidSat")?, server_key))
    }

    /// What the policy's budget counts: this channel's payments and fees, and the others'.
    fn budget_spent(&self) -> Amount {
        self.spent.checked_add(self.elsewhere).unwrap_or(Amount::MAX)
    }

    /// The top-up `snapshot` asks for (adding at most `cap`), as the policy and the loss bound
    /// allow.
    fn top_up(&mut self, snapshot: &ChannelSnapshot, cap: Option<Amount>) -> Result<(), JsError> {
        let (paid, spent) = (self.channel.paid(), self.budget_spent());
        let top_up = steps::top_up(&self.policy, &self.channel.channel, paid, spent, snapshot, cap)
            .map_err(error)?;
        match top_up {
            Some((target, ask)) => self.pay_within_bound(target, ask),
            None => Ok(()),
        }
    }

    fn pay_within_bound(&mut self, target: Amount, ask: Ask) -> Result<(), JsError> {
        let id: ChannelId = self.channel.id();
        let (paid, spent) = (self.channel.paid(), self.budget_spent());
        match steps::next_payment(&self.policy, &self.bound, id, paid, spent, target, ask) {
            Ok(Some(target)) => self.pay_to(target),
            Ok(None) => Ok(()),
            Err(StepError::Bound(exceeded)) => Err(error(format!("loss bound: {exceeded}"))),
            Err(e) => Err(error(e)),
        }
    }

    fn fair(&self, spent: Option<MilliSats>) -> Result<Option<Transaction>, JsError> {
        steps::fair_settlement(
            &self.channel.channel,
            self.channel.latest.as_ref(),
            &self.key,
            spent,
        )
        .map_err(error)
    }
}
