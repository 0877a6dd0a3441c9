//! `paychan init`: a commented configuration and fresh key files.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{self, Config};
use crate::{ConfigPath, Error, expand_home, flag_error, keys};

/// The flags of `paychan init`.
#[derive(clap::Args, Debug)]
pub(crate) struct InitFlags {
    #[command(flatten)]
    pub(crate) config: ConfigPath,
    /// The network.
    #[arg(long, default_value = "regtest")]
    pub(crate) network: String,
    /// Where paying clients connect.
    #[arg(long, default_value = "127.0.0.1:8402")]
    pub(crate) listen: SocketAddr,
    /// The API behind the proxy.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) upstream: String,
    /// Where the proxy's earnings go. Without it, the bump key's address: then closes below
    /// the mempool minimum go out with a CPFP child (the payout is spent with the bump key,
    /// a hot key). With your own address (a cold wallet), there is no CPFP.
    #[arg(long)]
    pub(crate) payout_address: Option<String>,
    /// On mainnet, pay the earnings to the bump key's address (CPFP on; the earnings sit on
    /// a hot key until swept) when no `--payout-address` is given: the choice must be
    /// explicit there.
    #[arg(long, conflicts_with = "payout_address")]
    pub(crate) payout_to_bump_key: bool,
    /// Bitcoin Core's RPC URL.
    #[arg(long, default_value = "http://127.0.0.1:18443")]
    pub(crate) bitcoind_url: String,
    /// Bitcoin Core's cookie file.
    #[arg(long, default_value = "~/.bitcoin/regtest/.cookie")]
    pub(crate) cookie_file: PathBuf,
    /// An Esplora URL instead of Bitcoin Core.
    #[arg(long)]
    pub(crate) esplora_url: Option<String>,
    /// The channel store.
    #[arg(long, default_value = "sqlite:paychan.db")]
    pub(crate) store: String,
    /// The price of every GET request, in msat.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) price_msat: u64,
    /// The admin listener (metrics and the page).
    #[arg(long, default_value = "127.0.0.1:9402")]
    pub(crate) admin_listen: SocketAddr,
}

/// Writes the configuration `flags` describe and its key files, never over an existing one,
/// and says where the earnings go.
pub(crate) fn init(flags: InitFlags) -> Result<(), Error> {
    let InitFlags {
        config,
        network,
        listen,
        upstream,
        payout_address,
        payout_to_bump_key,
        bitcoind_url,
        cookie_file,
        esplora_url,
        store,
        price_msat,
        admin_listen,
    } = flags;
    let path = config.config;
    if path.exists() {
        return Err(format!("{} exists: never overwritten", path.display()).into());
    }
    // The bump key's address is the payout address unless the operator gave one.
    let kind = config::network(&network).map_err(flag_error)?;
    if kind == paychan::bitcoin::Network::Bitcoin && payout_address.is_none() && !payout_to_bump_key
    {
        return Err("on mainnet, say where the earnings go: --payout-address <a cold \
                address> (closes cannot be bumped by CPFP), or --payout-to-bump-key (CPFP on; \
                the earnings sit on the bump key, a hot key on this host, until you sweep \
                them)"
            .into());
    }
    let bump = keys::new_bump(kind)?;
    let bump_address = keys::bump_address(&bump, kind).to_string();
    let init = config::Init {
        network,
        listen,
        upstream,
        key_file: PathBuf::from("paychan.key"),
        bump_key_file: PathBuf::from("paychan-bump.key"),
        payout_is_bump_key: payout_address.is_none(),
        payout_address: payout_address.unwrap_or_else(|| bump_address.clone()),
        bump_address,
        bitcoind_url,
        cookie_file: expand_home(cookie_file),
        esplora_url,
        store,
        price_msat,
        admin_listen,
    };
    let text = config::template(&init);
    let base =
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let checked = Config::parse(&text, base).map_err(flag_error)?;
    keys::create(&checked.key_file, checked.network)?;
    let bump_file = checked.bump_key_file.as_ref().expect("init writes bump_key_file");
    keys::write_bump(bump_file, &bump)?;
    if let Some(admin) = &checked.admin {
        keys::create_token(&admin.token_file)?;
    }
    std::fs::write(&path, text)?;
    println!(
        "wrote {}, the master key {}, the bump key {} and the admin token {} (back up \
             both keys)",
        path.display(),
        checked.key_file.display(),
        bump_file.display(),
        checked.admin.as_ref().map_or("-".into(), |a| a.token_file.display().to_string()),
    );
    print_payout(&init, bump_file);
    Ok(())
}

/// Where the earnings go, and whether closes can be bumped by CPFP.
fn print_payout(init: &config::Init, bump_file: &std::path::Path) {
    if init.payout_is_bump_key {
        println!(
            "payout address {}: the bump key's, so closes can be bumped by CPFP; its \
                 coins are spent with {} (a hot key): sweep them to cold storage",
            init.payout_address,
            bump_file.display()
        );
    } else {
        println!(
            "payout address {}: yours, so closes cannot be bumped by CPFP (for CPFP, \
                 set payout_address = \"{}\", the bump key's address)",
            init.payout_address, init.bump_address
        );
    }
}
