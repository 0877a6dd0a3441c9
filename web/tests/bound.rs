//! The browser client's loss bound is the Rust client's, checked by the same cases
//! (`tests/client_bound_property.rs` drives the Rust `Payer`; this drives the page's
//! [`Session`], in wasm, as `js/paychan.js` does): random sequences of server answers —
//! served with and without balance headers and receipts, 402s with arbitrary numbers, prices
//! beyond the policy, "channel not open", 5xx with and without a balance, forged receipts —
//! and, here, page reloads (the session saved and loaded again). On no channel does the page
//! sign a payment that pays the server more than
//! `max(first payment, what the server served × the quote) + one price + max_prepaid`, plus
//! one price per reload (`LossBound::restore`). Half the cases prepay the default 1 000 sat,
//! half 50 sat, below the first payment.
//!
//! The server is modelled in the test: an honest answer debits the route's price from what
//! the latest payment pays, answers 402 with the least top-up when it runs out, and signs
//! receipts with K2, as the paywall does. 1 000 cases (the Rust property's count), from a
//! fixed seed so a failure reproduces; `PAYCHAN_BOUND_SEED` at build time picks another.
//!
//! Run: `CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner cargo test -p
//! paychan-web --target wasm32-unknown-unknown` (in Node.js; `.ci/run` does, and in Chromium
//! with `WASM_BINDGEN_USE_BROWSER=1` and `WASM_BINDGEN_TEST_TIMEOUT=300`: the cases take about
//! 50 s there, past the runner's default of 20).

#![cfg(target_arch = "wasm32")]

use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hashes::Hash;
use bitcoin::hex::FromHex;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Txid};
use paychan::MilliSats;
use paychan::channel::{ChainTip, Terms, server_amount};
use paychan::wire::{self, ChannelId, Receipt};
use paychan_web::Session;
use serde_json::{Value, json};
use wasm_bindgen_test::wasm_bindgen_test as test;

const QUOTE: MilliSats = MilliSats::from_msat(2_000);

/// Hands the event loop back (a `setTimeout(0)` promise, in Node.js and in the browser): in
/// Chromium, wasm-bindgen-test-runner polls the page through WebDriver, and a test that keeps
/// the page busy for 20 s fails on the poll's timeout, not on anything it checks.
async fn breathe() {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        let set_timeout = js_sys::Reflect::get(&global, &"setTimeout".into()).unwrap();
        let set_timeout: js_sys::Function = set_timeout.into();
        set_timeout.call2(&global, &resolve, &0.into()).unwrap();
    });
    wasm_bindgen_futures::JsFuture::from(promise).await.unwrap();
}
/// The policy's `maxPrepaidSat` of the cases running: 1 000 (the default), then 50 (below the
/// first payment, where a load must not take the first payment as served).
static PREPAID_SAT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);

fn prepaid() -> Amount {
    Amount::from_sat(PREPAID_SAT.load(std::sync::atomic::Ordering::Relaxed))
}

fn policy() -> String {
    format!(r#"{{"maxPrepaidSat": {}}}"#, prepaid().to_sat())
}
const FIRST: Amount = Amount::from_sat(294);
const VALUE: Amount = Amount::from_sat(100_000);
const CASES: u32 = 1_000;
/// As `js/paychan.js`: how often one request is sent at most.
const MAX_ATTEMPTS: u32 = 4;

/// xorshift64*: the cases' randomness, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How the server answers one paid `/job`.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// The modelled paywall's answer (served, or its real 402).
    Honest,
    /// The paywall's answer without its balance header and receipt.
    Hidden,
    /// 402 `insufficient-balance`: spent `spent`‰ of the latest payment, asks `min` and
    /// `suggested` sat more.
    Forged { spent_permille: u64, min: u64, suggested: u64 },
    /// A 402 quoting a price beyond the policy.
    TooDear,
    /// 402 `channel-not-open`.
    NotOpen,
    /// 500, with or without a balance header.
    Failed { balance: bool },
    /// The paywall's answer with a receipt that is not one.
    BadReceipt,
    /// A receipt signed by K2 that states more spent than the requests could have cost.
    InflatedReceipt,
    /// The page reloads: the session is saved and loaded again before the next request.
    Reload,
}

