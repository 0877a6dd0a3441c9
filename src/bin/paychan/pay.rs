//! `paychan pay` (a curl-like paying client) and `paychan client …`.

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::bitcoin::{Amount, Network};
use paychan::chain::bitcoind::{Auth, BitcoindRpc};
use paychan::client::{
    ClientError, ClientStore, CoreWallet, FileClientStore, KeyWallet, Payer, PaymentLayer,
    ServiceTransport, SpendingPolicy,
};
use tower::{ServiceBuilder, ServiceExt};

use crate::{Error, keys, net};

/// Where the client keeps its state, which wallet funds its channels, and its policy.
#[derive(Debug, Args)]
pub(crate) struct ClientOptions {
    /// The client's state: its key (`client.key`) and its channels and refunds (`channels/`).
    #[arg(long, env = "PAYCHAN_STATE", default_value = ".paychan")]
    state_dir: PathBuf,
    /// The network.
    #[arg(long, default_value = "regtest")]
    network: Network,
    /// Bitcoin Core's RPC URL: the client's own chain view (lock times from its tip, refunds,
    /// the key wallet's coins).
    #[arg(long)]
    chain_url: Option<String>,
    /// Without `--chain-url` on a real network, opens channels all the same, with the refund's
    /// lock time counted from the tip the server reports (a lying server can lock the coins for
    /// longer than `--lifetime-blocks`). Regtest always does.
    #[arg(long)]
    trust_server_tip: bool,
    /// Bitcoin Core's RPC URL of the wallet that funds channels (`…/wallet/NAME`).
    #[arg(long)]
    wallet_url: Option<String>,
    /// Instead of a Core wallet: a key file whose P2WPKH coins fund channels (found through
    /// `--chain-url`).
    #[arg(long, conflicts_with = "wallet_url")]
    wallet_key: Option<PathBuf>,
    /// Also trusts the certificates of this PEM file, for `https://` servers (a private CA).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Bitcoin Core's cookie file, for `--chain-url` and `--wallet-url`.
    #[arg(long)]
    rpc_cookie: Option<PathBuf>,
    /// Bitcoin Core's RPC user (with `--rpc-password`).
    #[arg(long, requires = "rpc_password")]
    rpc_user: Option<String>,
    /// Bitcoin Core's RPC password.
    #[arg(long, env = "PAYCHAN_RPC_PASSWORD", hide_env_values = true)]
    rpc_password: Option<String>,
    /// Most a single request may cost, in msat.
    #[arg(long, default_value_t = 10_000)]
    max_per_request_msat: u64,
    /// Most paid over every channel of the state directory, fees included, in sat.
    #[arg(long, default_value_t = 100_000)]
    max_total_sat: u64,
    /// Most paid ahead of use in one top-up, in sat.
    #[arg(long, default_value_t = 1_000)]
    max_prepaid_sat: u64,
    /// The value of a new channel, in sat.
    #[arg(long, default_value_t = 50_000)]
    channel_value_sat: u64,
    /// A new channel's lifetime, in blocks.
    #[arg(long, default_value_t = 1_008)]
    lifetime_blocks: u32,
}

impl ClientOptions {
    fn auth(&self) -> Result<Auth, Error> {
        match (&self.rpc_cookie, &self.rpc_user, &self.rpc_password) {
            (Some(cookie), None, _) => Ok(Auth::CookieFile(cookie.clone())),
            (None, Some(user), Some(password)) => {
                Ok(Auth::UserPass(user.clone(), password.clone()))
            }
            _ => Err("give --rpc-cookie, or --rpc-user and --rpc-password".into()),
        }
    }

    /// The HTTP client, trusting `--cacert` as well.
    fn http(&self) -> Result<net::HttpClient<Full<Bytes>>, Error> {
        let extra = match &self.cacert {
            Some(path) => net::certificates(path)?,
            None => Vec::new(),
        };
        net::client(&extra)
    }

    fn chain(&self) -> Result<Option<BitcoindRpc>, Error> {
        match &self.chain_url {
            Some(url) => Ok(Some(BitcoindRpc::new(url, self.auth()?)?)),
            None => Ok(None),
        }
    }

