//! Scale of state (issue #14 §4): what one channel costs in the memory store, a lookup among
//! 1 000 to 1 000 000 channels, and a settlement pass beside 0 or 100 000 settled channels.
//!
//! `cargo bench --bench state` (add `--features sqlite` for the SQLite pass). The memory
//! cost is printed once, from the process's resident set before and after a million channels.

use std::hint::black_box;

use bitcoin::bip32::Xpriv;
use bitcoin::hashes::{Hash, sha256d};
use bitcoin::{Amount, Network, OutPoint, Transaction, Txid};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use paychan::chain::sim::SimulatedChain;
use paychan::channel::ChannelParams;
use paychan::channel::ChannelState;
use paychan::settlement::Settlement;
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::ChannelId;

mod common;

/// A channel's parameters and a signed payment, shared by every record (each record still
/// holds its own copies, as a store does).
fn template() -> (ChannelParams, Transaction) {
    let k1 = common::client_key();
    let params = common::params(Amount::from_sat(1_000_000));
    let channel = params.clone().at(outpoint(0));
    let mut payment = channel.build_payment(Amount::from_sat(10_000)).unwrap();
    channel.sign_payment(&mut payment, &k1).unwrap();
    (params, payment)
}

fn outpoint(i: u32) -> OutPoint {
    OutPoint { txid: Txid::from_raw_hash(sha256d::Hash::hash(&i.to_le_bytes())), vout: 0 }
}

fn record(i: u32, params: &ChannelParams, payment: &Transaction) -> ChannelRecord {
    ChannelRecord::open(params.clone().at(outpoint(i)), i, payment.clone())
}

/// The process's resident set, in bytes (Linux).
fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    Some(statm.split_whitespace().nth(1)?.parse::<u64>().ok()? * 4096)
}

async fn fill<S: ChannelStore>(store: &S, range: std::ops::Range<u32>, state: ChannelState) {
    let (params, payment) = template();
    for i in range {
        let record = record(i, &params, &payment).with_state(state);
        store.create(record).await.unwrap();
    }
}

fn lookups(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("memory_lookup");
    let mut store = MemoryStore::new();
    let mut filled = 0;
    for n in [1_000u32, 100_000, 1_000_000] {
        let before = resident();
        rt.block_on(fill(&store, filled..n, ChannelState::Open));
        if let (Some(before), Some(after), 1_000_000) = (before, resident(), n) {
            let per = (after.saturating_sub(before)) / u64::from(n - filled);
            eprintln!(
                "memory store: {n} open channels, {per} bytes each ({} MiB in all)",
                (per * u64::from(n)) >> 20
            );
        }
        filled = n;
        let mut i = 0u32;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                i = i.wrapping_mul(2_654_435_761).wrapping_add(1) % n;
                let id = ChannelId::new(outpoint(i));
                rt.block_on(store.load(black_box(id))).unwrap().unwrap()
            })
        });
    }
    group.finish();
    store = MemoryStore::new(); // dropped outside the measurement
    drop(store);
}

fn pass<S: ChannelStore + Clone>(c: &mut Criterion, name: &str, make: impl Fn() -> S) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let chain = SimulatedChain::new();
    let master = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
    let mut group = c.benchmark_group(name);
    for settled in [0u32, 100_000] {
        let store = make();
        // A few channels the pass acts on (closing at a time far away: nothing to do), and
        // the settled ones it must not read.
        rt.block_on(fill(&store, 0..10, ChannelState::Failed));
        rt.block_on(fill(&store, 10..10 + settled, ChannelState::Settled));
        let mut task = Settlement::new(store, chain.clone(), master);
        group.bench_with_input(BenchmarkId::new("settled", settled), &settled, |b, _| {
            b.iter(|| rt.block_on(task.run_once()).unwrap())
        });
    }
    group.finish();
}

fn settlement(c: &mut Criterion) {
    pass(c, "settlement_pass_memory", MemoryStore::new);
    #[cfg(feature = "sqlite")]
    pass(c, "settlement_pass_sqlite_in_memory", || {
        paychan::store::SqliteStore::open_in_memory().unwrap()
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = lookups, settlement
}
criterion_main!(benches);