/// The same weights as the Rust property, plus reloads and inflated receipts. (Metered
/// streams are the Rust `MeteredStream`'s, whose top-ups the `Session` signs through the same
/// `next_payment`; they are not in these cases.)
fn answer(rng: &mut Rng) -> Answer {
    match rng.below(20) {
        0..=5 => Answer::Honest,
        6..=7 => Answer::Hidden,
        // (3 and 10 × maxPrepaidSat: the Rust property's 3 000 and 10 000 at its default.)
        8..=11 => Answer::Forged {
            spent_permille: rng.below(2_000),
            min: rng.below(3 * prepaid().to_sat()),
            suggested: rng.below(10 * prepaid().to_sat()),
        },
        12 => Answer::TooDear,
        13 => Answer::NotOpen,
        14 => Answer::Failed { balance: rng.below(2) == 0 },
        15 => Answer::BadReceipt,
        16 => Answer::InflatedReceipt,
        _ => Answer::Reload,
    }
}

fn key(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).unwrap()
}

/// A funded channel `n` (its own outpoint) with its first payment of [`FIRST`], as the page
/// saves it.
fn session(n: u32) -> Session {
    let secp = Secp256k1::new();
    let (client, server) = (key(0x11), key(0x22));
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
    let p2wpkh = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
    let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
    let params = Terms::default()
        .agree(
            pk(&client),
            pk(&server),
            VALUE,
            LockTime::from_height(801_000).unwrap(),
            p2wpkh(&client),
            p2wpkh(&server),
            tip,
        )
        .unwrap();
    let mut txid = [0u8; 32];
    txid[..4].copy_from_slice(&n.to_le_bytes());
    let channel = params.at(OutPoint { txid: Txid::from_byte_array(txid), vout: 0 });
    let refund = channel.params().build_refund(channel.outpoint(), Amount::from_sat(500));
    let mut first = channel.build_payment(FIRST).unwrap();
    channel.sign_payment(&mut first, &client).unwrap();
    // As `Session::state` saves it: the transactions in consensus hex.
    let state = json!({
        "channel": {
            "channel": channel, "refund": serialize_hex(&refund), "latest": serialize_hex(&first),
            "server": "http://server.test", "retired": false, "closed": false,
            "funding_fee_sat": 200,
        },
        "key": client.display_secret().to_string(),
        "spent_sat": FIRST.to_sat(), "counted_msat": 0, "first_sat": FIRST.to_sat(),
    });
    Session::load(&state.to_string(), &policy()).unwrap()
}

/// The modelled server's ledger of one channel.
#[derive(Default)]
struct Ledger {
    /// What the latest payment it was handed pays it (msat).
    paid: MilliSats,
    /// What it debited.
    spent: MilliSats,
    /// What it served, valued as the client must count it.
    served: MilliSats,
}

struct Reply {
    status: u16,
    balance: Option<String>,
    receipt: Option<String>,
    problem: Option<Value>,
}

fn problem(code: &str, extra: Value) -> Reply {
    let mut document = json!({
        "type": format!("urn:paychan:problem:{code}"), "title": "refused", "status": 402,
        "detail": "scripted", "code": code,
    });
    if let (Some(document), Some(extra)) = (document.as_object_mut(), extra.as_object()) {
        document.extend(extra.clone());
    }
    Reply { status: 402, balance: None, receipt: None, problem: Some(document) }
}

fn snapshot(
    id: ChannelId,
    paid: MilliSats,
    spent: MilliSats,
    min: Amount,
    suggested: Amount,
) -> Value {
    json!({
        "price_msat": QUOTE.to_msat(),
        "channel": {
            "channel": id.to_string(), "state": "open",
            "paid_msat": paid.to_msat(), "spent_msat": spent.to_msat(),
            "balance_msat": paid.saturating_sub(spent).to_msat(),
            "price_msat": QUOTE.to_msat(), "capacity_left_sat": 0,
            "min_server_amount_sat": min.to_sat(),
            "suggested_server_amount_sat": suggested.to_sat(),
            "expiry": 0, "close_by": 0
        }
    })
}

