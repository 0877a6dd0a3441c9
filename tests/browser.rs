//! The browser client end to end: the demo page (`web/demo/index.html`, `web/js/paychan.js`
//! over the wasm of `web/`) in real headless Chromium, driven by `web/tests/e2e.mjs`
//! (playwright-core), against the demo server (`examples/browser/app.rs`: the `Merchant`,
//! the negotiation, the settlement task, the chain view) on a real Bitcoin Core regtest node.
//!
//! The page deposits (the node's wallet pays its address), opens a channel, pays 100 requests
//! (topping up on 402), reloads and pays 20 more on the same channel, closes fairly (the close
//! is found on chain and pays what the page was told), opens a second channel and exports its
//! refund; then the server vanishes and Core accepts the exported refund at its lock time,
//! not a block before.
//!
//! Needs `BITCOIND_EXE`, Node.js, Debian's `chromium`, `web/node_modules` (`npm ci` in `web/`)
//! and `web/pkg` (`bash web/build.sh`): `.ci/run` provides them all. Without them the test
//! prints `skipped: …` and passes, except with `CI=true`, where it fails.
#![cfg(feature = "bitcoind")]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Address, Amount, Network, ScriptBuf, Transaction, Txid};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use common::node::{Node, NodeConfig};

#[path = "../examples/browser/app.rs"]
#[allow(dead_code)]
mod app;

