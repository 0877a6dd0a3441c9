//! [`Leased`] on every store backend: nodes (several `Leased` handles on one store) serve
//! exactly what was paid under concurrency, a node that dies leaves exactly its lease's
//! unused part spent, a given-back debit returns to the lease, and a fair close counts leases.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[allow(unused_imports)]
use common::stores::*;
use common::{Setup, now_ms};
use paychan::MilliSats;
use paychan::channel::ChannelState;
use paychan::channel::{NewPayment, Terms};
use paychan::store::ops::Debit;
use paychan::store::{ChannelRecord, ChannelStore, LeaseConfig, Leased, MemoryStore};
use paychan::wire::ChannelId;

const PRICE: MilliSats = MilliSats::from_msat(70_000);
const MAX_LEASE: MilliSats = MilliSats::from_msat(500_000);

/// A fresh open channel in `store` whose best payment pays `sat`.
async fn open<S: ChannelStore>(store: &S, setup: &Setup, sat: u64) -> ChannelId {
    let record = ChannelRecord::open(setup.channel.clone(), 0, setup.pay(sat));
    let id = record.id();
    store.create(record).await.unwrap();
    id
}

fn config() -> LeaseConfig {
    LeaseConfig::default().with_max_lease(MAX_LEASE).with_idle(Duration::from_secs(60))
}

/// A node over `store` (a hook around `memory`), and a fresh channel in `memory` whose best
/// payment pays 10 000 sat.
async fn hooked_node(
    memory: &MemoryStore,
    store: common::hooked::Hooked,
    seed: u8,
) -> (ChannelId, Leased<common::hooked::Hooked>) {
    let setup = Setup::with(seed, 2, Terms::default(), None);
    let id = open(memory, &setup, 10_000).await;
    (id, Leased::with_config(store, config()))
}

/// `memory` behind a hook that loses the replies of lease operations (after the store applied
/// them) while the flag is set.
fn losing_leases(memory: &MemoryStore) -> (common::hooked::Hooked, Arc<AtomicBool>) {
    use common::hooked::{Hooked, Op};
    let lose = Arc::new(AtomicBool::new(false));
    let losing = lose.clone();
    let store = Hooked::new(memory.clone(), |_| Box::pin(std::future::ready(Ok(()))))
        .losing_replies(move |op| op == Op::Lease && losing.load(Ordering::SeqCst));
    (store, lose)
}

/// `node` gives every lease back, and then `memory`'s books of channel `id` say exactly
/// `served` spent, nothing leased, nothing forfeited (`why` otherwise).
async fn all_given_back(
    node: &Leased<common::hooked::Hooked>,
    memory: &MemoryStore,
    id: ChannelId,
    served: MilliSats,
    why: &str,
) {
    assert_eq!(node.return_all().await, 0);
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!(
        (record.spent, record.leased, record.forfeited),
        (served, MilliSats::ZERO, MilliSats::ZERO),
        "{why}"
    );
}

/// Debits `PRICE` `times` times from `node`, each served: what they add up to.
async fn serve<S: ChannelStore>(node: &Leased<S>, id: ChannelId, times: u64) -> MilliSats {
    let mut served = MilliSats::ZERO;
    for _ in 0..times {
        assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::Debited { .. }));
        served = served.saturating_add(PRICE);
    }
    served
}

