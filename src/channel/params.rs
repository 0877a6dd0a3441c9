use bitcoin::absolute::LockTime;
use bitcoin::opcodes::all::{OP_CHECKMULTISIG, OP_PUSHBYTES_33, OP_PUSHNUM_2};
use bitcoin::transaction::Version;
use bitcoin::{
    Address, Amount, CompressedPublicKey, FeeRate, Network, OutPoint, ScriptBuf, Weight,
};
use serde::{Deserialize, Serialize};

use super::ChainTip;
use super::error::{ExpiryOutOfBounds, OpenError};

/// The transaction version of every refund and payment transaction.
pub const TX_VERSION: Version = Version::TWO;

/// Upper bound on the witness weight of a co-signed 2-of-2 spend of the funding output:
/// marker and flag (2), item count (1), the empty dummy (1), two signatures of at most 72
/// bytes with their length bytes (2 × 73) and the 71-byte witness script with its length byte.
pub const FUNDING_SPEND_WITNESS_WEIGHT: u64 = 2 + 1 + 1 + 2 * 73 + 72;

/// The 2-of-2 witness script's length: two small-integer opcodes, two 33-byte pushes and
/// `OP_CHECKMULTISIG`.
const WITNESS_SCRIPT_LEN: usize = 1 + 2 * (1 + 33) + 2;

/// Bounds on a channel's lifetime in one lock-time unit (blocks or seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifetimeBounds {
    /// The expiry must be at least this far past the tip when the channel is opened.
    pub min: u32,
    /// The expiry must be at most this far past the tip when the channel is opened.
    pub max: u32,
    /// Payments stop being accepted this long before the expiry, leaving the server time to
    /// close on chain before the client's refund becomes valid.
    pub close_margin: u32,
}

/// The server's terms: what channels it accepts. Published to clients and checked on open.
///
/// # Examples
///
/// ```
/// use bitcoin::Amount;
/// use paychan::channel::Terms;
///
/// let mut terms = Terms::default();
/// terms.min_value = Amount::from_sat(50_000);
/// assert!(terms.blocks.close_margin < terms.blocks.min);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Terms {
    /// Smallest funding output accepted.
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub min_value: Amount,
    /// Largest funding output accepted.
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub max_value: Amount,
    /// Lifetime bounds for block-height expiries (the default kind).
    pub blocks: LifetimeBounds,
    /// Lifetime bounds for timestamp expiries, measured against median time past.
    pub seconds: LifetimeBounds,
    /// Lowest fee rate of refund and payment transactions (at their co-signed size).
    pub min_fee_rate: FeeRate,
    /// Highest fee rate of refund and payment transactions (at their co-signed size).
    pub max_fee_rate: FeeRate,
    /// Lowest fee rate of the funding transaction.
    pub funding_min_fee_rate: FeeRate,
}

impl Default for Terms {
    /// 10 000 sat to 0.1 BTC; 1 to 30 days (144 to 4 320 blocks) with a 6-hour close margin
    /// (36 blocks; 8 hours for timestamps, as median time past lags by about an hour);
    /// payment fee rates 2 to 1 000 sat/vB; funding at 1 sat/vB or more.
    fn default() -> Self {
        Self {
            min_value: Amount::from_sat(10_000),
            max_value: Amount::from_sat(10_000_000),
            blocks: LifetimeBounds { min: 144, max: 4_320, close_margin: 36 },
            seconds: LifetimeBounds { min: 86_400, max: 30 * 86_400, close_margin: 8 * 3_600 },
            min_fee_rate: FeeRate::from_sat_per_vb_u32(2),
            max_fee_rate: FeeRate::from_sat_per_vb_u32(1_000),
            funding_min_fee_rate: FeeRate::from_sat_per_vb_u32(1),
        }
    }
}

impl Terms {
    /// Returns the lifetime bounds that apply to `expiry`'s unit.
    pub fn lifetime(&self, expiry: LockTime) -> LifetimeBounds {
        match expiry {
            LockTime::Blocks(_) => self.blocks,
            LockTime::Seconds(_) => self.seconds,
        }
    }

    /// Checks that `expiry` lies within this server's lifetime bounds, counted from `tip`.
    ///
    /// # Errors
    ///
    /// [`ExpiryOutOfBounds`] with the acceptable range.
    pub fn check_expiry(&self, expiry: LockTime, tip: ChainTip) -> Result<(), ExpiryOutOfBounds> {
        let bounds = self.lifetime(expiry);
        let (now, value) = match expiry {
            LockTime::Blocks(h) => (tip.height, h.to_consensus_u32()),
            LockTime::Seconds(t) => (tip.median_time_past, t.to_consensus_u32()),
        };
        let earliest = now.saturating_add(bounds.min);
        let latest = now.saturating_add(bounds.max);
        if (earliest..=latest).contains(&value) {
            Ok(())
        } else {
            Err(ExpiryOutOfBounds { expiry, earliest, latest })
        }
    }

