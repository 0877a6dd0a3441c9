//! The client's loss bound: the one rule every signing path of the client obeys.
//!
//! A server the client pays is not trusted. Whatever it answers — 402s claiming everything
//! was spent, balances, receipts, stream top-up demands — the server amount of any payment the
//! client signs on a channel is at most
//!
//! ```text
//! max(first payment, what the client counted) + one price + max_prepaid
//! ```
//!
//! where *what the client counted* is its own tally of what it received: a served answer to a
//! priced request is one unit at the price the server quoted for that route (in a 402
//! challenge or in the price table of its terms), and a metered stream's units are the
//! events or KiB the client read, at the stream's unit price. A balance header, a receipt or a
//! 402's `spent` can lower the client's estimate of what is left; they never raise what it
//! allows. See docs/SECURITY.md ("What a server can take from a client") for the cases.
//!
//! [`LossBound`] is pure (no I/O, no clock): the [`Payer`](super::Payer) feeds it what it sees
//! and asks it before every signature.

use core::fmt;
use std::collections::HashMap;

use bitcoin::Amount;

use super::SpendingPolicy;
use crate::MilliSats;
use crate::wire::{ChannelId, PriceList};

/// Routes the client remembers a quote or an unquoted count for; beyond it, the oldest
/// knowledge is not kept (an unquoted count is then valued at `max_per_request` for good).
const ROUTES: usize = 4_096;

/// The client's own count of what a channel's server earned, and the most any payment on that
/// channel may pay the server: `max(first payment, what the client counted) + one price +
/// max_prepaid` (docs/SECURITY.md, "The loss bound", gives the cases).
///
/// # Examples
///
/// ```
/// use paychan::MilliSats;
/// use paychan::bitcoin::{Amount, OutPoint};
/// use paychan::client::{LossBound, SpendingPolicy};
/// use paychan::wire::ChannelId;
///
/// let policy = SpendingPolicy::default()
///     .with_max_per_request(MilliSats::from_msat(10_000))
///     .with_max_prepaid(Amount::from_sat(1_000));
/// let channel = ChannelId::new(OutPoint::null());
/// let mut bound = LossBound::new(&policy);
/// // A channel opened with a first payment of 294 sat, after a 402 quoting 2 sat for /job.
/// bound.start(channel, Amount::from_sat(294));
/// let price = MilliSats::from_msat(2_000);
/// bound.quote("GET", "/job", price);
/// // Nothing served yet: the first payment, one price and the prepaid allowance.
/// assert_eq!(bound.allowed(price), Amount::from_sat(294 + 2 + 1_000));
/// // A server that answers "402: all spent" again gets nothing more.
/// assert!(bound.check(channel, Amount::from_sat(2_000), price, None).is_err());
/// // 500 served answers later the client has counted 1 000 sat.
/// for _ in 0..500 {
///     bound.served(channel, "GET", "/job", 200, true);
/// }
/// assert_eq!(bound.counted(), MilliSats::from_msat(1_000_000));
/// assert!(bound.check(channel, Amount::from_sat(2_002), price, None).is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct LossBound {
    max_per_request: MilliSats,
    max_prepaid: Amount,
    /// The channel counted, with what it started from: the first payment of a channel this
    /// client opened, or the latest payment of one it loaded from its store (the count of
    /// the requests before is not kept: they are taken as served).
    channel: Option<(ChannelId, Amount)>,
    /// Units counted at their route's quote, and stream units at their price.
    counted: MilliSats,
    /// Units served on routes with no quote yet: valued at `max_per_request` until a quote for
    /// the route comes (the server's own answers said they were paid: a balance or a receipt).
    unquoted: HashMap<String, u64>,
    /// Unquoted units the map had no room for.
    unquoted_overflow: u64,
    /// The prices the server quoted in 402 challenges, by route (`METHOD path`).
    quotes: HashMap<String, MilliSats>,
    /// The price table of the server's terms, when it publishes one.
    table: Option<PriceList>,
}