/// Debits `PRICE` `rounds` times from each of `tasks` tasks, each task alternating between
/// `nodes`; what each node served.
async fn hammer<S: ChannelStore>(
    nodes: &[&Leased<S>],
    id: ChannelId,
    tasks: u64,
    rounds: u64,
) -> Vec<u64> {
    let served: Arc<Vec<AtomicU64>> = Arc::new(nodes.iter().map(|_| AtomicU64::new(0)).collect());
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let nodes: Vec<Leased<S>> = nodes.iter().map(|node| (*node).clone()).collect();
            let served = served.clone();
            tokio::spawn(async move {
                for round in 0..rounds {
                    let n = usize::try_from(task + round).unwrap() % nodes.len();
                    match nodes[n].debit(id, PRICE).await.unwrap() {
                        Debit::Debited { .. } => drop(served[n].fetch_add(1, Ordering::SeqCst)),
                        Debit::Insufficient { .. } => {}
                        other @ Debit::NotOpen { .. } => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    served.iter().map(|count| count.load(Ordering::SeqCst)).collect()
}

/// Two nodes racing on one channel, more requests than paid for: served never exceeds paid,
/// and once both gave their leases back, spent is exactly what was served.
async fn nodes_serve_exactly_what_was_paid<S: ChannelStore + Clone>(store: S) {
    let setup = Setup::with(11, 2, Terms::default(), None);
    let id = open(&store, &setup, 10_000).await;
    let nodes = [
        Leased::with_config(store.clone(), config()),
        Leased::with_config(store.clone(), config()),
    ];
    let served = hammer(&[&nodes[0], &nodes[1]], id, 16, 20).await;
    let (a, b) = (served[0], served[1]);
    let served = PRICE.checked_mul(a + b).unwrap();
    assert!(a > 0 && b > 0, "both nodes served: {a} and {b}");
    assert!(served <= MilliSats::from_msat(10_000_000), "served more than paid: {served}");
    for node in &nodes {
        assert_eq!(node.return_all().await, 0);
        assert_eq!(node.held(), (MilliSats::ZERO, MilliSats::ZERO));
    }
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!((record.spent, record.leased), (served, MilliSats::ZERO), "to the msat");
    // What one node held unused when the other was refused is all that went unserved.
    assert!(record.balance() < MAX_LEASE.checked_mul(2).unwrap(), "{}", record.balance());
}

/// A node that dies (dropped without giving its leases back) leaves its lease; after the
/// ttl it is forfeited: kept for good, not reported spent. So the channel keeps what was
/// served plus what the dead node held unused, and reports as spent what was settled.
async fn a_dead_nodes_lease_is_forfeited<S: ChannelStore + Clone>(store: S) {
    let setup = Setup::with(12, 2, Terms::default(), None);
    let id = open(&store, &setup, 10_000).await;
    let config = config().with_ttl(LeaseConfig::MIN_TTL);
    let (doomed, survivor) =
        (Leased::with_config(store.clone(), config), Leased::new(store.clone()));
    let died_serving = hammer(&[&doomed], id, 4, 5).await[0];
    let (held, used) = doomed.held();
    assert!(!held.is_zero() && held >= used, "the node dies holding a lease: {held} {used}");
    drop(doomed);
    let served = died_serving + hammer(&[&survivor], id, 4, 5).await[0];
    assert_eq!(survivor.return_all().await, 0);
    let before = store.load(id).await.unwrap().unwrap();
    assert_eq!(before.leased, held, "the dead node's lease is left");
    assert_eq!(store.expire_leases(now_ms()).await.unwrap(), MilliSats::ZERO, "not lapsed yet");
    // As seen by a clock past the ttl (the test does not wait for it).
    let later = now_ms() + u64::try_from(LeaseConfig::MIN_TTL.as_millis()).unwrap() + 100;
    let forfeited = store.expire_leases(later).await.unwrap();
    assert_eq!(forfeited, held);
    let after = store.load(id).await.unwrap().unwrap();
    assert_eq!((after.leased, after.forfeited), (MilliSats::ZERO, held));
    let served = PRICE.checked_mul(served).unwrap();
    assert_eq!(
        after.spent,
        served.checked_sub(used).unwrap(),
        "spent = served but what the dead node used of its lease, to the msat"
    );
    assert_eq!(
        after.committed(),
        served.saturating_add(held.checked_sub(used).unwrap()),
        "kept = served + the dead node's unused lease, to the msat"
    );
}

/// A debit given back (a refunded 5xx) returns to the node's lease, and so to the channel.
async fn a_credit_returns_to_the_lease<S: ChannelStore + Clone>(store: S) {
    let setup = Setup::with(13, 2, Terms::default(), None);
    let id = open(&store, &setup, 1_000).await;
    let node = Leased::with_config(store.clone(), config());
    assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::Debited { .. }));
    assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::Debited { .. }));
    let balance = node.credit(id, PRICE).await.unwrap();
    assert_eq!(balance, MilliSats::from_msat(1_000_000 - 70_000), "paid − what stays charged");
    assert_eq!(node.return_all().await, 0);
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!((record.spent, record.leased), (PRICE, MilliSats::ZERO));
}

