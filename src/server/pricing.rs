use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request};

use crate::MilliSats;
use crate::wire::PathPattern;

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

    /// Whether a request [`price`](Self::price) left unpriced is refused instead of served
    /// free: the layer then answers **404** `route-not-priced` without calling the inner
    /// service. `false` unless a pricing says otherwise ([`Unlisted::Refuse`]).
    fn refuses(&self, request: &Request<B>) -> bool {
        let _ = request;
        false
    }

    /// [`price`](Self::price) and, for a request it leaves unpriced,
    /// [`refuses`](Self::refuses), answered from one view of the prices: what the layer asks.
    /// The default calls the two. A pricing whose table can change between two calls (one
    /// reloaded while it serves) answers both from one snapshot: else a request could be
    /// found unpriced by the old table, not refused by the new one, and served free.
    fn priced(&self, request: &Request<B>) -> Priced {
        match self.price(request) {
            Some(price) => Priced::Price(price),
            None if self.refuses(request) => Priced::Refused,
            None => Priced::Free,
        }
    }
}

/// What a [`Pricing`] says of a request: its price, free, or refused (404 `route-not-priced`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priced {
    /// Charged this much.
    Price(MilliSats),
    /// Served free, unmetered.
    Free,
    /// Refused: not in the table, and the table refuses what it does not list.
    Refused,
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

/// A price table keyed by method and path. What a request not in the table gets is an
/// explicit choice, [`unlisted`](RoutePrices::unlisted): served free (the default, for health
/// checks and the like), charged a price, or refused with a 404 — choose `Refuse` when every
/// route of the API must be paid for, so a route added to the router but not to the table
/// is never served for free.
///
/// A path is matched exactly, or as a pattern in axum's syntax: `{name}` matches one segment,
/// `{*name}` the rest of the path (one segment or more). Exact paths win over patterns, and
/// among patterns the more specific wins, segment by segment (a literal over `{name}` over
/// `{*name}`), as in axum's router. A `HEAD` request not in the table costs
/// what the `GET` of the same path costs.
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
///
/// let prices = prices.route(Method::GET, "/cities/{city}/forecast", MilliSats::from_msat(900));
/// let forecast = req(Method::GET, "/cities/oslo/forecast");
/// assert_eq!(prices.price(&forecast), Some(MilliSats::from_msat(900)));
/// assert_eq!(prices.price(&req(Method::HEAD, "/weather")), Some(MilliSats::from_msat(500)));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RoutePrices {
    routes: Arc<HashMap<Method, HashMap<String, MilliSats>>>,
    patterns: Arc<Vec<Pattern>>,
    unlisted: Unlisted,
}

/// What a [`RoutePrices`] does with a request that is not in its table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unlisted {
    /// Served free, unmetered.
    #[default]
    Free,
    /// Charged this price.
    Price(MilliSats),
    /// Refused: 404 `route-not-priced`, the inner service is not called. Through
    /// [`Pricing::refuses`]: a pricing of your own that wraps a `RoutePrices` must forward
    /// `refuses` too, or unlisted routes are served free.
    Refuse,
}

/// A priced path with `{name}` or `{*name}` segments.
#[derive(Debug, Clone)]
struct Pattern {
    method: Method,
    path: String,
    pattern: PathPattern,
    price: MilliSats,
}

impl Pattern {
    fn parse(method: Method, path: String, price: MilliSats) -> Option<Self> {
        let pattern = PathPattern::parse(&path);
        (!pattern.is_exact()).then_some(Self { method, path, pattern, price })
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        *method == self.method && self.pattern.matches(path)
    }
}

impl RoutePrices {
    /// Creates an empty table: every request is free until priced, and unlisted requests stay
    /// free unless [`unlisted`](Self::unlisted) says otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// Prices `method path` at `price`; `path` may be a pattern (`/items/{id}`,
    /// `/files/{*path}`). A price of zero lists the route as free: served without a payment,
    /// and not refused under [`Unlisted::Refuse`].
    pub fn route(mut self, method: Method, path: impl Into<String>, price: MilliSats) -> Self {
        let path = path.into();
        match Pattern::parse(method.clone(), path.clone(), price) {
            Some(pattern) => {
                let patterns = Arc::make_mut(&mut self.patterns);
                patterns.push(pattern);
                // As routers do: a literal segment before a parameter, a parameter before the
                // rest of the path (the sort is stable: equals keep their order).
                patterns.sort_by_key(|p| p.pattern.rank());
            }
            None => {
                Arc::make_mut(&mut self.routes).entry(method).or_default().insert(path, price);
            }
        }
        self
    }

    /// What requests not in the table get (default [`Unlisted::Free`]).
    pub fn unlisted(mut self, unlisted: Unlisted) -> Self {
        self.unlisted = unlisted;
        self
    }

    /// Prices every request not in the table at `price`: `unlisted(Unlisted::Price(price))`.
    pub fn fallback(self, price: MilliSats) -> Self {
        self.unlisted(Unlisted::Price(price))
    }

