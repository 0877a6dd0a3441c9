//! Opening a channel: terms, proposal, refund, funding.

use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hex::FromHex as _;
use bitcoin::{Amount, FeeRate, Network, ScriptBuf, Transaction, TxOut, ecdsa};
use http::Method;
use std::time::Instant;

use super::{Payer, State, misbehaved};
use crate::channel::ChainTip;
use crate::client::steps::{self, Funding, MisbehaviorKind as Kind};
use crate::client::{ClientChannel, ClientError, ClientStore, Transport, WalletError};
use crate::wire::{
    ChannelId, FundRequest, FundResponse, OpenRequest, OpenResponse, RefundRequest, RefundResponse,
};

/// A channel proposed by the server and checked ([`Payer::propose`]).
struct Proposed {
    terms: crate::wire::TermsDocument,
    proposal: u32,
    params: crate::channel::ChannelParams,
    key_index: u32,
    client_secret: bitcoin::secp256k1::SecretKey,
    /// The first payment.
    first: Amount,
    funding_fee_rate: FeeRate,
}

/// How many times `/fund` is sent (it is idempotent) before the funding is left in doubt.
const FUND_TRIES: u32 = 3;

/// The pause before the n-th retry of `/fund`: n times this.
const FUND_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

impl<S: ClientStore> Payer<S> {
    /// Opens a new channel with the server, as [`open_via`](Self::open_via) does, through the
    /// payer's own transport ([`PayerBuilder::transport`](super::PayerBuilder::transport)).
    /// A payer driven by [`PaymentLayer`](crate::client::PaymentLayer) or the reqwest
    /// middleware opens by itself on the first 402 and needs neither.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoTransport`] without a transport, and those of
    /// [`open_via`](Self::open_via).
    pub async fn open(&self) -> Result<ChannelId, ClientError> {
        self.open_via(&*self.own_transport()?).await
    }

    /// Opens a new channel with the server through `transport`, funded by the wallet, and
    /// makes it the one the payer pays on. The previous channel, if any, is retired (its
    /// refund stays in the store).
    ///
    /// The steps, each checked: fetch the terms; propose the channel with a fresh K1; check
    /// every field of the server's answer against what was asked; have the wallet build the
    /// unsigned funding T1; have the server sign the refund T2 and **verify that signature,
    /// aborting before anything is signed if it is wrong**; save the refund and the first
    /// payment; only then have the wallet sign T1, save it with the channel, and hand it to
    /// the server with the first payment (`/fund`, sent up to 3 times with the same funding on
    /// a transport error, a timeout or a 5xx).
    ///
    /// A funding the server never acknowledged may still be broadcast by it: it is counted in
    /// [`committed`](Self::committed) and the [funding fees](Self::funding_fees), its channel
    /// is retired but counted as locked (the refund is kept), and no later funding is signed
    /// unless it spends one of its inputs or the chain view shows it broadcast or conflicted
    /// ([`ClientChannel::unacknowledged_funding`]).
    ///
    /// Without a chain view ([`PayerBuilder::chain`](super::PayerBuilder::chain)) on mainnet,
    /// testnet or signet, nothing is opened ([`ClientError::NoChainView`]) unless the payer
    /// was told to [`trust_server_tip`](super::PayerBuilder::trust_server_tip).
    ///
    /// # Errors
    ///
    /// [`ClientError::Policy`] if the server's terms or the channel exceed the policy,
    /// [`ClientError::NoWallet`], [`ClientError::Wallet`], [`ClientError::InvalidRefundSignature`],
    /// [`ClientError::ServerMisbehaved`], [`ClientError::Rejected`] if the server refused a step,
    /// [`ClientError::Transport`], [`ClientError::Store`], [`ClientError::NoChainView`].
    pub async fn open_via<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<ChannelId, ClientError> {
        let mut state = self.state().await?;
        self.open_locked(transport, &mut state, false).await
    }

    /// Opens a channel in named steps: [`propose`](Self::propose) (terms, policy, keys, the
    /// server's proposal), the wallet's unsigned funding, [`secure`](Self::secure) (the refund
    /// signed and verified, the first payment, both saved before the funding is signed), the
    /// wallet's signature, [`fund_channel`](Self::fund_channel) (the funding saved, then sent).
    pub(super) async fn open_locked<T: Transport + ?Sized>(
        &self,
        transport: &T,
        state: &mut State,
        automatic: bool,
    ) -> Result<ChannelId, ClientError> {
        let proposed = self.propose(transport, state, automatic).await?;
        let wallet = self.inner.settings.wallet.clone().ok_or(ClientError::NoWallet)?;
        let funding_output = TxOut {
            value: proposed.params.value,
            script_pubkey: proposed.params.funding_script_pubkey(),
        };
        let psbt = wallet
            .fund(funding_output.clone(), proposed.funding_fee_rate)
            .await
            .map_err(ClientError::Wallet)?;
        // Between the wallet's unsigned funding and its signature; on failure the wallet gets
        // its coins back.
        let (channel, header, outpoint) =
            match self.secure(transport, state, &proposed, &psbt, &funding_output).await {
                Ok(secured) => secured,
                Err(e) => {
                    wallet.release(&psbt);
                    return Err(e);
                }
            };
        let signed = wallet.sign(psbt).await.map_err(ClientError::Wallet)?;
        self.fund_channel(
            transport,
            state,
            &proposed,
            &*wallet,
            (channel, header),
            signed,
            outpoint,
        )
        .await
    }

