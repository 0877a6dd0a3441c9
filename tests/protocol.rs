//! The protocol core end to end on the simulated chain, and one negative test per check.

mod common;

use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::secp256k1::{Message, Secp256k1};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::transaction::Version;
use bitcoin::{Amount, FeeRate, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};
use common::{CHANNEL_VALUE, LIFETIME_BLOCKS, Setup, p2wpkh, public, secret};
use paychan::chain::{RejectReason, TxStatus};
use paychan::channel::sig::SignatureError;
use paychan::channel::{
    CloseError, FeeOutOfBounds, FundingError, OpenError, PaymentCheck, PaymentError, RefundError,
    SignError, Terms,
};

#[test]
fn every_transaction_verifies_and_the_best_payment_settles() {
    let s = Setup::new();
    s.open();
    s.chain.mine(1);
    assert!(matches!(
        s.chain.tx_status(&s.outpoint.txid),
        TxStatus::Confirmed { confirmations: 1, .. }
    ));

    let mut best: Option<Transaction> = None;
    for sat in [1_000, 1_500, 40_000, 90_000] {
        let t3 = s.pay(sat);
        let check = s.channel.check_payment(best.as_ref(), &t3, s.tip()).expect("valid payment");
        assert_eq!(
            check,
            PaymentCheck::Increase {
                previous: best.as_ref().map_or(Amount::ZERO, |b| b.output[0].value),
                server_amount: Amount::from_sat(sat),
            }
        );
        // Every payment the server holds co-signs into a valid, standard transaction.
        s.assert_valid_spend(&s.channel.close_transaction(&t3, &s.server).expect("co-signs"));
        best = Some(t3);
    }
    let close = s.channel.close_transaction(best.as_ref().unwrap(), &s.server).unwrap();
    let txid = s.chain.submit(&close).expect("the chain accepts the close");
    s.chain.mine(1);
    assert!(matches!(s.chain.tx_status(&txid), TxStatus::Confirmed { .. }));
    assert_eq!(close.output[0].value, Amount::from_sat(90_000));
    let change = close.output[1].value;
    assert_eq!(close.output[0].value + change + s.params.payment_fee(true), CHANNEL_VALUE);
}

#[test]
fn close_witness_orders_signatures_by_key_for_both_key_orders() {
    for (client, server) in [(1, 2), (2, 1), (3, 4), (4, 3)] {
        let s = Setup::with(client, server, Terms::default(), None);
        let client_first = public(&s.client).to_bytes() < public(&s.server).to_bytes();
        s.open();
        let close = s.channel.close_transaction(&s.pay(5_000), &s.server).unwrap();
        let witness = &close.input[0].witness;
        assert_eq!(witness.len(), 4);
        assert!(witness.nth(0).unwrap().is_empty(), "CHECKMULTISIG dummy must be empty");
        assert_eq!(witness.nth(3).unwrap(), s.params.witness_script().as_bytes());
        let script = s.params.witness_script();
        let first_key = &script.as_bytes()[2..35];
        let expected = if client_first { public(&s.client) } else { public(&s.server) };
        assert_eq!(first_key, expected.to_bytes());
        s.assert_valid_spend(&close);
        s.chain.submit(&close).expect("accepted");
    }
}

#[test]
fn refund_is_refused_before_its_lock_time_and_accepted_after() {
    let s = Setup::new();
    let refund = s.open();
    s.assert_valid_spend(&refund);
    s.chain.mine(1);
    let expiry = s.tip().height - 1 + LIFETIME_BLOCKS;
    assert_eq!(reject(&s, &refund), RejectReason::NonFinal);
    s.chain.mine(expiry - 1 - s.tip().height);
    assert_eq!(s.tip().height, expiry - 1);
    assert!(!s.params.refund_is_valid(s.tip()));
    assert_eq!(reject(&s, &refund), RejectReason::NonFinal);
    s.chain.mine(1);
    assert!(s.params.refund_is_valid(s.tip()));
    let txid = s.chain.submit(&refund).expect("refund valid once the tip reaches the expiry");
    s.chain.mine(1);
    assert!(matches!(s.chain.tx_status(&txid), TxStatus::Confirmed { .. }));
}

#[test]
fn timestamp_refund_is_refused_until_median_time_past_exceeds_it() {
    let chain_tip = Setup::new().tip();
    let expiry = LockTime::from_time(chain_tip.median_time_past + 2 * 86_400).unwrap();
    let s = Setup::with(1, 2, Terms::default(), Some(expiry));
    let refund = s.open();
    s.chain.mine(1);
    assert_eq!(reject(&s, &refund), RejectReason::NonFinal);
    while !s.params.refund_is_valid(s.tip()) {
        assert_eq!(reject(&s, &refund), RejectReason::NonFinal);
        s.chain.mine(6);
    }
    assert!(s.tip().median_time_past > expiry.to_consensus_u32());
    s.chain.submit(&refund).expect("refund valid once median time past passes the expiry");
}

