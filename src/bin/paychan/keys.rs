//! Key files, mode 0600, never logged: the master key (one BIP-0032 extended private key in
//! Base58, `xprv…`/`tprv…`) and the bump key (one private key in WIF, whose P2WPKH address is
//! the payout address when `init` chose it: the key that signs CPFP children).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use paychan::bitcoin::bip32::Xpriv;
use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
use paychan::bitcoin::{Address, CompressedPublicKey, Network, NetworkKind, PrivateKey};

type Error = Box<dyn std::error::Error>;

/// 32 bytes from the operating system.
fn random() -> Result<[u8; 32], Error> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut seed))
        .map_err(|e| format!("no randomness (/dev/urandom): {e}"))?;
    Ok(seed)
}

/// Writes `text` to a new file only its owner can read; never overwrites.
fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
            format!("{}: {e} (an existing file is never overwritten)", path.display())
        })?;
    writeln!(file, "{text}")?;
    file.sync_all()?;
    Ok(())
}

/// Writes a fresh master key to `path`; refuses if the file exists.
pub(crate) fn create(path: &Path, network: Network) -> Result<Xpriv, Error> {
    let key = Xpriv::new_master(network, &random()?)?;
    write_private(path, &key.to_string())?;
    Ok(key)
}

/// Writes a fresh admin token (64 hex digits) to `path`; refuses if the file exists.
pub(crate) fn create_token(path: &Path) -> Result<(), Error> {
    let token: String = random()?.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, &token)
}

/// Reads the admin token at `path` (its text, trimmed: at least 16 characters). It can close
/// every channel from the console: a file others can read is refused on mainnet and warned
/// about elsewhere, as the keys are.
pub(crate) fn read_token(path: &Path, network: Network) -> Result<String, Error> {
    Ok(String::from_utf8(read_trimmed(path, "admin token", network)?)?)
}

/// A fresh bump key for `network` (not written yet: see [`write_bump`]).
pub(crate) fn new_bump(network: Network) -> Result<PrivateKey, Error> {
    Ok(PrivateKey::new(SecretKey::from_slice(&random()?)?, network))
}

/// Writes the bump key `key` to `path` in WIF; refuses if the file exists.
pub(crate) fn write_bump(path: &Path, key: &PrivateKey) -> Result<(), Error> {
    write_private(path, &key.to_wif())
}

/// The P2WPKH address of the bump key: the payout address CPFP works with.
pub(crate) fn bump_address(key: &PrivateKey, network: Network) -> Address {
    let public = CompressedPublicKey::from_private_key(&Secp256k1::signing_only(), key)
        .expect("bump keys are compressed (checked when read)");
    Address::p2wpkh(&public, network)
}

/// Reads the bump key at `path` (WIF, compressed), for `network`, with the master key's rules
/// on permissions.
pub(crate) fn read_bump(path: &Path, network: Network) -> Result<PrivateKey, Error> {
    let text = read_private(path, "bump key file", network)?;
    let key = PrivateKey::from_wif(text.trim())
        .map_err(|_| format!("bump key file {}: not a private key in WIF", path.display()))?;
    same_network("bump key file", path, key.network, network)?;
    if !key.compressed {
        return Err(format!(
            "bump key file {}: an uncompressed key (P2WPKH needs a compressed one)",
            path.display()
        )
        .into());
    }
    Ok(key)
}

/// Which networks a key of `kind` is for.
fn kind(kind: NetworkKind) -> &'static str {
    match kind {
        NetworkKind::Main => "mainnet (bitcoin)",
        NetworkKind::Test => "test-network (testnet4, signet, regtest)",
    }
}

/// The text of a secret file (`what`: its name in messages). One that group or others can read
/// is refused on mainnet and warned about elsewhere.
fn read_private(path: &Path, what: &str, network: Network) -> Result<String, Error> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        let message = format!("{what} {} is readable by others (chmod 600 it)", path.display());
        if network == Network::Bitcoin {
            return Err(message.into());
        }
        tracing::warn!("{message}");
    }
    Ok(std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?)
}

