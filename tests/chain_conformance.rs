//! One conformance suite for the chain backends: every [`ChainBackend`] the settlement task may
//! run on must answer the same things in the same situations. It runs on
//!
//! * the simulated chain;
//! * `Esplora` against the faithful electrs fake ([`common::esplora_fake`]), without
//!   `POST /txs/package` (older electrs), with it (newer electrs), and without it but with a
//!   package relay (another Esplora);
//! * `BitcoindRpc` against a real Bitcoin Core regtest node (`BITCOIND_EXE`; skipped with one
//!   `skipped:` line without it, never skipped with `CI=true`);
//! * `Esplora` against a real electrs (`ELECTRS_EXE`) in front of such a node, alone and with
//!   the node as its package relay: `#[ignore]`d, CI keeps the fake; run by hand as
//!   docs/ESPLORA-RUN.md says.
//!
//! What it checks: unknown vs in the mempool vs confirmed (`tx_status`, `unspent`), an evicted
//! transaction reads unknown and is accepted again, rejection codes (conflict, missing inputs,
//! already confirmed, non-final, value creation, fee too low), the mempool minimum and package
//! submission below it (or [`ChainError::Unsupported`] where there is no package path), and
//! the network (regtest, for all of them).
//!
//! The suite lives here, in one test target, rather than in `src/chain/` behind the `sim`
//! feature (as `store::conformance` does for stores): its harnesses need a real node and an
//! HTTP fake, which are test code.
#![cfg(all(feature = "esplora", feature = "bitcoind"))]

mod common;

use bitcoin::{Amount, FeeRate, OutPoint, Transaction, TxOut, Txid};
use common::electrs::Electrs;
use common::esplora_fake::{self, Flavor};
use common::node::{Node, NodeConfig};
use common::{p2wpkh, public, secret, spend};
use paychan::chain::bitcoind::BitcoindRpc;
use paychan::chain::esplora::{Esplora, PackageRelay};
use paychan::chain::sim::SimulatedChain;
use paychan::chain::{ChainBackend, ChainError, RejectReason, TxStatus};

/// What the suite needs to drive a backend's chain.
trait Harness {
    type Chain: ChainBackend;
    fn chain(&self) -> &Self::Chain;
    /// A confirmed P2WPKH output of key 3 (see [`common::spend`]), spendable now.
    async fn coin(&mut self, amount: Amount) -> (OutPoint, TxOut);
    async fn mine(&mut self, blocks: u32);
    /// Loses `txid` from the mempool, as a node restarted without its mempool.
    async fn evict(&mut self, txid: Txid);
    /// Raises the mempool minimum above `rate`.
    async fn raise_mempool_minimum(&mut self, rate: FeeRate);
    /// Whether this backend has a package path.
    fn package_relay(&self) -> bool;
    /// Waits until the backend's view has caught up with what reached its node other than
    /// through it (a real electrs polls its node: a package submitted to the node beside it).
    async fn sync(&mut self) {}
}

fn reason<T: std::fmt::Debug>(result: Result<T, ChainError>) -> RejectReason {
    result.expect_err("refused").reject_reason().expect("a typed rejection")
}

/// A spend of `coin` to key 3 at about `sat_per_vb` (the spend is 110 vB).
fn spend_at(coin: &(OutPoint, TxOut), sat_per_vb: u64) -> Transaction {
    spend(coin.clone(), coin.1.value.to_sat() - 110 * sat_per_vb, 0)
}