#[test]
fn payments_stop_inside_the_close_margin() {
    let s = Setup::new();
    s.open();
    let t3 = s.pay(2_000);
    let expiry = s.params.expiry.to_consensus_u32();
    s.chain.mine(expiry - s.params.close_margin - 1 - s.tip().height);
    assert!(matches!(
        s.channel.check_payment(None, &t3, s.tip()),
        Ok(PaymentCheck::Increase { .. })
    ));
    s.chain.mine(1);
    assert!(s.params.is_closing(s.tip()));
    assert_eq!(
        s.channel.check_payment(None, &t3, s.tip()),
        Err(PaymentError::Closing { expiry: s.params.expiry })
    );
    // A repeat of the best payment is identification, not a new payment.
    assert_eq!(s.channel.check_payment(Some(&t3), &t3, s.tip()), Ok(PaymentCheck::Repeat));
}

fn reject(s: &Setup, tx: &Transaction) -> RejectReason {
    s.chain.submit(tx).expect_err("must be rejected").reject_reason().expect("a rejection")
}

// ---------------------------------------------------------------------------------------
// Opening: one negative test per term.

#[test]
fn agree_refuses_each_term_violation() {
    let s = Setup::new();
    let (terms, tip, p) = (&s.terms, s.tip(), &s.params);
    let agree = |value: Amount, expiry: LockTime, client: ScriptBuf, server: ScriptBuf| {
        terms.agree(p.client_key, p.server_key, value, expiry, client, server, tip)
    };
    let good = |value| agree(value, p.expiry, p.client_script.clone(), p.server_script.clone());
    assert!(good(CHANNEL_VALUE).is_ok());
    assert_eq!(
        terms
            .agree(
                p.client_key,
                p.client_key,
                CHANNEL_VALUE,
                p.expiry,
                p2wpkh(&s.client),
                p2wpkh(&s.server),
                tip
            )
            .map(|_| ()),
        Err(OpenError::SameKeys)
    );
    for value in [terms.min_value - Amount::ONE_SAT, terms.max_value + Amount::ONE_SAT] {
        assert!(matches!(good(value), Err(OpenError::ValueOutOfBounds { .. })), "{value}");
    }
    for blocks in [terms.blocks.min - 1, terms.blocks.max + 1] {
        let expiry = LockTime::from_height(tip.height + blocks).unwrap();
        let err = agree(CHANNEL_VALUE, expiry, p.client_script.clone(), p.server_script.clone());
        assert!(matches!(err, Err(OpenError::Expiry(_))), "{blocks}");
    }
    for blocks in [terms.blocks.min, terms.blocks.max] {
        let expiry = LockTime::from_height(tip.height + blocks).unwrap();
        assert!(
            agree(CHANNEL_VALUE, expiry, p.client_script.clone(), p.server_script.clone()).is_ok()
        );
    }
    let seconds = LockTime::from_time(tip.median_time_past + terms.seconds.min - 1).unwrap();
    assert!(matches!(
        agree(CHANNEL_VALUE, seconds, p.client_script.clone(), p.server_script.clone()),
        Err(OpenError::Expiry(_))
    ));
    let op_return = ScriptBuf::new_op_return([1u8; 4]);
    assert_eq!(
        agree(CHANNEL_VALUE, p.expiry, op_return.clone(), p.server_script.clone()).map(|_| ()),
        Err(OpenError::NonStandardClientScript)
    );
    assert_eq!(
        agree(CHANNEL_VALUE, p.expiry, p.client_script.clone(), op_return).map(|_| ()),
        Err(OpenError::NonStandardServerScript)
    );
}

// ---------------------------------------------------------------------------------------
// Refund (T2): the untouched fixture passes, each mutation fails with its own error.

/// A change to a transaction that should make exactly one check fail.
type Mutation = Box<dyn FnOnce(&mut Transaction)>;

fn check_refund(s: &Setup, refund: &Transaction) -> Result<OutPoint, RefundError> {
    s.params
        .check_refund(&s.terms, &s.unsigned_funding, refund, s.tip())
        .map(|c| c.funding_outpoint())
}

fn mutated_refund(s: &Setup, f: impl FnOnce(&mut Transaction)) -> Result<OutPoint, RefundError> {
    let mut refund = s.refund.clone();
    f(&mut refund);
    check_refund(s, &refund)
}

