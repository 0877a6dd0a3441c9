//! The admin listener: Prometheus metrics (`/metrics`) and the console (`/`, its actions in
//! [`crate::console`]), all behind the admin token; and the middleware that observes every
//! request of the proxy.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get};
use base64::Engine as _;
use paychan::MilliSats;
use paychan::bitcoin::bip32::Xpriv;
use paychan::chain::ChainBackend;
use paychan::channel::ChannelState;
use paychan::settlement::SettlementMetrics;
use paychan::store::{ChannelRecord, ChannelStore};
use paychan::wire::{ChannelId, PROBLEM_JSON, Problem, ProblemCode, TERMS_PATH};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use crate::chain::Chain;
use crate::console::{self, Forms};
use crate::prices::Reloader;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `api` or `negotiation`.
    route: &'static str,
    /// `served`, `payment_required`, `refused`, `store_unavailable` or `upstream_error`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// What the proxy counts, and its revenue per hour since it started.
pub(crate) struct Observed {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<CodeLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    charged: Counter,
    shadow: Counter,
    channels: Family<StateLabels, Gauge>,
    settled: Gauge,
    closes_pending: Gauge,
    broadcast_failures: Gauge,
    cpfp_bumps: Gauge,
    failed_fundings: Gauge,
    /// Outages of the channel store seen by requests: each counted and logged once.
    store_outages: Counter,
    /// 1 from a request answered `store-unavailable` until the store serves again.
    store_down: Gauge,
    /// When the current store outage began.
    store_since: Mutex<Option<Instant>>,
    /// Whether a charge proves the store answered (not with leases: a debit drawn from a
    /// lease never reaches it).
    charges_reach_store: bool,
    rebroadcasts: Gauge,
    closes_below_mempool_minimum: Gauge,
    early_closes: Gauge,
    /// (hour start, msat charged in it), the last 48 hours.
    revenue: Mutex<VecDeque<(u64, u64)>>,
    /// Requests charged per channel since the proxy started (the store does not count them).
    by_channel: Mutex<HashMap<ChannelId, u64>>,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").finish_non_exhaustive()
    }
}

fn duration_family() -> Family<RequestLabels, Histogram> {
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_25, 2.0, 16)))
}

