//! Requests in process, for counting instructions: what the paywall adds per request, measured
//! where the noise of a shared machine cannot reach (issue #28). Run it under callgrind twice
//! with different counts and divide the difference of the totals by the difference of the
//! counts: setup cancels out.
//!
//! ```sh
//! cargo build --release --example instructions
//! for n in 2000 12000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
//!     target/release/examples/instructions receipts $n 2>&1 | grep Collected
//! done   # (second total − first) / 10 000 = instructions per request
//! ```
//!
//! Paths (the first argument): `bare` (the route without the layer), `fast` (the layer's fast
//! path: the channel's verified best payment, one debit), `receipts` (the same with receipts,
//! as a paychan client asks by default: in batches, each linked to the one before), `new` (a
//! better payment every request: decoded, verified, stored) and `raw` (the sighash and ECDSA
//! verification of as many payments, nothing else). `new` and `raw` sign their payments
//! first (counted in both: compare them with each other). Every request carries the same
//! headers. Not a test: the counts depend on the build; docs/PERFORMANCE.md has them.

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Transaction, Txid};
use http::Request;
use paychan::MilliSats;
use paychan::channel::{ChainTip, Channel, Terms};
use paychan::server::PaywallLayer;
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire;
use tower::ServiceExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: instructions bare|fast|receipts|new|raw <requests>";
    let path = args.next().ok_or(usage)?;
    let count: u64 = args.next().ok_or(usage)?.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let secp = Secp256k1::new();
    let (k1, k2) = (SecretKey::from_slice(&[1; 32])?, SecretKey::from_slice(&[2; 32])?);
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
    let script = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
    let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
    let lock = LockTime::from_height(801_000)?;
    let value = Amount::from_sat(10_000_000);
    let channel = Terms::default()
        .agree(pk(&k1), pk(&k2), value, lock, script(&k1), script(&k2), tip)?
        .at(OutPoint { txid: Txid::from_byte_array([3; 32]), vout: 0 });
    let pay = |sat: u64| -> Result<Transaction, Error> {
        let mut payment = channel.build_payment(Amount::from_sat(sat))?;
        channel.sign_payment(&mut payment, &k1)?;
        Ok(payment)
    };
    let best = pay(9_000_000)?;
    let store = MemoryStore::new();
    runtime.block_on(store.create(ChannelRecord::open(channel.clone(), 0, best.clone())))?;
    let (_tip, tip) = tokio::sync::watch::channel(tip);
    let layer = PaywallLayer::new(store, MilliSats::from_msat(1), tip);
    let master = bitcoin::bip32::Xpriv::new_master(bitcoin::Network::Regtest, &[5; 32])?;
    let route: Router = Router::new().route("/", get(|| async { "ok" }));
    let app = match path.as_str() {
        "bare" => route,
        "fast" | "new" => route.layer(layer),
        "receipts" => route.layer(layer.with_receipts(master)),
        "raw" => return raw(&channel, &k1, (0..count).map(|i| pay(9_000_001 + i))),
        _ => return Err(usage.into()),
    };
    let headers: Vec<String> = match path.as_str() {
        "new" => (0..count)
            .map(|i| pay(9_000_001 + i).map(|payment| wire::encode_payment(&payment)))
            .collect::<Result<_, _>>()?,
        _ => vec![wire::encode_payment(&best)],
    };
    let prev = "ab".repeat(32);
    for i in 0..count as usize {
        let request = Request::get("/")
            .header(wire::PAYMENT_CHANNEL, &headers[i.min(headers.len() - 1)])
            .header(wire::PAYMENT_RECEIPT_UNSIGNED, "0/2048")
            .header(wire::PAYMENT_RECEIPT_PREV, &prev)
            .body(Body::empty())?;
        let response = runtime.block_on(app.clone().oneshot(request))?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("request {i}: {}", response.status()).into());
        }
    }
    Ok(())
}

/// The raw work of a new payment: its signature parsed, its BIP-0143 sighash, one ECDSA
/// verification.
fn raw(
    channel: &Channel,
    k1: &SecretKey,
    payments: impl Iterator<Item = Result<Transaction, Error>>,
) -> Result<(), Error> {
    let verifier = Secp256k1::verification_only();
    let client_key = k1.public_key(&Secp256k1::new());
    let (script, value) = (channel.params().witness_script(), channel.params().value);
    let payments: Vec<Transaction> = payments.collect::<Result<_, _>>()?;
    for payment in &payments {
        let witness = payment.input[0].witness.nth(0).ok_or("unsigned")?;
        let signature = bitcoin::ecdsa::Signature::from_slice(witness)?;
        let sighash = SighashCache::new(payment).p2wsh_signature_hash(
            0,
            &script,
            value,
            EcdsaSighashType::All,
        )?;
        verifier.verify_ecdsa(&Message::from(sighash), &signature.signature, &client_key)?;
    }
    Ok(())
}
