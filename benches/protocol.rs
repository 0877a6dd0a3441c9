//! Costs of the protocol core's per-request work: header decoding, checking a new payment, and
//! the raw BIP-0143 sighash + ECDSA verification that dominates it.

use std::hint::black_box;

use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Message, Secp256k1};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{Amount, OutPoint, Txid, ecdsa};
use criterion::{Criterion, criterion_group, criterion_main};
use paychan::wire;

mod common;

fn protocol(c: &mut Criterion) {
    let (k1, k2) = (common::client_key(), common::server_key());
    let tip = common::TIP;
    let params = common::params(Amount::from_sat(100_000));
    let channel = params.clone().at(OutPoint { txid: Txid::from_byte_array([3; 32]), vout: 0 });
    let pay = |sat| {
        let mut tx = channel.build_payment(Amount::from_sat(sat)).unwrap();
        channel.sign_payment(&mut tx, &k1).unwrap();
        tx
    };
    let best = pay(1_000);
    let next = pay(1_001);
    let header = wire::encode_payment(&next);

    c.bench_function("header_decode", |b| {
        b.iter(|| wire::decode_payment(black_box(header.as_bytes())))
    });
    c.bench_function("check_payment_new", |b| {
        b.iter(|| channel.check_payment(black_box(Some(&best)), black_box(&next), tip))
    });
    c.bench_function("check_payment_repeat", |b| {
        b.iter(|| channel.check_payment(black_box(Some(&next)), black_box(&next), tip))
    });
    let ws = params.witness_script();
    let sig = ecdsa::Signature::from_slice(next.input[0].witness.nth(0).unwrap()).unwrap();
    let verifier = Secp256k1::verification_only();
    let client_key = params.client_key.0;
    c.bench_function("raw_sighash_and_verify", |b| {
        b.iter(|| {
            let sighash = SighashCache::new(black_box(&next))
                .p2wsh_signature_hash(0, &ws, params.value, EcdsaSighashType::All)
                .unwrap();
            verifier.verify_ecdsa(&Message::from(sighash), &sig.signature, &client_key)
        })
    });
    c.bench_function("close_transaction", |b| {
        b.iter(|| channel.close_transaction(black_box(&next), &k2))
    });
}

criterion_group!(benches, protocol);
criterion_main!(benches);