/// Registers a clone of `metric` under `name` and returns it.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Observed {
    pub(crate) fn new() -> Self {
        let mut r = Registry::with_prefix("paychan");
        let requests = "Requests by route and outcome";
        let refusals = "Problem answers (4xx) by their code";
        let duration = "Time to answer, by route and outcome";
        let charged = "What served requests were charged (an upstream 5xx is given back)";
        let shadow = "What shadow mode would have charged (served unpaid)";
        let channels = "Channels by state, at the settlement task's last pass";
        let settled = "What settlements confirmed since the proxy started paid";
        let pending = "Channels closing or closed, not yet settled";
        let failures = "Broadcasts of the settlement task that failed (each is retried)";
        let failed = "Channels failed because of their funding";
        let outages = "Outages of the channel store seen by requests (503 store-unavailable)";
        let down = "1 while the channel store is unavailable to requests";
        let rebroadcasts = "Settlements that had left the mempool, broadcast again";
        let stuck = "Settlements refused below the mempool minimum that no package could carry \
            (alert: configure a package relay)";
        let early =
            "Channels closed early: the mempool minimum neared their fee rate, no package path";
        Self {
            requests: register(&mut r, "requests", requests, Family::default()),
            refusals: register(&mut r, "refusals", refusals, Family::default()),
            duration: register(&mut r, "request_duration_seconds", duration, duration_family()),
            charged: register(&mut r, "charged_msat", charged, Counter::default()),
            shadow: register(&mut r, "shadow_charged_msat", shadow, Counter::default()),
            channels: register(&mut r, "channels", channels, Family::default()),
            settled: register(&mut r, "settled_sat", settled, Gauge::default()),
            closes_pending: register(&mut r, "closes_pending", pending, Gauge::default()),
            broadcast_failures: register(
                &mut r,
                "settlement_broadcast_failures",
                failures,
                Gauge::default(),
            ),
            cpfp_bumps: register(&mut r, "cpfp_bumps", "CPFP children broadcast", Gauge::default()),
            failed_fundings: register(&mut r, "failed_fundings", failed, Gauge::default()),
            store_outages: register(&mut r, "store_outages", outages, Counter::default()),
            store_down: register(&mut r, "store_unavailable", down, Gauge::default()),
            store_since: Mutex::default(),
            charges_reach_store: true,
            rebroadcasts: register(
                &mut r,
                "settlement_rebroadcasts",
                rebroadcasts,
                Gauge::default(),
            ),
            closes_below_mempool_minimum: register(
                &mut r,
                "closes_below_mempool_minimum",
                stuck,
                Gauge::default(),
            ),
            early_closes: register(&mut r, "early_closes", early, Gauge::default()),
            revenue: Mutex::default(),
            by_channel: Mutex::default(),
            registry: r,
        }
    }

    /// A request was refused because the store could not be reached: the first of an outage
    /// is logged and counted.
    fn store_unavailable(&self) {
        let mut since = self.store_since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            self.store_outages.inc();
            self.store_down.set(1);
            tracing::error!(
                "the channel store is unavailable: paid requests are answered 503 store-unavailable until it is back"
            );
        }
    }

    /// Charges are drawn from leases ([`paychan::store::Leased`]): they say nothing of the
    /// store, so they do not end an outage (`serve` asks the store itself then).
    pub(crate) fn with_leases(mut self) -> Self {
        self.charges_reach_store = false;
        self
    }

    /// The billing events' metrics (`[events]`), registered with the others.
    pub(crate) fn with_events(mut self, events: &crate::events::Metrics) -> Self {
        let r = &mut self.registry;
        let logged = "Billing events appended to the event log";
        let delivered = "Billing events the webhook accepted (2xx)";
        let failures = "Webhook attempts that failed (each is retried, in order)";
        let pending = "Billing events in the log not yet accepted by the webhook";
        register(r, "events_logged", logged, events.logged.clone());
        register(r, "webhook_delivered", delivered, events.delivered.clone());
        register(r, "webhook_failures", failures, events.failures.clone());
        register(r, "webhook_pending", pending, events.pending.clone());
        self
    }

    /// Whether requests found the store unavailable and it has not answered since.
    pub(crate) fn store_is_down(&self) -> bool {
        self.store_since.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The store answered: an outage, if any, is over.
    pub(crate) fn store_available(&self) {
        let mut since = self.store_since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(began) = since.take() {
            self.store_down.set(0);
            tracing::warn!(outage_secs = began.elapsed().as_secs(), "the channel store is back");
        }
    }

    /// Counts `price` as charged now (its debit reached the store, or a lease).
    pub(crate) fn charge(&self, price: MilliSats) {
        if self.charges_reach_store {
            self.store_available();
        }
        self.charged.inc_by(price.to_msat());
        let hour = now() / 3_600 * 3_600;
        let mut revenue = self.revenue.lock().unwrap_or_else(|p| p.into_inner());
        match revenue.back_mut() {
            Some((start, msat)) if *start == hour => *msat += price.to_msat(),
            _ => revenue.push_back((hour, price.to_msat())),
        }
        while revenue.len() > 48 {
            revenue.pop_front();
        }
    }

    /// Counts a request charged on `channel`.
    pub(crate) fn charged_on(&self, channel: ChannelId) {
        *self.by_channel.lock().unwrap_or_else(|p| p.into_inner()).entry(channel).or_default() += 1;
    }

    /// The requests charged per channel since the proxy started.
    pub(crate) fn requests_by_channel(&self) -> HashMap<ChannelId, u64> {
        self.by_channel.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts `price` as what shadow mode would have charged.
    pub(crate) fn shadow(&self, price: MilliSats) {
        self.shadow.inc_by(price.to_msat());
    }

    /// Copies the settlement task's counters.
    fn settlement(&self, metrics: &SettlementMetrics) {
        for state in ChannelState::ALL {
            let count = metrics.channels.get(state.as_str()).copied().unwrap_or(0);
            self.channels.get_or_create(&StateLabels { state: state.as_str() }).set(count as i64);
        }
        self.settled.set(i64::try_from(metrics.sats_settled.to_sat()).unwrap_or(i64::MAX));
        self.closes_pending.set(metrics.closes_pending as i64);
        self.broadcast_failures.set(metrics.broadcast_failures as i64);
        self.cpfp_bumps.set(metrics.cpfp_bumps as i64);
        self.failed_fundings.set(metrics.failed_fundings as i64);
        self.rebroadcasts.set(metrics.rebroadcasts as i64);
        self.closes_below_mempool_minimum.set(metrics.closes_below_mempool_minimum as i64);
        self.early_closes.set(metrics.early_closes as i64);
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The middleware around the whole proxy: counts every answer, its time, and the code of
/// every problem answer.
pub(crate) async fn observe(
    State(observed): State<Arc<Observed>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let route = if path.starts_with(TERMS_PATH) || path.starts_with("/payment-channel/") {
        "negotiation"
    } else {
        "api"
    };
    // The terms are answered from memory: their success says nothing of the store.
    let reads_store = !path.starts_with(TERMS_PATH);
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let rejection = response.extensions().get::<paychan::server::Rejection>();
    let store_down = rejection
        .is_some_and(|r| matches!(r.kind(), paychan::server::RejectionKind::StoreUnavailable));
    if store_down {
        observed.store_unavailable();
    } else if route == "negotiation" && reads_store && status.is_success() {
        observed.store_available();
    }
    let outcome = match status {
        _ if store_down => "store_unavailable",
        StatusCode::PAYMENT_REQUIRED => "payment_required",
        s if s.is_server_error() => "upstream_error",
        s if s.is_client_error() => "refused",
        _ => "served",
    };
    let labels = RequestLabels { route, outcome };
    observed.requests.get_or_create(&labels).inc();
    observed.duration.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
    // The layer's refusals carry their reason: no body to read.
    if let Some(rejection) = response.extensions().get::<paychan::server::Rejection>() {
        let code = rejection.kind().code().as_str().to_owned();
        observed.refusals.get_or_create(&CodeLabels { code }).inc();
        return response;
    }
    let problem = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == PROBLEM_JSON);
    // Another problem document (the negotiation's, or the upstream's): read its code only
    // when it is known to be small, and pass the same bytes on; never replace an answer.
    let small = http_body::Body::size_hint(response.body()).upper().is_some_and(|n| n <= 64 * 1024);
    if !(status.is_client_error() && problem && small) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (StatusCode::BAD_GATEWAY, "the answer's body failed").into_response();
    };
    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    observed.refusals.get_or_create(&CodeLabels { code }).inc();
    Response::from_parts(parts, Body::from(bytes))
}

/// What the admin routes read and act on.
pub(crate) struct Admin<St> {
    pub(crate) store: St,
    pub(crate) chain: Chain,
    /// The master key: the close action signs with it.
    pub(crate) master: Xpriv,
    pub(crate) observed: Arc<Observed>,
    pub(crate) settlement: Box<dyn Fn() -> SettlementMetrics + Send + Sync>,
    pub(crate) token: String,
    pub(crate) title: String,
    /// A block explorer's transaction page, `{txid}` in it.
    pub(crate) explorer: Option<String>,
    pub(crate) reloader: Arc<Reloader>,
}

/// The admin router: the metrics at `metrics_path`, the page at `/` and its actions (`POST
/// /close`, `POST /reload-prices`), behind the token.
pub(crate) fn router<St: ChannelStore + 'static>(
    admin: Arc<Admin<St>>,
    metrics_path: &str,
) -> Router {
    Router::new()
        .route(metrics_path, get(metrics::<St>))
        .route("/", get(page::<St>))
        .route("/close", any(console::close::<St>))
        .route("/reload-prices", any(console::reload::<St>))
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                ProblemCode::from_static("not-found"),
                "no such page",
            )
        })
        .with_state(admin)
}

