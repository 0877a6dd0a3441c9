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

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Address, Amount, Network, Transaction, Txid};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_deposits_opens_pays_reloads_closes_and_keeps_a_refund_core_accepts() {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    if let Err(why) = browser_tools(&web) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the browser test cannot run: {why}"
        );
        println!("skipped: {why}");
        return;
    }
    let Some(node) = Node::start(NodeConfig::default()).await else { return };
    node.create_wallet("w").await;
    node.mine(101).await;

    let (router, merchant) =
        app::app(node.chain(), web.clone()).await.expect("the demo server starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await
    });

    let mut page = tokio::process::Command::new("node")
        .arg(web.join("tests/e2e.mjs"))
        .arg(&base)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let mut to_page = page.stdin.take().unwrap();
    let mut from_page = BufReader::new(page.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(std::time::Duration::from_secs(180), from_page.next_line())
            .await
            .expect("the page answers within 3 minutes")
            .unwrap()
            .expect("the page's script ended early (its error is above)");
        println!("page: {line}");
        serde_json::from_str(&line).unwrap()
    };

    // The deposit: 200 000 sat from Core's wallet to the page's address, confirmed.
    let step = next().await;
    assert_eq!(step["step"], "deposit");
    let deposit: Address = step["address"]
        .as_str()
        .unwrap()
        .parse::<Address<_>>()
        .unwrap()
        .require_network(Network::Regtest)
        .unwrap();
    node.fund_address(&deposit.script_pubkey(), Amount::from_sat(200_000)).await;
    node.mine(1).await;
    to_page.write_all(b"deposited\n").await.unwrap();

    let paid = next().await;
    assert_eq!(paid["step"], "paid", "{paid}");
    let channel = paid["channel"].as_str().unwrap().to_owned();
    let funding: Txid = channel.split(':').next().unwrap().parse().unwrap();
    assert!(
        node.mempool_entry(funding).await.is_some()
            || node.confirmed_at(funding, node.height().await.saturating_sub(3)).await.is_some(),
        "the server broadcast the page's funding and Core accepted it"
    );
    let reloaded = next().await;
    assert_eq!(reloaded["step"], "reloaded", "{reloaded}");
    assert_eq!(reloaded["channel"], channel.as_str());

    // The fair close: on chain, paying the server what the page was told and the rest back.
    let closed = next().await;
    assert_eq!(closed["step"], "closed", "{closed}");
    let close_txid: Txid = closed["txid"].as_str().unwrap().parse().unwrap();
    assert!(node.mempool_entry(close_txid).await.is_some(), "the close is in Core's mempool");
    let close = node.mempool_tx(close_txid).await;
    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(close_txid, height).await, Some(height), "the close is mined");
    let back: Amount = close
        .output
        .iter()
        .filter(|o| o.script_pubkey == deposit.script_pubkey())
        .map(|o| o.value)
        .sum();
    assert_eq!(back.to_sat(), closed["clientSat"].as_u64().unwrap(), "the prepaid rest came back");
    // 120 requests at 5 sat: the server gets what was served, rounded up to its dust floor.
    let server_sat = closed["serverSat"].as_u64().unwrap();
    assert!((600..=600 + 294).contains(&server_sat), "fair close paid the server {server_sat} sat");
    to_page.write_all(b"close-seen\n").await.unwrap();

    // A second channel and its exported refund; then the server vanishes.
    let refund = next().await;
    assert_eq!(refund["step"], "refund", "{refund}");
    assert_eq!(next().await["step"], "done");
    drop(to_page);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), page.wait()).await;
    assert!(ended.expect("the page's script ends").unwrap().success(), "the page's script passed");
    merchant.stop();
    server.abort();

    let refund_tx: Transaction = deserialize_hex(refund["refundTx"].as_str().unwrap()).unwrap();
    let refund_height = u32::try_from(refund["refundHeight"].as_u64().unwrap()).unwrap();
    node.mine_to(refund_height - 1).await;
    let early = node.send_raw(&refund_tx).await;
    assert!(early.is_err(), "Core refuses the refund before its lock time: {early:?}");
    node.mine_to(refund_height).await;
    let txid =
        node.send_raw(&refund_tx).await.expect("Core accepts the exported refund at its lock time");
    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(txid, height).await, Some(height));
    assert!(
        refund_tx.output.iter().any(|o| o.script_pubkey == deposit.script_pubkey()),
        "the refund pays the deposit address"
    );
}
