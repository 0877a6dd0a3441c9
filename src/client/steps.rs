//! The payer's decisions, with no I/O: what to open, whether the server's proposal is the one
//! asked for, what to pay on a 402, whether a payment stays within the loss bound, what a fair
//! close pays and whether the server's settlement is the client's.
//!
//! Both clients drive these same functions: the Rust [`Payer`](super::Payer) (tokio, a
//! transport, a [`ClientStore`](super::ClientStore)) and the browser client (`web/`: `fetch`,
//! IndexedDB). They build without the crate's `runtime` feature, for `wasm32-unknown-unknown`.
//! The I/O between them (fetching the terms, the tip, saving before a payment leaves) is the
//! driver's; the order is in `docs/BROWSER.md` and [`Payer::open_via`](super::Payer::open_via).

use core::fmt;

use bitcoin::absolute::LockTime;
use bitcoin::secp256k1::SecretKey;
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, CompressedPublicKey, FeeRate, Network, OutPoint, Psbt, ScriptBuf, Sequence,
    Transaction, TxIn, TxOut, Weight, Witness,
};

use super::{BoundExceeded, LossBound, PolicyRefusal, SpendingPolicy};
use crate::MilliSats;
use crate::channel::{
    ChainTip, Channel, ChannelParams, SignError, is_standard_payout, server_amount,
};
use crate::wire::{ChannelId, ChannelSnapshot, OpenResponse, Problem, TermsDocument};

/// How far the server's reported tip may be from the client's own (blocks propagate in
/// seconds; six blocks is an hour of disagreement).
pub const MAX_TIP_SKEW: u32 = 6;

/// The lifetime a client asks for when it is not told one: 1 008 blocks, about a week.
pub const DEFAULT_LIFETIME_BLOCKS: u32 = 1_008;

/// Why a step refused: the policy, the server, or the loss bound.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepError {
    /// The spending policy refused.
    Policy(PolicyRefusal),
    /// The server answered something the protocol does not allow.
    Misbehaved(Misbehavior),
    /// The payment would pay the server more than the loss bound allows.
    Bound(BoundExceeded),
    /// Input `input` of a funding is not a coin of the signing key, or has no
    /// `witness_utxo`.
    NotOurCoin {
        /// The input's index.
        input: usize,
    },
    /// The server charged more than the policy allows: `charged` since the client started
    /// watching the channel, `allowed` by then (see [`ChargeWatch`](super::charges::ChargeWatch)).
    Overcharged {
        /// What the server's reports say it charged.
        charged: MilliSats,
        /// What the policy allowed for the requests sent.
        allowed: MilliSats,
    },
    /// A funding PSBT from a wallet that cannot fund the channel: why.
    InvalidFunding(&'static str),
    /// The coins cannot pay the funding output and its fee.
    InsufficientFunds {
        /// What the coins hold.
        available: Amount,
        /// The funding output's value (the fee comes on top).
        needed: Amount,
    },
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Policy(refusal) => write!(f, "the spending policy refused: {refusal}"),
            Self::Misbehaved(what) => write!(f, "the server misbehaved: {what}"),
            Self::Bound(exceeded) => exceeded.fmt(f),
            Self::NotOurCoin { input } => {
                write!(f, "funding input {input} is not a P2WPKH coin of the signing key")
            }
            Self::Overcharged { charged, allowed } => write!(
                f,
                "the server charged {charged}, more than the {allowed} the policy allows for the \
                 requests sent: paying it no more"
            ),
            Self::InvalidFunding(why) => {
                write!(f, "the funding PSBT cannot fund the channel: {why}")
            }
            Self::InsufficientFunds { available, needed } => {
                write!(f, "insufficient funds: {available} cannot pay {needed} and the fee")
            }
        }
    }
}

impl std::error::Error for StepError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Policy(refusal) => Some(refusal),
            Self::Misbehaved(_)
            | Self::Overcharged { .. }
            | Self::NotOurCoin { .. }
            | Self::InvalidFunding(_)
            | Self::InsufficientFunds { .. } => None,
            Self::Bound(exceeded) => Some(exceeded),
        }
    }
}