    /// The proposal: the terms read and checked against the policy (an automatic open counted
    /// and the previous channel closed first), the tip the lock time counts from (the client's
    /// own when it has a chain view: C1), a fresh key, the lock checked, and the server's
    /// proposal for it checked.
    async fn propose<T: Transport + ?Sized>(
        &self,
        transport: &T,
        state: &mut State,
        automatic: bool,
    ) -> Result<Proposed, ClientError> {
        let inner = &self.inner.settings;
        let terms = self.terms(transport).await?;
        let plan = steps::plan_open(
            &terms,
            inner.network,
            &inner.policy,
            inner.channel_value,
            inner.lifetime_blocks,
            automatic,
        )?;
        let (value, lifetime) = (plan.value, plan.lifetime);
        if automatic {
            self.count_open(state)?;
            self.close_before_rollover(transport, state).await;
        }
        let tip = match &inner.chain {
            Some(chain) => {
                let own = chain.tip().await.map_err(ClientError::Chain)?;
                steps::check_tip(&terms, own)?;
                own
            }
            // Without a chain view the server's tip is trusted: on regtest, or when the user
            // opted in (a real network needs a chain view otherwise).
            None if inner.network == Network::Regtest || inner.trust_server_tip => terms.tip,
            None => return Err(ClientError::NoChainView),
        };
        if inner.wallet.is_none() {
            return Err(ClientError::NoWallet);
        }
        let key_index = self.inner.store.next_key_index().await.map_err(ClientError::Store)?;
        let client_secret = self.derive(key_index)?;
        let client_key = crate::channel::sig::public_key(&client_secret);
        let client_script = ScriptBuf::new_p2wpkh(&client_key.wpubkey_hash());
        let expiry = tip.height.saturating_add(lifetime);
        let first = steps::first_payment(&terms, &inner.policy, state.spent())?;
        let locked = self.locked(inner.chain.as_ref().map(|_| tip)).await?;
        inner.policy.check_lock(locked, value).map_err(ClientError::Policy)?;

        let request = OpenRequest {
            client_pubkey: client_key.to_string(),
            value_sat: value.to_sat(),
            expiry,
            client_script: client_script.to_hex_string(),
        };
        let proposal: OpenResponse =
            self.call(transport, Method::POST, &terms.endpoints.open, Some(&request), None).await?;
        let params = steps::check_proposal(
            &proposal,
            &terms,
            tip,
            client_key,
            value,
            expiry,
            &client_script,
        )?;
        let funding_fee_rate = FeeRate::from_sat_per_vb(terms.funding_min_fee_rate_sat_per_vb)
            .ok_or_else(|| misbehaved(Kind::InvalidTerms, "funding fee rate"))?;
        // Fee rates the server sets: the funding's, and the channel's (every payment and the
        // refund pay it).
        inner.policy.check_fee_rate(funding_fee_rate).map_err(ClientError::Policy)?;
        inner.policy.check_fee_rate(params.min_fee_rate).map_err(ClientError::Policy)?;
        Ok(Proposed {
            terms,
            proposal: proposal.proposal,
            params,
            key_index,
            client_secret,
            first,
            funding_fee_rate,
        })
    }

