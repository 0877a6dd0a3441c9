//! The cooperative close.

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::hex::DisplayHex;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, Transaction, Txid};
use http::Method;

use super::{Payer, State, misbehaved};
use crate::MilliSats;
use crate::client::ClientChannel;
use crate::client::steps::{self, MisbehaviorKind as Kind};
use crate::client::{ClientError, ClientStore, Transport};
use crate::wire::{self, ChannelId, ChannelSnapshot, CloseRequest, CloseResponse};

/// A channel closed cooperatively by [`Payer::close`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Closed {
    /// The channel.
    pub channel: ChannelId,
    /// The settlement transaction the server broadcast.
    pub txid: Txid,
    /// What it pays the server.
    pub server_amount: Amount,
    /// What it gives back to the client.
    pub client_amount: Amount,
    /// Its fee.
    pub fee: Amount,
}

/// The fair settlement of `channel` at `spent` ([`steps::fair_settlement`]).
fn fair_settlement(
    channel: &ClientChannel,
    key: &SecretKey,
    spent: Option<MilliSats>,
) -> Result<Option<Transaction>, ClientError> {
    steps::fair_settlement(&channel.channel, channel.latest.as_ref(), key, spent)
        .map_err(ClientError::Sign)
}

impl<S: ClientStore> Payer<S> {
    /// Asks the server to close the current channel cooperatively, **fairly**: the client
    /// signs a payment of what the server reported spent (its last receipt, or its balance
    /// header), rounded up to the satoshi, and the server co-signs and broadcasts that
    /// instead of the best payment, so the prepaid rest comes back. If the server spent more
    /// meanwhile it refuses (409 `payment-below-spent`); the client reads the channel's exact
    /// spent and signs again (a few times at most, then it closes at its latest payment). The
    /// channel is retired; the settlement must be the client's fair or latest payment.
    ///
    /// Reaches the server through the payer's own transport
    /// ([`PayerBuilder::transport`](super::PayerBuilder::transport)); see
    /// [`close_via`](Self::close_via) to pass one.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoTransport`] without a transport, and those of
    /// [`close_via`](Self::close_via).
    pub async fn close(&self) -> Result<Closed, ClientError> {
        self.close_via(&*self.own_transport()?).await
    }

    /// [`close`](Self::close) through `transport`.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoChannel`], [`ClientError::Rejected`], [`ClientError::ServerMisbehaved`]
    /// if the settlement is not the client's latest payment, [`ClientError::Transport`],
    /// [`ClientError::Store`].
    pub async fn close_via<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<Closed, ClientError> {
        let mut state = self.state().await?;
        self.close_locked(transport, &mut state, true).await
    }

    /// [`close_via`](Self::close_via) under the payer's lock.
    /// The channel is retired; marked closed (its value no longer counted in `max_locked`)
    /// only when `mark_closed`: a close the payer makes by itself, on the server's word, is
    /// not (a server could answer closes it never broadcasts to get round `max_locked`).
    pub(super) async fn close_locked<T: Transport + ?Sized>(
        &self,
        transport: &T,
        state: &mut State,
        mark_closed: bool,
    ) -> Result<Closed, ClientError> {
        let current = self.read_current().ok_or(ClientError::NoChannel)?;
        let terms = self.terms(transport).await?;
        let id = current.id.to_string();
        let path = terms.endpoints.close.replace("{id}", &id);
        let status = terms.endpoints.channel.replace("{id}", &id);
        let (channel, key) = state.channel.as_ref().ok_or(ClientError::NoChannel)?;
        // A fair settlement at what the server reported spent. If that is short (a request
        // was charged since), the server refuses it with nothing changed: read the exact spent
        // and sign again. Requests still being charged can move it between the read and the
        // close: a few tries, then the close at the latest payment, never refused as short.
        // A payer that has no report of this channel (a new process, as `paychan client
        // close`) asks the server: the fair settlement never pays more than the latest
        // payment, so the server's word can only lower what it gets.
        let reported = match self.reported_spent(current.id) {
            Some(spent) => Some(spent),
            None => self.asked_spent(transport, &status).await.ok(),
        };
        let mut fair = fair_settlement(channel, key, reported)?;
        // The close's receipt links to the latest receipt held: signed, it is the last proof.
        let prev = self.latest_receipt_digest(current.id);
        let mut tries = 0;
        let answer: CloseResponse = loop {
            tries += 1;
            let request = CloseRequest {
                fair_payment: fair.as_ref().map(wire::encode_payment),
                prev: prev.map(|prev| prev.to_lower_hex_string()),
            };
            let sent =
                self.call(transport, Method::POST, &path, Some(&request), Some(&current.header));
            match sent.await {
                Err(ClientError::Rejected { code, .. })
                    if code == "payment-below-spent" && fair.is_some() && tries < 3 =>
                {
                    let spent = self.asked_spent(transport, &status).await?;
                    let exact = fair_settlement(channel, key, Some(spent))?;
                    fair = exact.filter(|exact| Some(exact) != fair.as_ref());
                }
                // The server refused the fair settlement itself: close at the latest payment.
                Err(ClientError::Rejected { code, .. })
                    if fair.is_some() && code.as_str().starts_with("payment-") =>
                {
                    fair = None;
                }
                answer => break answer?,
            }
        };
        let closed = checked_close(current.id, channel, fair.as_ref(), &answer)?;
        if let Some(receipt) = &answer.receipt {
            // Judged as any receipt; a bad one is kept as the server's verdict (it is paid no
            // more), and the close, checked above, stands.
            let value = receipt.encode();
            let mut charges = self.charges();
            let judged =
                charges.note_close_receipt(&current.watched(), value.as_bytes(), &path, prev);
            if let Err(why) = judged {
                tracing::warn!(%why, "the close's receipt does not verify or add up");
            }
        }
        self.retire(state, mark_closed).await?;
        Ok(closed)
    }

