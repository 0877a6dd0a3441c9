use std::fmt;
use std::sync::{Arc, OnceLock};

use tokio::sync::watch;
use tower::Layer;

use super::meter::{Meter, MeterConfig};
use super::{Negotiation, Paywall};
use bitcoin::bip32::Xpriv;

use crate::MilliSats;
use crate::chain::ChainBackend;
use crate::channel::ChainTip;
use crate::store::ChannelStore;

/// The path of the terms document served to clients (RFC 8615 well-known URI).
pub const DEFAULT_TERMS_URL: &str = "/.well-known/payment-channel";

/// How much a 402's suggested top-up prepays beyond the minimum: 1 000 sat.
pub const DEFAULT_PREPAID_TOP_UP: MilliSats = MilliSats::from_msat(1_000_000);

/// Applies [`Paywall`] to a service: every priced request must be paid through a channel.
///
/// # Examples
///
/// ```
/// use axum::{Router, routing::get};
/// use paychan::MilliSats;
/// use paychan::channel::ChainTip;
/// use paychan::server::PaywallLayer;
/// use paychan::store::MemoryStore;
///
/// let (_tip_tx, tip) = tokio::sync::watch::channel(ChainTip { height: 800_000, median_time_past: 0 });
/// let app: Router = Router::new()
///     .route("/joke", get(|| async { "two satoshis walk into a bar" }))
///     .layer(PaywallLayer::new(MemoryStore::new(), MilliSats::from_msat(2_000), tip));
/// ```
#[must_use]
pub struct PaywallLayer<St, P> {
    /// The configuration, copied on write.
    config: Arc<MeterConfig<St, P>>,
    /// The meter of this configuration, built when the layer makes its first service and
    /// shared by every service it (or a clone not configured since) makes.
    meter: Arc<OnceLock<Arc<Meter<St, P>>>>,
    /// The negotiation endpoints, built once on the first [`Layer::layer`] from the layer's
    /// final configuration (so builder calls may come in any order) and shared by every
    /// service the layer makes (one table of pending proposals).
    pub(super) negotiation: Option<Arc<Endpoints<St>>>,
}

/// Builds the negotiation router on a store, a tip and a terms URL.
type BuildRouter<St> =
    dyn Fn(Arc<St>, watch::Receiver<ChainTip>, &str) -> axum::Router + Send + Sync;

/// The negotiation endpoints of a layer: their prefix, how to build their router on the
/// layer's store, tip and terms URL, and the router once built.
pub(super) struct Endpoints<St> {
    prefix: String,
    build: Arc<BuildRouter<St>>,
    router: OnceLock<axum::Router>,
}

impl<St> Endpoints<St> {
    /// The prefix and the router, built on first use from `meter`'s configuration.
    pub(super) fn get<P>(&self, meter: &MeterConfig<St, P>) -> (&str, &axum::Router) {
        let router = self
            .router
            .get_or_init(|| (self.build)(meter.store.clone(), meter.tip.clone(), &meter.terms_url));
        (&self.prefix, router)
    }
}

impl<St, P: Clone> PaywallLayer<St, P> {
    /// Meters requests priced by `pricing` against channels in `store`. `tip` follows the
    /// chain's best block (the settlement task keeps it current); payments are refused inside
    /// a channel's close margin.
    pub fn new(store: St, pricing: P, tip: watch::Receiver<ChainTip>) -> Self {
        Self {
            negotiation: None,
            meter: Arc::default(),
            config: Arc::new(MeterConfig {
                store: Arc::new(store),
                pricing,
                tip,
                prepaid_top_up: DEFAULT_PREPAID_TOP_UP,
                credit_server_errors: true,
                terms_url: DEFAULT_TERMS_URL.to_owned(),
                forward_payment_header: false,
                shadow: None,
                receipts: None,
                no_receipts: false,
                receipt_signing: super::ReceiptSigning::default(),
                idempotency: Some(super::Idempotency::default()),
                stream_hold: super::stream::DEFAULT_HOLD,
                payment_path: Some(crate::wire::Endpoints::under(super::DEFAULT_PREFIX).payment),
            }),
        }
    }