#[test]
fn refund_checks_each_rule() {
    let s = Setup::new();
    assert_eq!(check_refund(&s, &s.refund), Ok(s.outpoint));
    let other_txid = bitcoin::Txid::from_byte_array([7; 32]);
    let cases: Vec<(RefundError, Mutation)> = vec![
        (RefundError::InputCount { found: 2 }, Box::new(|t| t.input.push(t.input[0].clone()))),
        (RefundError::InputCount { found: 0 }, Box::new(|t| t.input.clear())),
        (
            RefundError::WrongFundingTxid { expected: s.outpoint.txid, found: other_txid },
            Box::new(move |t| t.input[0].previous_output.txid = other_txid),
        ),
        (
            RefundError::WrongFundingScript { outpoint: OutPoint { vout: 1, ..s.outpoint } },
            Box::new(|t| t.input[0].previous_output.vout = 1),
        ),
        (
            RefundError::WrongFundingScript { outpoint: OutPoint { vout: 7, ..s.outpoint } },
            Box::new(|t| t.input[0].previous_output.vout = 7),
        ),
        (RefundError::Version { found: 1 }, Box::new(|t| t.version = Version::ONE)),
        (RefundError::OutputCount { found: 2 }, Box::new(|t| t.output.push(t.output[0].clone()))),
        (RefundError::OutputCount { found: 0 }, Box::new(|t| t.output.clear())),
        (
            RefundError::WrongOutputScript,
            Box::new(|t| t.output[0].script_pubkey = p2wpkh(&secret(5))),
        ),
        (RefundError::FinalSequence, Box::new(|t| t.input[0].sequence = Sequence::MAX)),
        (
            RefundError::WrongLockTime {
                expected: s.params.expiry,
                found: LockTime::from_consensus(s.params.expiry.to_consensus_u32() - 1),
            },
            Box::new(|t| {
                t.lock_time = LockTime::from_consensus(t.lock_time.to_consensus_u32() - 1)
            }),
        ),
        (
            RefundError::ValueCreation,
            Box::new(|t| t.output[0].value = CHANNEL_VALUE + Amount::ONE_SAT),
        ),
        (
            RefundError::DustOutput {
                value: Amount::from_sat(293),
                threshold: Amount::from_sat(294),
            },
            Box::new(|t| t.output[0].value = Amount::from_sat(293)),
        ),
        (
            RefundError::Fee(FeeOutOfBounds::TooLow {
                fee: Amount::ONE_SAT,
                required: s.params.refund_fee(),
            }),
            Box::new(|t| t.output[0].value = CHANNEL_VALUE - Amount::ONE_SAT),
        ),
    ];
    for (expected, mutate) in cases {
        assert_eq!(mutated_refund(&s, mutate), Err(expected));
    }
    // The fee floor is exact: one sat less than the minimum is refused, the minimum passes.
    let min = s.params.refund_fee();
    assert!(mutated_refund(&s, |t| t.output[0].value = CHANNEL_VALUE - min).is_ok());
    assert!(matches!(
        mutated_refund(&s, |t| t.output[0].value = CHANNEL_VALUE - min + Amount::ONE_SAT),
        Err(RefundError::Fee(FeeOutOfBounds::TooLow { .. }))
    ));
}

/// A client that mines could fund the channel with its own block's coinbase: an output no
/// transaction can spend for 100 blocks (so no close before then) and that a reorganisation
/// erases. The server signs no refund for it; the same output in an ordinary transaction is
/// fine.
#[test]
fn refund_refuses_a_coinbase_funding() {
    let s = Setup::new();
    let mut coinbase = s.unsigned_funding.clone();
    coinbase.input.truncate(1);
    coinbase.input[0].previous_output = OutPoint::null();
    coinbase.input[0].script_sig = bitcoin::ScriptBuf::from_bytes(vec![1, 7]);
    assert!(coinbase.is_coinbase());
    let outpoint = OutPoint { txid: coinbase.compute_txid(), vout: 0 };
    let refund = s.params.build_refund(outpoint, s.params.refund_fee());
    assert_eq!(
        s.params.check_refund(&s.terms, &coinbase, &refund, s.tip()).map(|_| ()),
        Err(RefundError::CoinbaseFunding)
    );
    assert_eq!(RefundError::CoinbaseFunding.code(), "refund-coinbase-funding");
    let mut ordinary = coinbase.clone();
    ordinary.input[0].previous_output = s.unsigned_funding.input[0].previous_output;
    ordinary.input[0].script_sig = bitcoin::ScriptBuf::new();
    let outpoint = OutPoint { txid: ordinary.compute_txid(), vout: 0 };
    let refund = s.params.build_refund(outpoint, s.params.refund_fee());
    assert!(s.params.check_refund(&s.terms, &ordinary, &refund, s.tip()).is_ok());
}

