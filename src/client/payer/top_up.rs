//! Paying more: the reaction to a 402, and the proactive top-up after a served request.

use bitcoin::Amount;

use super::{CurrentPayment, Payer, State};
use crate::MilliSats;
use crate::client::steps;
use crate::client::{ClientError, ClientStore, Transport};
use crate::wire::{ChannelSnapshot, Problem, ProblemCode};

/// What the client may still do for one request: it opens at most one channel and tops up at
/// most [`MAX_TOP_UPS`] times (more than once only when concurrent requests drained the
/// balance between its top-up and its retry).
#[derive(Debug, Default)]
pub(crate) struct RetryBudget {
    opened: bool,
    top_ups: u8,
}

/// Top-ups one request may make.
const MAX_TOP_UPS: u8 = 2;

pub(super) use crate::client::steps::{Ask, quoted};

impl<S: ClientStore> Payer<S> {
    /// Acts on a 402 to a request that carried `sent`: tops up, opens a channel, or (when
    /// another request already did either) nothing; the caller retries. Errors mean the
    /// client cannot or may not pay.
    pub(crate) async fn handle_402<T: Transport + ?Sized>(
        &self,
        transport: &T,
        sent: Option<&CurrentPayment>,
        problem: Problem,
        budget: &mut RetryBudget,
    ) -> Result<(), ClientError> {
        self.check_trusted()?;
        // Check the price before paying anything, for a new channel as for a top-up.
        if let Some(price) = problem.price_msat.or(problem.channel.as_ref().map(|c| c.price_msat)) {
            self.inner.settings.policy.check_price(price).map_err(ClientError::Policy)?;
        }
        let mut state = self.state().await?;
        // Another request changed the channel meanwhile: retry with its payment.
        if self.read_current().as_ref().map(|s| (s.id, s.paid)) != sent.map(|s| (s.id, s.paid)) {
            return Ok(());
        }
        // A top-up needs the server's snapshot of the channel we pay on, with a minimum.
        let snapshot = match (&state.channel, &problem.channel) {
            (Some((channel, _)), Some(snapshot))
                if problem.code == ProblemCode::InsufficientBalance
                    && snapshot.channel == channel.id()
                    && snapshot.min_server_amount_sat.is_some() =>
            {
                Some(ChannelSnapshot::clone(snapshot))
            }
            _ => None,
        };
        match (&problem.code, snapshot) {
            // The server did not get the header this request carried (a proxy dropped it?): a
            // new channel would not help.
            (ProblemCode::PaymentRequired, _) if sent.is_some() => Err(problem.into()),
            (ProblemCode::InsufficientBalance, Some(snapshot)) => {
                if budget.top_ups >= MAX_TOP_UPS {
                    return Err(problem.into());
                }
                budget.top_ups += 1;
                self.top_up_locked(&mut state, &quoted(snapshot, &problem), None).await
            }
            (
                ProblemCode::InsufficientBalance
                | ProblemCode::PaymentRequired
                | ProblemCode::UnknownChannel
                | ProblemCode::ChannelNotOpen
                | ProblemCode::ChannelClosing,
                _,
            ) => {
                if budget.opened {
                    return Err(problem.into());
                }
                budget.opened = true;
                self.open_locked(transport, &mut state, true).await.map(drop)
            }
            _ => Err(problem.into()),
        }
    }

    /// Tops up from the server's `snapshot`, within the policy and, with `cap`, adding at
    /// most `cap` to what the channel pays.
    pub(super) async fn top_up_locked(
        &self,
        state: &mut State,
        snapshot: &ChannelSnapshot,
        cap: Option<Amount>,
    ) -> Result<(), ClientError> {
        let policy = &self.inner.settings.policy;
        let spent = state.spent();
        let Some((channel, _)) = state.channel.as_ref() else {
            return policy.check_price(snapshot.price_msat).map_err(ClientError::Policy);
        };
        let top_up = steps::top_up(policy, &channel.channel, channel.paid(), spent, snapshot, cap)?;
        let Some((target, ask)) = top_up else { return Ok(()) };
        self.pay_more(state, target, ask).await
    }

    /// Proactive top-up after a served request that carried `sent` and reported `balance`.
    pub(crate) async fn observe_balance(
        &self,
        sent: &CurrentPayment,
        balance: MilliSats,
    ) -> Result<(), ClientError> {
        let Some((threshold, amount)) = self.inner.settings.top_up else { return Ok(()) };
        if balance >= threshold {
            return Ok(());
        }
        let mut state = self.state().await?;
        if self.read_current().as_ref() != Some(sent) {
            return Ok(()); // another request already paid more
        }
        let Some((channel, _)) = state.channel.as_ref() else { return Ok(()) };
        let target = channel.paid().checked_add(amount).unwrap_or(Amount::MAX);
        let target = target.min(channel.channel.params().max_server_amount());
        // Ahead of any request: within the loss bound, as much as it allows.
        self.pay_more(&mut state, target, Ask::AHEAD).await
    }

    /// Signs, saves and makes current a payment of `target` on the current channel, within
    /// the policy's budget and the channel's loss bound for `ask` (`target` is lowered to the
    /// bound; below the least the server asks, nothing is signed). Nothing to do when the
    /// channel already pays that much: the server has not seen our latest payment yet, and
    /// sending it again is enough.
    pub(super) async fn pay_more(
        &self,
        state: &mut State,
        target: Amount,
        ask: Ask,
    ) -> Result<(), ClientError> {
        // Never a payment more to a server that overcharged (checked under the state lock).
        self.check_trusted()?;
        let policy = &self.inner.settings.policy;
        let spent = state.spent();
        let Some((channel, key)) = state.channel.as_mut() else { return Ok(()) };
        let paid = channel.paid();
        // The loss bound: the one rule for every payment the client signs on a channel.
        let next =
            steps::next_payment(policy, &self.bound(), channel.id(), paid, spent, target, ask);
        let target = match next {
            Ok(Some(target)) => target,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "a payment is refused");
                return Err(e.into());
            }
        };
        let header = channel.pay(&self.inner.store, key, target).await?;
        state.committed += target - paid;
        let channel = state.channel.take();
        self.set_channel(state, channel, Some(header));
        Ok(())
    }
}