/// A fair close on one node settles its own lease; another node's lease counts until it is
/// given back (idle), and a close that cannot wait for it pays for it.
async fn a_fair_close_counts_every_lease<S: ChannelStore + Clone>(store: S) {
    let setup = Setup::with(14, 2, Terms::default(), None);
    let id = open(&store, &setup, 10_000).await;
    let idle = config().with_idle(Duration::from_millis(150));
    let (here, there) =
        (Leased::with_config(store.clone(), idle), Leased::with_config(store.clone(), config()));
    hammer(&[&here], id, 1, 10).await;
    hammer(&[&there], id, 1, 5).await;
    let served = PRICE.checked_mul(15).unwrap();
    let fair = |msat: u64| {
        let payment = setup.pay(msat.div_ceil(1_000));
        match setup.channel.check_new_payment(None, payment, setup.tip()).unwrap() {
            NewPayment::Increase(payment) => payment,
            other => panic!("{other:?}"),
        }
    };
    // `there` never gives its lease back (60 s idle): the close waits, then refuses.
    let waited = std::time::Instant::now();
    assert!(!here.close_with(id, fair(served.to_msat())).await.unwrap());
    assert!(waited.elapsed() >= Duration::from_millis(300), "it waited for the lease");
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!(record.state, ChannelState::Open);
    // Served, and what `there` holds but has not used.
    let (held, used) = there.held();
    let unused = held.checked_sub(used).unwrap();
    assert!(!unused.is_zero(), "there holds an unused part");
    assert_eq!(record.committed(), served.saturating_add(unused));
    // Given back: the close pays exactly what was served.
    assert_eq!(there.return_all().await, 0);
    assert!(here.close_with(id, fair(served.to_msat())).await.unwrap());
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!((record.state, record.spent), (ChannelState::Closing, served));
}

/// A channel that leaves open on one node (its settlement task suspended it: the zero-conf
/// funding left the mempool; or it moved it to closing) is served from no node's lease once
/// each node's settlement pass listed the channels (security review F6): the node that moved
/// it stops at once, the other at its pass, whether the pass lists the channel in its new
/// state or only finds it missing from the open ones (it moved in between). Everything
/// served stays spent, nothing stays leased.
async fn a_channel_out_of_open_is_served_from_no_lease_after_a_pass<S: ChannelStore + Clone>(
    store: S,
) {
    for (seed, to, listed) in
        [(22, ChannelState::Pending, true), (23, ChannelState::Closing, false)]
    {
        let setup = Setup::with(seed, 2, Terms::default(), None);
        let id = open(&store, &setup, 10_000).await;
        let (a, b) = (
            Leased::with_config(store.clone(), config()),
            Leased::with_config(store.clone(), config()),
        );
        let served = serve(&a, id, 30).await.saturating_add(serve(&b, id, 3).await);
        let (held, used) = a.held();
        assert!(held.checked_sub(used).unwrap() >= PRICE, "A's lease has room: {held} {used}");
        // B's settlement pass moves the channel; then A's pass lists the channels.
        assert!(b.transition(id, ChannelState::Open, to).await.unwrap());
        if listed {
            assert!(a.list(to).await.unwrap().iter().any(|record| record.id() == id));
        }
        assert!(a.list(ChannelState::Open).await.unwrap().iter().all(|record| record.id() != id));
        common::assert_no_lease_serves(&store, [&a, &b], id, PRICE, (to, 10), served).await;
    }
}

async fn every_check<S: ChannelStore + Clone>(store: S) {
    nodes_serve_exactly_what_was_paid(store.clone()).await;
    a_dead_nodes_lease_is_forfeited(store.clone()).await;
    a_credit_returns_to_the_lease(store.clone()).await;
    a_fair_close_counts_every_lease(store.clone()).await;
    a_channel_out_of_open_is_served_from_no_lease_after_a_pass(store).await;
}

