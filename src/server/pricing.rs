use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request};

use crate::MilliSats;

/// Decides what a request costs: `Some(price)`, or `None` for a free request that passes
/// through unmetered.
///
/// Implemented by [`MilliSats`] (every request costs the same), by [`RoutePrices`] (a table of
/// method and path), and by any `Fn(&Request<B>) -> Option<MilliSats>` closure (dynamic
/// prices).
///
/// # Examples
///
/// ```
/// use http::Request;
/// use paychan::MilliSats;
/// use paychan::server::Pricing;
///
/// // Charge by the size the client asks for: 10 msat per row, free when no rows.
/// let pricing = |req: &Request<()>| {
///     let rows: u64 = req.uri().query()?.strip_prefix("rows=")?.parse().ok()?;
///     MilliSats::from_msat(10).checked_mul(rows).filter(|p| *p > MilliSats::ZERO)
/// };
/// let req = Request::get("/data?rows=30").body(()).unwrap();
/// assert_eq!(pricing.price(&req), Some(MilliSats::from_msat(300)));
/// ```
pub trait Pricing<B>: Clone + Send + Sync + 'static {
    /// Returns the price of `request`, or `None` if it is free.
    fn price(&self, request: &Request<B>) -> Option<MilliSats>;
}

impl<B> Pricing<B> for MilliSats {
    fn price(&self, _: &Request<B>) -> Option<MilliSats> {
        Some(*self)
    }
}

impl<B, F> Pricing<B> for F
where
    F: Fn(&Request<B>) -> Option<MilliSats> + Clone + Send + Sync + 'static,
{
    fn price(&self, request: &Request<B>) -> Option<MilliSats> {
        self(request)
    }
}

/// A price table keyed by method and exact path; requests not in the table are free (or cost
/// the [`fallback`](RoutePrices::fallback) price).
///
/// # Examples
///
/// ```
/// use http::{Method, Request};
/// use paychan::MilliSats;
/// use paychan::server::{Pricing, RoutePrices};
///
/// let prices = RoutePrices::new()
///     .route(Method::GET, "/weather", MilliSats::from_msat(500))
///     .route(Method::POST, "/translate", MilliSats::from_msat(20_000));
/// let req = |m: Method, p: &str| Request::builder().method(m).uri(p).body(()).unwrap();
/// assert_eq!(prices.price(&req(Method::GET, "/weather")), Some(MilliSats::from_msat(500)));
/// assert_eq!(prices.price(&req(Method::GET, "/health")), None);
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RoutePrices {
    routes: Arc<HashMap<Method, HashMap<String, MilliSats>>>,
    fallback: Option<MilliSats>,
}

impl RoutePrices {
    /// Creates an empty table: every request is free.
    pub fn new() -> Self {
        Self::default()
    }

    /// Prices `method path` at `price`.
    pub fn route(mut self, method: Method, path: impl Into<String>, price: MilliSats) -> Self {
        Arc::make_mut(&mut self.routes).entry(method).or_default().insert(path.into(), price);
        self
    }

    /// Prices every request not in the table at `price` (instead of free).
    pub fn fallback(mut self, price: MilliSats) -> Self {
        self.fallback = Some(price);
        self
    }

    /// Describes the table for the terms document: `[{"method", "path", "price_msat"}]`,
    /// plus `{"fallback_msat"}` when set.
    pub fn describe(&self) -> serde_json::Value {
        let mut routes: Vec<serde_json::Value> = self
            .iter()
            .map(|(method, path, price)| {
                serde_json::json!({ "method": method.as_str(), "path": path, "price_msat": price })
            })
            .collect();
        routes.sort_by_key(|route| (route["path"].to_string(), route["method"].to_string()));
        serde_json::json!({ "routes": routes, "fallback_msat": self.fallback })
    }

    /// Iterates over the priced routes.
    pub fn iter(&self) -> impl Iterator<Item = (&Method, &str, MilliSats)> {
        self.routes.iter().flat_map(|(method, paths)| {
            paths.iter().map(move |(path, price)| (method, path.as_str(), *price))
        })
    }
}

impl<B> Pricing<B> for RoutePrices {
    /// The route's price; a `HEAD` request not in the table costs what `GET` costs (axum and
    /// most routers answer `HEAD` with the `GET` handler).
    fn price(&self, request: &Request<B>) -> Option<MilliSats> {
        let path = request.uri().path();
        let lookup = |method: &Method| self.routes.get(method).and_then(|paths| paths.get(path));
        lookup(request.method())
            .or_else(|| (request.method() == Method::HEAD).then(|| lookup(&Method::GET)).flatten())
            .copied()
            .or(self.fallback)
    }
}