    fn store(&self) -> Result<FileClientStore, Error> {
        std::fs::create_dir_all(&self.state_dir)?;
        Ok(FileClientStore::open(self.state_dir.join("channels"))?)
    }

    /// `error` in one line, with the flag that fixes it when there is one: no wallet, a
    /// wallet short of funds, a server certificate no CA here signed (a self-signed one).
    fn explain(&self, error: &ClientError) -> String {
        let text = crate::chain_text(error);
        let hint = match error {
            ClientError::NoWallet => "give the wallet that funds channels: --wallet-url \
                http://HOST:PORT/wallet/NAME (a Bitcoin Core wallet, with --rpc-cookie or \
                --rpc-user), or --wallet-key FILE (the coins of a key, found through --chain-url)"
                .to_owned(),
            ClientError::Wallet(_) if text.to_lowercase().contains("insufficient funds") => {
                let wallet = match (&self.wallet_url, &self.wallet_key) {
                    (Some(url), _) => format!("the wallet at --wallet-url {}", crate::redact(url)),
                    (None, Some(path)) => format!("the key wallet --wallet-key {}", path.display()),
                    (None, None) => "the wallet".to_owned(),
                };
                format!(
                    "fund {wallet}, or open smaller channels with --channel-value-sat (now {})",
                    self.channel_value_sat
                )
            }
            ClientError::Transport(_)
                if text.contains("CaUsedAsEndEntity") || text.contains("UnknownIssuer") =>
            {
                "the server's certificate is not signed by a CA this client trusts (a \
                 self-signed certificate?): give that CA's certificate, or the self-signed \
                 certificate itself, with --cacert FILE.pem"
                    .to_owned()
            }
            _ => return text,
        };
        format!("{text}; {hint}")
    }

    /// A payer for `origin`, with its wallet, chain view and policy.
    async fn payer(&self, origin: &str) -> Result<Payer<FileClientStore>, Error> {
        let store = self.store()?;
        let key = keys::read_or_create(&self.state_dir.join("client.key"), self.network)?;
        let policy = SpendingPolicy::default()
            .with_max_per_request(MilliSats::from_msat(self.max_per_request_msat))
            .with_max_total(Amount::from_sat(self.max_total_sat))
            .with_max_prepaid(Amount::from_sat(self.max_prepaid_sat))
            .with_max_channel_value(Amount::from_sat(self.channel_value_sat));
        let http = self.http()?;
        let mut builder = Payer::builder(origin, self.network, key)
            .store(store)
            .policy(policy)
            .channel_value(Amount::from_sat(self.channel_value_sat))
            .lifetime_blocks(self.lifetime_blocks)
            .trust_server_tip(self.trust_server_tip)
            .transport(ServiceTransport::<_, Full<Bytes>>::new(http));
        let chain = self.chain()?;
        if let Some(chain) = &chain {
            builder = builder.chain(chain.clone());
        }
        if let Some(url) = &self.wallet_url {
            let rpc = BitcoindRpc::new(url, self.auth()?)?;
            builder = builder.wallet(CoreWallet::new(rpc, self.network));
        } else if let Some(path) = &self.wallet_key {
            let chain = chain.as_ref().ok_or("--wallet-key needs --chain-url to find its coins")?;
            let wallet = KeyWallet::new(keys::read(path, self.network)?.private_key);
            let balance = wallet.sync(chain, 1).await?;
            tracing::info!(%balance, address = %wallet.address(self.network), "key wallet");
            builder = builder.wallet(wallet);
        }
        Ok(builder.build()?)
    }
}

/// What `paychan pay` sends.
#[derive(Debug, Args)]
pub(crate) struct PayArgs {
    /// The request method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    method: Method,
    /// A request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The request body.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// Writes the response body to this file instead of standard output.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// The URL (http:// or https://).
    url: String,
    #[command(flatten)]
    client: ClientOptions,
}

/// The origin of `url`, refused unless plain HTTP.
fn origin_of(uri: &Uri) -> Result<String, Error> {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme @ ("http" | "https")), Some(authority)) => {
            Ok(format!("{scheme}://{authority}"))
        }
        _ => Err(format!("{uri}: expected http[s]://host[:port]/path").into()),
    }
}

