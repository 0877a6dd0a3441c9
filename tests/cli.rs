//! The `paychan` binary end to end, on a real Bitcoin Core regtest node: `init`, `serve` in
//! front of a plain upstream that knows nothing of payments, `pay` through it (funded by Core's
//! wallet), the operator's `channels`, `report` and `close`, the settlement checked on chain,
//! an upstream 5xx (charged) and an upstream that is down (nothing charged), SIGTERM, bad
//! config, the path guard against a logging upstream, the listener's limits, a CPFP package
//! under a full mempool, and `paychan doctor`.
#![cfg(feature = "cli")]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use bitcoin::{Address, Amount, Network};
use common::node::{Node, NodeConfig, btc};
use serde_json::{Value, json};

const PAYCHAN: &str = env!("CARGO_BIN_EXE_paychan");

/// Runs `paychan args…` to completion (off the async workers).
async fn paychan(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(PAYCHAN).args(&args).output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// What the upstream saw: requests, and any that carried the payment header or lacked the
/// forwarding header.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    leaked: AtomicUsize,
    unforwarded: AtomicUsize,
    /// `/slow` requests that reached the upstream.
    slow: AtomicUsize,
    /// `/hang` requests that reached the upstream.
    hung: AtomicUsize,
    /// Requests forwarded with `X-Forwarded-Proto: https`.
    https: AtomicUsize,
    /// Requests to any other path: the method, the path and query, and the override and
    /// forwarding headers they carried.
    log: std::sync::Mutex<Vec<String>>,
}

/// The headers that could make an upstream run another request than the one priced.
const LOGGED: [&str; 9] = [
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-host",
];

/// A plain API: `/hello` answers, `/boom` fails with a 500, `/slow` answers after 700 ms,
/// `/hang` never; any other path is logged and answered.
async fn upstream(seen: Arc<Seen>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let slow = Arc::clone(&seen);
    let hang = Arc::clone(&seen);
    let log = Arc::clone(&seen);
    let record = move |headers: HeaderMap| {
        seen.requests.fetch_add(1, Ordering::SeqCst);
        if headers.contains_key("payment-channel") {
            seen.leaked.fetch_add(1, Ordering::SeqCst);
        }
        if !headers.contains_key("x-forwarded-for") {
            seen.unforwarded.fetch_add(1, Ordering::SeqCst);
        }
        if headers.get("x-forwarded-proto").is_some_and(|proto| proto == "https") {
            seen.https.fetch_add(1, Ordering::SeqCst);
        }
    };
    let hello = record.clone();
    let app = Router::new()
        .route(
            "/hello",
            get(move |headers: HeaderMap| async move {
                hello(headers);
                "hello from upstream"
            }),
        )
        .route(
            "/boom",
            get(move |headers: HeaderMap| async move {
                record(headers);
                (StatusCode::INTERNAL_SERVER_ERROR, "boom")
            }),
        )
        .route(
            "/slow",
            get(move || async move {
                slow.slow.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(700)).await;
                "slow but served"
            }),
        )
        .route(
            "/hang",
            get(move || async move {
                hang.hung.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }),
        )
        .fallback(move |method: http::Method, uri: http::Uri, headers: HeaderMap| async move {
            let mut line = format!("{method} {uri}");
            for name in LOGGED {
                for value in headers.get_all(name) {
                    line.push_str(&format!(" {name}={}", value.to_str().unwrap_or("?")));
                }
            }
            log.log.lock().unwrap().push(line);
            "logged"
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, task)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until the proxy's admin listener answers (it starts with the proxy's).
async fn wait_for(admin: &str, token: &str, proxy: &mut Child) {
    for _ in 0..200 {
        assert!(proxy.try_wait().unwrap().is_none(), "the proxy exited early");
        let request = http::Request::get(format!("{admin}/metrics"))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::default())
            .unwrap();
        let answer = common::counting::http_client().request(request).await;
        if answer.is_ok_and(|response| response.status() == StatusCode::OK) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy did not start");
}

/// GET `url` (with the admin token as a bearer token): the status and the body.
async fn fetch(url: &str, token: Option<&str>) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let mut request = http::Request::get(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(http_body_util::Full::default()).unwrap();
    let response = common::counting::http_client().request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, text(&body))
}

