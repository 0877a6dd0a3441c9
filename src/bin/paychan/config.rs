//! The proxy's TOML configuration: read, checked, and turned into the library's types. Every
//! error names the key it is about.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, Uri};
use paychan::MilliSats;
use paychan::bitcoin::{Address, Amount, FeeRate, Network, ScriptBuf};
use paychan::channel::{FundingPolicy, LifetimeBounds, Terms};
use paychan::server::{RoutePrices, Unlisted};
use paychan::store::LeaseConfig;
use serde::Deserialize;

/// A configuration error: the key and what is wrong with it, and where it is when known.
#[derive(Debug)]
pub(crate) struct ConfigError {
    pub(crate) key: String,
    pub(crate) message: String,
    /// The file the key is in.
    pub(crate) file: Option<PathBuf>,
    /// The line of the key (from 1).
    pub(crate) line: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => {
                write!(f, "{}:{line}: key `{}`: {}", file.display(), self.key, self.message)
            }
            (Some(file), None) => {
                write!(f, "{}: key `{}`: {}", file.display(), self.key, self.message)
            }
            (None, _) => write!(f, "config key `{}`: {}", self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, message: impl fmt::Display) -> ConfigError {
    ConfigError { key: key.to_owned(), message: message.to_string(), file: None, line: None }
}

/// A line's text without its comment (no `#` inside strings in what this reads: keys and
/// table headers).
fn code(line: &str) -> &str {
    line.split('#').next().unwrap_or_default().trim()
}

/// The line (from 1) where `key` (`a`, `table.a`, `table.array[n].a`, or a table) is set in
/// `text`, if it can be found.
fn locate(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |line: &str| code(line).starts_with('[');
    let (table, name) = match key.rsplit_once('.') {
        Some((table, name)) => (Some(table), name),
        None => (None, key),
    };
    let (start, end) = match table {
        // A top-level key: before the first table.
        None => (0, lines.iter().position(|l| is_header(l)).unwrap_or(lines.len())),
        Some(table) => {
            let (header, nth) = match table.strip_suffix(']').and_then(|t| t.rsplit_once('[')) {
                Some((array, n)) => (format!("[[{array}]]"), n.parse::<usize>().ok()?),
                None => (format!("[{table}]"), 0),
            };
            let start = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| code(l) == header)
                .nth(nth)
                .map(|(n, _)| n + 1)?;
            let end =
                lines[start..].iter().position(|l| is_header(l)).map_or(lines.len(), |n| start + n);
            (start, end)
        }
    };
    let set = |line: &&str| code(line).split_once('=').is_some_and(|(k, _)| k.trim() == name);
    let own_table = |line: &&str| code(line) == format!("[{key}]");
    lines[start..end]
        .iter()
        .position(set)
        .map(|n| start + n + 1)
        .or_else(|| lines.iter().position(own_table).map(|n| n + 1))
}

/// The key of a TOML error whose span starts at `offset`: the key set on that line, in the
/// table its section opens (`toml` points at the value of a wrong type, at the key of an
/// unknown one).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |n| n + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let (name, _) = code(line).split_once('=')?;
    let table = text[..line_start].lines().rev().map(code).find(|l| l.starts_with('['));
    let table = table.map(|header| header.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(table) => format!("{table}.{}", name.trim()),
        None => name.trim().to_owned(),
    })
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    network: String,
    listen: SocketAddr,
    upstream: String,
    key_file: PathBuf,
    /// The key of CPFP children; its P2WPKH must be `payout_address` for CPFP to work.
    bump_key_file: Option<PathBuf>,
    payout_address: String,
    /// Off for a proxy: an upstream's 5xx may carry data or follow side effects. Its name
    /// until 2026-12, `refund_server_errors`, is still read ("refund" is T2's word).
    #[serde(default, alias = "refund_server_errors")]
    credit_server_errors: bool,
    #[serde(default)]
    shadow: bool,
    /// How long a shutdown (SIGTERM) waits for the requests in flight.
    #[serde(default = "shutdown_secs")]
    shutdown_secs: u64,
    chain: ChainFile,
    #[serde(default)]
    store: StoreFile,
    #[serde(default)]
    prices: PricesFile,
    #[serde(default)]
    terms: TermsFile,
    #[serde(default)]
    funding: FundingFile,
    #[serde(default)]
    settlement: SettlementFile,
    #[serde(default)]
    listener: ListenerFile,
    admin: Option<AdminFile>,
    tls: Option<TlsFile>,
    events: Option<EventsFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    header_timeout_secs: Option<u64>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    #[serde(default)]
    trust_forwarded_for: bool,
}

