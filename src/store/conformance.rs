//! The conformance suite every [`ChannelStore`] must pass.
//!
//! Call [`run`] from a test of your store, inside a multi-threaded tokio runtime, with a store
//! that holds no channel whose funding txid starts with the suite's `prefix` byte (use a fresh
//! prefix per run against a shared database). It panics with a message naming the broken rule.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! use std::sync::Arc;
//! use paychan::store::{MemoryStore, conformance};
//!
//! conformance::run(Arc::new(MemoryStore::new()), 0x01).await;
//! # }
//! ```

use std::sync::Arc;

use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Transaction, Txid};

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim,
    IdempotencyRecord, Lease, LeaseId, LeaseRequest, LeaseTake, StoreError, StorePayment,
};
use crate::MilliSats;
use crate::channel::{ChainTip, Channel, CheckedPayment, Ledger, NewPayment, PaymentCheck, Terms};
use crate::wire::ChannelId;

const CLIENT: [u8; 32] = [0x51; 32];
const SERVER: [u8; 32] = [0x52; 32];

/// Test fixtures: channels with real, signed payments.
#[derive(Debug)]
struct Fixture {
    client: SecretKey,
    prefix: u8,
}

impl Fixture {
    fn channel(&self, n: u8, expiry: LockTime) -> Channel {
        let secp = crate::channel::secp();
        let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(secp));
        let server = SecretKey::from_slice(&SERVER).expect("valid key");
        let script = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
        let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
        let mut terms = Terms::default();
        terms.seconds.min = 0;
        terms.seconds.max = u32::MAX;
        terms.blocks.min = 0;
        terms.blocks.max = u32::MAX;
        let params = terms
            .agree(
                pk(&self.client),
                pk(&server),
                Amount::from_sat(1_000_000),
                expiry,
                script(&self.client),
                script(&server),
                tip,
            )
            .expect("fixture terms");
        let mut txid = [n; 32];
        txid[0] = self.prefix;
        params.at(OutPoint { txid: Txid::from_byte_array(txid), vout: u32::from(n) })
    }

    /// The `run`th channel of the model-based test: ids no other check uses.
    fn model_channel(&self, run: u8) -> Channel {
        let params = self.at_height(0, 900_000).params().clone();
        let mut txid = [0xee; 32];
        txid[0] = self.prefix;
        txid[31] = run;
        params.at(OutPoint { txid: Txid::from_byte_array(txid), vout: 0xeeee })
    }

    fn at_height(&self, n: u8, height: u32) -> Channel {
        self.channel(n, LockTime::from_height(height).expect("height"))
    }

    fn payment(&self, channel: &Channel, sat: u64) -> Transaction {
        let mut tx = channel.build_payment(Amount::from_sat(sat)).expect("fixture payment");
        channel.sign_payment(&mut tx, &self.client).expect("client key");
        tx
    }

    /// A payment of `sat`, checked by the protocol core (what `pay` takes).
    fn checked(&self, channel: &Channel, sat: u64) -> CheckedPayment {
        let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
        match channel.check_new_payment(None, self.payment(channel, sat), tip) {
            Ok(NewPayment::Increase(payment)) => payment,
            other => panic!("fixture payment: {other:?}"),
        }
    }

    /// [`checked`](Self::checked), as the layer makes it: decoded from its header, with the
    /// header's bytes (what a store keeps without serializing the payment).
    fn decoded(&self, channel: &Channel, sat: u64) -> CheckedPayment {
        let header = crate::wire::encode_payment(&self.payment(channel, sat));
        let (payment, encoded) =
            crate::wire::decode_payment_encoded(header.as_bytes()).expect("decodes");
        let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
        let check = channel.check_payment(None, &payment, tip);
        assert!(matches!(check, Ok(PaymentCheck::Increase { .. })), "fixture payment: {check:?}");
        CheckedPayment::checked(payment, encoded)
    }

    fn record(&self, channel: Channel, sat: u64) -> ChannelRecord {
        let first = self.payment(&channel, sat);
        ChannelRecord::open(channel, 7, first).with_funded_at(123_456)
    }
}

fn msat(sat: u64) -> MilliSats {
    MilliSats::from_msat(sat * 1_000)
}

/// Runs every conformance check against `store`. See the [module docs](self).
pub async fn run<S: ChannelStore>(store: Arc<S>, prefix: u8) {
    let fx = Fixture { client: SecretKey::from_slice(&CLIENT).expect("valid key"), prefix };
    create_and_load(&*store, &fx).await;
    best_payment_only_grows(&*store, &fx).await;
    debits_and_credits_are_exact(&*store, &fx).await;
    transitions_compare_and_swap(&*store, &fx).await;
    list_by_state_earliest_expiry_first(&*store, &fx).await;
    unknown_channels(&*store, &fx).await;
    racing_payments_keep_the_best(store.clone(), &fx).await;
    racing_debits_never_overspend(store.clone(), &fx).await;
    pay_stores_then_debits(&*store, &fx).await;
    racing_pays_are_exact(store.clone(), &fx).await;
    a_fair_close_is_one_atomic_step(&*store, &fx).await;
    idempotency_keys_are_claimed_once(&*store, &fx).await;
    a_lapsed_claim_is_taken_over(&*store, &fx).await;
    racing_claims_debit_once(store.clone(), &fx).await;
    leases_reserve_and_settle_exactly(&*store, &fx).await;
    leases_count_in_a_fair_close(&*store, &fx).await;
    lapsed_leases_are_forfeited(&*store, &fx).await;
    a_repeated_take_adds_to_its_lease(&*store, &fx).await;
    leased_and_forfeited_money_is_not_paid_for_again(&*store, &fx).await;
    a_lease_settles_after_the_close(&*store, &fx).await;
    the_store_agrees_with_the_model(&*store, &fx).await;
    racing_leases_and_debits_never_overspend(store.clone(), &fx).await;
    key_indexes_are_unique(store).await;
}

/// A lease of at least `least` and at most `most` msat, lapsing in a minute.
fn take(id: u64, least: u64, most: u64) -> LeaseTake {
    let (least, most) = (MilliSats::from_msat(least), MilliSats::from_msat(most));
    LeaseTake::new(LeaseId::new(id), least, most, now_ms() + 60_000)
}

