//! What the server charged, judged without I/O: the balances it reports and the receipts it
//! signs, against the policy's `max_per_request` per request sent. The Rust [`Payer`] and the
//! browser client (`web/`) both keep one [`ChargeWatch`] per server; a server it catches
//! charging more than allowed, or signing a receipt that does not verify or add up, is paid no
//! more.
//!
//! It complements the [`LossBound`](super::LossBound), which caps what a payment may pay;
//! the watch checks what the server *says* it charged.
//!
//! [`Payer`]: crate::client::Payer

use bitcoin::Amount;
use bitcoin::secp256k1::PublicKey;

use super::SpendingPolicy;
use super::steps::{Misbehavior, MisbehaviorKind, StepError};
use crate::MilliSats;
use crate::wire::{ChannelId, Receipt, UnsignedReceipts};

/// The payment a request carried, as the [`ChargeWatch`] judges its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SentPayment {
    /// The channel paid on.
    pub channel: ChannelId,
    /// What the payment pays the server in total.
    pub paid: Amount,
    /// The channel's server key K2: it signs the server's receipts.
    pub server_key: PublicKey,
}

impl SentPayment {
    /// The payment of `paid` on `channel`, whose server key is `server_key`.
    pub fn new(channel: ChannelId, paid: Amount, server_key: PublicKey) -> Self {
        Self { channel, paid, server_key }
    }

    fn paid_msat(&self) -> MilliSats {
        MilliSats::from_sat(self.paid).unwrap_or(MilliSats::MAX)
    }
}

/// What the server charged on the current channel, checked against the policy's
/// `max_per_request`: the server's reported balance gives a lower bound of what it spent
/// (`paid by the request's payment − balance`), which may not grow by more than
/// `max_per_request` per request the client sent on the channel; every receipt must verify
/// under the channel's K2, be for the request and the payment it answers, and the spent it
/// states must add up with the receipts before it.
///
/// # Examples
///
/// ```
/// use paychan::client::SpendingPolicy;
/// use paychan::client::charges::ChargeWatch;
///
/// let watch = ChargeWatch::new(&SpendingPolicy::default());
/// assert!(watch.check().is_ok());
/// assert!(watch.latest_receipt().is_none());
/// ```
#[derive(Debug, Clone)]
pub struct ChargeWatch {
    /// The policy's `max_per_request` and `max_prepaid` (msat).
    max: MilliSats,
    prepaid: MilliSats,
    /// Whether a paid answer without a receipt stops the payments.
    require_receipts: bool,
    /// The most receipts in a row the server may leave unsigned.
    max_unsigned: u32,
    /// Unsigned receipts received on the channel since the last signed one.
    unsigned: u32,
    /// The last receipt the server signed (and this watch verified), on any channel.
    latest_signed: Option<Receipt>,
    pub(crate) channel: Option<ChannelId>,
    /// The spent the judgement starts from: zero for a channel this client opened, the first
    /// report for a channel loaded from a store (earlier requests are not known).
    baseline: Option<MilliSats>,
    /// Allowed beyond the baseline from the start: `max_prepaid` when the baseline is a
    /// report (a server of several nodes serving from leases reports what other nodes used
    /// of theirs only once they settle it, so a first report may miss up to the prepaid
    /// balance they hold), zero for a channel this client opened.
    slack: MilliSats,
    /// Requests sent on the channel since tracking started.
    sends: u64,
    /// Set once the server charged more than the policy allows: no more payments.
    overcharged: Option<(MilliSats, MilliSats)>,
    /// Receipts received on the channel, and the sum of the prices they state.
    receipts: u64,
    receipted: MilliSats,
    /// The last valid receipt, on any channel.
    latest_receipt: Option<Receipt>,
    /// The last balance the server reported, with what the payment its request carried paid.
    reported: Option<(MilliSats, MilliSats)>,
    /// Set once a receipt did not verify or add up: no more payments.
    bad_receipt: Option<String>,
    /// Metered streams running (on any channel): each may have been debited up to
    /// `max_prepaid` beyond what the client has read of it.
    pub(crate) open_streams: u32,
    /// What the channel's streams delivered, by the client's own count.
    streamed: MilliSats,
    /// Whether a stream on the channel was cut before the server ended it (its unread units
    /// are allowed once per channel).
    cut: bool,
}

impl ChargeWatch {
    /// A watch under `policy`, of no channel yet.
    pub fn new(policy: &SpendingPolicy) -> Self {
        let prepaid = MilliSats::from_sat(policy.max_prepaid()).unwrap_or(MilliSats::MAX);
        let mut watch = Self::empty(policy.max_per_request(), prepaid, false);
        watch.max_unsigned = policy.max_unsigned_receipts();
        watch
    }