#[test]
fn refund_checks_funding_value_fee_cap_and_current_lifetime() {
    // A funding output of another value than agreed.
    let s = Setup::new();
    let mut funding = s.unsigned_funding.clone();
    funding.output[0].value = CHANNEL_VALUE - Amount::ONE_SAT;
    let outpoint = OutPoint { txid: funding.compute_txid(), vout: 0 };
    let refund = s.params.build_refund(outpoint, s.params.refund_fee());
    assert_eq!(
        s.params.check_refund(&s.terms, &funding, &refund, s.tip()).map(|_| ()),
        Err(RefundError::WrongFundingValue {
            expected: CHANNEL_VALUE,
            found: CHANNEL_VALUE - Amount::ONE_SAT
        })
    );

    // A fee above the agreed maximum rate.
    let mut terms = Terms::default();
    terms.max_fee_rate = FeeRate::from_sat_per_vb_u32(10);
    let s = Setup::with(1, 2, terms, None);
    let refund = s.params.build_refund(s.outpoint, Amount::from_sat(5_000));
    assert!(matches!(
        check_refund(&s, &refund),
        Err(RefundError::Fee(FeeOutOfBounds::TooHigh { .. }))
    ));
    let refund = s.params.build_refund(s.outpoint, s.params.refund_fee());
    assert!(check_refund(&s, &refund).is_ok());

    // The agreed expiry must still be within the lifetime bounds when the refund is signed.
    let s = Setup::new();
    s.chain.mine(LIFETIME_BLOCKS - s.terms.blocks.min + 1);
    assert!(matches!(check_refund(&s, &s.refund), Err(RefundError::Expiry(_))));
}

#[test]
fn server_signs_only_with_its_own_key_and_the_client_catches_a_bad_signature() {
    let s = Setup::new();
    let checked = s.params.check_refund(&s.terms, &s.unsigned_funding, &s.refund, s.tip()).unwrap();
    assert_eq!(checked.sign(&s.client).unwrap_err(), SignError::WrongKey);
    let good = checked.sign(&s.server).unwrap();
    assert_eq!(s.params.verify_refund_signature(&s.refund, &good), Ok(()));
    // A signature over another transaction (here: another lock time) is refused.
    let mut other = s.refund.clone();
    other.lock_time = LockTime::from_consensus(s.refund.lock_time.to_consensus_u32() + 1);
    let sighash = SighashCache::new(&other)
        .p2wsh_signature_hash(0, &s.params.witness_script(), CHANNEL_VALUE, EcdsaSighashType::All)
        .unwrap();
    let wrong = bitcoin::ecdsa::Signature {
        signature: Secp256k1::new().sign_ecdsa(&Message::from(sighash), &s.server),
        sighash_type: EcdsaSighashType::All,
    };
    assert_eq!(s.params.verify_refund_signature(&s.refund, &wrong), Err(SignatureError::Invalid));
    // A signature by the right key but with SIGHASH_NONE is refused.
    let none = bitcoin::ecdsa::Signature { sighash_type: EcdsaSighashType::None, ..good };
    assert_eq!(
        s.params.verify_refund_signature(&s.refund, &none),
        Err(SignatureError::NotSighashAll { found: 0x02 })
    );
}

// ---------------------------------------------------------------------------------------
// Funding (T1).

#[test]
fn funding_checks_each_rule() {
    let s = Setup::new();
    let check = |terms: &Terms, outpoint: OutPoint, tx: &Transaction, prevouts: &[TxOut]| {
        s.params.check_funding(terms, outpoint, tx, prevouts)
    };
    let (terms, op, tx, prev) = (&s.terms, s.outpoint, &s.funding, &s.funding_prevouts[..]);
    assert_eq!(check(terms, op, tx, prev), Ok(()));

    let mut other = s.unsigned_funding.clone();
    other.output[1].value -= Amount::ONE_SAT;
    let found = other.compute_txid();
    assert_eq!(
        check(terms, op, &other, prev),
        Err(FundingError::TxidMismatch { expected: op.txid, found })
    );
    assert_eq!(
        check(terms, OutPoint { vout: 1, ..op }, tx, prev),
        Err(FundingError::WrongOutputScript)
    );
    assert_eq!(
        check(terms, OutPoint { vout: 2, ..op }, tx, prev),
        Err(FundingError::WrongOutputScript)
    );
    let mut bigger = s.params.clone();
    bigger.value = CHANNEL_VALUE + Amount::ONE_SAT;
    assert_eq!(
        bigger.check_funding(terms, op, tx, prev),
        Err(FundingError::WrongValue { expected: bigger.value, found: CHANNEL_VALUE })
    );
    let mut small = Terms::default();
    small.max_value = CHANNEL_VALUE - Amount::ONE_SAT;
    assert!(matches!(check(&small, op, tx, prev), Err(FundingError::ValueOutOfBounds { .. })));
    assert_eq!(
        check(terms, op, &s.unsigned_funding, prev),
        Err(FundingError::Unsigned { input: 0 })
    );
    assert_eq!(
        check(terms, op, tx, &[]),
        Err(FundingError::PrevoutCount { inputs: 1, prevouts: 0 })
    );
    let mut poor = s.funding_prevouts.clone();
    poor[0].value = Amount::from_sat(1_000);
    assert_eq!(check(terms, op, tx, &poor), Err(FundingError::ValueCreation));
    let mut greedy = Terms::default();
    greedy.funding_min_fee_rate = FeeRate::from_sat_per_vb_u32(100);
    assert!(matches!(
        check(&greedy, op, tx, prev),
        Err(FundingError::Fee(FeeOutOfBounds::TooLow { .. }))
    ));
}

