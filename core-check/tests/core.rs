//! paychan without `runtime`: the client's loss bound priced by a server's published table,
//! and payments signed by the protocol core byte for byte as `docs/test-vectors.json` has them.
//! This is the code a browser client compiles to wasm; here it runs natively.

use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Txid};
use paychan::MilliSats;
use paychan::channel::{ChainTip, PaymentCheck, Terms};
use paychan::client::{LossBound, PolicyRefusal, SpendingPolicy};
use paychan::wire::{self, ChannelId, PriceList};
use serde_json::{Value, json};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/test-vectors.json");

#[test]
fn the_loss_bound_counts_served_answers_at_the_published_prices() {
    let policy = SpendingPolicy::default()
        .with_max_per_request(MilliSats::from_msat(10_000))
        .with_max_prepaid(Amount::from_sat(1_000));
    let prices = json!({
        "routes": [
            {"method": "GET", "path": "/weather", "price_msat": 2000},
            {"method": "GET", "path": "/files/{*path}", "price_msat": 500},
        ],
        "fallback_msat": null,
        "unlisted": "refuse",
    });
    let table = PriceList::from_terms(&prices).expect("a price table");
    assert_eq!(table.price("HEAD", "/files/a/b"), Some(MilliSats::from_msat(500)));
    assert_eq!(table.price("GET", "/elsewhere"), None);

    let channel = ChannelId::new(OutPoint::null());
    let mut bound = LossBound::new(&policy);
    bound.start(channel, Amount::from_sat(294));
    bound.price_list(Some(table));
    for _ in 0..300 {
        // A 200 without a balance header still counts one request at the table's price.
        assert_eq!(
            bound.served(channel, "GET", "/weather", 200, false),
            Some(MilliSats::from_msat(2_000))
        );
    }
    assert_eq!(bound.counted(), MilliSats::from_msat(600_000));

    // max(first payment 294 sat, 600 sat counted) + one 2 sat price + 1 000 sat max_prepaid.
    let price = MilliSats::from_msat(2_000);
    assert_eq!(bound.allowed(price), Amount::from_sat(1_602));
    assert!(bound.check(channel, Amount::from_sat(1_602), price, None).is_ok());
    let refused = bound.check(channel, Amount::from_sat(1_603), price, None).unwrap_err();
    assert_eq!(
        (refused.asked, refused.allowed),
        (Amount::from_sat(1_603), Amount::from_sat(1_602))
    );
    assert_eq!(refused.counted, MilliSats::from_msat(600_000));

    assert!(matches!(
        policy.check_price(MilliSats::from_msat(10_001)),
        Err(PolicyRefusal::PriceTooHigh { .. })
    ));
}

fn key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).unwrap()
}

#[test]
fn payments_signed_without_the_runtime_match_the_test_vectors() {
    let vectors: Value = serde_json::from_str(&std::fs::read_to_string(VECTORS).unwrap()).unwrap();
    let secp = Secp256k1::new();
    let (client, server) = (key(0x11), key(0x22));
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
    let p2wpkh = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
    let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
    let params = Terms::default()
        .agree(
            pk(&client),
            pk(&server),
            Amount::from_sat(100_000),
            LockTime::from_height(800_200).unwrap(),
            p2wpkh(&client),
            p2wpkh(&server),
            tip,
        )
        .unwrap();
    let outpoint: OutPoint = vectors["funding"]["outpoint"].as_str().unwrap().parse().unwrap();
    assert_ne!(outpoint.txid, Txid::all_zeros());
    let channel = params.at(outpoint);

    let payments = vectors["payments"].as_array().unwrap();
    assert_eq!(payments.len(), 2);
    for vector in payments {
        let sat = vector["server_amount_sat"].as_u64().unwrap();
        let mut payment = channel.build_payment(Amount::from_sat(sat)).unwrap();
        channel.sign_payment(&mut payment, &client).unwrap();
        assert_eq!(wire::encode_payment(&payment), vector["header"].as_str().unwrap());
        // And the server's check, from the same core, takes it back from the wire.
        let decoded = wire::decode_payment(vector["header"].as_str().unwrap().as_bytes()).unwrap();
        assert!(matches!(
            channel.check_payment(None, &decoded, tip),
            Ok(PaymentCheck::Increase { .. })
        ));
    }
}