impl From<PolicyRefusal> for StepError {
    fn from(refusal: PolicyRefusal) -> Self {
        Self::Policy(refusal)
    }
}

/// What a server did that the protocol does not allow: its [`kind`](Self::kind), for
/// programs, and the details, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Misbehavior {
    /// What kind of misbehaviour.
    pub kind: MisbehaviorKind,
    /// What exactly (for logs).
    pub detail: String,
}

impl Misbehavior {
    pub(crate) fn new(kind: MisbehaviorKind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }
}

impl fmt::Display for Misbehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The kinds of [`Misbehavior`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MisbehaviorKind {
    /// The terms are for another network.
    WrongNetwork,
    /// The terms cannot be used: inverted bounds, a fee rate or script that does not parse.
    InvalidTerms,
    /// The server's tip is too far from the client's own chain view.
    TipSkew,
    /// The proposal differs from the request or the terms, or does not parse.
    ProposalMismatch,
    /// An endpoint of the terms is not a path on the server's origin.
    ForeignEndpoint,
    /// An answer that is not the document the protocol specifies.
    InvalidAnswer,
    /// The settlement of a close is not the client's latest payment.
    WrongSettlement,
    /// A receipt that does not verify under the channel's server key, is for another
    /// request or payment, charges beyond the policy, or does not add up with the others.
    BadReceipt,
}

fn misbehaved(kind: MisbehaviorKind, detail: impl Into<String>) -> StepError {
    StepError::Misbehaved(Misbehavior::new(kind, detail))
}

/// What the client will open, from the server's terms: the channel's value and lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenPlan {
    /// The channel's value: the one asked for (the policy's `max_channel_value` when none
    /// is), within the terms' bounds.
    pub value: Amount,
    /// The channel's lifetime in blocks: the one asked for, within the terms' bounds.
    pub lifetime: u32,
}

/// Checks the server's `terms` for a channel on `network` under `policy`, and plans the
/// channel: `value` (or the policy's `max_channel_value`) and `lifetime` blocks, moved into
/// the terms' bounds; `automatic` when the client opens by itself on a 402.
///
/// # Errors
///
/// [`StepError::Misbehaved`] for terms of another network or with inverted bounds,
/// [`StepError::Policy`] when the value or the lifetime is beyond the policy.
pub fn plan_open(
    terms: &TermsDocument,
    network: Network,
    policy: &SpendingPolicy,
    value: Option<Amount>,
    lifetime: u32,
    automatic: bool,
) -> Result<OpenPlan, StepError> {
    if terms.network != network.to_core_arg() {
        return Err(misbehaved(
            MisbehaviorKind::WrongNetwork,
            format!("the server is on {}, the client on {}", terms.network, network.to_core_arg()),
        ));
    }
    let value = value
        .unwrap_or(policy.max_channel_value())
        .min(Amount::from_sat(terms.max_value_sat))
        .max(Amount::from_sat(terms.min_value_sat));
    policy.check_open(value, automatic)?;
    let bounds = terms.lifetime_blocks;
    if bounds.min > bounds.max {
        return Err(misbehaved(
            MisbehaviorKind::InvalidTerms,
            "terms: lifetime_blocks.min is above max",
        ));
    }
    let lifetime = lifetime.clamp(bounds.min, bounds.max);
    policy.check_lifetime(lifetime)?;
    Ok(OpenPlan { value, lifetime })
}

/// Checks one more automatic opening against the policy's `max_opens`, when `recent`
/// channels were opened automatically with this server within its period (the caller keeps
/// the times: a monotonic clock in the Rust client, the page's in the browser).
///
/// # Errors
///
/// [`StepError::Policy`] ([`PolicyRefusal::TooManyOpens`]).
pub fn check_opens(policy: &SpendingPolicy, recent: usize) -> Result<(), StepError> {
    let (count, period) = policy.max_opens();
    if recent >= count as usize {
        return Err(PolicyRefusal::TooManyOpens { count, period }.into());
    }
    Ok(())
}

