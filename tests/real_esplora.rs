//! The settlement task over `Esplora` on a real electrs (`ELECTRS_EXE`) in front of a real
//! Bitcoin Core regtest node (`BITCOIND_EXE`): the scenarios `tests/esplora.rs` runs on the
//! fake, with the node's mempool, blocks and restarts. `#[ignore]`d (CI keeps the fake); run
//! by hand as docs/ESPLORA-RUN.md says, where the run is recorded. The conformance suite's
//! real-electrs harness is in `tests/chain_conformance.rs`.
#![cfg(all(feature = "esplora", feature = "bitcoind"))]

mod common;

use bitcoin::Amount;
use common::esplora_settle::{
    ask_close, close_into_mempool, close_of, funding, params, state, store_open, task,
};
use common::node::Node;
use common::{p2wpkh, secret};
use paychan::chain::esplora::{Esplora, PackageRelay};
use paychan::chain::{ChainBackend, TxStatus};
use paychan::channel::ChannelState;
use paychan::store::MemoryStore;
use paychan::wire::ChannelId;
use serde_json::json;

/// A channel (index `index`) funded from the node's wallet and confirmed, stored open in
/// `store` with `paid` sat paid (as `tests/esplora.rs` opens one on the simulated chain).
async fn open(store: &MemoryStore, node: &Node, index: u32, paid: u64) -> ChannelId {
    let params = params(index, node.chain().tip().await.unwrap());
    let coin = node.fund_address(&p2wpkh(&secret(3)), Amount::from_sat(150_000)).await;
    let (funding, outpoint) = funding(&params, coin);
    node.send_raw(&funding).await.unwrap();
    let height = node.mine(1).await;
    store_open(store, params.at(outpoint), index, height, paid).await
}

/// Fills the node's 5 MB mempool with 3 sat/vB transactions (90 kB of OP_RETURN each) until it
/// trims and its minimum rises; returns the minimum in sat/vB.
async fn fill_mempool(node: &Node) -> f64 {
    node.fill_mempool(bitcoin::FeeRate::from_sat_per_vb_u32(2)).await;
    let info = node.rpc("getmempoolinfo", json!([])).await;
    info["mempoolminfee"].as_f64().unwrap() * 100_000.0
}

/// A close evicted from the node's mempool (the node restarted without it) reads unknown
/// through electrs (`GET /tx/:txid` 404), is broadcast again (one rebroadcast counted), is
/// mined and settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real electrs (ELECTRS_EXE) and Bitcoin Core (BITCOIND_EXE): docs/ESPLORA-RUN.md"]
async fn an_evicted_close_is_broadcast_again_and_settles_on_a_real_electrs() {
    let Some((mut node, electrs)) = common::electrs::node_with_electrs().await else { return };
    let store = MemoryStore::new();
    let id = open(&store, &node, 0, 20_000).await;
    electrs.sync(&node).await;
    let esplora = Esplora::new(&electrs.url()).unwrap();
    let mut task = task(&store, esplora.clone());
    let close = close_into_mempool(&store, id, &mut task, &esplora).await;
    assert!(node.mempool_entry(close).await.is_some(), "the node has it");

    node.restart_without_mempool().await;
    electrs.sync(&node).await;
    assert_eq!(esplora.tx_status(&close).await.unwrap(), TxStatus::Unknown, "evicted");
    task.run_once().await.unwrap();
    assert!(node.mempool_entry(close).await.is_some(), "broadcast again, to the node");
    assert_eq!(esplora.tx_status(&close).await.unwrap(), TxStatus::InMempool);
    assert_eq!(task.metrics().lock().unwrap().rebroadcasts, 1);
    node.mine(1).await;
    electrs.sync(&node).await;
    assert_eq!(task.run_once().await.unwrap().settled, 1);
    assert_eq!(state(&store, id).await, ChannelState::Settled);
}