    /// Before the funding is signed: its output checked, no funding in doubt left unconflicted,
    /// the budget checked with its fee, the refund signed by the server and verified, and the
    /// refund and the first payment saved.
    async fn secure<T: Transport + ?Sized>(
        &self,
        transport: &T,
        state: &State,
        proposed: &Proposed,
        psbt: &bitcoin::Psbt,
        funding_output: &TxOut,
    ) -> Result<(ClientChannel, String, bitcoin::OutPoint), ClientError> {
        let Proposed { terms, params, client_secret, first, .. } = proposed;
        let outpoint = steps::check_funding(&Funding::from_psbt(psbt), funding_output)?;
        // A funding the server may still broadcast must conflict with this one.
        self.check_doubts(&psbt.unsigned_tx).await?;
        // The funding's fee counts in the budget, with the first payment.
        let funding_fee = psbt.fee().map_err(|e| ClientError::Wallet(WalletError::new(e)))?;
        let cost = first.checked_add(funding_fee).unwrap_or(Amount::MAX);
        let policy = &self.inner.settings.policy;
        policy.check_spend(state.spent(), cost).map_err(ClientError::Policy)?;

        // The refund, signed by the server and verified before anything else is signed.
        let refund = params.build_refund(outpoint, params.refund_fee());
        let request = RefundRequest {
            proposal: proposed.proposal,
            funding_tx: serialize_hex(&psbt.unsigned_tx),
            refund_tx: serialize_hex(&refund),
        };
        let signed: RefundResponse = self
            .call(transport, Method::POST, &terms.endpoints.refund, Some(&request), None)
            .await?;
        let signature = Vec::<u8>::from_hex(&signed.signature)
            .ok()
            .and_then(|bytes| ecdsa::Signature::from_slice(&bytes).ok())
            .ok_or(ClientError::InvalidRefundSignature)?;
        params
            .verify_refund_signature(&refund, &signature)
            .map_err(|_| ClientError::InvalidRefundSignature)?;
        let refund = params
            .complete_refund(&refund, client_secret, &signature)
            .map_err(ClientError::Sign)?;

        // The refund and the first payment are saved before T1 is signed or leaves.
        let mut channel =
            ClientChannel::new(params.clone().at(outpoint), proposed.key_index, refund);
        channel.server = self.inner.settings.origin.clone();
        channel.funding_fee = funding_fee;
        let header = channel.pay(&self.inner.store, client_secret, *first).await?;
        Ok((channel, header, outpoint))
    }

    /// The signed funding saved as unacknowledged, then handed to the server with the first
    /// payment (`/fund` is idempotent: retried on a failure or a lost answer); it counts from
    /// then on, acknowledged or not. Unacknowledged, the channel is kept for its refund and
    /// retired; acknowledged, it becomes the payer's channel.
    #[allow(clippy::too_many_arguments, reason = "the steps' own values, handed on")]
    async fn fund_channel<T: Transport + ?Sized>(
        &self,
        transport: &T,
        state: &mut State,
        proposed: &Proposed,
        wallet: &dyn crate::client::Wallet,
        (mut channel, header): (ClientChannel, String),
        signed: bitcoin::Psbt,
        outpoint: bitcoin::OutPoint,
    ) -> Result<ChannelId, ClientError> {
        let funding = steps::signed_funding(Funding::from_psbt(&signed), outpoint)?;
        // Saved before it leaves: from now on the server may broadcast it, whatever it answers.
        channel.unacknowledged_funding = Some(funding.clone());
        if let Err(e) = self.inner.store.save(&channel).await {
            wallet.funding_in_doubt(&signed);
            return Err(ClientError::Store(e));
        }
        let request = FundRequest {
            proposal: proposed.proposal,
            funding_tx: serialize_hex(&funding),
            payment: header.clone(),
        };
        let mut tries = 0;
        let funded = loop {
            tries += 1;
            let fund = &proposed.terms.endpoints.fund;
            let sent = self.call::<_, _, FundResponse>(
                transport,
                Method::POST,
                fund,
                Some(&request),
                None,
            );
            match sent.await {
                Err(e) if tries < FUND_TRIES && may_retry(&e) => {
                    tokio::time::sleep(FUND_RETRY_PAUSE * tries).await;
                }
                answer => break answer,
            }
        };
        // The server holds the signed funding and the first payment: they count, acknowledged
        // or not.
        state.committed += proposed.first;
        state.fees += channel.funding_fee;
        if let Err(e) = funded {
            // In doubt: the channel is kept (its refund, counted as locked) but not paid on,
            // and no later funding may confirm beside this one.
            tracing::warn!(error = %e, txid = %outpoint.txid, "the server did not acknowledge \
                the funding; it may still broadcast it");
            wallet.funding_in_doubt(&signed);
            channel.retired = true;
            self.inner.store.save(&channel).await.map_err(ClientError::Store)?;
            return Err(e);
        }
        wallet.funding_acknowledged(&funding);
        channel.unacknowledged_funding = None;
        self.inner.store.save(&channel).await.map_err(ClientError::Store)?;
        self.settle_doubts(&funding).await?;
        self.retire(state, false).await?;
        let id = channel.id();
        self.set_channel(state, Some((channel, proposed.client_secret)), Some(header));
        self.watch_new_channel(id);
        Ok(id)
    }

