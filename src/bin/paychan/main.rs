//! `paychan`: a paying reverse proxy for any HTTP API, its operator console, and a curl-like
//! paying client. See `paychan --help` and the README's quickstart.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use paychan::channel::ChannelState;
use paychan::wire::ChannelId;

mod admin;
mod chain;
mod config;
mod console;
mod doctor;
mod events;
mod init;
mod keys;
mod net;
mod operator;
mod pay;
mod prices;
mod report;
mod serve;
mod webhook;

type Error = Box<dyn std::error::Error>;

/// Opens (and migrates) the store `$url` names and runs `$body` with it bound to `$store`.
#[macro_export]
macro_rules! with_store {
    ($url:expr, $store:ident => $body:expr) => {{
        let url: &str = $url;
        let cannot = |error| $crate::store_unavailable(url, error);
        if url == "memory" {
            let $store = paychan::store::MemoryStore::new();
            $body
        } else if let Some(path) = url.strip_prefix("sqlite:") {
            let $store = paychan::store::SqliteStore::open(path).map_err(cannot)?;
            $body
        } else if url.starts_with("postgres") {
            let $store = paychan::store::PostgresStore::connect(url).await.map_err(cannot)?;
            $body
        } else if url.starts_with("redis") {
            let $store = paychan::store::RedisStore::connect(url).await.map_err(cannot)?;
            $body
        } else {
            Err(format!("unknown store {}", $crate::redact(url)).into())
        }
    }};
}

/// The store at `url` could not be opened: what to check, with the URL's password hidden.
fn store_unavailable(url: &str, error: paychan::store::StoreError) -> String {
    let hint = if url.starts_with("postgres") {
        " (is the server up, and does the database exist? CREATE DATABASE first: PRODUCTION.md)"
    } else if url.starts_with("redis") {
        " (is the server up?)"
    } else {
        ""
    };
    format!("the store at [store] url = \"{}\" cannot be opened: {error}{hint}", redact(url))
}

/// `url` without the password of its user info (`postgres://user:…@host/db`).
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    // The user info ends at the last `@`: a password may hold `/`, `?` or `@`.
    let (user, rest) = match rest.rsplit_once('@') {
        Some((user_info, after)) => match user_info.split_once(':') {
            Some((user, _)) => (format!("{user}:…@"), after),
            None => (format!("{user_info}@"), after),
        },
        None => (String::new(), rest),
    };
    let (address, query) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
    let address = format!("{user}{address}");
    // `?password=…` (libpq's form) and any `…password=` (`sslpassword`) too.
    let query: Vec<String> = query
        .split_terminator(['?', '&'])
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.to_ascii_lowercase().ends_with("password") => format!("{key}=…"),
            _ => pair.to_owned(),
        })
        .collect();
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    format!("{scheme}://{address}{query}")
}

#[cfg(test)]
mod redact_tests {
    #[test]
    fn no_password_is_shown_in_any_form() {
        for (url, shown) in [
            ("postgres://u:secret@db/x", "postgres://u:…@db/x"),
            ("postgres://u:se/cr@et@db:5432/x", "postgres://u:…@db:5432/x"),
            ("postgres://db/x?user=u&password=secret", "postgres://db/x?user=u&password=…"),
            ("postgres://u:p?secret@db/x", "postgres://u:…@db/x"),
            ("postgres://db/x?sslpassword=secret", "postgres://db/x?sslpassword=…"),
            ("redis://:secret@cache:6379/0", "redis://:…@cache:6379/0"),
            ("sqlite:/var/lib/paychan.db", "sqlite:/var/lib/paychan.db"),
            ("postgres://u@db/x", "postgres://u@db/x"),
        ] {
            let redacted = super::redact(url);
            assert_eq!(redacted, shown, "{url}");
            assert!(!redacted.contains("secret") && !redacted.contains("cr@et"), "{redacted}");
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "paychan",
    version,
    about = "Charge per HTTP request over Bitcoin payment channels"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigPath {
    /// The proxy's configuration file.
    #[arg(short, long, env = "PAYCHAN_CONFIG", default_value = "paychan.toml")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a commented configuration and fresh key files (mode 0600): the master key and
    /// the bump key (which signs CPFP children).
    Init(init::InitFlags),
    /// Runs the paying reverse proxy (the layer, the negotiation endpoints and the settlement
    /// task) until SIGTERM.
    Serve {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Lists the proxy's channels.
    Channels {
        #[command(flatten)]
        config: ConfigPath,
        /// Only channels in this state (pending, open, closing, closed, settled, failed).
        #[arg(long)]
        state: Option<String>,
    },
    /// Shows one channel as JSON.
    Channel {
        #[command(flatten)]
        config: ConfigPath,
        /// The channel (`txid:vout` of its funding).
        id: ChannelId,
    },
    /// Closes a channel: co-signs its best payment and broadcasts it.
    Close {
        #[command(flatten)]
        config: ConfigPath,
        /// The channel.
        id: ChannelId,
    },
    /// Runs every start-up check of `serve` and prints each, ok or FAIL with the reason: the
    /// chain backend's network, the payout address and the keys, the node's relay fee against
    /// the terms, the store. Exits with 1 if any fails.
    Doctor {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Revenue paid and settled, open allocations, channels closing soon. With `--from`,
    /// `--to`, `--format` or `--by`: the usage export instead, per channel or per client key,
    /// read from the event log (`[events]`).
    Report {
        #[command(flatten)]
        config: ConfigPath,
        /// The period's start: Unix seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC),
        /// included. Default: the log's beginning.
        #[arg(long, value_parser = report::parse_time)]
        from: Option<u64>,
        /// The period's end, excluded. Default: now.
        #[arg(long, value_parser = report::parse_time)]
        to: Option<u64>,
        /// The usage export's format.
        #[arg(long, value_enum)]
        format: Option<report::Format>,
        /// A row per channel, or per client key (the paychan client uses a fresh key for each
        /// channel: PRODUCTION.md, "Billing events").
        #[arg(long, value_enum)]
        by: Option<report::By>,
    },
    /// Sends a request like curl and pays for it over a channel.
    Pay(pay::PayArgs),
    /// The paying client's channels.
    #[command(subcommand)]
    Client(ClientCommand),
}

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Lists the client's channels.
    Channels {
        #[command(flatten)]
        options: pay::ClientOptions,
    },
    /// Closes the channel with a server cooperatively.
    Close {
        /// The server's origin (`http://host:port`).
        origin: String,
        #[command(flatten)]
        options: pay::ClientOptions,
    },
    /// Refunds every channel whose refund is final (its server vanished).
    Refund {
        #[command(flatten)]
        options: pay::ClientOptions,
    },
}

fn logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json { logs.json().init() } else { logs.init() }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    logs(cli.json_logs);
    match run(cli.command).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("paychan: {}", chain_text(&*error));
            ExitCode::from(2)
        }
    }
}

/// The error and its sources in one line: "http: client error (Connect): invalid peer
/// certificate: …" (a source already in the text is not repeated).
fn chain_text(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !message.contains(&cause_text) {
            message = format!("{message}: {cause_text}");
        }
        source = cause.source();
    }
    message
}

