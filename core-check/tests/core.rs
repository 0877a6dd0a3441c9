//! paychan without `runtime`: the client's loss bound priced by a server's published table,
//! payments signed by the protocol core byte for byte as `docs/test-vectors.json` has them, and
//! the client's sans-IO steps (`client::steps`). This is the code the browser client compiles
//! to wasm. `cargo test -p paychan-core-check` runs it natively; `.ci/run` also runs it in
//! wasm, in Node.js and in headless Chromium (wasm-bindgen-test-runner).

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Txid};
use paychan::MilliSats;
use paychan::channel::{ChainTip, PaymentCheck, Terms};
use paychan::client::{LossBound, PolicyRefusal, SpendingPolicy};
use paychan::wire::{self, ChannelId, PriceList};
use serde_json::{Value, json};

/// Compiled in: a wasm test has no file system.
const VECTORS: &str = include_str!("../../docs/test-vectors.json");

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
    let vectors: Value = serde_json::from_str(VECTORS).unwrap();
    let (channel, client, tip) = vector_channel();
    assert_ne!(channel.outpoint().txid, Txid::all_zeros());

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

/// The channel of the test vectors: client key 0x11, server key 0x22, 100 000 sat.
fn vector_channel() -> (paychan::channel::Channel, SecretKey, ChainTip) {
    let vectors: Value = serde_json::from_str(VECTORS).unwrap();
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
    (params.at(outpoint), client, tip)
}

#[test]
fn the_next_payment_stays_within_the_loss_bound_and_the_budget() {
    use paychan::client::steps::{self, Ask, StepError};
    let (channel, _, _) = vector_channel();
    let id = ChannelId::new(channel.outpoint());
    let policy = SpendingPolicy::default().with_max_prepaid(Amount::from_sat(1_000));
    let mut bound = LossBound::new(&policy);
    bound.start(id, Amount::from_sat(294));
    let price = MilliSats::from_msat(5_000);
    for _ in 0..100 {
        bound.served(id, "GET", "/api", 200, true);
    }
    // 100 requests counted at `max_per_request` (no quote yet): 1 000 sat, + 5 + 1 000.
    let paid = Amount::from_sat(294);
    let ask = |min| Ask::new(price, Some(Amount::from_sat(min)), None);
    let next = steps::next_payment(&policy, &bound, id, paid, paid, Amount::MAX, ask(400));
    assert_eq!(next, Ok(Some(Amount::from_sat(2_005))), "lowered to the bound");
    // The least the server asks beyond the bound: nothing is signed.
    let refused = steps::next_payment(&policy, &bound, id, paid, paid, Amount::MAX, ask(2_006));
    assert!(matches!(refused, Err(StepError::Bound(e)) if e.allowed == Amount::from_sat(2_005)));
    // Nothing to pay: the latest payment already pays that much.
    let same = steps::next_payment(&policy, &bound, id, paid, paid, paid, Ask::AHEAD);
    assert_eq!(same, Ok(None));
    // Another channel than the one counted: the bound allows nothing.
    let other = ChannelId::new(OutPoint::null());
    let refused = steps::next_payment(&policy, &bound, other, paid, paid, Amount::MAX, ask(400));
    assert!(matches!(refused, Err(StepError::Bound(_))));
    // The budget: 999 900 sat already spent elsewhere leaves room for 100 sat more.
    let spent = Amount::from_sat(999_900);
    let refused = steps::next_payment(&policy, &bound, id, paid, spent, Amount::MAX, ask(400));
    assert!(matches!(refused, Err(StepError::Policy(PolicyRefusal::BudgetExhausted { .. }))));
}