    fn empty(max: MilliSats, prepaid: MilliSats, require_receipts: bool) -> Self {
        Self {
            max,
            prepaid,
            require_receipts,
            max_unsigned: 0,
            unsigned: 0,
            latest_signed: None,
            channel: None,
            baseline: None,
            slack: MilliSats::ZERO,
            sends: 0,
            overcharged: None,
            receipts: 0,
            receipted: MilliSats::ZERO,
            latest_receipt: None,
            reported: None,
            bad_receipt: None,
            open_streams: 0,
            streamed: MilliSats::ZERO,
            cut: false,
        }
    }

    /// With `required`, a paid answer or a stream without a receipt stops the payments (see
    /// [`note_missing_receipt`](Self::note_missing_receipt)).
    #[must_use]
    pub fn require_receipts(mut self, required: bool) -> Self {
        self.require_receipts = required;
        self
    }

    /// A fresh watch of `channel` from `baseline`, keeping the verdicts, the last receipt and
    /// the streams running.
    fn for_channel(&mut self, channel: ChannelId, baseline: Option<MilliSats>) {
        let mut fresh = Self::empty(self.max, self.prepaid, self.require_receipts);
        fresh.max_unsigned = self.max_unsigned;
        fresh.latest_signed = self.latest_signed.take();
        fresh.channel = Some(channel);
        fresh.baseline = baseline;
        fresh.overcharged = self.overcharged;
        fresh.latest_receipt = self.latest_receipt.take();
        fresh.bad_receipt = self.bad_receipt.take();
        fresh.open_streams = self.open_streams;
        *self = fresh;
    }

    /// Starts watching a channel this client just opened: nothing spent yet.
    pub fn watch_new(&mut self, channel: ChannelId) {
        self.for_channel(channel, Some(MilliSats::ZERO));
    }

    /// A request leaves with a payment of `channel` (a channel loaded from a store starts
    /// being watched here, from the first balance the server reports).
    pub fn note_send(&mut self, channel: ChannelId) {
        if self.channel != Some(channel) {
            self.for_channel(channel, None);
        }
        self.sends += 1;
    }

    /// Whether the server may be paid: `Err` once it charged more than the policy allows
    /// or signed a receipt that does not verify or add up.
    ///
    /// # Errors
    ///
    /// [`StepError::Overcharged`], or [`StepError::Misbehaved`] with
    /// [`MisbehaviorKind::BadReceipt`].
    pub fn check(&self) -> Result<(), StepError> {
        if let Some((charged, allowed)) = self.overcharged {
            return Err(StepError::Overcharged { charged, allowed });
        }
        match &self.bad_receipt {
            Some(why) => {
                Err(StepError::Misbehaved(Misbehavior::new(MisbehaviorKind::BadReceipt, why)))
            }
            None => Ok(()),
        }
    }

    /// The server answered a request that carried `sent` with `balance` left: checks what it
    /// charged since tracking started against `max_per_request` per request sent. `current`:
    /// whether `sent` is still the latest payment (only an answer to it may set the baseline
    /// of a channel loaded from a store; an older one under-reports what was spent).
    pub fn note_answer(&mut self, sent: &SentPayment, balance: MilliSats, current: bool) {
        if self.channel != Some(sent.channel) {
            return;
        }
        let paid = sent.paid_msat();
        self.reported = Some((paid, balance));
        let spent = paid.saturating_sub(balance);
        let baseline = match self.baseline {
            Some(baseline) => baseline,
            None if current => {
                self.slack = self.prepaid;
                *self.baseline.insert(spent)
            }
            None => return,
        };
        let charged = spent.saturating_sub(baseline);
        let allowed = self
            .max
            .checked_mul(self.sends)
            .unwrap_or(MilliSats::MAX)
            .saturating_add(self.slack)
            .saturating_add(self.streamed)
            .saturating_add(self.open_stream_slack());
        if charged > allowed && self.overcharged.is_none() {
            self.overcharged = Some((charged, allowed));
        }
    }