/// `Lease::Granted` of `amount`, on a channel paid `paid` sat that spent `spent`.
fn granted_lease(amount: MilliSats, paid: u64, spent: MilliSats) -> Result<Lease, StoreError> {
    Ok(Lease::Granted { amount, paid: msat(paid), spent })
}

async fn leases_reserve_and_settle_exactly<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(20, 900_000);
    let record = fx.record(channel, 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let (first, second) = (u64::from(fx.prefix) << 56 | 1, u64::from(fx.prefix) << 56 | 2);
    // At most half of the free balance: 2 500 sat of 5 000.
    let granted = store.lease(id, LeaseRequest::take(take(first, 1_000, 3_000_000))).await;
    assert_eq!(granted, granted_lease(msat(2_500), 5_000, MilliSats::ZERO));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.leased, loaded.spent, loaded.balance(), loaded.unspent(), loaded.committed()),
        (msat(2_500), MilliSats::ZERO, msat(2_500), msat(5_000), msat(2_500)),
        "a lease is reserved: neither spent nor free"
    );
    assert_eq!(
        store.debit(id, msat(2_600)).await,
        Ok(Debit::Insufficient { balance: msat(5_000) }),
        "a debit draws on the free balance only"
    );
    assert_eq!(
        store.debit(id, msat(1_000)).await,
        Ok(Debit::Debited { balance: msat(4_000) }),
        "the balance reported is paid − spent"
    );
    let refused = store.lease(id, LeaseRequest::take(take(second, 2_000_000, 9_000_000))).await;
    assert_eq!(refused, Ok(Lease::Insufficient { balance: msat(1_500) }));
    // Settle the first (1 200 sat used) and take the second in one step.
    let request =
        LeaseRequest::take(take(second, 1, 100)).and_settle(LeaseId::new(first), msat(1_200));
    let replaced = store.lease(id, request).await;
    assert_eq!(replaced, granted_lease(MilliSats::from_msat(100), 5_000, msat(2_200)));
    let again = store.lease(id, LeaseRequest::settle(LeaseId::new(first), msat(2_000))).await;
    assert_eq!(again, granted_lease(MilliSats::ZERO, 5_000, msat(2_200)), "once");
    // Used beyond what it held counts as all of it.
    let over = store.lease(id, LeaseRequest::settle(LeaseId::new(second), msat(5))).await;
    assert_eq!(over, granted_lease(MilliSats::ZERO, 5_000, MilliSats::from_msat(2_200_100)));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!((loaded.leased, loaded.spent), (MilliSats::ZERO, MilliSats::from_msat(2_200_100)));
    let unknown = ChannelId::new(fx.at_height(96, 900_000).outpoint());
    let request = LeaseRequest::take(take(first, 1, 1));
    assert_eq!(store.lease(unknown, request).await, Err(StoreError::NotFound));
}

async fn leases_count_in_a_fair_close<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(21, 900_000);
    let record = fx.record(channel.clone(), 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let lease = u64::from(fx.prefix) << 56 | 3;
    let granted = store.lease(id, LeaseRequest::take(take(lease, 1, 1_000_000))).await;
    assert_eq!(granted, granted_lease(msat(1_000), 5_000, MilliSats::ZERO));
    assert_eq!(store.debit(id, msat(1_000)).await, Ok(Debit::Debited { balance: msat(4_000) }));
    let short = fx.checked(&channel, 1_500);
    assert_eq!(store.close_with(id, short).await, Ok(false), "a lease may still be served");
    let settled = store.lease(id, LeaseRequest::settle(LeaseId::new(lease), msat(400))).await;
    assert_eq!(settled, granted_lease(MilliSats::ZERO, 5_000, msat(1_400)));
    assert_eq!(store.close_with(id, fx.checked(&channel, 1_400)).await, Ok(true));
    let refused = store.lease(id, LeaseRequest::take(take(lease + 1, 1, 1))).await;
    assert_eq!(refused, Ok(Lease::NotOpen { state: ChannelState::Closing }));
}

async fn lapsed_leases_are_forfeited<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(22, 900_000);
    let record = fx.record(channel, 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let (dead, live) = (u64::from(fx.prefix) << 56 | 4, u64::from(fx.prefix) << 56 | 5);
    let now = now_ms();
    let lapsed =
        LeaseTake::new(LeaseId::new(dead), msat(1_000), msat(1_000), now.saturating_sub(1));
    assert!(matches!(
        store.lease(id, LeaseRequest::take(lapsed)).await,
        Ok(Lease::Granted { amount, .. }) if amount == msat(1_000)
    ));
    let granted = store.lease(id, LeaseRequest::take(take(live, 1, 500_000))).await;
    assert!(matches!(granted, Ok(Lease::Granted { amount, .. }) if amount == msat(500)));
    let forfeited = store.expire_leases(now).await.expect("expire");
    assert!(forfeited >= msat(1_000), "the lapsed lease is forfeited: {forfeited}");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.spent, loaded.leased, loaded.forfeited, loaded.balance(), loaded.unspent()),
        (MilliSats::ZERO, msat(500), msat(1_000), msat(3_500), msat(5_000)),
        "a lapsed lease is forfeited (never free again, not reported spent); a live one stays"
    );
    assert_eq!(
        store.debit(id, msat(3_501)).await,
        Ok(Debit::Insufficient { balance: msat(5_000) }),
        "forfeited money is not drawn on"
    );
    let channel = fx.at_height(22, 900_000);
    assert_eq!(
        store.close_with(id, fx.checked(&channel, 1_499)).await,
        Ok(false),
        "nor closed below"
    );
    let late = store.lease(id, LeaseRequest::settle(LeaseId::new(dead), MilliSats::ZERO)).await;
    assert_eq!(late, granted_lease(MilliSats::ZERO, 5_000, MilliSats::ZERO));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.spent, loaded.forfeited),
        (MilliSats::ZERO, msat(1_000)),
        "settling a lapsed lease changes nothing"
    );
}