async fn run(command: Command) -> Result<ExitCode, Error> {
    use config::Config;
    match command {
        Command::Init(flags) => init::init(flags)?,
        Command::Serve { config } => {
            serve::serve(Config::load(&config.config)?, config.config).await?
        }
        Command::Doctor { config } => return Ok(doctor::doctor(&config.config).await),
        Command::Channels { config, state } => {
            let config = Config::load(&config.config)?;
            let state = state.map(|s| ChannelState::from_name(&s)).transpose()?;
            with_store!(&config.store_url, store => operator::channels(&store, state).await)?;
        }
        Command::Channel { config, id } => {
            let config = Config::load(&config.config)?;
            with_store!(&config.store_url, store => operator::channel(&store, id).await)?;
        }
        Command::Close { config, id } => {
            let config = Config::load(&config.config)?;
            let master = keys::read(&config.key_file, config.network)?;
            let chain = chain::Chain::new(&config.chain)?;
            with_store!(&config.store_url, store => operator::close(&store, &chain, &master, id).await)?;
        }
        Command::Report { config, from: None, to: None, format: None, by: None } => {
            let config = Config::load(&config.config)?;
            let chain = chain::Chain::new(&config.chain)?;
            with_store!(&config.store_url, store => operator::report(&store, Some(&chain)).await)?;
        }
        Command::Report { config, from, to, format, by } => {
            let config = Config::load(&config.config)?;
            let events = config.events.ok_or(
                "the usage report reads the event log: set [events] log_file in the config \
                 (PRODUCTION.md, \"Billing events\")",
            )?;
            let (from, to) = (from.unwrap_or(0), to.unwrap_or_else(|| events::unix_now() + 1));
            let format = format.unwrap_or(report::Format::Csv);
            let by = by.unwrap_or(report::By::Channel);
            report::report(&events.settings.log_file, from, to, format, by)?;
        }
        Command::Pay(args) => return pay::pay(args).await,
        Command::Client(ClientCommand::Channels { options }) => pay::channels(&options).await?,
        Command::Client(ClientCommand::Close { origin, options }) => {
            pay::close(&options, &origin).await?
        }
        Command::Client(ClientCommand::Refund { options }) => pay::refund(&options).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// An error in the config `init` writes comes from one of its flags: named as the flag.
fn flag_error(error: config::ConfigError) -> Error {
    let flag = match error.key.as_str() {
        "network" => "--network",
        "upstream" => "--upstream",
        "payout_address" => "--payout-address",
        "store.url" => "--store",
        "chain" | "chain.cookie_file" => "--bitcoind-url, --cookie-file or --esplora-url",
        _ => return error.into(),
    };
    format!("{flag}: {}", error.message).into()
}

/// `~/…` with `$HOME`.
fn expand_home(path: PathBuf) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path,
    }
}
