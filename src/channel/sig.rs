//! Signature encoding rules: strict DER (BIP-0066), low-S and the sighash byte.
//!
//! Bitcoin Core's consensus library checks DER strictness but not low-S (a relay *policy* rule,
//! `SCRIPT_VERIFY_LOW_S`), and reports every failure as the same opaque error. These checks run
//! first so that a bad signature gets a precise reason.

use core::fmt;

use bitcoin::ecdsa;
use bitcoin::secp256k1::{self, Message, SecretKey};
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
pub(crate) fn is_strict_der(sig: &[u8]) -> bool {
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
pub(crate) fn parse_standard(sig: &[u8]) -> Result<ecdsa::Signature, SignatureError> {
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
/// # Errors
///
/// Any [`SignatureError`] but [`SignatureError::Invalid`].
pub(crate) fn parse_sighash_all(sig: &[u8]) -> Result<ecdsa::Signature, SignatureError> {
    let parsed = parse_standard(sig)?;
    if parsed.sighash_type != EcdsaSighashType::All {
        return Err(SignatureError::NotSighashAll { found: parsed.sighash_type as u8 });
    }
    Ok(parsed)
}

/// The public key of `key`: the one place the crate computes one from a secret key, so that
/// the `k256` feature moves it off libsecp256k1's precomputed table with signing.
///
/// # Examples
///
/// ```
/// use bitcoin::secp256k1::{Secp256k1, SecretKey};
/// use paychan::channel::sig::public_key;
///
/// let key = SecretKey::from_slice(&[1; 32])?;
/// assert_eq!(public_key(&key).0, key.public_key(&Secp256k1::new()));
/// # Ok::<(), bitcoin::secp256k1::Error>(())
/// ```
pub fn public_key(key: &SecretKey) -> bitcoin::CompressedPublicKey {
    #[cfg(feature = "k256")]
    let public = small::public_key(key);
    #[cfg(not(feature = "k256"))]
    let public = key.public_key(super::secp());
    bitcoin::CompressedPublicKey(public)
}

/// The ECDSA signature of `msg` by `key`: RFC 6979 nonce, low S. libsecp256k1's, or with the
/// `k256` feature RustCrypto's `k256`, which signs the same bytes (tested below) without
/// libsecp256k1's 32 KB precomputed signing table, the largest single item of the browser's
/// wasm.
pub(crate) fn sign_ecdsa(msg: &Message, key: &SecretKey) -> secp256k1::ecdsa::Signature {
    #[cfg(feature = "k256")]
    return small::sign(msg, key);
    #[cfg(not(feature = "k256"))]
    super::secp().sign_ecdsa(msg, key)
}

/// Whether `signature` is a valid, low-S ECDSA signature of `msg` by `key` (both libsecp256k1
/// and `k256` refuse a high S).
pub(crate) fn verify_ecdsa(
    msg: &Message,
    signature: &secp256k1::ecdsa::Signature,
    key: &secp256k1::PublicKey,
) -> bool {
    #[cfg(feature = "k256")]
    return small::verify(msg, signature, key);
    #[cfg(not(feature = "k256"))]
    super::secp().verify_ecdsa(msg, signature, key).is_ok()
}

/// Signs `msg` with `key` as a low-S, `SIGHASH_ALL` signature.
pub(crate) fn sign_all(msg: &Message, key: &SecretKey) -> ecdsa::Signature {
    ecdsa::Signature { signature: sign_ecdsa(msg, key), sighash_type: EcdsaSighashType::All }
}

/// Verifies `sig` over `msg` for `key`.
pub(crate) fn verify(
    msg: &Message,
    sig: &ecdsa::Signature,
    key: &bitcoin::CompressedPublicKey,
) -> Result<(), SignatureError> {
    if verify_ecdsa(msg, &sig.signature, &key.0) { Ok(()) } else { Err(SignatureError::Invalid) }
}

/// Signing with RustCrypto's `k256` (feature `k256`; compiled for the tests either way).
#[cfg(any(feature = "k256", test))]
mod small {
    use bitcoin::secp256k1::{self, Message, PublicKey, SecretKey};
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};

    fn signing_key(key: &SecretKey) -> SigningKey {
        SigningKey::from_slice(&key.secret_bytes()).expect("a SecretKey is a valid scalar")
    }

    pub(super) fn public_key(key: &SecretKey) -> PublicKey {
        let point = signing_key(key).verifying_key().to_encoded_point(true);
        PublicKey::from_slice(point.as_bytes()).expect("k256 encodes a valid point")
    }

    pub(super) fn verify(
        msg: &Message,
        signature: &secp256k1::ecdsa::Signature,
        key: &PublicKey,
    ) -> bool {
        let Ok(key) = k256::ecdsa::VerifyingKey::from_sec1_bytes(&key.serialize()) else {
            return false;
        };
        let Ok(signature) = k256::ecdsa::Signature::from_slice(&signature.serialize_compact())
        else {
            return false;
        };
        key.verify_prehash(msg.as_ref(), &signature).is_ok()
    }

    pub(super) fn sign(msg: &Message, key: &SecretKey) -> secp256k1::ecdsa::Signature {
        let signature: k256::ecdsa::Signature =
            signing_key(key).sign_prehash(msg.as_ref()).expect("a 32-byte digest always signs");
        let signature = signature.normalize_s().unwrap_or(signature);
        secp256k1::ecdsa::Signature::from_compact(&signature.to_bytes())
            .expect("k256 signs with 0 < r, s < n")
    }
}

/// The witness of a P2WPKH input of `tx` spending `prevout` with `key` (BIP-0143,
/// `SIGHASH_ALL`, low-S).
pub(crate) fn p2wpkh_witness(
    tx: &bitcoin::Transaction,
    input: usize,
    prevout: &bitcoin::TxOut,
    key: &SecretKey,
) -> Result<bitcoin::Witness, bitcoin::sighash::P2wpkhError> {
    let sighash = bitcoin::sighash::SighashCache::new(tx).p2wpkh_signature_hash(
        input,
        &prevout.script_pubkey,
        prevout.value,
        EcdsaSighashType::All,
    )?;
    let signature = sign_all(&Message::from(sighash), key);
    Ok(bitcoin::Witness::p2wpkh(&signature, &public_key(key).0))
}

#[cfg(test)]
pub(crate) mod tests {
    use bitcoin::hashes::Hash;

    use bitcoin::secp256k1::Secp256k1;

    use super::*;

    #[test]
    fn strict_der_is_bitcoin_cores_encoding_rule() {
        // A DER signature with one-byte R and S, followed by SIGHASH_ALL.
        assert!(is_strict_der(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x01]));
        // R with a superfluous leading zero byte.
        assert!(!is_strict_der(&[0x30, 0x07, 0x02, 0x02, 0x00, 0x01, 0x02, 0x01, 0x01, 0x01]));
    }

    #[test]
    fn only_sighash_all_is_accepted() {
        use bitcoin::sighash::EcdsaSighashType;
        let key = SecretKey::from_slice(&[1; 32]).unwrap();
        let signature = sign_ecdsa(&Message::from_digest([7; 32]), &key);
        let mut bytes = signature.serialize_der().to_vec();
        bytes.push(EcdsaSighashType::All as u8);
        assert!(parse_sighash_all(&bytes).is_ok());
        *bytes.last_mut().unwrap() = EcdsaSighashType::Single as u8;
        assert_eq!(parse_sighash_all(&bytes), Err(SignatureError::NotSighashAll { found: 0x03 }));
    }

    fn fixture() -> Vec<u8> {
        let key = SecretKey::from_slice(&[7; 32]).unwrap();
        let msg = Message::from_digest(bitcoin::hashes::sha256::Hash::hash(b"m").to_byte_array());
        sign_all(&msg, &key).to_vec()
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

    /// The `k256` signer signs exactly what libsecp256k1 signs and derives the same keys, so the
    /// browser's payments are the native client's byte for byte (`web/tests` checks the test
    /// vectors too).
    #[test]
    fn k256_signs_the_bytes_libsecp256k1_signs() {
        let secp = Secp256k1::new();
        let mut seed = bitcoin::hashes::sha256::Hash::hash(b"k256 against libsecp256k1");
        for _ in 0..500 {
            seed = bitcoin::hashes::sha256::Hash::hash(seed.as_byte_array());
            let Ok(key) = SecretKey::from_slice(seed.as_byte_array()) else { continue };
            seed = bitcoin::hashes::sha256::Hash::hash(seed.as_byte_array());
            let msg = Message::from_digest(seed.to_byte_array());
            assert_eq!(small::public_key(&key), key.public_key(&secp));
            let signature = small::sign(&msg, &key);
            assert_eq!(signature, secp.sign_ecdsa(&msg, &key));
            let public = key.public_key(&secp);
            assert!(small::verify(&msg, &signature, &public));
            // What libsecp256k1 refuses, k256 refuses: another message, another key, high S.
            let other = Message::from_digest(seed.to_byte_array().map(|b| b ^ 1));
            assert!(!small::verify(&other, &signature, &public));
            assert!(secp.verify_ecdsa(&other, &signature, &public).is_err());
            let stranger = SecretKey::from_slice(&[9; 32]).unwrap().public_key(&secp);
            assert!(!small::verify(&msg, &signature, &stranger));
            let mut compact = signature.serialize_compact();
            let high = {
                let s =
                    secp256k1::Scalar::from_be_bytes(compact[32..].try_into().unwrap()).unwrap();
                let negated = SecretKey::from_slice(&s.to_be_bytes()).unwrap().negate();
                negated.secret_bytes()
            };
            compact[32..].copy_from_slice(&high);
            let high_s = secp256k1::ecdsa::Signature::from_compact(&compact).unwrap();
            assert!(secp.verify_ecdsa(&msg, &high_s, &public).is_err());
            assert!(!small::verify(&msg, &high_s, &public));
        }
        // Digests at and above the group order, and the largest key.
        let order = secp256k1::constants::CURVE_ORDER;
        let max_key = {
            let mut b = order;
            b[31] -= 1;
            SecretKey::from_slice(&b).unwrap()
        };
        for digest in [order, [0xff; 32], [0; 32], [1; 32]] {
            let msg = Message::from_digest(digest);
            for key in [max_key, SecretKey::from_slice(&[1; 32]).unwrap()] {
                let (ours, theirs) = (small::sign(&msg, &key), secp.sign_ecdsa(&msg, &key));
                if digest < order {
                    assert_eq!(ours, theirs, "{digest:?}");
                } else {
                    // A digest at or above n (a chance of 2^-128 for a sighash): RFC 6979
                    // reduces it before drawing the nonce, libsecp256k1 does not, so the two
                    // signatures differ. Each is valid for the other's verifier.
                    let public = key.public_key(&secp);
                    secp.verify_ecdsa(&msg, &ours, &public).unwrap();
                    assert!(small::verify(&msg, &theirs, &public));
                }
            }
        }
    }
}