/// Reads the webhook's signing secret at `path` (its text, trimmed: at least 16 characters).
/// A file others can read is refused on mainnet and warned about elsewhere.
pub(crate) fn read_secret(path: &Path, network: Network) -> Result<Vec<u8>, Error> {
    read_trimmed(path, "webhook secret", network)
}

/// The text of the secret `what` at `path`, trimmed, at least 16 characters, with the keys'
/// rules on permissions.
fn read_trimmed(path: &Path, what: &str, network: Network) -> Result<Vec<u8>, Error> {
    let text = read_private(path, what, network)?;
    let secret = text.trim();
    if secret.len() < 16 {
        return Err(format!("{what} {}: shorter than 16 characters", path.display()).into());
    }
    Ok(secret.as_bytes().to_vec())
}

/// `Ok` if a key of `found` (read from `what` at `path`) is for `network`, else a network
/// mismatch naming both.
fn same_network(
    what: &str,
    path: &Path,
    found: NetworkKind,
    network: Network,
) -> Result<(), Error> {
    if found == NetworkKind::from(network) {
        return Ok(());
    }
    Err(format!(
        "{what} {}: network mismatch: a {} key, but network = \"{network}\" needs {}",
        path.display(),
        kind(found),
        kind(NetworkKind::from(network))
    )
    .into())
}

/// Reads the key at `path`, for `network`. A key file others can read is refused on mainnet
/// and warned about elsewhere.
pub(crate) fn read(path: &Path, network: Network) -> Result<Xpriv, Error> {
    let text = read_private(path, "key file", network)?;
    let key: Xpriv = text
        .trim()
        .parse()
        .map_err(|_| format!("key file {}: not a BIP-0032 extended private key", path.display()))?;
    same_network("key file", path, key.network, network)?;
    Ok(key)
}

/// Reads the key at `path`, creating it first if there is none.
pub(crate) fn read_or_create(path: &Path, network: Network) -> Result<Xpriv, Error> {
    if path.exists() { read(path, network) } else { create(path, network) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_never_overwritten_and_for_one_network() {
        let dir = std::env::temp_dir().join(format!("paychan-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("master.key");
        let _ = std::fs::remove_file(&path);
        let key = create(&path, Network::Regtest).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(create(&path, Network::Regtest).is_err(), "never overwritten");
        assert_eq!(read(&path, Network::Regtest).unwrap(), key);
        let other = read(&path, Network::Bitcoin).unwrap_err().to_string();
        assert!(other.contains("network mismatch: a test-network"), "{other}");

        let main = dir.join("main.key");
        let _ = std::fs::remove_file(&main);
        create(&main, Network::Bitcoin).unwrap();
        std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read(&main, Network::Bitcoin).unwrap_err();
        assert!(refused.to_string().contains("readable by others"), "{refused}");

        let bump = dir.join("bump.key");
        let _ = std::fs::remove_file(&bump);
        let key = new_bump(Network::Regtest).unwrap();
        write_bump(&bump, &key).unwrap();
        assert_eq!(std::fs::metadata(&bump).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_bump(&bump, &key).is_err(), "never overwritten");
        assert_eq!(read_bump(&bump, Network::Regtest).unwrap(), key);
        assert!(bump_address(&key, Network::Regtest).to_string().starts_with("bcrt1q"));
        let other = read_bump(&bump, Network::Bitcoin).unwrap_err();
        assert!(other.to_string().contains("network mismatch"), "{other}");
        let master = read_bump(&path, Network::Regtest).unwrap_err();
        assert!(master.to_string().contains("not a private key in WIF"), "{master}");

        // The admin token closes channels: the keys' rules.
        let token = dir.join("admin.token");
        let _ = std::fs::remove_file(&token);
        create_token(&token).unwrap();
        assert_eq!(read_token(&token, Network::Bitcoin).unwrap().len(), 64);
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read_token(&token, Network::Bitcoin).unwrap_err();
        assert!(refused.to_string().contains("admin token"), "{refused}");
        assert!(read_token(&token, Network::Regtest).is_ok(), "a warning off mainnet");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
