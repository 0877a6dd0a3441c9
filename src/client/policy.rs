use core::fmt;

use std::time::Duration;

use bitcoin::{Amount, FeeRate};

use crate::MilliSats;

/// What a client is willing to spend. Every refusal is a typed [`PolicyRefusal`], never a
/// silent skip.
///
/// # Examples
///
/// ```
/// use bitcoin::Amount;
/// use paychan::MilliSats;
/// use paychan::client::{PolicyRefusal, SpendingPolicy};
///
/// let policy = SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(5_000));
/// assert!(policy.check_price(MilliSats::from_msat(5_000)).is_ok());
/// assert!(matches!(
///     policy.check_price(MilliSats::from_msat(5_001)),
///     Err(PolicyRefusal::PriceTooHigh { .. })
/// ));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct SpendingPolicy {
    max_channel_value: Amount,
    max_per_request: MilliSats,
    max_total: Amount,
    max_prepaid: Amount,
    max_lifetime_blocks: u32,
    max_fee_rate: FeeRate,
    auto_open: bool,
    max_opens: (u32, Duration),
    max_locked: Amount,
    max_unsigned_receipts: u32,
}

impl Default for SpendingPolicy {
    /// At most 100 000 sat per channel, 10 sat per request, 1 000 000 sat in total, 1 000 sat
    /// prepaid beyond a request's price, channels locked for at most 4 320 blocks (about 30
    /// days); fee rates the server sets (funding, refund, payments) of at most 100 sat/vB;
    /// opening channels automatically allowed, at most 3 times an hour per server; at most
    /// 1 000 000 sat locked in channels whose money is not back yet; at most 2 048 receipts in
    /// a row left unsigned (the default server signs every 1 024 or every second). The budget (`max_total`) counts what was paid to servers and the
    /// fees of the funding transactions.
    fn default() -> Self {
        Self {
            max_channel_value: Amount::from_sat(100_000),
            max_per_request: MilliSats::from_msat(10_000),
            max_total: Amount::from_sat(1_000_000),
            max_prepaid: Amount::from_sat(1_000),
            max_lifetime_blocks: 4_320,
            max_fee_rate: FeeRate::from_sat_per_vb_u32(100),
            auto_open: true,
            max_opens: (3, Duration::from_secs(3_600)),
            max_locked: Amount::from_sat(1_000_000),
            max_unsigned_receipts: 2_048,
        }
    }
}

impl SpendingPolicy {
    /// The most receipts in a row the server may leave unsigned (it signs in batches: see
    /// `Payment-Receipt-Unsigned` in docs/HTTP.md; an honest server signs by the time the
    /// client holds half of them, the other half being room for requests in flight); a server
    /// that leaves more is paid no more. 0 to 3 ask for every receipt signed.
    pub fn with_max_unsigned_receipts(mut self, max: u32) -> Self {
        self.max_unsigned_receipts = max;
        self
    }

    /// The most receipts in a row the server may leave unsigned.
    pub fn max_unsigned_receipts(&self) -> u32 {
        self.max_unsigned_receipts
    }

    /// The largest channel the client funds.
    pub fn with_max_channel_value(mut self, max: Amount) -> Self {
        self.max_channel_value = max;
        self
    }

    /// The highest price of one request the client pays.
    pub fn with_max_per_request(mut self, max: MilliSats) -> Self {
        self.max_per_request = max;
        self
    }

    /// The most the client pays servers in total, over all channels.
    pub fn with_max_total(mut self, max: Amount) -> Self {
        self.max_total = max;
        self
    }

    /// The highest price of one request the client pays.
    pub fn max_per_request(&self) -> MilliSats {
        self.max_per_request
    }

    /// The most the client pays servers in total.
    pub fn max_total(&self) -> Amount {
        self.max_total
    }

    /// The most a top-up pays beyond what the refused request needs (servers suggest prepaying
    /// a top-up; this bounds it).
    pub fn with_max_prepaid(mut self, max: Amount) -> Self {
        self.max_prepaid = max;
        self
    }