for_each_store!(leases_on, every_check);

/// A lease operation that happened in the store but whose reply was lost: the node never
/// draws from the lease it was settling again (the store gave its rest back), and the grant
/// it did not hear of merges into its next lease instead of lapsing. Served stays exactly
/// what is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_never_lets_a_node_serve_from_a_settled_lease() {
    let memory = MemoryStore::new();
    let (store, lose) = losing_leases(&memory);
    let (id, node) = hooked_node(&memory, store, 15).await;
    // A first lease of one request, then one sized by the rate: several requests' worth.
    let mut served = serve(&node, id, 3).await;
    let (held, used) = node.held();
    assert!(held.checked_sub(used).unwrap() >= PRICE, "the lease has room: {held} {used}");
    // A request bigger than the room: the lease is settled and a new one taken, in the store;
    // the node hears an error.
    lose.store(true, Ordering::SeqCst);
    let big = PRICE.checked_mul(10).unwrap();
    assert!(node.debit(id, big).await.is_err(), "the reply was lost");
    lose.store(false, Ordering::SeqCst);
    assert_eq!(node.held(), (MilliSats::ZERO, MilliSats::ZERO), "nothing is drawn from it again");
    served = served.saturating_add(serve(&node, id, 3).await);
    all_given_back(
        &node,
        &memory,
        id,
        served,
        "spent is what was served, and the unheard grant was given back",
    )
    .await;
}

/// A client that goes away while its request takes a new lease does not cut the lease
/// operation in two, and a debit given back meanwhile is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_refill_and_a_refund_meanwhile_lose_nothing() {
    use common::hooked::{Hooked, Op};
    let memory = MemoryStore::new();
    let slow = Arc::new(AtomicBool::new(false));
    let slowed = slow.clone();
    let store = Hooked::new(memory.clone(), move |op| {
        let slow = op == Op::Lease && slowed.load(Ordering::SeqCst);
        Box::pin(async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Ok(())
        })
    });
    let (id, node) = hooked_node(&memory, store, 16).await;
    assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::Debited { .. }));
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!(record.spent, MilliSats::ZERO, "the debit is in the lease, not yet in the store");
    // A request bigger than the lease, whose client gives up while the store is slow.
    slow.store(true, Ordering::SeqCst);
    let big = PRICE.checked_mul(10).unwrap();
    let cancelled = tokio::spawn({
        let node = node.clone();
        async move { node.debit(id, big).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    cancelled.abort();
    // Meanwhile the first debit's request failed: its price is given back (the store does not
    // count it yet: the lease it came from is being settled).
    node.credit(id, PRICE).await.unwrap();
    slow.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(node.return_all().await, 0);
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!(
        (record.spent, record.leased),
        (big, MilliSats::ZERO),
        "the cancelled request stays charged (the lease operation ran to its end); the \
         refunded one does not"
    );
}

/// After a top-up (stored through this node, or another), the balances this node reports
/// from its lease count the new payment: never below the true balance, so a client never
/// sees the top-up as spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_reported_from_a_lease_count_top_ups() {
    let store = MemoryStore::new();
    let setup = Setup::with(17, 2, Terms::default(), None);
    let id = open(&store, &setup, 10_000).await;
    let node = Leased::with_config(store.clone(), config());
    for _ in 0..3 {
        assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::Debited { .. }));
    }
    let checked =
        |sat: u64| match setup.channel.check_new_payment(None, setup.pay(sat), setup.tip()) {
            Ok(NewPayment::Increase(payment)) => payment,
            other => panic!("{other:?}"),
        };
    let expect = |paid_sat: u64, served: u64| {
        MilliSats::from_msat(paid_sat * 1_000 - served * PRICE.to_msat())
    };
    // A top-up through this node (a request carrying a new payment).
    assert!(matches!(node.pay(id, checked(11_000), PRICE).await.unwrap(), Debit::Debited { .. }));
    let Debit::Debited { balance } = node.debit(id, PRICE).await.unwrap() else { panic!() };
    // Never below the true balance (the payment's own debit went to the store, which this
    // node counts at its next lease): the top-up counts.
    assert!(balance >= expect(11_000, 5), "{balance}: the top-up counts");
    // A top-up through another node: this node reads the record before it serves the new
    // payment's header (as the layer does).
    assert!(matches!(store.pay(id, checked(12_000), PRICE).await.unwrap(), Debit::Debited { .. }));
    node.load(id).await.unwrap();
    let Debit::Debited { balance } = node.debit(id, PRICE).await.unwrap() else { panic!() };
    assert!(balance >= expect(12_000, 7), "{balance}: the other node's top-up counts");
    assert_eq!(node.return_all().await, 0);
}

