//! Configuring a [`Payer`].

use core::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, Network, OutPoint, Transaction, Txid};
use http::Uri;

use super::{Inner, Payer};
use crate::MilliSats;
use crate::chain::{ChainBackend, ChainError};
use crate::channel::ChainTip;
use crate::client::charges::ChargeWatch;
use crate::client::{
    ClientError, ClientStore, LossBound, MemoryClientStore, SpendingPolicy, Transport, Wallet,
};

/// What a payer is configured with.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) origin: String,
    pub(super) network: Network,
    pub(super) key: Xpriv,
    pub(super) policy: SpendingPolicy,
    pub(super) wallet: Option<Arc<dyn Wallet>>,
    pub(super) channel_value: Option<Amount>,
    pub(super) lifetime_blocks: u32,
    pub(super) top_up: Option<(MilliSats, Amount)>,
    pub(super) chain: Option<ChainView>,
    pub(super) timeout: Duration,
    pub(super) transport: Option<OwnTransport>,
    pub(super) require_receipts: bool,
    pub(super) trust_server_tip: bool,
}

/// The transport given to [`PayerBuilder::transport`].
#[derive(Clone)]
pub(super) struct OwnTransport(pub(super) Arc<dyn Transport>);

impl fmt::Debug for OwnTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Transport")
    }
}

/// The client's own view of the chain tip, from any [`ChainBackend`].
#[derive(Clone)]
pub(super) struct ChainView(Arc<dyn TipSource>);

impl ChainView {
    pub(super) async fn tip(&self) -> Result<ChainTip, ChainError> {
        self.0.tip().await
    }

    pub(super) async fn unspent(&self, outpoint: OutPoint) -> Result<bool, ChainError> {
        self.0.is_unspent(outpoint).await
    }

    pub(super) async fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        self.0.broadcast(tx).await
    }
}

impl fmt::Debug for ChainView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChainView")
    }
}

/// A boxed future of the chain view.
type ChainFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ChainError>> + Send + 'a>>;

/// What the client asks of its [`ChainBackend`], object-safe.
trait TipSource: Send + Sync {
    fn tip(&self) -> ChainFuture<'_, ChainTip>;
    fn is_unspent(&self, outpoint: OutPoint) -> ChainFuture<'_, bool>;
    fn broadcast<'a>(&'a self, tx: &'a Transaction) -> ChainFuture<'a, Txid>;
}

impl<C: ChainBackend> TipSource for C {
    fn tip(&self) -> ChainFuture<'_, ChainTip> {
        Box::pin(ChainBackend::tip(self))
    }

    fn is_unspent(&self, outpoint: OutPoint) -> ChainFuture<'_, bool> {
        Box::pin(async move { Ok(ChainBackend::unspent(self, &outpoint).await?.is_some()) })
    }

    fn broadcast<'a>(&'a self, tx: &'a Transaction) -> ChainFuture<'a, Txid> {
        Box::pin(ChainBackend::broadcast(self, tx))
    }
}

/// Builds a [`Payer`]; see [`Payer::builder`].
#[derive(Debug)]
#[must_use]
pub struct PayerBuilder<S> {
    settings: Settings,
    store: S,
}

impl PayerBuilder<MemoryClientStore> {
    /// Keeps the channels in `store` instead of in memory. Use a durable store
    /// ([`FileClientStore`](crate::client::FileClientStore)) for real money: it holds the refunds.
    pub fn store<S2: ClientStore>(self, store: S2) -> PayerBuilder<S2> {
        PayerBuilder { settings: self.settings, store }
    }
}