/// Headless Chromium driven by chromedriver (WebDriver), on a page of the admin listener.
struct Browser {
    driver: Child,
    /// `http://127.0.0.1:port/session/id`.
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; `None` (and a `skipped:` line)
    /// without them outside CI.
    async fn start(dir: &Path) -> Option<Browser> {
        let chromium = std::env::var_os("CHROMIUM")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
        let chromedriver = std::env::var_os("CHROMEDRIVER")
            .map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from);
        if !chromium.exists() || !chromedriver.exists() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI must have Chromium");
            println!("skipped: Chromium or chromedriver is not installed (the admin console)");
            return None;
        }
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut ready = false;
        for _ in 0..100 {
            if let Ok((StatusCode::OK, _)) = try_fetch(&format!("{base}/status")).await {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not start");
        let profile = dir.join("chromium-profile");
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    "--window-size=1280,1100", format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let mut browser = Browser { driver, session: format!("{base}/session") };
        let session = browser.command("POST", "", capabilities).await;
        let id = session["sessionId"].as_str().expect("a session").to_owned();
        browser.session = format!("{base}/session/{id}");
        Some(browser)
    }

    /// A WebDriver command: its `value`.
    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        use http_body_util::BodyExt;
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.session))
            .header("content-type", "application/json")
            .body(match body {
                Value::Null => http_body_util::Full::default(),
                body => http_body_util::Full::from(body.to_string()),
            })
            .unwrap();
        let response = common::counting::http_client().request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {answer}");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    async fn source(&self) -> String {
        self.command("GET", "/source", Value::Null).await.as_str().unwrap().to_owned()
    }

    /// Clicks the button `css` names, accepts its confirmation, and returns the page it
    /// led to once `shows` is in it.
    async fn click_and_confirm(&self, css: &str, shows: &str) -> String {
        let found = json!({ "using": "css selector", "value": css });
        let element = self.command("POST", "/element", found).await;
        let element = element.as_object().unwrap().values().next().unwrap().as_str().unwrap();
        self.command("POST", &format!("/element/{element}/click"), json!({})).await;
        self.command("POST", "/alert/accept", json!({})).await;
        for _ in 0..100 {
            let page = self.source().await;
            if page.contains(shows) {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the page never showed {shows}: {}", self.source().await);
    }

    /// A screenshot of the window (PNG).
    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let png = self.command("GET", "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.command("DELETE", "", Value::Null).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// GET `url`: the status and the body, or the connection error.
async fn try_fetch(url: &str) -> Result<(StatusCode, String), String> {
    use http_body_util::BodyExt;
    let request = http::Request::get(url).body(http_body_util::Full::default()).unwrap();
    let response =
        common::counting::http_client().request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, text(&body)))
}

/// The admin console in headless Chromium (issue #27 item 8): the page lists the channel
/// with its funding txid linked to the explorer and its client; clicking its close button
/// runs the closing procedure (the page shows the close's txid, which is what the chain has
/// in its mempool); clicking "reload prices" after the config's price changed reloads it
/// (the terms publish the new price). A screenshot of the page is taken (into
/// `PAYCHAN_SCREENSHOT` when set, for the docs). Returns the close's txid.
async fn admin_console_in_chromium(site: &Site, id: &str) -> Option<bitcoin::Txid> {
    let browser = Browser::start(&site.dir).await?;
    let page_url = format!("{}/?token={}", site.admin, site.token);
    browser.open(&page_url).await;
    let page = browser.source().await;
    let funding = id.split(':').next().unwrap();
    assert!(page.contains(id), "the page lists the channel: {page}");
    assert!(page.contains("id=\"count-open\">1<"), "{page}");
    assert!(page.contains("id=\"charged\">12.000 sat<"), "{page}");
    assert!(page.contains(&format!("href=\"https://mempool.space/tx/{funding}\"")), "{page}");
    assert!(page.contains("<table id=\"clients\">"), "{page}");
    assert!(page.contains("<td>1</td><td>") && page.contains("<td>6</td></tr>"), "{page}");
    let screenshot = std::env::var_os("PAYCHAN_SCREENSHOT")
        .map_or_else(|| site.dir.join("admin.png"), PathBuf::from);
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    std::fs::write(&screenshot, png).unwrap();

    // Close, from the page.
    let closed =
        browser.click_and_confirm("#channels form[action^='/close'] button", "id=\"notice\"").await;
    let notice = closed.split("id=\"notice\">").nth(1).unwrap().split('<').next().unwrap();
    assert!(notice.starts_with(&format!("closed {id}: ")), "{closed}");
    let txid: bitcoin::Txid = notice.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(site.node.mempool_entry(txid).await.is_some(), "the close is in the mempool");
    assert!(closed.contains(&format!("href=\"https://mempool.space/tx/{txid}\"")), "{closed}");

    // Reload the prices, from the page: 2 sat a GET becomes 3.
    for _ in 0..2 {
        site.edit_config("price_msat = 2000", "price_msat = 3000");
    }
    browser.open(&page_url).await;
    let reloaded =
        browser.click_and_confirm("form[action^='/reload-prices'] button", "id=\"notice\"").await;
    assert!(reloaded.contains("id=\"notice\">prices reloaded"), "{reloaded}");
    assert_eq!(price_of(site, "/{*rest}").await, Some(3_000));
    browser.stop().await;
    Some(txid)
}

/// What the terms document says the route `GET path` costs, in msat (`path` as listed:
/// `init` prices `/` and `/{*rest}`).
async fn price_of(site: &Site, path: &str) -> Option<u64> {
    let (status, terms) =
        try_fetch(&format!("{}/.well-known/payment-channel", site.origin)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{terms}");
    let terms: Value = serde_json::from_str(&terms).unwrap();
    let routes = terms["prices"]["routes"].as_array()?;
    routes.iter().find(|r| r["path"] == path && r["method"] == "GET")?["price_msat"].as_u64()
}

/// The channel the operator sees, as JSON.
async fn channel_json(config: &Path, id: &str) -> Value {
    let out = paychan(args(&["channel", "--config", config.to_str().unwrap(), id])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A regtest node with a funded Core wallet `w`, the upstream, and a proxy configured by
/// `paychan init` in a fresh folder (SQLite store, 2 sat per GET, an admin listener).
struct Site {
    node: Node,
    seen: Arc<Seen>,
    upstream_task: tokio::task::JoinHandle<()>,
    dir: PathBuf,
    config: PathBuf,
    origin: String,
    admin: String,
    token: String,
    payout: String,
}

impl Site {
    /// A site whose payout address is the operator's own (a Core wallet address).
    async fn new(name: &str) -> Option<Site> {
        Self::with(name, &[], true).await
    }

    /// A site on a node started with `node_args`; with `own_payout`, the payout address is a
    /// Core wallet address given to `init`, else the one `init` chose (the bump key's).
    async fn with(name: &str, node_args: &[&str], own_payout: bool) -> Option<Site> {
        let extra_args = node_args.iter().map(|arg| (*arg).to_owned()).collect();
        let node = Node::start(NodeConfig { txindex: false, extra_args }).await?;
        node.create_wallet("w").await;
        node.mine(101).await;
        let seen = Arc::new(Seen::default());
        let (upstream_addr, upstream_task) = upstream(Arc::clone(&seen)).await;
        let dir = std::env::temp_dir().join(format!("paychan-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("paychan.toml");
        let payout = node.wallet_rpc("getnewaddress", json!([])).await;
        let mut payout = payout.as_str().unwrap().to_owned();
        let port = free_port();
        let admin = format!("127.0.0.1:{}", free_port());

        // init: a config, a private key file and an admin token; never twice.
        let init = args(&[
            "init",
            "--config",
            config.to_str().unwrap(),
            "--network",
            "regtest",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("http://{upstream_addr}"),
            "--bitcoind-url",
            &node.url(),
            "--cookie-file",
            node.cookie_path().to_str().unwrap(),
            "--price-msat",
            "2000",
            "--admin-listen",
            &admin,
        ]);
        let mut init = init;
        if own_payout {
            init.extend(args(&["--payout-address", &payout]));
        }
        let out = paychan(init.clone()).await;
        assert!(out.status.success(), "init: {}", text(&out.stderr));
        if !own_payout {
            let written = std::fs::read_to_string(&config).unwrap();
            let line = written.lines().find(|l| l.starts_with("payout_address = ")).unwrap();
            payout = line.split('"').nth(1).unwrap().to_owned();
            assert!(text(&out.stdout).contains("the bump key's"), "{}", text(&out.stdout));
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| std::fs::metadata(dir.join(name)).unwrap().permissions().mode();
        assert_eq!(mode("paychan.key") & 0o777, 0o600);
        assert_eq!(mode("paychan-bump.key") & 0o777, 0o600);
        assert_eq!(mode("admin.token") & 0o777, 0o600);
        let token = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_owned();
        let again = paychan(init).await;
        assert!(!again.status.success(), "init never overwrites");
        Some(Site {
            node,
            seen,
            upstream_task,
            dir,
            config,
            origin: format!("http://127.0.0.1:{port}"),
            admin: format!("http://{admin}"),
            token,
            payout,
        })
    }

    /// Serves the proxy itself over TLS, with a self-signed certificate for `localhost`;
    /// returns the certificate's PEM file (for `pay --cacert`).
    fn enable_tls(&mut self) -> PathBuf {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push_str("\n[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n");
        std::fs::write(&self.config, config).unwrap();
        self.origin = self.origin.replace("http://127.0.0.1", "https://localhost");
        cert
    }

    /// Rewrites the config: `from` (which `init` must have written) becomes `to`.
    fn edit_config(&self, from: &str, to: &str) {
        let config = std::fs::read_to_string(&self.config).unwrap();
        assert!(config.contains(from), "init writes {from}");
        std::fs::write(&self.config, config.replacen(from, to, 1)).unwrap();
    }

    /// Turns the event log on (`events.jsonl`, compared with the store every second), with
    /// a webhook to `url` signed with [`HOOK_SECRET`]; the settlement task runs every second.
    fn enable_events(&self, url: Option<&str>) -> PathBuf {
        self.edit_config("# interval_secs = 30", "interval_secs = 1");
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push_str(
            "\n[events]\nlog_file = \"events.jsonl\"\ninterval_secs = 1\nusage_interval_secs = 1\n",
        );
        if let Some(url) = url {
            let secret = self.dir.join("webhook.secret");
            std::fs::write(&secret, format!("{HOOK_SECRET}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
            config
                .push_str(&format!("webhook_url = \"{url}\"\nsecret_file = \"webhook.secret\"\n"));
        }
        std::fs::write(&self.config, config).unwrap();
        self.dir.join("events.jsonl")
    }

    /// Lists `GET /public/{*rest}` as free.
    fn free_public(&self) {
        let route =
            "[[prices.routes]]\nmethod = \"GET\"\npath = \"/public/{*rest}\"\nprice_msat = 0\n\n";
        self.edit_config("[terms]", &format!("{route}[terms]"));
    }

    /// The proxy's `host:port`.
    fn authority(&self) -> &str {
        self.origin.trim_start_matches("http://")
    }

    fn config_arg(&self) -> String {
        self.config.to_str().unwrap().to_owned()
    }

    /// `paychan serve`, logging to `proxy-N.log`, once it answers.
    async fn serve(&self, n: u32) -> Child {
        let log = std::fs::File::create(self.dir.join(format!("proxy-{n}.log"))).unwrap();
        let mut proxy = Command::new(PAYCHAN)
            .args(["serve", "--config", &self.config_arg()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for(&self.admin, &self.token, &mut proxy).await;
        proxy
    }

    /// SIGTERM to the proxy; its exit status and log.
    async fn stop(&self, mut proxy: Child, n: u32) -> (std::process::ExitStatus, String) {
        let kill = Command::new("kill").args(["-TERM", &proxy.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let status = tokio::task::spawn_blocking(move || proxy.wait().unwrap()).await.unwrap();
        (status, std::fs::read_to_string(self.dir.join(format!("proxy-{n}.log"))).unwrap())
    }

    /// Runs `refund` (`paychan client refund` for one client) twice: the first broadcasts one
    /// refund, which the node's mempool has; the second finds nothing left to refund.
    async fn refunds_once(&self, refund: &impl AsyncFn() -> std::process::Output) {
        let out = refund().await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let refunded = text(&out.stdout);
        assert!(refunded.contains("1 refund(s)"), "{refunded}");
        let txid = refunded.lines().next().unwrap().rsplit(' ').next().unwrap();
        assert!(self.node.mempool_entry(txid.parse().unwrap()).await.is_some(), "{refunded}");
        let out = refund().await;
        assert!(text(&out.stdout).contains("0 refund(s)"), "only once: {}", text(&out.stdout));
    }

    /// Stops the proxy (its `n`th run), which must exit cleanly, and removes the site.
    async fn finish(self, proxy: Child, n: u32) {
        let (status, log) = self.stop(proxy, n).await;
        assert!(status.success(), "{status:?}: {log}");
        std::fs::remove_dir_all(&self.dir).unwrap();
    }

    /// `paychan pay URL` for the client whose state is in `state`, funded by Core's wallet.
    fn pay(&self, state: &str, path: &str) -> Vec<String> {
        let mut args = self.client(&["pay"], state);
        args.push(format!("{}{path}", self.origin));
        args
    }

    /// `paychan <command…> --state-dir … --chain-url … --wallet-url … --rpc-cookie …`.
    fn client(&self, command: &[&str], state: &str) -> Vec<String> {
        let node = &self.node;
        let mut all = args(command);
        all.extend(args(&[
            "--state-dir",
            self.dir.join(state).to_str().unwrap(),
            "--chain-url",
            &node.url(),
            "--wallet-url",
            &format!("{}/wallet/w", node.url()),
            "--rpc-cookie",
            node.cookie_path().to_str().unwrap(),
        ]));
        all
    }

    /// What the client in `state` has paid on its channels, in sat, by `client channels`.
    async fn client_paid(&self, state: &str) -> Vec<(String, u64)> {
        let state = self.dir.join(state);
        let out =
            paychan(args(&["client", "channels", "--state-dir", state.to_str().unwrap()])).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|line| {
                let id = line.split_whitespace().next().unwrap().to_owned();
                let paid = line.split("paid ").nth(1).unwrap().split(' ').next().unwrap();
                (id, paid.parse().unwrap())
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_proxies_pays_closes_and_settles_on_a_real_node() {
    let Some(site) = Site::new("main").await else { return };
    let Site { node, seen, dir, config, admin, token, payout, .. } = &site;
    let config_arg = site.config_arg();
    site.edit_config("# explorer = ", "explorer = ");
    let proxy = site.serve(0).await;

    // pay: five requests, each its own process; the first opens a channel funded by Core.
    let client = |path: &str| site.pay("client", path);
    for n in 0..5 {
        let out = paychan(client("/hello")).await;
        assert!(out.status.success(), "pay {n}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello from upstream");
        assert!(text(&out.stderr).contains("paid"), "{}", text(&out.stderr));
    }
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        5,
        "each paid request reached the upstream once"
    );
    assert_eq!(
        seen.leaked.load(Ordering::SeqCst),
        0,
        "the payment header never reaches the upstream"
    );
    assert_eq!(seen.unforwarded.load(Ordering::SeqCst), 0, "X-Forwarded-For is set");

    // The operator sees the channel: five requests at 2 sat.
    let out = paychan(args(&["channels", "--config", &config_arg])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let id = listing.split_whitespace().next().expect("a channel").to_owned();
    assert!(listing.contains("open"), "{listing}");
    let channel = channel_json(config, &id).await;
    assert_eq!(channel["spent_msat"], 10_000);
    let filtered =
        |state: &str| paychan(args(&["channels", "--config", &config_arg, "--state", state]));
    assert_eq!(text(&filtered("open").await.stdout), listing);
    assert_eq!(text(&filtered("closed").await.stdout), "");
    assert_eq!(filtered("opened").await.status.code(), Some(2), "an unknown state is an error");

    // An upstream 5xx is passed on and charged (`credit_server_errors = false`, the proxy's
    // default: the upstream may have done the work).
    let out = paychan(client("/boom")).await;
    assert_eq!(out.status.code(), Some(22), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "boom");
    assert_eq!(channel_json(config, &id).await["spent_msat"], 12_000, "an upstream 5xx is charged");

    // The report.
    let out = paychan(args(&["report", "--config", &config_arg])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("open     1"), "{}", text(&out.stdout));

    // The client's own view: what it paid is what the proxy holds.
    let paid = channel_json(config, &id).await["paid_msat"].as_u64().unwrap();
    assert_eq!(site.client_paid("client").await, [(id.clone(), paid / 1_000)]);

    // The upstream goes down: the proxy's own 502, nothing charged.
    site.upstream_task.abort();
    let out = paychan(client("/hello")).await;
    assert_eq!(out.status.code(), Some(22), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("upstream-unavailable"), "{}", text(&out.stdout));
    assert_eq!(channel_json(config, &id).await["spent_msat"], 12_000, "a 502 is not charged");

    // Metrics, behind the admin token: five served, a charged 5xx and an uncharged 502, the
    // first request's 402.
    assert_eq!(fetch(&format!("{admin}/metrics"), None).await.0, StatusCode::UNAUTHORIZED);
    let (status, metrics) = fetch(&format!("{admin}/metrics"), Some(token)).await;
    assert_eq!(status, StatusCode::OK);
    let value = |line: &str| -> f64 {
        let found = metrics
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("{line}: {metrics}"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("paychan_requests_total{route=\"api\",outcome=\"served\"}"), 5.0);
    assert_eq!(value("paychan_requests_total{route=\"api\",outcome=\"upstream_error\"}"), 2.0);
    assert!(value("paychan_requests_total{route=\"api\",outcome=\"payment_required\"}") >= 1.0);
    assert!(value("paychan_refusals_total{code=\"payment-required\"}") >= 1.0);
    assert_eq!(value("paychan_charged_msat_total"), 12_000.0);
    assert_eq!(value("paychan_store_outages_total"), 0.0);
    assert!(
        value("paychan_request_duration_seconds_count{route=\"api\",outcome=\"served\"}") >= 5.0
    );
    assert!(metrics.contains("paychan_channels{state=\"open\"}"), "{metrics}");

    // The console, in a real browser: the operator closes the channel there, and reloads
    // the prices. `paychan close` runs the same procedure: after the page's close it shows
    // that close, broadcast once (without a browser it closes); the settlement pays the
    // payout address what the client paid.
    let paid = channel_json(config, &id).await["paid_msat"].as_u64().unwrap();
    let clicked = admin_console_in_chromium(&site, &id).await;
    let out = paychan(args(&["close", "--config", &config_arg, &id])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("closed"), "{}", text(&out.stdout));
    if let Some(txid) = clicked {
        assert!(text(&out.stdout).contains(&txid.to_string()), "{}", text(&out.stdout));
    }
    node.mine(1).await;
    let payout_script = payout
        .parse::<Address<_>>()
        .unwrap()
        .require_network(Network::Regtest)
        .unwrap()
        .script_pubkey();
    assert_eq!(node.balance_of_script(&payout_script).await, Amount::from_sat(paid / 1_000));

    // SIGTERM: the proxy stops cleanly. The payout address is the operator's own: CPFP is
    // off, and the start says so and how to turn it on.
    let (status, log) = site.stop(proxy, 0).await;
    assert!(status.success(), "{status:?}");
    assert_says(&log, &["proxy stopped", "payout_address is not the bump key's address"]);
    assert!(!log.contains("with_cpfp_key"), "no advice the operator cannot follow: {log}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Waits until `done` answers true (checked every 50 ms, for 30 s at most: then `what` failed).
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 30 s: {what}");
}

/// Prices reload on SIGHUP while requests keep flowing (issue #27 item 7): a client pays
/// `/hello` in a loop while the config's price changes from 2 to 3 sat and the proxy gets a
/// SIGHUP; every request is served, the terms publish the new price, and a request after it
/// is charged 3 sat. Then a config with an error, and a SIGHUP: nothing changes, and the log
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_prices_while_requests_keep_flowing() {
    let Some(site) = Site::new("sighup").await else { return };
    let site = Arc::new(site);
    let proxy = site.serve(0).await;
    let out = paychan(site.pay("client", "/hello")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = site.client_paid("client").await[0].0.clone();
    let served = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flow = {
        let (site, served, stop) = (Arc::clone(&site), Arc::clone(&served), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let out = paychan(site.pay("client", "/hello")).await;
                assert!(out.status.success(), "a request failed: {}", text(&out.stderr));
                served.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let flowed = |at_least: usize| {
        let served = Arc::clone(&served);
        until("requests kept flowing", async move || served.load(Ordering::SeqCst) >= at_least)
    };
    flowed(2).await;
    assert_eq!(price_of(&site, "/{*rest}").await, Some(2_000));
    for _ in 0..2 {
        site.edit_config("price_msat = 2000", "price_msat = 3000");
    }
    let hup = |pid: u32| Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
    assert!(hup(proxy.id()).success());
    until("the terms publish the new price", async || {
        price_of(&site, "/{*rest}").await == Some(3_000)
    })
    .await;
    let after = served.load(Ordering::SeqCst);
    flowed(after + 2).await;
    stop.store(true, Ordering::SeqCst);
    flow.await.expect("every request was served");
    let spent = channel_json(&site.config, &id).await["spent_msat"].as_u64().unwrap();
    let out = paychan(site.pay("client", "/hello")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let charged = channel_json(&site.config, &id).await["spent_msat"].as_u64().unwrap() - spent;
    assert_eq!(charged, 3_000, "a request after the reload costs the new price");

    // A bad file: nothing changes, the log says why.
    site.edit_config("price_msat = 3000", "price_msat = -1");
    assert!(hup(proxy.id()).success());
    let log = site.dir.join("proxy-0.log");
    until("the log says the reload was refused", async || {
        std::fs::read_to_string(&log).unwrap().contains("prices not reloaded")
    })
    .await;
    assert_eq!(price_of(&site, "/{*rest}").await, Some(3_000));
    let site = Arc::into_inner(site).unwrap();
    let (status, log) = site.stop(proxy, 0).await;
    assert!(status.success(), "{log}");
    assert_says(
        &log,
        &["prices reloaded", "(SIGHUP)", "prices not reloaded, nothing changed", "price_msat"],
    );
    std::fs::remove_dir_all(&site.dir).unwrap();
}

/// CPFP from the binary (issue #27 item 6). `init` without `--payout-address` pays to the bump
/// key's address, and `serve` gives the bump key to its settlement task. The node's mempool
/// (5 MB) is filled until its minimum is above the channel's fee rate (2 sat/vB): the operator's
/// `paychan close`, with `serve` stopped, finds the close refused alone and queues it; the
/// restarted `serve` sends it with a CPFP child as a package (`submitpackage`); both are mined,
/// and the payout address holds the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_below_the_mempool_minimum_goes_out_with_a_cpfp_child() {
    let node_args = ["-maxmempool=5", "-datacarriersize=100000"];
    let Some(site) = Site::with("cpfp", &node_args, false).await else { return };
    let node = &site.node;
    node.mine(80).await; // mature coins for the filler
    // 4 000 sat a request: the server's output can pay for a child.
    site.edit_config("price_msat = 2000", "price_msat = 4000000");
    site.edit_config("price_msat = 2000", "price_msat = 4000000");
    let proxy = site.serve(0).await;
    for _ in 0..2 {
        let mut pay = site.client(&["pay"], "client");
        pay.extend(args(&["--max-per-request-msat", "4000000", "--max-prepaid-sat", "8000"]));
        pay.push(format!("{}/hello", site.origin));
        let out = paychan(pay).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    node.mine(1).await; // the funding confirmed, before the mempool fills
    let (status, log) = site.stop(proxy, 0).await;
    assert!(status.success(), "{log}");
    assert_says(&log, &["CPFP on"]);
    assert!(!log.contains("not the bump key's address"), "{log}");

    node.fill_mempool(bitcoin::FeeRate::from_sat_per_vb_u32(2)).await;
    let minimum = btc(&node.rpc("getmempoolinfo", json!([])).await["mempoolminfee"]);
    assert!(minimum > Amount::from_sat(2_000), "the minimum rose above 2 sat/vB: {minimum}/kvB");
    let config_arg = site.config_arg();
    let out = paychan(args(&["channels", "--config", &config_arg])).await;
    let id = text(&out.stdout).split_whitespace().next().expect("a channel").to_owned();
    let out = paychan(args(&["close", "--config", &config_arg, &id])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("queued"), "refused alone: {}", text(&out.stdout));

    // The settlement task's first pass sends the close with a child.
    let proxy = site.serve(1).await;
    let (funding_txid, vout) = id.split_once(':').unwrap();
    let spent = json!([[{ "txid": funding_txid, "vout": vout.parse::<u32>().unwrap() }]]);
    let mut close = None;
    for _ in 0..300 {
        let spending = node.rpc("gettxspendingprevout", spent.clone()).await;
        if let Some(txid) = spending[0]["spendingtxid"].as_str() {
            close = Some(txid.parse::<bitcoin::Txid>().unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let close = close.expect("the close reached the mempool within 30 s");
    let entry = node.mempool_entry(close).await.expect("the close is in the mempool");
    assert_eq!(entry["descendantcount"], 2, "with its CPFP child: {entry}");
    let child: bitcoin::Txid = entry["spentby"][0].as_str().unwrap().parse().unwrap();
    let child_tx = node.mempool_tx(child).await;
    let (_, metrics) = fetch(&format!("{}/metrics", site.admin), Some(&site.token)).await;
    assert!(metrics.lines().any(|l| l == "paychan_cpfp_bumps 1"), "{metrics}");

    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(close, height).await, Some(height), "the close is mined");
    assert_eq!(node.confirmed_at(child, height).await, Some(height), "with its child");
    let payout = site.payout.parse::<Address<_>>().unwrap().require_network(Network::Regtest);
    let payout = payout.unwrap().script_pubkey();
    assert_eq!(child_tx.output[0].script_pubkey, payout, "the child pays the payout address");
    assert_eq!(node.balance_of_script(&payout).await, child_tx.output[0].value);
    site.finish(proxy, 1).await;
}

/// SIGTERM while a paid request is in flight: the proxy finishes it (the client gets its
/// answer), exits cleanly, and after a restart on the same SQLite store every payment the
/// clients made is there: the channels carry on where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_request_loses_no_payment() {
    let Some(site) = Site::new("sigterm").await else { return };
    let proxy = site.serve(0).await;
    // Two clients, each with its channel and a few requests. (A block between them: the
    // second funding would otherwise spend the first one's unconfirmed change, and such a
    // funding is not served before it confirms.)
    for client in ["a", "b"] {
        for _ in 0..3 {
            let out = paychan(site.pay(client, "/hello")).await;
            assert!(out.status.success(), "{client}: {}", text(&out.stderr));
        }
        site.node.mine(1).await;
    }
    // A slow request is in flight, already paid, when the proxy is told to stop.
    let slow = tokio::spawn(paychan(site.pay("a", "/slow")));
    while site.seen.slow.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, log) = site.stop(proxy, 0).await;
    assert!(status.success(), "{status:?}: {log}");
    let out = slow.await.unwrap();
    assert!(out.status.success(), "the in-flight request was finished: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "slow but served");

    // Restarted on the same store: the proxy holds every payment the clients made.
    let proxy = site.serve(1).await;
    for client in ["a", "b"] {
        let paid = site.client_paid(client).await;
        assert_eq!(paid.len(), 1, "{client}: one channel");
        let (id, sat) = &paid[0];
        let server = channel_json(&site.config, id).await;
        assert_eq!(server["paid_msat"].as_u64().unwrap(), sat * 1_000, "{client}: {server}");
        // And the channel carries on.
        let out = paychan(site.pay(client, "/hello")).await;
        assert!(out.status.success(), "{client} after the restart: {}", text(&out.stderr));
        assert_eq!(site.client_paid(client).await.len(), 1, "{client}: still one channel");
    }
    site.finish(proxy, 1).await;
}

/// A request that never finishes (a hung upstream) holds a shutdown only until
/// `shutdown_secs`: then the proxy closes the connection and exits cleanly, and the client
/// sees the request fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_request_holds_a_shutdown_only_until_its_deadline() {
    let Some(site) = Site::new("hung").await else { return };
    let config = std::fs::read_to_string(&site.config).unwrap();
    let config = config.replace("shutdown_secs = 30", "shutdown_secs = 1");
    assert!(config.contains("shutdown_secs = 1"), "init writes the setting");
    std::fs::write(&site.config, config).unwrap();
    let proxy = site.serve(0).await;
    let hung = tokio::spawn(paychan(site.pay("a", "/hang")));
    while site.seen.hung.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, log) =
        tokio::time::timeout(Duration::from_secs(20), site.stop(proxy, 0)).await.expect(
            "the proxy stops within its deadline (the default is 30 s; the client's timeout is longer)",
        );
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("closing them"), "{log}");
    let out = tokio::time::timeout(Duration::from_secs(20), hung).await.unwrap().unwrap();
    assert!(!out.status.success(), "the hung request failed: {}", text(&out.stdout));
    std::fs::remove_dir_all(&site.dir).unwrap();
}

/// The client's own commands: `client close` closes its channel cooperatively through the
/// proxy; `client refund` brings back the money of a channel whose server vanished, once the
/// refund is final, and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_closes_and_refunds_by_itself() {
    let Some(site) = Site::new("client").await else { return };
    let proxy = site.serve(0).await;
    let out = paychan(site.pay("closer", "/hello")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    site.node.mine(1).await;
    // The refunder's wallet is a key file whose coin it finds on chain (`--wallet-key`).
    let key = bitcoin::bip32::Xpriv::new_master(Network::Regtest, &[0x42; 32]).unwrap();
    let key_file = site.dir.join("wallet.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wallet = paychan::client::KeyWallet::new(key.private_key);
    site.node.fund_address(&wallet.script_pubkey(), Amount::from_sat(200_000)).await;
    site.node.mine(1).await;
    let node = &site.node;
    let refunder = site.dir.join("refunder");
    let short = args(&[
        "pay",
        "--state-dir",
        refunder.to_str().unwrap(),
        "--chain-url",
        &node.url(),
        "--rpc-cookie",
        node.cookie_path().to_str().unwrap(),
        "--wallet-key",
        key_file.to_str().unwrap(),
        "--lifetime-blocks",
        "150",
        &format!("{}/hello", site.origin),
    ]);
    let out = paychan(short).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from upstream");
    let channel = &site.client_paid("refunder").await[0].0;
    let funding: bitcoin::Txid = channel.split(':').next().unwrap().parse().unwrap();
    let funding = node.mempool_tx(funding).await;
    let change = funding.output.iter().find(|o| o.script_pubkey == wallet.script_pubkey());
    assert!(change.is_some(), "the key wallet's coin funded the channel, change back to it");

    let mut close = site.client(&["client", "close"], "closer");
    close.push(site.origin.clone());
    let out = paychan(close).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let closed = text(&out.stdout);
    let txid = closed.split_whitespace().nth(2).unwrap().trim_end_matches(':');
    assert!(site.node.mempool_entry(txid.parse().unwrap()).await.is_some(), "{closed}");

    // The server vanishes; the refunder's channel expires 150 blocks after it opened.
    let (status, _) = site.stop(proxy, 0).await;
    assert!(status.success());
    let refund = || paychan(site.client(&["client", "refund"], "refunder"));
    let out = refund().await;
    assert!(text(&out.stdout).contains("0 refund(s)"), "not yet: {}", text(&out.stdout));
    site.node.mine(150).await;
    site.refunds_once(&refund).await;

    // The server comes back, with the event log on: the refund (mined after the expiry) is
    // its channel's `refunded` event, carrying what the client had paid and never settled.
    site.node.mine(1).await;
    let log = site.enable_events(None);
    let proxy = site.serve(1).await;
    let paid = site.client_paid("refunder").await[0].1;
    let ended = wait_for_events(&log, channel, |kinds| kinds.last() == Some(&"refunded")).await;
    let kinds: Vec<&str> = ended.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"opened"), "{kinds:?}");
    assert!(!kinds.contains(&"failed") && !kinds.contains(&"settled"), "{kinds:?}");
    assert_eq!(ended.last().unwrap()["paid_msat"], paid * 1_000);
    site.finish(proxy, 1).await;
}

/// With `[tls]` the proxy itself serves HTTPS: `pay --cacert` pays through it (and the
/// upstream is told `X-Forwarded-Proto: https`); without trusting the certificate, `pay`
/// refuses the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_serves_tls() {
    let Some(mut site) = Site::new("tls").await else { return };
    let cert = site.enable_tls();
    let proxy = site.serve(0).await;
    let untrusted = paychan(site.pay("client", "/hello")).await;
    assert_eq!(untrusted.status.code(), Some(2), "{}", text(&untrusted.stderr));
    assert!(
        text(&untrusted.stderr).to_lowercase().contains("certificate"),
        "{}",
        text(&untrusted.stderr)
    );
    assert!(text(&untrusted.stderr).contains("with --cacert"), "{}", text(&untrusted.stderr));
    let mut trusted = site.client(&["pay", "--cacert", cert.to_str().unwrap()], "client");
    trusted.push(format!("{}/hello", site.origin));
    for _ in 0..2 {
        let out = paychan(trusted.clone()).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello from upstream");
    }
    assert_eq!(site.seen.https.load(Ordering::SeqCst), 2);
    let (status, log) = site.stop(proxy, 0).await;
    assert!(status.success(), "{log}");
    assert!(log.contains("proxy stopped"), "{log}");
    std::fs::remove_dir_all(&site.dir).unwrap();
}

/// `paychan pay`'s wallet errors say what fixes them (issue #27 item 5): without a wallet, the
/// flags that give one; with a Core wallet short of funds, what it has and what the channel
/// needs, and the flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_names_the_flag_when_the_wallet_is_missing_or_short() {
    let Some(site) = Site::new("wallets").await else { return };
    let proxy = site.serve(0).await;
    let url = format!("{}/hello", site.origin);
    let node = &site.node;
    let mut walletless = site.client(&["pay"], "walletless");
    let at = walletless.iter().position(|arg| arg == "--wallet-url").unwrap();
    walletless.drain(at..at + 2);
    walletless.push(url.clone());
    let out = paychan(walletless).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_says(&text(&out.stderr), &["there is no wallet", "--wallet-url", "--wallet-key"]);

    node.create_wallet("empty").await;
    let mut short = site.client(&["pay"], "short");
    let wallet = short.iter().position(|arg| arg.ends_with("/wallet/w")).unwrap();
    short[wallet] = format!("{}/wallet/empty", node.url());
    short.push(url);
    let out = paychan(short).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let (has, needs) = (Amount::ZERO, Amount::from_sat(50_000));
    let says = format!("insufficient funds: {has} cannot pay {needs} and the fee");
    assert_says(&text(&out.stderr), &[&says, "/wallet/empty", "--channel-value-sat (now 50000)"]);
    site.finish(proxy, 0).await;
}

/// A config error names its file, line and key, and the proxy does not start.
#[tokio::test]
async fn a_bad_config_names_its_key() {
    let dir = std::env::temp_dir().join(format!("paychan-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config: PathBuf = dir.join("bad.toml");
    std::fs::write(
        &config,
        "network = \"regtest\"\nlisen = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:2\"\n",
    )
    .unwrap();
    let out = paychan(args(&["serve", "--config", config.to_str().unwrap()])).await;
    assert_eq!(out.status.code(), Some(2));
    // The file, the line and the key (issue #27 item 5).
    let at = format!("{}:2: key `lisen`: unknown field", config.display());
    assert!(text(&out.stderr).contains(&at), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `paychan init` in a fresh folder `name` with `extra` options (a network, a payout address,
/// a chain backend), then `paychan serve` on it, which must exit within 30 s (a serve that
/// runs is killed and fails the test): its exit status and its log. The listen port is free.
async fn init_and_serve(name: &str, extra: &[&str]) -> (Output, PathBuf) {
    let (config, dir) = init_in(name, extra).await;
    (serve_until_exit(&config).await, dir)
}

/// `paychan init` in a fresh folder `name` with `extra` options: the config's path and the
/// folder.
async fn init_in(name: &str, extra: &[&str]) -> (String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("paychan-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("paychan.toml").to_str().unwrap().to_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut init = args(&["init", "--config", &config, "--listen", &listen]);
    init.extend(args(&["--admin-listen", &admin, "--upstream", "http://127.0.0.1:9"]));
    init.extend(args(extra));
    let out = paychan(init).await;
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    (config, dir)
}

/// `paychan serve` on `config`, which must exit within 30 s (a serve that runs is killed and
/// fails the test): its exit status and its log.
async fn serve_until_exit(config: &str) -> Output {
    let mut serve = Command::new(PAYCHAN)
        .args(["serve", "--config", config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while serve.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = serve.kill();
            let out = serve.wait_with_output().unwrap();
            panic!("serve is running on a config it must refuse: {}", text(&out.stderr));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    serve.wait_with_output().unwrap()
}

/// `paychan doctor` (issue #27 item 3) prints every start-up check, ok or FAIL with its
/// reason. The site's config (regtest, its own payout address) passes, CPFP off as a warning;
/// a mainnet config on the same regtest node fails, naming both networks; fee rates the node
/// cannot relay and an unreachable store fail too, and `serve` refuses to start on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_prints_every_check_and_serve_refuses_what_fails() {
    let Some(site) = Site::new("doctor").await else { return };
    let doctor = |config: String| paychan(args(&["doctor", "--config", &config]));
    let line = |said: &str, verdict: &str, check: &str| {
        let found = said.lines().find(|l| l.starts_with(verdict) && l.contains(check));
        found.unwrap_or_else(|| panic!("{verdict} {check} in {said}")).to_owned()
    };
    let out = doctor(site.config_arg()).await;
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}{}", text(&out.stderr));
    for check in ["config", "payout_address", "key_file", "chain network", "relay fee", "store"] {
        line(&said, "ok ", check);
    }
    line(&said, "warn", "payout_address is not the bump key's address");
    assert!(!said.contains("FAIL"), "{said}");
    let network = line(&said, "ok ", "chain network");
    assert!(network.contains("Bitcoin Core node at [chain] bitcoind_url is on regtest"));

    // [events]: a log line that does not parse and a missing webhook secret fail (serve
    // refuses them); fixed, both are ok.
    let log = site.enable_events(Some("http://127.0.0.1:9/hook"));
    let secret = std::fs::read(site.dir.join("webhook.secret")).unwrap();
    std::fs::remove_file(site.dir.join("webhook.secret")).unwrap();
    std::fs::write(&log, "{\"kind\":\n").unwrap();
    let out = doctor(site.config_arg()).await;
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert_says(&line(&said, "FAIL", "events"), &["events.jsonl:1"]);
    assert_says(&line(&said, "FAIL", "webhook"), &["webhook.secret"]);
    std::fs::write(&log, "").unwrap();
    std::fs::write(site.dir.join("webhook.secret"), secret).unwrap();
    let said = text(&doctor(site.config_arg()).await.stdout);
    line(&said, "ok ", "events");
    line(&said, "ok ", "webhook");

    // A mainnet config (`init --network bitcoin`) on the regtest node.
    let cookie = site.node.cookie_path();
    let (mainnet, dir) = init_in(
        "doctor-mainnet",
        &[
            "--network",
            "bitcoin",
            "--payout-address",
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            "--bitcoind-url",
            &site.node.url(),
            "--cookie-file",
            cookie.to_str().unwrap(),
        ],
    )
    .await;
    let out = doctor(mainnet).await;
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}{}", text(&out.stderr));
    let mismatch = line(&said, "FAIL", "chain network");
    assert_says(&mismatch, &["wrong network", "is on regtest", "network = \"bitcoin\""]);
    line(&said, "ok ", "key_file");
    assert!(said.contains("paychan serve would refuse to start"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();

    // Fee rates below the node's relay floor, and a PostgreSQL store nobody listens for.
    site.edit_config("# min_fee_rate_sat_vb = 2", "min_fee_rate_sat_vb = 0");
    site.edit_config("# max_fee_rate_sat_vb = 1000", "max_fee_rate_sat_vb = 0");
    let unreachable = format!("postgres://paychan:hunter2@127.0.0.1:{}/paychan", free_port());
    site.edit_config("url = \"sqlite:paychan.db\"", &format!("url = \"{unreachable}\""));
    let out = doctor(site.config_arg()).await;
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}{}", text(&out.stderr));
    let fee = line(&said, "FAIL", "relay fee");
    assert_says(&fee, &["minimum relay fee", "above terms.max_fee_rate_sat_vb = 0"]);
    let store = line(&said, "FAIL", "store");
    assert_says(&store, &["cannot be opened", "postgres://paychan:…@127.0.0.1"]);
    assert!(!said.contains("hunter2"), "the password is never printed: {said}");
    line(&said, "ok ", "chain network");
    let out = serve_until_exit(&site.config_arg()).await;
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert_says(&log, &["terms.max_fee_rate_sat_vb = 0", "refusing to serve"]);
    assert!(!log.contains("proxy started"), "{log}");
    std::fs::remove_dir_all(&site.dir).unwrap();
}

/// A wrong network does not start (issue #27): a mainnet config (a `bc1` payout address, an
/// `xprv` key, written by `init --network bitcoin`) against a regtest Bitcoin Core node. Before
/// this check the proxy served, and clients paying in regtest coins were served. `serve` exits
/// with status 2 before it listens, naming both networks, the config keys to change and
/// nothing started. (A regtest config on the same kind of node starts: every `Site` test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mainnet_config_on_a_regtest_node_does_not_start() {
    let config = NodeConfig { txindex: false, extra_args: Vec::new() };
    let Some(node) = Node::start(config).await else { return };
    let cookie = node.cookie_path();
    let (out, dir) = init_and_serve(
        "mainnet-on-regtest",
        &[
            "--network",
            "bitcoin",
            "--payout-address",
            "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
            "--bitcoind-url",
            &node.url(),
            "--cookie-file",
            cookie.to_str().unwrap(),
        ],
    )
    .await;
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert_says(
        &log,
        &[
            "wrong network",
            "Bitcoin Core node at [chain] bitcoind_url is on regtest",
            "network = \"bitcoin\"",
            "set network = \"regtest\"",
        ],
    );
    assert!(!log.contains("proxy started"), "{log}");
    assert!(!dir.join("paychan.db").exists(), "the store is not even opened");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same on Esplora (the loopback electrs fake; no node needed): a regtest config against
/// a server whose block 0 is mainnet's genesis block does not start, naming `esplora_url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regtest_config_on_a_mainnet_esplora_does_not_start() {
    use common::esplora_fake::{Flavor, genesis_of, serve_with_genesis};
    let chain = paychan::chain::sim::SimulatedChain::new();
    let url = serve_with_genesis(chain, Flavor::New, genesis_of(Network::Bitcoin)).await;
    let payout = Address::from_script(&common::p2wpkh(&common::secret(2)), Network::Regtest);
    let payout = payout.unwrap().to_string();
    let (out, dir) = init_and_serve(
        "regtest-on-mainnet-esplora",
        &["--network", "regtest", "--payout-address", &payout, "--esplora-url", &url],
    )
    .await;
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert_says(
        &log,
        &[
            "wrong network",
            "Esplora server at [chain] esplora_url is on bitcoin",
            "network = \"regtest\"",
            "set network = \"bitcoin\"",
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Review F4: a channel the client's state marks closed, whose close never confirmed (the
/// server answered 202 "closing" and vanished), is refunded by `client refund` once final:
/// the chain decides (funding output unspent, refund valid), not the local mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refund_asks_the_chain_not_the_closed_mark() {
    let Some(site) = Site::new("marked").await else { return };
    let proxy = site.serve(0).await;
    let mut pay = site.pay("marked", "/hello");
    pay.extend(args(&["--lifetime-blocks", "150"]));
    let out = paychan(pay).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    site.node.mine(1).await;
    // The close the server acknowledged and never broadcast: the state says closed.
    let channels = site.dir.join("marked").join("channels");
    let mut marked = 0;
    for entry in std::fs::read_dir(&channels).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let mut channel: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            channel["closed"] = true.into();
            channel["retired"] = true.into();
            std::fs::write(&path, channel.to_string()).unwrap();
            marked += 1;
        }
    }
    assert_eq!(marked, 1);
    let (status, _) = site.stop(proxy, 0).await;
    assert!(status.success());
    site.node.mine(150).await;
    let refund = || paychan(site.client(&["client", "refund"], "marked"));
    site.refunds_once(&refund).await;
    std::fs::remove_dir_all(&site.dir).unwrap();
}

/// `GET path` with `headers` (each line ending in CRLF), exactly as written: no client
/// normalises the path on the way.
fn raw_get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n{headers}\r\n")
}

/// Sends `request` to `authority` and reads the answer to its end.
async fn raw(authority: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    text(&answer)
}

/// The status code of a raw answer.
fn status_of(answer: &str) -> &str {
    answer.split_whitespace().nth(1).unwrap_or_default()
}

/// With a free `/public/{*rest}` and every other `GET` priced: paths that servlet containers,
/// double-decoding upstreams or the proxy's own router would resolve differently are refused
/// (400, a problem document) and never reach the upstream; an encoded path is priced and
/// forwarded as its normal form; override and client forwarding headers are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_only_what_it_priced() {
    let Some(site) = Site::new("paths").await else { return };
    site.free_public();
    let proxy = site.serve(0).await;
    for path in [
        "/public/..;/paid",
        "/public/..;jsessionid=x/paid",
        "/public/..%252fpaid",
        "/public/%252e%252e/paid",
        "/public/%2e%2e/paid",
        "/public/../paid",
        "/public/x;a=b",
        "/public/x?_method=DELETE",
    ] {
        let answer = raw(site.authority(), &raw_get(path, "")).await;
        assert_eq!(status_of(&answer), "400", "{path}: {answer}");
        assert!(answer.contains("application/problem+json"), "{path}: {answer}");
    }
    assert_eq!(
        *site.seen.log.lock().unwrap(),
        Vec::<String>::new(),
        "nothing reached the upstream"
    );

    // Priced as the path it normalises to (free here, not the priced `/{*rest}`).
    let answer = raw(site.authority(), &raw_get("/%70ublic/%7Ex", "")).await;
    assert_eq!(status_of(&answer), "200", "{answer}");
    let forged = "X-HTTP-Method-Override: DELETE\r\nX-Method-Override: DELETE\r\n\
        X-HTTP-Method: DELETE\r\nX-Original-URL: /paid\r\nX-Rewrite-URL: /paid\r\n\
        Forwarded: for=203.0.113.9\r\nX-Real-IP: 203.0.113.9\r\nX-Forwarded-For: 203.0.113.9\r\n\
        X-Forwarded-Host: evil.example\r\n";
    let answer = raw(site.authority(), &raw_get("/public/h", forged)).await;
    assert_eq!(status_of(&answer), "200", "{answer}");
    // A paid path is paid however it is spelled.
    let answer = raw(site.authority(), &raw_get("/%68ello", "")).await;
    assert_eq!(status_of(&answer), "402", "{answer}");
    let own = "x-forwarded-for=127.0.0.1 x-forwarded-host=proxy";
    assert_eq!(
        *site.seen.log.lock().unwrap(),
        [format!("GET /public/~x {own}"), format!("GET /public/h {own}")],
        "the upstream saw the priced path and only the proxy's forwarding headers"
    );
    site.finish(proxy, 0).await;
}

/// Waits (45 s at most: far beyond the 1 s header timeout) for the answer to a request sent
/// while `held` is the proxy's only connection, then checks that the proxy closed `held`
/// first: the connection limit kept the request waiting, the header timeout freed the slot.
async fn answered_after_the_proxy_cut(site: &Site, held: std::net::TcpStream, what: &str) {
    let answer = tokio::time::timeout(
        Duration::from_secs(45),
        raw(site.authority(), &raw_get("/public/next", "")),
    )
    .await
    .unwrap_or_else(|_| panic!("{what}: still holding the only connection after 45 s"));
    assert_eq!(status_of(&answer), "200", "{answer}");
    use std::io::Read;
    held.set_nonblocking(true).unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match (&held).read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("{what}: a second request was served while this one was open")
            }
            Err(_) => return, // reset: closed as well
        }
    }
}

/// The plain-HTTP listener's limits (`[listener]`): headers larger than `max_header_bytes` are
/// refused (431); a client trickling its headers, one line every 500 ms, is cut at
/// `header_timeout_secs`, and so is a client that sends nothing; with `max_connections = 1` a
/// second client is served only after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_large_headers_are_cut_on_plain_http() {
    let Some(site) = Site::new("slowloris").await else { return };
    site.free_public();
    site.edit_config("# header_timeout_secs = 30", "header_timeout_secs = 1");
    site.edit_config("# max_header_bytes = 32768", "max_header_bytes = 8192");
    site.edit_config("# max_connections = 512", "max_connections = 1");
    let proxy = site.serve(0).await;

    let large = format!("X-Large: {}\r\n", "a".repeat(16 * 1024));
    let answer = raw(site.authority(), &raw_get("/public/large", &large)).await;
    assert_eq!(status_of(&answer), "431", "{answer}");

    // One header line every 500 ms, for 30 s (fewer lines than hyper's 100-header limit).
    let trickler = std::net::TcpStream::connect(site.authority()).unwrap();
    let mut writer = trickler.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        use std::io::Write;
        writer.write_all(b"GET /public/slow HTTP/1.1\r\nHost: proxy\r\n").unwrap();
        for n in 0..60 {
            std::thread::sleep(Duration::from_millis(500));
            if writer.write_all(format!("X-Line-{n}: a\r\n").as_bytes()).is_err() {
                return;
            }
        }
    });
    answered_after_the_proxy_cut(&site, trickler, "a trickling client").await;
    let silent = std::net::TcpStream::connect(site.authority()).unwrap();
    answered_after_the_proxy_cut(&site, silent, "a silent client").await;
    trickle.join().unwrap();
    let log = site.seen.log.lock().unwrap().clone();
    assert!(log.iter().all(|line| !line.contains("/public/slow")), "{log:?}");
    site.finish(proxy, 0).await;
}

/// Review 2026-12 (server side): one client holding silent connections kept every other client
/// out once it held `max_connections` of them (one global cap, no per-client share). Now a
/// client holds at most `max_connections_per_client`; its next connections are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_silent_connections_do_not_lock_everyone_out() {
    let Some(site) = Site::new("per-client").await else { return };
    site.free_public();
    site.edit_config("# max_connections = 512", "max_connections = 4");
    site.edit_config("# max_connections_per_client = 32", "max_connections_per_client = 2");
    let proxy = site.serve(0).await;
    // Four silent connections from another loopback address than the next client's.
    let target: std::net::SocketAddr = site.authority().parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(socket.connect(target).await.unwrap());
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        raw(site.authority(), &raw_get("/public/next", "")),
    )
    .await;
    drop(held);
    site.finish(proxy, 0).await;
    let answer = answer.expect("one client's silent connections kept another client out");
    assert_eq!(status_of(&answer), "200", "{answer}");
}

/// Each of `lines` is in the binary's log `log`.
fn assert_says(log: &str, lines: &[&str]) {
    for said in lines {
        assert!(log.contains(said), "{said:?} in {log}");
    }
}

/// On mainnet, `init` does not choose a hot payout by itself: without `--payout-address` it
/// refuses, naming both choices, and writes nothing; `--payout-to-bump-key` makes the choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mainnet_init_asks_where_the_earnings_go() {
    let dir = std::env::temp_dir().join(format!("paychan-cli-hot-payout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("paychan.toml").to_str().unwrap().to_owned();
    let out = paychan(args(&["init", "--config", &config, "--network", "bitcoin"])).await;
    assert!(!out.status.success());
    assert_says(&text(&out.stderr), &["--payout-address", "--payout-to-bump-key", "hot key"]);
    assert!(!dir.join("paychan.toml").exists() && !dir.join("paychan-bump.key").exists());
    let chosen =
        args(&["init", "--config", &config, "--network", "bitcoin", "--payout-to-bump-key"]);
    let out = paychan(chosen).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.join("paychan-bump.key").exists());
}

/// The webhook's signing secret in the tests.
const HOOK_SECRET: &str = "test-webhook-secret-0123456789";

/// What the test's webhook receiver saw: every attempt (its event id and whether its
/// signature held), and the events it accepted, in order.
#[derive(Default)]
struct Hook {
    attempts: std::sync::Mutex<Vec<(String, bool)>>,
    accepted: std::sync::Mutex<Vec<Value>>,
}

/// A webhook receiver that checks each POST's `Paychan-Signature` as PRODUCTION.md says,
/// answers 500 to an event's first attempt and 200 to the next; its URL.
async fn hook_receiver(hook: Arc<Hook>) -> String {
    use bitcoin::hashes::{Hash as _, HashEngine as _, hmac, sha256};
    async fn receive(
        axum::extract::State(hook): axum::extract::State<Arc<Hook>>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let signature = headers["paychan-signature"].to_str().unwrap();
        let (t, v1) = signature.split_once(",v1=").unwrap();
        let t = t.strip_prefix("t=").unwrap();
        let mut engine = hmac::HmacEngine::<sha256::Hash>::new(HOOK_SECRET.as_bytes());
        engine.input(format!("{t}.").as_bytes());
        engine.input(&body);
        let valid = hmac::Hmac::from_engine(engine).to_string() == v1;
        let event: Value = serde_json::from_slice(&body).unwrap();
        let id = event["id"].as_str().unwrap().to_owned();
        let mut attempts = hook.attempts.lock().unwrap();
        let first = !attempts.iter().any(|(seen, _)| *seen == id);
        attempts.push((id, valid));
        if first || !valid {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        hook.accepted.lock().unwrap().push(event);
        StatusCode::OK
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new().route("/hook", axum::routing::post(receive)).with_state(hook);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// Waits (up to two minutes) until `hook` accepted as many events as the log at `log` has.
async fn delivered(hook: &Hook, log: &Path) {
    for _ in 0..1_200 {
        if hook.accepted.lock().unwrap().len() >= logged(log).len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the webhook did not get every event: {:?}", hook.attempts.lock().unwrap());
}

/// The events of the log at `path`, in order.
fn logged(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Waits (up to a minute) until the events of `channel` in the log at `path` satisfy `done`
/// (given their kinds); returns them.
async fn wait_for_events(path: &Path, channel: &str, done: impl Fn(&[&str]) -> bool) -> Vec<Value> {
    for _ in 0..600 {
        let events: Vec<Value> =
            logged(path).into_iter().filter(|e| e["channel"] == channel).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        if done(&kinds) {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the events of {channel} never got there: {:?}", logged(path));
}

/// The billing event log (issue #27 item 7) on a real node: a channel opened and paid, the
/// proxy stopped, the operator's close while it is down, the proxy back: the log has each of
/// the channel's events once, in order (the close caught up after the restart), the close's
/// txid on `closed` and `settled`; the webhook got each event signed, refused once (500) and
/// accepted on the retry, in the log's order; `paychan report` gives what the client paid and
/// what its requests were charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_events_are_logged_once_signed_delivered_and_reported() {
    let Some(site) = Site::new("events").await else { return };
    let hook = Arc::new(Hook::default());
    let log = site.enable_events(Some(&hook_receiver(Arc::clone(&hook)).await));
    let proxy = site.serve(0).await;
    let pay = async || {
        let out = paychan(site.pay("client", "/hello")).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    pay().await;
    let id = site.client_paid("client").await[0].0.clone();
    let events =
        |kind: &'static str| wait_for_events(&log, &id, move |kinds| kinds.contains(&kind));
    // Opened (and open at once: a zero-conf funding), then two more requests: usage.
    let funded = events("funded").await;
    pay().await;
    pay().await;
    site.node.mine(1).await;
    let (_, paid_sat) = site.client_paid("client").await[0].clone();
    let spent = channel_json(&site.config, &id).await["spent_msat"].as_u64().unwrap();
    assert_eq!(spent, 6_000, "three requests at 2 sat");
    wait_for_events(&log, &id, |_| logged(&log).last().unwrap()["spent_msat"] == spent).await;
    // Stopped once the webhook has them all (a stop cutting a POST short would send that event
    // again after the restart: at least once, with the same id).
    delivered(&hook, &log).await;
    let before = logged(&log).len();
    // The metrics say so (once the deliverer counted the last 2xx it got).
    let expected = [
        format!("paychan_events_logged_total {before}"),
        format!("paychan_webhook_delivered_total {before}"),
        format!("paychan_webhook_failures_total {before}"),
        "paychan_webhook_pending 0".to_owned(),
    ];
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = fetch(&format!("{}/metrics", site.admin), Some(&site.token)).await.1;
        if metrics.lines().any(|line| line == expected[1]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for line in &expected {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    let (status, _) = site.stop(proxy, 0).await;
    assert!(status.success());
    assert_eq!(
        &funded[..2].iter().map(|e| e["kind"].clone()).collect::<Vec<_>>(),
        &["opened", "funded"]
    );

    // Closed by the operator while the proxy is down; the proxy back catches up.
    let out = paychan(args(&["close", "--config", &site.config_arg(), &id])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let close =
        text(&out.stdout).split_whitespace().nth(2).unwrap().trim_end_matches(':').to_owned();
    let proxy = site.serve(1).await;
    events("closed").await;
    site.node.mine(1).await;
    let all = events("settled").await;
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds[kinds.len() - 3..], ["closing", "closed", "settled"], "{kinds:?}");
    let middle = &kinds[2..kinds.len() - 3];
    assert!(middle.contains(&"usage"), "{kinds:?}");
    assert!(middle.iter().all(|k| ["topped_up", "usage"].contains(k)), "{kinds:?}");
    assert!(logged(&log).len() > before);
    // Once each, numbered in order, ids distinct, across the restart.
    for (n, event) in all.iter().enumerate() {
        assert_eq!(event["seq"], n, "{all:?}");
    }
    let ids: std::collections::HashSet<&str> =
        all.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), all.len());
    let paid_msat = paid_sat * 1_000;
    for event in &all[all.len() - 2..] {
        assert_eq!(event["txid"], close.as_str(), "{event}");
    }
    let settled = all.last().unwrap();
    assert_eq!(
        (settled["paid_msat"].as_u64(), settled["spent_msat"].as_u64()),
        (Some(paid_msat), Some(spent))
    );
    let client_key = settled["client_key"].as_str().unwrap();
    assert!(all.iter().all(|e| e["client_key"] == client_key));

    // The webhook: every event of the log, in its order, each refused once then accepted.
    delivered(&hook, &log).await;
    let count = logged(&log).len();
    let (status, _) = site.stop(proxy, 1).await;
    assert!(status.success());
    assert_eq!(*hook.accepted.lock().unwrap(), logged(&log), "each event once, in order");
    let attempts = hook.attempts.lock().unwrap().clone();
    assert!(attempts.iter().all(|(_, valid)| *valid), "every signature holds");
    assert_eq!(attempts.len(), 2 * count, "one 500 and one retry each: {attempts:?}");

    // The usage export: what the client paid, what its requests were charged.
    let report = |extra: &[&str]| {
        let mut all = args(&["report", "--config", &site.config_arg()]);
        all.extend(args(extra));
        paychan(all)
    };
    let out = report(&["--format", "json", "--by", "client"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &json["rows"][0];
    assert_eq!(json["rows"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(row["client_key"], client_key);
    assert_eq!(
        (row["channels"].as_u64(), row["opened"].as_u64(), row["settled"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(row["paid_msat"], paid_msat, "what the client paid: {json}");
    assert_eq!(row["charged_msat"], spent, "{json}");
    assert_eq!(row["settled_msat"], paid_msat, "{json}");
    let out = report(&["--from", "2000-01-01", "--format", "csv"]).await;
    let csv = text(&out.stdout);
    let line = csv.lines().nth(1).unwrap_or_default();
    assert!(line.starts_with(&format!("{id},{client_key},1,")), "{csv}");
    assert!(line.ends_with(&format!(",{paid_msat},{spent},{paid_msat}")), "{csv}");
    let out = report(&["--to", "2000-01-01"]).await;
    assert_eq!(text(&out.stdout).lines().count(), 1, "only the header before the log began");
    std::fs::remove_dir_all(&site.dir).unwrap();
}