// ---------------------------------------------------------------------------------------
// Payments (T3).

fn check(
    s: &Setup,
    best: Option<&Transaction>,
    t3: &Transaction,
) -> Result<PaymentCheck, PaymentError> {
    s.channel.check_payment(best, t3, s.tip())
}

/// Mutates a valid payment of 10 000 sat, re-signs it, and checks it.
fn mutated(s: &Setup, f: impl FnOnce(&mut Transaction)) -> Result<PaymentCheck, PaymentError> {
    let mut tx = s.pay(10_000);
    f(&mut tx);
    check(s, None, &s.resign(tx))
}

#[test]
fn payment_checks_each_structural_rule() {
    let s = Setup::new();
    assert!(mutated(&s, |_| ()).is_ok());
    let other = OutPoint { vout: 1, ..s.outpoint };
    let stranger = p2wpkh(&secret(5));
    let cases: Vec<(PaymentError, Mutation)> = vec![
        (
            PaymentError::InputCount { found: 2 },
            Box::new(move |t| t.input.push(TxIn { previous_output: other, ..t.input[0].clone() })),
        ),
        (
            PaymentError::WrongOutpoint { found: other },
            Box::new(move |t| t.input[0].previous_output = other),
        ),
        (PaymentError::Version { found: 1 }, Box::new(|t| t.version = Version::ONE)),
        (PaymentError::Version { found: 3 }, Box::new(|t| t.version = Version(3))),
        (
            PaymentError::Sequence { found: Sequence::ENABLE_LOCKTIME_NO_RBF },
            Box::new(|t| t.input[0].sequence = Sequence::ENABLE_LOCKTIME_NO_RBF),
        ),
        (
            PaymentError::LockTime { found: LockTime::from_consensus(1) },
            Box::new(|t| t.lock_time = LockTime::from_consensus(1)),
        ),
        (PaymentError::OutputCount { found: 0 }, Box::new(|t| t.output.clear())),
        (PaymentError::OutputCount { found: 3 }, Box::new(|t| t.output.push(t.output[1].clone()))),
        (PaymentError::WrongServerScript, Box::new(|t| t.output.swap(0, 1))),
        (
            PaymentError::WrongServerScript,
            Box::new({
                let stranger = stranger.clone();
                move |t| t.output[0].script_pubkey = stranger
            }),
        ),
        (PaymentError::WrongChangeScript, Box::new(move |t| t.output[1].script_pubkey = stranger)),
        (PaymentError::ValueCreation, Box::new(|t| t.output[1].value += Amount::from_sat(10_000))),
    ];
    for (expected, mutate) in cases {
        assert_eq!(mutated(&s, mutate), Err(expected));
    }
}

