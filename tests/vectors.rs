//! The test vectors of `docs/PROTOCOL.md`: recomputed from fixed keys and compared with
//! `docs/test-vectors.json`, byte for byte. Every transaction among them is also checked with
//! Bitcoin Core's interpreter. `PAYCHAN_BLESS=1 cargo test --test vectors` rewrites the file
//! (review the diff: a change means the wire format changed).

use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{
    Amount, CompressedPublicKey, Network, OutPoint, ScriptBuf, Transaction, TxOut, Txid,
};
use paychan::chain::policy;
use paychan::chain::sim::sign_p2wpkh_input;
use paychan::channel::{ChainTip, PaymentCheck, Terms};
use paychan::wire;
use serde_json::{Value, json};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/test-vectors.json");
const PROTOCOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md");

fn key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).unwrap()
}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn verify(tx: &Transaction, prevouts: &[(OutPoint, TxOut)]) {
    tx.verify(|op| prevouts.iter().find(|(p, _)| p == op).map(|(_, o)| o.clone()))
        .expect("consensus accepts the vector");
    let spent: Vec<TxOut> = tx
        .input
        .iter()
        .map(|i| prevouts.iter().find(|(p, _)| *p == i.previous_output).unwrap().1.clone())
        .collect();
    policy::check_standard(tx, &spent).expect("policy accepts the vector");
}

fn compute() -> Value {
    let secp = Secp256k1::new();
    let (client, server, wallet) = (key(0x11), key(0x22), key(0x33));
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
    let p2wpkh = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
    let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
    let terms = Terms::default();
    let params = terms
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

    // T1 spends a 250 000 sat P2WPKH coin of the client's wallet.
    let coin = OutPoint { txid: Txid::from_byte_array([0xab; 32]), vout: 0 };
    let coin_out = TxOut { value: Amount::from_sat(250_000), script_pubkey: p2wpkh(&wallet) };
    let change = TxOut { value: Amount::from_sat(149_000), script_pubkey: p2wpkh(&wallet) };
    let (unsigned_t1, outpoint) = params.build_funding(&[coin], Some(change));
    let mut t1 = unsigned_t1.clone();
    sign_p2wpkh_input(&mut t1, 0, &coin_out, &wallet);
    params.check_funding(&terms, outpoint, &t1, std::slice::from_ref(&coin_out)).unwrap();
    verify(&t1, &[(coin, coin_out)]);
    let funding_out = t1.output[0].clone();

    // T2: the refund, signed by both.
    let unsigned_t2 = params.build_refund(outpoint, params.refund_fee());
    let refund_sighash = SighashCache::new(&unsigned_t2)
        .p2wsh_signature_hash(0, &params.witness_script(), params.value, EcdsaSighashType::All)
        .unwrap();
    let server_refund_sig = params
        .check_refund(&terms, &unsigned_t1, &unsigned_t2, tip)
        .unwrap()
        .sign(&server)
        .unwrap();
    params.verify_refund_signature(&unsigned_t2, &server_refund_sig).unwrap();
    let t2 = params.complete_refund(&unsigned_t2, &client, &server_refund_sig).unwrap();
    verify(&t2, &[(outpoint, funding_out.clone())]);

    // T3: two payments; the second is co-signed into the close.
    let channel = params.clone().at(outpoint);
    let payment = |sat: u64| {
        let mut tx = channel.build_payment(Amount::from_sat(sat)).unwrap();
        let sighash = SighashCache::new(&tx)
            .p2wsh_signature_hash(0, &params.witness_script(), params.value, EcdsaSighashType::All)
            .unwrap();
        channel.sign_payment(&mut tx, &client).unwrap();
        assert!(matches!(channel.check_payment(None, &tx, tip), Ok(PaymentCheck::Increase { .. })));
        json!({
            "server_amount_sat": sat,
            "unsigned_hex": serialize_hex(&Transaction {
                input: vec![bitcoin::TxIn { witness: bitcoin::Witness::new(), ..tx.input[0].clone() }],
                ..tx.clone()
            }),
            "sighash": hex(sighash.to_byte_array()),
            "client_signature": hex(tx.input[0].witness.nth(0).unwrap()),
            "signed_hex": serialize_hex(&tx),
            "txid": tx.compute_txid().to_string(),
            "header": wire::encode_payment(&tx),
        })
    };
    let first = payment(1_000);
    let second = payment(5_000);
    let mut t3 = channel.build_payment(Amount::from_sat(5_000)).unwrap();
    channel.sign_payment(&mut t3, &client).unwrap();
    let close = channel.close_transaction(&t3, &server).unwrap();
    verify(&close, &[(outpoint, funding_out.clone())]);

    json!({
        "keys": {
            "client_secret": hex(client.secret_bytes()),
            "client_pubkey": pk(&client).to_string(),
            "server_secret": hex(server.secret_bytes()),
            "server_pubkey": pk(&server).to_string(),
            "wallet_secret": hex(wallet.secret_bytes()),
        },
        "params": {
            "value_sat": params.value.to_sat(),
            "expiry": params.expiry.to_consensus_u32(),
            "client_script": hex(params.client_script.as_bytes()),
            "server_script": hex(params.server_script.as_bytes()),
            "min_fee_rate_sat_per_vb": params.min_fee_rate.to_sat_per_vb_floor(),
            "payment_fee_sat": params.payment_fee(true).to_sat(),
            "refund_fee_sat": params.refund_fee().to_sat(),
        },
        "funding": {
            "witness_script": hex(params.witness_script().as_bytes()),
            "script_pubkey": hex(params.funding_script_pubkey().as_bytes()),
            "address_regtest": params.funding_address(Network::Regtest).to_string(),
            "address_mainnet": params.funding_address(Network::Bitcoin).to_string(),
            "coin": coin.to_string(),
            "unsigned_hex": serialize_hex(&unsigned_t1),
            "signed_hex": serialize_hex(&t1),
            "outpoint": outpoint.to_string(),
        },
        "refund": {
            "unsigned_hex": serialize_hex(&unsigned_t2),
            "sighash": hex(refund_sighash.to_byte_array()),
            "server_signature": hex(server_refund_sig.to_vec()),
            "signed_hex": serialize_hex(&t2),
        },
        "payments": [first, second],
        "close": {
            "signed_hex": serialize_hex(&close),
            "txid": close.compute_txid().to_string(),
        },
    })
}

fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

#[test]
fn vectors_match_the_code_and_the_protocol_document() {
    let computed = compute();
    if std::env::var_os("PAYCHAN_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&computed).unwrap() + "\n";
        std::fs::write(VECTORS, text).unwrap();
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(VECTORS).unwrap()).unwrap();
    assert_eq!(computed, stored, "the code no longer produces docs/test-vectors.json");
    let protocol = std::fs::read_to_string(PROTOCOL).unwrap();
    let mut all = Vec::new();
    strings(&stored, &mut all);
    let missing: Vec<_> = all.iter().filter(|s| !protocol.contains(s.as_str())).collect();
    assert!(missing.is_empty(), "docs/PROTOCOL.md lacks these vector values: {missing:#?}");
}

#[test]
fn vector_headers_decode_to_the_signed_payments() {
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(VECTORS).unwrap()).unwrap();
    for payment in stored["payments"].as_array().unwrap() {
        let tx = wire::decode_payment(payment["header"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(serialize_hex(&tx), payment["signed_hex"].as_str().unwrap());
    }
}