    /// The value of the store's channels whose money is not back yet: not closed and, at the
    /// client's own tip `own_tip`, refund not yet valid. Without a tip of its own, every
    /// channel not closed: a server's tip far ahead would make every refund look valid (F8).
    async fn locked(&self, own_tip: Option<ChainTip>) -> Result<Amount, ClientError> {
        let channels = self.inner.store.list().await.map_err(ClientError::Store)?;
        Ok(channels
            .iter()
            .filter(|c| {
                !c.closed && !own_tip.is_some_and(|tip| c.channel.params().refund_is_valid(tip))
            })
            .map(|c| c.channel.params().value)
            .sum())
    }

    /// Refuses a funding `tx` that could confirm beside one the server may still broadcast:
    /// every funding in doubt (not acknowledged, channel not closed) must share an input with
    /// `tx`, unless the chain view shows it broadcast or conflicted.
    async fn check_doubts(&self, tx: &Transaction) -> Result<(), ClientError> {
        let channels = self.inner.store.list().await.map_err(ClientError::Store)?;
        for channel in channels.iter().filter(|c| !c.closed) {
            let Some(earlier) = &channel.unacknowledged_funding else { continue };
            if shares_input(earlier, tx) || self.seen_or_conflicted(channel, earlier).await? {
                continue;
            }
            return Err(ClientError::Wallet(WalletError::new(format!(
                "the new funding spends none of the inputs of funding {}, which the server may \
                 still broadcast (its /fund was not acknowledged): both could confirm",
                earlier.compute_txid()
            ))));
        }
        Ok(())
    }

    /// Whether the chain view shows the funding `earlier` of `channel` broadcast (its output
    /// exists) or one of its inputs spent (by it, or by a conflicting transaction). Without a
    /// chain view, `false`.
    async fn seen_or_conflicted(
        &self,
        channel: &ClientChannel,
        earlier: &Transaction,
    ) -> Result<bool, ClientError> {
        let Some(chain) = &self.inner.settings.chain else { return Ok(false) };
        if chain.unspent(channel.channel.outpoint()).await.map_err(ClientError::Chain)? {
            return Ok(true);
        }
        for input in &earlier.input {
            if !chain.unspent(input.previous_output).await.map_err(ClientError::Chain)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The server acknowledged `funding`: the fundings in doubt it conflicts with can only
    /// confirm if it does not, and no longer hold back later ones.
    async fn settle_doubts(&self, funding: &Transaction) -> Result<(), ClientError> {
        let channels = self.inner.store.list().await.map_err(ClientError::Store)?;
        for mut channel in channels {
            if channel.unacknowledged_funding.as_ref().is_some_and(|tx| shares_input(tx, funding)) {
                channel.unacknowledged_funding = None;
                self.inner.store.save(&channel).await.map_err(ClientError::Store)?;
            }
        }
        Ok(())
    }

    /// Before the payer switches to a new channel by itself (the server closes the current
    /// one at its margin, or no longer knows it), it closes the current one fairly, so the
    /// prepaid rest comes back (F5): best effort, within one negotiation timeout; on failure
    /// the channel is retired as before (its refund kept). Either way it stays counted in
    /// `max_locked` until its refund is valid: the close is the server's word.
    async fn close_before_rollover<T: Transport + ?Sized>(&self, transport: &T, state: &mut State) {
        if state.channel.is_none() {
            return;
        }
        let timeout = self.inner.settings.timeout;
        match tokio::time::timeout(timeout, self.close_locked(transport, state, false)).await {
            Ok(Ok(closed)) => tracing::info!(
                channel = %closed.channel,
                server_amount = %closed.server_amount,
                "the old channel closed fairly before the switch"
            ),
            Ok(Err(error)) => tracing::warn!(%error, "the old channel's fair close failed"),
            Err(_) => tracing::warn!("the old channel's fair close did not answer in time"),
        }
    }

    /// Counts an automatic opening against the policy's `max_opens`.
    fn count_open(&self, state: &mut State) -> Result<(), ClientError> {
        let (_, period) = self.inner.settings.policy.max_opens();
        let now = Instant::now();
        while state.opens.front().is_some_and(|at| now.duration_since(*at) >= period) {
            state.opens.pop_front();
        }
        steps::check_opens(&self.inner.settings.policy, state.opens.len())?;
        state.opens.push_back(now);
        Ok(())
    }
}

/// Whether `a` and `b` spend a common output (at most one of them can confirm).
fn shares_input(a: &Transaction, b: &Transaction) -> bool {
    a.input.iter().any(|x| b.input.iter().any(|y| x.previous_output == y.previous_output))
}

/// Whether a failed `/fund` is worth sending again: no answer, or a server error.
fn may_retry(error: &ClientError) -> bool {
    match error {
        ClientError::Transport(_) => true,
        ClientError::Rejected { status, .. } => status.is_server_error(),
        _ => false,
    }
}