/// A lease operation that failed before the store applied it: the lease it was settling is
/// never drawn from again, a refund of a request served from it waits for its settlement
/// (the store does not count that request yet), and the next operation settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_while_a_settlement_is_unknown_is_kept() {
    use common::hooked::{Hooked, Op};
    let memory = MemoryStore::new();
    let fail = Arc::new(AtomicBool::new(false));
    let failing = fail.clone();
    let store = Hooked::failing(memory.clone(), move |op| {
        op == Op::Lease && failing.load(Ordering::SeqCst)
    });
    let (id, node) = hooked_node(&memory, store, 18).await;
    assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::Debited { .. }));
    fail.store(true, Ordering::SeqCst);
    assert!(node.debit(id, PRICE.checked_mul(10).unwrap()).await.is_err());
    // The first request's answer failed: its price is given back.
    node.credit(id, PRICE).await.unwrap();
    fail.store(false, Ordering::SeqCst);
    assert_eq!(node.return_all().await, 0);
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!((record.spent, record.leased), (MilliSats::ZERO, MilliSats::ZERO), "refunded");
}

/// A lease operation whose task panics (a store bug; the same holds for a runtime shutting
/// down under it) leaves nothing in flight, whether the store applied the operation or not:
/// what it was settling is settled by the next operation, a grant it did not hear of merges
/// into the next lease, and a refund meanwhile is given back after it. Exact to the msat.
async fn a_panicking_lease_operation_leaves_nothing_in_flight(after_the_store_applied_it: bool) {
    use common::hooked::{Hooked, Op};
    let memory = MemoryStore::new();
    let panics = Arc::new(AtomicBool::new(false));
    let (before, after) = (panics.clone(), panics.clone());
    let store = Hooked::new(memory.clone(), move |op| {
        let panic = op == Op::Lease && before.load(Ordering::SeqCst) && !after_the_store_applied_it;
        Box::pin(async move {
            assert!(!panic, "a store bug (expected by this test)");
            Ok(())
        })
    })
    // Asked whether to lose the reply once the store applied the operation: panics instead.
    .losing_replies(move |op| {
        let panic = op == Op::Lease && after.load(Ordering::SeqCst) && after_the_store_applied_it;
        assert!(!panic, "a store bug after the operation (expected by this test)");
        false
    });
    let (id, node) = hooked_node(&memory, store, 19).await;
    let mut served = serve(&node, id, 3).await;
    let before = memory.load(id).await.unwrap().unwrap().spent;
    assert!(before < served, "some requests were served from the live lease");
    panics.store(true, Ordering::SeqCst);
    assert!(node.debit(id, PRICE.checked_mul(10).unwrap()).await.is_err(), "the task panicked");
    panics.store(false, Ordering::SeqCst);
    let spent = memory.load(id).await.unwrap().unwrap().spent;
    let settled = if after_the_store_applied_it { served } else { before };
    assert_eq!(spent, settled, "the live lease is settled only if the store applied it");
    // One of the served requests failed after all: its price is given back.
    node.credit(id, PRICE).await.unwrap();
    served = served.checked_sub(PRICE).unwrap();
    served = served.saturating_add(serve(&node, id, 2).await);
    all_given_back(
        &node,
        &memory,
        id,
        served,
        "the lease the panicked operation was settling is settled, the refund given back",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_operation_panicking_before_the_store_applies_it_leaves_nothing_in_flight() {
    a_panicking_lease_operation_leaves_nothing_in_flight(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_operation_panicking_after_the_store_applied_it_leaves_nothing_in_flight() {
    a_panicking_lease_operation_leaves_nothing_in_flight(true).await;
}

/// Settling a lease and a take of unknown outcome takes two store operations; when the
/// first succeeds and the second fails, the next attempt finishes the job, and nothing is
/// counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_half_done_is_finished_by_the_next() {
    use common::hooked::{Hooked, Op};
    use std::sync::atomic::AtomicUsize;
    let memory = MemoryStore::new();
    // Lease operations fail while `fail_from` ≤ their number (counted from 1).
    let (count, fail_from) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counting, failing) = (count.clone(), fail_from.clone());
    let lose = Arc::new(AtomicBool::new(false));
    let losing = lose.clone();
    let store = Hooked::failing(memory.clone(), move |op| {
        if op != Op::Lease {
            return false;
        }
        let n = counting.fetch_add(1, Ordering::SeqCst) + 1;
        let from = failing.load(Ordering::SeqCst);
        from != 0 && n >= from
    })
    .losing_replies(move |op| op == Op::Lease && losing.load(Ordering::SeqCst));
    let (id, node) = hooked_node(&memory, store, 20).await;
    let mut served = serve(&node, id, 3).await;
    // A refill the store applies (the lease settled, a new one granted) whose reply is lost:
    // a settlement and a grant of unknown outcome.
    lose.store(true, Ordering::SeqCst);
    assert!(node.debit(id, PRICE.checked_mul(10).unwrap()).await.is_err());
    lose.store(false, Ordering::SeqCst);
    let granted = memory.load(id).await.unwrap().unwrap().leased;
    assert!(!granted.is_zero(), "the store granted the lease the node did not hear of");
    // Giving back: the settlement goes through (again: nothing changes), the grant's does not.
    fail_from.store(count.load(Ordering::SeqCst) + 2, Ordering::SeqCst);
    assert_eq!(node.return_all().await, 1, "half done");
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!((record.spent, record.leased), (served, granted), "the first half");
    fail_from.store(0, Ordering::SeqCst);
    assert_eq!(node.return_all().await, 0);
    let Debit::Debited { balance } = node.debit(id, PRICE).await.unwrap() else { panic!() };
    served = served.saturating_add(PRICE);
    assert_eq!(
        balance,
        MilliSats::from_msat(10_000_000).checked_sub(served).unwrap(),
        "the balance counts the settled lease once"
    );
    all_given_back(&node, &memory, id, served, "spent is what was served").await;
}

/// A take whose reply was lost (the store granted it) is retried under the same id; when
/// that retry is refused (the balance does not cover the request), the unheard grant is
/// still given back, unused, by the next operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_retake_still_gives_the_unheard_grant_back() {
    let memory = MemoryStore::new();
    let (store, lose) = losing_leases(&memory);
    let (id, node) = hooked_node(&memory, store, 21).await;
    let served = serve(&node, id, 3).await;
    lose.store(true, Ordering::SeqCst);
    assert!(node.debit(id, PRICE.checked_mul(10).unwrap()).await.is_err(), "reply lost");
    lose.store(false, Ordering::SeqCst);
    let granted = memory.load(id).await.unwrap().unwrap().leased;
    assert!(granted >= PRICE.checked_mul(10).unwrap(), "the store granted it: {granted}");
    let too_much = MilliSats::from_msat(20_000_000);
    assert!(matches!(node.debit(id, too_much).await.unwrap(), Debit::Insufficient { .. }));
    all_given_back(&node, &memory, id, served, "the unheard grant was given back, unused").await;
}

/// A lease the store granted just before the channel left open, whose reply reaches the node
/// after its settlement pass saw the channel pending: the request that asked for it is
/// refused, nothing is drawn from it, and it is given back unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_as_the_channel_leaves_open_is_not_drawn_from() {
    use common::hooked::{Hooked, Op};
    use futures_util::FutureExt as _;
    use std::sync::OnceLock;
    let memory = MemoryStore::new();
    let setup = Setup::with(24, 2, Terms::default(), None);
    let id = open(&memory, &setup, 10_000).await;
    // Once armed, the next lease operation's reply waits while another node suspends the
    // channel and this node's settlement pass lists the pending channels.
    let armed = Arc::new(AtomicBool::new(false));
    let node: Arc<OnceLock<Leased<Hooked>>> = Arc::default();
    let store = Hooked::new(memory.clone(), |_| Box::pin(std::future::ready(Ok(()))))
        .losing_replies({
            let (armed, memory, node) = (armed.clone(), memory.clone(), node.clone());
            move |op| {
                if op == Op::Lease && armed.swap(false, Ordering::SeqCst) {
                    let moved = memory.transition(id, ChannelState::Open, ChannelState::Pending);
                    assert!(moved.now_or_never().unwrap().unwrap());
                    let listed = node.get().unwrap().list(ChannelState::Pending);
                    assert_eq!(listed.now_or_never().unwrap().unwrap().len(), 1);
                }
                false
            }
        });
    let node = node.get_or_init(|| Leased::with_config(store, config())).clone();
    let served = serve(&node, id, 3).await;
    // A request bigger than the lease's room: a new lease, granted while the channel was open.
    armed.store(true, Ordering::SeqCst);
    let big = PRICE.checked_mul(10).unwrap();
    let refused = node.debit(id, big).await.unwrap();
    assert!(!armed.load(Ordering::SeqCst), "the reply was held back");
    assert_eq!(refused, Debit::NotOpen { state: ChannelState::Pending });
    assert_eq!(node.held(), (MilliSats::ZERO, MilliSats::ZERO), "nothing to draw from");
    assert!(matches!(node.debit(id, PRICE).await.unwrap(), Debit::NotOpen { .. }));
    assert_eq!(node.return_all().await, 0);
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!(
        (record.spent, record.leased, record.forfeited),
        (served, MilliSats::ZERO, MilliSats::ZERO),
        "the grant was given back unused"
    );
}

