//! End-to-end demo of the channel protocol on the simulated chain: open a channel, pay for
//! requests with ever larger payments, close cooperatively, and settle on chain.
//!
//! Run with `cargo run --example demo`. Everything runs in-process on embedded defaults; the
//! chain is simulated (no network) but checks every transaction with Bitcoin Core's consensus
//! interpreter and relay policy. The keys are fixed demo keys: never use them for real coins.

use bitcoin::absolute::LockTime;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, ScriptBuf, TxOut};
use paychan::chain::TxStatus;
use paychan::chain::sim::{SimulatedChain, sign_p2wpkh_input};
use paychan::channel::{PaymentCheck, Terms};
use paychan::{MilliSats, wire};

const REQUESTS: u64 = 25;
const PRICE: MilliSats = MilliSats::from_msat(150_500);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secp = Secp256k1::new();
    let key = |byte| SecretKey::from_slice(&[byte; 32]).expect("non-zero demo key");
    let (client, server, wallet) = (key(0x11), key(0x22), key(0x33));
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
    let p2wpkh = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());

    let chain = SimulatedChain::new();
    let terms = Terms::default();
    let (coin, coin_out) = chain.faucet_p2wpkh(&pk(&wallet), Amount::from_sat(250_000));
    println!(
        "simulated chain at height {}; client wallet holds {}",
        chain.tip().height,
        coin_out.value
    );

    // 1. Agree: 100 000 sat for 1 000 blocks.
    let tip = chain.tip();
    let params = terms.agree(
        pk(&client),
        pk(&server),
        Amount::from_sat(100_000),
        LockTime::from_height(tip.height + 1_000)?,
        p2wpkh(&client),
        p2wpkh(&server),
        tip,
    )?;
    // 2-3. The client builds the funding (T1) and the refund (T2).
    let change = TxOut { value: Amount::from_sat(149_000), script_pubkey: p2wpkh(&wallet) };
    let (unsigned_t1, outpoint) = params.build_funding(&[coin], Some(change));
    let t2 = params.build_refund(outpoint, params.refund_fee());
    // 4-5. The server checks and signs the refund; the client verifies the signature.
    let server_sig = params.check_refund(&terms, &unsigned_t1, &t2, tip)?.sign(&server)?;
    params.verify_refund_signature(&t2, &server_sig)?;
    let refund = params.complete_refund(&t2, &client, &server_sig)?;
    // 6. The client signs T1; the server checks it and broadcasts it.
    let mut t1 = unsigned_t1;
    sign_p2wpkh_input(&mut t1, 0, &coin_out, &wallet);
    params.check_funding(&terms, outpoint, &t1, &[coin_out])?;
    chain.submit(&t1)?;
    chain.mine(1);
    println!(
        "channel {outpoint} open: {} in 2-of-2 P2WSH, refund locked until {}",
        params.value, params.expiry
    );
    println!("  the client holds a fully signed refund: {}", refund.compute_txid());

    // 7-9. Each request is paid by a payment that pays the server more.
    let channel = params.clone().at(outpoint);
    let mut best = None;
    let mut spent = MilliSats::ZERO;
    let mut served = 0;
    for _ in 0..REQUESTS {
        spent = spent.checked_add(PRICE).ok_or("overflow")?;
        // Whole satoshis on chain, at least the server output's dust threshold.
        let owed = spent.to_sat_ceil().max(params.min_server_amount());
        let mut t3 = channel.build_payment(owed)?;
        channel.sign_payment(&mut t3, &client)?;
        let header = wire::encode_payment(&t3);
        // The server side: decode the header and check the payment.
        let received = wire::decode_payment(header.as_bytes())?;
        match channel.check_payment(best.as_ref(), &received, chain.tip())? {
            PaymentCheck::Increase { .. } | PaymentCheck::Repeat => served += 1,
        }
        best = Some(received);
    }
    let best = best.ok_or("no payment")?;
    println!(
        "served {served} requests at {PRICE} each; header is {} bytes",
        wire::encode_payment(&best).len()
    );

    // Close: the server co-signs the best payment and broadcasts it.
    let close = channel.close_transaction(&best, &server)?;
    let txid = chain.submit(&close)?;
    chain.mine(1);
    let TxStatus::Confirmed { confirmations, .. } = chain.tx_status(&txid) else {
        return Err("close did not confirm".into());
    };
    let paid = close.output[0].value;
    let change = close.output.get(1).map_or(Amount::ZERO, |o| o.value);
    let fee = params.value - paid - change;
    println!("\nsummary");
    println!("  requests served     {served}");
    println!("  metered             {spent}");
    println!("  sats paid           {} sat", paid.to_sat());
    println!("  settlement txid     {txid} ({confirmations} confirmation)");
    println!("  server received     {} sat", paid.to_sat());
    println!("  client got back     {} sat (fee {} sat)", change.to_sat(), fee.to_sat());
    assert_eq!(paid, spent.to_sat_ceil());
    assert_eq!(paid + change + fee, params.value);
    Ok(())
}