impl<S: ClientStore> PayerBuilder<S> {
    /// What the client is willing to spend (default: [`SpendingPolicy::default`]).
    pub fn policy(mut self, policy: SpendingPolicy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// The wallet that funds new channels. Without one, the client pays on channels it
    /// already has and refuses to open new ones ([`ClientError::NoWallet`]).
    pub fn wallet(mut self, wallet: impl Wallet + 'static) -> Self {
        self.settings.wallet = Some(Arc::new(wallet));
        self
    }

    /// The value of the channels the client opens (default: the policy's maximum, within the
    /// server's bounds).
    pub fn channel_value(mut self, value: Amount) -> Self {
        self.settings.channel_value = Some(value);
        self
    }

    /// How many blocks a new channel lives before its refund becomes valid (default 1 008,
    /// about a week; clamped to the server's bounds).
    pub fn lifetime_blocks(mut self, blocks: u32) -> Self {
        self.settings.lifetime_blocks = blocks;
        self
    }

    /// The client's own view of the chain (Bitcoin Core RPC, Esplora, …): the refund's lock
    /// time is computed from **its** tip, never the server's, and a server whose reported
    /// tip is more than 6 blocks away from it is refused
    /// ([`ClientError::ServerMisbehaved`]); [`Payer::refund_expired`] broadcasts refunds
    /// through it; `max_locked` counts the channels whose refund is not valid at its tip.
    ///
    /// Without one, on a real network (mainnet, testnet, signet) the payer opens no channel
    /// ([`ClientError::NoChainView`]) unless told to
    /// [`trust_server_tip`](Self::trust_server_tip); on regtest it trusts the server's tip.
    /// Either way `max_locked` then counts every channel not closed, whatever its expiry.
    pub fn chain(mut self, chain: impl ChainBackend + 'static) -> Self {
        self.settings.chain = Some(ChainView(Arc::new(chain)));
        self
    }

    /// Opens channels without a chain view on a real network, computing the refund's lock
    /// time from the tip **the server** reports (default `false`: refused with
    /// [`ClientError::NoChainView`]). A server that lies about its tip can then lock the
    /// client's coins for longer than `max_lifetime_blocks` (a tip 100 000 blocks ahead locks
    /// them about two years). `max_locked` still holds: without a chain view it counts every
    /// channel not closed. Regtest trusts the server's tip without this.
    pub fn trust_server_tip(mut self, trust: bool) -> Self {
        self.settings.trust_server_tip = trust;
        self
    }

    /// How long the client waits for each answer of its own negotiation requests (terms,
    /// open, refund, fund, close) before giving up with [`ClientError::Transport`] (default
    /// 30 s). The payer's channel is locked meanwhile, so a server that answers slowly on
    /// purpose cannot stall the payer's other requests for longer.
    pub fn negotiation_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Requires a signed receipt for every paid answer (`Payment-Receipt`) and at the end of
    /// every metered SSE stream: a server that sends none is treated as one whose receipt
    /// does not verify — the payer stops paying it
    /// ([`MisbehaviorKind::BadReceipt`](crate::client::MisbehaviorKind::BadReceipt)). Off by
    /// default: without it a server that sends no receipt is judged by its balance header
    /// alone.
    pub fn require_receipts(mut self, require: bool) -> Self {
        self.settings.require_receipts = require;
        self
    }

    /// Proactive top-up: when a response's `Payment-Channel-Balance` falls below `threshold`,
    /// sign a payment of `amount` more right away, so the next requests do not meet a 402.
    pub fn top_up_below(mut self, threshold: MilliSats, amount: Amount) -> Self {
        self.settings.top_up = Some((threshold, amount));
        self
    }

    /// The payer's own way to reach its server, for the calls made outside a request:
    /// [`Payer::open`] and [`Payer::close`] (`ReqwestTransport` with the `reqwest` feature, or
    /// a [`ServiceTransport`](crate::client::ServiceTransport) over any tower HTTP client that
    /// does not follow redirects, such as hyper-util's: these requests carry the payment
    /// header or a payment, which must not leave the origin). Requests sent through
    /// [`PaymentLayer`](crate::client::PaymentLayer) or the reqwest middleware negotiate
    /// through their own client and do not need it.
    ///
    /// # Examples
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use paychan::bitcoin::{Network, bip32::Xpriv};
    /// use paychan::client::{Payer, ServiceTransport};
    ///
    /// let http = tower::service_fn(|_request: http::Request<Full<Bytes>>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// });
    /// let key = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
    /// let payer = Payer::builder("http://127.0.0.1:3000", Network::Regtest, key)
    ///     .transport(ServiceTransport::<_, Full<Bytes>>::new(http))
    ///     .build()
    ///     .unwrap();
    /// # drop(payer);
    /// ```
    pub fn transport(mut self, transport: impl Transport + 'static) -> Self {
        self.settings.transport = Some(OwnTransport(Arc::new(transport)));
        self
    }

    /// Builds the payer.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidOrigin`] unless the server is `http://` or `https://` with a
    /// host and nothing after it but an optional `/`.
    pub fn build(mut self) -> Result<Payer<S>, ClientError> {
        self.settings.origin = parse_origin(&self.settings.origin)?;
        let bound = Mutex::new(LossBound::new(&self.settings.policy));
        let charges = ChargeWatch::new(&self.settings.policy)
            .require_receipts(self.settings.require_receipts);
        Ok(Payer {
            inner: Arc::new(Inner {
                settings: self.settings,
                store: self.store,
                state: tokio::sync::Mutex::default(),
                current: RwLock::default(),
                charges: Mutex::new(charges),
                last_send: Mutex::default(),
                bound,
            }),
        })
    }
}

fn parse_origin(server: &str) -> Result<String, ClientError> {
    let invalid = || ClientError::InvalidOrigin(server.to_owned());
    let uri: Uri = server.parse().map_err(|_| invalid())?;
    match (uri.scheme_str(), uri.authority(), uri.path_and_query().map(|p| p.as_str())) {
        (Some(scheme @ ("http" | "https")), Some(authority), None | Some("/")) => {
            Ok(format!("{scheme}://{authority}"))
        }
        _ => Err(invalid()),
    }
}

impl Payer<MemoryClientStore> {
    /// Starts a payer for the server at `server` (`scheme://host[:port]`), on `network`, whose
    /// client keys K1 are derived from `key` at hardened indices the store allocates.
    pub fn builder(server: &str, network: Network, key: Xpriv) -> PayerBuilder<MemoryClientStore> {
        PayerBuilder {
            settings: Settings {
                origin: server.to_owned(),
                network,
                key,
                policy: SpendingPolicy::default(),
                wallet: None,
                channel_value: None,
                lifetime_blocks: crate::client::steps::DEFAULT_LIFETIME_BLOCKS,
                top_up: None,
                chain: None,
                timeout: Duration::from_secs(30),
                require_receipts: false,
                transport: None,
                trust_server_tip: false,
            },
            store: MemoryClientStore::new(),
        }
    }
}