/// A take with the id of a live lease (a node retrying a take whose reply it lost) adds to
/// it and renews its lapse; one settlement settles all of it.
async fn a_repeated_take_adds_to_its_lease<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(24, 900_000);
    let record = fx.record(channel, 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let lease = LeaseId::new(u64::from(fx.prefix) << 56 | 6);
    let now = now_ms();
    // The first take would lapse at once; the repeat renews it.
    let first = LeaseTake::new(lease, msat(300), msat(300), now.saturating_sub(1));
    assert_eq!(
        store.lease(id, LeaseRequest::take(first)).await,
        granted_lease(msat(300), 5_000, MilliSats::ZERO)
    );
    let again = LeaseRequest::take(take(lease.get(), 200_000, 200_000));
    assert_eq!(store.lease(id, again).await, granted_lease(msat(200), 5_000, MilliSats::ZERO));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.leased, msat(500), "the two grants add up");
    store.expire_leases(now).await.expect("expire");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!((loaded.leased, loaded.forfeited), (msat(500), MilliSats::ZERO), "renewed");
    let settled = store.lease(id, LeaseRequest::settle(lease, msat(100))).await;
    assert_eq!(settled, granted_lease(MilliSats::ZERO, 5_000, msat(100)));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!((loaded.leased, loaded.spent), (MilliSats::ZERO, msat(100)), "settled at once");
}

/// `pay` and `debit_once` draw on the balance as `debit` does: what nodes hold in leases and
/// what dead nodes forfeited is not there to be debited.
async fn leased_and_forfeited_money_is_not_paid_for_again<S: ChannelStore>(
    store: &S,
    fx: &Fixture,
) {
    let channel = fx.at_height(25, 900_000);
    let record = fx.record(channel.clone(), 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let (dead, live) = (u64::from(fx.prefix) << 56 | 7, u64::from(fx.prefix) << 56 | 8);
    let now = now_ms();
    let lapsed = LeaseTake::new(LeaseId::new(dead), msat(500), msat(500), now.saturating_sub(1));
    let granted = store.lease(id, LeaseRequest::take(lapsed)).await;
    assert_eq!(granted, granted_lease(msat(500), 5_000, MilliSats::ZERO));
    // What is forfeited store-wide may include other runs' lapsed leases: this channel's.
    let forfeited = store.expire_leases(now).await.expect("expire");
    assert!(forfeited >= msat(500), "{forfeited}");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!((loaded.leased, loaded.forfeited), (MilliSats::ZERO, msat(500)));
    let granted = store.lease(id, LeaseRequest::take(take(live, 1, 1_000_000))).await;
    assert_eq!(granted, granted_lease(msat(1_000), 5_000, MilliSats::ZERO));
    // Paid 6 000 sat, of which 500 forfeited and 1 000 leased: 4 500 free.
    let better = fx.checked(&channel, 6_000);
    assert_eq!(
        store.pay(id, better, msat(4_501)).await,
        Ok(Debit::Insufficient { balance: msat(6_000) }),
        "a payment's debit does not draw on leased or forfeited money"
    );
    let over = store.debit_once(id, msat(4_501), &claim("lease-k1", 1, 60_000)).await;
    assert_eq!(over, Ok(DebitOnce::Debit(Debit::Insufficient { balance: msat(6_000) })));
    let exact = store.debit_once(id, msat(4_500), &claim("lease-k2", 1, 60_000)).await;
    assert_eq!(exact, Ok(DebitOnce::Debit(Debit::Debited { balance: msat(1_500) })));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.spent, loaded.leased, loaded.forfeited, loaded.balance()),
        (msat(4_500), msat(1_000), msat(500), MilliSats::ZERO),
        "the refused debits changed nothing; the claimed one spent all that was free"
    );
}

/// A node may settle its lease after another node closed the channel (the close covered the
/// lease): the settlement is applied, and the lease's unused part is free again for nothing
/// more to be debited from.
async fn a_lease_settles_after_the_close<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(26, 900_000);
    let record = fx.record(channel.clone(), 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let lease = LeaseId::new(u64::from(fx.prefix) << 56 | 9);
    let granted = store.lease(id, LeaseRequest::take(take(lease.get(), 1, 1_000_000))).await;
    assert_eq!(granted, granted_lease(msat(1_000), 5_000, MilliSats::ZERO));
    assert_eq!(store.debit(id, msat(1_000)).await, Ok(Debit::Debited { balance: msat(4_000) }));
    assert_eq!(store.close_with(id, fx.checked(&channel, 2_000)).await, Ok(true));
    let settled = store.lease(id, LeaseRequest::settle(lease, msat(400))).await;
    assert_eq!(settled, granted_lease(MilliSats::ZERO, 2_000, msat(1_400)), "applied");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.state, loaded.spent, loaded.leased, loaded.paid_amount()),
        (ChannelState::Closing, msat(1_400), MilliSats::ZERO, Amount::from_sat(2_000)),
        "settled while closing; the close's payment stands"
    );
    assert_eq!(
        store.debit(id, msat(1)).await,
        Ok(Debit::NotOpen { state: ChannelState::Closing }),
        "nothing more is debited"
    );
}

async fn racing_leases_and_debits_never_overspend<S: ChannelStore>(store: Arc<S>, fx: &Fixture) {
    let channel = fx.at_height(23, 900_000);
    let record = fx.record(channel, 1_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let store = store.clone();
            let lease = u64::from(fx.prefix) << 56 | 0x100 | i;
            tokio::spawn(async move {
                if i % 2 == 0 {
                    match store.lease(id, LeaseRequest::take(take(lease, 70_000, 70_000))).await {
                        Ok(Lease::Granted { amount, .. }) => amount,
                        other => {
                            assert!(matches!(other, Ok(Lease::Insufficient { .. })), "{other:?}");
                            MilliSats::ZERO
                        }
                    }
                } else {
                    match store.debit(id, msat(3)).await.expect("debit") {
                        Debit::Debited { .. } => msat(3),
                        _ => MilliSats::ZERO,
                    }
                }
            })
        })
        .collect();
    let mut taken = MilliSats::ZERO;
    for task in tasks {
        taken = taken.saturating_add(task.await.expect("task"));
    }
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.committed(), taken, "every lease and debit is counted, once");
    assert!(loaded.committed() <= loaded.paid(), "never more than was paid");
    assert!(loaded.balance() < msat(70), "refused only when short");
}

async fn spent_of<S: ChannelStore>(store: &S, id: ChannelId) -> MilliSats {
    store.load(id).await.expect("load").expect("exists").spent
}

/// Milliseconds since the Unix epoch (a Redis store expires records by its own clock).
fn now_ms() -> u64 {
    super::now_ms()
}