#[test]
fn a_top_up_asks_the_servers_least_within_the_policy() {
    use paychan::client::steps;
    use paychan::wire::ChannelSnapshot;
    let (channel, _, _) = vector_channel();
    let policy = SpendingPolicy::default().with_max_prepaid(Amount::from_sat(1_000));
    let snapshot = |min: u64, suggested: u64| -> ChannelSnapshot {
        serde_json::from_value(json!({
            "channel": ChannelId::new(channel.outpoint()).to_string(),
            "state": "open",
            "paid_msat": 294_000, "spent_msat": 290_000, "leased_msat": 0, "balance_msat": 4_000,
            "price_msat": 5_000, "capacity_left_sat": 99_000,
            "min_server_amount_sat": min, "suggested_server_amount_sat": suggested,
            "expiry": 800_200, "close_by": 800_150,
        }))
        .unwrap()
    };
    let paid = Amount::from_sat(294);
    let (target, ask) = steps::top_up(&policy, &channel, paid, paid, &snapshot(295, 50_000), None)
        .unwrap()
        .unwrap();
    // The suggestion, lowered to what was spent, the price and max_prepaid: 290 + 5 + 1 000.
    assert_eq!(target, Amount::from_sat(1_295));
    assert_eq!(ask.min, Some(Amount::from_sat(295)));
    // A least beyond paid + price + max_prepaid is refused, whatever the server says.
    let refused = steps::top_up(&policy, &channel, paid, paid, &snapshot(1_300, 1_300), None);
    assert!(matches!(refused, Err(steps::StepError::Policy(PolicyRefusal::TopUpTooLarge { .. }))));
}

#[test]
fn the_fair_close_and_the_settlement_check() {
    use paychan::client::steps::{self, MisbehaviorKind, StepError};
    let (channel, client, _) = vector_channel();
    let mut latest = channel.build_payment(Amount::from_sat(5_000)).unwrap();
    channel.sign_payment(&mut latest, &client).unwrap();
    // 1 234.5 sat spent: the fair settlement pays 1 235, and the server's close may be it.
    let spent = Some(MilliSats::from_msat(1_234_500));
    let fair = steps::fair_settlement(&channel, Some(&latest), &client, spent).unwrap().unwrap();
    assert_eq!(paychan::channel::server_amount(&fair), Amount::from_sat(1_235));
    let settled = steps::check_settlement(&channel, &latest, Some(&fair), &fair).unwrap();
    assert_eq!(settled.server_amount, Amount::from_sat(1_235));
    assert_eq!(
        settled.server_amount + settled.client_amount + settled.fee,
        Amount::from_sat(100_000)
    );
    // Nothing to give back: no fair settlement.
    let more = Some(MilliSats::from_msat(6_000_000));
    assert!(steps::fair_settlement(&channel, Some(&latest), &client, more).unwrap().is_none());
    // A close that pays the server more than the latest payment is not the client's.
    let mut greedy = channel.build_payment(Amount::from_sat(9_000)).unwrap();
    channel.sign_payment(&mut greedy, &client).unwrap();
    let refused = steps::check_settlement(&channel, &latest, Some(&fair), &greedy);
    assert!(matches!(
        refused,
        Err(StepError::Misbehaved(m)) if m.kind == MisbehaviorKind::WrongSettlement
    ));
}