    /// The longest the client locks its coins in a channel (until the refund is valid), in
    /// blocks.
    pub fn with_max_lifetime_blocks(mut self, max: u32) -> Self {
        self.max_lifetime_blocks = max;
        self
    }

    /// The largest channel the client funds.
    pub fn max_channel_value(&self) -> Amount {
        self.max_channel_value
    }

    /// The most a top-up pays beyond what the refused request needs.
    pub fn max_prepaid(&self) -> Amount {
        self.max_prepaid
    }

    /// The highest fee rate the client pays where the server sets it: the funding's floor and
    /// the channel's minimum rate, which every payment and the refund pay.
    pub fn with_max_fee_rate(mut self, max: FeeRate) -> Self {
        self.max_fee_rate = max;
        self
    }

    /// Checks a fee rate the server sets.
    ///
    /// # Errors
    ///
    /// [`PolicyRefusal::FeeRateTooHigh`].
    pub fn check_fee_rate(&self, rate: FeeRate) -> Result<(), PolicyRefusal> {
        if rate > self.max_fee_rate {
            return Err(PolicyRefusal::FeeRateTooHigh { rate, max: self.max_fee_rate });
        }
        Ok(())
    }

    /// Whether the client may open a channel by itself when a server asks for payment.
    pub fn with_auto_open(mut self, allowed: bool) -> Self {
        self.auto_open = allowed;
        self
    }

    /// At most `count` channels opened automatically (on a 402) with one server per `period`:
    /// a server that keeps answering `unknown-channel` cannot make the client lock a channel
    /// per request. Opening by hand ([`Payer::open`](super::Payer::open)) is not counted.
    pub fn with_max_opens(mut self, count: u32, period: Duration) -> Self {
        self.max_opens = (count, period);
        self
    }

    /// How many automatic openings per period the policy allows.
    pub fn max_opens(&self) -> (u32, Duration) {
        self.max_opens
    }

    /// The most the client keeps locked in channels whose money is not back yet (not closed,
    /// not refunded, refund not yet valid), counting the one it would open.
    pub fn with_max_locked(mut self, max: Amount) -> Self {
        self.max_locked = max;
        self
    }

    /// Checks locking `more` in a new channel while `locked` is already in channels.
    ///
    /// # Errors
    ///
    /// [`PolicyRefusal::LockedTooMuch`].
    pub fn check_lock(&self, locked: Amount, more: Amount) -> Result<(), PolicyRefusal> {
        match locked.checked_add(more) {
            Some(total) if total <= self.max_locked => Ok(()),
            _ => Err(PolicyRefusal::LockedTooMuch { locked, more, max: self.max_locked }),
        }
    }

    /// Checks opening a channel of `value`.
    ///
    /// # Errors
    ///
    /// [`PolicyRefusal::AutoOpenDisabled`] or [`PolicyRefusal::ChannelTooLarge`].
    pub fn check_open(&self, value: Amount, automatic: bool) -> Result<(), PolicyRefusal> {
        if automatic && !self.auto_open {
            return Err(PolicyRefusal::AutoOpenDisabled);
        }
        if value > self.max_channel_value {
            return Err(PolicyRefusal::ChannelTooLarge { value, max: self.max_channel_value });
        }
        Ok(())
    }

    /// Checks locking coins for `blocks` (the shortest lifetime the server accepts, or the
    /// client's own choice).
    ///
    /// # Errors
    ///
    /// [`PolicyRefusal::LifetimeTooLong`].
    pub fn check_lifetime(&self, blocks: u32) -> Result<(), PolicyRefusal> {
        if blocks > self.max_lifetime_blocks {
            return Err(PolicyRefusal::LifetimeTooLong { blocks, max: self.max_lifetime_blocks });
        }
        Ok(())
    }

    /// Checks paying `price` for one request.
    ///
    /// # Errors
    ///
    /// [`PolicyRefusal::PriceTooHigh`].
    pub fn check_price(&self, price: MilliSats) -> Result<(), PolicyRefusal> {
        if price > self.max_per_request {
            return Err(PolicyRefusal::PriceTooHigh { price, max: self.max_per_request });
        }
        Ok(())
    }