fn claim(key: &str, fingerprint: u8, lapses_in_ms: u64) -> IdempotencyClaim {
    let now = now_ms();
    IdempotencyClaim::new(key, [fingerprint; 32], now, now + lapses_in_ms)
}

async fn idempotency_keys_are_claimed_once<S: ChannelStore>(store: &S, fx: &Fixture) {
    let record = fx.record(fx.at_height(40, 900_000), 2_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let price = msat(100);
    let minute = 60_000;

    let k1 = claim("k1", 1, minute);
    let first = store.debit_once(id, price, &k1).await;
    assert_eq!(first, Ok(DebitOnce::Debit(Debit::Debited { balance: msat(1_900) })));
    // The key is held while the request is served: another request (or a retry) gets the
    // claim, whatever its fingerprint, and nothing is debited.
    for fingerprint in [1, 2] {
        let again = store.debit_once(id, price, &claim("k1", fingerprint, minute)).await;
        assert_eq!(again, Ok(DebitOnce::Claimed(IdempotencyRecord::new([1; 32], None))));
    }
    assert_eq!(spent_of(store, id).await, price, "one debit for one key");
    // Finished with its response: kept, and a second finish changes nothing.
    store.finish_once(id, &k1, Some(b"response".to_vec()), now_ms() + minute).await.unwrap();
    store.finish_once(id, &k1, Some(b"other".to_vec()), now_ms() + minute).await.unwrap();
    store.finish_once(id, &k1, None, now_ms() + minute).await.unwrap();
    let replay = store.debit_once(id, price, &claim("k1", 1, minute)).await;
    let kept = IdempotencyRecord::new([1; 32], Some(b"response".to_vec()));
    assert_eq!(replay, Ok(DebitOnce::Claimed(kept)), "the first response is kept, once");
    assert_eq!(spent_of(store, id).await, price);

    // A released key (a request whose charge was given back) is free again.
    let k2 = claim("k2", 3, minute);
    assert!(matches!(
        store.debit_once(id, price, &k2).await,
        Ok(DebitOnce::Debit(Debit::Debited { .. }))
    ));
    store.finish_once(id, &k2, None, 0).await.unwrap();
    assert!(matches!(
        store.debit_once(id, price, &claim("k2", 3, minute)).await,
        Ok(DebitOnce::Debit(Debit::Debited { .. }))
    ));
    assert_eq!(spent_of(store, id).await, msat(300));

    // A refused debit claims nothing.
    let too_much = store.debit_once(id, msat(5_000), &claim("k3", 4, minute)).await;
    assert_eq!(too_much, Ok(DebitOnce::Debit(Debit::Insufficient { balance: msat(1_700) })));
    assert!(matches!(
        store.debit_once(id, price, &claim("k3", 4, minute)).await,
        Ok(DebitOnce::Debit(Debit::Debited { .. }))
    ));

    // Keys are per channel; a channel that is not open debits nothing and claims nothing.
    let other = fx.record(fx.at_height(41, 900_000), 2_000);
    let other_id = other.id();
    store.create(other).await.expect("create");
    assert!(matches!(
        store.debit_once(other_id, price, &claim("k1", 1, minute)).await,
        Ok(DebitOnce::Debit(Debit::Debited { .. }))
    ));
    store.transition(other_id, ChannelState::Open, ChannelState::Closing).await.unwrap();
    let closing = store.debit_once(other_id, price, &claim("k5", 7, minute)).await;
    assert_eq!(closing, Ok(DebitOnce::Debit(Debit::NotOpen { state: ChannelState::Closing })));
    let unknown = fx.at_height(42, 900_000);
    let unknown = ChannelId::new(unknown.outpoint());
    assert_eq!(
        store.debit_once(unknown, price, &claim("k6", 8, minute)).await,
        Err(StoreError::NotFound)
    );
}

/// A claim never finished lapses (the node that served it died): a retry runs again, and the
/// request whose claim lapsed, finishing late, answers for nothing.
async fn a_lapsed_claim_is_taken_over<S: ChannelStore>(store: &S, fx: &Fixture) {
    let record = fx.record(fx.at_height(44, 900_000), 2_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let (price, minute) = (msat(100), 60_000);
    let lapsing = claim("k4", 5, 50);
    assert!(matches!(
        store.debit_once(id, price, &lapsing).await,
        Ok(DebitOnce::Debit(Debit::Debited { .. }))
    ));
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let taking_over = claim("k4", 6, minute);
    assert!(matches!(
        store.debit_once(id, price, &taking_over).await,
        Ok(DebitOnce::Debit(Debit::Debited { .. }))
    ));
    assert_eq!(spent_of(store, id).await, msat(200));
    // The request whose claim lapsed finishes late: it neither answers for the request that
    // took the key over nor releases it.
    store.finish_once(id, &lapsing, Some(b"late".to_vec()), now_ms() + minute).await.unwrap();
    store.finish_once(id, &lapsing, None, now_ms() + minute).await.unwrap();
    let held = store.debit_once(id, price, &claim("k4", 6, minute)).await;
    assert_eq!(held, Ok(DebitOnce::Claimed(IdempotencyRecord::new([6; 32], None))), "in progress");
    store.finish_once(id, &taking_over, Some(b"own".to_vec()), now_ms() + minute).await.unwrap();
    let kept = IdempotencyRecord::new([6; 32], Some(b"own".to_vec()));
    let replay = store.debit_once(id, price, &claim("k4", 6, minute)).await;
    assert_eq!(replay, Ok(DebitOnce::Claimed(kept)), "its own response");
    assert_eq!(spent_of(store, id).await, msat(200));
}

async fn racing_claims_debit_once<S: ChannelStore>(store: Arc<S>, fx: &Fixture) {
    let record = fx.record(fx.at_height(43, 900_000), 2_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(
                async move { store.debit_once(id, msat(10), &claim("race", 9, 60_000)).await },
            )
        })
        .collect();
    let mut debited = 0;
    for task in tasks {
        match task.await.expect("task").expect("debit_once") {
            DebitOnce::Debit(Debit::Debited { .. }) => debited += 1,
            DebitOnce::Claimed(record) => assert_eq!(record.fingerprint, [9; 32]),
            other => panic!("a racing claim: {other:?}"),
        }
    }
    assert_eq!(debited, 1, "exactly one of the racing requests debits");
    let spent = store.load(id).await.expect("load").expect("exists").spent;
    assert_eq!(spent, msat(10));
}

async fn key_indexes_are_unique<S: ChannelStore>(store: Arc<S>) {
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.next_key_index().await })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for task in tasks {
        let index = task.await.expect("task").expect("next_key_index");
        assert!(index < 1 << 31, "indexes are valid hardened child numbers");
        assert!(seen.insert(index), "key index {index} was handed out twice");
    }
}

