//! The channel's life on the server: its states, when its funding is good enough to serve on,
//! and what the settlement task does next. Pure: decisions are functions of the channel, its
//! state and what the chain reports, so they are tested without a chain or a store.
//!
//! ```text
//!            funded                  confirmations                close margin / close asked
//!  (/fund) ──────────▶ Pending ───────────────────────▶ Open ─────────────────────────▶ Closing
//!                        │  ▲ funding left the mempool   │                                 │
//!                        │  └────────────────────────────┘                      broadcast │
//!                        ▼ not confirmed in time (also from Open)                         ▼
//!                      Failed ──(funding confirms after all: rescue)──▶ Open or Closing   Closed ──▶ Settled
//! ```
//!
//! Pending also moves straight to Closing (a close asked before the confirmations), and
//! Closing and Closed to Failed (no payment to close with, the funding gone, the refund
//! mined instead). [`ChannelState::may_move_to`] is the table, and every store refuses any
//! other move.

use core::fmt;

use bitcoin::absolute::LockTime;
use bitcoin::{Amount, Transaction};
use serde::{Deserialize, Serialize};

use super::{ChainTip, Channel};

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChannelState {
    /// Funded, waiting for the funding's confirmations; no payments yet.
    Pending,
    /// Funded; payments are accepted.
    Open,
    /// A close was requested or the expiry is near; no new payments.
    Closing,
    /// The close transaction was broadcast; waiting for confirmation.
    Closed,
    /// The close confirmed.
    Settled,
    /// The funding failed (double-spent or never confirmed).
    Failed,
}

impl ChannelState {
    /// Every state, in the order a channel lives through them.
    ///
    /// ```
    /// use paychan::channel::ChannelState;
    /// assert_eq!(ChannelState::ALL.first(), Some(&ChannelState::Pending));
    /// assert!(ChannelState::ALL.iter().all(|s| ChannelState::from_name(s.as_str()) == Ok(*s)));
    /// ```
    pub const ALL: [Self; 6] =
        [Self::Pending, Self::Open, Self::Closing, Self::Closed, Self::Settled, Self::Failed];

    /// The state's stable name, as stored by the database backends and sent in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Open => "open",
            Self::Closing => "closing",
            Self::Closed => "closed",
            Self::Settled => "settled",
            Self::Failed => "failed",
        }
    }

    /// Whether a channel may move from this state to `to`: the one table of legal moves (see
    /// the lifecycle diagram in `src/channel/lifecycle.rs`). Every store refuses any other move
    /// ([`StoreError::IllegalMove`](crate::store::StoreError::IllegalMove)).
    ///
    /// ```
    /// use paychan::channel::ChannelState::*;
    /// assert!(Open.may_move_to(Closing) && Closing.may_move_to(Closed));
    /// assert!(!Closed.may_move_to(Open), "a broadcast close is never undone");
    /// assert!(!Settled.may_move_to(Failed), "settled is final");
    /// ```
    pub const fn may_move_to(self, to: Self) -> bool {
        use ChannelState::*;
        matches!(
            (self, to),
            (Pending, Open | Closing | Failed)
                | (Open, Pending | Closing | Failed)
                | (Closing, Closed | Failed)
                | (Closed, Settled | Failed)
                | (Failed, Open | Closing)
        )
    }

    /// Parses a name written by [`as_str`](Self::as_str).
    ///
    /// # Errors
    ///
    /// [`ParseChannelStateError`] for any other name (a store maps it to
    /// [`StoreError::Unavailable`](crate::store::StoreError::Unavailable): the stored data is
    /// not ours).
    pub fn from_name(name: &str) -> Result<Self, ParseChannelStateError> {
        [Self::Pending, Self::Open, Self::Closing, Self::Closed, Self::Settled, Self::Failed]
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| ParseChannelStateError(name.chars().take(32).collect()))
    }
}

/// A state name that is none of [`ChannelState::as_str`]'s.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParseChannelStateError(String);

impl fmt::Display for ParseChannelStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown channel state {:?}", self.0)
    }
}

impl std::error::Error for ParseChannelStateError {}

impl core::str::FromStr for ChannelState {
    type Err = ParseChannelStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s)
    }
}

