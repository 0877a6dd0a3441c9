//! The benches' channel: client key `01…01`, server key `02…02`, default terms, at height
//! 800 000 with a refund at 801 000.
#![allow(dead_code)]

use bitcoin::absolute::LockTime;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, ScriptBuf};
use paychan::channel::{ChainTip, ChannelParams, Terms};

/// The client's key K1 (it signs the payments).
pub(crate) fn client_key() -> SecretKey {
    SecretKey::from_slice(&[1; 32]).unwrap()
}

/// The server's key K2.
pub(crate) fn server_key() -> SecretKey {
    SecretKey::from_slice(&[2; 32]).unwrap()
}

/// The chain tip the channel was agreed at.
pub(crate) const TIP: ChainTip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };

/// The parameters of a channel of `value` between K1 and K2.
pub(crate) fn params(value: Amount) -> ChannelParams {
    let secp = Secp256k1::new();
    let (k1, k2) = (client_key(), server_key());
    let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
    let script = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
    let expiry = LockTime::from_height(801_000).unwrap();
    Terms::default().agree(pk(&k1), pk(&k2), value, expiry, script(&k1), script(&k2), TIP).unwrap()
}