    /// Describes the table for the terms document: `[{"method", "path", "price_msat"}]`,
    /// plus `{"fallback_msat"}` when unlisted requests are charged and `{"unlisted":
    /// "free" | "price" | "refuse"}`.
    pub fn describe(&self) -> serde_json::Value {
        let mut routes: Vec<serde_json::Value> = self
            .iter()
            .map(|(method, path, price)| {
                serde_json::json!({ "method": method.as_str(), "path": path, "price_msat": price })
            })
            .collect();
        routes.sort_by_key(|route| (route["path"].to_string(), route["method"].to_string()));
        let (unlisted, fallback) = match self.unlisted {
            Unlisted::Free => ("free", None),
            Unlisted::Price(price) => ("price", Some(price)),
            Unlisted::Refuse => ("refuse", None),
        };
        serde_json::json!({ "routes": routes, "fallback_msat": fallback, "unlisted": unlisted })
    }

    /// Iterates over the priced routes.
    pub fn iter(&self) -> impl Iterator<Item = (&Method, &str, MilliSats)> {
        let exact = self.routes.iter().flat_map(|(method, paths)| {
            paths.iter().map(move |(path, price)| (method, path.as_str(), *price))
        });
        exact.chain(self.patterns.iter().map(|p| (&p.method, p.path.as_str(), p.price)))
    }
}

impl<B> Pricing<B> for RoutePrices {
    /// The route's price; a `HEAD` request not in the table costs what `GET` costs (axum and
    /// most routers answer `HEAD` with the `GET` handler).
    fn price(&self, request: &Request<B>) -> Option<MilliSats> {
        let price = self.listed(request.method(), request.uri().path()).or(match self.unlisted {
            Unlisted::Price(price) => Some(price),
            Unlisted::Free | Unlisted::Refuse => None,
        });
        // Zero is free: nothing to meter.
        price.filter(|price| *price > MilliSats::ZERO)
    }

    fn refuses(&self, request: &Request<B>) -> bool {
        self.unlisted == Unlisted::Refuse
            && self.listed(request.method(), request.uri().path()).is_none()
    }
}

impl RoutePrices {
    /// The price of `method path` in the table.
    fn listed(&self, method: &Method, path: &str) -> Option<MilliSats> {
        let lookup = |method: &Method| {
            self.routes.get(method).and_then(|paths| paths.get(path)).or_else(|| {
                self.patterns.iter().find(|p| p.matches(method, path)).map(|p| &p.price)
            })
        };
        lookup(method)
            .or_else(|| (method == Method::HEAD).then(|| lookup(&Method::GET)).flatten())
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(prices: &RoutePrices, method: Method, path: &str) -> Option<u64> {
        let request = Request::builder().method(method).uri(path).body(()).unwrap();
        prices.price(&request).map(|p| p.to_msat())
    }

    #[test]
    fn a_zero_price_is_a_free_route_even_under_refuse() {
        let prices = RoutePrices::new()
            .route(Method::GET, "/health", MilliSats::ZERO)
            .route(Method::GET, "/public/{*rest}", MilliSats::ZERO)
            .route(Method::GET, "/paid", MilliSats::from_msat(7))
            .unlisted(Unlisted::Refuse);
        let request = |path: &str| Request::get(path).body(()).unwrap();
        for free in ["/health", "/public/a.css"] {
            assert_eq!(prices.price(&request(free)), None, "{free}");
            assert!(!prices.refuses(&request(free)), "{free}");
        }
        assert_eq!(prices.price(&request("/paid")), Some(MilliSats::from_msat(7)));
        assert!(prices.refuses(&request("/other")));
    }

    #[test]
    fn patterns_match_segments_and_exact_paths_win() {
        let msat = MilliSats::from_msat;
        let prices = RoutePrices::new()
            .route(Method::GET, "/items/{id}", msat(1))
            .route(Method::GET, "/items/special", msat(2))
            .route(Method::GET, "/files/{*path}", msat(3))
            .route(Method::POST, "/items/{id}/buy", msat(4));
        let get = Method::GET;
        assert_eq!(price(&prices, get.clone(), "/items/42"), Some(1));
        assert_eq!(price(&prices, get.clone(), "/items/special"), Some(2));
        assert_eq!(price(&prices, get.clone(), "/items/"), None, "an empty segment is no id");
        assert_eq!(price(&prices, get.clone(), "/items/42/more"), None);
        assert_eq!(price(&prices, get.clone(), "/files/a/b/c.txt"), Some(3));
        assert_eq!(price(&prices, get.clone(), "/files"), None);
        assert_eq!(price(&prices, Method::HEAD, "/files/x"), Some(3));
        assert_eq!(price(&prices, Method::POST, "/items/7/buy"), Some(4));
        assert_eq!(price(&prices, get.clone(), "/items/7/buy"), None, "methods are kept apart");
        let nested = prices.clone().route(Method::GET, "/files/premium/{n}", msat(5));
        assert_eq!(price(&nested, Method::GET, "/files/premium/1"), Some(5), "the specific wins");
        assert_eq!(price(&nested, Method::GET, "/files/other/1"), Some(3));
        let fallback = prices.clone().fallback(msat(9));
        assert_eq!(price(&fallback, get.clone(), "/health"), Some(9));
        let refuse = prices.clone().unlisted(Unlisted::Refuse);
        let request = |path: &str| Request::get(path).body(()).unwrap();
        assert!(refuse.refuses(&request("/health")), "unlisted is refused");
        assert!(!refuse.refuses(&request("/items/1")), "listed is not");
        assert!(!prices.refuses(&request("/health")), "free by default");
        assert_eq!(price(&refuse, get, "/health"), None);
        assert_eq!(prices.iter().count(), 4);
    }
}
