//! The admin page's actions (close a channel, reload the prices) and what the page shows
//! besides the books: txids linked to a block explorer, and the channels per client.
//!
//! An action is a `POST` from a form of the page, never a `GET`. It needs the admin token (as
//! every admin request) and, against cross-site request forgery, the page's CSRF value (an
//! HMAC of the token, so a site that does not know the token cannot forge it, even when the
//! browser sends Basic credentials by itself), and it is refused when the browser says it
//! comes from another site (`Sec-Fetch-Site`, `Origin`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use paychan::MilliSats;
use paychan::bitcoin::hashes::hmac::{Hmac, HmacEngine};
use paychan::bitcoin::hashes::{Hash as _, HashEngine as _, sha256};
use paychan::bitcoin::{CompressedPublicKey, Txid};
use paychan::channel::ChannelState;
use paychan::store::{ChannelRecord, ChannelStore};
use paychan::wire::{ChannelId, Problem, ProblemCode};

use crate::admin::{self, Admin, Observed, esc, sat};

/// The largest form an action reads.
const MAX_FORM: usize = 4 * 1024;

/// The CSRF value of the page's forms: HMAC-SHA256 of a fixed label, keyed by the token.
pub(crate) fn csrf_value(token: &str) -> String {
    let mut engine = HmacEngine::<sha256::Hash>::new(token.as_bytes());
    engine.input(b"paychan admin console: csrf");
    Hmac::<sha256::Hash>::from_engine(engine).to_string()
}

/// Why a `POST` is refused as forged, or `None`: a browser's word that it comes from another
/// site, or a CSRF value missing or not the token's.
fn forged(token: &str, headers: &HeaderMap, csrf: Option<&str>) -> Option<&'static str> {
    let value = |name| headers.get(name).map(|v| v.to_str().unwrap_or("?"));
    if value("sec-fetch-site").is_some_and(|site| !matches!(site, "same-origin" | "none")) {
        return Some("the browser says this request comes from another site (Sec-Fetch-Site)");
    }
    if let Some(origin) = value(header::ORIGIN.as_str()) {
        let host = value(header::HOST.as_str()).unwrap_or_default();
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|authority| !host.is_empty() && authority == host);
        if !same {
            return Some("the request comes from another origin (Origin)");
        }
    }
    match csrf {
        None => Some("the form's CSRF value is missing"),
        Some(given) if admin::same(given.as_bytes(), csrf_value(token).as_bytes()) => None,
        Some(_) => Some("the form's CSRF value is not this token's"),
    }
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
fn field(form: &str, name: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (crate::serve::percent_decode(&key.replace('+', " ")) == name)
            .then(|| crate::serve::percent_decode(&value.replace('+', " ")))
    })
}

fn refuse(status: StatusCode, code: &'static str, detail: impl std::fmt::Display) -> Response {
    Problem::new(status, ProblemCode::from_static(code), detail).into_response()
}

/// The form of an action, once the request is a `POST` with the token and the page's CSRF
/// value from the page's own origin; else the refusal (a problem document).
async fn checked_form<St>(
    admin: &Admin<St>,
    request: Request,
) -> Result<(String, String), Response> {
    if request.method() != Method::POST {
        let mut refused = refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "an action is a POST from the admin page's form",
        );
        refused.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return Err(refused);
    }
    let (parts, body) = request.into_parts();
    if !admin::authorized(&admin.token, &parts.headers, parts.uri.query()) {
        return Err(admin::unauthorized());
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
        return Err(refuse(StatusCode::PAYLOAD_TOO_LARGE, "bad-request", "the form is too large"));
    };
    let form = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(why) = forged(&admin.token, &parts.headers, field(&form, "csrf").as_deref()) {
        tracing::warn!("admin action refused: {why}");
        return Err(refuse(StatusCode::FORBIDDEN, "csrf-refused", why));
    }
    Ok((form, admin::query_token(parts.uri.query()).unwrap_or_default()))
}

/// `POST /close` (`channel=txid:vout`): the closing procedure of `paychan close`, once; the
/// page shows what it did.
pub(crate) async fn close<St: ChannelStore>(
    State(admin): State<Arc<Admin<St>>>,
    request: Request,
) -> Response {
    let (form, token) = match checked_form(&admin, request).await {
        Ok(checked) => checked,
        Err(refused) => return refused,
    };
    let Some(id) = field(&form, "channel").and_then(|id| id.parse::<ChannelId>().ok()) else {
        return refuse(StatusCode::BAD_REQUEST, "bad-request", "channel: not txid:vout");
    };
    let done = crate::operator::close_once(&admin.store, &admin.chain, &admin.master, id).await;
    let notice = done.map_err(|error| error.to_string());
    match &notice {
        Ok(done) => tracing::info!("admin page: {done}"),
        Err(error) => tracing::warn!("admin page: close of {id}: {error}"),
    }
    admin::page_html(&admin, &token, Some(notice)).await
}

