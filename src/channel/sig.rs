//! Signature encoding rules: strict DER (BIP-0066), low-S and the sighash byte.
//!
//! Bitcoin Core's consensus library checks DER strictness but not low-S (a relay *policy* rule,
//! `SCRIPT_VERIFY_LOW_S`), and reports every failure as the same opaque error. These checks run
//! first so that a bad signature gets a precise reason.

use core::fmt;

use bitcoin::ecdsa;
use bitcoin::secp256k1::{self, Message, Secp256k1, SecretKey, Verification};
use bitcoin::sighash::EcdsaSighashType;

/// Why a signature (DER bytes followed by one sighash byte) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The bytes are not a strict DER signature as BIP-0066 defines it.
    NotStrictDer,
    /// The signature's S value is in the upper half of the curve order (non-standard).
    HighS,
    /// The sighash byte is not `SIGHASH_ALL` (`0x01`).
    NotSighashAll {
        /// The sighash byte that was found.
        found: u8,
    },
    /// The signature does not verify for the expected key and message.
    Invalid,
}

impl SignatureError {
    /// The stable, machine-readable name of this failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotStrictDer => "signature-not-strict-der",
            Self::HighS => "signature-high-s",
            Self::NotSighashAll { .. } => "signature-not-sighash-all",
            Self::Invalid => "signature-invalid",
        }
    }
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotStrictDer => f.write_str("signature is not strict DER (BIP-0066)"),
            Self::HighS => f.write_str("signature has a high S value (must be low-S)"),
            Self::NotSighashAll { found } => {
                write!(f, "sighash type {found:#04x} is not SIGHASH_ALL (0x01)")
            }
            Self::Invalid => f.write_str("signature does not verify"),
        }
    }
}

impl std::error::Error for SignatureError {}

/// Returns whether `sig` (DER plus sighash byte) passes Bitcoin Core's
/// `IsValidSignatureEncoding` (BIP-0066).
///
/// # Examples
///
/// ```
/// use paychan::channel::sig::is_strict_der;
///
/// // A DER signature with one-byte R and S, followed by SIGHASH_ALL.
/// assert!(is_strict_der(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x01]));
/// // R with a superfluous leading zero byte.
/// assert!(!is_strict_der(&[0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01, 0x01]));
/// ```
pub fn is_strict_der(sig: &[u8]) -> bool {
    // Format: 0x30 [total-length] 0x02 [R-length] [R] 0x02 [S-length] [S] [sighash]
    let len = sig.len();
    if !(9..=73).contains(&len) {
        return false;
    }
    if sig[0] != 0x30 || sig[1] as usize != len - 3 {
        return false;
    }
    let len_r = sig[3] as usize;
    if 5 + len_r >= len {
        return false;
    }
    let len_s = sig[5 + len_r] as usize;
    if len_r + len_s + 7 != len {
        return false;
    }
    if sig[2] != 0x02 || len_r == 0 || sig[4] & 0x80 != 0 {
        return false;
    }
    if len_r > 1 && sig[4] == 0x00 && sig[5] & 0x80 == 0 {
        return false;
    }
    if sig[len_r + 4] != 0x02 || len_s == 0 || sig[len_r + 6] & 0x80 != 0 {
        return false;
    }
    if len_s > 1 && sig[len_r + 6] == 0x00 && sig[len_r + 7] & 0x80 == 0 {
        return false;
    }
    true
}

/// Parses a witness signature, enforcing strict DER, low-S and a defined sighash type.
///
/// This is the encoding half of Bitcoin Core's standard script flags (`DERSIG`, `STRICTENC`,
/// `LOW_S`). Whether the sighash type is acceptable for a given protocol message is the
/// caller's decision; see [`parse_sighash_all`].
///
/// # Errors
///
/// [`SignatureError::NotStrictDer`] or [`SignatureError::HighS`]; an undefined sighash byte is
/// reported as [`SignatureError::NotSighashAll`].
pub fn parse_standard(sig: &[u8]) -> Result<ecdsa::Signature, SignatureError> {
    if !is_strict_der(sig) {
        return Err(SignatureError::NotStrictDer);
    }
    let (hash_byte, der) = sig.split_last().expect("strict DER is at least 9 bytes");
    let sighash_type = EcdsaSighashType::from_standard(u32::from(*hash_byte))
        .map_err(|_| SignatureError::NotSighashAll { found: *hash_byte })?;
    let signature =
        secp256k1::ecdsa::Signature::from_der(der).map_err(|_| SignatureError::NotStrictDer)?;
    let mut normalized = signature;
    normalized.normalize_s();
    if normalized != signature {
        return Err(SignatureError::HighS);
    }
    Ok(ecdsa::Signature { signature, sighash_type })
}