/// The token of `?token=…`, as written.
pub(crate) fn query_token(query: Option<&str>) -> Option<String> {
    query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")).map(str::to_owned))
}

/// The token, from `Authorization: Bearer …`, Basic auth's password, or `?token=…`.
pub(crate) fn authorized(expected: &str, headers: &HeaderMap, query: Option<&str>) -> bool {
    let from_header =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|value| {
            match value.split_once(' ') {
                Some(("Bearer", token)) => Some(token.to_owned()),
                Some(("Basic", encoded)) => base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()
                    .and_then(|pair| String::from_utf8(pair).ok())
                    .and_then(|pair| pair.split_once(':').map(|(_, password)| password.to_owned())),
                _ => None,
            }
        });
    [from_header, query_token(query)]
        .into_iter()
        .flatten()
        .any(|given| same(given.as_bytes(), expected.as_bytes()))
}

/// Compares without an early exit on the first differing byte.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn unauthorized() -> Response {
    let code = ProblemCode::from_static("admin-token-required");
    let problem = Problem::new(StatusCode::UNAUTHORIZED, code, "the admin token is required");
    let mut response = problem.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"paychan admin\""),
    );
    response
}

async fn metrics<St: ChannelStore>(
    State(admin): State<Arc<Admin<St>>>,
    request: Request,
) -> Response {
    if !authorized(&admin.token, request.headers(), request.uri().query()) {
        return unauthorized();
    }
    admin.observed.settlement(&(admin.settlement)());
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &admin.observed.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}