    /// Checks committing `more` to servers when `committed` is already paid over all channels.
    ///
    /// # Errors
    ///
    /// [`PolicyRefusal::BudgetExhausted`].
    pub fn check_spend(&self, committed: Amount, more: Amount) -> Result<(), PolicyRefusal> {
        match committed.checked_add(more) {
            Some(total) if total <= self.max_total => Ok(()),
            _ => Err(PolicyRefusal::BudgetExhausted { committed, more, max: self.max_total }),
        }
    }
}

/// Why the client's policy refused to spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyRefusal {
    /// The server asks for a channel larger than the client funds.
    ChannelTooLarge {
        /// Requested value.
        value: Amount,
        /// The policy's maximum.
        max: Amount,
    },
    /// One request costs more than the client pays per request.
    PriceTooHigh {
        /// The price.
        price: MilliSats,
        /// The policy's maximum.
        max: MilliSats,
    },
    /// Paying more would exceed the client's total budget.
    BudgetExhausted {
        /// Already paid over all channels.
        committed: Amount,
        /// What paying on would add.
        more: Amount,
        /// The policy's maximum.
        max: Amount,
    },
    /// A channel would have to be opened, and the policy forbids doing it automatically.
    AutoOpenDisabled,
    /// The channel would lock the client's coins for longer than the policy allows.
    LifetimeTooLong {
        /// The lifetime, in blocks.
        blocks: u32,
        /// The policy's maximum.
        max: u32,
    },
    /// The client already opened the policy's maximum of channels with this server in the
    /// period.
    TooManyOpens {
        /// The policy's maximum.
        count: u32,
        /// Per this period.
        period: Duration,
    },
    /// A new channel would lock more than the policy allows in channels not yet closed.
    LockedTooMuch {
        /// Already locked.
        locked: Amount,
        /// The new channel's value.
        more: Amount,
        /// The policy's maximum.
        max: Amount,
    },
    /// The server sets a fee rate above the policy's maximum.
    FeeRateTooHigh {
        /// The rate.
        rate: FeeRate,
        /// The policy's maximum.
        max: FeeRate,
    },
    /// A 402 asks for a payment beyond the refused request's price and the policy's
    /// `max_prepaid`.
    TopUpTooLarge {
        /// What the server asks the payment to pay in total.
        asked: Amount,
        /// The most the policy lets it pay in total.
        max: Amount,
    },
}

impl fmt::Display for PolicyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ChannelTooLarge { value, max } => {
                write!(f, "a channel of {value} exceeds the policy's maximum of {max}")
            }
            Self::PriceTooHigh { price, max } => {
                write!(f, "a price of {price} exceeds the policy's maximum of {max} per request")
            }
            Self::BudgetExhausted { committed, more, max } => {
                write!(f, "paying {more} more on top of {committed} exceeds the budget of {max}")
            }
            Self::AutoOpenDisabled => f.write_str("opening channels automatically is disabled"),
            Self::TooManyOpens { count, period } => write!(
                f,
                "already {count} channels opened automatically with this server in {}s",
                period.as_secs()
            ),
            Self::LifetimeTooLong { blocks, max } => {
                write!(f, "a channel of {blocks} blocks exceeds the policy's maximum of {max}")
            }
            Self::LockedTooMuch { locked, more, max } => write!(
                f,
                "locking {more} more on top of {locked} exceeds the policy's maximum of {max}"
            ),
            Self::FeeRateTooHigh { rate, max } => {
                let (rate, max) = (rate.to_sat_per_vb_ceil(), max.to_sat_per_vb_floor());
                write!(
                    f,
                    "a fee rate of {rate} sat/vB exceeds the policy's maximum of {max} sat/vB"
                )
            }
            Self::TopUpTooLarge { asked, max } => {
                write!(f, "a top-up to {asked} exceeds what the request needs plus prepaid ({max})")
            }
        }
    }
}

impl std::error::Error for PolicyRefusal {}