/// Parses a witness signature that must be standard (see [`parse_standard`]) and exactly
/// `SIGHASH_ALL`.
///
/// # Examples
///
/// ```
/// use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
/// use bitcoin::sighash::EcdsaSighashType;
/// use paychan::channel::sig::{SignatureError, parse_sighash_all};
///
/// let secp = Secp256k1::new();
/// let key = SecretKey::from_slice(&[1; 32])?;
/// let signature = secp.sign_ecdsa(&Message::from_digest([7; 32]), &key);
/// let mut bytes = signature.serialize_der().to_vec();
/// bytes.push(EcdsaSighashType::All as u8);
/// assert!(parse_sighash_all(&bytes).is_ok());
/// *bytes.last_mut().unwrap() = EcdsaSighashType::Single as u8;
/// assert_eq!(parse_sighash_all(&bytes), Err(SignatureError::NotSighashAll { found: 0x03 }));
/// # Ok::<(), bitcoin::secp256k1::Error>(())
/// ```
///
/// # Errors
///
/// Any [`SignatureError`] but [`SignatureError::Invalid`].
pub fn parse_sighash_all(sig: &[u8]) -> Result<ecdsa::Signature, SignatureError> {
    let parsed = parse_standard(sig)?;
    if parsed.sighash_type != EcdsaSighashType::All {
        return Err(SignatureError::NotSighashAll { found: parsed.sighash_type as u8 });
    }
    Ok(parsed)
}

/// Signs `msg` with `key` as a low-S, `SIGHASH_ALL` signature.
pub(crate) fn sign_all<C: secp256k1::Signing>(
    secp: &Secp256k1<C>,
    msg: &Message,
    key: &SecretKey,
) -> ecdsa::Signature {
    // libsecp256k1 always produces low-S signatures.
    ecdsa::Signature { signature: secp.sign_ecdsa(msg, key), sighash_type: EcdsaSighashType::All }
}

/// Verifies `sig` over `msg` for `key`.
pub(crate) fn verify<C: Verification>(
    secp: &Secp256k1<C>,
    msg: &Message,
    sig: &ecdsa::Signature,
    key: &bitcoin::CompressedPublicKey,
) -> Result<(), SignatureError> {
    secp.verify_ecdsa(msg, &sig.signature, &key.0).map_err(|_| SignatureError::Invalid)
}

/// The witness of a P2WPKH input of `tx` spending `prevout` with `key` (BIP-0143,
/// `SIGHASH_ALL`, low-S).
pub(crate) fn p2wpkh_witness(
    tx: &bitcoin::Transaction,
    input: usize,
    prevout: &bitcoin::TxOut,
    key: &SecretKey,
) -> Result<bitcoin::Witness, bitcoin::sighash::P2wpkhError> {
    let secp = super::secp();
    let sighash = bitcoin::sighash::SighashCache::new(tx).p2wpkh_signature_hash(
        input,
        &prevout.script_pubkey,
        prevout.value,
        EcdsaSighashType::All,
    )?;
    let signature = ecdsa::Signature::sighash_all(secp.sign_ecdsa(&Message::from(sighash), key));
    Ok(bitcoin::Witness::p2wpkh(&signature, &key.public_key(secp)))
}

#[cfg(test)]
pub(crate) mod tests {
    use bitcoin::hashes::Hash;

    use super::*;

    fn fixture() -> Vec<u8> {
        let secp = Secp256k1::new();
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let msg = Message::from_digest(bitcoin::hashes::sha256::Hash::hash(b"m").to_byte_array());
        sign_all(&secp, &msg, &key).to_vec()
    }

    #[test]
    fn accepts_a_fresh_signature() {
        let sig = fixture();
        assert!(is_strict_der(&sig));
        assert_eq!(parse_sighash_all(&sig).unwrap().sighash_type, EcdsaSighashType::All);
    }

    #[test]
    fn rejects_each_der_violation() {
        let sig = fixture();
        let mut bad_len = sig.clone();
        bad_len[1] += 1;
        let mut neg_r = sig.clone();
        neg_r[4] |= 0x80;
        let mut wrong_tag = sig.clone();
        wrong_tag[0] = 0x31;
        let mut padded = sig.clone();
        // Insert a superfluous leading zero in R.
        padded.insert(4, 0);
        padded[3] += 1;
        padded[1] += 1;
        for bad in [bad_len, neg_r, wrong_tag, padded, vec![], sig[..8].to_vec()] {
            assert_eq!(parse_sighash_all(&bad), Err(SignatureError::NotStrictDer), "{bad:x?}");
        }
    }

    /// Returns `sig` with S replaced by n − S: its high-S twin, equally valid mathematically.
    pub(crate) fn high_s_twin(sig: &secp256k1::ecdsa::Signature) -> secp256k1::ecdsa::Signature {
        let mut compact = sig.serialize_compact();
        let order = secp256k1::constants::CURVE_ORDER;
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let d = i16::from(order[i]) - i16::from(compact[32 + i]) - borrow;
            borrow = i16::from(d < 0);
            compact[32 + i] = (d + 256 * borrow) as u8;
        }
        secp256k1::ecdsa::Signature::from_compact(&compact).expect("n - s is in range")
    }

    #[test]
    fn rejects_high_s() {
        let parsed = parse_standard(&fixture()).unwrap();
        let mut bytes = high_s_twin(&parsed.signature).serialize_der().to_vec();
        bytes.push(0x01);
        assert_eq!(parse_sighash_all(&bytes), Err(SignatureError::HighS));
    }

    #[test]
    fn rejects_other_sighash_types() {
        let mut sig = fixture();
        for byte in [0x02, 0x03, 0x81, 0x83] {
            *sig.last_mut().unwrap() = byte;
            assert_eq!(parse_sighash_all(&sig), Err(SignatureError::NotSighashAll { found: byte }));
        }
        *sig.last_mut().unwrap() = 0x04;
        assert_eq!(parse_standard(&sig), Err(SignatureError::NotSighashAll { found: 0x04 }));
    }
}