#[test]
fn a_funding_from_deposited_coins_pays_the_channel_and_the_change() {
    use bitcoin::{FeeRate, TxOut};
    use paychan::client::steps::{self, StepError};
    let deposit = key(0x33);
    let secp = Secp256k1::new();
    let script =
        ScriptBuf::new_p2wpkh(&CompressedPublicKey(deposit.public_key(&secp)).wpubkey_hash());
    let coin = |n: u8, sat: u64| {
        let txid = Txid::from_byte_array([n; 32]);
        (
            OutPoint::new(txid, 0),
            TxOut { value: Amount::from_sat(sat), script_pubkey: script.clone() },
        )
    };
    let channel = TxOut {
        value: Amount::from_sat(100_000),
        script_pubkey: ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::all_zeros()),
    };
    let rate = FeeRate::from_sat_per_vb(2).unwrap();
    let coins = [coin(1, 60_000), coin(2, 50_000), coin(3, 1_000)];
    let (mut funding, used) =
        steps::funding_from_coins(&coins, channel.clone(), script.clone(), rate).unwrap();
    assert_eq!(used, 2, "the first two coins pay it");
    let fee = funding.fee().unwrap();
    assert_eq!(funding.tx.output[1].value, Amount::from_sat(10_000) - fee, "change to the deposit");
    let outpoint = steps::check_funding(&funding, &channel).unwrap();
    assert_eq!(outpoint.vout, 0);
    // The PSBT a Rust wallet hands over carries the same transaction and coins.
    let psbt = funding.to_psbt().unwrap();
    assert_eq!(psbt.fee().unwrap(), fee);
    assert_eq!(steps::Funding::from_psbt(&psbt), funding);
    // Unsigned: not a funding to hand over.
    assert!(matches!(
        steps::signed_funding(funding.clone(), outpoint),
        Err(StepError::InvalidFunding(_))
    ));
    // Coins sent to the channel's script beside its output would have no refund: refused.
    let mut twice = funding.clone();
    twice.tx.output.push(TxOut { value: Amount::from_sat(1_000), ..channel.clone() });
    assert!(steps::check_funding(&twice, &channel).is_err());
    steps::sign_p2wpkh_inputs(&mut funding, &deposit).unwrap();
    // Signed before its refund: refused (the server could broadcast it).
    assert!(matches!(
        steps::check_funding(&funding, &channel),
        Err(StepError::InvalidFunding(why)) if why.contains("unsigned")
    ));
    // Signed, through a PSBT and back: the same transaction, with its witnesses.
    let signed = steps::Funding::from_psbt(&funding.to_psbt().unwrap());
    let tx = steps::signed_funding(signed, outpoint).unwrap();
    assert_eq!(tx, funding.tx);
    // The fee pays at least the rate at the signed size (the witness was counted at its largest).
    assert!(fee >= rate.fee_vb(tx.vsize() as u64).unwrap());
    // Another transaction is not the one the refund spends.
    let other = OutPoint::new(Txid::from_byte_array([9; 32]), 0);
    assert!(steps::signed_funding(funding.clone(), other).is_err());
    // A funding that does not pay the channel exactly, or spends a coin it does not name:
    // refused.
    let mut short = channel.clone();
    short.value = Amount::from_sat(99_999);
    assert!(steps::check_funding(&funding, &short).is_err());
    let mut unknown = funding.clone();
    unknown.coins[1] = None;
    assert!(steps::check_funding(&unknown, &channel).is_err());
    // Another key's signature is refused, input by input.
    let (mut funding, _) =
        steps::funding_from_coins(&coins, channel.clone(), script, rate).unwrap();
    assert_eq!(
        steps::sign_p2wpkh_inputs(&mut funding, &key(0x44)),
        Err(StepError::NotOurCoin { input: 0 })
    );
    // Not enough: what the coins hold is said.
    let refused = steps::funding_from_coins(&coins[2..], channel, ScriptBuf::new(), rate);
    assert!(
        matches!(refused, Err(StepError::InsufficientFunds { available, .. }) if available == Amount::from_sat(1_000))
    );
}

#[test]
fn a_restored_count_gives_a_lying_server_one_price_per_load_not_max_prepaid() {
    let policy = SpendingPolicy::default().with_max_prepaid(Amount::from_sat(1_000));
    let channel = ChannelId::new(OutPoint::null());
    let price = MilliSats::from_msat(5_000);
    // Saved with 300 sat counted and 1 305 sat paid (300 + 5 + 1 000: the bound's most).
    let paid = Amount::from_sat(1_305);
    let mut bound = LossBound::new(&policy);
    let first = Amount::from_sat(294);
    bound.restore(channel, paid, MilliSats::from_msat(300_000), first);
    // An honest server asks at most paid + price: allowed.
    assert!(bound.check(channel, paid + Amount::from_sat(5), price, None).is_ok());
    // A liar gets that one price more, not another max_prepaid (`resume` would allow 2 310).
    assert_eq!(bound.allowed(price), Amount::from_sat(1_310));
    let mut resumed = LossBound::new(&policy);
    resumed.resume(channel, paid);
    assert_eq!(resumed.allowed(price), Amount::from_sat(2_310));
    // A count saved above paid − max_prepaid is kept as it is.
    bound.restore(channel, paid, MilliSats::from_msat(900_000), first);
    assert_eq!(bound.allowed(price), Amount::from_sat(1_905));
    // A first payment above max_prepaid, nothing served yet: nothing is taken as served (the
    // first payment would be handed out twice: 294 − 50 counted, then every unit on top).
    let small = SpendingPolicy::default().with_max_prepaid(Amount::from_sat(50));
    let mut fresh = LossBound::new(&small);
    fresh.restore(channel, first, MilliSats::ZERO, first);
    assert_eq!(fresh.counted(), MilliSats::ZERO);
    assert_eq!(fresh.allowed(price), Amount::from_sat(294 + 5 + 50));
    // Paid beyond the first payment: the floor rises to paid − max_prepaid, the count goes on
    // from the saved count (units on top of it are not added to the floor).
    fresh.restore(channel, Amount::from_sat(400), MilliSats::from_msat(340_000), first);
    assert_eq!(fresh.counted(), MilliSats::from_msat(340_000));
    assert_eq!(fresh.allowed(price), Amount::from_sat(350 + 5 + 50));
    for _ in 0..2 {
        fresh.served(channel, "GET", "/job", 200, true);
    }
    // Two units at the table-less max_per_request (10 sat): 360 counted, the floor still 350.
    assert_eq!(fresh.allowed(price), Amount::from_sat(360 + 5 + 50));
}