#[test]
fn payment_checks_dust_and_fees() {
    let s = Setup::new();
    let fee = s.params.payment_fee(true);
    let change_dust = s.params.min_change();
    // Server output below its dust threshold.
    assert_eq!(
        mutated(&s, |t| {
            t.output[0].value = Amount::from_sat(100);
            t.output[1].value = CHANNEL_VALUE - Amount::from_sat(100) - fee;
        }),
        Err(PaymentError::ServerOutputDust {
            value: Amount::from_sat(100),
            threshold: s.params.min_server_amount()
        })
    );
    // Change below its dust threshold must be omitted, not paid.
    let server = CHANNEL_VALUE - fee - Amount::from_sat(100);
    assert_eq!(
        mutated(&s, |t| {
            t.output[0].value = server;
            t.output[1].value = Amount::from_sat(100);
        }),
        Err(PaymentError::ChangeDust { value: Amount::from_sat(100), threshold: change_dust })
    );
    // Omitting change that is not dust gives it away: refused.
    let would_be = CHANNEL_VALUE - Amount::from_sat(10_000) - fee;
    assert_eq!(
        mutated(&s, |t| {
            t.output.pop();
        }),
        Err(PaymentError::ChangeOmitted { would_be })
    );
    // Omitting dust change is fine, and the builder does it by itself.
    let near_full = CHANNEL_VALUE - fee - change_dust + Amount::ONE_SAT;
    let t3 = s.pay(near_full.to_sat());
    assert_eq!(t3.output.len(), 1);
    assert!(check(&s, None, &t3).is_ok());
    s.assert_valid_spend(&s.channel.close_transaction(&t3, &s.server).unwrap());
    // The largest payment leaves exactly the fee.
    let max = s.params.max_server_amount();
    let t3 = s.pay(max.to_sat());
    assert!(check(&s, None, &t3).is_ok());
    s.assert_valid_spend(&s.channel.close_transaction(&t3, &s.server).unwrap());
    assert_eq!(s.channel.build_payment(max + Amount::ONE_SAT), Err(PaymentError::ValueCreation));
    let below_dust = s.params.min_server_amount() - Amount::ONE_SAT;
    assert_eq!(
        s.channel.build_payment(below_dust),
        Err(PaymentError::ServerOutputDust {
            value: below_dust,
            threshold: s.params.min_server_amount()
        })
    );
    // Fee one sat below the floor.
    assert_eq!(
        mutated(&s, |t| t.output[1].value += Amount::ONE_SAT),
        Err(PaymentError::Fee(FeeOutOfBounds::TooLow {
            fee: fee - Amount::ONE_SAT,
            required: fee
        }))
    );
    // Fee above the cap.
    let mut terms = Terms::default();
    terms.max_fee_rate = FeeRate::from_sat_per_vb_u32(10);
    let capped = Setup::with(1, 2, terms, None);
    let result = {
        let mut tx = capped.pay(10_000);
        tx.output[1].value -= Amount::from_sat(5_000);
        capped.channel.check_payment(None, &capped.resign(tx), capped.tip())
    };
    assert!(matches!(result, Err(PaymentError::Fee(FeeOutOfBounds::TooHigh { .. }))), "{result:?}");
}

#[test]
fn payment_amounts_only_increase_and_repeats_are_not_errors() {
    let s = Setup::new();
    let best = s.pay(5_000);
    assert_eq!(check(&s, Some(&best), &best), Ok(PaymentCheck::Repeat));
    assert_eq!(
        check(&s, Some(&best), &s.pay(4_999)),
        Err(PaymentError::NotAnIncrease {
            best: Amount::from_sat(5_000),
            found: Amount::from_sat(4_999)
        })
    );
    // Same server amount, different change (so a different transaction): not an increase.
    let mut same_amount = best.clone();
    same_amount.output[1].value -= Amount::ONE_SAT;
    assert_eq!(
        check(&s, Some(&best), &s.resign(same_amount)),
        Err(PaymentError::NotAnIncrease {
            best: Amount::from_sat(5_000),
            found: Amount::from_sat(5_000)
        })
    );
    // The same transaction with another valid signature is a repeat.
    let mut resigned = best.clone();
    let sighash = SighashCache::new(&best)
        .p2wsh_signature_hash(0, &s.params.witness_script(), CHANNEL_VALUE, EcdsaSighashType::All)
        .unwrap();
    let other_sig =
        Secp256k1::new().sign_ecdsa_with_noncedata(&Message::from(sighash), &s.client, &[9; 32]);
    let other_sig =
        bitcoin::ecdsa::Signature { signature: other_sig, sighash_type: EcdsaSighashType::All };
    resigned.input[0].witness = Witness::from_slice(&[other_sig.to_vec()]);
    assert_ne!(resigned, best);
    assert_eq!(check(&s, Some(&best), &resigned), Ok(PaymentCheck::Repeat));
    // ... but not with an invalid one.
    let mut forged = best.clone();
    let mut bad = other_sig.signature.serialize_compact();
    bad[10] ^= 1;
    let bad = bitcoin::ecdsa::Signature {
        signature: bitcoin::secp256k1::ecdsa::Signature::from_compact(&bad).unwrap(),
        sighash_type: EcdsaSighashType::All,
    };
    forged.input[0].witness = Witness::from_slice(&[bad.to_vec()]);
    assert!(matches!(check(&s, Some(&best), &forged), Err(PaymentError::Signature(_))));
    assert!(matches!(check(&s, Some(&best), &s.pay(5_001)), Ok(PaymentCheck::Increase { .. })));
}