async fn create_and_load<S: ChannelStore>(store: &S, fx: &Fixture) {
    let record = fx.record(fx.at_height(1, 900_000), 1_000);
    let id = record.id();
    assert_eq!(store.load(id).await, Ok(None), "load of an unknown channel");
    store.create(record.clone()).await.expect("create");
    assert_eq!(store.load(id).await, Ok(Some(record.clone())), "load returns what was created");
    assert_eq!(store.create(record).await, Err(StoreError::AlreadyExists), "create twice");
}

async fn best_payment_only_grows<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(2, 900_000);
    let record = fx.record(channel.clone(), 1_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let higher = fx.payment(&channel, 3_000);
    assert_eq!(
        store.store_payment(id, higher.clone()).await,
        Ok(StorePayment::Stored { balance: msat(3_000) })
    );
    for stale in [fx.payment(&channel, 2_000), higher.clone()] {
        assert_eq!(
            store.store_payment(id, stale).await,
            Ok(StorePayment::Stale { best: Amount::from_sat(3_000) }),
            "a payment that does not pay more is stale"
        );
    }
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.best, Some(higher), "the best payment is kept byte for byte");
}

async fn debits_and_credits_are_exact<S: ChannelStore>(store: &S, fx: &Fixture) {
    let record = fx.record(fx.at_height(3, 900_000), 2_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let third = MilliSats::from_msat(666_667);
    assert_eq!(
        store.debit(id, third).await,
        Ok(Debit::Debited { balance: MilliSats::from_msat(1_333_333) })
    );
    assert_eq!(
        store.debit(id, third).await,
        Ok(Debit::Debited { balance: MilliSats::from_msat(666_666) })
    );
    assert_eq!(
        store.debit(id, third).await,
        Ok(Debit::Insufficient { balance: MilliSats::from_msat(666_666) }),
        "a debit larger than the balance changes nothing"
    );
    assert_eq!(
        store.debit(id, MilliSats::from_msat(666_666)).await,
        Ok(Debit::Debited { balance: MilliSats::ZERO })
    );
    assert_eq!(
        store.debit(id, MilliSats::ZERO).await,
        Ok(Debit::Debited { balance: MilliSats::ZERO }),
        "a debit of nothing (the payment endpoint's) succeeds on an open channel at zero"
    );
    assert_eq!(store.credit(id, third).await, Ok(third), "credit gives back");
    assert_eq!(
        store.credit(id, msat(10_000)).await,
        Ok(msat(2_000)),
        "spent never goes below zero"
    );
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.spent, MilliSats::ZERO);
}

async fn transitions_compare_and_swap<S: ChannelStore>(store: &S, fx: &Fixture) {
    let record = fx.record(fx.at_height(4, 900_000), 2_000);
    let id = record.id();
    store.create(record).await.expect("create");
    assert_eq!(store.transition(id, ChannelState::Closing, ChannelState::Closed).await, Ok(false));
    assert_eq!(store.transition(id, ChannelState::Open, ChannelState::Closing).await, Ok(true));
    assert_eq!(store.transition(id, ChannelState::Open, ChannelState::Closing).await, Ok(false));
    for amount in [msat(1), MilliSats::ZERO] {
        assert_eq!(
            store.debit(id, amount).await,
            Ok(Debit::NotOpen { state: ChannelState::Closing }),
            "no debits once closing, not even of nothing"
        );
    }
    let channel = store.load(id).await.expect("load").expect("exists");
    let better = fx.payment(&channel.channel, 3_000);
    assert_eq!(
        store.store_payment(id, better).await,
        Ok(StorePayment::Stale { best: Amount::from_sat(2_000) }),
        "the best payment is frozen once closing: the settlement is built from it"
    );

    // A channel waiting for its funding's confirmations takes no debits until it opens.
    let pending = fx.record(fx.at_height(14, 900_000), 2_000).with_state(ChannelState::Pending);
    let id = pending.id();
    store.create(pending.clone()).await.expect("create");
    assert_eq!(store.load(id).await, Ok(Some(pending)), "state and funding height round-trip");
    assert_eq!(store.debit(id, msat(1)).await, Ok(Debit::NotOpen { state: ChannelState::Pending }));
    assert_eq!(store.transition(id, ChannelState::Pending, ChannelState::Open).await, Ok(true));
    assert!(matches!(store.debit(id, msat(1)).await, Ok(Debit::Debited { .. })));
}

async fn list_by_state_earliest_expiry_first<S: ChannelStore>(store: &S, fx: &Fixture) {
    let late = fx.record(fx.at_height(5, 950_000), 1_000);
    let early = fx.record(fx.at_height(6, 910_000), 1_000);
    let timed = fx.record(fx.channel(7, LockTime::from_time(1_800_000_000).expect("time")), 1_000);
    for record in [late.clone(), early.clone(), timed.clone()] {
        store.create(record.clone()).await.expect("create");
        store
            .transition(record.id(), ChannelState::Open, ChannelState::Failed)
            .await
            .expect("transition");
    }
    let ids: Vec<ChannelId> = store
        .list(ChannelState::Failed)
        .await
        .expect("list")
        .iter()
        .map(ChannelRecord::id)
        .filter(|id| id.outpoint().txid.to_byte_array()[0] == fx.prefix)
        .collect();
    assert_eq!(ids, vec![early.id(), late.id(), timed.id()], "heights by value, then timestamps");
    let open = store.list(ChannelState::Open).await.expect("list");
    assert!(open.iter().all(|r| r.state == ChannelState::Open), "list filters by state");
    for state in ChannelState::ALL {
        let listed = store.list(state).await.expect("list").len();
        assert_eq!(store.count(state).await, Ok(listed), "count({state:?}) is what list finds");
    }
}