    /// The configuration to change: a layer configured after it was cloned gets its own copy
    /// (the clones keep theirs).
    fn config_mut(&mut self) -> &mut MeterConfig<St, P> {
        // The router is built again for the new configuration (clones keep theirs, built or
        // not).
        if let Some(endpoints) = &mut self.negotiation {
            *endpoints = Arc::new(Endpoints {
                prefix: endpoints.prefix.clone(),
                build: Arc::clone(&endpoints.build),
                router: OnceLock::new(),
            });
        }
        // A new configuration, a new meter (with its own caches) once it makes a service.
        self.meter = Arc::default();
        Arc::make_mut(&mut self.config)
    }

    /// Sets how responses to requests with an `Idempotency-Key` are kept for replay (on by
    /// default, with [`Idempotency::default`](super::Idempotency)): a retry never pays twice.
    pub fn with_idempotency(mut self, keep: super::Idempotency) -> Self {
        self.config_mut().idempotency = Some(keep);
        self
    }

    /// Ignores `Idempotency-Key` headers: every request is charged and served.
    pub fn without_idempotency(mut self) -> Self {
        self.config_mut().idempotency = None;
        self
    }

    /// Sets how long a metered stream holds, waiting for a top-up, when the balance runs out
    /// (default [`DEFAULT_HOLD`](super::DEFAULT_HOLD), 10 s); see [`StreamMeter`](super::StreamMeter).
    pub fn with_stream_hold(mut self, hold: std::time::Duration) -> Self {
        self.config_mut().stream_hold = hold;
        self
    }

    /// Sets how much a 402's suggested top-up prepays beyond the minimum
    /// (default [`DEFAULT_PREPAID_TOP_UP`]).
    pub fn with_prepaid_top_up(mut self, amount: MilliSats) -> Self {
        self.config_mut().prepaid_top_up = amount;
        self
    }

    /// Whether the inner service receives the `Payment-Channel` header (default `false`: the
    /// layer removes it from every request it passes on, paid or free, so a proxy or a log
    /// never sees it). An outer layer in front of another `PaywallLayer` (each pricing its
    /// own routes) must forward it, or the inner one never sees a payment.
    pub fn with_payment_header_forwarded(mut self, forward: bool) -> Self {
        self.config_mut().forward_payment_header = forward;
        self
    }

    /// Whether a 5xx answer from the inner service gives the charge back (default `true`).
    ///
    /// The body of a 5xx answer still reaches the client: with this on, a handler must not
    /// put the paid-for content in a 5xx answer, or a client that can provoke one (an upstream
    /// timeout behind a proxy) is served for free. Turn it off for such services.
    pub fn with_server_errors_credited(mut self, credit: bool) -> Self {
        self.config_mut().credit_server_errors = credit;
        self
    }

    /// Gives every paid response a [`Receipt`](crate::wire::Receipt) (the `Payment-Receipt`
    /// header), signed with the channel's server key K2, derived from `master` (the
    /// [`Negotiation`]'s key, which [`with_negotiation`](Self::with_negotiation) sets by
    /// itself), as [`with_receipt_signing`](Self::with_receipt_signing) says (by default in
    /// batches for clients that accept them: a fraction of an ECDSA signature per request).
    pub fn with_receipts(mut self, master: Xpriv) -> Self {
        let meter = self.config_mut();
        meter.receipts = Some(master);
        meter.no_receipts = false;
        self
    }

    /// When receipts are signed (default [`ReceiptSigning::Batched`], every 1 024 within 1 s;
    /// [`ReceiptSigning::Every`] signs every one).
    ///
    /// [`ReceiptSigning::Batched`]: super::ReceiptSigning::Batched
    /// [`ReceiptSigning::Every`]: super::ReceiptSigning::Every
    pub fn with_receipt_signing(mut self, signing: super::ReceiptSigning) -> Self {
        self.config_mut().receipt_signing = signing;
        self
    }

    /// No receipts, even with negotiation endpoints (for the last microseconds of the fast
    /// path; the client then checks the balance header only).
    pub fn without_receipts(mut self) -> Self {
        let meter = self.config_mut();
        meter.receipts = None;
        meter.no_receipts = true;
        self
    }

