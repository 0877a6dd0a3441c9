//! The layered service against the bare service, in-process (no sockets): the cost the
//! paywall adds per request on its fast path (the channel's current best payment) and on its
//! new-payment path (a better payment, verified and stored), next to the raw BIP-0143
//! sighash + ECDSA verification that the new-payment path cannot avoid.

use std::hint::black_box;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Txid, ecdsa};
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use paychan::MilliSats;
use paychan::channel::{ChainTip, Channel, Terms};
use paychan::server::PaywallLayer;
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire;
use tower::ServiceExt;

fn channel(secp: &Secp256k1<bitcoin::secp256k1::All>, k1: &SecretKey, k2: &SecretKey) -> Channel {
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(secp));
    let script = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
    let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
    Terms::default()
        .agree(
            pk(k1),
            pk(k2),
            Amount::from_sat(10_000_000),
            LockTime::from_height(801_000).unwrap(),
            script(k1),
            script(k2),
            tip,
        )
        .unwrap()
        .at(OutPoint { txid: Txid::from_byte_array([3; 32]), vout: 0 })
}

fn server(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let secp = Secp256k1::new();
    let (k1, k2) =
        (SecretKey::from_slice(&[1; 32]).unwrap(), SecretKey::from_slice(&[2; 32]).unwrap());
    let channel = channel(&secp, &k1, &k2);
    let pay = |sat: u64| {
        let mut tx = channel.build_payment(Amount::from_sat(sat)).unwrap();
        channel.sign_payment(&mut tx, &k1).unwrap();
        tx
    };
    let store = MemoryStore::new();
    let best = pay(9_000_000);
    rt.block_on(store.create(ChannelRecord::open(channel.clone(), 0, best.clone()))).unwrap();
    let (_tip_tx, tip) =
        tokio::sync::watch::channel(ChainTip { height: 800_000, median_time_past: 0 });
    let bare: Router = Router::new().route("/", get(|| async { "ok" }));
    let layered =
        bare.clone().layer(PaywallLayer::new(store.clone(), MilliSats::from_msat(1), tip.clone()));
    // The same with receipts: for a client that does not ask for batches, one ECDSA signature
    // per paid request.
    let master = bitcoin::bip32::Xpriv::new_master(bitcoin::Network::Regtest, &[5; 32]).unwrap();
    let receipted = bare.clone().layer(
        PaywallLayer::new(store.clone(), MilliSats::from_msat(1), tip.clone())
            .with_receipts(master),
    );
    let best_header = wire::encode_payment(&best);
    // Every request carries what a paychan client sends by default besides its payment: it
    // accepts receipts in batches (the server's count of 1 024 decides) and links each to the
    // one before. Routes without receipts ignore both.
    let prev = "ab".repeat(32);
    let request = |header: Option<&str>| {
        let mut r = Request::get("/")
            .header(wire::PAYMENT_RECEIPT_UNSIGNED, "0/2048")
            .header(wire::PAYMENT_RECEIPT_PREV, &prev);
        if let Some(h) = header {
            r = r.header(wire::PAYMENT_CHANNEL, h);
        }
        r.body(Body::empty()).unwrap()
    };

    let mut group = c.benchmark_group("per_request");
    group.bench_function("bare", |b| {
        b.iter(|| rt.block_on(bare.clone().oneshot(request(Some(&best_header)))).unwrap())
    });
    group.bench_function("layered_fast_path", |b| {
        b.iter(|| {
            let response =
                rt.block_on(layered.clone().oneshot(request(Some(&best_header)))).unwrap();
            assert_eq!(response.status(), 200);
        })
    });
    group.bench_function("layered_fast_path_every_receipt_signed", |b| {
        b.iter(|| {
            let mut request = request(Some(&best_header));
            // A client that does not ask for batches: every receipt signed.
            request.headers_mut().remove(wire::PAYMENT_RECEIPT_UNSIGNED);
            let response = rt.block_on(receipted.clone().oneshot(request)).unwrap();
            assert!(response.headers().contains_key(wire::PAYMENT_RECEIPT));
        })
    });
    // The default: receipts signed in batches.
    group.bench_function("layered_fast_path_with_receipts", |b| {
        b.iter(|| {
            let response =
                rt.block_on(receipted.clone().oneshot(request(Some(&best_header)))).unwrap();
            assert!(response.headers().contains_key(wire::PAYMENT_RECEIPT));
        })
    });
    // Each iteration brings a better payment: decode, check (signature verified), store, debit.
    let mut next_sat = 9_000_001;
    group.bench_function("layered_new_payment", |b| {
        b.iter_custom(|iters| {
            let headers: Vec<String> =
                (0..iters).map(|i| wire::encode_payment(&pay(next_sat + i))).collect();
            next_sat += iters;
            let start = std::time::Instant::now();
            for header in &headers {
                let response = rt.block_on(layered.clone().oneshot(request(Some(header)))).unwrap();
                debug_assert_eq!(response.status(), 200);
            }
            start.elapsed()
        })
    });
    let ws = channel.params().witness_script();
    let value = channel.params().value;
    let sig = ecdsa::Signature::from_slice(best.input[0].witness.nth(0).unwrap()).unwrap();
    let client_key = CompressedPublicKey(k1.public_key(&secp)).0;
    let verifier = Secp256k1::verification_only();
    group.bench_function("raw_sighash_and_verify", |b| {
        b.iter(|| {
            let sighash = SighashCache::new(black_box(&best))
                .p2wsh_signature_hash(0, &ws, value, EcdsaSighashType::All)
                .unwrap();
            verifier.verify_ecdsa(&Message::from(sighash), &sig.signature, &client_key).unwrap()
        })
    });
    // The raw work of a new payment: its signature decoded, its sighash, one verification.
    let verify = |payment: &bitcoin::Transaction| {
        let sig = ecdsa::Signature::from_slice(payment.input[0].witness.nth(0).unwrap()).unwrap();
        let sighash = SighashCache::new(payment)
            .p2wsh_signature_hash(0, &ws, value, EcdsaSighashType::All)
            .unwrap();
        verifier.verify_ecdsa(&Message::from(sighash), &sig.signature, &client_key).unwrap();
    };
    // The same raw work over distinct payments (as the new-payment path sees them).
    group.bench_function("raw_sighash_and_verify_distinct", |b| {
        b.iter_custom(|iters| {
            let payments: Vec<_> = (0..iters).map(|i| pay(1_000 + i)).collect();
            let start = std::time::Instant::now();
            payments.iter().for_each(&verify);
            start.elapsed()
        })
    });
    // The same, each verification on cold caches (8 MiB written over first, not timed): what
    // a server whose requests come one at a time, between other work, pays per new payment.
    let mut scratch = vec![0u8; 8 << 20];
    group.bench_function("raw_sighash_and_verify_cold", |b| {
        b.iter_custom(|iters| {
            let payments: Vec<_> = (0..iters).map(|i| pay(1_000 + i)).collect();
            let mut spent = std::time::Duration::ZERO;
            for (i, payment) in payments.iter().enumerate() {
                scratch.iter_mut().step_by(64).for_each(|byte| *byte = byte.wrapping_add(i as u8));
                black_box(&scratch);
                let start = std::time::Instant::now();
                verify(payment);
                spent += start.elapsed();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, server);
criterion_main!(benches);