/// `paychan pay`: the request, paid; the body to stdout (or `-o`), what was paid to stderr.
/// Exit code 0 on a 2xx or 3xx answer, 22 otherwise (as curl's `--fail-with-body`).
pub(crate) async fn pay(args: PayArgs) -> Result<ExitCode, Error> {
    let uri: Uri = args.url.parse().map_err(|e| format!("{}: {e}", args.url))?;
    let origin = origin_of(&uri)?;
    let payer = args.client.payer(&origin).await?;
    let mut request = Request::builder().method(args.method).uri(uri);
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("header {header}: expected Name: value"))?;
        request = request
            .header(HeaderName::try_from(name.trim())?, HeaderValue::try_from(value.trim())?);
    }
    let request = request.body(Full::new(Bytes::from(args.data.unwrap_or_default())))?;
    let http = args.client.http()?;
    let client = ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(http);
    let response = match client.oneshot(request).await {
        Ok(response) => response,
        Err(error) => return Err(args.client.explain(&error).into()),
    };
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    match &args.output {
        Some(path) => std::fs::write(path, &body)?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&body)?;
        }
    }
    match payer.status().await? {
        Some(channel) => eprintln!(
            "paychan: {status}; channel {} paid {} sat in total, balance {}, a close returns {} sat",
            channel.channel,
            channel.paid.to_sat(),
            channel.balance.map_or("unknown".to_owned(), |b| b.to_string()),
            channel.close_returns.to_sat(),
        ),
        None => eprintln!("paychan: {status}; no channel"),
    }
    Ok(if status.is_success() || status.is_redirection() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(22)
    })
}

/// `paychan client channels`.
pub(crate) async fn channels(options: &ClientOptions) -> Result<(), Error> {
    for channel in options.store()?.list().await? {
        let state = match (channel.closed, channel.retired) {
            (true, _) => "closed",
            (false, true) => "retired",
            (false, false) => "open",
        };
        println!(
            "{}  {:<7} {}  paid {} sat  value {} sat  expiry {}",
            channel.id(),
            state,
            if channel.server.is_empty() { "-" } else { &channel.server },
            channel.paid().to_sat(),
            channel.channel.params().value.to_sat(),
            channel.channel.params().expiry,
        );
    }
    Ok(())
}

/// `paychan client close <origin>`: the cooperative close of the channel with `origin`.
pub(crate) async fn close(options: &ClientOptions, origin: &str) -> Result<(), Error> {
    let payer = options.payer(origin).await?;
    let closed = payer.close().await?;
    println!(
        "closed {}: {} pays the server {}, returns {} (fee {})",
        closed.channel, closed.txid, closed.server_amount, closed.client_amount, closed.fee
    );
    Ok(())
}

/// `paychan client refund`: broadcasts the refund of every channel whose refund is final and
/// whose funding is unspent (its server vanished). The chain decides, not the local `closed`
/// mark: a close the server answered (202, queued) may never have confirmed.
pub(crate) async fn refund(options: &ClientOptions) -> Result<(), Error> {
    use paychan::chain::ChainBackend as _;

    let chain = options.chain()?.ok_or("refunds need --chain-url")?;
    let store = options.store()?;
    let mut refunded = 0;
    for mut channel in store.list().await? {
        // Spent (closed, refunded) or never broadcast: nothing to bring back.
        match chain.unspent(&channel.channel.outpoint()).await {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(error) => {
                eprintln!("{}: not refunded: {error}", channel.id());
                continue;
            }
        }
        match channel.refund_if_expired(&chain).await {
            Ok(Some(txid)) => {
                println!("refunded {}: {txid}", channel.id());
                channel.retired = true;
                channel.closed = true;
                store.save(&channel).await?;
                refunded += 1;
            }
            Ok(None) => {}
            Err(error) => eprintln!("{}: not refunded: {error}", channel.id()),
        }
    }
    println!("{refunded} refund(s) broadcast");
    Ok(())
}