/// The limits of the proxy's own listener (`[listener]`), on plain HTTP and TLS alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listener {
    /// A client sends its request headers within this (an idle keep-alive connection its
    /// next ones), or its connection is closed.
    pub(crate) header_timeout: Duration,
    /// The most bytes of request line and headers (431 beyond).
    pub(crate) max_header_bytes: usize,
    /// The most connections served at once; more wait in the kernel's backlog.
    pub(crate) max_connections: usize,
    /// The most of them one client (IPv4 address, IPv6 /64) holds; its next are closed at
    /// once. `None`: no share (the default behind a trusted front proxy, whose address every
    /// connection has).
    pub(crate) max_connections_per_client: Option<usize>,
    /// The peer is a front proxy that replaces `X-Forwarded-For`: append to it instead of
    /// overwriting it.
    pub(crate) trust_forwarded_for: bool,
}

impl Default for Listener {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            max_connections: 512,
            max_connections_per_client: Some(32),
            trust_forwarded_for: false,
        }
    }
}

fn listener(file: ListenerFile) -> Result<Listener, ConfigError> {
    let mut listener =
        Listener { trust_forwarded_for: file.trust_forwarded_for, ..Listener::default() };
    match file.header_timeout_secs {
        Some(0) => return Err(bad("listener.header_timeout_secs", "at least 1")),
        Some(secs) => listener.header_timeout = Duration::from_secs(secs),
        None => {}
    }
    match file.max_header_bytes {
        Some(bytes) if bytes < 1024 => {
            return Err(bad("listener.max_header_bytes", "at least 1024"));
        }
        Some(bytes) => listener.max_header_bytes = bytes,
        None => {}
    }
    match file.max_connections {
        Some(0) => return Err(bad("listener.max_connections", "at least 1")),
        Some(max) => listener.max_connections = max,
        None => {}
    }
    listener.max_connections_per_client = match file.max_connections_per_client {
        Some(0) => None,
        Some(max) => Some(max),
        // Behind a front proxy every connection is the proxy's: no share unless asked.
        None if listener.trust_forwarded_for => None,
        None => listener.max_connections_per_client.map(|max| max.min(listener.max_connections)),
    };
    Ok(listener)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    listen: SocketAddr,
    token_file: PathBuf,
    #[serde(default = "metrics_path")]
    metrics_path: String,
    /// A block explorer's page of a transaction, `{txid}` in it.
    explorer: Option<String>,
}

fn metrics_path() -> String {
    "/metrics".into()
}

/// The admin listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Admin {
    pub(crate) listen: SocketAddr,
    pub(crate) token_file: PathBuf,
    /// Where Prometheus scrapes (default `/metrics`).
    pub(crate) metrics_path: String,
    /// A block explorer's transaction page, such as `https://mempool.space/tx/{txid}`: the
    /// page links each txid there.
    pub(crate) explorer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsFile {
    log_file: PathBuf,
    interval_secs: Option<u64>,
    usage_interval_secs: Option<u64>,
    webhook_url: Option<String>,
    secret_file: Option<PathBuf>,
}

/// The billing event log and its webhook (`[events]`).
#[derive(Debug, Clone)]
pub(crate) struct Events {
    pub(crate) settings: crate::events::Settings,
    /// Where events are POSTed, and the file of the secret that signs them.
    pub(crate) webhook: Option<(Uri, PathBuf)>,
}