    /// The server answered a request of `method path_and_query` that carried `sent` (and
    /// linked to the receipt `prev`) with the receipt `value`: it must verify under the
    /// channel's K2, be for this channel, this request and the payment it carried, charge at
    /// most `max_per_request`, and the channel's spent it states may not exceed what the
    /// receipts so far charged (plus `max_per_request` for each request not receipted yet).
    /// Otherwise the server is paid no more ([`check`](Self::check)).
    ///
    /// # Errors
    ///
    /// Why the receipt was refused.
    pub fn note_receipt(
        &mut self,
        sent: &SentPayment,
        value: &[u8],
        (method, path_and_query): (&str, &str),
        prev: Option<[u8; 32]>,
    ) -> Result<&Receipt, String> {
        let paid = sent.paid_msat();
        let max = self.max;
        let checked = verified(sent, value, method, path_and_query, prev).and_then(|receipt| {
            if receipt.paid_msat != paid {
                Err(format!(
                    "the receipt says {} was paid, the request carried {paid}",
                    receipt.paid_msat
                ))
            } else if receipt.price_msat > max {
                Err(format!("the receipt charges {}, above the policy's {max}", receipt.price_msat))
            } else {
                Ok(receipt)
            }
        });
        let receipt = self.judged(checked)?;
        if self.channel == Some(sent.channel) {
            self.receipts += 1;
            self.receipted = self.receipted.saturating_add(receipt.price_msat);
            if let Some(allowed) = self.allowed_spent()
                && receipt.spent() > allowed
            {
                let why = format!(
                    "the receipt says {} spent, its receipts add up to {allowed}",
                    receipt.spent()
                );
                return Err(self.refuse(why));
            }
        }
        if receipt.is_signed() {
            self.unsigned = 0;
            self.latest_signed = Some(receipt.clone());
        } else if self.unsigned >= self.max_unsigned {
            let why = format!(
                "the server left more than {} receipts in a row unsigned, the policy's most",
                self.max_unsigned
            );
            return Err(self.refuse(why));
        } else {
            self.unsigned += 1;
        }
        Ok(self.latest_receipt.insert(receipt))
    }

    /// The receipt of a cooperative close (`POST path`), sent with `sent` (the proof): judged
    /// as [`note_receipt`](Self::note_receipt) judges any, and it must be signed (the server
    /// signs every close's receipt: it is the final proof).
    ///
    /// # Errors
    ///
    /// Why the receipt was refused.
    pub fn note_close_receipt(
        &mut self,
        sent: &SentPayment,
        value: &[u8],
        path: &str,
        prev: Option<[u8; 32]>,
    ) -> Result<&Receipt, String> {
        // A full receipt without `sig`, or the compact form (only ever unsigned).
        let unsigned = value.starts_with(b"u1,")
            || Receipt::decode(value).is_ok_and(|receipt| !receipt.is_signed());
        if unsigned {
            return Err(self.refuse("the close's receipt is not signed".to_owned()));
        }
        self.note_receipt(sent, value, ("POST", path), prev)
    }

    /// The receipt that ends a metered stream of `method path_and_query`, sent with `sent`:
    /// it must verify under K2, be for this channel and this request, state a payment at
    /// least the one the request carried, charge at most `bound` (what the client counted),
    /// and a spent within what the watch allows. It becomes the latest receipt; a bad one
    /// stops the payments, as for any receipt.
    ///
    /// # Errors
    ///
    /// [`StepError::Misbehaved`] with [`MisbehaviorKind::BadReceipt`].
    pub fn note_stream_receipt(
        &mut self,
        sent: &SentPayment,
        value: &[u8],
        (method, path_and_query): (&str, &str),
        prev: Option<[u8; 32]>,
        bound: MilliSats,
    ) -> Result<Receipt, StepError> {
        let paid = sent.paid_msat();
        let allowed = self.allowed_spent();
        let checked = verified(sent, value, method, path_and_query, prev).and_then(|receipt| {
            if !receipt.is_signed() {
                Err("the stream's closing receipt is not signed".to_owned())
            } else if receipt.paid_msat < paid {
                Err(format!(
                    "the stream's receipt says {} was paid, less than the request carried",
                    receipt.paid_msat
                ))
            } else if receipt.price_msat > bound {
                Err(format!(
                    "the stream's receipt charges {}, the client counted at most {bound}",
                    receipt.price_msat
                ))
            } else {
                match allowed {
                    Some(allowed) if receipt.spent() > allowed => Err(format!(
                        "the stream's receipt says {} spent, the receipts and streams add up to \
                         {allowed}",
                        receipt.spent()
                    )),
                    _ => Ok(receipt),
                }
            }
        });
        let receipt = self.judged(checked).map_err(|why| {
            StepError::Misbehaved(Misbehavior::new(MisbehaviorKind::BadReceipt, why))
        })?;
        self.unsigned = 0;
        self.latest_signed = Some(receipt.clone());
        Ok(self.latest_receipt.insert(receipt).clone())
    }

    /// A receipt checked (`Ok`) or refused: a refusal is kept, and stops the payments.
    fn judged(&mut self, checked: Result<Receipt, String>) -> Result<Receipt, String> {
        checked.map_err(|why| self.refuse(why))
    }

