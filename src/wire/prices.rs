//! The price table a server publishes in its terms (`prices`), read by the client.

use serde::Deserialize;

use crate::MilliSats;

/// The price table of a [`TermsDocument`](super::TermsDocument), as
/// [`RoutePrices::describe`](crate::server::RoutePrices::describe) writes it:
/// `{"routes": [{"method", "path", "price_msat"}], "fallback_msat", "unlisted"}`, paths with
/// `{name}` (one segment) and `{*name}` (the rest) patterns. The client prices the requests it
/// counts with it (see [`LossBound`](crate::client::LossBound)); a server with a pricing of
/// its own may publish anything else, and then the client has no table.
///
/// # Examples
///
/// ```
/// use paychan::MilliSats;
/// use paychan::wire::PriceList;
///
/// let prices = serde_json::json!({
///     "routes": [
///         {"method": "GET", "path": "/weather", "price_msat": 2000},
///         {"method": "GET", "path": "/files/{*path}", "price_msat": 500},
///         {"method": "GET", "path": "/public/{*rest}", "price_msat": 0},
///     ],
///     "fallback_msat": null,
///     "unlisted": "free",
/// });
/// let table = PriceList::from_terms(&prices).unwrap();
/// assert_eq!(table.price("GET", "/weather"), Some(MilliSats::from_msat(2_000)));
/// assert_eq!(table.price("HEAD", "/files/a/b"), Some(MilliSats::from_msat(500)));
/// assert_eq!(table.price("GET", "/public/x"), Some(MilliSats::ZERO));
/// assert_eq!(table.price("POST", "/other"), Some(MilliSats::ZERO)); // unlisted: free
/// assert!(PriceList::from_terms(&serde_json::json!("ask us")).is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceList {
    /// Exact routes, then patterns in the order a router tries them.
    routes: Vec<Route>,
    /// What an unlisted request costs: zero when free, `None` when refused (the server
    /// answers 404: nothing is served).
    unlisted: Option<MilliSats>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    method: String,
    pattern: PathPattern,
    price: MilliSats,
}

/// A route's path as a router reads it: literal segments, `{name}` (any one segment) and
/// `{*name}` (the rest of the path, one segment or more). The server's
/// [`RoutePrices`](crate::server::RoutePrices) and the client's [`PriceList`] match paths
/// with it, so both sides price a request alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathPattern(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl PathPattern {
    pub(crate) fn parse(path: &str) -> Self {
        Self(
            path.split('/')
                .map(|segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if name.starts_with('*') => Segment::Rest,
                    Some(_) => Segment::One,
                    None => Segment::Literal(segment.to_owned()),
                })
                .collect(),
        )
    }

    /// Whether the path has no parameter.
    pub(crate) fn is_exact(&self) -> bool {
        self.0.iter().all(|s| matches!(s, Segment::Literal(_)))
    }

    /// The order a router tries patterns in: a literal segment before a parameter, a parameter
    /// before the rest of the path (sort by it, stably).
    pub(crate) fn rank(&self) -> Vec<u8> {
        let rank = |segment: &Segment| match segment {
            Segment::Literal(_) => 0,
            Segment::One => 1,
            Segment::Rest => 2,
        };
        self.0.iter().map(rank).collect()
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        let mut parts = path.split('/');
        for segment in &self.0 {
            match segment {
                Segment::Rest => return parts.next().is_some_and(|first| !first.is_empty()),
                Segment::One => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                Segment::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

#[derive(Deserialize)]
struct Document {
    routes: Vec<RouteDocument>,
    #[serde(default)]
    fallback_msat: Option<MilliSats>,
    #[serde(default)]
    unlisted: Option<String>,
}

#[derive(Deserialize)]
struct RouteDocument {
    method: String,
    path: String,
    price_msat: MilliSats,
}

/// Routes read from one terms document at most.
const MAX_ROUTES: usize = 1_024;

impl PriceList {
    /// Reads the table from a terms document's `prices`; `None` when it is not one (a server
    /// with a pricing of its own), or too large to be one (more than 1 024 routes).
    pub fn from_terms(prices: &serde_json::Value) -> Option<Self> {
        let document = Document::deserialize(prices).ok()?;
        if document.routes.len() > MAX_ROUTES {
            return None;
        }
        let unlisted = match document.unlisted.as_deref() {
            None | Some("free") => Some(MilliSats::ZERO),
            Some("price") => Some(document.fallback_msat?),
            Some("refuse") => None,
            Some(_) => return None,
        };
        let mut routes: Vec<Route> = document
            .routes
            .into_iter()
            .map(|route| Route {
                method: route.method,
                pattern: PathPattern::parse(&route.path),
                price: route.price_msat,
            })
            .collect();
        // Exact routes first, then a literal segment before a parameter before the rest (a
        // stable sort: equals keep the table's order), as the server's router does.
        routes.sort_by_key(|route| (!route.pattern.is_exact(), route.pattern.rank()));
        Some(Self { routes, unlisted })
    }

    /// What `method path` costs by the table (zero when free); `None` for a request the server
    /// refuses as unlisted. `HEAD` costs what `GET` costs unless listed.
    pub fn price(&self, method: &str, path: &str) -> Option<MilliSats> {
        let listed = |method: &str| {
            let mut routes = self.routes.iter();
            let route = routes.find(|route| route.method == method && route.pattern.matches(path));
            route.map(|route| route.price)
        };
        let listed = match listed(method) {
            None if method == "HEAD" => listed("GET"),
            listed => listed,
        };
        listed.or(self.unlisted)
    }
}