impl LossBound {
    /// A bound for the payer with `policy`: its `max_per_request` caps every quote, and its
    /// `max_prepaid` is what may be paid ahead of what was counted.
    pub fn new(policy: &SpendingPolicy) -> Self {
        Self {
            max_per_request: policy.max_per_request(),
            max_prepaid: policy.max_prepaid(),
            channel: None,
            counted: MilliSats::ZERO,
            unquoted: HashMap::new(),
            unquoted_overflow: 0,
            quotes: HashMap::new(),
            table: None,
        }
    }

    /// Counts `channel`, which this client opened with a first payment of `floor`, from now
    /// on: the bound is `max(floor, counted) + price + max_prepaid`. Quotes are kept (they
    /// are the server's, not the channel's); the count starts afresh. A channel loaded from
    /// the store is [`resume`](Self::resume)d instead.
    pub fn start(&mut self, channel: ChannelId, floor: Amount) {
        self.channel = Some((channel, floor));
        self.counted = MilliSats::ZERO;
        self.unquoted.clear();
        self.unquoted_overflow = 0;
    }

    /// Counts `channel`, loaded from the client's store with its latest payment `paid`, from
    /// now on: everything paid before is taken as served (the count of those requests is not
    /// saved), and what is counted from now on adds to it. A lying server may so take one
    /// more price and `max_prepaid` per load; an honest one is never stuck by a restart.
    pub fn resume(&mut self, channel: ChannelId, paid: Amount) {
        self.start(channel, Amount::ZERO);
        self.counted = MilliSats::from_sat(paid).unwrap_or(MilliSats::MAX);
    }

    /// Counts `channel`, which this client opened with a first payment of `first`, loaded with
    /// its latest payment `paid` and the count `counted` last saved (a client that saves its
    /// count with every payment and soon after every answer, as the browser client does). The
    /// count goes on from `counted`; the floor (the first payment's place in the bound) rises
    /// to `paid − max_prepaid`: the bound is `max(first, paid − max_prepaid, count) + price +
    /// max_prepaid`. A lying server gets at most one more price per load, not
    /// [`resume`](Self::resume)'s `max_prepaid`. An honest server may ask `paid + price` at
    /// once, which is allowed; later it is paid as long as the units the load lost (counted,
    /// not saved) are worth at most `max_prepaid` — so save the count well within that.
    /// (Raising the count to `paid − max_prepaid` instead, as `resume` does, is never stuck,
    /// but takes a first payment above `max_prepaid` as served and adds every later unit on
    /// top.)
    pub fn restore(&mut self, channel: ChannelId, paid: Amount, counted: MilliSats, first: Amount) {
        let floor = paid.checked_sub(self.max_prepaid).unwrap_or(Amount::ZERO);
        self.start(channel, first.max(floor));
        self.counted = counted;
    }

    /// The channel counted, if any.
    pub fn channel(&self) -> Option<ChannelId> {
        self.channel.map(|(channel, _)| channel)
    }

    /// The server quoted `price` for `method path` (a 402 challenge): later answers on that
    /// route count at it, and answers counted before without a quote are valued at it now.
    pub fn quote(&mut self, method: &str, path: &str, price: MilliSats) {
        let price = price.min(self.max_per_request);
        let route = route(method, path);
        if let Some(units) = self.unquoted.remove(&route) {
            self.counted = self.counted.saturating_add(times(price, units));
        }
        if self.quotes.len() >= ROUTES && !self.quotes.contains_key(&route) {
            self.quotes.clear();
        }
        self.quotes.insert(route, price);
    }

    /// The price table of the server's terms (`prices`; see
    /// [`PriceList`]): routes without a 402 quote are priced by it.
    pub fn price_list(&mut self, table: Option<PriceList>) {
        self.table = table;
    }

