//! Charge per HTTP request over Bitcoin payment channels.
//!
//! A client opens a unidirectional payment channel with the server — a 2-of-2 P2WSH output,
//! protected by a time-locked refund the server signs first — and then sends, with every
//! request, a signed transaction that pays the server a little more. The server checks it,
//! meters the request, and before the channel expires co-signs the best payment and collects.
//!
//! This crate is built in layers:
//!
//! * [`channel`] — the protocol core: pure functions (no I/O, no clock, no randomness) that
//!   build and check the funding, refund and payment transactions, with one typed error per
//!   rule. Specified in `docs/PROTOCOL.md`.
//! * [`wire`] — the `Payment-Channel` header and channel ids.
//! * [`chain`] — the [`ChainBackend`](chain::ChainBackend) trait, Bitcoin Core's relay policy,
//!   and (feature `sim`) a simulated chain that checks every input with Bitcoin Core's
//!   consensus interpreter.
//! * [`MilliSats`] — prices and allocations at millisatoshi granularity.
//! * [`server`] — `PaywallLayer`, the tower middleware that meters requests, and the
//!   negotiation endpoints; [`store`] — where the server keeps its channels.
//! * [`client`] — `Payer` and `PaymentLayer`: open channels, pay per request, top up on 402.
//! * [`settlement`] — the funding watch and the background task that closes every channel on
//!   chain before its refund becomes valid.
//!
//! # Features
//!
//! * `runtime` (default) — everything that does I/O: the server, the stores, the chain
//!   backends, settlement, `Merchant` and the client's `Payer` and `PaymentLayer` (tokio,
//!   axum, hyper, tower). Every other feature turns it on. Without it the crate is
//!   [`channel`], [`wire`], [`MilliSats`] and the client's pure rules
//!   ([`client::LossBound`], [`client::SpendingPolicy`]), and it builds for
//!   `wasm32-unknown-unknown` (see `docs/BROWSER.md`).
//! * `sim` — [`chain::sim::SimulatedChain`] and with it rust-bitcoin's `bitcoinconsensus`
//!   (Bitcoin Core's C++ script interpreter). Off by default; the tests, examples and benches
//!   turn it on.
//! * `sqlite`, `postgres`, `redis` — the durable channel stores.
//! * `bitcoind`, `esplora` — the Bitcoin Core JSON-RPC and Esplora chain backends.
//! * `reqwest` — `client::PaymentMiddleware` for `reqwest-middleware` (reqwest without TLS:
//!   enable the TLS you want on your own reqwest dependency).
//!
//! # Conventions
//!
//! * A value configured by chaining takes `with_*` (and `without_*` to turn a default off):
//!   `PaywallLayer::with_prepaid_top_up`, `Settlement::with_cpfp_key`,
//!   `SpendingPolicy::with_max_total`. Only `*Builder` types take bare names
//!   (`PayerBuilder::wallet`), as std's `thread::Builder`. Getters are bare nouns.
//! * Every public type has one path: its module (`server::PaywallLayer`,
//!   `channel::ChannelState`); only [`Merchant`], [`MilliSats`] and [`bitcoin`] live at the
//!   root.
//! * Money is [`MilliSats`] or [`bitcoin::Amount`]; "refund" always means T2, the client's
//!   time-locked refund transaction (a charge given back is a *credit*).
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "runtime")]
pub mod chain;
pub mod channel;
pub mod client;
mod error;
#[cfg(feature = "runtime")]
mod maps;
#[cfg(feature = "runtime")]
mod merchant;
mod msat;
#[cfg(feature = "runtime")]
pub mod server;
#[cfg(feature = "runtime")]
pub mod settlement;
#[cfg(feature = "runtime")]
pub mod store;
pub mod wire;

pub use error::BackendError;
#[cfg(feature = "runtime")]
pub use merchant::{Merchant, Started};
pub use msat::{MilliSats, ParseMilliSatsError};

/// The rust-bitcoin this crate is built on: use its types through this path so that your
/// transactions, keys and amounts are the ones the crate takes.
pub use bitcoin;
