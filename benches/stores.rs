//! The store operations on the per-request path, one generic benchmark per backend: storing a
//! better payment (compare-and-swap) and debiting a price.

use std::hint::black_box;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, OutPoint, Transaction, Txid};
use criterion::{Criterion, criterion_group, criterion_main};
use paychan::MilliSats;
use paychan::channel::Channel;
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::ChannelId;

mod common;

fn fixture(run: u64) -> (Channel, Vec<Transaction>) {
    let k1 = common::client_key();
    let channel = common::params(Amount::from_sat(10_000_000))
        // A channel id of its own per run, so that shared databases never see it twice.
        .at(OutPoint {
            txid: Txid::from_byte_array([3; 32]),
            vout: (run % u64::from(u32::MAX)) as u32,
        });
    // Signing is not what is measured: a pool of payments reused with rising amounts below.
    let payments = (0..64u64)
        .map(|i| {
            let mut tx = channel.build_payment(Amount::from_sat(1_000 + i)).unwrap();
            channel.sign_payment(&mut tx, &k1).unwrap();
            tx
        })
        .collect();
    (channel, payments)
}

fn bench_store<S: ChannelStore>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: S,
) {
    let run =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let (channel, payments) = fixture(run as u64);
    let id = ChannelId::new(channel.outpoint());
    rt.block_on(store.create(ChannelRecord::open(channel, 0, payments[0].clone()))).unwrap();
    let mut group = c.benchmark_group(name);
    let mut sat = 1_000_000u64;
    group.bench_function("store_payment", |b| {
        b.iter(|| {
            // The amount must keep rising for every call to be a real write.
            sat += 1;
            let mut payment = payments[(sat % 64) as usize].clone();
            payment.output[0].value = Amount::from_sat(sat);
            rt.block_on(store.store_payment(id, black_box(payment))).unwrap()
        })
    });
    group.bench_function("debit", |b| {
        b.iter(|| rt.block_on(store.debit(id, black_box(MilliSats::from_msat(1)))).unwrap())
    });
    group.finish();
}

fn stores(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    bench_store(c, &rt, "memory", MemoryStore::new());
    #[cfg(feature = "sqlite")]
    {
        let dir = std::env::temp_dir().join(format!("paychan-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = paychan::store::SqliteStore::open(dir.join("bench.sqlite3")).unwrap();
        bench_store(c, &rt, "sqlite", store);
    }
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("PAYCHAN_TEST_POSTGRES_URL") {
        let store = rt.block_on(paychan::store::PostgresStore::connect(&url)).unwrap();
        bench_store(c, &rt, "postgres", store);
    }
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("PAYCHAN_TEST_REDIS_URL") {
        let store = rt.block_on(paychan::store::RedisStore::connect(&url)).unwrap();
        let prefix = format!("{{paychan-bench-{}}}:", std::process::id());
        bench_store(c, &rt, "redis", store.with_prefix(prefix));
    }
}

criterion_group!(benches, stores);
criterion_main!(benches);
