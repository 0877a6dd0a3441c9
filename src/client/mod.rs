//! The paying side: channels with a server, opened, funded and topped up on demand.
//!
//! * [`Payer`] — the channel client for one server: fetches the terms, opens a channel (K1
//!   derived from the client's BIP-0032 key, T1 funded by a [`Wallet`] through a PSBT, the
//!   server's refund signature verified before anything is signed), signs every increment,
//!   answers 402s within the [`SpendingPolicy`], and closes cooperatively.
//! * [`PaymentLayer`] — a tower layer for HTTP clients (hyper-util's `Client`, or any
//!   `Service<http::Request<B>>`); with feature `reqwest`, [`PaymentMiddleware`] for
//!   `reqwest-middleware`.
//! * [`ClientChannel`] and the [`ClientStore`]s — the channel's state (refund, latest payment,
//!   key index), saved **before** a new payment leaves the process.
//! * [`KeyWallet`] — a one-key P2WPKH [`Wallet`] for tests, demos and hot floats; with
//!   feature `bitcoind`, `CoreWallet` funds channels from a Bitcoin Core wallet.
//!
//! # Examples
//!
//! ```no_run
//! use bitcoin::Network;
//! use bitcoin::bip32::Xpriv;
//! use bitcoin::secp256k1::SecretKey;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use paychan::client::{FileClientStore, KeyWallet, PaymentLayer, Payer, SpendingPolicy};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let payer = Payer::builder("https://api.example.com", Network::Bitcoin, Xpriv::new_master(Network::Bitcoin, &[7; 32])?)
//!     .store(FileClientStore::open("channels")?)
//!     .wallet(KeyWallet::new(SecretKey::from_slice(&[9; 32])?))
//!     .policy(SpendingPolicy::default())
//!     .build()?;
//! let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let mut client = ServiceBuilder::new().layer(PaymentLayer::new(payer)).service(http);
//! let request = http::Request::get("https://api.example.com/v1/quote").body(Full::default())?;
//! let response = client.ready().await?.call(request).await?;
//! # let _ = response;
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "runtime")]
mod attempts;
mod bound;
pub mod charges;
#[cfg(feature = "bitcoind")]
mod core_wallet;
#[cfg(feature = "runtime")]
mod error;
pub mod metered;
#[cfg(feature = "reqwest")]
mod middleware;
#[cfg(feature = "runtime")]
mod payer;
#[cfg(feature = "runtime")]
mod payment;
mod policy;
mod state;
pub mod steps;
#[cfg(feature = "runtime")]
mod store;
#[cfg(feature = "runtime")]
mod stream;
#[cfg(feature = "runtime")]
mod transport;
#[cfg(feature = "runtime")]
mod wallet;

pub use bound::{BoundExceeded, LossBound};
#[cfg(feature = "bitcoind")]
pub use core_wallet::CoreWallet;
#[cfg(feature = "runtime")]
pub use error::ClientError;
#[cfg(feature = "reqwest")]
pub use middleware::{PaymentMiddleware, ReqwestTransport};
#[cfg(feature = "runtime")]
pub(crate) use payer::RetryBudget;
#[cfg(feature = "runtime")]
pub use payer::{ChannelStatus, Closed, PaidStream, Payer, PayerBuilder};
#[cfg(feature = "runtime")]
pub use payment::{PaymentLayer, PaymentService, ResponseFuture};
pub use policy::{PolicyRefusal, SpendingPolicy};
pub use state::ClientChannel;
pub use steps::{Misbehavior, MisbehaviorKind};
#[cfg(feature = "runtime")]
pub use store::{ClientStore, ClientStoreError, FileClientStore, MemoryClientStore};
#[cfg(feature = "runtime")]
pub use stream::PaidBody;
#[cfg(feature = "runtime")]
pub use transport::{ServiceTransport, Transport, TransportFuture};
#[cfg(feature = "runtime")]
pub use wallet::{KeyWallet, Wallet, WalletError, WalletFuture};