async fn conformance<H: Harness>(h: &mut H) {
    assert_eq!(h.chain().network().await, Ok(bitcoin::Network::Regtest));
    let unknown = Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros());
    assert_eq!(h.chain().tx_status(&unknown).await.unwrap(), TxStatus::Unknown);
    assert_eq!(h.chain().unspent(&OutPoint::new(unknown, 0)).await.unwrap(), None);

    // In the mempool: the spend's output exists with 0 confirmations, its input is spent.
    let coin = h.coin(Amount::from_sat(100_000)).await;
    let utxo = h.chain().unspent(&coin.0).await.unwrap().expect("a confirmed coin");
    assert!(utxo.confirmations >= 1 && utxo.output == coin.1);
    let tx = spend_at(&coin, 5);
    let txid = h.chain().broadcast(&tx).await.unwrap();
    assert_eq!(txid, tx.compute_txid());
    assert_eq!(h.chain().broadcast(&tx).await.unwrap(), txid, "already in the mempool: fine");
    assert_eq!(h.chain().tx_status(&txid).await.unwrap(), TxStatus::InMempool);
    assert_eq!(h.chain().unspent(&coin.0).await.unwrap(), None, "spent in the mempool");
    let output = h.chain().unspent(&OutPoint::new(txid, 0)).await.unwrap().expect("an output");
    assert_eq!(output.confirmations, 0);
    // A conflicting spend paying less (Core would replace one paying enough more).
    assert_eq!(reason(h.chain().broadcast(&spend_at(&coin, 4)).await), RejectReason::Conflict);

    // Evicted: unknown (not "in the mempool"), its input unspent again; accepted again.
    h.evict(txid).await;
    assert_eq!(h.chain().tx_status(&txid).await.unwrap(), TxStatus::Unknown, "evicted");
    assert!(h.chain().unspent(&coin.0).await.unwrap().is_some(), "unspent again");
    assert_eq!(h.chain().unspent(&OutPoint::new(txid, 0)).await.unwrap(), None);
    assert_eq!(h.chain().broadcast(&tx).await.unwrap(), txid, "broadcast again");
    assert_eq!(h.chain().tx_status(&txid).await.unwrap(), TxStatus::InMempool);

    // Confirmed.
    h.mine(1).await;
    let tip = h.chain().tip().await.unwrap().height;
    let confirmed = TxStatus::Confirmed { height: tip, confirmations: 1 };
    assert_eq!(h.chain().tx_status(&txid).await.unwrap(), confirmed);
    h.mine(1).await;
    let confirmed = TxStatus::Confirmed { height: tip, confirmations: 2 };
    assert_eq!(h.chain().tx_status(&txid).await.unwrap(), confirmed);
    assert_eq!(h.chain().unspent(&OutPoint::new(txid, 0)).await.unwrap().unwrap().confirmations, 2);
    assert_eq!(reason(h.chain().broadcast(&tx).await), RejectReason::AlreadyConfirmed);
    assert_eq!(reason(h.chain().broadcast(&spend_at(&coin, 6)).await), RejectReason::MissingInputs);

    // Rejection codes.
    let fresh = h.coin(Amount::from_sat(100_000)).await;
    let locked = spend(fresh.clone(), 99_000, tip + 10);
    assert_eq!(reason(h.chain().broadcast(&locked).await), RejectReason::NonFinal);
    let created = spend(fresh.clone(), 100_001, 0);
    assert_eq!(reason(h.chain().broadcast(&created).await), RejectReason::ValueCreation);
    let free = spend(fresh.clone(), 100_000, 0);
    assert_eq!(reason(h.chain().broadcast(&free).await), RejectReason::FeeTooLow);

    // Below the mempool minimum: alone refused, in a package carried by its child's fee.
    let relay = h.chain().min_relay_fee_rate().await.unwrap();
    assert_eq!(relay, FeeRate::from_sat_per_kwu(250), "1 sat/vB");
    // A mempool minimum is reported by a node (Core, the simulated chain, a Core relay beside
    // Esplora); Esplora alone has none to tell (its fee estimates are not one).
    let reported = match h.chain().mempool_min_fee_rate().await {
        Ok(minimum) => {
            assert!(minimum >= relay);
            true
        }
        Err(error) => {
            assert!(error.is_unsupported(), "{error}");
            false
        }
    };
    assert_eq!(h.chain().has_package_relay().await.unwrap(), h.package_relay());
    let parent = spend_at(&fresh, 2);
    h.raise_mempool_minimum(FeeRate::from_sat_per_vb_u32(2)).await;
    if reported {
        let minimum = h.chain().mempool_min_fee_rate().await.unwrap();
        assert!(minimum > FeeRate::from_sat_per_vb_u32(2), "{minimum:?}");
    }
    assert_eq!(reason(h.chain().broadcast(&parent).await), RejectReason::FeeTooLow);
    let parent_id = parent.compute_txid();
    let child = spend((OutPoint::new(parent_id, 0), parent.output[0].clone()), 90_000, 0);
    // Read back at once, without waiting for electrs to poll its node: after a package, the
    // backend hands both transactions to electrs's own `POST /tx`, which indexes them now.
    let package = h.chain().broadcast_package(&parent, &child).await;
    if h.package_relay() {
        assert_eq!(package.unwrap(), child.compute_txid());
        assert_eq!(h.chain().tx_status(&parent_id).await.unwrap(), TxStatus::InMempool);
        assert_eq!(h.chain().tx_status(&child.compute_txid()).await.unwrap(), TxStatus::InMempool);
    } else {
        assert!(package.expect_err("no package path").is_unsupported());
        assert_eq!(h.chain().tx_status(&parent_id).await.unwrap(), TxStatus::Unknown);
    }
}