/// The server's answer to `/job` paid with `sent` (from `Session::send`).
fn serve(ledger: &mut Ledger, id: ChannelId, sent: &Value, answer: Answer) -> Reply {
    let header = sent["header"].as_str().unwrap();
    let payment = wire::decode_payment(header.as_bytes()).unwrap();
    let paid = MilliSats::from_sat(server_amount(&payment)).unwrap();
    ledger.paid = ledger.paid.max(paid);
    let prev = sent["prev"].as_str().map(|p| <[u8; 32]>::from_hex(p).unwrap());
    let receipt = |ledger: &Ledger, price: MilliSats| {
        let balance = ledger.paid.saturating_sub(ledger.spent);
        let mut receipt = Receipt::new(id, "GET", "/job", price, paid, balance);
        if let Some(prev) = prev {
            receipt = receipt.with_prev(prev);
        }
        receipt.sign(&key(0x22)).encode()
    };
    match answer {
        Answer::Honest | Answer::Hidden | Answer::BadReceipt | Answer::InflatedReceipt => {
            if ledger.paid.saturating_sub(ledger.spent) < QUOTE {
                let least = ledger.spent.saturating_add(QUOTE).to_sat_ceil();
                let extra = snapshot(id, ledger.paid, ledger.spent, least, least + prepaid());
                return problem("insufficient-balance", extra);
            }
            ledger.spent = ledger.spent.saturating_add(QUOTE);
            ledger.served = ledger.served.saturating_add(QUOTE);
            let balance = ledger.paid.saturating_sub(ledger.spent);
            let (balance, receipt) = match answer {
                Answer::Hidden => (None, None),
                Answer::BadReceipt => (Some(balance), Some("AAAA".to_owned())),
                Answer::InflatedReceipt => {
                    // Claims the whole payment spent, at one price: a receipt that does not
                    // add up with the requests sent.
                    let mut lie = Receipt::new(id, "GET", "/job", QUOTE, paid, MilliSats::ZERO);
                    if let Some(prev) = prev {
                        lie = lie.with_prev(prev);
                    }
                    (Some(MilliSats::ZERO), Some(lie.sign(&key(0x22)).encode()))
                }
                _ => (Some(balance), Some(receipt(ledger, QUOTE))),
            };
            Reply {
                status: 200,
                balance: balance.map(|b| b.to_msat().to_string()),
                receipt,
                problem: None,
            }
        }
        Answer::Forged { spent_permille, min, suggested } => {
            let spent = MilliSats::from_msat(paid.to_msat().saturating_mul(spent_permille) / 1_000);
            let latest = ledger.paid.to_sat_ceil();
            let extra = snapshot(
                id,
                ledger.paid,
                spent,
                latest + Amount::from_sat(min),
                latest + Amount::from_sat(suggested),
            );
            problem("insufficient-balance", extra)
        }
        Answer::TooDear => problem("insufficient-balance", json!({ "price_msat": 50_000 })),
        Answer::NotOpen => problem("channel-not-open", json!({})),
        Answer::Failed { balance } => {
            if balance {
                // A 5xx with a balance says it was paid for: the client counts it.
                ledger.served = ledger.served.saturating_add(QUOTE);
            }
            Reply {
                status: 500,
                balance: balance.then(|| "0".to_owned()),
                receipt: None,
                problem: None,
            }
        }
        Answer::Reload => unreachable!("a reload is not an answer"),
    }
}

/// `Session::answered` for a `/job` sent with `sent` (from `Session::send`), as
/// `js/paychan.js` calls it.
fn answered(
    session: &mut Session,
    sent: &Value,
    status: u16,
    balance: Option<String>,
    receipt: Option<String>,
) -> Result<Option<String>, wasm_bindgen::JsError> {
    let paid = sent["paidSat"].as_f64().unwrap();
    let prev = sent["prev"].as_str().map(str::to_owned);
    session.answered(paid, prev, "GET", "/job", status, balance, receipt)
}