/// Checks the server's tip in its terms against the client's `own`: at most
/// [`MAX_TIP_SKEW`] blocks apart. The lock time counts from the client's own tip.
///
/// # Errors
///
/// [`StepError::Misbehaved`] ([`MisbehaviorKind::TipSkew`]).
pub fn check_tip(terms: &TermsDocument, own: ChainTip) -> Result<(), StepError> {
    if own.height.abs_diff(terms.tip.height) > MAX_TIP_SKEW {
        return Err(misbehaved(
            MisbehaviorKind::TipSkew,
            format!(
                "the server's tip {} is more than {MAX_TIP_SKEW} blocks from the client's {}",
                terms.tip.height, own.height
            ),
        ));
    }
    Ok(())
}

/// The first payment of a new channel: the server output's dust threshold, within the
/// policy's budget given what the client already `spent` (payments and fees).
///
/// # Errors
///
/// [`StepError::Misbehaved`] when the terms' `server_script` is not hex,
/// [`StepError::Policy`] when the budget is spent.
pub fn first_payment(
    terms: &TermsDocument,
    policy: &SpendingPolicy,
    spent: Amount,
) -> Result<Amount, StepError> {
    let script = ScriptBuf::from_hex(&terms.server_script)
        .map_err(|_| misbehaved(MisbehaviorKind::InvalidTerms, "server_script is not hex"))?;
    let first = script.minimal_non_dust();
    policy.check_spend(spent, first)?;
    Ok(first)
}

/// Checks the server's `proposal` field by field against what the client asked (`client_key`,
/// `value`, `expiry`, `client_script`), the `terms` and the client's `tip`, and returns the
/// agreed parameters.
///
/// # Errors
///
/// [`StepError::Misbehaved`] ([`MisbehaviorKind::ProposalMismatch`]) naming the first field
/// that differs.
pub fn check_proposal(
    proposal: &OpenResponse,
    terms: &TermsDocument,
    tip: ChainTip,
    client_key: CompressedPublicKey,
    value: Amount,
    expiry: u32,
    client_script: &ScriptBuf,
) -> Result<ChannelParams, StepError> {
    use MisbehaviorKind::ProposalMismatch as Mismatch;
    let hex_script = |hex: &str, what: &str| {
        ScriptBuf::from_hex(hex).map_err(|_| misbehaved(Mismatch, format!("{what} is not hex")))
    };
    let server_key: CompressedPublicKey =
        proposal.server_pubkey.parse().map_err(|_| misbehaved(Mismatch, "server_pubkey"))?;
    let server_script = hex_script(&proposal.server_script, "server_script")?;
    let rate =
        |sat: u64| FeeRate::from_sat_per_vb(sat).ok_or_else(|| misbehaved(Mismatch, "fee rate"));
    let params = ChannelParams {
        client_key,
        server_key,
        value,
        expiry: LockTime::from_height(expiry).map_err(|_| misbehaved(Mismatch, "expiry"))?,
        client_script: client_script.clone(),
        server_script,
        min_fee_rate: rate(proposal.min_fee_rate_sat_per_vb)?,
        max_fee_rate: rate(proposal.max_fee_rate_sat_per_vb)?,
        close_margin: proposal.close_margin,
    };
    let checks = [
        (proposal.value_sat == value.to_sat(), "value_sat differs from the request"),
        (proposal.expiry == expiry, "expiry differs from the request"),
        (hex_script(&proposal.client_script, "client_script")? == *client_script, "client_script"),
        (proposal.server_script == terms.server_script, "server_script differs from the terms"),
        (is_standard_payout(&params.server_script), "server_script is not a standard payout"),
        (server_key != client_key, "server_pubkey is the client's key"),
        (params.min_fee_rate <= params.max_fee_rate, "fee rates"),
        (
            proposal.close_margin < expiry.saturating_sub(tip.height),
            "close_margin exceeds the channel's lifetime",
        ),
        (
            hex_script(&proposal.witness_script, "witness_script")? == params.witness_script(),
            "witness_script is not 2 K1 K2 2 CHECKMULTISIG",
        ),
        (
            hex_script(&proposal.funding_script_pubkey, "funding_script_pubkey")?
                == params.funding_script_pubkey(),
            "funding_script_pubkey",
        ),
        (proposal.refund_fee_sat == params.refund_fee().to_sat(), "refund_fee_sat"),
    ];
    match checks.into_iter().find(|(ok, _)| !ok) {
        Some((_, what)) => Err(misbehaved(Mismatch, format!("open: {what}"))),
        None => Ok(params),
    }
}