struct Sim(SimulatedChain);

impl Harness for Sim {
    type Chain = SimulatedChain;
    fn chain(&self) -> &SimulatedChain {
        &self.0
    }
    async fn coin(&mut self, amount: Amount) -> (OutPoint, TxOut) {
        self.0.faucet_p2wpkh(&public(&secret(3)), amount)
    }
    async fn mine(&mut self, blocks: u32) {
        self.0.mine(blocks);
    }
    async fn evict(&mut self, txid: Txid) {
        self.0.drop_from_mempool(&txid);
    }
    async fn raise_mempool_minimum(&mut self, rate: FeeRate) {
        self.0.set_mempool_min_fee_rate(FeeRate::from_sat_per_kwu(rate.to_sat_per_kwu() + 500));
    }
    fn package_relay(&self) -> bool {
        true
    }
}

/// `Esplora` in front of a simulated chain.
struct EsploraFake {
    sim: Sim,
    esplora: Esplora,
    package_relay: bool,
}

impl Harness for EsploraFake {
    type Chain = Esplora;
    fn chain(&self) -> &Esplora {
        &self.esplora
    }
    async fn coin(&mut self, amount: Amount) -> (OutPoint, TxOut) {
        self.sim.coin(amount).await
    }
    async fn mine(&mut self, blocks: u32) {
        self.sim.mine(blocks).await;
    }
    async fn evict(&mut self, txid: Txid) {
        self.sim.evict(txid).await;
    }
    async fn raise_mempool_minimum(&mut self, rate: FeeRate) {
        self.sim.raise_mempool_minimum(rate).await;
    }
    fn package_relay(&self) -> bool {
        self.package_relay
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_chain_conforms() {
    conformance(&mut Sim(SimulatedChain::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esplora_conforms_on_an_electrs_without_package_relay() {
    let chain = SimulatedChain::new();
    let esplora = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::Old).await).unwrap();
    conformance(&mut EsploraFake { sim: Sim(chain), esplora, package_relay: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esplora_conforms_on_an_electrs_with_package_relay() {
    let chain = SimulatedChain::new();
    let esplora = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::New).await).unwrap();
    conformance(&mut EsploraFake { sim: Sim(chain), esplora, package_relay: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esplora_conforms_with_a_package_relay_beside_it() {
    let chain = SimulatedChain::new();
    let old = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::Old).await).unwrap();
    let new = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::New).await).unwrap();
    let esplora = old.with_package_relay(PackageRelay::Esplora(new));
    conformance(&mut EsploraFake { sim: Sim(chain), esplora, package_relay: true }).await;
}

/// A real Bitcoin Core regtest node.
struct Core {
    node: Node,
    chain: BitcoindRpc,
}

impl Harness for Core {
    type Chain = BitcoindRpc;
    fn chain(&self) -> &BitcoindRpc {
        &self.chain
    }
    async fn coin(&mut self, amount: Amount) -> (OutPoint, TxOut) {
        let coin = self.node.fund_address(&p2wpkh(&secret(3)), amount).await;
        self.node.mine(1).await;
        coin
    }
    async fn mine(&mut self, blocks: u32) {
        self.node.mine(blocks).await;
    }
    async fn evict(&mut self, txid: Txid) {
        assert!(self.node.mempool_entry(txid).await.is_some());
        self.node.restart_without_mempool().await;
    }
    /// Fills the 5 MB mempool with large transactions until the node trims it.
    async fn raise_mempool_minimum(&mut self, rate: FeeRate) {
        self.node.fill_mempool(rate).await;
    }
    fn package_relay(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitcoin_core_conforms() {
    let extra_args = ["-maxmempool=5", "-datacarriersize=100000"].map(String::from).to_vec();
    // With `-txindex`: without it Core's `getrawtransaction` finds no confirmed transaction,
    // and `tx_status` answers unknown for one (the settlement task then looks for its outputs).
    let Some(node) = Node::start(NodeConfig { txindex: true, extra_args }).await else { return };
    node.create_wallet("w").await;
    node.mine(180).await; // mature coins for the wallet and the filler
    let chain = node.chain();
    conformance(&mut Core { node, chain }).await;
}

/// `Esplora` on a real electrs (`ELECTRS_EXE`) in front of a real Bitcoin Core node; the coins,
/// blocks, eviction and full mempool are the node's (as for [`Core`]), and electrs is waited
/// for after each (it polls its node).
struct RealElectrs {
    core: Core,
    electrs: Electrs,
    esplora: Esplora,
    package_relay: bool,
}

impl Harness for RealElectrs {
    type Chain = Esplora;
    fn chain(&self) -> &Esplora {
        &self.esplora
    }
    async fn coin(&mut self, amount: Amount) -> (OutPoint, TxOut) {
        let coin = self.core.coin(amount).await;
        self.sync().await;
        coin
    }
    async fn mine(&mut self, blocks: u32) {
        self.core.mine(blocks).await;
        self.sync().await;
    }
    async fn evict(&mut self, txid: Txid) {
        self.core.evict(txid).await;
        self.sync().await;
    }
    async fn raise_mempool_minimum(&mut self, rate: FeeRate) {
        self.core.raise_mempool_minimum(rate).await;
        self.sync().await;
    }
    fn package_relay(&self) -> bool {
        self.package_relay
    }
    async fn sync(&mut self) {
        self.electrs.sync(&self.core.node).await;
    }
}

/// A regtest node as [`bitcoin_core_conforms`] starts it (but without `-txindex`: electrs keeps
/// its own index), electrs on it, and `Esplora` on electrs, with the node as its package relay
/// if `relay`. `None` without `ELECTRS_EXE` or `BITCOIND_EXE`.
async fn real_electrs(relay: bool) -> Option<RealElectrs> {
    let (node, electrs) = common::electrs::node_with_electrs().await?;
    let endpoint = electrs.has_package_endpoint().await;
    println!(
        "electrs at {}: POST /txs/package {}",
        electrs.url(),
        ["absent", "present"][usize::from(endpoint)]
    );
    let mut esplora = Esplora::new(&electrs.url()).unwrap();
    if relay {
        esplora = esplora.with_package_relay(PackageRelay::Bitcoind(node.chain()));
    }
    let chain = node.chain();
    Some(RealElectrs {
        core: Core { node, chain },
        electrs,
        esplora,
        package_relay: relay || endpoint,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real electrs (ELECTRS_EXE) and Bitcoin Core (BITCOIND_EXE): docs/ESPLORA-RUN.md"]
async fn esplora_conforms_on_a_real_electrs() {
    let Some(mut h) = real_electrs(false).await else { return };
    conformance(&mut h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real electrs (ELECTRS_EXE) and Bitcoin Core (BITCOIND_EXE): docs/ESPLORA-RUN.md"]
async fn esplora_conforms_on_a_real_electrs_with_a_core_package_relay() {
    let Some(mut h) = real_electrs(true).await else { return };
    conformance(&mut h).await;
}
