//! Property test: random sequences of valid and invalid payments keep the channel's
//! invariants — the best amount only grows, errors change nothing, and every payment the
//! server holds co-signs into a transaction Bitcoin Core's interpreter accepts.

mod common;

use bitcoin::absolute::LockTime;
use bitcoin::transaction::Version;
use bitcoin::{Amount, Sequence, Transaction};
use common::{Setup, p2wpkh, secret};
use paychan::channel::{PaymentCheck, PaymentError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Pay `delta` more than the best.
    Increase(u64),
    /// Send the best payment again.
    Repeat,
    /// Pay `delta` less than the best.
    Decrease(u64),
    /// Pay more, but break one rule.
    Corrupt(u8, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..20_000).prop_map(Op::Increase),
        1 => Just(Op::Repeat),
        1 => (1u64..5_000).prop_map(Op::Decrease),
        2 => (0u8..6, 1u64..5_000).prop_map(|(k, d)| Op::Corrupt(k, d)),
    ]
}

fn corrupt(s: &Setup, kind: u8, mut tx: Transaction) -> Transaction {
    match kind {
        0 => tx.input[0].sequence = Sequence::ZERO,
        1 => tx.lock_time = LockTime::from_consensus(1),
        2 => tx.version = Version::ONE,
        3 => {
            let last = tx.output.len() - 1;
            tx.output[last].script_pubkey = p2wpkh(&secret(5));
        }
        // One sat more to the server than the fee allows. Without change the dust already went
        // to the fee and one sat more would still be valid, so take the whole fee instead.
        4 if tx.output.len() == 2 => tx.output[0].value += Amount::ONE_SAT,
        4 => tx.output[0].value = s.params.value,
        _ => {
            // Flip a bit in the signature after signing.
            let tx = s.resign(tx);
            let mut sig = tx.input[0].witness.nth(0).unwrap().to_vec();
            sig[8] ^= 0x01;
            let mut tx = tx;
            tx.input[0].witness = bitcoin::Witness::from_slice(&[sig]);
            return tx;
        }
    }
    s.resign(tx)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn best_amount_only_grows_and_always_settles(ops in prop::collection::vec(op(), 1..24)) {
        let s = Setup::new();
        s.open();
        let min = s.params.min_server_amount().to_sat();
        let max = s.params.max_server_amount().to_sat();
        let mut best: Option<Transaction> = None;
        for op in ops {
            let best_sat = best.as_ref().map_or(0, |b| b.output[0].value.to_sat());
            let (candidate, must_pass) = match op {
                Op::Increase(d) => {
                    let sat = (best_sat + d).max(min);
                    if sat > max { continue; }
                    (s.pay(sat), true)
                }
                Op::Repeat => match &best {
                    Some(b) => (b.clone(), true),
                    None => continue,
                },
                Op::Decrease(d) => {
                    let Some(sat) = best_sat.checked_sub(d).filter(|&sat| sat >= min) else { continue };
                    (s.pay(sat), false)
                }
                Op::Corrupt(kind, d) => {
                    let sat = (best_sat + d).max(min);
                    if sat >= max { continue; }
                    (corrupt(&s, kind, s.pay(sat)), false)
                }
            };
            let result = s.channel.check_payment(best.as_ref(), &candidate, s.tip());
            match result {
                Ok(PaymentCheck::Increase { previous, server_amount }) => {
                    prop_assert!(must_pass, "accepted a bad payment: {op:?}");
                    prop_assert_eq!(previous.to_sat(), best_sat);
                    prop_assert!(server_amount.to_sat() > best_sat);
                    prop_assert_eq!(server_amount, candidate.output[0].value);
                    let close = s.channel.close_transaction(&candidate, &s.server).unwrap();
                    s.assert_valid_spend(&close);
                    best = Some(candidate);
                }
                Ok(PaymentCheck::Repeat) => {
                    prop_assert!(matches!(op, Op::Repeat), "repeat for {op:?}");
                    prop_assert_eq!(Some(candidate.compute_txid()), best.as_ref().map(|b| b.compute_txid()));
                }
                Err(e) => {
                    prop_assert!(!must_pass, "refused a good payment {op:?}: {e}");
                    if let Op::Decrease(_) = op {
                        prop_assert!(matches!(e, PaymentError::NotAnIncrease { .. }), "{e}");
                    }
                }
            }
        }
        // The best payment settles on the simulated chain.
        if let Some(best) = best {
            let close = s.channel.close_transaction(&best, &s.server).unwrap();
            prop_assert!(s.chain.submit(&close).is_ok());
        }
    }
}