/// Escapes text for HTML.
pub(crate) fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

pub(crate) fn sat(msat: MilliSats) -> String {
    format!("{:.3}", msat.to_msat() as f64 / 1_000.0)
}

async fn page<St: ChannelStore>(State(admin): State<Arc<Admin<St>>>, request: Request) -> Response {
    if !authorized(&admin.token, request.headers(), request.uri().query()) {
        return unauthorized();
    }
    let token = query_token(request.uri().query()).unwrap_or_default();
    page_html(&admin, &token, None).await
}

/// What the page shows: the books, and the channels with their txids and actions.
struct View<'a> {
    title: &'a str,
    tip: Option<u32>,
    by_state: Vec<(ChannelState, usize)>,
    channels: Vec<ChannelRecord>,
    settlement: SettlementMetrics,
    allocated: MilliSats,
    charged: MilliSats,
    /// The result of the action this page answers, if any.
    notice: Option<Result<String, String>>,
    /// How the last price reload went.
    reloaded: Option<Result<String, String>>,
    forms: Forms<'a>,
}

/// The page, with the result of an action on top (`notice`). `token` is the token of the
/// page's URL (`?token=…`), if it came there, for the forms' actions.
pub(crate) async fn page_html<St: ChannelStore>(
    admin: &Admin<St>,
    token: &str,
    notice: Option<Result<String, String>>,
) -> Response {
    let tip = admin.chain.tip().await.ok().map(|tip| tip.height);
    let mut by_state = Vec::new();
    let mut channels: Vec<ChannelRecord> = Vec::new();
    for state in ChannelState::ALL {
        match admin.store.list(state).await {
            Ok(records) => {
                by_state.push((state, records.len()));
                channels.extend(records);
            }
            Err(error) => {
                let code = ProblemCode::StoreUnavailable;
                let problem = Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, error);
                return problem.into_response();
            }
        }
    }
    let allocated = channels
        .iter()
        .filter(|r| matches!(r.state, ChannelState::Open | ChannelState::Pending))
        .fold(MilliSats::ZERO, |sum, r| sum.saturating_add(r.unspent()));
    let auth = if token.is_empty() { String::new() } else { format!("?token={token}") };
    let view = View {
        title: &admin.title,
        tip,
        by_state,
        channels,
        settlement: (admin.settlement)(),
        allocated,
        charged: MilliSats::from_msat(admin.observed.charged.get()),
        notice,
        reloaded: admin.reloader.last(),
        forms: Forms {
            explorer: admin.explorer.as_deref(),
            csrf: console::csrf_value(&admin.token),
            auth,
        },
    };
    // No framing (the page has buttons), no caching, no referrer to other sites (its URL may
    // hold the token). Not `no-referrer`: browsers then send `Origin: null` with the page's
    // own forms, which the actions refuse.
    let headers = [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "same-origin"),
    ];
    (headers, Html(render(&view, &admin.observed))).into_response()
}