    /// Agrees on a channel: checks the client's request against these terms and returns the
    /// parameters both sides will sign against.
    ///
    /// `server_key` is the fresh key the server derived for this channel; `server_script` is
    /// where the server's payments go.
    ///
    /// # Errors
    ///
    /// [`OpenError`] naming the violated term.
    #[allow(clippy::too_many_arguments)]
    pub fn agree(
        &self,
        client_key: CompressedPublicKey,
        server_key: CompressedPublicKey,
        value: Amount,
        expiry: LockTime,
        client_script: ScriptBuf,
        server_script: ScriptBuf,
        tip: ChainTip,
    ) -> Result<ChannelParams, OpenError> {
        if client_key == server_key {
            return Err(OpenError::SameKeys);
        }
        if value < self.min_value || value > self.max_value {
            return Err(OpenError::ValueOutOfBounds {
                value,
                min: self.min_value,
                max: self.max_value,
            });
        }
        self.check_expiry(expiry, tip).map_err(OpenError::Expiry)?;
        if !is_standard_payout(&client_script) {
            return Err(OpenError::NonStandardClientScript);
        }
        if !is_standard_payout(&server_script) {
            return Err(OpenError::NonStandardServerScript);
        }
        let params = ChannelParams {
            client_key,
            server_key,
            value,
            expiry,
            client_script,
            server_script,
            min_fee_rate: self.min_fee_rate,
            max_fee_rate: self.max_fee_rate,
            close_margin: self.lifetime(expiry).close_margin,
        };
        // The first payment must be able to pay the server a non-dust amount plus the fee.
        let floor = params.min_server_amount().checked_add(params.payment_fee(false));
        if floor.is_none_or(|floor| floor > value) {
            return Err(OpenError::ValueOutOfBounds {
                value,
                min: self.min_value,
                max: self.max_value,
            });
        }
        Ok(params)
    }
}

/// Returns whether `script` is an output type this crate pays to: P2PKH, P2SH, P2WPKH, P2WSH or
/// P2TR (all standard for Bitcoin Core).
pub fn is_standard_payout(script: &ScriptBuf) -> bool {
    script.is_p2pkh()
        || script.is_p2sh()
        || script.is_p2wpkh()
        || script.is_p2wsh()
        || script.is_p2tr()
}

/// Everything both sides agreed on when the channel was opened.
///
/// Holds public data only (keys, amounts, scripts); it is what a store persists about a
/// channel besides its payments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelParams {
    /// The client's key K1.
    pub client_key: CompressedPublicKey,
    /// The server's key K2, fresh for this channel.
    pub server_key: CompressedPublicKey,
    /// The funding output's value: the channel's capacity.
    #[serde(with = "bitcoin::amount::serde::as_sat")]
    pub value: Amount,
    /// The refund's lock time.
    pub expiry: LockTime,
    /// Where the refund and the client's change go.
    pub client_script: ScriptBuf,
    /// Where the server's payment goes.
    pub server_script: ScriptBuf,
    /// Lowest fee rate of refund and payment transactions, at their co-signed size.
    pub min_fee_rate: FeeRate,
    /// Highest fee rate of refund and payment transactions, at their co-signed size.
    pub max_fee_rate: FeeRate,
    /// How long before `expiry` payments stop, in `expiry`'s unit (blocks or seconds).
    pub close_margin: u32,
}

impl ChannelParams {
    /// Returns the two keys in the funding script's order: lexicographic by their compressed
    /// serialisation (as BOLT 3).
    pub fn sorted_keys(&self) -> [CompressedPublicKey; 2] {
        if self.client_key.to_bytes() <= self.server_key.to_bytes() {
            [self.client_key, self.server_key]
        } else {
            [self.server_key, self.client_key]
        }
    }

    /// Returns the 2-of-2 witness script `OP_2 <Ka> <Kb> OP_2 OP_CHECKMULTISIG`, the keys in
    /// [`sorted_keys`](Self::sorted_keys)' order.
    pub fn witness_script(&self) -> ScriptBuf {
        // Each key serialized once, the script written into one allocation of its final size:
        // the BIP-0143 sighash of every new payment builds it (issue #28).
        let (client, server) = (self.client_key.to_bytes(), self.server_key.to_bytes());
        let (a, b) = if client <= server { (client, server) } else { (server, client) };
        let mut script = Vec::with_capacity(WITNESS_SCRIPT_LEN);
        script.push(OP_PUSHNUM_2.to_u8());
        for key in [a, b] {
            script.push(OP_PUSHBYTES_33.to_u8());
            script.extend_from_slice(&key);
        }
        script.extend_from_slice(&[OP_PUSHNUM_2.to_u8(), OP_CHECKMULTISIG.to_u8()]);
        ScriptBuf::from_bytes(script)
    }

    /// Returns the funding output's script: P2WSH of [`witness_script`](Self::witness_script).
    pub fn funding_script_pubkey(&self) -> ScriptBuf {
        ScriptBuf::new_p2wsh(&self.witness_script().wscript_hash())
    }

    /// Returns the funding address on `network`.
    pub fn funding_address(&self, network: Network) -> Address {
        Address::p2wsh(&self.witness_script(), network)
    }