    fn refuse(&mut self, why: String) -> String {
        self.bad_receipt.get_or_insert_with(|| why.clone());
        why
    }

    /// A paid answer (`what`), or a stream, came without a receipt: when receipts are
    /// required the server is paid no more. Whether it was refused.
    pub fn note_missing_receipt(&mut self, what: &str) -> bool {
        if self.require_receipts {
            self.bad_receipt.get_or_insert_with(|| format!("{what}, and receipts are required"));
        }
        self.require_receipts
    }

    /// A metered stream started: until it ends, answers may report up to `max_prepaid` more
    /// spent than counted (units the server debited and sent that the client has not read
    /// yet).
    pub fn stream_started(&mut self) {
        self.open_streams += 1;
    }

    /// A metered stream on `channel` ended. One the client dropped before the server ended it
    /// (`early`) may have been debited for units the client never read (the server debits
    /// before it sends): up to `max_prepaid` of them stay allowed — once per channel, however
    /// many streams are cut (the payments that covered those units are bounded by the
    /// channel's [`LossBound`](super::LossBound), not per stream).
    pub fn stream_ended(&mut self, channel: ChannelId, early: bool) {
        self.open_streams = self.open_streams.saturating_sub(1);
        if early && self.channel == Some(channel) && !self.cut {
            self.cut = true;
            self.streamed = self.streamed.saturating_add(self.prepaid);
        }
    }

    /// A stream on `channel` delivered units worth `cost` (the client's own count): the
    /// server may have spent that much more than the requests account for.
    pub fn note_streamed(&mut self, channel: ChannelId, cost: MilliSats) {
        if self.channel == Some(channel) {
            self.streamed = self.streamed.saturating_add(cost);
        }
    }

    /// What the server last reported spent on `channel`: its latest receipt's, or the
    /// payment the answer's request carried minus the balance it reported.
    pub fn reported_spent(&self, channel: ChannelId) -> Option<MilliSats> {
        if let Some(receipt) = self.latest_receipt.as_ref().filter(|r| r.channel == channel) {
            return Some(receipt.spent());
        }
        // The balance with the payment of the same answer: a top-up signed since then must
        // not count as spent.
        let (paid, balance) = self.reported.filter(|_| self.channel == Some(channel))?;
        Some(paid.saturating_sub(balance))
    }

    /// The balance the server last reported on `channel`.
    pub fn reported_balance(&self, channel: ChannelId) -> Option<MilliSats> {
        self.reported.filter(|_| self.channel == Some(channel)).map(|(_, balance)| balance)
    }

    /// The digest of the latest verified receipt on `channel`: what the next request links
    /// its receipt to (`Payment-Receipt-Prev`).
    pub fn latest_receipt_digest(&self, channel: ChannelId) -> Option<[u8; 32]> {
        self.latest_receipt.as_ref().filter(|r| r.channel == channel)?.digest()
    }

    /// The last receipt received (signed or not) that the watch accepted: what the next
    /// request links to.
    pub fn latest_receipt(&self) -> Option<&Receipt> {
        self.latest_receipt.as_ref()
    }

    /// The last receipt the server signed and this watch verified: proof of what the channel
    /// had been charged when it was issued (it states the channel's whole spent; the unsigned
    /// receipts after it are claims).
    pub fn latest_signed_receipt(&self) -> Option<&Receipt> {
        self.latest_signed.as_ref()
    }

    /// What the next request on `channel` says in `Payment-Receipt-Unsigned`: the unsigned
    /// receipts held since the last signed one, and the policy's maximum.
    pub fn unsigned_receipts(&self, channel: ChannelId) -> UnsignedReceipts {
        let held = if self.channel == Some(channel) { self.unsigned } else { 0 };
        UnsignedReceipts { held, max: self.max_unsigned }
    }

    /// Receipts verified on the current channel.
    pub fn receipts(&self) -> u64 {
        self.receipts
    }

    /// Metered streams running.
    pub fn open_streams(&self) -> u32 {
        self.open_streams
    }

    fn open_stream_slack(&self) -> MilliSats {
        self.prepaid.checked_mul(u64::from(self.open_streams)).unwrap_or(MilliSats::MAX)
    }

    /// What the channel may have spent by now, beyond the baseline: `max` for each request
    /// not receipted, the receipts' prices, what the streams delivered, and `slack` for
    /// each stream still running. `None` before a baseline.
    fn allowed_spent(&self) -> Option<MilliSats> {
        let baseline = self.baseline?;
        let unreceipted = self.sends.saturating_sub(self.receipts);
        Some(
            baseline
                .saturating_add(self.slack)
                .saturating_add(self.receipted)
                .saturating_add(self.max.checked_mul(unreceipted).unwrap_or(MilliSats::MAX))
                .saturating_add(self.streamed)
                .saturating_add(self.open_stream_slack()),
        )
    }
}