    /// Shadow mode: every priced request is served **without asking for payment**, as if
    /// paid; the handler gets a [`Paid`](super::Paid) with `shadow: true` and the price, each
    /// one is logged (`tracing`, info) and counted in the [`ShadowTally`](super::ShadowTally)
    /// ([`shadow_tally`](Self::shadow_tally)). An operator sees what the API would earn
    /// before switching payments on. A payment header is ignored; routes the price table
    /// refuses are still refused, and free routes stay free and uncounted.
    ///
    /// # Examples
    ///
    /// ```
    /// use paychan::MilliSats;
    /// use paychan::channel::ChainTip;
    /// use paychan::server::PaywallLayer;
    /// use paychan::store::MemoryStore;
    ///
    /// let (_, tip) = tokio::sync::watch::channel(ChainTip { height: 100, median_time_past: 0 });
    /// let layer = PaywallLayer::new(MemoryStore::new(), MilliSats::from_msat(2_000), tip).with_shadow_mode();
    /// assert_eq!(layer.shadow_tally().unwrap().requests(), 0);
    /// ```
    pub fn with_shadow_mode(mut self) -> Self {
        self.config_mut().shadow = Some(Arc::default());
        self
    }

    /// What the layer would have charged, in shadow mode (`None` otherwise).
    pub fn shadow_tally(&self) -> Option<Arc<super::ShadowTally>> {
        self.config.shadow.clone()
    }

    /// Sets the terms URL that 402 challenges point to, and where the terms are served
    /// (default [`DEFAULT_TERMS_URL`]).
    pub fn with_terms_url(mut self, url: impl Into<String>) -> Self {
        self.config_mut().terms_url = url.into();
        self
    }

    /// Serves the terms document and the negotiation endpoints of `negotiation` (open,
    /// refund, fund, status, close) from the layer itself, in front of the inner service, and
    /// the payment endpoint (`POST <prefix>/payment`: a better payment stored, nothing
    /// charged; how a client tops up a metered stream).
    pub fn with_negotiation<C>(mut self, negotiation: Negotiation<C>) -> Self
    where
        St: ChannelStore,
        C: ChainBackend + Clone + 'static,
    {
        let master = negotiation.master();
        let meter = self.config_mut();
        meter.payment_path = Some(crate::wire::Endpoints::under(negotiation.prefix()).payment);
        if !meter.no_receipts {
            meter.receipts.get_or_insert(master);
        }
        self.negotiation = Some(Arc::new(Endpoints {
            prefix: negotiation.prefix().to_owned(),
            build: Arc::new(move |store, tip, url| negotiation.clone().router(store, tip, url)),
            router: OnceLock::new(),
        }));
        self
    }
}

impl<St, P> Clone for PaywallLayer<St, P> {
    fn clone(&self) -> Self {
        Self {
            config: Arc::clone(&self.config),
            meter: Arc::clone(&self.meter),
            negotiation: self.negotiation.clone(),
        }
    }
}

impl<St, P> fmt::Debug for PaywallLayer<St, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaywallLayer")
            .field("prepaid_top_up", &self.config.prepaid_top_up)
            .field("credit_server_errors", &self.config.credit_server_errors)
            .field("terms_url", &self.config.terms_url)
            .field("negotiation", &self.negotiation.as_ref().map(|endpoints| &endpoints.prefix))
            .finish_non_exhaustive()
    }
}

impl<S, St, P> Layer<S> for PaywallLayer<St, P> {
    type Service = Paywall<S, St, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Paywall::new(inner, self)
    }
}

impl<St, P> PaywallLayer<St, P> {
    /// The meter of the layer's configuration, built now if no service was made yet.
    pub(super) fn meter(&self) -> Arc<Meter<St, P>> {
        Arc::clone(self.meter.get_or_init(|| Arc::new(Meter::new(Arc::clone(&self.config)))))
    }

    /// The negotiation endpoints, their router built now (once) from the final configuration.
    pub(super) fn endpoints(&self) -> Option<Arc<Endpoints<St>>> {
        let endpoints = self.negotiation.as_ref()?;
        let _built = endpoints.get(&self.config);
        Some(Arc::clone(endpoints))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn configuring_a_clone_leaves_the_original_as_it_was() {
        let (_tx, tip) = watch::channel(ChainTip { height: 1, median_time_past: 0 });
        let layer = PaywallLayer::new(MemoryStore::new(), MilliSats::from_msat(1), tip);
        let copy = layer
            .clone()
            .with_prepaid_top_up(MilliSats::from_msat(5))
            .with_payment_header_forwarded(true);
        assert_eq!(copy.config.prepaid_top_up, MilliSats::from_msat(5));
        assert!(copy.config.forward_payment_header);
        assert_eq!(layer.config.prepaid_top_up, DEFAULT_PREPAID_TOP_UP);
        assert!(!layer.config.forward_payment_header);
        assert!(Arc::ptr_eq(&layer.config.store, &copy.config.store), "one store");
    }
}