    /// What the server reports spent on the channel whose status is at `status`.
    async fn asked_spent<T: Transport + ?Sized>(
        &self,
        transport: &T,
        status: &str,
    ) -> Result<MilliSats, ClientError> {
        let snapshot: ChannelSnapshot =
            self.call(transport, Method::GET, status, None::<&()>, None).await?;
        Ok(snapshot.spent_msat)
    }

    /// Broadcasts, through the payer's chain view, the refund of every channel in its store
    /// whose refund is valid at the chain's tip and whose funding output is still unspent:
    /// the client's money comes back from a server that vanished. Idempotent, so a task may
    /// call it every few blocks; the channels refunded are retired. Returns the refunds
    /// broadcast.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoChainView`], [`ClientError::Store`], or [`ClientError::Chain`] when the
    /// chain cannot be read. A refund the chain refuses is skipped (logged) and tried again at
    /// the next call.
    pub async fn refund_expired(&self) -> Result<Vec<Txid>, ClientError> {
        let chain = self.inner.settings.chain.clone().ok_or(ClientError::NoChainView)?;
        let tip = chain.tip().await.map_err(ClientError::Chain)?;
        let mut state = self.state().await?;
        let channels = self.inner.store.list().await.map_err(ClientError::Store)?;
        let mut refunded = Vec::new();
        for mut channel in channels {
            let outpoint = channel.channel.outpoint();
            if !channel.channel.params().refund_is_valid(tip)
                || !chain.unspent(outpoint).await.map_err(ClientError::Chain)?
            {
                continue;
            }
            match chain.broadcast(&channel.refund).await {
                Ok(txid) => {
                    refunded.push(txid);
                    if state.channel.as_ref().is_some_and(|(c, _)| c.id() == channel.id()) {
                        self.retire(&mut state, true).await?;
                    } else {
                        channel.retired = true;
                        channel.closed = true;
                        self.inner.store.save(&channel).await.map_err(ClientError::Store)?;
                    }
                }
                Err(error) => tracing::warn!(%error, %outpoint, "refund refused; retrying later"),
            }
        }
        Ok(refunded)
    }

    /// The idle close: whenever the payer has a channel and has sent nothing on it for
    /// `idle` (and no metered stream runs), closes it fairly ([`close`](Self::close), through
    /// the payer's [transport](super::PayerBuilder::transport)): the server settles at what it
    /// metered and the unused prepaid amount comes back. The next request opens a new
    /// channel. Runs forever; spawn it beside the client
    /// (`tokio::spawn(payer.clone().close_when_idle(Duration::from_secs(3_600)))`). A failed
    /// close is logged and tried again at the next check (every quarter of `idle`).
    ///
    /// The close is the client's to start: the server cannot sign for the client, and a
    /// server-side idle timer would cost a store write per request to know when the channel
    /// was last used. A request sent while the close is under way meets a closing channel and
    /// opens a new one.
    pub async fn close_when_idle(self, idle: std::time::Duration) {
        let every = (idle / 4).max(std::time::Duration::from_millis(10));
        let since = std::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            if self.read_current().is_none() || !self.idle_since(since, idle) {
                continue;
            }
            match self.close().await {
                Ok(closed) => tracing::info!(
                    channel = %closed.channel,
                    server_amount = %closed.server_amount,
                    "idle channel closed"
                ),
                Err(error) => tracing::warn!(%error, "closing the idle channel failed"),
            }
        }
    }

    /// Runs [`refund_expired`](Self::refund_expired) every `every`, forever: spawn it beside
    /// the client (`tokio::spawn(payer.clone().refund_when_final(Duration::from_secs(600)))`)
    /// and the money of a vanished server comes back without anyone asking. Failures are
    /// logged and retried at the next round.
    pub async fn refund_when_final(self, every: std::time::Duration) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match self.refund_expired().await {
                Ok(refunds) if !refunds.is_empty() => {
                    tracing::info!(?refunds, "refunds of expired channels broadcast");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "refunding expired channels failed"),
            }
        }
    }
}

/// The server's answer to a close of channel `id`, checked: its settlement is one of
/// `channel`'s payments (`fair`, or the latest) that pays the server no more than the latest,
/// named by its txid. The answer's own `channel` is not believed.
fn checked_close(
    id: ChannelId,
    channel: &ClientChannel,
    fair: Option<&Transaction>,
    answer: &CloseResponse,
) -> Result<Closed, ClientError> {
    let close: Transaction = deserialize_hex(&answer.close_tx)
        .map_err(|_| misbehaved(Kind::InvalidAnswer, "close: no close_tx"))?;
    let latest = channel.latest.as_ref().ok_or(ClientError::NoChannel)?;
    // The settlement must be one of our payments that pays the server no more than the
    // latest.
    let settlement = steps::check_settlement(&channel.channel, latest, fair, &close)?;
    let txid = close.compute_txid();
    if answer.txid != txid {
        return Err(misbehaved(Kind::WrongSettlement, "the settlement's txid does not match"));
    }
    Ok(Closed {
        channel: id,
        txid,
        server_amount: settlement.server_amount,
        client_amount: settlement.client_amount,
        fee: settlement.fee,
    })
}