/// What a payment is for, for the loss bound: the price of the request that waits for it
/// (zero ahead of any request), the least the server asks, and what it claims spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ask {
    /// The price of the request that waits for the payment.
    pub price: MilliSats,
    /// The least the server asks the payment to pay it, if it asks.
    pub min: Option<Amount>,
    /// What the server claims was spent on the channel, if it says.
    pub claimed: Option<MilliSats>,
}

impl Ask {
    /// A top-up ahead of any request: as much as the bound allows, no least.
    pub const AHEAD: Self = Self { price: MilliSats::ZERO, min: None, claimed: None };

    /// A payment for a request of `price`, of which the server asks at least `min`, claiming
    /// `claimed` spent.
    pub const fn new(price: MilliSats, min: Option<Amount>, claimed: Option<MilliSats>) -> Self {
        Self { price, min, claimed }
    }
}

/// `snapshot` with the price of the refused request as `problem` quotes it, when it quotes
/// less: the loss bound's "one price" is the quote, not a higher figure in the snapshot.
pub fn quoted(mut snapshot: ChannelSnapshot, problem: &Problem) -> ChannelSnapshot {
    if let Some(price) = problem.price_msat {
        snapshot.price_msat = snapshot.price_msat.min(price);
    }
    snapshot
}

/// The top-up a 402 `insufficient-balance` asks for, from the server's `snapshot` of a
/// channel `channel` that pays `paid` today, when the client already `spent` that much in
/// all (payments and fees): what the next payment pays the server, and what it is for. With
/// `cap`, it adds at most `cap` to what the channel pays. `None` when the snapshot asks for
/// nothing.
///
/// The target prefers the server's suggestion, within the policy's `max_prepaid` beyond
/// the request's need, its budget, and the channel's value; never below the server's least.
///
/// # Errors
///
/// [`StepError::Policy`] when the price or the least asked is beyond the policy.
pub fn top_up(
    policy: &SpendingPolicy,
    channel: &Channel,
    paid: Amount,
    spent: Amount,
    snapshot: &ChannelSnapshot,
    cap: Option<Amount>,
) -> Result<Option<(Amount, Ask)>, StepError> {
    policy.check_price(snapshot.price_msat)?;
    let Some(min) = snapshot.min_server_amount_sat else { return Ok(None) };
    let suggested = snapshot.suggested_server_amount_sat.unwrap_or(min);
    // A hard bound, whatever the server reports: this request's price and the prepaid
    // allowance on top of what was paid (an honest minimum is at most paid + price).
    let most = paid
        .checked_add(snapshot.price_msat.to_sat_ceil())
        .and_then(|need| need.checked_add(policy.max_prepaid()))
        .unwrap_or(Amount::MAX);
    let most = match cap {
        Some(cap) => most.min(paid.checked_add(cap).unwrap_or(Amount::MAX)),
        None => most,
    };
    if min > most {
        return Err(PolicyRefusal::TopUpTooLarge { asked: min, max: most }.into());
    }
    // Never prepay more than the policy allows beyond what this request needs.
    let bound = snapshot
        .spent_msat
        .checked_add(snapshot.price_msat)
        .map_or(Amount::MAX, MilliSats::to_sat_ceil)
        .checked_add(policy.max_prepaid())
        .unwrap_or(Amount::MAX);
    // Within the budget, prefer the suggestion; the minimum is the least that works.
    let room = policy.max_total().checked_sub(spent).unwrap_or(Amount::ZERO);
    let target = suggested
        .min(bound.max(min))
        .min(most)
        .min(channel.params().max_server_amount())
        .min(paid.checked_add(room).unwrap_or(Amount::MAX))
        .max(min);
    let ask =
        Ask { price: snapshot.price_msat, min: Some(min), claimed: Some(snapshot.spent_msat) };
    Ok(Some((target, ask)))
}