/// `POST /reload-prices`: the prices of the config file, as SIGHUP reloads them.
pub(crate) async fn reload<St: ChannelStore>(
    State(admin): State<Arc<Admin<St>>>,
    request: Request,
) -> Response {
    let (_, token) = match checked_form(&admin, request).await {
        Ok(checked) => checked,
        Err(refused) => return refused,
    };
    let notice = admin.reloader.reload("the admin page");
    admin::page_html(&admin, &token, Some(notice)).await
}

/// What the page's links and forms need.
pub(crate) struct Forms<'a> {
    /// The explorer's transaction page, `{txid}` in it.
    pub(crate) explorer: Option<&'a str>,
    /// The CSRF value.
    pub(crate) csrf: String,
    /// `?token=…` when the page was opened with the token in its URL (a browser sends no
    /// bearer token), for the forms' actions; else empty.
    pub(crate) auth: String,
}

impl Forms<'_> {
    /// `txid` (shown as `text`), linked to the explorer when there is one. No referrer goes
    /// with it: the page's URL may hold the token.
    pub(crate) fn txid(&self, txid: Txid, text: &str) -> String {
        match self.explorer {
            Some(template) => format!(
                r#"<a href="{}" rel="noreferrer noopener" target="_blank">{}</a>"#,
                esc(&template.replace("{txid}", &txid.to_string())),
                esc(text)
            ),
            None => esc(text),
        }
    }

    /// A form that posts to `action` with the CSRF value and `hidden` fields.
    fn form(&self, action: &str, hidden: &[(&str, String)], button: &str, confirm: &str) -> String {
        let mut html = format!(
            r#"<form method="post" action="{action}{}" onsubmit="return confirm('{}')"><input type="hidden" name="csrf" value="{}">"#,
            esc(&self.auth),
            esc(confirm),
            esc(&self.csrf)
        );
        for (name, value) in hidden {
            let _ = write!(html, r#"<input type="hidden" name="{name}" value="{}">"#, esc(value));
        }
        let _ = write!(html, "<button>{button}</button></form>");
        html
    }

    /// The close button of a channel that can be closed (pending, open, or closing: again).
    pub(crate) fn close_button(&self, record: &ChannelRecord) -> String {
        let closable = matches!(
            record.state,
            ChannelState::Pending | ChannelState::Open | ChannelState::Closing
        );
        if !closable {
            return String::new();
        }
        let id = record.id().to_string();
        // Not a fair close: the server settles at the best payment and keeps what was prepaid
        // but not served (SECURITY.md).
        let confirm = "Close this channel now at its best payment? Its client can no longer pay \
            on it, and what it prepaid but was not served stays with the server.";
        self.form("/close", &[("channel", id)], "close", confirm)
    }

    /// The prices section: how the last reload went, and the reload button.
    pub(crate) fn prices(&self, last: Option<&Result<String, String>>) -> String {
        let last = match last {
            None => "not reloaded since the proxy started".to_owned(),
            Some(Ok(done)) => esc(done),
            Some(Err(error)) => format!(r#"<span class="err">{}</span>"#, esc(error)),
        };
        let confirm = "Reload the prices from the config file?";
        format!(
            r#"<h2>Prices</h2><div class="sub" id="reloaded">{last}</div>{}"#,
            self.form("/reload-prices", &[], "reload prices", confirm)
        )
    }
}

/// The close txid of a channel, when the store has it: a closed or settled channel's close is
/// its best payment, co-signed (the signatures are not part of the txid).
pub(crate) fn close_txid(record: &ChannelRecord) -> Option<Txid> {
    let closed = matches!(record.state, ChannelState::Closed | ChannelState::Settled);
    record.best.as_ref().filter(|_| closed).map(|best| best.compute_txid())
}

/// The result of an action, on top of the page.
pub(crate) fn notice(notice: &Result<String, String>) -> String {
    match notice {
        Ok(done) => format!(r#"<div class="notice ok" id="notice">{}</div>"#, esc(done)),
        Err(error) => format!(r#"<div class="notice err" id="notice">{}</div>"#, esc(error)),
    }
}

/// The channels per client key: how many, what they paid and spent, and the requests they
/// were charged for since the proxy started (the store does not count requests).
pub(crate) fn client_rows(channels: &[ChannelRecord], observed: &Observed) -> String {
    #[derive(Default)]
    struct Client {
        channels: usize,
        paid: MilliSats,
        spent: MilliSats,
        requests: u64,
    }
    let mut clients: BTreeMap<CompressedPublicKey, Client> = BTreeMap::new();
    let requests = observed.requests_by_channel();
    for record in channels {
        let client = clients.entry(record.channel.params().client_key).or_default();
        client.channels += 1;
        client.paid = client.paid.saturating_add(record.paid());
        client.spent = client.spent.saturating_add(record.spent);
        client.requests += requests.get(&record.id()).copied().unwrap_or(0);
    }
    let mut html = String::from(
        "<h2>Clients</h2><table id=\"clients\"><tr><th>client key</th><th>channels</th><th>paid (sat)</th><th>spent (sat)</th><th>requests since start</th></tr>",
    );
    for (key, client) in clients.iter().take(500) {
        let key = key.to_string();
        let _ = write!(
            html,
            r#"<tr><td title="{key}">{}…</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            &key[..16],
            client.channels,
            sat(client.paid),
            sat(client.spent),
            client.requests,
        );
    }
    if clients.is_empty() {
        html.push_str("<tr><td colspan=\"5\">no clients yet</td></tr>");
    }
    html.push_str("</table>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:9402".parse().unwrap());
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn the_csrf_value_is_the_tokens_and_no_other() {
        let right = csrf_value(TOKEN);
        assert_eq!(right.len(), 64);
        assert_ne!(right, csrf_value("another token, as long as it"));
        assert!(!right.contains(TOKEN));
        assert_eq!(forged(TOKEN, &headers(&[]), Some(&right)), None, "the right value passes");
        let missing = forged(TOKEN, &headers(&[]), None).unwrap();
        assert!(missing.contains("missing"), "{missing}");
        let wrong = forged(TOKEN, &headers(&[]), Some(&csrf_value("x"))).unwrap();
        assert!(wrong.contains("not this token's"), "{wrong}");
        assert!(forged(TOKEN, &headers(&[]), Some("")).is_some());
        assert!(forged(TOKEN, &headers(&[]), Some(TOKEN)).is_some(), "the token is not the value");
    }

    #[test]
    fn a_cross_site_post_is_refused_even_with_the_right_value() {
        let right = csrf_value(TOKEN);
        for refused in [
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
            headers(&[("origin", "https://evil.example")]),
            headers(&[("origin", "http://127.0.0.1:9403")]),
            headers(&[("origin", "null")]),
        ] {
            assert!(forged(TOKEN, &refused, Some(&right)).is_some(), "{refused:?}");
        }
        for accepted in [
            headers(&[("sec-fetch-site", "same-origin"), ("origin", "http://127.0.0.1:9402")]),
            headers(&[("sec-fetch-site", "none")]),
            headers(&[("origin", "https://127.0.0.1:9402")]),
        ] {
            assert_eq!(forged(TOKEN, &accepted, Some(&right)), None, "{accepted:?}");
        }
    }

    #[test]
    fn form_fields_are_decoded() {
        let form = "csrf=ab%2Bc&channel=00%3A1&empty=&flag";
        assert_eq!(field(form, "csrf").as_deref(), Some("ab+c"));
        assert_eq!(field(form, "channel").as_deref(), Some("00:1"));
        assert_eq!(field(form, "empty").as_deref(), Some(""));
        assert_eq!(field(form, "flag").as_deref(), Some(""));
        assert_eq!(field(form, "other"), None);
        assert_eq!(field("a=x+y", "a").as_deref(), Some("x y"));
    }

    #[test]
    fn txids_link_to_the_explorer_without_a_referrer() {
        let txid: Txid =
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b".parse().unwrap();
        let plain = Forms { explorer: None, csrf: String::new(), auth: String::new() };
        assert_eq!(plain.txid(txid, "4a5e…:0"), "4a5e…:0");
        let linked = Forms {
            explorer: Some("https://mempool.space/tx/{txid}"),
            csrf: String::new(),
            auth: String::new(),
        };
        let link = linked.txid(txid, "<x>");
        assert!(link.contains(&format!("href=\"https://mempool.space/tx/{txid}\"")), "{link}");
        assert!(
            link.contains("rel=\"noreferrer noopener\"") && link.contains("&lt;x&gt;"),
            "{link}"
        );
    }

    /// The admin router with a memory store, an unreachable chain and prices from a config
    /// in `dir` (`GET /hello` at 1 000 msat).
    fn router(
        dir: &std::path::Path,
    ) -> (axum::Router, crate::prices::LivePrices, std::path::PathBuf) {
        use crate::prices::{LivePrices, Reloader, test_config};
        let path = test_config(dir, 1_000, false);
        let prices = LivePrices::new(crate::config::Config::load(&path).unwrap().prices);
        let reloader = Arc::new(Reloader::new(path.clone(), false, prices.clone()));
        let esplora = crate::config::ChainSource::Esplora { url: "http://127.0.0.1:9".into() };
        let network = paychan::bitcoin::Network::Regtest;
        let admin = Admin {
            store: paychan::store::MemoryStore::new(),
            chain: crate::chain::Chain::new(&esplora).unwrap(),
            master: paychan::bitcoin::bip32::Xpriv::new_master(network, &[7; 32]).unwrap(),
            observed: Arc::new(Observed::new()),
            settlement: Box::new(paychan::settlement::SettlementMetrics::default),
            token: TOKEN.to_owned(),
            title: "test".to_owned(),
            explorer: None,
            reloader,
        };
        (admin::router(Arc::new(admin), "/metrics"), prices, path)
    }

    /// A request to the admin router: its status and body.
    async fn call(
        app: &axum::Router,
        method: Method,
        uri: &str,
        headers: &[(&'static str, &str)],
        form: &str,
    ) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let mut request =
            Request::builder().method(method).uri(uri).header("host", "127.0.0.1:9402");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(axum::body::Body::from(form.to_owned())).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let problem = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v == paychan::wire::PROBLEM_JSON);
        assert!(status.is_success() || problem, "{status}: a refusal is a problem document");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_action_needs_a_post_the_token_and_the_csrf_value_from_the_same_origin() {
        let dir = std::env::temp_dir().join(format!("paychan-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (app, prices, path) = router(&dir);
        crate::prices::test_config(&dir, 5_000, false);
        let hello = Request::get("/hello").body(()).unwrap();
        let unchanged = || prices.price(&hello) == Some(MilliSats::from_msat(1_000));
        let right = format!("csrf={}", csrf_value(TOKEN));
        let with_token = format!("/reload-prices?token={TOKEN}");
        let bearer = format!("Bearer {TOKEN}");
        use paychan::server::Pricing as _;
        // Never through a GET, even with the token.
        let (status, _) = call(&app, Method::GET, &with_token, &[], &right).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        // No token; the token in the URL alone; a wrong or missing CSRF value.
        for (uri, headers, form, refused) in [
            ("/reload-prices", vec![], right.as_str(), StatusCode::UNAUTHORIZED),
            (with_token.as_str(), vec![], "", StatusCode::FORBIDDEN),
            (with_token.as_str(), vec![], "csrf=00", StatusCode::FORBIDDEN),
            ("/reload-prices", vec![("authorization", bearer.as_str())], "", StatusCode::FORBIDDEN),
            // The right value, from another site.
            (
                with_token.as_str(),
                vec![("sec-fetch-site", "cross-site")],
                right.as_str(),
                StatusCode::FORBIDDEN,
            ),
            (
                with_token.as_str(),
                vec![("origin", "http://evil.example")],
                right.as_str(),
                StatusCode::FORBIDDEN,
            ),
        ] {
            let (status, body) = call(&app, Method::POST, uri, &headers, form).await;
            assert_eq!(status, refused, "{uri} {headers:?} {form}: {body}");
            assert!(unchanged(), "a refused action changes nothing");
        }
        // The page's own form: the reload happens, the page says so and its forms carry the
        // token of its URL.
        let same = [("origin", "http://127.0.0.1:9402"), ("sec-fetch-site", "same-origin")];
        let (status, page) = call(&app, Method::POST, &with_token, &same, &right).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page.contains("id=\"notice\">prices reloaded"), "{page}");
        assert!(page.contains(&format!("action=\"/reload-prices?token={TOKEN}\"")), "{page}");
        assert_eq!(prices.price(&hello), Some(MilliSats::from_msat(5_000)));
        // A close of a channel the store does not have: said on the page.
        let id = format!("{}:0", "11".repeat(32));
        let form = format!("{right}&channel={}", id.replace(':', "%3A"));
        let (status, page) =
            call(&app, Method::POST, "/close", &[("authorization", &bearer)], &form).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(
            page.contains(&format!("class=\"notice err\" id=\"notice\">no channel {id}")),
            "{page}"
        );
        let (status, _) =
            call(&app, Method::POST, "/close", &[("authorization", &bearer)], &right).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "no channel named");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
