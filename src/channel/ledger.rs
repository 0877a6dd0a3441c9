//! A channel's money as the server counts it, and the one definition of every move of it.
//!
//! `paid` is what the client's best payment pays the server; `spent` what requests consumed;
//! `leased` what nodes hold in live leases (reserved, maybe being served); `forfeited` what
//! lapsed leases held (maybe served, so never available again). The **balance** new requests
//! can draw on is `paid − spent − leased − forfeited`.
//!
//! Every store keeps these four numbers and changes them only as the methods here do: the
//! memory store through this type, the SQL and Lua backends in their own language, checked
//! against this type by the store conformance suite's model-based test
//! (`store::conformance`), which applies random operations to a backend and to this model and
//! requires the same answers.

use crate::MilliSats;

/// A channel's money: what was paid, spent, leased and forfeited; the balance new requests
/// can draw on is paid − spent − leased − forfeited. Every store moves these four numbers only
/// as these methods do (the memory store through this type; the SQL and Lua backends are held
/// to it by the store conformance suite's model-based check).
///
/// # Examples
///
/// ```
/// use paychan::MilliSats;
/// use paychan::channel::Ledger;
///
/// let msat = MilliSats::from_msat;
/// let ledger = Ledger::paid(msat(10_000));
/// let ledger = ledger.debit(msat(3_000)).unwrap();
/// assert_eq!(ledger.balance(), msat(7_000));
/// // A lease reserves part of the balance; settling it spends what was used.
/// let ledger = ledger.lease(msat(4_000)).unwrap().settle(msat(4_000), msat(1_000));
/// assert_eq!((ledger.spent, ledger.leased, ledger.balance()), (msat(4_000), msat(0), msat(6_000)));
/// assert_eq!(ledger.debit(msat(6_001)), None, "never beyond the balance");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    /// What the best payment pays the server.
    pub paid: MilliSats,
    /// What requests consumed (settled leases included).
    pub spent: MilliSats,
    /// What live leases hold.
    pub leased: MilliSats,
    /// What lapsed leases held.
    pub forfeited: MilliSats,
}

impl Ledger {
    /// A fresh channel's ledger: `paid` paid, nothing else.
    pub const fn paid(paid: MilliSats) -> Self {
        Self { paid, spent: MilliSats::ZERO, leased: MilliSats::ZERO, forfeited: MilliSats::ZERO }
    }

    /// What the channel has committed: spent, leased and forfeited. A fair close must pay at
    /// least this.
    pub fn committed(&self) -> MilliSats {
        self.spent.saturating_add(self.leased).saturating_add(self.forfeited)
    }

    /// What new requests can draw on: paid − spent − leased − forfeited.
    pub fn balance(&self) -> MilliSats {
        self.paid.saturating_sub(self.committed())
    }

    /// paid − spent: the balance as the client sees it (leases count as unspent until settled).
    pub fn unspent(&self) -> MilliSats {
        self.paid.saturating_sub(self.spent)
    }

    /// A new best payment that pays `paid`; `None` unless it pays strictly more.
    #[must_use]
    pub fn pay(self, paid: MilliSats) -> Option<Self> {
        (paid > self.paid).then_some(Self { paid, ..self })
    }

    /// `amount` spent; `None` if the balance does not cover it.
    #[must_use]
    pub fn debit(self, amount: MilliSats) -> Option<Self> {
        self.balance().checked_sub(amount)?;
        Some(Self { spent: self.spent.checked_add(amount)?, ..self })
    }

    /// `amount` of an earlier debit given back (never below zero spent).
    #[must_use]
    pub fn credit(self, amount: MilliSats) -> Self {
        Self { spent: self.spent.saturating_sub(amount), ..self }
    }

    /// `amount` reserved for a lease; `None` if the balance does not cover it.
    #[must_use]
    pub fn lease(self, amount: MilliSats) -> Option<Self> {
        self.balance().checked_sub(amount)?;
        Some(Self { leased: self.leased.checked_add(amount)?, ..self })
    }

    /// A lease that held `held` settled: `used` of it (at most `held`) spent, the rest back in
    /// the balance.
    #[must_use]
    pub fn settle(self, held: MilliSats, used: MilliSats) -> Self {
        Self {
            leased: self.leased.saturating_sub(held),
            spent: self.spent.saturating_add(used.min(held)),
            ..self
        }
    }

    /// A lease that held `held` lapsed without being settled: all of it forfeited.
    #[must_use]
    pub fn forfeit(self, held: MilliSats) -> Self {
        Self {
            leased: self.leased.saturating_sub(held),
            forfeited: self.forfeited.saturating_add(held),
            ..self
        }
    }

    /// The fair close: the channel settled with a payment that pays `paid` (possibly less
    /// than the best); `None` if it does not cover what the channel committed.
    #[must_use]
    pub fn close_with(self, paid: MilliSats) -> Option<Self> {
        (self.committed() <= paid).then_some(Self { paid, ..self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msat(n: u64) -> MilliSats {
        MilliSats::from_msat(n)
    }

    #[test]
    fn every_move_keeps_the_balance_identity_and_refuses_what_is_not_there() {
        let l = Ledger::paid(msat(1_000));
        assert_eq!(l.pay(msat(1_000)), None, "not more");
        let l = l.pay(msat(2_000)).unwrap();
        let l = l.debit(msat(500)).unwrap();
        let l = l.lease(msat(1_000)).unwrap();
        assert_eq!(l.debit(msat(501)), None);
        assert_eq!(l.lease(msat(501)), None);
        let l = l.forfeit(msat(400)).settle(msat(600), msat(900));
        // 600 held, "900 used": only the 600 held can have been used.
        assert_eq!(
            l,
            Ledger { paid: msat(2_000), spent: msat(1_100), leased: msat(0), forfeited: msat(400) }
        );
        assert_eq!((l.committed(), l.balance(), l.unspent()), (msat(1_500), msat(500), msat(900)));
        assert_eq!(l.close_with(msat(1_499)), None);
        assert_eq!(l.close_with(msat(1_500)).unwrap().paid, msat(1_500));
        assert_eq!(l.credit(msat(5_000)).spent, msat(0));
    }
}