/// The next payment on `channel`, which pays `paid` today, when the client wants it to pay
/// `target` for `ask`: `target` lowered to the loss `bound` (below the least the server
/// asks, nothing is signed), then checked against the policy's budget given what the client
/// already `spent`. `None` when the channel already pays that much (sending the latest
/// payment again is enough).
///
/// # Errors
///
/// [`StepError::Bound`] when even the least the server asks is beyond the bound,
/// [`StepError::Policy`] when the budget is spent.
pub fn next_payment(
    policy: &SpendingPolicy,
    bound: &LossBound,
    channel: ChannelId,
    paid: Amount,
    spent: Amount,
    target: Amount,
    ask: Ask,
) -> Result<Option<Amount>, StepError> {
    if target <= paid {
        return Ok(None);
    }
    if let Some(least) = ask.min {
        bound.check(channel, least, ask.price, ask.claimed).map_err(StepError::Bound)?;
    }
    let target = target.min(bound.allowed(ask.price));
    if target <= paid {
        return Ok(None);
    }
    policy.check_spend(spent, target - paid)?;
    Ok(Some(target))
}

/// A payment of `channel` that pays the server `spent` rounded up to the satoshi (at least
/// its dust threshold), signed with `key`: the fair settlement of a cooperative close. `None`
/// when that is not less than the `latest` payment (nothing to give back) or `spent` is
/// unknown.
///
/// # Errors
///
/// [`SignError`] when `key` is not the channel's client key.
pub fn fair_settlement(
    channel: &Channel,
    latest: Option<&Transaction>,
    key: &SecretKey,
    spent: Option<MilliSats>,
) -> Result<Option<Transaction>, SignError> {
    let (Some(spent), Some(latest)) = (spent, latest) else { return Ok(None) };
    let params = channel.params();
    let amount = spent.to_sat_ceil().max(params.min_server_amount());
    if amount >= server_amount(latest) {
        return Ok(None);
    }
    let Ok(mut payment) = channel.build_payment(amount) else { return Ok(None) };
    channel.sign_payment(&mut payment, key)?;
    Ok(Some(payment))
}

/// What a checked settlement pays: the server, the client, and the fee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settlement {
    /// What it pays the server.
    pub server_amount: Amount,
    /// What it gives back to the client.
    pub client_amount: Amount,
    /// Its fee.
    pub fee: Amount,
}

/// Checks the `close` transaction the server says settles `channel`: it must be one of the
/// client's payments that pays the server no more than the `latest` (the `fair` one, the
/// latest, or an earlier one — the server's loss). The client signed whatever spends the
/// channel, so checking the shape and amounts is enough.
///
/// # Errors
///
/// [`StepError::Misbehaved`] ([`MisbehaviorKind::WrongSettlement`]).
pub fn check_settlement(
    channel: &Channel,
    latest: &Transaction,
    fair: Option<&Transaction>,
    close: &Transaction,
) -> Result<Settlement, StepError> {
    let unsigned = |tx: &Transaction| {
        let mut tx = tx.clone();
        tx.input.iter_mut().for_each(|input| input.witness.clear());
        tx
    };
    let params = channel.params();
    let ours = unsigned(close) == unsigned(latest)
        || fair.is_some_and(|fair| unsigned(close) == unsigned(fair))
        || (close.input.len() == 1
            && close.input[0].previous_output == channel.outpoint()
            && close.output.first().is_some_and(|o| o.script_pubkey == params.server_script)
            && close.output.get(1).is_none_or(|o| o.script_pubkey == params.client_script)
            && close.output.len() <= 2
            && server_amount(close) <= server_amount(latest));
    if !ours {
        return Err(misbehaved(
            MisbehaviorKind::WrongSettlement,
            "the settlement is not a payment of the client's paying no more than its latest",
        ));
    }
    let server_amount = server_amount(close);
    let client_amount = close.output.get(1).map_or(Amount::ZERO, |o| o.value);
    let fee = (params.value.checked_sub(server_amount))
        .and_then(|rest| rest.checked_sub(client_amount))
        .unwrap_or(Amount::ZERO);
    Ok(Settlement { server_amount, client_amount, fee })
}