    /// What the client knows `method path` costs: its latest 402 quote, else the terms' price
    /// table (zero for a free route); `None` when neither says.
    pub fn quoted(&self, method: &str, path: &str) -> Option<MilliSats> {
        let route = route(method, path);
        if let Some(price) = self.quotes.get(&route) {
            return Some(*price);
        }
        let table = self.table.as_ref()?;
        let path = &route[method.len() + 1..];
        // A request the table refuses is not served: it costs nothing.
        Some(table.price(method, path).unwrap_or(MilliSats::ZERO).min(self.max_per_request))
    }

    /// The server answered `method path` on `channel` with `status`; `metered` when the answer
    /// says it was paid for (a `Payment-Channel-Balance` or a receipt). Counts one unit when
    /// the answer is a served, priced request: not a 402; a status below 400 on a route with a
    /// quote, or a metered answer. Returns the value counted, if any.
    pub fn served(
        &mut self,
        channel: ChannelId,
        method: &str,
        path: &str,
        status: u16,
        metered: bool,
    ) -> Option<MilliSats> {
        if self.channel() != Some(channel) || status == 402 || !(metered || status < 400) {
            return None;
        }
        match self.quoted(method, path) {
            Some(price) if price.is_zero() => None,
            Some(price) => {
                self.counted = self.counted.saturating_add(price);
                Some(price)
            }
            // Unknown: a free route, unless the server says it was paid for.
            None if !metered => None,
            None => {
                let route = route(method, path);
                let room = self.unquoted.len() < ROUTES;
                match self.unquoted.get_mut(&route) {
                    Some(units) => *units += 1,
                    None if room => {
                        self.unquoted.insert(route, 1);
                    }
                    None => self.unquoted_overflow += 1,
                }
                Some(self.max_per_request)
            }
        }
    }

    /// A metered stream on `channel` delivered units worth `cost` (the units the client read,
    /// at the stream's unit price).
    pub fn streamed(&mut self, channel: ChannelId, cost: MilliSats) {
        if self.channel() == Some(channel) {
            self.counted = self.counted.saturating_add(cost);
        }
    }

    /// What the client counted on the channel: units at their quotes, stream units, and units
    /// of routes without a quote at `max_per_request`.
    pub fn counted(&self) -> MilliSats {
        let unquoted = self.unquoted.values().sum::<u64>().saturating_add(self.unquoted_overflow);
        self.counted.saturating_add(times(self.max_per_request, unquoted))
    }

    /// The most a payment on the channel may pay the server when a request of `price` waits
    /// for it: `max(floor, counted) + price + max_prepaid` (rounded up to the sat). Zero
    /// before a channel is counted.
    pub fn allowed(&self, price: MilliSats) -> Amount {
        let Some((_, floor)) = self.channel else { return Amount::ZERO };
        let price = price.min(self.max_per_request);
        floor
            .max(self.counted().to_sat_ceil())
            .checked_add(price.to_sat_ceil())
            .and_then(|most| most.checked_add(self.max_prepaid))
            .unwrap_or(Amount::MAX)
    }

    /// Checks a payment on `channel` that pays the server `asked`, for a request of `price`
    /// (zero for a top-up no request waits for); `claimed` is what the server says was spent,
    /// for the error.
    ///
    /// # Errors
    ///
    /// [`BoundExceeded`] when `asked` is beyond [`allowed`](Self::allowed), or the channel is
    /// not the one counted.
    pub fn check(
        &self,
        channel: ChannelId,
        asked: Amount,
        price: MilliSats,
        claimed: Option<MilliSats>,
    ) -> Result<(), BoundExceeded> {
        let allowed =
            if self.channel() == Some(channel) { self.allowed(price) } else { Amount::ZERO };
        if asked <= allowed {
            return Ok(());
        }
        Err(BoundExceeded { asked, allowed, counted: self.counted(), claimed })
    }
}

fn route(method: &str, path: &str) -> String {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    format!("{method} {path}")
}

