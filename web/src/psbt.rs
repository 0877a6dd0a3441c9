//! The little of BIP 174 the page reads from the user's wallet: the unsigned transaction, each
//! input's `witness_utxo` and `final_scriptwitness` (and that no input has a final scriptSig);
//! every other key is skipped. rust-bitcoin's full PSBT parser would add ~27 KB gzip to a
//! module every paying page downloads; what this reads is then checked by the client's steps
//! (`steps::check_funding`, `steps::signed_funding`).

use bitcoin::consensus::encode::deserialize;
use bitcoin::{Transaction, TxOut};
use paychan::client::steps::Funding;

/// Why a PSBT was not read.
pub(crate) type Refusal = &'static str;

const MAGIC: &[u8] = b"psbt\xff";
const GLOBAL_UNSIGNED_TX: u8 = 0x00;
const IN_WITNESS_UTXO: u8 = 0x01;
const IN_FINAL_SCRIPTSIG: u8 = 0x07;
const IN_FINAL_SCRIPTWITNESS: u8 = 0x08;

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refusal> {
        if n > self.bytes.len() {
            return Err("the PSBT ends early");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// A compact size (Bitcoin's var int), as a length within the PSBT.
    fn size(&mut self) -> Result<usize, Refusal> {
        let n = match self.take(1)?[0] {
            0xfd => u64::from(u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default())),
            0xfe => u64::from(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default())),
            0xff => u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()),
            n => u64::from(n),
        };
        usize::try_from(n).ok().filter(|n| *n <= self.bytes.len()).ok_or("the PSBT ends early")
    }

    /// The next key-value pair of the current map, `None` at its end: `(key type, key data,
    /// value)`. A key seen before in the map (`seen`) is refused, as BIP 174 says: a wallet
    /// that took the first of two unsigned transactions would sign another one than the page
    /// checked.
    #[allow(clippy::type_complexity)]
    fn pair(
        &mut self,
        seen: &mut Vec<&'a [u8]>,
    ) -> Result<Option<(u8, &'a [u8], &'a [u8])>, Refusal> {
        let key_len = self.size()?;
        if key_len == 0 {
            return Ok(None);
        }
        let key = self.take(key_len)?;
        if seen.contains(&key) {
            return Err("a key appears twice in one map");
        }
        seen.push(key);
        let value_len = self.size()?;
        let value = self.take(value_len)?;
        Ok(Some((key[0], &key[1..], value)))
    }
}

/// Reads the PSBT `bytes` (binary BIP 174): its transaction with the inputs' final witnesses,
/// and their `witness_utxo`s.
pub(crate) fn read(bytes: &[u8]) -> Result<Funding, Refusal> {
    let mut r = Reader { bytes };
    if r.take(MAGIC.len())? != MAGIC {
        return Err("not a PSBT (no magic bytes)");
    }
    let mut unsigned: Option<Transaction> = None;
    let mut seen = Vec::new();
    while let Some((kind, key, value)) = r.pair(&mut seen)? {
        if kind == GLOBAL_UNSIGNED_TX && key.is_empty() {
            unsigned = Some(deserialize(value).map_err(|_| "its unsigned transaction")?);
        }
    }
    let mut tx = unsigned.ok_or("it has no unsigned transaction")?;
    if tx.input.iter().any(|txin| !txin.script_sig.is_empty() || !txin.witness.is_empty()) {
        return Err("its transaction is not unsigned");
    }
    let mut coins = vec![None; tx.input.len()];
    for (txin, coin) in tx.input.iter_mut().zip(&mut coins) {
        let mut seen = Vec::new();
        while let Some((kind, key, value)) = r.pair(&mut seen)? {
            match kind {
                IN_WITNESS_UTXO if key.is_empty() => {
                    let utxo: TxOut = deserialize(value).map_err(|_| "an input's witness_utxo")?;
                    *coin = Some(utxo);
                }
                IN_FINAL_SCRIPTWITNESS if key.is_empty() => {
                    txin.witness = deserialize(value).map_err(|_| "an input's final witness")?;
                }
                IN_FINAL_SCRIPTSIG if key.is_empty() && !value.is_empty() => {
                    return Err("an input has a scriptSig: native SegWit inputs only");
                }
                _ => {}
            }
        }
    }
    for _ in 0..tx.output.len() {
        let mut seen = Vec::new();
        while r.pair(&mut seen)?.is_some() {}
    }
    if !r.bytes.is_empty() {
        return Err("bytes after the PSBT");
    }
    Ok(Funding::new(tx, coins))
}