/// The witness weight of a P2WPKH input: items count, signature, key.
const P2WPKH_WITNESS_WEIGHT: u64 = 1 + 1 + 72 + 1 + 33;

/// A funding transaction and the coin each of its inputs spends: what the client needs of a
/// PSBT (BIP 174), without the rest of it (the browser client reads only this much of the
/// user's wallet's PSBT; a Rust [`Wallet`](super::Wallet) hands over a [`Psbt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Funding {
    /// The transaction: unsigned, or with its inputs' witnesses once signed.
    pub tx: Transaction,
    /// The coin each input spends (a PSBT's `witness_utxo`), when known.
    pub coins: Vec<Option<TxOut>>,
}

impl Funding {
    /// `tx`, whose inputs spend `coins` (one per input, `None` when unknown).
    pub fn new(tx: Transaction, coins: Vec<Option<TxOut>>) -> Self {
        Self { tx, coins }
    }

    /// A PSBT's unsigned transaction, with each input's final scriptSig and witness when it
    /// has them, and its `witness_utxo`s.
    pub fn from_psbt(psbt: &Psbt) -> Self {
        let mut tx = psbt.unsigned_tx.clone();
        for (txin, input) in tx.input.iter_mut().zip(&psbt.inputs) {
            if let Some(script) = &input.final_script_sig {
                txin.script_sig = script.clone();
            }
            if let Some(witness) = &input.final_script_witness {
                txin.witness = witness.clone();
            }
        }
        let coins = psbt.inputs.iter().map(|input| input.witness_utxo.clone()).collect();
        Self { tx, coins }
    }

    /// As a PSBT: the unsigned transaction with the `witness_utxo`s, and each signed input's
    /// witness as its final witness.
    ///
    /// # Errors
    ///
    /// [`StepError::InvalidFunding`] when an input has a scriptSig.
    pub fn to_psbt(&self) -> Result<Psbt, StepError> {
        let mut unsigned = self.tx.clone();
        for txin in &mut unsigned.input {
            txin.witness = Witness::new();
        }
        let mut psbt = Psbt::from_unsigned_tx(unsigned)
            .map_err(|_| StepError::InvalidFunding("an input has a scriptSig"))?;
        for ((input, txin), coin) in psbt.inputs.iter_mut().zip(&self.tx.input).zip(&self.coins) {
            input.witness_utxo.clone_from(coin);
            if !txin.witness.is_empty() {
                input.final_script_witness = Some(txin.witness.clone());
            }
        }
        Ok(psbt)
    }

    /// What the transaction pays in fees: its coins less its outputs. `None` when a coin is
    /// unknown or the outputs pay more.
    pub fn fee(&self) -> Option<Amount> {
        let mut total = Amount::ZERO;
        for coin in self.coins.iter().take(self.tx.input.len()) {
            total = total.checked_add(coin.as_ref()?.value)?;
        }
        if self.coins.len() < self.tx.input.len() {
            return None;
        }
        let paid =
            self.tx.output.iter().try_fold(Amount::ZERO, |sum, o| sum.checked_add(o.value))?;
        total.checked_sub(paid)
    }
}