async fn unknown_channels<S: ChannelStore>(store: &S, fx: &Fixture) {
    let id = ChannelId::new(fx.at_height(99, 900_000).outpoint());
    let payment = fx.payment(&fx.at_height(99, 900_000), 1_000);
    assert_eq!(store.store_payment(id, payment).await, Err(StoreError::NotFound));
    assert_eq!(store.debit(id, msat(1)).await, Err(StoreError::NotFound));
    assert_eq!(store.credit(id, msat(1)).await, Err(StoreError::NotFound));
    assert_eq!(
        store.transition(id, ChannelState::Open, ChannelState::Closing).await,
        Err(StoreError::NotFound)
    );
}

async fn racing_payments_keep_the_best<S: ChannelStore>(store: Arc<S>, fx: &Fixture) {
    let channel = fx.at_height(10, 900_000);
    let record = fx.record(channel.clone(), 1_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let payments: Vec<Transaction> =
        (1..=32).map(|i| fx.payment(&channel, 1_000 + i * 100)).collect();
    let tasks: Vec<_> = payments
        .into_iter()
        .map(|payment| {
            let store = store.clone();
            tokio::spawn(async move { store.store_payment(id, payment).await })
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        if let StorePayment::Stored { .. } = task.await.expect("task").expect("store_payment") {
            stored += 1;
        }
    }
    assert!(stored >= 1, "the best payment was stored");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        loaded.paid_amount(),
        Amount::from_sat(4_200),
        "racing writers keep the best payment"
    );
}

async fn racing_debits_never_overspend<S: ChannelStore>(store: Arc<S>, fx: &Fixture) {
    let record = fx.record(fx.at_height(11, 900_000), 1_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let price = MilliSats::from_msat(30_000); // 1 000 sat pays for exactly 33 of these
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.debit(id, price).await })
        })
        .collect();
    let mut served = 0;
    for task in tasks {
        if let Debit::Debited { .. } = task.await.expect("task").expect("debit") {
            served += 1;
        }
    }
    assert_eq!(served, 33, "concurrent debits are served exactly as much as was paid");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.balance(), MilliSats::from_msat(10_000));
}

async fn pay_stores_then_debits<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(15, 900_000);
    let record = fx.record(channel.clone(), 1_000);
    let id = record.id();
    store.create(record).await.expect("create");
    // Decoded from a header, as the layer stores it; the others built as a caller would.
    let better = fx.decoded(&channel, 3_000);
    assert_eq!(
        store.pay(id, better.clone(), msat(2_500)).await,
        Ok(Debit::Debited { balance: msat(500) }),
        "the debit sees the balance after the new payment"
    );
    assert_eq!(
        store.pay(id, fx.checked(&channel, 2_000), msat(400)).await,
        Ok(Debit::Debited { balance: msat(100) }),
        "a payment that does not pay more still debits"
    );
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        loaded.best.as_ref(),
        Some(better.transaction()),
        "the stale payment did not replace the best"
    );
    let slightly_better = fx.decoded(&channel, 3_100);
    assert_eq!(
        store.pay(id, slightly_better.clone(), msat(1_000)).await,
        Ok(Debit::Insufficient { balance: msat(200) }),
        "a debit the new balance does not cover is refused"
    );
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.best, loaded.spent),
        (Some(slightly_better.into_transaction()), msat(2_900)),
        "a refused debit keeps the better payment and spends nothing"
    );
    assert_eq!(store.transition(id, ChannelState::Open, ChannelState::Closing).await, Ok(true));
    assert_eq!(
        store.pay(id, fx.checked(&channel, 4_000), msat(1)).await,
        Ok(Debit::NotOpen { state: ChannelState::Closing }),
        "no payment and no debit once closing"
    );
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.paid_amount(), Amount::from_sat(3_100), "the best is frozen once closing");
    let unknown = ChannelId::new(fx.at_height(98, 900_000).outpoint());
    let payment = fx.checked(&fx.at_height(98, 900_000), 1_000);
    assert_eq!(store.pay(unknown, payment, msat(1)).await, Err(StoreError::NotFound));
}

async fn a_fair_close_is_one_atomic_step<S: ChannelStore>(store: &S, fx: &Fixture) {
    let channel = fx.at_height(17, 900_000);
    let record = fx.record(channel.clone(), 5_000);
    let id = record.id();
    store.create(record).await.expect("create");
    assert_eq!(store.debit(id, msat(2_500)).await, Ok(Debit::Debited { balance: msat(2_500) }));
    let short = fx.checked(&channel, 2_000);
    assert_eq!(store.close_with(id, short).await, Ok(false), "below what was spent");
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.state, loaded.paid_amount()),
        (ChannelState::Open, Amount::from_sat(5_000)),
        "a refused fair close changes nothing"
    );
    let fair = fx.checked(&channel, 2_500);
    assert_eq!(store.close_with(id, fair.clone()).await, Ok(true));
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (loaded.best.as_ref(), loaded.state, loaded.spent),
        (Some(fair.transaction()), ChannelState::Closing, msat(2_500)),
        "closing, with the fair settlement in place of the best"
    );
    let listed = |records: Vec<ChannelRecord>| records.iter().any(|r| r.id() == id);
    assert!(listed(store.list(ChannelState::Closing).await.expect("list")), "listed as closing");
    assert!(!listed(store.list(ChannelState::Open).await.expect("list")), "no longer open");
    assert_eq!(store.close_with(id, fx.checked(&channel, 3_000)).await, Ok(false), "once only");
    let unknown = ChannelId::new(fx.at_height(97, 900_000).outpoint());
    let payment = fx.checked(&fx.at_height(97, 900_000), 1_000);
    assert_eq!(store.close_with(unknown, payment).await, Err(StoreError::NotFound));
}

async fn racing_pays_are_exact<S: ChannelStore>(store: Arc<S>, fx: &Fixture) {
    let channel = fx.at_height(16, 900_000);
    let record = fx.record(channel.clone(), 1_000);
    let id = record.id();
    store.create(record).await.expect("create");
    let price = msat(100);
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let store = store.clone();
            let payment = fx.checked(&channel, 1_000 + (i % 32 + 1) * 100);
            tokio::spawn(async move { store.pay(id, payment, price).await })
        })
        .collect();
    let mut served = 0;
    for task in tasks {
        if let Debit::Debited { .. } = task.await.expect("task").expect("pay") {
            served += 1;
        }
    }
    let loaded = store.load(id).await.expect("load").expect("exists");
    assert_eq!(loaded.paid_amount(), Amount::from_sat(4_200), "racing pays keep the best payment");
    assert_eq!(loaded.spent, msat(100 * served), "every served request is debited, once");
    assert!(loaded.spent <= loaded.paid(), "never served more than was paid");
    assert!(served >= 10, "the first payment alone covers 10 requests: {served}");
}