/// One case: `answers` in order, each request retried on 402 as `js/paychan.js` does; a new
/// channel when the session says so. Checks the bound on every channel. Whether the charge
/// watch refused to pay on.
fn run(answers: &[Answer], case: u32) -> bool {
    let script = format!("{answers:?}");
    let mut channels = 0;
    let mut current = session(case * 100 + channels);
    let mut ledger = Ledger::default();
    let mut reloads = 0u64;
    let mut refused = false;
    let mut answers = answers.iter().copied();
    let check = |session: &Session, ledger: &Ledger, reloads: u64| {
        let paid = Amount::from_sat(session.paid_sat() as u64);
        let bound = FIRST.max(ledger.served.to_sat_ceil())
            + (QUOTE.to_sat_ceil() * (1 + reloads))
            + prepaid();
        assert!(
            paid <= bound,
            "case {case}: channel {} paid {paid} to a server that served {} (counted {} msat, \
             {reloads} reloads): bound {bound}; answers {script}",
            session.id(),
            ledger.served,
            session.counted_msat(),
        );
    };
    'requests: while let Some(mut next) = answers.next() {
        if let Answer::Reload = next {
            current = Session::load(&current.state(), &policy()).unwrap();
            reloads += 1;
            continue;
        }
        for attempt in 1..=MAX_ATTEMPTS {
            let sent = match current.send() {
                Ok(Some(sent)) => sent,
                Ok(None) => break 'requests,
                Err(_) => {
                    refused = true;
                    break 'requests;
                }
            };
            let sent_json: Value = serde_json::from_str(&sent).unwrap();
            let id: ChannelId = current.id().parse().unwrap();
            let reply = serve(&mut ledger, id, &sent_json, next);
            if reply.status != 402 || attempt == MAX_ATTEMPTS {
                let _ =
                    answered(&mut current, &sent_json, reply.status, reply.balance, reply.receipt);
                check(&current, &ledger, reloads);
                break;
            }
            let problem = reply.problem.unwrap().to_string();
            match current.payment_required("GET", "/job", &problem) {
                Ok(action) if action.contains(r#""do":"open""#) => {
                    check(&current, &ledger, reloads);
                    channels += 1;
                    current = session(case * 100 + channels);
                    (ledger, reloads) = (Ledger::default(), 0);
                }
                Ok(_) => check(&current, &ledger, reloads),
                Err(_) => break,
            }
            // The retry meets the server's next scripted answer.
            match answers.next() {
                Some(Answer::Reload) | None => next = Answer::Honest,
                Some(answer) => next = answer,
            }
        }
    }
    check(&current, &ledger, reloads);
    refused
}

#[test]
async fn no_server_answer_takes_the_page_beyond_its_bound() {
    let seed = option_env!("PAYCHAN_BOUND_SEED")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng(seed);
    let mut distrusted = 0;
    for (case, prepaid) in (0..CASES).zip([1_000, 50].into_iter().cycle()) {
        if case % 20 == 0 {
            breathe().await;
        }
        PREPAID_SAT.store(prepaid, std::sync::atomic::Ordering::Relaxed);
        // Longer cases when the prepayment is small: enough served units to pass the first
        // payment, where a load that took it as served would show.
        let n = 1 + rng.below(if prepaid < 294 { 150 } else { 30 }) as usize;
        let answers: Vec<Answer> = (0..n).map(|_| answer(&mut rng)).collect();
        distrusted += u32::from(run(&answers, case));
    }
    // The charge watch refused to pay in many cases (bad and inflated receipts): the cases
    // reach it.
    assert!(distrusted > 100, "the charge watch refused in {distrusted} cases");
}

/// One `/job` to the honest server, retried on 402 as `paychan.js` does: what `answered` said
/// once it was served, or why the page did not get it served.
fn honest_job(current: &mut Session, ledger: &mut Ledger) -> Result<Option<String>, String> {
    for _ in 1..=MAX_ATTEMPTS {
        let sent = current.send().map_err(|e| format!("{:?}", wasm_bindgen::JsValue::from(e)))?;
        let sent_json: Value = serde_json::from_str(&sent.ok_or("no payment")?).unwrap();
        let id: ChannelId = current.id().parse().unwrap();
        let reply = serve(ledger, id, &sent_json, Answer::Honest);
        if reply.status == 200 {
            return Ok(answered(current, &sent_json, 200, reply.balance, reply.receipt).unwrap());
        }
        let problem = reply.problem.unwrap().to_string();
        let action = current
            .payment_required("GET", "/job", &problem)
            .map_err(|e| format!("refused: {:?}", wasm_bindgen::JsValue::from(e)))?;
        if !action.contains(r#""do":"retry""#) {
            return Err(format!("the page would open another channel: {action}"));
        }
    }
    Err("not served within the attempts".to_owned())
}