/// The unsigned funding that pays `output` from P2WPKH `coins`, taken in the order given
/// until they pay the output and the fee at `fee_rate` (per whole virtual byte, rounded up,
/// as Bitcoin Core and the server measure it, with every input's witness counted at its
/// largest), with change to `change_script` when it is not dust. Inputs do not signal
/// replacement: servers serve zero-confirmation channels only on fundings that do not.
/// Returns the funding and how many coins it spends.
///
/// # Errors
///
/// [`StepError::InsufficientFunds`] when every coin together cannot pay.
pub fn funding_from_coins(
    coins: &[(OutPoint, TxOut)],
    output: TxOut,
    change_script: ScriptBuf,
    fee_rate: FeeRate,
) -> Result<(Funding, usize), StepError> {
    let insufficient = |available| StepError::InsufficientFunds { available, needed: output.value };
    let mut tx = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: Vec::new(),
        output: vec![output.clone(), TxOut { value: Amount::ZERO, script_pubkey: change_script }],
    };
    let mut total = Amount::ZERO;
    for (used, (outpoint, coin)) in coins.iter().enumerate() {
        tx.input.push(TxIn {
            previous_output: *outpoint,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_LOCKTIME_NO_RBF,
            witness: Witness::new(),
        });
        total = total.checked_add(coin.value).ok_or_else(|| insufficient(Amount::MAX))?;
        // The inputs' witnesses, and the SegWit marker and flag.
        let weight = tx.weight() + Weight::from_wu(2 + P2WPKH_WITNESS_WEIGHT * (used as u64 + 1));
        let fee = fee_rate.fee_vb(weight.to_vbytes_ceil()).ok_or_else(|| insufficient(total))?;
        let Some(change) = output.value.checked_add(fee).and_then(|need| total.checked_sub(need))
        else {
            continue;
        };
        if change >= tx.output[1].script_pubkey.minimal_non_dust() {
            tx.output[1].value = change;
        } else {
            tx.output.pop();
        }
        let spent = coins[..=used].iter().map(|(_, coin)| Some(coin.clone())).collect();
        return Ok((Funding::new(tx, spent), used + 1));
    }
    Err(insufficient(total))
}

/// Signs every input of `funding` with `key`: each must spend a P2WPKH coin of `key` (its
/// coin says so), and gets its witness.
///
/// # Errors
///
/// [`StepError::NotOurCoin`] for an input that is not.
pub fn sign_p2wpkh_inputs(funding: &mut Funding, key: &SecretKey) -> Result<(), StepError> {
    let public = crate::channel::sig::public_key(key);
    let ours = ScriptBuf::new_p2wpkh(&public.wpubkey_hash());
    for index in 0..funding.tx.input.len() {
        let not_ours = StepError::NotOurCoin { input: index };
        let coin = funding.coins.get(index).cloned().flatten().ok_or_else(|| not_ours.clone())?;
        if coin.script_pubkey != ours {
            return Err(not_ours);
        }
        let witness = crate::channel::sig::p2wpkh_witness(&funding.tx, index, &coin, key)
            .map_err(|_| not_ours)?;
        funding.tx.input[index].witness = witness;
    }
    Ok(())
}

/// Checks a wallet's unsigned `funding` for the channel output `output`: it pays the channel's
/// script exactly once and at the channel's value, it is not signed yet (the refund is signed
/// first), and every input is native SegWit with its coin known (so the signatures cannot
/// change the transaction's id, which the refund spends). Returns the channel's outpoint.
///
/// # Errors
///
/// [`StepError::InvalidFunding`].
pub fn check_funding(funding: &Funding, output: &TxOut) -> Result<OutPoint, StepError> {
    let tx = &funding.tx;
    // Exactly one output to the channel's script, and at the channel's value: coins sent to
    // the 2-of-2 beside it would have no refund.
    let mut outputs =
        tx.output.iter().enumerate().filter(|(_, out)| out.script_pubkey == output.script_pubkey);
    let (Some((vout, paid)), None) = (outputs.next(), outputs.next()) else {
        return Err(StepError::InvalidFunding("it must pay the channel output exactly once"));
    };
    if paid.value != output.value {
        return Err(StepError::InvalidFunding("it must pay the channel output exactly once"));
    }
    // Signed already: the funding would leave (the server could broadcast it) before its
    // refund is signed.
    if tx.input.iter().any(|txin| !txin.witness.is_empty()) {
        return Err(StepError::InvalidFunding(
            "it is signed: give the unsigned PSBT first (the refund is signed before the funding)",
        ));
    }
    if tx.input.is_empty() || funding.coins.len() != tx.input.len() {
        return Err(StepError::InvalidFunding("it has no inputs, or not a coin for each"));
    }
    let segwit = funding
        .coins
        .iter()
        .all(|coin| coin.as_ref().is_some_and(|coin| coin.script_pubkey.is_witness_program()));
    if !segwit || tx.input.iter().any(|txin| !txin.script_sig.is_empty()) {
        return Err(StepError::InvalidFunding(
            "every input must be native SegWit, with its witness_utxo in the PSBT",
        ));
    }
    Ok(OutPoint::new(tx.compute_txid(), vout as u32))
}