fn times(price: MilliSats, units: u64) -> MilliSats {
    price.checked_mul(units).unwrap_or(MilliSats::MAX)
}

/// A payment the client would not sign: it pays the server more than the client counted it
/// served, plus one price and `max_prepaid` (see [`LossBound`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BoundExceeded {
    /// What the payment would pay the server.
    pub asked: Amount,
    /// The most the client pays on the channel now.
    pub allowed: Amount,
    /// What the client counted served on the channel.
    pub counted: MilliSats,
    /// What the server said was spent, when it said.
    pub claimed: Option<MilliSats>,
}

impl fmt::Display for BoundExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server asks to be paid {}", self.asked)?;
        if let Some(claimed) = self.claimed {
            write!(f, " (it claims {claimed} spent)")?;
        }
        write!(
            f,
            ", but the client counted {} served: it pays at most {} on this channel",
            self.counted, self.allowed
        )
    }
}

impl std::error::Error for BoundExceeded {}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::OutPoint;

    fn bound() -> (LossBound, ChannelId) {
        let policy = SpendingPolicy::default()
            .with_max_per_request(MilliSats::from_msat(10_000))
            .with_max_prepaid(Amount::from_sat(1_000));
        let channel = ChannelId::new(OutPoint::null());
        let mut bound = LossBound::new(&policy);
        bound.start(channel, Amount::from_sat(294));
        (bound, channel)
    }

    const TWO: MilliSats = MilliSats::from_msat(2_000);

    #[test]
    fn answers_count_at_the_quote_never_at_the_servers_word() {
        let (mut bound, channel) = bound();
        bound.quote("GET", "/job", TWO);
        for _ in 0..300 {
            // No balance header, no receipt: still one unit of a quoted route.
            assert_eq!(bound.served(channel, "GET", "/job?x=1", 200, false), Some(TWO));
        }
        assert_eq!(bound.allowed(TWO), Amount::from_sat(600 + 2 + 1_000));
        // 402s, refusals without a balance and other channels count nothing.
        assert_eq!(bound.served(channel, "GET", "/job", 402, true), None);
        assert_eq!(bound.served(channel, "GET", "/job", 400, false), None);
        assert_eq!(bound.served(channel, "GET", "/job", 503, false), None);
        let other = ChannelId::new(OutPoint { vout: 1, ..OutPoint::null() });
        assert_eq!(bound.served(other, "GET", "/job", 200, true), None);
        assert_eq!(bound.counted(), MilliSats::from_msat(600_000));
    }

    #[test]
    fn unquoted_routes_count_only_when_metered_and_are_revalued_by_their_quote() {
        let (mut bound, channel) = bound();
        assert_eq!(bound.served(channel, "GET", "/free", 200, false), None);
        for _ in 0..10 {
            bound.served(channel, "GET", "/b", 200, true);
        }
        assert_eq!(bound.counted(), MilliSats::from_msat(100_000));
        bound.quote("GET", "/b", MilliSats::from_msat(5_000));
        assert_eq!(bound.counted(), MilliSats::from_msat(50_000));
    }

    #[test]
    fn the_floor_is_the_first_payment_and_quotes_are_capped() {
        let (mut bound, channel) = bound();
        bound.quote("GET", "/dear", MilliSats::from_msat(1_000_000));
        assert_eq!(bound.quoted("GET", "/dear"), Some(MilliSats::from_msat(10_000)));
        assert_eq!(bound.allowed(MilliSats::ZERO), Amount::from_sat(1_294));
        let refused = bound.check(channel, Amount::from_sat(1_295), MilliSats::ZERO, None);
        let refused = refused.unwrap_err();
        assert_eq!(refused.allowed, Amount::from_sat(1_294));
        assert!(refused.to_string().contains("counted 0 msat"), "{refused}");
        assert!(bound.check(channel, Amount::from_sat(1_294), MilliSats::ZERO, None).is_ok());
    }
}