#[test]
async fn an_honest_server_is_paid_every_request_and_its_receipts_verify() {
    PREPAID_SAT.store(1_000, std::sync::atomic::Ordering::Relaxed);
    let mut current = session(1);
    let mut ledger = Ledger::default();
    let mut served = 0;
    for request in 0..400 {
        if request % 50 == 0 {
            breathe().await;
        }
        let why = honest_job(&mut current, &mut ledger).expect("an honest server is paid");
        assert_eq!(why, None, "its receipts verify");
        served += 1;
        if served % 100 == 0 && served < 400 {
            // A reload keeps the channel, and the receipts' chain goes on from a fresh watch.
            current = Session::load(&current.state(), &policy()).unwrap();
        }
    }
    assert_eq!(served, 400);
    // Each of the 100 answers since the last reload brought a receipt that verified.
    assert_eq!(current.receipts(), 100.0);
    assert!(current.latest_receipt().is_some());
    // Every request paid, nothing beyond what was served plus the prepaid allowance.
    let paid = Amount::from_sat(current.paid_sat() as u64);
    assert!(paid >= ledger.served.to_sat_ceil());
    assert!(paid <= ledger.served.to_sat_ceil() + QUOTE.to_sat_ceil() + prepaid());
}

/// An honest server is never stuck by reloads that lose the count's last units: the page saves
/// its channel with every payment and its count at least every `saved_every` answers
/// (`paychan.js` saves within a second, and before half of `maxPrepaidSat` is unsaved); the
/// page reloads from what was saved (a crash), every 37 requests. With the default 1 000 sat
/// and with 50 sat prepaid (below the first payment of 294), every request is served.
#[test]
async fn an_honest_server_is_not_stuck_by_reloads_that_lose_unsaved_units() {
    for (prepaid, saved_every) in [(1_000, 10), (1_000, 200), (50, 10)] {
        PREPAID_SAT.store(prepaid, std::sync::atomic::Ordering::Relaxed);
        let mut current = session(2);
        let mut ledger = Ledger::default();
        let mut saved = current.state();
        let mut unsaved = 0;
        for request in 1..=600 {
            if request % 50 == 0 {
                breathe().await;
            }
            let before = current.paid_sat();
            if let Err(why) = honest_job(&mut current, &mut ledger) {
                panic!("prepaid {prepaid}, saved every {saved_every}, request {request}: {why}");
            }
            unsaved += 1;
            // A payment is saved before it leaves; the count, every `saved_every` answers.
            if current.paid_sat() > before || unsaved >= saved_every {
                (saved, unsaved) = (current.state(), 0);
            }
            if request % 37 == 0 {
                current = Session::load(&saved, &policy()).unwrap();
                unsaved = 0;
            }
        }
        let paid = Amount::from_sat(current.paid_sat() as u64);
        assert!(paid >= ledger.served.to_sat_ceil());
    }
}

/// Two contexts of one page (a tab and its Service Worker) paying on one channel in turn, each
/// going on from the other's saved payment (`Session::resync`, as `paychan.js` does when it
/// finds the channel paid on elsewhere), against a server that serves nothing and asks one
/// more satoshi every time: the channel stays within `max(first, served) + price +
/// maxPrepaidSat` (a floor raised at every such load gave it a price per turn).
#[test]
async fn two_contexts_taking_turns_give_a_lying_server_nothing_more() {
    PREPAID_SAT.store(50, std::sync::atomic::Ordering::Relaxed);
    let first = session(3);
    let mut saved = first.state();
    let mut contexts = [first, Session::load(&saved, &policy()).unwrap()];
    let mut ledger = Ledger::default();
    let ask = Answer::Forged { spent_permille: 1_000, min: 1, suggested: 1 };
    for turn in 0..200 {
        if turn % 50 == 0 {
            breathe().await;
        }
        let context = &mut contexts[turn % 2];
        if context.state() != saved {
            *context = Session::resync(&saved, &policy(), 0.0).unwrap();
        }
        let sent = context.send().unwrap().unwrap();
        let sent_json: Value = serde_json::from_str(&sent).unwrap();
        let id: ChannelId = context.id().parse().unwrap();
        let reply = serve(&mut ledger, id, &sent_json, ask);
        let before = context.paid_sat();
        let problem = reply.problem.unwrap().to_string();
        if context.payment_required("GET", "/job", &problem).is_ok() && context.paid_sat() > before
        {
            saved = context.state();
        }
        let paid = Amount::from_sat(context.paid_sat() as u64);
        let bound = FIRST + QUOTE.to_sat_ceil() + prepaid();
        assert!(paid <= bound, "turn {turn}: paid {paid} for nothing served: bound {bound}");
    }
}