/// When a funding is good enough to serve requests on, and when it has failed.
///
/// The same policy is given to the server's [`Negotiation`](crate::server::Negotiation)
/// (which creates the channel pending or open) and to [`Settlement`](crate::settlement::Settlement) (which opens pending
/// channels and fails bad fundings).
///
/// **Zero-confirmation channels.** An unconfirmed funding can be replaced (Bitcoin Core
/// relays full replace-by-fee since v28), and every request served on a replaced funding is
/// lost. So a channel is served before its funding confirms only when all of these hold
/// (see [`allows_zero_conf`](Self::allows_zero_conf)): its value is at most
/// [`zero_conf_max_value`](Self::with_zero_conf_max_value) (default 100 000 sat: the most a
/// double spend can take), the funding is version 1 or 2 (a TRUC funding could not have an
/// unconfirmed payment child), does not signal replaceability, and spends only confirmed
/// outputs. Every settlement pass re-checks the funding output in the mempool: a channel whose
/// unconfirmed funding vanished is suspended (pending: 409 `channel-pending`) at once, not a
/// block later. Other channels wait for `min_confirmations` (default 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct FundingPolicy {
    min_confirmations: u32,
    confirm_within_blocks: u32,
    zero_conf_max_value: Amount,
}

impl Default for FundingPolicy {
    /// Serve at one confirmation, or at once for a channel of at most 100 000 sat with a safe
    /// funding (see the type's docs); fail the channel if the funding has not confirmed 144
    /// blocks (about a day) after it was broadcast.
    fn default() -> Self {
        Self {
            min_confirmations: 1,
            confirm_within_blocks: 144,
            zero_conf_max_value: Amount::from_sat(100_000),
        }
    }
}

impl FundingPolicy {
    /// Requests are served once the funding has `confirmations` (a value of 0 is taken as 1:
    /// zero-confirmation channels are governed by
    /// [`with_zero_conf_max_value`](Self::with_zero_conf_max_value)). Until then the channel
    /// is pending: requests get 409 `channel-pending`.
    pub fn with_min_confirmations(mut self, confirmations: u32) -> Self {
        self.min_confirmations = confirmations.max(1);
        self
    }

    /// Serve channels of at most `value` before their funding confirms (when the funding is
    /// safe enough; see the type's docs). `Amount::ZERO` turns zero-confirmation channels off.
    pub fn with_zero_conf_max_value(mut self, value: Amount) -> Self {
        self.zero_conf_max_value = value;
        self
    }

    /// A funding that has not confirmed `blocks` after it was broadcast fails the channel.
    pub fn with_confirm_within_blocks(mut self, blocks: u32) -> Self {
        self.confirm_within_blocks = blocks;
        self
    }

    /// Confirmations needed before requests are served (outside the zero-confirmation cap).
    pub fn min_confirmations(&self) -> u32 {
        self.min_confirmations
    }

    /// The largest channel served before its funding confirms.
    pub fn zero_conf_max_value(&self) -> Amount {
        self.zero_conf_max_value
    }

    /// Whether a channel of `value` funded by `funding` may be served before it confirms.
    /// `prevout_confirmations[i]` is the depth of the output spent by input `i` (0: in the
    /// mempool).
    pub fn allows_zero_conf(
        &self,
        value: Amount,
        funding: &Transaction,
        prevout_confirmations: &[u32],
    ) -> bool {
        value <= self.zero_conf_max_value
            && value > Amount::ZERO
            && matches!(funding.version.0, 1 | 2)
            && !funding.is_explicitly_rbf()
            && prevout_confirmations.len() == funding.input.len()
            && prevout_confirmations.iter().all(|&depth| depth > 0)
    }

    /// The state a freshly funded channel starts in: open when
    /// [`allows_zero_conf`](Self::allows_zero_conf), pending otherwise.
    pub fn initial_state(
        &self,
        value: Amount,
        funding: &Transaction,
        prevout_confirmations: &[u32],
    ) -> ChannelState {
        if self.allows_zero_conf(value, funding, prevout_confirmations) {
            ChannelState::Open
        } else {
            ChannelState::Pending
        }
    }

