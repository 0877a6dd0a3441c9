//! Key files: one BIP-0032 extended private key in Base58 (`xprv…`/`tprv…`), mode 0600, never
//! logged.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use paychan::bitcoin::bip32::Xpriv;
use paychan::bitcoin::{Network, NetworkKind};

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

/// Reads the admin token at `path`.
pub(crate) fn read_token(path: &Path) -> Result<String, Error> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("admin token {}: {e}", path.display()))?;
    let token = token.trim().to_owned();
    if token.len() < 16 {
        return Err(format!("admin token {}: shorter than 16 characters", path.display()).into());
    }
    Ok(token)
}

/// Reads the key at `path`, for `network`. A key file others can read is refused on mainnet
/// and warned about elsewhere.
pub(crate) fn read(path: &Path, network: Network) -> Result<Xpriv, Error> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        let message = format!("key file {} is readable by others (chmod 600 it)", path.display());
        if network == Network::Bitcoin {
            return Err(message.into());
        }
        tracing::warn!("{message}");
    }
    let text = std::fs::read_to_string(path)?;
    let key: Xpriv = text
        .trim()
        .parse()
        .map_err(|_| format!("key file {}: not a BIP-0032 extended private key", path.display()))?;
    if key.network != NetworkKind::from(network) {
        return Err(format!("key file {}: a key for another network", path.display()).into());
    }
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
        assert!(read(&path, Network::Bitcoin).is_err(), "another network");

        let main = dir.join("main.key");
        let _ = std::fs::remove_file(&main);
        create(&main, Network::Bitcoin).unwrap();
        std::fs::set_permissions(&main, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = read(&main, Network::Bitcoin).unwrap_err();
        assert!(refused.to_string().contains("readable by others"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