#[test]
fn the_charge_watch_checks_receipts_and_balances_without_the_runtime() {
    use paychan::client::charges::{ChargeWatch, SentPayment};
    use paychan::client::steps::StepError;
    use paychan::wire::Receipt;

    let secp = Secp256k1::new();
    let (channel, _, _) = vector_channel();
    let id = ChannelId::new(channel.outpoint());
    let k2 = key(0x22);
    let server_key = k2.public_key(&secp);
    let policy = SpendingPolicy::default()
        .with_max_per_request(MilliSats::from_msat(10_000))
        .with_max_prepaid(Amount::from_sat(1_000));
    let mut watch = ChargeWatch::new(&policy);
    watch.watch_new(id);
    let sent = SentPayment::new(id, Amount::from_sat(294), server_key);
    let paid = MilliSats::from_msat(294_000);
    let receipt = |price: u64, balance: u64, path: &str| {
        Receipt::new(
            id,
            "GET",
            path,
            MilliSats::from_msat(price),
            paid,
            MilliSats::from_msat(balance),
        )
    };

    // Three honest answers, each receipt linked to the one before.
    let mut prev = None;
    for n in 1..=3u64 {
        watch.note_send(id);
        let mut honest = receipt(2_000, 294_000 - 2_000 * n, "/weather");
        if let Some(prev) = prev {
            honest = honest.with_prev(prev);
        }
        let value = honest.sign(&k2).encode();
        let checked = watch.note_receipt(&sent, value.as_bytes(), ("GET", "/weather"), prev);
        assert!(checked.is_ok(), "{checked:?}");
        watch.note_answer(&sent, MilliSats::from_msat(294_000 - 2_000 * n), true);
        prev = watch.latest_receipt_digest(id);
        assert!(prev.is_some());
    }
    assert!(watch.check().is_ok());
    assert_eq!(watch.receipts(), 3);
    assert_eq!(watch.reported_spent(id), Some(MilliSats::from_msat(6_000)));

    // Each of these is refused, and changes nothing of what the watch believed.
    let refused = [
        // Signed by another key.
        receipt(2_000, 286_000, "/weather").with_prev(prev.unwrap()).sign(&key(0x23)).encode(),
        // For another request.
        receipt(2_000, 286_000, "/other").with_prev(prev.unwrap()).sign(&k2).encode(),
        // Not linked to the receipt the request named.
        receipt(2_000, 286_000, "/weather").sign(&k2).encode(),
        // Charges beyond the policy's max_per_request.
        receipt(10_001, 286_000 - 8_001, "/weather").with_prev(prev.unwrap()).sign(&k2).encode(),
        "AAAA".to_owned(),
    ];
    for value in refused {
        let mut copy = watch.clone();
        copy.note_send(id);
        assert!(copy.note_receipt(&sent, value.as_bytes(), ("GET", "/weather"), prev).is_err());
        assert!(matches!(copy.check(), Err(StepError::Misbehaved(_))), "{value}");
        assert_eq!(copy.reported_spent(id), Some(MilliSats::from_msat(6_000)));
    }

    // A receipt within max_per_request whose spent does not add up with the others: three
    // receipts of 2 sat and one request, yet 20 sat spent.
    let mut copy = watch.clone();
    copy.note_send(id);
    let inflated = receipt(2_000, 274_000, "/weather").with_prev(prev.unwrap()).sign(&k2).encode();
    assert!(copy.note_receipt(&sent, inflated.as_bytes(), ("GET", "/weather"), prev).is_err());
    assert!(copy.check().is_err());

    // A balance that says the server charged more than max_per_request for each of the four
    // requests sent: paid no more.
    let mut copy = watch.clone();
    copy.note_send(id);
    copy.note_answer(&sent, MilliSats::from_msat(294_000 - 40_001), true);
    assert!(matches!(copy.check(), Err(StepError::Overcharged { .. })));
    // Within it: fine.
    let mut copy = watch.clone();
    copy.note_send(id);
    copy.note_answer(&sent, MilliSats::from_msat(294_000 - 40_000), true);
    assert!(copy.check().is_ok());
}