/// splitmix64: the model-based test's deterministic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Up to `most_sat` satoshis, in millisatoshis.
    fn msat(&mut self, most_sat: u64) -> MilliSats {
        MilliSats::from_msat(self.below(most_sat * 1_000))
    }

    /// A payment near `best`: below it, equal or above it.
    fn near(&mut self, best: u64) -> u64 {
        (best + self.below(8_000)).saturating_sub(3_000).max(1_000)
    }

    fn state(&mut self) -> ChannelState {
        ChannelState::ALL[self.below(ChannelState::ALL.len() as u64) as usize]
    }
}

/// The model a store is checked against: the channel's state, its money as [`Ledger`] moves
/// it, its best payment and its live leases (what each holds and when it lapses).
#[derive(Debug)]
struct Model {
    state: ChannelState,
    ledger: Ledger,
    best_sat: u64,
    leases: std::collections::BTreeMap<LeaseId, (MilliSats, u64)>,
}

impl Model {
    fn store(&mut self, sat: u64) -> StorePayment {
        match self.ledger.pay(msat(sat)).filter(|_| self.state == ChannelState::Open) {
            Some(ledger) => {
                (self.ledger, self.best_sat) = (ledger, sat);
                StorePayment::Stored { balance: ledger.unspent() }
            }
            None => StorePayment::Stale { best: Amount::from_sat(self.best_sat) },
        }
    }

    fn debit(&mut self, amount: MilliSats) -> Debit {
        if self.state != ChannelState::Open {
            return Debit::NotOpen { state: self.state };
        }
        match self.ledger.debit(amount) {
            Some(ledger) => {
                self.ledger = ledger;
                Debit::Debited { balance: ledger.unspent() }
            }
            None => Debit::Insufficient { balance: self.ledger.unspent() },
        }
    }

    fn lease(&mut self, request: LeaseRequest) -> Lease {
        if let Some((id, used)) = request.settle
            && let Some((held, _)) = self.leases.remove(&id)
        {
            self.ledger = self.ledger.settle(held, used);
        }
        let granted = |ledger: Ledger, amount| Lease::Granted {
            amount,
            paid: ledger.paid,
            spent: ledger.spent,
        };
        let Some(take) = request.take else { return granted(self.ledger, MilliSats::ZERO) };
        if self.state != ChannelState::Open {
            return Lease::NotOpen { state: self.state };
        }
        let balance = self.ledger.balance();
        match take.grant(balance).and_then(|amount| Some((amount, self.ledger.lease(amount)?))) {
            Some((amount, ledger)) => {
                self.ledger = ledger;
                let held = self.leases.entry(take.id).or_insert((MilliSats::ZERO, 0));
                *held = (held.0.saturating_add(amount), take.expires_at);
                granted(ledger, amount)
            }
            None => Lease::Insufficient { balance },
        }
    }

    fn expire(&mut self, now: u64) {
        let lapsed: Vec<LeaseId> =
            self.leases.iter().filter(|(_, (_, until))| *until <= now).map(|(id, _)| *id).collect();
        for id in lapsed {
            let (held, _) = self.leases.remove(&id).expect("listed");
            self.ledger = self.ledger.forfeit(held);
        }
    }

    fn close_with(&mut self, sat: u64) -> bool {
        if !matches!(self.state, ChannelState::Open | ChannelState::Pending) {
            return false;
        }
        let Some(ledger) = self.ledger.close_with(msat(sat)) else { return false };
        (self.state, self.ledger, self.best_sat) = (ChannelState::Closing, ledger, sat);
        true
    }

    fn transition(&mut self, from: ChannelState, to: ChannelState) -> Result<bool, StoreError> {
        super::legal_move(from, to)?;
        let moves = self.state == from;
        if moves {
            self.state = to;
        }
        Ok(moves)
    }
}

/// Random sequences of every money and state operation, applied to `store` and to the pure
/// [`Model`] (the [`Ledger`], [`ChannelState::may_move_to`] and each method's documented
/// rules): every answer, and the stored state and ledger after every step, must agree. The
/// executable definition the SQL and Lua backends are checked against.
async fn the_store_agrees_with_the_model<S: ChannelStore>(store: &S, fx: &Fixture) {
    model_runs(store, fx, None::<&super::Leased<S>>).await;
}

/// Runs the model-based check ([`run`]'s last) on a [`Leased`](super::Leased) node: its
/// debits drawn from leases, its credits, payments, fair closes and moves, against the same
/// pure model. After every step the node gives its leases back
/// ([`return_all`](super::Leased::return_all)), and the store's state and ledger must then be
/// the model's exactly; a debit must be granted exactly when the model grants it. The node's
/// own leases are its business: the raw lease operations are not mixed in, and credits give
/// back earlier debits, as the trait documents.
///
/// ```
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() {
/// use paychan::store::{Leased, MemoryStore, conformance};
///
/// conformance::run_leased(&Leased::new(MemoryStore::new()), 0x01).await;
/// # }
/// ```
pub async fn run_leased<S: ChannelStore>(node: &super::Leased<S>, prefix: u8) {
    let fx = Fixture { client: SecretKey::from_slice(&CLIENT).expect("valid key"), prefix };
    model_runs(node, &fx, Some(node)).await;
}

async fn model_runs<S: ChannelStore, L: ChannelStore>(
    store: &L,
    fx: &Fixture,
    leased: Option<&super::Leased<S>>,
) {
    const RUNS: u8 = 12;
    const STEPS: usize = 60;
    let mut rng = Rng(0x5eed ^ u64::from(fx.prefix));
    for run in 0..RUNS {
        let channel = fx.model_channel(run);
        let first = 10_000 + rng.below(20_000);
        store.create(fx.record(channel.clone(), first)).await.expect("create");
        let mut this = Run {
            store,
            fx,
            id: ChannelId::new(channel.outpoint()),
            channel,
            model: Model {
                state: ChannelState::Open,
                ledger: Ledger::paid(msat(first)),
                best_sat: first,
                leases: std::collections::BTreeMap::new(),
            },
            leased: leased.is_some(),
            now: 0,
            debits: Vec::new(),
        };
        for step in 0..STEPS {
            let what = this.step(&mut rng).await;
            if let Some(node) = leased {
                assert_eq!(node.return_all().await, 0, "the node gives its leases back");
            }
            let record = store.load(this.id).await.expect("load").expect("the channel");
            assert_eq!(
                (record.state, record.ledger(), record.paid_amount().to_sat()),
                (this.model.state, this.model.ledger, this.model.best_sat),
                "run {run}, step {step} ({what}): the store disagrees with the model"
            );
        }
    }
}

/// One channel of the model-based check: the store, the model, and what the steps need.
struct Run<'a, L> {
    store: &'a L,
    fx: &'a Fixture,
    channel: Channel,
    id: ChannelId,
    model: Model,
    /// Through a `Leased` node: no raw lease operations, credits of earlier debits, and only
    /// the decision of a debit compared (a node reports what its lease has left).
    leased: bool,
    /// The leases' clock (milliseconds, small: the suite's other leases are not touched).
    now: u64,
    /// Debits granted, for credits through a node.
    debits: Vec<MilliSats>,
}