/// What the browser test needs besides the node, or why it cannot run.
fn browser_tools(web: &Path) -> Result<(), String> {
    let missing = |what: &str| Err(format!("{what} is missing"));
    if std::process::Command::new("node").arg("--version").output().is_err() {
        return missing("node (Node.js)");
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !chromium.exists() {
        return missing("chromium (apt-get install chromium)");
    }
    if !web.join("node_modules/playwright-core").exists() {
        return missing("web/node_modules (npm ci in web/)");
    }
    if !web.join("pkg/paychan_web_bg.wasm").exists() {
        return missing("web/pkg (bash web/build.sh)");
    }
    Ok(())
}

/// A demo server on a real node, and a page script driving Chromium against it.
struct Harness {
    node: Node,
    merchant: Option<paychan::Started<paychan::store::MemoryStore, paychan::server::RoutePrices>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    page: tokio::process::Child,
    to_page: Option<tokio::process::ChildStdin>,
    from_page: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// The page's deposit address.
    deposit: ScriptBuf,
}

impl Harness {
    /// Starts the node, the demo server and `script` (in `web/tests/`), and answers the
    /// page's deposit step: 200 000 sat from Core's wallet to its address, confirmed. `None`
    /// when the tools are missing (outside CI).
    async fn start(script: &str) -> Option<Harness> {
        Self::start_with(script, axum::Router::new()).await
    }

    /// [`start`](Self::start), the demo server with the routes of `extra` too (outside its
    /// paywall).
    async fn start_with(script: &str, extra: axum::Router) -> Option<Harness> {
        let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
        if let Err(why) = browser_tools(&web) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the browser test cannot run: {why}"
            );
            println!("skipped: {why}");
            return None;
        }
        let node = Node::start(NodeConfig::default()).await?;
        node.create_wallet("w").await;
        node.mine(101).await;

        let (router, merchant) =
            app::app(node.chain(), web.clone()).await.expect("the demo server starts");
        let router = extra.merge(router);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await
        });
        let mut page = tokio::process::Command::new("node")
            .arg(web.join("tests").join(script))
            .arg(&base)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let to_page = page.stdin.take();
        let from_page = BufReader::new(page.stdout.take().unwrap()).lines();
        let deposit = ScriptBuf::new();
        let merchant = Some(merchant);
        let mut h = Harness { node, merchant, server, page, to_page, from_page, deposit };
        let step = h.next().await;
        assert_eq!(step["step"], "deposit");
        let address = step["address"].as_str().unwrap().parse::<Address<_>>().unwrap();
        h.deposit = address.require_network(Network::Regtest).unwrap().script_pubkey();
        h.node.fund_address(&h.deposit, Amount::from_sat(200_000)).await;
        h.node.mine(1).await;
        h.tell("deposited").await;
        Some(h)
    }

    /// The page script's next step.
    async fn next(&mut self) -> Value {
        let line = self.from_page.next_line();
        let line = tokio::time::timeout(Duration::from_secs(180), line)
            .await
            .expect("the page answers within 3 minutes")
            .unwrap()
            .expect("the page's script ended early (its error is above)");
        println!("page: {line}");
        serde_json::from_str(&line).unwrap()
    }

    async fn tell(&mut self, line: &str) {
        let to_page = self.to_page.as_mut().unwrap();
        to_page.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    }

    /// The script's last step and its exit: it passed.
    async fn done(&mut self) {
        assert_eq!(self.next().await["step"], "done");
        self.to_page = None;
        let ended = tokio::time::timeout(Duration::from_secs(60), self.page.wait()).await;
        let status = ended.expect("the page's script ends").unwrap();
        assert!(status.success(), "the page's script passed");
    }

    /// The settlement `txid` is in Core's mempool, then mined; the transaction.
    async fn mined(&self, txid: Txid) -> Transaction {
        assert!(self.node.mempool_entry(txid).await.is_some(), "{txid} is in Core's mempool");
        let tx = self.node.mempool_tx(txid).await;
        let height = self.node.mine(1).await;
        assert_eq!(self.node.confirmed_at(txid, height).await, Some(height), "{txid} is mined");
        tx
    }

    /// The funding of `channel` (`txid:vout`) is in Core's mempool or in one of its last
    /// blocks (`what` says whose).
    async fn assert_funding_accepted(&self, channel: &str, what: &str) {
        let funding: Txid = channel.split(':').next().unwrap().parse().unwrap();
        let recent = self.node.height().await.saturating_sub(3);
        assert!(
            self.node.mempool_entry(funding).await.is_some()
                || self.node.confirmed_at(funding, recent).await.is_some(),
            "{what}"
        );
    }

    /// What `tx` pays the page's deposit address.
    fn to_deposit(&self, tx: &Transaction) -> u64 {
        let outputs = tx.output.iter().filter(|o| o.script_pubkey == self.deposit);
        outputs.map(|o| o.value.to_sat()).sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_deposits_opens_pays_reloads_closes_and_keeps_a_refund_core_accepts() {
    let Some(mut h) = Harness::start("e2e.mjs").await else { return };
    let paid = h.next().await;
    assert_eq!(paid["step"], "paid", "{paid}");
    let channel = paid["channel"].as_str().unwrap().to_owned();
    h.assert_funding_accepted(
        &channel,
        "the server broadcast the page's funding and Core accepted it",
    )
    .await;
    let reloaded = h.next().await;
    assert_eq!(reloaded["step"], "reloaded", "{reloaded}");
    assert_eq!(reloaded["channel"], channel.as_str());

    // The fair close: on chain, paying the server what the page was told and the rest back.
    let closed = h.next().await;
    assert_eq!(closed["step"], "closed", "{closed}");
    assert_eq!(closed["onChain"], true, "the page's chain view took the settlement");
    let close = h.mined(closed["txid"].as_str().unwrap().parse().unwrap()).await;
    let back = h.to_deposit(&close);
    assert_eq!(back, closed["clientSat"].as_u64().unwrap(), "the prepaid rest came back");
    // 120 requests at 5 sat: the server gets what was served, rounded up to its dust floor.
    let server_sat = closed["serverSat"].as_u64().unwrap();
    assert!((600..=600 + 294).contains(&server_sat), "fair close paid the server {server_sat} sat");
    h.tell("close-seen").await;

    // A second channel and its exported refund; then the server vanishes.
    let refund = h.next().await;
    assert_eq!(refund["step"], "refund", "{refund}");
    assert_eq!(h.next().await["step"], "bench");
    h.done().await;
    h.merchant.take().unwrap().stop();
    h.server.abort();

    let refund_tx: Transaction = deserialize_hex(refund["refundTx"].as_str().unwrap()).unwrap();
    let refund_height = u32::try_from(refund["refundHeight"].as_u64().unwrap()).unwrap();
    h.node.mine_to(refund_height - 1).await;
    let early = h.node.send_raw(&refund_tx).await;
    assert!(early.is_err(), "Core refuses the refund before its lock time: {early:?}");
    h.node.mine_to(refund_height).await;
    let txid = h.node.send_raw(&refund_tx).await.expect("Core accepts the refund at its lock time");
    let height = h.node.mine(1).await;
    assert_eq!(h.node.confirmed_at(txid, height).await, Some(height));
    assert!(h.to_deposit(&refund_tx) > 0, "the refund pays the deposit address");
}

/// A lying media server: whatever a request paid, it asks for one more second and serves
/// nothing (`/media/liar.wav`, beside the demo's paywall).
async fn liar(headers: http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let payment = headers
        .get(paychan::wire::PAYMENT_CHANNEL)
        .and_then(|h| paychan::wire::decode_payment(h.as_bytes()).ok());
    let Some(payment) = payment else { return http::StatusCode::PAYMENT_REQUIRED.into_response() };
    let id = paychan::wire::ChannelId::new(payment.input[0].previous_output);
    let paid = paychan::channel::server_amount(&payment).to_sat();
    let problem = serde_json::json!({
        "type": "urn:paychan:problem:insufficient-balance", "title": "Payment Required",
        "status": 402, "detail": "one more second, please", "code": "insufficient-balance",
        "price_msat": 1_000,
        "channel": {
            "channel": id.to_string(), "state": "open",
            "paid_msat": paid * 1_000, "spent_msat": paid * 1_000, "balance_msat": 0,
            "price_msat": 1_000, "capacity_left_sat": 0,
            "min_server_amount_sat": paid + 1, "suggested_server_amount_sat": paid + 1_000,
            "expiry": 0, "close_by": 0
        }
    });
    let mut response = axum::Json(problem).into_response();
    *response.status_mut() = http::StatusCode::PAYMENT_REQUIRED;
    response
}

/// Paying for media: a plain `<audio>` element plays the demo's tune while the Service Worker
/// (`web/js/paychan-sw.js`) pays 10 sat per two seconds fetched on the page's channel; 20 s and more
/// are played, with a reload mid-stream; the worker counts what the server charged; the worker
/// is killed mid-stream and pays on; a lying media server beside the demo is stopped at the
/// loss bound; the fair close pays the server what it charged and is mined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_worker_pays_per_second_for_audio_across_a_reload() {
    let liar = axum::Router::new().route("/media/liar.wav", axum::routing::get(liar));
    let Some(mut h) = Harness::start_with("listen.mjs", liar).await else { return };
    let opened = h.next().await;
    assert_eq!(opened["step"], "opened", "{opened}");
    let played = h.next().await;
    assert_eq!(played["step"], "played", "{played}");
    let listened = h.next().await;
    assert_eq!(listened["step"], "listened", "{listened}");
    assert!(listened["seconds"].as_f64().unwrap() >= 20.0);
    assert_eq!(listened["channel"], opened["channel"]);
    let resumed = h.next().await;
    assert_eq!(resumed["step"], "resumed", "{resumed}");
    assert_eq!(resumed["channel"], opened["channel"]);
    let lied_to = h.next().await;
    assert_eq!(lied_to["step"], "lied-to", "{lied_to}");
    let closed = h.next().await;
    assert_eq!(closed["step"], "closed", "{closed}");
    let close = h.mined(closed["txid"].as_str().unwrap().parse().unwrap()).await;
    assert_eq!(h.to_deposit(&close), closed["clientSat"].as_u64().unwrap());
    // The server was paid exactly the seconds it served (1 sat each, from its dust floor),
    // not what the liar beside it was handed.
    let charged = closed["chargedMsat"].as_u64().unwrap().div_ceil(1_000);
    assert_eq!(closed["serverSat"].as_u64().unwrap(), charged.max(294));
    h.done().await;
}