#[test]
fn payment_signature_rules() {
    let s = Setup::new();
    let t3 = s.pay(10_000);
    let with_witness = |items: &[Vec<u8>]| {
        let mut tx = t3.clone();
        tx.input[0].witness = Witness::from_slice(items);
        check(&s, None, &tx)
    };
    let good = t3.input[0].witness.nth(0).unwrap().to_vec();
    assert!(with_witness(std::slice::from_ref(&good)).is_ok());
    assert_eq!(with_witness(&[]), Err(PaymentError::WitnessShape { items: 0 }));
    assert_eq!(
        with_witness(&[good.clone(), good.clone()]),
        Err(PaymentError::WitnessShape { items: 2 })
    );
    let mut not_der = good.clone();
    not_der[0] = 0x31;
    assert_eq!(
        with_witness(&[not_der]),
        Err(PaymentError::Signature(SignatureError::NotStrictDer))
    );

    let secp = Secp256k1::new();
    let sign_as = |ty: EcdsaSighashType, key: &bitcoin::secp256k1::SecretKey, amount: Amount| {
        let sighash = SighashCache::new(&t3)
            .p2wsh_signature_hash(0, &s.params.witness_script(), amount, ty)
            .unwrap();
        bitcoin::ecdsa::Signature {
            signature: secp.sign_ecdsa(&Message::from(sighash), key),
            sighash_type: ty,
        }
        .to_vec()
    };
    for ty in
        [EcdsaSighashType::None, EcdsaSighashType::Single, EcdsaSighashType::AllPlusAnyoneCanPay]
    {
        assert_eq!(
            with_witness(&[sign_as(ty, &s.client, CHANNEL_VALUE)]),
            Err(PaymentError::Signature(SignatureError::NotSighashAll { found: ty as u8 }))
        );
    }
    // Signed by the server's key, or over the wrong amount (BIP-0143 commits to it).
    for sig in [
        sign_as(EcdsaSighashType::All, &s.server, CHANNEL_VALUE),
        sign_as(EcdsaSighashType::All, &s.client, CHANNEL_VALUE + Amount::ONE_SAT),
    ] {
        assert_eq!(with_witness(&[sig]), Err(PaymentError::Signature(SignatureError::Invalid)));
    }
    // The high-S twin of the valid signature verifies mathematically but is non-standard.
    let parsed = bitcoin::ecdsa::Signature::from_slice(&good).unwrap();
    let high = high_s(&parsed.signature);
    let mut high_bytes = high.serialize_der().to_vec();
    high_bytes.push(0x01);
    assert!(
        secp.verify_ecdsa(&msg(&s, &t3), &high, &s.channel.params().client_key.0).is_err(),
        "libsecp256k1 itself refuses high-S"
    );
    assert_eq!(with_witness(&[high_bytes]), Err(PaymentError::Signature(SignatureError::HighS)));
}

#[test]
fn closing_requires_the_server_key_and_a_client_signature() {
    let s = Setup::new();
    let t3 = s.pay(3_000);
    assert_eq!(s.channel.close_transaction(&t3, &s.client), Err(CloseError::WrongKey));
    let mut unsigned = t3.clone();
    unsigned.input[0].witness = Witness::new();
    assert_eq!(
        s.channel.close_transaction(&unsigned, &s.server),
        Err(CloseError::WitnessShape { items: 0 })
    );
    assert_eq!(
        s.channel.sign_payment(&mut unsigned, &s.server),
        Err(SignError::WrongKey),
        "the client signs only with the client key"
    );
}

fn msg(s: &Setup, tx: &Transaction) -> Message {
    let sighash = SighashCache::new(tx)
        .p2wsh_signature_hash(0, &s.params.witness_script(), CHANNEL_VALUE, EcdsaSighashType::All)
        .unwrap();
    Message::from(sighash)
}

/// Returns the signature with S replaced by n - S.
fn high_s(sig: &bitcoin::secp256k1::ecdsa::Signature) -> bitcoin::secp256k1::ecdsa::Signature {
    let mut compact = sig.serialize_compact();
    let order = bitcoin::secp256k1::constants::CURVE_ORDER;
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(order[i]) - i16::from(compact[32 + i]) - borrow;
        borrow = i16::from(d < 0);
        compact[32 + i] = (d + 256 * borrow) as u8;
    }
    bitcoin::secp256k1::ecdsa::Signature::from_compact(&compact).unwrap()
}

#[test]
fn funding_with_a_double_spent_input_is_rejected_by_the_chain() {
    let s = Setup::new();
    s.open();
    let mut conflict = s.funding.clone();
    conflict.output[1].value -= Amount::from_sat(500);
    paychan::chain::sim::sign_p2wpkh_input(&mut conflict, 0, &s.funding_prevouts[0], &s.wallet);
    assert_eq!(reject(&s, &conflict), RejectReason::Conflict);
}

// ---------------------------------------------------------------------------------------
// Fields the client's signature does not commit to (security review S1).