impl<L: ChannelStore> Run<'_, L> {
    /// One random operation on the store and the model, checked; what it was.
    async fn step(&mut self, rng: &mut Rng) -> String {
        match rng.below(9) {
            0 => self.store_payment(rng.near(self.model.best_sat)).await,
            1 => self.debit(rng.msat(6_000)).await,
            2 => self.pay(rng.near(self.model.best_sat), rng.msat(6_000)).await,
            4..=6 if self.leased => self.credit(rng).await,
            3 => self.credit(rng).await,
            4 => {
                let (least, more) = (rng.msat(2_000), rng.msat(4_000));
                let until = self.now + 1 + rng.below(100);
                let take = LeaseTake::new(lease_id(rng), least, least.saturating_add(more), until);
                let mut request = LeaseRequest::take(take);
                if rng.below(2) == 0 {
                    request = request.and_settle(lease_id(rng), rng.msat(3_000));
                }
                self.lease(request).await
            }
            5 => self.lease(LeaseRequest::settle(lease_id(rng), rng.msat(3_000))).await,
            6 => {
                self.now += rng.below(60);
                let _forfeited_anywhere = self.store.expire_leases(self.now).await.expect("expire");
                self.model.expire(self.now);
                format!("expire_leases {}", self.now)
            }
            7 => {
                let committed = self.model.ledger.committed().to_sat_ceil().to_sat();
                self.close_with((committed + rng.below(4_000)).saturating_sub(2_000).max(1_000))
                    .await
            }
            _ => {
                // Mostly from the channel's state, so that runs reach every state; some
                // illegal moves, which every store must refuse.
                let from = if rng.below(3) == 0 { rng.state() } else { self.model.state };
                self.transition(from, rng.state()).await
            }
        }
    }

    async fn store_payment(&mut self, sat: u64) -> String {
        let got = self.store.store_payment(self.id, self.fx.payment(&self.channel, sat)).await;
        assert_eq!(got.expect("store"), self.model.store(sat), "store_payment {sat} sat");
        format!("store_payment {sat} sat")
    }

    async fn debit(&mut self, amount: MilliSats) -> String {
        let got = self.store.debit(self.id, amount).await.expect("debit");
        let want = self.model.debit(amount);
        if matches!(want, Debit::Debited { .. }) {
            self.debits.push(amount);
        }
        if self.leased {
            let decision = std::mem::discriminant;
            assert_eq!(decision(&got), decision(&want), "debit {amount}: {got:?}, {want:?}");
        } else {
            assert_eq!(got, want, "debit {amount}");
        }
        format!("debit {amount}")
    }

    async fn pay(&mut self, sat: u64, amount: MilliSats) -> String {
        let got = self.store.pay(self.id, self.fx.checked(&self.channel, sat), amount).await;
        let _stored_or_stale = self.model.store(sat);
        let want = self.model.debit(amount);
        if matches!(want, Debit::Debited { .. }) {
            self.debits.push(amount);
        }
        assert_eq!(got.expect("pay"), want, "pay {sat} sat, {amount}");
        format!("pay {sat} sat, {amount}")
    }

    async fn credit(&mut self, rng: &mut Rng) -> String {
        let amount = match (self.leased, self.debits.len() as u64) {
            (false, _) => rng.msat(3_000),
            (true, 0) => MilliSats::ZERO,
            (true, n) => self.debits.swap_remove(rng.below(n) as usize),
        };
        let got = self.store.credit(self.id, amount).await.expect("credit");
        self.model.ledger = self.model.ledger.credit(amount);
        if !self.leased {
            assert_eq!(got, self.model.ledger.unspent(), "credit {amount}");
        }
        format!("credit {amount}")
    }

    async fn lease(&mut self, request: LeaseRequest) -> String {
        let got = self.store.lease(self.id, request).await.expect("lease");
        assert_eq!(got, self.model.lease(request), "lease {request:?}");
        format!("lease {request:?}")
    }

    async fn close_with(&mut self, sat: u64) -> String {
        let got = self.store.close_with(self.id, self.fx.checked(&self.channel, sat)).await;
        assert_eq!(got.expect("close_with"), self.model.close_with(sat), "close_with {sat} sat");
        format!("close_with {sat} sat")
    }

    async fn transition(&mut self, from: ChannelState, to: ChannelState) -> String {
        let got = self.store.transition(self.id, from, to).await;
        match (&got, &self.model.transition(from, to)) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "transition {from:?} → {to:?}"),
            (Err(StoreError::IllegalMove { .. }), Err(StoreError::IllegalMove { .. })) => {}
            (got, want) => {
                panic!("transition {from:?} → {to:?}: the store {got:?}, the model {want:?}")
            }
        }
        format!("transition {from:?} → {to:?}")
    }
}

fn lease_id(rng: &mut Rng) -> LeaseId {
    LeaseId::new(1 + rng.below(3))
}