/// The signed funding out of the wallet's `signed` one: every input has its witness and no
/// scriptSig, it is the transaction the refund spends (`outpoint`'s), and its fee rate is not
/// absurd (above 100 sat/vB, when its coins are known).
///
/// # Errors
///
/// [`StepError::InvalidFunding`].
pub fn signed_funding(signed: Funding, outpoint: OutPoint) -> Result<Transaction, StepError> {
    if signed.tx.input.iter().any(|txin| txin.witness.is_empty()) {
        return Err(StepError::InvalidFunding("the wallet did not sign and finalize every input"));
    }
    if signed.tx.compute_txid() != outpoint.txid {
        return Err(StepError::InvalidFunding("signing changed the transaction's id"));
    }
    // As `Psbt::extract_tx` checks: a fee rate no wallet means to pay.
    let most = ABSURD_FEE_RATE.fee_wu(signed.tx.weight()).unwrap_or(Amount::MAX);
    if signed.fee().is_some_and(|fee| fee > most) {
        return Err(StepError::InvalidFunding("its fee rate is absurdly high"));
    }
    Ok(signed.tx)
}

/// The fee rate above which a funding is refused as a mistake (rust-bitcoin's
/// `Psbt::DEFAULT_MAX_FEE_RATE`: 25 000 sat/kwu, 100 sat/vB).
const ABSURD_FEE_RATE: FeeRate = FeeRate::from_sat_per_kwu(25_000);

/// The payment scheme a 402 asks for when it is not paychan's (`bitcoin-channel`): `L402` (or
/// `LSAT`, Lightning macaroons), `x402` (a JSON body with `x402Version`), or another `Payment`
/// method (`MPP`'s `Payment method="…"` challenges). `None` for a paychan 402, or one that
/// names no scheme (then it is read as a problem document).
///
/// `challenges` are the `WWW-Authenticate` values (a browser's `Headers.get` joins several into
/// one: it is read the same way).
pub fn foreign_scheme(challenges: &[&str], body: &[u8]) -> Option<String> {
    // A paychan problem document is ours, whatever the headers say.
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let problem_type = json.as_ref().and_then(|json| json.get("type")?.as_str());
    if problem_type.is_some_and(|t| t.starts_with(crate::wire::PROBLEM_TYPE_PREFIX)) {
        return None;
    }
    // Any `method` parameter that is `bitcoin-channel` (any case of `method`, spaces around
    // `=`, quoted or not) among them: a server may offer several schemes.
    if challenges.iter().flat_map(|c| methods(c)).any(|m| m == "bitcoin-channel") {
        return None;
    }
    for challenge in challenges {
        let scheme = challenge.split_whitespace().next().unwrap_or("");
        if scheme.eq_ignore_ascii_case("L402") || scheme.eq_ignore_ascii_case("LSAT") {
            return Some("L402".to_owned());
        }
        if scheme.eq_ignore_ascii_case("Payment") {
            let method = methods(challenge).into_iter().next();
            let method = method.unwrap_or_else(|| "unnamed".to_owned());
            return Some(format!("Payment method=\"{method}\""));
        }
    }
    let x402 = json.is_some_and(|json| json.get("x402Version").is_some());
    x402.then(|| "x402".to_owned())
}

/// The values of every `method` parameter in a challenge (the name in any case, spaces around
/// `=`, the value quoted or not).
fn methods(challenge: &str) -> Vec<String> {
    let lower = challenge.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = lower[from..].find("method").map(|at| at + from) {
        from = at + "method".len();
        let starts_a_name = at == 0 || matches!(lower.as_bytes()[at - 1], b' ' | b',' | b'\t');
        let rest = challenge[from..].trim_start();
        if let (true, Some(value)) = (starts_a_name, rest.strip_prefix('=')) {
            let value = value.trim_start().trim_start_matches('"');
            let value = value.split(['"', ',', ' ', '\t']).next().unwrap_or("");
            found.push(value.to_owned());
        }
    }
    found
}
