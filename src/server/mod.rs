//! The server side: a tower middleware that charges priced requests to payment channels.
//!
//! [`PaywallLayer`] wraps any `Service<http::Request<B>>` — an axum `Router`, a single route,
//! or a hyper `service_fn`. For every request its [`Pricing`] prices:
//!
//! 1. no `Payment-Channel` header → **402** `payment-required`, with a `WWW-Authenticate:
//!    Payment method="bitcoin-channel", …` challenge pointing to the terms;
//! 2. the header is decoded (at most 1 KiB) and the channel found by the payment's input;
//!    malformed → **400**, unknown channel → **402** `unknown-channel`;
//! 3. the payment is the channel's best → fast path, no signature verification; a better
//!    payment → checked ([`Channel::check_payment`](crate::channel::Channel::check_payment))
//!    and **stored before anything is served**; an older payment of the channel (a request
//!    that raced a top-up) → signature-checked and accepted as identification, never as a
//!    downgrade; a payment breaking a rule → **400** with the rule's code;
//! 4. the price is debited atomically from the balance (paid − spent); a balance too small →
//!    **402** `insufficient-balance` with the numbers to top up;
//! 5. the inner service runs with a [`Paid`] receipt in the request extensions; a 5xx answer
//!    gives the charge back (configurable), a handler's [`ActualCost`] gives back the rest;
//! 6. the response carries `Payment-Channel-Balance: <msat>`.
//!
//! Every refusal is an RFC 9457 `application/problem+json` body whose `type` is
//! `urn:paychan:problem:<code>`, with the channel's state when the channel is known
//! ([`ChannelSnapshot`](crate::wire::ChannelSnapshot)); the [`Rejection`] is also in the response extensions. A refused
//! request changes nothing (but a better payment is kept when its balance still falls short of
//! the price: the client signed it).
//!
//! # Examples
//!
//! ```
//! use axum::body::Body;
//! use axum::{Router, routing::get};
//! use http::{Method, Request, StatusCode};
//! use paychan::MilliSats;
//! use paychan::channel::ChainTip;
//! use paychan::server::{Paid, PaywallLayer, RoutePrices};
//! use paychan::store::MemoryStore;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (_tip_tx, tip) = tokio::sync::watch::channel(ChainTip { height: 800_000, median_time_past: 0 });
//! let prices = RoutePrices::new().route(Method::GET, "/weather", MilliSats::from_msat(500));
//! let app = Router::new()
//!     .route("/weather", get(|paid: Paid| async move { format!("sunny; {} left", paid.balance) }))
//!     .route("/health", get(|| async { "ok" }))
//!     .layer(PaywallLayer::new(MemoryStore::new(), prices, tip));
//!
//! let free = app.clone().oneshot(Request::get("/health").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(free.status(), StatusCode::OK);
//! let priced = app.oneshot(Request::get("/weather").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(priced.status(), StatusCode::PAYMENT_REQUIRED);
//! assert_eq!(priced.headers()["content-type"], "application/problem+json");
//! # }
//! ```

mod chain_view;
mod future;
mod idempotency;
mod layer;
mod meter;
mod negotiate;
mod pricing;
mod receipt;
mod rejection;
mod service;
mod stream;

pub use chain_view::chain_view;
pub use future::ResponseFuture;
pub use idempotency::Idempotency;
pub use layer::{DEFAULT_PREPAID_TOP_UP, DEFAULT_TERMS_URL, PaywallLayer};
pub(crate) use negotiate::DescribePrices;
pub use negotiate::{DEFAULT_PREFIX, Negotiation};
pub use pricing::{Priced, Pricing, RoutePrices, Unlisted};
pub use receipt::{ActualCost, Paid, ReceiptSigning, ShadowTally};
pub use rejection::{Rejection, RejectionKind};
pub use service::Paywall;
pub use stream::{DEFAULT_HOLD, Exhausted, StreamMeter};