/// The node's mempool minimum is above the close's 2 sat/vB: the close alone is refused, and
/// goes out with a CPFP child (at the task's floor: regtest has no fee estimates) as a package:
/// through the node beside electrs (`PackageRelay::Bitcoind`), and, if this electrs has
/// `POST /txs/package`, through electrs alone. Both are mined before the filler and the
/// channel settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real electrs (ELECTRS_EXE) and Bitcoin Core (BITCOIND_EXE): docs/ESPLORA-RUN.md"]
async fn a_close_below_the_mempool_minimum_goes_out_as_a_package_on_a_real_electrs() {
    for relayed in [true, false] {
        let Some((node, electrs)) = common::electrs::node_with_electrs().await else { return };
        if !relayed && !electrs.has_package_endpoint().await {
            println!("this electrs has no POST /txs/package: only the Core relay is checked");
            continue;
        }
        let store = MemoryStore::new();
        let id = open(&store, &node, 0, 60_000).await;
        let mut esplora = Esplora::new(&electrs.url()).unwrap();
        if relayed {
            esplora = esplora.with_package_relay(PackageRelay::Bitcoind(node.chain()));
        }
        let minimum = fill_mempool(&node).await;
        assert!(minimum > 2.0, "the mempool minimum {minimum} sat/vB is above the close's 2");
        electrs.sync(&node).await;
        let close = close_of(&store, id).await;
        assert!(!node.test_mempool_accept(&close).await.0, "the close alone is refused");
        let mut task = task(&store, esplora.clone());
        ask_close(&store, id).await;
        let report = task.run_once().await.unwrap();
        assert_eq!((report.broadcast, report.bumped), (1, 1), "relayed {relayed}: {report:?}");
        let txid = close.compute_txid();
        let entry = node.mempool_entry(txid).await.expect("the close is in the node's mempool");
        assert_eq!(entry["descendantcount"], 2, "with its child");
        // Submitted to the node beside electrs: electrs sees it at its next poll.
        electrs.sync(&node).await;
        assert_eq!(esplora.tx_status(&txid).await.unwrap(), TxStatus::InMempool);
        let height = node.mine(1).await;
        assert_eq!(node.confirmed_at(txid, height).await, Some(height), "mined first");
        electrs.sync(&node).await;
        task.run_once().await.unwrap();
        assert_eq!(state(&store, id).await, ChannelState::Settled, "relayed {relayed}");
        assert_eq!(task.metrics().lock().unwrap().closes_below_mempool_minimum, 0);
    }
}

/// electrs without `POST /txs/package` and no package relay: a close asked for once the
/// mempool minimum passed its 2 sat/vB is refused, and counted (`closes_below_mempool_minimum`),
/// the channel kept closing; Esplora reports no mempool minimum, so another open channel is not
/// closed early. (On an electrs with the endpoint there is a package path: nothing to check.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real electrs (ELECTRS_EXE) and Bitcoin Core (BITCOIND_EXE): docs/ESPLORA-RUN.md"]
async fn without_package_relay_a_stuck_close_is_reported_on_a_real_electrs() {
    let Some((node, electrs)) = common::electrs::node_with_electrs().await else { return };
    let esplora = Esplora::new(&electrs.url()).unwrap();
    if esplora.has_package_relay().await.unwrap() {
        println!("this electrs has POST /txs/package: a package path, nothing to check");
        return;
    }
    assert!(esplora.mempool_min_fee_rate().await.unwrap_err().is_unsupported());
    let store = MemoryStore::new();
    let stuck = open(&store, &node, 0, 20_000).await;
    let other = open(&store, &node, 1, 20_000).await;
    let minimum = fill_mempool(&node).await;
    assert!(minimum > 2.0, "the mempool minimum {minimum} sat/vB is above the close's 2");
    electrs.sync(&node).await;
    let mut task = task(&store, esplora);
    ask_close(&store, stuck).await;
    let report = task.run_once().await.unwrap();
    assert_eq!((report.broadcast, report.retrying, report.closing), (0, 1, 0), "{report:?}");
    assert_eq!(state(&store, stuck).await, ChannelState::Closing);
    assert_eq!(state(&store, other).await, ChannelState::Open, "no early close");
    assert_eq!(task.metrics().lock().unwrap().closes_below_mempool_minimum, 1);
    let close = close_of(&store, stuck).await.compute_txid();
    assert!(node.mempool_entry(close).await.is_none());
}