fn events(file: EventsFile, base: &Path) -> Result<Events, ConfigError> {
    let secs = |key: &str, secs: Option<u64>, default: u64| match secs.unwrap_or(default) {
        0 => Err(bad(key, "at least 1")),
        secs => Ok(Duration::from_secs(secs)),
    };
    let settings = crate::events::Settings {
        log_file: base.join(file.log_file),
        interval: secs("events.interval_secs", file.interval_secs, 5)?,
        usage_every: secs("events.usage_interval_secs", file.usage_interval_secs, 60)?,
    };
    let webhook = match (file.webhook_url, file.secret_file) {
        (Some(url), Some(secret)) => {
            // The URL may carry a secret: errors show it redacted.
            let shown = crate::redact(&url);
            let uri: Uri =
                url.parse().map_err(|e| bad("events.webhook_url", format!("{shown}: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(bad("events.webhook_url", format!("{shown}: expected http[s]://…")));
            }
            Some((uri, base.join(secret)))
        }
        (Some(_), None) => {
            return Err(bad("events.secret_file", "needed with webhook_url: it signs each POST"));
        }
        (None, Some(_)) => {
            return Err(bad("events.webhook_url", "secret_file without a webhook_url"));
        }
        (None, None) => None,
    };
    Ok(Events { settings, webhook })
}

fn shutdown_secs() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainFile {
    bitcoind_url: Option<String>,
    cookie_file: Option<PathBuf>,
    rpc_user: Option<String>,
    rpc_password: Option<String>,
    esplora_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    url: String,
    /// Present: the node serves debits from leases (several nodes on one shared store).
    leases: Option<LeasesFile>,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self { url: "sqlite:paychan.db".into(), leases: None }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeasesFile {
    max_msat: Option<u64>,
    horizon_ms: Option<u64>,
    idle_ms: Option<u64>,
    ttl_secs: Option<u64>,
}

fn leases(file: LeasesFile) -> LeaseConfig {
    let mut config = LeaseConfig::default();
    if let Some(max) = file.max_msat {
        config = config.with_max_lease(MilliSats::from_msat(max));
    }
    if let Some(ms) = file.horizon_ms {
        config = config.with_horizon(Duration::from_millis(ms));
    }
    if let Some(ms) = file.idle_ms {
        config = config.with_idle(Duration::from_millis(ms));
    }
    if let Some(secs) = file.ttl_secs {
        config = config.with_ttl(Duration::from_secs(secs));
    }
    config
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PricesFile {
    /// `"free"`, `"refuse"`, or a price in msat.
    unlisted: Option<toml::Value>,
    #[serde(default)]
    routes: Vec<RouteFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    method: String,
    path: String,
    price_msat: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TermsFile {
    min_value_sat: Option<u64>,
    max_value_sat: Option<u64>,
    min_lifetime_blocks: Option<u32>,
    max_lifetime_blocks: Option<u32>,
    close_margin_blocks: Option<u32>,
    min_fee_rate_sat_vb: Option<u64>,
    max_fee_rate_sat_vb: Option<u64>,
    funding_min_fee_rate_sat_vb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FundingFile {
    min_confirmations: Option<u32>,
    zero_conf_max_value_sat: Option<u64>,
    confirm_within_blocks: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettlementFile {
    interval_secs: Option<u64>,
    tip_interval_secs: Option<u64>,
}

/// Where the chain is read and written.
#[derive(Debug, Clone)]
pub(crate) enum ChainSource {
    /// Bitcoin Core's JSON-RPC.
    Bitcoind { url: String, auth: paychan::chain::bitcoind::Auth },
    /// An Esplora REST API.
    Esplora { url: String },
}

/// The checked configuration.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) network: Network,
    pub(crate) listen: SocketAddr,
    /// `scheme://authority`, no trailing slash.
    pub(crate) upstream: String,
    pub(crate) key_file: PathBuf,
    /// The bump key: signs CPFP children, which spend the server's output of a close, so it
    /// is used only when its P2WPKH is the payout script.
    pub(crate) bump_key_file: Option<PathBuf>,
    pub(crate) payout_script: ScriptBuf,
    /// `payout_address` as written (for messages).
    pub(crate) payout_address: String,
    pub(crate) credit_server_errors: bool,
    /// Serve every request unpaid, counting what it would have been charged.
    pub(crate) shadow: bool,
    /// How long a shutdown waits for the requests in flight before it closes their
    /// connections.
    pub(crate) shutdown: Duration,
    pub(crate) chain: ChainSource,
    pub(crate) store_url: String,
    /// Debits served from leases of each channel's balance (`[store.leases]`).
    pub(crate) leases: Option<LeaseConfig>,
    pub(crate) prices: RoutePrices,
    pub(crate) terms: Terms,
    pub(crate) funding: FundingPolicy,
    pub(crate) settle_every: Duration,
    pub(crate) tip_every: Duration,
    /// The admin listener (metrics and the page).
    pub(crate) admin: Option<Admin>,
    /// TLS on the proxy's own listener: the certificate chain and the key (PEM).
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
    /// The listener's limits.
    pub(crate) listener: Listener,
    /// The billing event log (`[events]`).
    pub(crate) events: Option<Events>,
}

impl Config {
    /// Reads and checks the file at `path`; relative paths in it are relative to its folder.
    pub(crate) fn load(path: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|mut error| {
            error.line = error.line.or_else(|| locate(&text, &error.key));
            error.file = Some(path.to_owned());
            error.into()
        })
    }

    /// Parses and checks a configuration text.
    pub(crate) fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| {
            // The span is the key of an unknown field, the value of a wrong type.
            let key = e.span().and_then(|span| {
                key_at(text, span.start).or_else(|| Some(text[span].trim().to_owned()))
            });
            let mut error = bad(&key.unwrap_or_default(), e.message());
            error.line = e.span().map(|span| text[..span.start].matches('\n').count() + 1);
            error
        })?;
        let network = network(&file.network)?;
        let upstream = origin(&file.upstream).map_err(|e| bad("upstream", e))?;
        let payout = file.payout_address.parse::<Address<_>>().map_err(|e| {
            bad("payout_address", format!("{}: not a Bitcoin address ({e})", file.payout_address))
        })?;
        if !payout.is_valid_for_network(network) {
            // The networks it is valid for: bitcoin; testnet, testnet4 and signet (one kind);
            // regtest.
            let (its, set) = [Network::Bitcoin, Network::Testnet4, Network::Regtest]
                .into_iter()
                .find(|other| payout.is_valid_for_network(*other))
                .map_or(("another network", "its network"), |other| match other {
                    Network::Bitcoin => ("bitcoin (mainnet)", "network = \"bitcoin\""),
                    Network::Regtest => ("regtest", "network = \"regtest\""),
                    _ => ("testnet4 or signet", "network = \"testnet4\" or \"signet\""),
                });
            return Err(bad(
                "payout_address",
                format!(
                    "network mismatch: {} is an address for {its}, but network = \"{network}\"; \
                     give an address of {network}, or set {set}",
                    file.payout_address
                ),
            ));
        }
        let payout = payout.assume_checked();
        let chain = chain(file.chain, base)?;
        let store_url = store_url(&file.store.url, base)?;
        Ok(Self {
            network,
            listen: file.listen,
            upstream,
            key_file: base.join(file.key_file),
            bump_key_file: file.bump_key_file.map(|path| base.join(path)),
            payout_script: payout.script_pubkey(),
            payout_address: file.payout_address,
            credit_server_errors: file.credit_server_errors,
            shadow: file.shadow,
            shutdown: Duration::from_secs(file.shutdown_secs),
            chain,
            store_url,
            leases: file.store.leases.map(leases),
            prices: prices(file.prices, file.shadow)?,
            terms: terms(file.terms)?,
            funding: funding(file.funding),
            settle_every: Duration::from_secs(file.settlement.interval_secs.unwrap_or(30).max(1)),
            tip_every: Duration::from_secs(file.settlement.tip_interval_secs.unwrap_or(5).max(1)),
            admin: file.admin.map(|admin| self::admin(admin, base)).transpose()?,
            tls: file.tls.map(|tls| (base.join(tls.cert_file), base.join(tls.key_file))),
            listener: listener(file.listener)?,
            events: file.events.map(|events_file| events(events_file, base)).transpose()?,
        })
    }
}

fn admin(file: AdminFile, base: &Path) -> Result<Admin, ConfigError> {
    let taken = matches!(file.metrics_path.as_str(), "/" | "/close" | "/reload-prices");
    if !file.metrics_path.starts_with('/') || taken {
        return Err(bad(
            "admin.metrics_path",
            "a path such as /metrics (not /, /close nor /reload-prices: the page's)",
        ));
    }
    if let Some(explorer) = &file.explorer {
        let web = explorer.starts_with("https://") || explorer.starts_with("http://");
        if !web || !explorer.contains("{txid}") {
            return Err(bad(
                "admin.explorer",
                format!(
                    "{explorer}: an http(s) URL with {{txid}} in it, such as \
                     \"https://mempool.space/tx/{{txid}}\""
                ),
            ));
        }
    }
    Ok(Admin {
        listen: file.listen,
        token_file: base.join(file.token_file),
        metrics_path: file.metrics_path,
        explorer: file.explorer,
    })
}

/// The network `name` (`bitcoin`, `testnet4`, `signet`, `regtest`, or Core's `main`, `test`).
pub(crate) fn network(name: &str) -> Result<Network, ConfigError> {
    Network::from_core_arg(name)
        .or_else(|_| name.parse::<Network>())
        .map_err(|_| bad("network", "expected bitcoin, testnet4, signet or regtest"))
}

/// `http[s]://host[:port]` (no path): the origin requests are forwarded to.
pub(crate) fn origin(url: &str) -> Result<String, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    match (uri.scheme_str(), uri.authority(), uri.path()) {
        (Some(scheme @ ("http" | "https")), Some(authority), "" | "/") if uri.query().is_none() => {
            Ok(format!("{scheme}://{authority}"))
        }
        _ => Err(format!("{url}: expected http[s]://host[:port]")),
    }
}

fn chain(file: ChainFile, base: &Path) -> Result<ChainSource, ConfigError> {
    use paychan::chain::bitcoind::Auth;
    match (file.bitcoind_url, file.esplora_url) {
        (Some(url), None) => {
            let auth = match (file.cookie_file, file.rpc_user, file.rpc_password) {
                (Some(cookie), None, None) => Auth::CookieFile(base.join(cookie)),
                (None, Some(user), Some(password)) => Auth::UserPass(user, password),
                _ => {
                    return Err(bad(
                        "chain.cookie_file",
                        "give either cookie_file or rpc_user and rpc_password",
                    ));
                }
            };
            Ok(ChainSource::Bitcoind { url, auth })
        }
        (None, Some(url)) => Ok(ChainSource::Esplora { url }),
        _ => Err(bad("chain", "give exactly one of bitcoind_url and esplora_url")),
    }
}

fn store_url(url: &str, base: &Path) -> Result<String, ConfigError> {
    if url == "memory" {
        return Ok(url.to_owned());
    }
    match url.split_once(':') {
        Some(("sqlite", path)) => Ok(format!("sqlite:{}", base.join(path).display())),
        Some(("postgres" | "postgresql" | "redis", _)) => Ok(url.to_owned()),
        _ => Err(bad("store.url", "expected sqlite:PATH, postgres://…, redis://… or memory")),
    }
}

/// The price table. In shadow mode `unlisted = "refuse"` serves unlisted routes instead
/// (unpaid, as everything): shadow mode must not change what the upstream serves.
fn prices(file: PricesFile, shadow: bool) -> Result<RoutePrices, ConfigError> {
    let mut prices = RoutePrices::new();
    for (n, route) in file.routes.into_iter().enumerate() {
        let method = Method::from_bytes(route.method.to_ascii_uppercase().as_bytes())
            .map_err(|e| bad(&format!("prices.routes[{n}].method"), e))?;
        if !route.path.starts_with('/') {
            return Err(bad(&format!("prices.routes[{n}].path"), "must start with /"));
        }
        prices = prices.route(method, route.path, MilliSats::from_msat(route.price_msat));
    }
    let unlisted = match &file.unlisted {
        None => Unlisted::Refuse,
        Some(toml::Value::String(name)) if name == "free" => Unlisted::Free,
        Some(toml::Value::String(name)) if name == "refuse" => Unlisted::Refuse,
        Some(toml::Value::Integer(msat)) if *msat >= 0 => {
            Unlisted::Price(MilliSats::from_msat(msat.unsigned_abs()))
        }
        Some(other) => {
            return Err(bad(
                "prices.unlisted",
                format!("{other}: expected \"free\", \"refuse\" or msat"),
            ));
        }
    };
    Ok(prices.unlisted(match unlisted {
        Unlisted::Refuse if shadow => Unlisted::Free,
        unlisted => unlisted,
    }))
}

fn rate(key: &str, sat_vb: Option<u64>, default: FeeRate) -> Result<FeeRate, ConfigError> {
    match sat_vb {
        None => Ok(default),
        Some(rate) => {
            u32::try_from(rate).map(FeeRate::from_sat_per_vb_u32).map_err(|_| bad(key, "too large"))
        }
    }
}

fn terms(file: TermsFile) -> Result<Terms, ConfigError> {
    let mut terms = Terms::default();
    if let Some(sat) = file.min_value_sat {
        terms.min_value = Amount::from_sat(sat);
    }
    if let Some(sat) = file.max_value_sat {
        terms.max_value = Amount::from_sat(sat);
    }
    if terms.min_value > terms.max_value {
        return Err(bad("terms.min_value_sat", "above terms.max_value_sat"));
    }
    let blocks = terms.blocks;
    terms.blocks = LifetimeBounds {
        min: file.min_lifetime_blocks.unwrap_or(blocks.min),
        max: file.max_lifetime_blocks.unwrap_or(blocks.max),
        close_margin: file.close_margin_blocks.unwrap_or(blocks.close_margin),
    };
    if terms.blocks.close_margin >= terms.blocks.min || terms.blocks.min > terms.blocks.max {
        return Err(bad(
            "terms.min_lifetime_blocks",
            "need close_margin_blocks < min_lifetime_blocks <= max_lifetime_blocks",
        ));
    }
    terms.min_fee_rate =
        rate("terms.min_fee_rate_sat_vb", file.min_fee_rate_sat_vb, terms.min_fee_rate)?;
    terms.max_fee_rate =
        rate("terms.max_fee_rate_sat_vb", file.max_fee_rate_sat_vb, terms.max_fee_rate)?;
    if terms.min_fee_rate > terms.max_fee_rate {
        return Err(bad("terms.min_fee_rate_sat_vb", "above terms.max_fee_rate_sat_vb"));
    }
    terms.funding_min_fee_rate = rate(
        "terms.funding_min_fee_rate_sat_vb",
        file.funding_min_fee_rate_sat_vb,
        terms.funding_min_fee_rate,
    )?;
    Ok(terms)
}

fn funding(file: FundingFile) -> FundingPolicy {
    let mut policy = FundingPolicy::default();
    if let Some(confirmations) = file.min_confirmations {
        policy = policy.with_min_confirmations(confirmations);
    }
    if let Some(sat) = file.zero_conf_max_value_sat {
        policy = policy.with_zero_conf_max_value(Amount::from_sat(sat));
    }
    if let Some(blocks) = file.confirm_within_blocks {
        policy = policy.with_confirm_within_blocks(blocks);
    }
    policy
}

/// The commented configuration `paychan init` writes.
pub(crate) fn template(init: &Init) -> String {
    let chain = match &init.esplora_url {
        Some(url) => format!("esplora_url = \"{url}\"\n"),
        None => format!(
            "bitcoind_url = \"{}\"\ncookie_file = \"{}\"   # or rpc_user = \"…\" and rpc_password = \"…\"\n",
            init.bitcoind_url,
            init.cookie_file.display()
        ),
    };
    let payout = if init.payout_is_bump_key {
        format!(
            "payout_address = \"{}\"\n# ^ the bump key's address (init chose it): CPFP works. Its coins are spent with the\n#   bump key (a hot key): sweep them to cold storage. Another address turns CPFP off.",
            init.payout_address
        )
    } else {
        format!(
            "payout_address = \"{}\"\n# ^ yours: CPFP is off (a CPFP child spends the payout output, so the bump key must own\n#   it). For CPFP, set it to the bump key's address, {} (new channels only).",
            init.payout_address, init.bump_address
        )
    };
    format!(
        // The configuration `init` writes, its `{…}` filled in (`{{…}}` is a literal brace).
        include_str!("paychan.toml.in"),
        network = init.network,
        listen = init.listen,
        upstream = init.upstream,
        key_file = init.key_file.display(),
        bump_key_file = init.bump_key_file.display(),
        store = init.store,
        price = init.price_msat,
        admin_listen = init.admin_listen,
        payout = payout,
        chain = chain,
    )
}

/// What `paychan init` writes into the template.
#[derive(Debug)]
pub(crate) struct Init {
    pub(crate) network: String,
    pub(crate) listen: SocketAddr,
    pub(crate) upstream: String,
    pub(crate) key_file: PathBuf,
    pub(crate) bump_key_file: PathBuf,
    /// The operator's address, or the bump key's.
    pub(crate) payout_address: String,
    /// Whether `payout_address` is the bump key's (then CPFP works).
    pub(crate) payout_is_bump_key: bool,
    /// The bump key's P2WPKH address.
    pub(crate) bump_address: String,
    pub(crate) bitcoind_url: String,
    pub(crate) cookie_file: PathBuf,
    pub(crate) esplora_url: Option<String>,
    pub(crate) store: String,
    pub(crate) price_msat: u64,
    pub(crate) admin_listen: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> Init {
        Init {
            network: "regtest".into(),
            listen: "127.0.0.1:8402".parse().unwrap(),
            upstream: "http://127.0.0.1:8080".into(),
            key_file: "paychan.key".into(),
            bump_key_file: "paychan-bump.key".into(),
            payout_address: "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into(),
            payout_is_bump_key: false,
            bump_address: "bcrt1qqypqxpq9qcrsszg2pvxq6rs0zqg3yyc5phstwt".into(),
            bitcoind_url: "http://127.0.0.1:18443".into(),
            cookie_file: "/tmp/.cookie".into(),
            esplora_url: None,
            store: "sqlite:paychan.db".into(),
            price_msat: 1_000,
            admin_listen: "127.0.0.1:9402".parse().unwrap(),
        }
    }

    #[test]
    fn the_template_parses_with_its_defaults() {
        let config = Config::parse(&template(&init()), Path::new("/srv")).unwrap();
        assert_eq!(config.network, Network::Regtest);
        assert_eq!(config.upstream, "http://127.0.0.1:8080");
        assert_eq!(config.key_file, Path::new("/srv/paychan.key"));
        assert_eq!(config.bump_key_file.as_deref(), Some(Path::new("/srv/paychan-bump.key")));
        assert!(template(&init()).contains("bcrt1qqypqxpq9qcrsszg2pvxq6rs0zqg3yyc5phstwt"));
        assert_eq!(config.store_url, "sqlite:/srv/paychan.db");
        assert_eq!(config.terms, Terms::default());
        assert!(!config.credit_server_errors, "a proxy charges an upstream's 5xx by default");
        assert!(!config.shadow);
        assert_eq!(config.listener, Listener::default());
        let shadow = template(&init()).replace("shadow = false", "shadow = true");
        assert!(Config::parse(&shadow, Path::new("/srv")).unwrap().shadow);
        let chosen = Init {
            payout_address: "bcrt1qqypqxpq9qcrsszg2pvxq6rs0zqg3yyc5phstwt".into(),
            payout_is_bump_key: true,
            ..init()
        };
        let chosen = Config::parse(&template(&chosen), Path::new("/srv")).unwrap();
        assert_eq!(chosen.payout_address, "bcrt1qqypqxpq9qcrsszg2pvxq6rs0zqg3yyc5phstwt");
        let admin = Admin {
            listen: "127.0.0.1:9402".parse().unwrap(),
            token_file: PathBuf::from("/srv/admin.token"),
            metrics_path: "/metrics".into(),
            explorer: None,
        };
        assert_eq!(config.admin, Some(admin));
        let explorer = "https://mempool.space/tx/{txid}";
        let with = template(&init()).replace("# explorer = ", "explorer = ");
        let with = Config::parse(&with, Path::new("/srv")).unwrap();
        assert_eq!(with.admin.unwrap().explorer.as_deref(), Some(explorer));
        let without_txid = template(&init()).replace(
            &format!("# explorer = \"{explorer}\""),
            "explorer = \"https://mempool.space/tx/\"",
        );
        let error = Config::parse(&without_txid, Path::new("/srv")).unwrap_err();
        assert_eq!(error.key, "admin.explorer");
        let routes: Vec<_> =
            config.prices.iter().map(|(m, p, price)| (m.clone(), p.to_owned(), price)).collect();
        let price = MilliSats::from_msat(1_000);
        assert_eq!(
            routes,
            [(Method::GET, "/".to_owned(), price), (Method::GET, "/{*rest}".to_owned(), price)]
        );
    }

    #[test]
    fn without_the_key_upstream_server_errors_are_charged() {
        let good = template(&init());
        let line = good.lines().find(|l| l.starts_with("credit_server_errors")).unwrap();
        let without = good.replace(line, "");
        assert!(!Config::parse(&without, Path::new("/srv")).unwrap().credit_server_errors);
        let on = good.replace(line, "credit_server_errors = true");
        assert!(Config::parse(&on, Path::new("/srv")).unwrap().credit_server_errors);
        let old_name = good.replace(line, "refund_server_errors = true");
        assert!(Config::parse(&old_name, Path::new("/srv")).unwrap().credit_server_errors);
    }

    #[test]
    fn shadow_mode_serves_every_method() {
        use paychan::server::Pricing;
        let post = http::Request::post("/items/7").body(()).unwrap();
        let paid = Config::parse(&template(&init()), Path::new("/srv")).unwrap();
        assert!(paid.prices.refuses(&post), "init's defaults refuse what is not a GET");
        let shadow = template(&init()).replace("shadow = false", "shadow = true");
        let shadow = Config::parse(&shadow, Path::new("/srv")).unwrap();
        assert!(!shadow.prices.refuses(&post), "shadow mode serves it");
        let get = http::Request::get("/items/7").body(()).unwrap();
        assert_eq!(shadow.prices.price(&get), Some(MilliSats::from_msat(1_000)), "and counts GETs");
    }

    #[test]
    fn the_listener_limits_are_read_and_checked() {
        let good = template(&init());
        let set = good
            .replace("# header_timeout_secs = 30", "header_timeout_secs = 2")
            .replace("# max_header_bytes = 32768", "max_header_bytes = 8192")
            .replace("# max_connections = 512", "max_connections = 3")
            .replace("# trust_forwarded_for = false", "trust_forwarded_for = true");
        let expected = Listener {
            header_timeout: Duration::from_secs(2),
            max_header_bytes: 8_192,
            max_connections: 3,
            max_connections_per_client: None,
            trust_forwarded_for: true,
        };
        assert_eq!(Config::parse(&set, Path::new("/srv")).unwrap().listener, expected);
        for (from, to, key) in [
            (
                "# header_timeout_secs = 30",
                "header_timeout_secs = 0",
                "listener.header_timeout_secs",
            ),
            ("# max_header_bytes = 32768", "max_header_bytes = 100", "listener.max_header_bytes"),
            ("# max_connections = 512", "max_connections = 0", "listener.max_connections"),
        ] {
            let error = Config::parse(&good.replace(from, to), Path::new("/srv")).unwrap_err();
            assert_eq!(error.key, key);
        }
    }

    #[test]
    fn leases_are_off_unless_configured() {
        let base = Path::new("/srv");
        assert_eq!(Config::parse(&template(&init()), base).unwrap().leases, None);
        // The template's commented-out example, turned on.
        let on = template(&init())
            .replace("# [store.leases]", "[store.leases]")
            .replace("# max_msat = 100000", "max_msat = 5000")
            .replace("# ttl_secs = 30", "ttl_secs = 60");
        let expected = LeaseConfig::default()
            .with_max_lease(MilliSats::from_msat(5_000))
            .with_ttl(Duration::from_secs(60));
        assert_eq!(Config::parse(&on, base).unwrap().leases, Some(expected));
        let typo = on.replace("max_msat = 5000", "max_sat = 5");
        assert_eq!(Config::parse(&typo, base).unwrap_err().key, "store.leases.max_sat");
    }

    #[test]
    fn events_are_off_unless_configured_and_a_webhook_needs_its_secret() {
        let base = Path::new("/srv");
        assert!(Config::parse(&template(&init()), base).unwrap().events.is_none());
        // The template's commented-out example, turned on.
        let on = template(&init())
            .replace("# [events]", "[events]")
            .replace("# log_file", "log_file")
            .replace("# interval_secs = 5", "interval_secs = 2");
        let events = Config::parse(&on, base).unwrap().events.unwrap();
        assert_eq!(events.settings.log_file, Path::new("/srv/events.jsonl"));
        assert_eq!(events.settings.interval, Duration::from_secs(2));
        assert_eq!(events.settings.usage_every, Duration::from_secs(60));
        assert!(events.webhook.is_none());
        let hook = on.replace("# webhook_url", "webhook_url");
        assert_eq!(Config::parse(&hook, base).unwrap_err().key, "events.secret_file");
        let hook = hook.replace("# secret_file", "secret_file");
        let (url, secret) = Config::parse(&hook, base).unwrap().events.unwrap().webhook.unwrap();
        assert_eq!(
            (url.to_string(), secret),
            ("https://billing.example/paychan".into(), "/srv/webhook.secret".into())
        );
        for (from, to, key) in [
            ("https://billing.example/paychan", "ftp://x", "events.webhook_url"),
            ("interval_secs = 2", "interval_secs = 0", "events.interval_secs"),
            ("interval_secs = 2", "intervals = 2", "events.intervals"),
        ] {
            let error = Config::parse(&hook.replacen(from, to, 1), base).unwrap_err();
            assert_eq!(error.key, key, "{to}: {error}");
        }
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let dir = std::env::temp_dir().join(format!("paychan-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("paychan.toml");
        let good = template(&init());
        let line_of = |text: &str, needle: &str| {
            text.lines().position(|l| l.starts_with(needle)).unwrap() + 1
        };
        for (from, to, key) in [
            // A wrong type: the key, not the value.
            ("shutdown_secs = 30", "shutdown_secs = \"soon\"", "shutdown_secs"),
            ("# max_connections = 512", "max_connections = \"many\"", "listener.max_connections"),
            // An unknown key, in its table.
            ("# max_header_bytes = 32768", "max_headers = 1", "listener.max_headers"),
            // A value checked after parsing.
            ("url = \"sqlite:paychan.db\"", "url = \"mysql://x\"", "store.url"),
            ("method = \"GET\"", "method = \"G T\"", "prices.routes[0].method"),
        ] {
            let text = good.replacen(from, to, 1);
            std::fs::write(&path, &text).unwrap();
            let error = Config::load(&path).unwrap_err().to_string();
            let line = line_of(&text, to);
            let at = format!("{}:{line}: key `{key}`: ", path.display());
            assert!(error.starts_with(&at), "{to}: {error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_payout_address_of_another_network_is_named_a_network_mismatch() {
        let mainnet = template(&init()).replace(
            "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080",
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
        );
        let error = Config::parse(&mainnet, Path::new(".")).unwrap_err().to_string();
        assert!(
            error.contains("network mismatch")
                && error.contains("an address for bitcoin (mainnet)")
                && error.contains("network = \"regtest\""),
            "{error}"
        );
    }

    #[test]
    fn every_error_names_its_key() {
        let good = template(&init());
        let cases = [
            ("listen = ", "lisen = ", "lisen"),
            ("network = \"regtest\"", "network = \"mainnet-ish\"", "network"),
            ("upstream = \"http://127.0.0.1:8080\"", "upstream = \"ftp://x\"", "upstream"),
            (
                "payout_address = \"bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080\"",
                "payout_address = \"bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4\"",
                "payout_address",
            ),
            ("url = \"sqlite:paychan.db\"", "url = \"mysql://x\"", "store.url"),
            ("unlisted = \"refuse\"", "unlisted = \"maybe\"", "prices.unlisted"),
            ("method = \"GET\"", "method = \"G T\"", "prices.routes[0].method"),
            (
                "# max_fee_rate_sat_vb = 1000",
                "max_fee_rate_sat_vb = 1",
                "terms.min_fee_rate_sat_vb",
            ),
        ];
        for (from, to, key) in cases {
            assert!(good.contains(from), "{from}");
            let error = Config::parse(&good.replacen(from, to, 1), Path::new(".")).unwrap_err();
            assert!(error.to_string().contains(key), "{to}: {error}");
        }
    }
}