/// Funding from the user's own wallet by PSBT, and a metered stream (issue #25): Bitcoin
/// Core's wallet plays the user's (`walletcreatefundedpsbt` makes the unsigned funding,
/// `walletprocesspsbt` signs it); the page refuses a PSBT that pays the channel too little and
/// a signed PSBT of another transaction, has the refund signed and saved before the wallet
/// signs, hands the funding to the server, pays 30 requests with receipts, reads a metered SSE
/// stream of 2 500 events with in-band top-ups and its receipt, and closes fairly, paying the
/// server exactly what it served. Core accepts the funding and the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_funds_a_channel_by_psbt_and_reads_a_metered_stream() {
    let Some(mut h) = Harness::start("psbt.mjs").await else { return };
    let output = h.next().await;
    assert_eq!(output["step"], "fund-psbt", "{output}");
    let address = output["address"].as_str().unwrap().to_owned();
    let amount = Amount::from_sat(output["amountSat"].as_u64().unwrap());
    let fee_rate = output["feeRateSatPerVb"].as_u64().unwrap().max(1);
    let funded_psbt = |amount: Amount| {
        let outputs = serde_json::json!([{ address.clone(): amount.to_btc() }]);
        let options = serde_json::json!({ "replaceable": false, "fee_rate": fee_rate });
        (outputs, options)
    };
    let (outputs, options) = funded_psbt(amount - Amount::from_sat(1));
    let short = h
        .node
        .wallet_rpc("walletcreatefundedpsbt", serde_json::json!([[], outputs, 0, options]))
        .await;
    h.tell(&serde_json::json!({ "psbt": short["psbt"] }).to_string()).await;
    assert_eq!(h.next().await["step"], "refused-short");
    // The right funding, signed by the wallet before the page had its refund: refused.
    let (outputs, options) = funded_psbt(amount);
    let early = h
        .node
        .wallet_rpc("walletcreatefundedpsbt", serde_json::json!([[], outputs, 0, options]))
        .await;
    let early = h.node.wallet_rpc("walletprocesspsbt", serde_json::json!([early["psbt"]])).await;
    h.tell(&serde_json::json!({ "psbt": early["psbt"] }).to_string()).await;
    assert_eq!(h.next().await["step"], "refused-signed");

    let (outputs, options) = funded_psbt(amount);
    let unsigned = h
        .node
        .wallet_rpc("walletcreatefundedpsbt", serde_json::json!([[], outputs, 0, options]))
        .await;
    h.tell(&serde_json::json!({ "psbt": unsigned["psbt"] }).to_string()).await;
    let to_sign = h.next().await;
    assert_eq!(to_sign["step"], "sign-psbt", "{to_sign}");
    // Another funding of the same output, signed: not the transaction whose refund the page
    // holds.
    let (outputs, options) = funded_psbt(amount);
    let other = h
        .node
        .wallet_rpc("walletcreatefundedpsbt", serde_json::json!([[], outputs, 0, options]))
        .await;
    let other = h.node.wallet_rpc("walletprocesspsbt", serde_json::json!([other["psbt"]])).await;
    h.tell(&serde_json::json!({ "psbt": other["psbt"] }).to_string()).await;
    let signed = h.node.wallet_rpc("walletprocesspsbt", serde_json::json!([to_sign["psbt"]])).await;
    assert_eq!(signed["complete"], true, "{signed}");
    h.tell(&serde_json::json!({ "psbt": signed["psbt"] }).to_string()).await;

    let funded = h.next().await;
    assert_eq!(funded["step"], "funded", "{funded}");
    let channel = funded["channel"].as_str().unwrap().to_owned();
    let accepted = "the server broadcast the funding Core's wallet signed, and Core accepted it";
    h.assert_funding_accepted(&channel, accepted).await;
    let paid = h.next().await;
    assert_eq!(paid["step"], "paid", "{paid}");
    assert_eq!(paid["channel"], channel.as_str());
    let streamed = h.next().await;
    assert_eq!(streamed["step"], "streamed", "{streamed}");
    let closed = h.next().await;
    assert_eq!(closed["step"], "closed", "{closed}");
    assert_eq!(closed["onChain"], true);
    let close = h.mined(closed["txid"].as_str().unwrap().parse().unwrap()).await;
    // 30 requests at 5 sat and a stream of 2 500 events at 1 sat with 1 sat up front: the
    // server's output is exactly what it served.
    let server_sat = closed["serverSat"].as_u64().unwrap();
    assert_eq!(server_sat, 150 + 2_501, "fair close paid the server {server_sat} sat");
    assert!(close.output.iter().any(|o| o.value.to_sat() == closed["clientSat"].as_u64().unwrap()));
    h.done().await;
}