/// BIP-0143 does not sign the scriptSig, so a client can add one to a validly signed payment;
/// a witness spend with a scriptSig is invalid in every block, so the server must refuse it,
/// even when it is byte-identical to a best payment stored by an earlier version.
#[test]
fn a_payment_or_refund_with_a_script_sig_is_refused_and_a_close_never_carries_one() {
    let s = Setup::new();
    s.open();
    let mut padded = s.pay(10_000);
    padded.input[0].script_sig = ScriptBuf::from_bytes(vec![0x00]);
    // The signature still verifies (the sighash does not cover the scriptSig)...
    assert_eq!(s.resign(padded.clone()).input[0].witness, padded.input[0].witness);
    // ...but the server refuses it, as a new payment and as a repeat of a stored best.
    assert_eq!(check(&s, None, &padded), Err(PaymentError::ScriptSig));
    assert_eq!(check(&s, Some(&padded), &padded), Err(PaymentError::ScriptSig));
    assert_eq!(s.channel.verify_client_signature(&padded), Err(PaymentError::ScriptSig));
    assert_eq!(PaymentError::ScriptSig.code(), "payment-script-sig");

    // Co-signed as it is, Bitcoin Core's interpreter refuses it (witness malleated)...
    let close = s.channel.close_transaction(&padded, &s.server).unwrap();
    assert!(close.input[0].script_sig.is_empty(), "the close clears the scriptSig");
    s.assert_valid_spend(&close);
    let mut malleated = close.clone();
    malleated.input[0].script_sig = ScriptBuf::from_bytes(vec![0x00]);
    let txout = s.funding_txout();
    assert!(malleated.verify(|op| (*op == s.outpoint).then(|| txout.clone())).is_err());
    assert_eq!(reject(&s, &malleated), RejectReason::ScriptFailure);
    // ...and the cleared close is what the chain takes.
    s.chain.submit(&close).expect("the close without a scriptSig is valid");

    // The refund: a scriptSig is refused before the server signs.
    let s = Setup::new();
    let refused = mutated_refund(&s, |t| t.input[0].script_sig = ScriptBuf::from_bytes(vec![0x51]));
    assert_eq!(refused, Err(RefundError::ScriptSig));
}

/// A funding input without a witness could have its txid changed after the refund was signed
/// (legacy scriptSig malleability): only segwit inputs are accepted.
#[test]
fn a_funding_input_without_a_witness_is_refused() {
    let s = Setup::new();
    let mut funding = s.funding.clone();
    funding.input[0].script_sig = ScriptBuf::from_bytes(vec![0x00]);
    funding.input[0].witness = Witness::new();
    assert_eq!(
        s.params.check_funding(&s.terms, s.outpoint, &funding, &s.funding_prevouts),
        Err(FundingError::TxidMismatch {
            expected: s.outpoint.txid,
            found: funding.compute_txid()
        })
    );
    // Even with a matching txid (the scriptSig already in the unsigned funding):
    let outpoint = OutPoint { txid: funding.compute_txid(), ..s.outpoint };
    assert_eq!(
        s.params.check_funding(&s.terms, outpoint, &funding, &s.funding_prevouts),
        Err(FundingError::Unsigned { input: 0 })
    );
}

/// The refund pays exactly the agreed minimum rate: a close (at least that rate, and larger)
/// always pays more, so a refund can never replace a pending close.
#[test]
fn a_refund_above_the_minimum_fee_is_refused() {
    let s = Setup::new();
    let fee = s.params.refund_fee();
    let refund = s.params.build_refund(s.outpoint, fee + Amount::ONE_SAT);
    assert_eq!(
        check_refund(&s, &refund),
        Err(RefundError::Fee(FeeOutOfBounds::TooHigh { fee: fee + Amount::ONE_SAT, max: fee }))
    );
    let close = s.channel.build_payment(Amount::from_sat(1_000)).unwrap();
    let close_fee = CHANNEL_VALUE - close.output.iter().map(|o| o.value).sum::<Amount>();
    assert!(close_fee > fee, "a close pays more than any refund: {close_fee} vs {fee}");
}

/// `check_new_payment` keeps an increase as the `CheckedPayment` a store takes (the same
/// transaction), answers `Repeat` for the best, and refuses what `check_payment` refuses.
#[test]
fn a_checked_payment_is_the_payment_that_passed_every_rule() {
    use paychan::channel::NewPayment;
    let s = Setup::new();
    s.open();
    let t3 = s.pay(2_000);
    match s.channel.check_new_payment(None, t3.clone(), s.tip()) {
        Ok(NewPayment::Increase(checked)) => {
            assert_eq!(checked.transaction(), &t3);
            assert_eq!(checked.server_amount(), Amount::from_sat(2_000));
        }
        other => panic!("an increase: {other:?}"),
    }
    assert_eq!(s.channel.check_new_payment(Some(&t3), t3.clone(), s.tip()), Ok(NewPayment::Repeat));
    let mut unsigned = t3.clone();
    unsigned.input[0].witness = Witness::new();
    assert_eq!(
        s.channel.check_new_payment(None, unsigned.clone(), s.tip()).unwrap_err(),
        s.channel.check_payment(None, &unsigned, s.tip()).unwrap_err()
    );
}