fn render(view: &View<'_>, observed: &Observed) -> String {
    let mut html = String::new();
    let tip_text = view.tip.map_or("unknown".to_owned(), |t| t.to_string());
    // An action's answer is not refreshed: a refresh would post it again.
    let refresh =
        if view.notice.is_none() { r#"<meta http-equiv="refresh" content="30">"# } else { "" };
    let _ = write!(
        html,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">{refresh}<meta name="referrer" content="same-origin">
<title>paychan admin</title><style>
body{{font:14px system-ui,sans-serif;margin:2rem;color:#1d2330;background:#f7f8fa}}
h1{{font-size:1.4rem;margin:0 0 .2rem}} .sub{{color:#5b6475;margin-bottom:1.5rem}}
.cards{{display:flex;gap:1rem;flex-wrap:wrap;margin-bottom:1.5rem}}
.card{{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:.8rem 1rem;min-width:10rem}}
.card b{{display:block;font-size:1.3rem}} table{{border-collapse:collapse;background:#fff;width:100%;margin-bottom:1.5rem}}
th,td{{border-bottom:1px solid #e6e9ef;padding:.35rem .6rem;text-align:right}} th{{background:#eef1f6}}
td:first-child,th:first-child{{text-align:left;font-family:ui-monospace,monospace}}
.bar{{background:#f2a900;height:.8rem;display:inline-block}} h2{{font-size:1.1rem}}
.tx{{font-family:ui-monospace,monospace}} form{{margin:0}} .err{{color:#a11}}
.notice{{border-radius:8px;padding:.7rem 1rem;margin-bottom:1.5rem;border:1px solid}}
.notice.ok{{background:#eaf7ee;border-color:#9bd3ad}} .notice.err{{background:#fdeceb;border-color:#e9a29c;color:#a11}}
</style></head><body><h1>paychan</h1><div class="sub">{title} · chain tip {tip_text}</div>"#,
        title = esc(view.title),
    );
    if let Some(notice) = &view.notice {
        html.push_str(&console::notice(notice));
    }
    html.push_str(r#"<div class="cards">"#);
    for (state, count) in &view.by_state {
        let _ = write!(
            html,
            r#"<div class="card">{}<b id="count-{0}">{count}</b></div>"#,
            state.as_str()
        );
    }
    let _ = write!(
        html,
        r#"<div class="card">charged since start<b id="charged">{} sat</b></div><div class="card">would have charged (shadow)<b id="shadow">{} sat</b></div><div class="card">settled since start<b>{} sat</b></div><div class="card">open allocations<b>{} sat</b></div><div class="card">closes pending<b>{}</b></div></div>"#,
        sat(view.charged),
        sat(MilliSats::from_msat(observed.shadow.get())),
        view.settlement.sats_settled.to_sat(),
        sat(view.allocated),
        view.settlement.closes_pending,
    );
    html.push_str(&revenue_rows(observed));
    html.push_str(&channel_rows(&view.channels, view.tip, &view.forms));
    html.push_str(&console::client_rows(&view.channels, observed));
    html.push_str(&settlement_rows(&view.channels, &view.forms));
    html.push_str(&view.forms.prices(view.reloaded.as_ref()));
    html.push_str("</body></html>");
    html
}

/// The revenue per hour, since the proxy started.
fn revenue_rows(observed: &Observed) -> String {
    let mut html = String::from(
        "<h2>Revenue per hour (charged, since the proxy started)</h2><table><tr><th>hour (UTC)</th><th>sat</th><th style=\"width:50%\"></th></tr>",
    );
    let revenue: Vec<(u64, u64)> =
        observed.revenue.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
    let most = revenue.iter().map(|(_, msat)| *msat).max().unwrap_or(1).max(1);
    for (hour, msat) in revenue.iter().rev() {
        let width = msat * 100 / most;
        let _ = write!(
            html,
            r#"<tr><td>{}</td><td>{}</td><td style="text-align:left"><span class="bar" style="width:{width}%"></span></td></tr>"#,
            hour_text(*hour),
            sat(MilliSats::from_msat(*msat)),
        );
    }
    if revenue.is_empty() {
        html.push_str("<tr><td colspan=\"3\">nothing charged yet</td></tr>");
    }
    html.push_str("</table>");
    html
}

/// The closes broadcast and not yet confirmed (closing: not yet out).
fn settlement_rows(channels: &[ChannelRecord], forms: &Forms<'_>) -> String {
    let mut html = String::from(
        "<h2>Settlements pending</h2><table><tr><th>channel</th><th>state</th><th>pays (sat)</th><th>close txid</th></tr>",
    );
    let pending = channels
        .iter()
        .filter(|r| matches!(r.state, ChannelState::Closing | ChannelState::Closed))
        .collect::<Vec<_>>();
    for record in &pending {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"tx\">{}</td></tr>",
            esc(&record.id().to_string()),
            record.state.as_str(),
            sat(record.paid()),
            close_cell(record, forms),
        );
    }
    if pending.is_empty() {
        html.push_str("<tr><td colspan=\"4\">none</td></tr>");
    }
    html.push_str("</table>");
    html
}

/// A channel's close txid (linked), or `–` when the store has none.
fn close_cell(record: &ChannelRecord, forms: &Forms<'_>) -> String {
    console::close_txid(record).map_or("–".to_owned(), |txid| forms.txid(txid, &txid.to_string()))
}

/// The channels table (the first 500): the funding and close txids, and a close button. A
/// channel past open (closing, closed, settled, failed) has no live balance nor blocks to
/// close: `–` there, and the state says why.
fn channel_rows(channels: &[ChannelRecord], tip: Option<u32>, forms: &Forms<'_>) -> String {
    let mut html = String::from(
        "<h2>Channels</h2><table id=\"channels\"><tr><th>channel (funding)</th><th>state</th><th>paid (sat)</th><th>spent (sat)</th><th>balance (sat)</th><th>expiry</th><th>blocks to close</th><th>close txid</th><th></th></tr>",
    );
    for record in channels.iter().take(500) {
        let live = matches!(record.state, ChannelState::Open | ChannelState::Pending);
        let close_by = record.snapshot(MilliSats::ZERO, MilliSats::ZERO).close_by;
        let left = match tip {
            Some(tip) if live && record.channel.params().expiry.is_block_height() => {
                (i64::from(close_by) - i64::from(tip)).to_string()
            }
            _ => "–".to_owned(),
        };
        let balance = if live { sat(record.balance()) } else { "–".to_owned() };
        let funding = record.channel.outpoint();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{balance}</td><td>{}</td><td>{left}</td><td class=\"tx\">{}</td><td>{}</td></tr>",
            forms.txid(funding.txid, &record.id().to_string()),
            record.state.as_str(),
            sat(record.paid()),
            sat(record.spent),
            record.channel.params().expiry,
            close_cell(record, forms),
            forms.close_button(record),
        );
    }
    if channels.is_empty() {
        html.push_str("<tr><td colspan=\"9\">no channels yet</td></tr>");
    }
    html.push_str("</table>");
    html
}

/// `YYYY-MM-DD HH:00` of a Unix hour.
fn hour_text(unix: u64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = (unix / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:00", unix % 86_400 / 3_600)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A settled (or closing, closed, failed) channel shows no balance nor blocks to close: it
    /// has neither any more; an open one shows both.
    #[test]
    fn only_live_channels_show_a_balance_and_blocks_to_close() {
        use paychan::bitcoin::secp256k1::{Secp256k1, SecretKey};
        use paychan::bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, absolute};
        use paychan::channel::{ChainTip, Terms};
        let key = |b: u8| SecretKey::from_slice(&[b; 32]).unwrap();
        let public = |b: u8| CompressedPublicKey(key(b).public_key(&Secp256k1::new()));
        let script = |b: u8| ScriptBuf::new_p2wpkh(&public(b).wpubkey_hash());
        let tip = ChainTip { height: 100, median_time_past: 0 };
        let expiry = absolute::LockTime::from_height(1_100).unwrap();
        let params = Terms::default()
            .agree(
                public(1),
                public(2),
                Amount::from_sat(100_000),
                expiry,
                script(1),
                script(2),
                tip,
            )
            .unwrap();
        let channel = params.at(OutPoint::null());
        let mut first = channel.build_payment(Amount::from_sat(5_000)).unwrap();
        channel.sign_payment(&mut first, &key(1)).unwrap();
        let close_txid = first.compute_txid().to_string();
        let open = ChannelRecord::open(channel, 0, first);
        let forms = Forms { explorer: None, csrf: "c5rf".into(), auth: String::new() };
        let rows = |record: ChannelRecord| channel_rows(&[record], Some(100), &forms);
        let live = rows(open.clone());
        assert!(live.contains("<td>5000.000</td><td>0.000</td><td>5000.000</td>"), "{live}");
        assert!(!live.contains("<td>–</td>"), "{live}");
        assert!(live.contains("<td class=\"tx\">–</td>"), "no close yet: {live}");
        assert!(live.contains("action=\"/close\"") && live.contains("value=\"c5rf\""), "{live}");
        for state in [
            ChannelState::Closing,
            ChannelState::Closed,
            ChannelState::Settled,
            ChannelState::Failed,
        ] {
            let row = rows(open.clone().with_state(state));
            assert!(row.contains("<td>5000.000</td><td>0.000</td><td>–</td>"), "{state:?}: {row}");
            assert!(row.contains("<td>–</td><td class=\"tx\">"), "{state:?}: {row}");
            let closed = matches!(state, ChannelState::Closed | ChannelState::Settled);
            assert_eq!(row.contains(&close_txid), closed, "{state:?}: the close txid: {row}");
            let closable = state == ChannelState::Closing;
            assert_eq!(row.contains("action=\"/close\""), closable, "{state:?}: {row}");
        }
    }

    #[test]
    fn the_token_is_read_from_bearer_basic_or_the_query() {
        let mut headers = HeaderMap::new();
        assert!(!authorized("s3cret", &headers, None));
        assert!(authorized("s3cret", &headers, Some("a=1&token=s3cret")));
        assert!(!authorized("s3cret", &headers, Some("token=s3cre")));
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorized("s3cret", &headers, None));
        headers.insert(header::AUTHORIZATION, "Basic YWRtaW46czNjcmV0".parse().unwrap()); // admin:s3cret
        assert!(authorized("s3cret", &headers, None));
        headers.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(!authorized("s3cret", &headers, None));
    }

    #[tokio::test]
    async fn a_store_outage_is_its_own_outcome_logged_and_counted_once() {
        use tower::ServiceExt as _;
        let observed = Arc::new(Observed::new());
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let store = Arc::clone(&down);
        let app = Router::new()
            .fallback(move || {
                let down = store.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if down {
                        let rejection = paychan::server::Rejection::from(
                            paychan::store::StoreError::unavailable("connection refused"),
                        );
                        let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
                        response.extensions_mut().insert(rejection);
                        response
                    } else {
                        "served".into_response()
                    }
                }
            })
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&observed), observe));
        let call = async |app: &Router| {
            let request = Request::get("/api").body(Body::empty()).unwrap();
            app.clone().oneshot(request).await.unwrap().status()
        };
        let count = |outcome: &'static str| {
            observed.requests.get_or_create(&RequestLabels { route: "api", outcome }).get()
        };
        for _ in 0..3 {
            assert_eq!(call(&app).await, StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!((count("store_unavailable"), count("upstream_error")), (3, 0));
        assert_eq!((observed.store_outages.get(), observed.store_down.get()), (1, 1));
        // A charged request reached the store: the outage is over; the next one is new.
        down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(call(&app).await, StatusCode::OK);
        observed.charge(MilliSats::from_msat(1_000));
        assert_eq!(observed.store_down.get(), 0);
        down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(call(&app).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(observed.store_outages.get(), 2);
    }

    /// Review 2026-12 (server side): `GET /payment-channel/terms` (and `/open`, whose proposals live in memory)
    /// succeed without the store, yet a negotiation success is taken as "the store is back":
    /// during one outage every new client reading the terms ends the outage, and the next paid
    /// request starts (counts and logs at error level) a new one. A leased node's charges
    /// (drawn from its lease, no store round trip) do the same.
    #[tokio::test]
    async fn a_store_outage_is_counted_once_while_clients_read_the_terms() {
        use tower::ServiceExt as _;
        let observed = Arc::new(Observed::new());
        let app = Router::new()
            .route(TERMS_PATH, axum::routing::get(|| async { "terms" }))
            .fallback(|| async {
                let rejection = paychan::server::Rejection::from(
                    paychan::store::StoreError::unavailable("connection refused"),
                );
                let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
                response.extensions_mut().insert(rejection);
                response
            })
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&observed), observe));
        let call = async |path: &str| {
            let request = Request::get(path).body(Body::empty()).unwrap();
            app.clone().oneshot(request).await.unwrap().status()
        };
        for _ in 0..3 {
            assert_eq!(call("/api").await, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(call(TERMS_PATH).await, StatusCode::OK);
        }
        assert_eq!(observed.store_outages.get(), 1, "one outage, the store never came back");
    }

    /// The other half of that review: a leased node's charges are drawn from its leases, not
    /// the store, so they do not end an outage; the store answering does.
    #[test]
    fn a_leased_nodes_charges_do_not_end_a_store_outage() {
        let observed = Observed::new().with_leases();
        observed.store_unavailable();
        observed.charge(MilliSats::from_msat(1_000));
        assert!(observed.store_is_down(), "a charge from a lease says nothing of the store");
        observed.store_unavailable();
        assert_eq!(observed.store_outages.get(), 1, "still the same outage");
        observed.store_available();
        assert!(!observed.store_is_down());
        assert_eq!(observed.store_down.get(), 0);
        // Without leases a charge reached the store.
        let direct = Observed::new();
        direct.store_unavailable();
        direct.charge(MilliSats::from_msat(1_000));
        assert!(!direct.store_is_down());
    }

    #[test]
    fn hours_are_civil_dates() {
        assert_eq!(hour_text(0), "1970-01-01 00:00");
        assert_eq!(hour_text(1_795_867_200), "2026-11-28 12:00");
        assert_eq!(hour_text(951_782_400 + 7_200), "2000-02-29 02:00");
    }
}