    /// Returns the smallest payment the server output may carry (its dust threshold).
    pub fn min_server_amount(&self) -> Amount {
        self.server_script.minimal_non_dust()
    }

    /// Returns the smallest change output the client may keep (its dust threshold).
    pub fn min_change(&self) -> Amount {
        self.client_script.minimal_non_dust()
    }

    /// Returns the minimum fee of a payment transaction, with or without a change output, at
    /// its co-signed size and [`min_fee_rate`](Self::min_fee_rate).
    pub fn payment_fee(&self, with_change: bool) -> Amount {
        let mut outputs = vec![self.server_script.len()];
        if with_change {
            outputs.push(self.client_script.len());
        }
        fee_at(self.min_fee_rate, funding_spend_weight(&outputs))
    }

    /// Returns the minimum fee of the refund transaction at its co-signed size.
    pub fn refund_fee(&self) -> Amount {
        fee_at(self.min_fee_rate, funding_spend_weight(&[self.client_script.len()]))
    }

    /// Returns the most the server can ever be paid in this channel: everything but the fee
    /// of a payment without change.
    pub fn max_server_amount(&self) -> Amount {
        self.value.checked_sub(self.payment_fee(false)).unwrap_or(Amount::ZERO)
    }

    /// Returns whether the refund can be mined in the block after `tip`.
    pub fn refund_is_valid(&self, tip: ChainTip) -> bool {
        match self.expiry {
            LockTime::Blocks(h) => tip.height >= h.to_consensus_u32(),
            LockTime::Seconds(t) => tip.median_time_past > t.to_consensus_u32(),
        }
    }

    /// Returns whether `tip` is inside the close margin: payments are no longer accepted and
    /// the server should close.
    pub fn is_closing(&self, tip: ChainTip) -> bool {
        match self.expiry {
            LockTime::Blocks(h) => {
                tip.height.saturating_add(self.close_margin) >= h.to_consensus_u32()
            }
            LockTime::Seconds(t) => {
                tip.median_time_past.saturating_add(self.close_margin) >= t.to_consensus_u32()
            }
        }
    }

    /// Returns the funded channel at `outpoint`.
    pub fn at(self, outpoint: OutPoint) -> super::Channel {
        super::Channel::new(self, outpoint)
    }
}

/// The co-signed weight of a transaction spending the funding output to outputs whose script
/// lengths are given (all scripts here are shorter than 253 bytes).
pub(crate) fn funding_spend_weight(output_script_lens: &[usize]) -> Weight {
    // version 4 + input count 1 + input (36 outpoint + 1 empty script_sig + 4 sequence)
    // + output count 1 + outputs (8 value + 1 length + script) + lock time 4
    let outputs: usize = output_script_lens.iter().map(|len| 9 + len).sum();
    let base = 4 + 1 + 41 + 1 + outputs + 4;
    Weight::from_wu(base as u64 * 4 + FUNDING_SPEND_WITNESS_WEIGHT)
}

/// The fee at `rate` for `weight`, rounded up to whole virtual bytes as Bitcoin Core does.
pub(crate) fn fee_at(rate: FeeRate, weight: Weight) -> Amount {
    let vbytes = weight.to_wu().div_ceil(4);
    rate.fee_vb(vbytes).unwrap_or(Amount::MAX)
}

/// Agreed terms for tests: keys from the secret bytes `client` and `server`, 0.01 BTC, a
/// lock time of height 801 000 at a tip of 800 000.
#[cfg(test)]
pub(crate) fn test_params(client: u8, server: u8) -> ChannelParams {
    use bitcoin::secp256k1::{Secp256k1, SecretKey};
    let secp = Secp256k1::new();
    let key =
        |byte| CompressedPublicKey(SecretKey::from_slice(&[byte; 32]).unwrap().public_key(&secp));
    let script = |byte| ScriptBuf::new_p2wpkh(&key(byte).wpubkey_hash());
    let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
    let lock = LockTime::from_height(801_000).unwrap();
    let value = Amount::from_sat(1_000_000);
    Terms::default()
        .agree(key(client), key(server), value, lock, script(client), script(server), tip)
        .unwrap()
}

#[cfg(test)]
mod tests {
    use bitcoin::script::Builder;

    use super::*;

    /// The script written by hand is the one `Builder` writes, in both key orders.
    #[test]
    fn the_witness_script_is_the_sorted_2_of_2() {
        for (client, server) in [(1, 2), (2, 1)] {
            let params = test_params(client, server);
            let [a, b] = params.sorted_keys();
            assert!(a.to_bytes() < b.to_bytes());
            let built = Builder::new()
                .push_opcode(OP_PUSHNUM_2)
                .push_slice(a.to_bytes())
                .push_slice(b.to_bytes())
                .push_opcode(OP_PUSHNUM_2)
                .push_opcode(OP_CHECKMULTISIG)
                .into_script();
            assert_eq!(params.witness_script(), built);
            assert_eq!(params.witness_script().len(), WITNESS_SCRIPT_LEN);
        }
    }
}