/// A node that moves a channel out of open settles its own lease first; requests that take a
/// new lease on it between that settlement and the move are the last ones it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_while_this_node_moves_the_channel_is_not_drawn_from_after() {
    use common::hooked::{Hooked, Op};
    use std::sync::OnceLock;
    let memory = MemoryStore::new();
    let setup = Setup::with(25, 2, Terms::default(), None);
    let id = open(&memory, &setup, 10_000).await;
    let node: Arc<OnceLock<Leased<Hooked>>> = Arc::default();
    let store = Hooked::new(memory.clone(), {
        let node = node.clone();
        move |op| {
            let node = node.clone();
            Box::pin(async move {
                if matches!(op, Op::Transition { .. }) {
                    // Two requests on the node, after its settlement and before the move: the
                    // second takes a lease sized by their rate, with room left.
                    let node = node.get().unwrap();
                    for _ in 0..2 {
                        assert!(matches!(node.debit(id, PRICE).await?, Debit::Debited { .. }));
                    }
                    let (held, used) = node.held();
                    assert!(held.checked_sub(used).unwrap() >= PRICE, "room: {held} {used}");
                }
                Ok(())
            })
        }
    });
    let node = node.get_or_init(|| Leased::with_config(store, config())).clone();
    let served = serve(&node, id, 3).await.saturating_add(PRICE.checked_mul(2).unwrap());
    assert!(node.transition(id, ChannelState::Open, ChannelState::Pending).await.unwrap());
    for _ in 0..10 {
        let debit = node.debit(id, PRICE).await.unwrap();
        assert_eq!(debit, Debit::NotOpen { state: ChannelState::Pending });
    }
    assert_eq!(node.return_all().await, 0);
    let record = memory.load(id).await.unwrap().unwrap();
    assert_eq!(
        (record.spent, record.leased, record.forfeited),
        (served, MilliSats::ZERO, MilliSats::ZERO),
        "what was served is spent, to the msat"
    );
}
