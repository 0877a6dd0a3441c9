//! `paychan doctor`: every start-up check of `paychan serve`, each printed with its verdict
//! and reason, so an operator sees all that is wrong at once instead of one refusal at a time.

use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use paychan::channel::ChannelState;
use paychan::store::ChannelStore;

use crate::chain::Chain;
use crate::config::Config;
use crate::serve::{self, Cpfp};
use crate::{Error, keys, with_store};

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// Serves, but something the operator should know (CPFP off).
    Warn,
    /// `serve` refuses to start.
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        })
    }
}

/// The checks printed so far, and whether one failed.
#[derive(Debug, Default)]
struct Checks {
    failed: bool,
}

impl Checks {
    fn print(&mut self, verdict: Verdict, check: &str, reason: impl fmt::Display) {
        self.failed |= verdict == Verdict::Fail;
        println!("{verdict:<4}  {check:<14}  {reason}");
    }

    /// `Ok` or `Fail` from `result`, printed.
    fn result<T>(&mut self, check: &str, result: Result<T, Error>, ok: impl FnOnce(T) -> String) {
        match result {
            Ok(value) => self.print(Verdict::Ok, check, ok(value)),
            Err(error) => self.print(Verdict::Fail, check, error),
        }
    }
}

/// Runs every check of the config at `path`; exit code 1 if any fails (0 with warnings).
pub(crate) async fn doctor(path: &Path) -> ExitCode {
    let mut checks = Checks::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            checks.print(Verdict::Fail, "config", error);
            return ExitCode::from(1);
        }
    };
    checks.print(
        Verdict::Ok,
        "config",
        format!("{} (network = \"{}\")", path.display(), config.network),
    );
    run(&config, &mut checks).await;
    if checks.failed {
        println!("paychan serve would refuse to start: fix each FAIL above");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// A warning when the secret file at `path` is readable by group or others (`serve` refuses it
/// on mainnet, where reading it fails instead).
fn private(checks: &mut Checks, check: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode());
    if mode.is_ok_and(|mode| mode & 0o077 != 0) {
        let reason =
            format!("{} is readable by others (chmod 600 it; refused on mainnet)", path.display());
        checks.print(Verdict::Warn, check, reason);
    }
}

async fn run(config: &Config, checks: &mut Checks) {
    let network = config.network;
    // Parsing the config already required the payout address to be for `network`.
    checks.print(
        Verdict::Ok,
        "payout_address",
        format!("{} is a {network} address", config.payout_address),
    );
    let master = keys::read(&config.key_file, network);
    checks.result("key_file", master, |_| {
        format!("{}: a master key for {network}", config.key_file.display())
    });
    private(checks, "key_file", &config.key_file);
    match serve::cpfp(config) {
        Ok(Cpfp::On(_, reason)) => checks.print(Verdict::Ok, "bump_key_file", reason),
        Ok(Cpfp::Off(reason)) => checks.print(Verdict::Warn, "bump_key_file", reason),
        Err(error) => checks.print(Verdict::Fail, "bump_key_file", error),
    }
    if let Some(bump) = &config.bump_key_file {
        private(checks, "bump_key_file", bump);
    }
    match Chain::new(&config.chain) {
        Ok(chain) => {
            checks.result("chain network", serve::check_network(&chain, config).await, |ok| ok);
            checks.result("relay fee", serve::check_relay_fee(&chain, config).await, |ok| ok);
        }
        Err(error) => checks.print(Verdict::Fail, "chain", format!("[chain]: {error}")),
    }
    let store = async {
        with_store!(&config.store_url, store => {
            let open = store.list(ChannelState::Open).await?.len();
            Ok::<_, Error>(open)
        })
    };
    checks.result("store", store.await, |open| {
        format!(
            "{} is reachable and migrated ({open} open channels)",
            crate::redact(&config.store_url)
        )
    });
    if let Some(events) = &config.events {
        events_check(config, events, checks);
    }
}

/// `[events]`: the log reads back (a line cut by a crash is fine: `serve` removes it), the
/// webhook's secret is readable.
fn events_check(config: &Config, events: &crate::config::Events, checks: &mut Checks) {
    let log = &events.settings.log_file;
    checks.result("events", crate::events::read(log), |(events, _)| {
        format!("{}: {} events", log.display(), events.len())
    });
    if let Some((url, secret)) = &events.webhook {
        let read = keys::read_secret(secret, config.network);
        let url = crate::webhook::shown(url);
        checks.result("webhook", read, |_| format!("{url}, signed with {}", secret.display()));
        private(checks, "webhook", secret);
    }
}
