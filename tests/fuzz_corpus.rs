//! The fuzz targets' smoke run on stable Rust: every input kept in `fuzz/corpus/<target>/`
//! (what `cargo +nightly fuzz run <target>` found interesting), the seeds, and a bounded number
//! of random mutations of the seeds go through the same harness as the fuzzer
//! (`fuzz/harness.rs`). The long coverage-guided runs are in docs/SECURITY.md.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

use bitcoin::consensus::encode::serialize;

/// How many random mutations each target gets per `cargo test`.
const MUTATIONS: usize = 3_000;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let f = harness::fixture();
    let header = paychan::wire::encode_payment(&f.best).into_bytes();
    let refund = serialize(&f.params.build_refund(f.channel.outpoint(), f.params.refund_fee()));
    let mut funding = f.funding.clone();
    funding.input[0].witness.push([1; 72]);
    funding.input[0].witness.push([2; 33]);
    let funding = serialize(&funding);
    match target {
        "header" | "payment" => vec![header, b"AAAA".to_vec(), vec![]],
        "refund" => vec![refund],
        "funding" => vec![funding],
        "negotiation" => {
            let open = format!(
                r#"{{"client_pubkey":"{}","value_sat":100000,"expiry":801000,"client_script":"{}"}}"#,
                f.params.client_key,
                f.params.client_script.to_hex_string()
            );
            let with = |pick: u8, body: &[u8]| [&[pick][..], body].concat();
            vec![
                with(0, open.as_bytes()),
                with(1, br#"{"proposal":1,"funding_tx":"00","refund_tx":"00"}"#),
                with(2, br#"{"proposal":1,"funding_tx":"00","payment":"AAAA"}"#),
                with(3, &header),
                with(4, b"zz:0"),
                with(5, b""),
                with(6, &header),
            ]
        }
        _ => unreachable!(),
    }
}

fn run(target: &str, check: fn(&[u8])) {
    let mut inputs = seeds(target);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            inputs.push(std::fs::read(entry.path()).expect("corpus file"));
        }
    }
    for input in &inputs {
        check(input);
    }
    // xorshift: reproducible, no dependency.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds = seeds(target);
    for _ in 0..MUTATIONS {
        let mut input = seeds[next() as usize % seeds.len()].clone();
        for _ in 0..1 + next() % 4 {
            let at = if input.is_empty() { 0 } else { next() as usize % input.len() };
            match next() % 3 {
                0 if !input.is_empty() => input[at] = next() as u8,
                1 => input.insert(at, next() as u8),
                _ if !input.is_empty() => {
                    input.remove(at);
                }
                _ => {}
            }
        }
        check(&input);
    }
}

#[test]
fn header() {
    run("header", harness::header);
}

#[test]
fn payment() {
    run("payment", harness::payment);
}

#[test]
fn refund() {
    run("refund", harness::refund);
}

#[test]
fn funding() {
    run("funding", harness::funding);
}

#[test]
fn negotiation() {
    run("negotiation", harness::negotiation);
}

/// Writes the seeds into `fuzz/corpus/` (run once by hand:
/// `cargo test --test fuzz_corpus -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    for target in ["header", "payment", "refund", "funding", "negotiation"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
}