    /// What to do with a pending or open `channel` in `state`, whose funding was broadcast at
    /// height `funded_at` (0: unknown) and whose funding output stands at `funding` (its
    /// depth; `None`: not in the UTXO set nor the mempool) at `tip`. Pure: the settlement
    /// task's funding watch is this decision plus the store transition it names (through
    /// [`ChannelRecord::funding_action`](crate::store::ChannelRecord::funding_action)).
    pub fn funding_action(
        &self,
        channel: &Channel,
        state: ChannelState,
        funded_at: u32,
        funding: Option<u32>,
        tip: ChainTip,
    ) -> FundingAction {
        let deadline = funded_at.saturating_add(self.confirm_within_blocks);
        // A channel recorded before funding heights were (0) has no deadline.
        let late = funded_at != 0 && tip.height >= deadline;
        match funding {
            // The funding output exists: at the close margin the channel is closed, whatever
            // its state (a pending channel's payments are valid too).
            Some(_) if channel.params().is_closing(tip) => FundingAction::Close,
            Some(depth) if depth >= 1 => match state {
                ChannelState::Pending if depth >= self.min_confirmations => FundingAction::Open,
                _ => FundingAction::Keep,
            },
            Some(_) | None if late => FundingAction::Fail,
            Some(_) => FundingAction::Keep,
            // Not in the mempool nor the UTXO set: replaced, evicted or not yet seen by this
            // backend. Never evidence of failure by itself: stop serving until it is back.
            None => match state {
                ChannelState::Open => FundingAction::Suspend,
                _ => FundingAction::Keep,
            },
        }
    }
}

/// The decision of [`FundingPolicy::funding_action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FundingAction {
    /// Nothing changes.
    Keep,
    /// Pending → open: the funding has enough confirmations.
    Open,
    /// Open → pending: the unconfirmed funding vanished from the mempool; serve nothing until
    /// it is back.
    Suspend,
    /// → closing: the close margin is reached and the funding output is unspent.
    Close,
    /// → failed: the funding did not confirm in time.
    Fail,
}

/// Whether a close of `channel` that has waited in the mempool since height `waiting_since`
/// should be bumped by a child (CPFP) at `tip`: once it has waited `after_blocks`, or at once
/// when the refund's lock time is that close (then a bump is urgent, whatever the wait).
/// Pure: the settlement task's bump decision.
///
/// # Examples
///
/// ```
/// # use paychan::bitcoin::{absolute::LockTime, Amount, CompressedPublicKey, OutPoint, ScriptBuf, secp256k1::SecretKey};
/// use paychan::channel::{ChainTip, Terms, bump_is_due};
/// # let secp = paychan::bitcoin::secp256k1::Secp256k1::new();
/// # let key = |b| CompressedPublicKey(SecretKey::from_slice(&[b; 32]).unwrap().public_key(&secp));
/// # let script = |b| ScriptBuf::new_p2wpkh(&key(b).wpubkey_hash());
/// let tip = |height| ChainTip { height, median_time_past: 0 };
/// let params = Terms::default().agree(key(1), key(2), Amount::from_sat(100_000),
///     LockTime::from_height(1_000 + 1_008).unwrap(), script(1), script(2), tip(1_000)).unwrap();
/// let channel = params.at(OutPoint::null());
/// assert!(!bump_is_due(&channel, 1_900, tip(1_902), 3), "waited 2 blocks of 3");
/// assert!(bump_is_due(&channel, 1_900, tip(1_903), 3), "waited 3");
/// assert!(bump_is_due(&channel, 2_005, tip(2_005), 3), "3 blocks before the expiry: urgent");
/// ```
pub fn bump_is_due(
    channel: &Channel,
    waiting_since: u32,
    tip: ChainTip,
    after_blocks: u32,
) -> bool {
    let urgent = match channel.params().expiry {
        LockTime::Blocks(height) => {
            tip.height.saturating_add(after_blocks) >= height.to_consensus_u32()
        }
        LockTime::Seconds(time) => {
            let soon = after_blocks.saturating_mul(600);
            tip.median_time_past.saturating_add(soon) >= time.to_consensus_u32()
        }
    };
    urgent || tip.height >= waiting_since.saturating_add(after_blocks)
}