/// A receipt (`value`) that verifies under `sent`'s K2, for its channel and for `method
/// path_and_query`, linked to `prev`; or why not.
fn verified(
    sent: &SentPayment,
    value: &[u8],
    method: &str,
    path_and_query: &str,
    prev: Option<[u8; 32]>,
) -> Result<Receipt, String> {
    // An unsigned receipt (the server signs in batches) is checked like any other but for its
    // signature; the next signed one states the whole spent again. Its compact form is
    // completed from what the request was (`Receipt::decode_for`).
    let request = (method, path_and_query);
    let receipt = Receipt::decode_for(value, sent.channel, request, sent.paid_msat(), prev)
        .and_then(|receipt| match receipt.is_signed() {
            true => receipt.verify(&sent.server_key).map(|()| receipt),
            false => Ok(receipt),
        })
        .map_err(|e| e.to_string())?;
    if receipt.channel != sent.channel {
        Err("the receipt is for another channel".to_owned())
    } else if !receipt.is_for(method, path_and_query) {
        Err("the receipt is for another request".to_owned())
    } else if receipt.prev_digest() != prev || receipt.prev.is_some() != prev.is_some() {
        Err("the receipt does not link to the receipt the request named".to_owned())
    } else {
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::secp256k1::{Secp256k1, SecretKey};

    use super::*;

    /// Unsigned receipts are accepted up to the policy's maximum in a row (a signed one starts
    /// the count again) and then stop the payments; a stream's closing receipt must be signed.
    #[test]
    fn unsigned_receipts_count_up_to_the_policy_and_a_stream_ends_signed() {
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let k2 = key.public_key(&Secp256k1::new());
        let channel: ChannelId = format!("{}:1", "11".repeat(32)).parse().unwrap();
        let sent = SentPayment::new(channel, Amount::from_sat(1_000), k2);
        let policy = SpendingPolicy::default().with_max_unsigned_receipts(2);
        let mut watch = ChargeWatch::new(&policy);
        watch.watch_new(channel);
        let msat = MilliSats::from_msat;
        let mut spent = 0;
        let mut answer = |watch: &mut ChargeWatch, sign: bool| {
            watch.note_send(channel);
            spent += 1_000;
            let prev = watch.latest_receipt_digest(channel);
            let mut receipt = Receipt::new(
                channel,
                "GET",
                "/",
                msat(1_000),
                msat(1_000_000),
                msat(1_000_000 - spent),
            );
            if let Some(prev) = prev {
                receipt = receipt.with_prev(prev);
            }
            let receipt = if sign { receipt.sign(&key) } else { receipt };
            let said = watch.unsigned_receipts(channel);
            let judged = watch.note_receipt(&sent, receipt.encode().as_bytes(), ("GET", "/"), prev);
            (judged.is_ok(), said.held)
        };
        assert_eq!(answer(&mut watch, true), (true, 0));
        assert_eq!(answer(&mut watch, false), (true, 0));
        assert_eq!(answer(&mut watch, false), (true, 1));
        assert_eq!(answer(&mut watch, true), (true, 2), "a signed one starts the count again");
        assert_eq!(watch.latest_signed_receipt().unwrap().spent(), msat(4_000));
        assert_eq!(answer(&mut watch, false), (true, 0));
        assert_eq!(answer(&mut watch, false), (true, 1));
        assert_eq!(answer(&mut watch, false), (false, 2), "a third in a row is one too many");
        assert!(watch.check().is_err());

        let mut watch = ChargeWatch::new(&SpendingPolicy::default());
        watch.watch_new(channel);
        watch.note_send(channel);
        let unsigned =
            Receipt::new(channel, "GET", "/s", msat(500), msat(1_000_000), msat(999_500));
        let value = unsigned.encode();
        let refused =
            watch.note_stream_receipt(&sent, value.as_bytes(), ("GET", "/s"), None, msat(500));
        assert!(refused.is_err(), "a stream's closing receipt unsigned");
        let value = unsigned.sign(&key).encode();
        let mut watch = ChargeWatch::new(&SpendingPolicy::default());
        watch.watch_new(channel);
        watch.note_send(channel);
        let accepted =
            watch.note_stream_receipt(&sent, value.as_bytes(), ("GET", "/s"), None, msat(500));
        assert!(accepted.is_ok(), "{accepted:?}");
    }
}
