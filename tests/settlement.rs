//! The settlement task on the simulated chain, mining blocks to move time: every channel
//! settles before its refund is valid (also across a restart), failed broadcasts are retried,
//! stuck settlements are bumped by a consensus-valid CPFP child, and bad fundings fail their
//! channel.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::absolute::LockTime;
use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, FeeRate, Network, OutPoint, Transaction, TxOut, Txid};
use common::http::{call, serve};
use common::{p2wpkh, public, secret, spend};
use paychan::MilliSats;
use paychan::chain::sim::{SimulatedChain, sign_p2wpkh_input};
use paychan::chain::{ChainBackend, ChainError, TxStatus, Utxo, follow_tip, policy};
use paychan::channel::ChainTip;
use paychan::channel::ChannelState;
use paychan::channel::FundingPolicy;
use paychan::channel::{Channel, Terms, channel_key};
use paychan::server::PaywallLayer;
use paychan::settlement::{CloseOutcome, Settlement, close_now};
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire;

const VALUE: Amount = Amount::from_sat(100_000);

fn master() -> Xpriv {
    Xpriv::new_master(Network::Regtest, &[0x5e; 32]).unwrap()
}

/// The server's payout key: its P2WPKH receives every settlement (and funds CPFP children).
fn payout() -> bitcoin::secp256k1::SecretKey {
    secret(0x22)
}

/// A channel funded on `chain` through the protocol's own steps, with `paid` sat paid.
struct Funded {
    channel: Channel,
    funding: Transaction,
    /// The funding's input and the key of the coin it spends (to double-spend it).
    coin: (OutPoint, TxOut),
    refund: Transaction,
}

fn fund(chain: &SimulatedChain, index: u32, lifetime: u32, broadcast: bool) -> Funded {
    let client = secret(100 + index as u8);
    let server = channel_key(&master(), index).unwrap();
    let tip = chain.tip();
    let params = Terms::default()
        .agree(
            public(&client),
            common::public(&server),
            VALUE,
            LockTime::from_height(tip.height + lifetime).unwrap(),
            p2wpkh(&client),
            p2wpkh(&payout()),
            tip,
        )
        .unwrap();
    // Coins of key 3, so that `common::spend` can double-spend them.
    let (coin, prevout) = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(150_000));
    let change = TxOut { value: Amount::from_sat(49_000), script_pubkey: p2wpkh(&secret(3)) };
    let (mut funding, outpoint) = params.build_funding(&[coin], Some(change));
    sign_p2wpkh_input(&mut funding, 0, &prevout, &secret(3));
    let refund = params.build_refund(outpoint, params.refund_fee());
    let server_sig = params.check_refund(&Terms::default(), &funding, &refund, tip).unwrap();
    let server_sig = server_sig.sign(&server).unwrap();
    let refund = params.complete_refund(&refund, &client, &server_sig).unwrap();
    if broadcast {
        chain.submit(&funding).unwrap();
    }
    Funded { channel: params.at(outpoint), funding, coin: (coin, prevout), refund }
}

fn payment(funded: &Funded, index: u32, sat: u64) -> Transaction {
    let mut tx = funded.channel.build_payment(Amount::from_sat(sat)).unwrap();
    funded.channel.sign_payment(&mut tx, &secret(100 + index as u8)).unwrap();
    tx
}

async fn open_channel<S: ChannelStore>(
    store: &S,
    chain: &SimulatedChain,
    index: u32,
    lifetime: u32,
    paid: u64,
) -> Funded {
    let funded = fund(chain, index, lifetime, true);
    let record = ChannelRecord::open(funded.channel.clone(), index, payment(&funded, index, 1_000))
        .with_funded_at(chain.tip().height);
    store.create(record).await.unwrap();
    let id = wire::ChannelId::new(funded.channel.outpoint());
    let _ = store.store_payment(id, payment(&funded, index, paid)).await.unwrap();
    funded
}

/// A fresh chain and memory store with one channel (index 0) of `lifetime` blocks, `paid` sat.
async fn one_channel(
    lifetime: u32,
    paid: u64,
) -> (SimulatedChain, MemoryStore, Funded, wire::ChannelId) {
    let chain = SimulatedChain::new();
    let store = MemoryStore::new();
    let funded = open_channel(&store, &chain, 0, lifetime, paid).await;
    let id = wire::ChannelId::new(funded.channel.outpoint());
    (chain, store, funded, id)
}

/// The stored state of channel `id`.
async fn state<S: ChannelStore>(store: &S, id: wire::ChannelId) -> ChannelState {
    store.load(id).await.unwrap().expect("the channel exists").state
}

fn settlement<S: ChannelStore, C: ChainBackend>(store: S, chain: C) -> Settlement<S, C> {
    Settlement::new(store, chain, master())
        .with_cpfp_key(payout())
        .with_backoff(Duration::ZERO, Duration::ZERO)
}

#[tokio::test]
async fn every_channel_settles_before_its_refund_is_valid_also_across_a_restart() {
    settles_before_refunds(MemoryStore::new, true).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn on_sqlite_a_restarted_node_settles_every_channel_in_time() {
    let path = std::env::temp_dir().join(format!("paychan-settle-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    // Each call reopens the database file: a restarted node.
    let open = || paychan::store::SqliteStore::open(&path).expect("sqlite");
    settles_before_refunds(open, false).await;
    let _ = std::fs::remove_file(&path);
}

/// Six channels of different lifetimes; the node restarts (a new task on `reopen()`) midway.
/// With `shared`, the first store is kept (an in-memory store survives only in-process).
async fn settles_before_refunds<S: ChannelStore + Clone>(reopen: impl Fn() -> S, shared: bool) {
    let chain = SimulatedChain::new();
    let mut store = reopen();
    let mut channels = Vec::new();
    for index in 0..6u32 {
        // Lifetimes from 150 to 275 blocks (the close margin is 36), all paid differently.
        let paid = 2_000 + u64::from(index) * 1_000;
        let funded = open_channel(&store, &chain, index, 150 + 25 * index, paid).await;
        channels.push((index, funded, paid));
    }
    let mut task = settlement(store.clone(), chain.clone());
    let start = chain.tip().height;
    let mut settled_at = std::collections::HashMap::new();
    for step in 0..300u32 {
        if step == 140 {
            // A restart: a fresh task with nothing in memory, on the store reopened.
            drop(task);
            if !shared {
                store = reopen();
            }
            task = settlement(store.clone(), chain.clone());
        }
        task.run_once().await.unwrap();
        let tip = chain.tip();
        for (index, funded, _) in &channels {
            let record = store.load(wire::ChannelId::new(funded.channel.outpoint())).await;
            let record = record.unwrap().unwrap();
            if record.state == ChannelState::Settled {
                settled_at.entry(*index).or_insert(tip.height);
            }
            assert!(
                !funded.channel.params().refund_is_valid(tip) || settled_at.contains_key(index),
                "channel {index}: the refund became valid at {} before the settlement",
                tip.height
            );
        }
        if settled_at.len() == channels.len() {
            break;
        }
        chain.mine(1);
    }
    assert_eq!(settled_at.len(), channels.len(), "every channel settled");
    assert!(chain.tip().height > start + 150, "time moved");
    for (index, funded, paid) in &channels {
        // The refund can never be used: the funding output is spent by the settlement.
        let refund = chain.submit(&funded.refund);
        assert!(refund.is_err(), "channel {index}: refund after settlement must fail");
        let id = wire::ChannelId::new(funded.channel.outpoint());
        let record = store.load(id).await.unwrap().unwrap();
        let close = record
            .channel
            .close_transaction(
                record.best.as_ref().unwrap(),
                &channel_key(&master(), *index).unwrap(),
            )
            .unwrap();
        let txid = close.compute_txid();
        assert!(matches!(chain.tx_status(&txid), TxStatus::Confirmed { .. }));
        check_settled_tx(&chain, funded, txid, *paid);
    }
    let metrics = task.metrics().lock().unwrap().clone();
    assert_eq!(metrics.channels["settled"], channels.len());
    assert_eq!(metrics.closes_pending, 0);
}

/// Checks a confirmed settlement: consensus- and policy-valid, paying the server exactly `paid`.
fn check_settled_tx(chain: &SimulatedChain, funded: &Funded, txid: Txid, paid: u64) {
    let outpoint = funded.channel.outpoint();
    let tx = chain.get_transaction(&txid).unwrap();
    let spent = funded.funding.output[outpoint.vout as usize].clone();
    tx.verify(|op| (*op == outpoint).then(|| spent.clone())).expect("consensus");
    policy::check_standard(&tx, &[spent]).expect("standard");
    assert_eq!(tx.output[0].value, Amount::from_sat(paid), "the server gets exactly what was paid");
    assert_eq!(tx.output[0].script_pubkey, p2wpkh(&payout()));
}

/// A chain whose first `failures` broadcasts fail as if the node were down, and whose tip
/// cannot be read while `tip_down`.
#[derive(Clone)]
struct Flaky {
    chain: SimulatedChain,
    failures: Arc<AtomicUsize>,
    tip_down: bool,
}

impl ChainBackend for Flaky {
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(ChainError::unavailable("connection refused"));
        }
        self.chain.broadcast(tx).await
    }
    async fn tx_status(&self, txid: &Txid) -> Result<TxStatus, ChainError> {
        ChainBackend::tx_status(&self.chain, txid).await
    }
    async fn tip(&self) -> Result<ChainTip, ChainError> {
        if self.tip_down {
            return Err(ChainError::unavailable("connection refused"));
        }
        ChainBackend::tip(&self.chain).await
    }
    async fn estimate_fee_rate(&self, target: u16) -> Result<FeeRate, ChainError> {
        self.chain.estimate_fee_rate(target).await
    }
    async fn unspent(&self, outpoint: &OutPoint) -> Result<Option<Utxo>, ChainError> {
        self.chain.unspent(outpoint).await
    }
}

/// `GET /paid` at `price` on `store`, with the negotiation endpoints broadcasting through
/// `backend`; the tip follows `chain`. Its address.
async fn paid_api<C: ChainBackend + Clone + 'static>(
    chain: &SimulatedChain,
    store: &MemoryStore,
    backend: C,
    price: MilliSats,
) -> std::net::SocketAddr {
    let tip = follow_tip(chain.clone(), Duration::from_millis(20)).await.unwrap();
    let negotiation = paychan::server::Negotiation::new(
        Network::Regtest,
        Terms::default(),
        master(),
        p2wpkh(&payout()),
        backend,
    );
    let app = Router::new()
        .route("/paid", get(|| async { "ok" }))
        .layer(PaywallLayer::new(store.clone(), price, tip).with_negotiation(negotiation));
    serve(app).await
}

#[tokio::test]
async fn failed_broadcasts_are_retried_and_a_cooperative_close_is_queued() {
    let (chain, store, funded, id) = one_channel(200, 4_000).await;
    let flaky =
        Flaky { chain: chain.clone(), failures: Arc::new(AtomicUsize::new(3)), tip_down: false };

    // The client asks for a cooperative close while the node is down: 202, queued.
    let addr = paid_api(&chain, &store, flaky.clone(), MilliSats::from_msat(1_000)).await;
    let header = wire::encode_payment(&payment(&funded, 0, 4_000));
    let path = format!("/payment-channel/channels/{id}/close");
    let reply = call(addr, "POST", &path, &[("payment-channel", &header)], None).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.json()["state"], "closing");
    assert_eq!(state(&store, id).await, ChannelState::Closing);
    // No more requests are served on it.
    assert_eq!(call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await.status, 402);

    // The task retries: two more failures, then the broadcast goes through.
    let mut task = settlement(store.clone(), flaky.clone());
    let mut retrying = 0;
    for _ in 0..3 {
        retrying += task.run_once().await.unwrap().retrying;
    }
    assert_eq!(retrying, 2);
    assert_eq!(state(&store, id).await, ChannelState::Closed);
    assert_eq!(task.metrics().lock().unwrap().broadcast_failures, 2);
    // Closed is not settled: only a confirmation settles.
    task.run_once().await.unwrap();
    assert_eq!(state(&store, id).await, ChannelState::Closed);
    chain.mine(1);
    assert_eq!(task.run_once().await.unwrap().settled, 1);
    assert_eq!(state(&store, id).await, ChannelState::Settled);
    assert_eq!(task.metrics().lock().unwrap().sats_settled, Amount::from_sat(4_000));
}

#[tokio::test]
async fn a_stuck_settlement_is_bumped_by_a_valid_cpfp_child() {
    let (chain, store, funded, id) = one_channel(200, 20_000).await;
    chain.mine(1);
    // Blocks now want 20 sat/vB; the payment was signed at 2 sat/vB. The estimate says 25.
    chain.set_block_min_fee_rate(FeeRate::from_sat_per_vb_u32(20));
    chain.set_fee_rate(FeeRate::from_sat_per_vb_u32(25));
    let mut task = settlement(store.clone(), chain.clone()).with_cpfp_after(2);
    let close = {
        let record = store.load(id).await.unwrap().unwrap();
        let key = channel_key(&master(), 0).unwrap();
        record.channel.close_transaction(record.best.as_ref().unwrap(), &key).unwrap()
    };
    // Mine into the close margin: the task closes, the settlement waits in the mempool.
    let mut bumped = 0;
    for _ in 0..200 {
        let report = task.run_once().await.unwrap();
        bumped += report.bumped;
        if bumped > 0 {
            break;
        }
        chain.mine(1);
    }
    assert_eq!(bumped, 1, "one child");
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!(record.state, ChannelState::Closed, "broadcast, not confirmed");
    let child_id = *chain.mempool_txids().last().unwrap();
    let child = chain.get_transaction(&child_id).unwrap();
    assert_eq!(child.input[0].previous_output, OutPoint::new(close.compute_txid(), 0));
    // The child is valid under Bitcoin Core's interpreter and relay policy.
    let parent_output = close.output[0].clone();
    child.verify(|_| Some(parent_output.clone())).expect("consensus accepts the child");
    policy::check_standard(&child, &[parent_output]).expect("standard");
    let mined = chain.mine(1);
    assert!(mined.contains(&close.compute_txid()) && mined.contains(&child_id), "both confirm");
    task.run_once().await.unwrap();
    assert_eq!(state(&store, id).await, ChannelState::Settled);
    assert!(!funded.channel.params().refund_is_valid(chain.tip()), "before the refund");
    check_settled_tx(&chain, &funded, close.compute_txid(), 20_000);
}

/// `GET /paid` at 1 sat behind a paywall on `store`, following `chain`'s tip.
async fn serve_paid(store: &MemoryStore, chain: &SimulatedChain) -> std::net::SocketAddr {
    let tip = follow_tip(chain.clone(), Duration::from_millis(20)).await.unwrap();
    let paywall = PaywallLayer::new(store.clone(), MilliSats::from_msat(1_000), tip);
    serve(Router::new().route("/paid", get(|| async { "ok" })).layer(paywall)).await
}

#[tokio::test]
async fn a_double_spent_funding_fails_the_channel_and_nothing_is_served() {
    let (chain, store, funded, id) = one_channel(200, 3_000).await;
    let addr = serve_paid(&store, &chain).await;
    let header = wire::encode_payment(&payment(&funded, 0, 3_000));
    assert_eq!(call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await.status, 200);

    // The client's coin is spent elsewhere by a miner who never saw the funding.
    chain.mine_double_spend(&spend(funded.coin.clone(), 149_000, 0)).unwrap();
    assert_eq!(chain.tx_status(&funded.channel.outpoint().txid), TxStatus::Unknown);
    let mut task = settlement(store.clone(), chain.clone());
    // A vanished funding is no proof of failure (a node without a transaction index, a
    // backend that lags): the channel stops serving at once and fails at its deadline.
    assert_eq!(task.run_once().await.unwrap().suspended, 1);
    assert_eq!(state(&store, id).await, ChannelState::Pending);
    let reply = call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (409, Some("channel-pending")));
    chain.mine(144);
    assert_eq!(task.run_once().await.unwrap().failed, 1);
    assert_eq!(state(&store, id).await, ChannelState::Failed);
    let reply = call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
    assert_eq!(reply.status, 402);
    assert_eq!(reply.json()["code"], "channel-not-open");
    assert_eq!(task.metrics().lock().unwrap().failed_fundings, 1);
}

/// Two nodes serving one channel from leases, each running its settlement task on its own
/// `Leased` handle: once one task suspends the channel (its zero-conf funding was
/// double-spent), no request is served from either node's lease after the other node's
/// next pass (security review F6), and what was served is spent, nothing left leased. With
/// `chain_down`, A's pass cannot read the chain and still stops A's lease.
async fn a_suspension_stops_every_nodes_lease_by_the_next_pass<S: ChannelStore + Clone>(
    store: S,
    chain_down: bool,
) {
    use paychan::store::ops::Debit;
    use paychan::store::{LeaseConfig, Leased};
    let price = MilliSats::from_msat(10_000);
    let chain = SimulatedChain::new();
    let funded = open_channel(&store, &chain, 0, 200, 3_000).await;
    let id = wire::ChannelId::new(funded.channel.outpoint());
    let config = LeaseConfig::default()
        .with_max_lease(MilliSats::from_msat(200_000))
        .with_idle(Duration::from_secs(60));
    let (a, b) =
        (Leased::with_config(store.clone(), config), Leased::with_config(store.clone(), config));
    let down = Flaky { chain: chain.clone(), failures: Arc::default(), tip_down: chain_down };
    let (mut task_a, mut task_b) =
        (settlement(a.clone(), down), settlement(b.clone(), chain.clone()));
    let mut served = MilliSats::ZERO;
    for (node, times) in [(&a, 30), (&b, 3)] {
        for _ in 0..times {
            assert!(matches!(node.debit(id, price).await.unwrap(), Debit::Debited { .. }));
            served = served.saturating_add(price);
        }
    }
    let (held, used) = a.held();
    assert!(held.checked_sub(used).unwrap() >= price, "A's lease has room: {held} {used}");

    chain.mine_double_spend(&spend(funded.coin.clone(), 149_000, 0)).unwrap();
    assert_eq!(task_b.run_once().await.unwrap().suspended, 1, "B's pass suspends it");
    assert_eq!(state(&store, id).await, ChannelState::Pending);
    match task_a.run_once().await {
        Ok(report) => assert!(!chain_down && report.suspended == 0, "A's pass finds it pending"),
        Err(_) => assert!(chain_down, "A's pass cannot read the chain"),
    }
    let pending = (ChannelState::Pending, 20);
    common::assert_no_lease_serves(&store, [&a, &b], id, price, pending, served).await;
}

/// The suspension on every backend, the chain up.
async fn a_suspension_stops_every_nodes_lease<S: ChannelStore + Clone>(store: S) {
    a_suspension_stops_every_nodes_lease_by_the_next_pass(store, false).await;
}
for_each_store!(a_suspension_stops_every_nodes_lease_on, a_suspension_stops_every_nodes_lease);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_stops_a_nodes_lease_by_a_pass_without_the_chain() {
    a_suspension_stops_every_nodes_lease_by_the_next_pass(MemoryStore::new(), true).await;
}

#[tokio::test]
async fn a_funding_that_never_confirms_fails_and_a_pending_channel_opens_when_confirmed() {
    let chain = SimulatedChain::new();
    let store = MemoryStore::new();
    // Blocks refuse everything below 50 sat/vB: this funding (about 7 sat/vB) waits forever.
    chain.set_block_min_fee_rate(FeeRate::from_sat_per_vb_u32(50));
    let stuck = open_channel(&store, &chain, 0, 300, 2_000).await;
    // A channel stored without a funding height (0: recorded before the field existed) has no
    // deadline.
    let legacy = fund(&chain, 2, 300, true);
    let legacy_record = ChannelRecord::open(legacy.channel.clone(), 2, payment(&legacy, 2, 1_000));
    store.create(legacy_record.clone()).await.unwrap();
    let policy = FundingPolicy::default().with_confirm_within_blocks(10);
    let mut task = settlement(store.clone(), chain.clone()).with_funding_policy(policy);
    for _ in 0..9 {
        chain.mine(1);
        assert_eq!(task.run_once().await.unwrap().failed, 0);
    }
    chain.mine(1);
    assert_eq!(task.run_once().await.unwrap().failed, 1, "10 blocks without a confirmation");
    let id = wire::ChannelId::new(stuck.channel.outpoint());
    assert_eq!(state(&store, id).await, ChannelState::Failed);
    let legacy = store.load(legacy_record.id()).await.unwrap().unwrap();
    assert_eq!(legacy.state, ChannelState::Open);

    // A pending channel (2 confirmations required) opens once its funding has them.
    chain.set_block_min_fee_rate(FeeRate::ZERO);
    let store = MemoryStore::new();
    let funded = fund(&chain, 1, 300, true);
    let record = ChannelRecord::open(funded.channel.clone(), 1, payment(&funded, 1, 1_000))
        .with_funded_at(chain.tip().height)
        .with_state(ChannelState::Pending);
    let id = record.id();
    store.create(record).await.unwrap();
    let policy = FundingPolicy::default().with_min_confirmations(2);
    let mut task = settlement(store.clone(), chain.clone()).with_funding_policy(policy);
    let addr = serve_paid(&store, &chain).await;
    let header = wire::encode_payment(&payment(&funded, 1, 1_000));
    let reply = call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (409, Some("channel-pending")));
    chain.mine(1);
    assert_eq!(task.run_once().await.unwrap().opened, 0, "one confirmation is not two");
    chain.mine(1);
    assert_eq!(task.run_once().await.unwrap().opened, 1);
    assert_eq!(state(&store, id).await, ChannelState::Open);
    assert_eq!(call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await.status, 200);
}

#[tokio::test]
async fn a_settlement_beaten_by_the_refund_marks_the_channel_failed() {
    let (chain, store, funded, id) = one_channel(150, 5_000).await;
    chain.mine(1);
    // Blocks take nothing below 50 sat/vB and the task has no CPFP key: the close waits.
    chain.set_block_min_fee_rate(FeeRate::from_sat_per_vb_u32(50));
    let mut task = Settlement::new(store.clone(), chain.clone(), master())
        .with_backoff(Duration::ZERO, Duration::ZERO);
    while !funded.channel.params().refund_is_valid(chain.tip()) {
        task.run_once().await.unwrap();
        chain.mine(1);
    }
    assert_eq!(state(&store, id).await, ChannelState::Closed);
    // The client's refund, now valid, is mined instead of the settlement.
    chain.mine_double_spend(&funded.refund).unwrap();
    let report = task.run_once().await.unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(state(&store, id).await, ChannelState::Failed);
}

/// `close_now`, what the close endpoint and `paychan close` run, is the task's own procedure:
/// it closes an open channel with its best payment; answers a closed one with the same close
/// without a second broadcast; takes a close another node already got mined (its inputs are
/// missing now) as closed; and fails a channel whose funding was double-spent, where the
/// endpoint's and the console's own copies used to leave it closing.
#[tokio::test]
async fn close_now_runs_the_tasks_procedure_for_the_endpoint_and_the_console() {
    let (chain, store, funded, id) = one_channel(150, 5_000).await;
    chain.mine(1);
    let unknown = wire::ChannelId::new(OutPoint::new(funded.funding.compute_txid(), 7));
    assert_eq!(close_now(&store, &chain, &master(), unknown).await.unwrap(), None);

    let outcome = close_now(&store, &chain, &master(), id).await.unwrap().unwrap();
    let CloseOutcome::Closed { close, child: None } = outcome else { panic!("{outcome:?}") };
    assert_eq!(state(&store, id).await, ChannelState::Closed);
    assert_eq!(chain.tx_status(&close.compute_txid()), TxStatus::InMempool);
    assert_eq!(paychan::channel::server_amount(&close), Amount::from_sat(5_000));
    let again = close_now(&store, &chain, &master(), id).await.unwrap().unwrap();
    assert_eq!(again, CloseOutcome::Closed { close: close.clone(), child: None });

    // Another node's task got channel 1's close mined while this store still says closing.
    let other = open_channel(&store, &chain, 1, 150, 2_000).await;
    let other_id = wire::ChannelId::new(other.channel.outpoint());
    chain.mine(1);
    assert!(store.transition(other_id, ChannelState::Open, ChannelState::Closing).await.unwrap());
    let record = store.load(other_id).await.unwrap().unwrap();
    chain.submit(&record.close_transaction(&master()).unwrap()).unwrap();
    chain.mine(1);
    let outcome = close_now(&store, &chain, &master(), other_id).await.unwrap().unwrap();
    assert!(matches!(outcome, CloseOutcome::Closed { .. }), "{outcome:?}");
    assert_eq!(state(&store, other_id).await, ChannelState::Closed);

    // Channel 2's funding never confirmed and its coin was spent elsewhere.
    let gone = open_channel(&store, &chain, 2, 150, 2_000).await;
    let gone_id = wire::ChannelId::new(gone.channel.outpoint());
    chain.mine_double_spend(&spend(gone.coin.clone(), 149_000, 0)).unwrap();
    let outcome = close_now(&store, &chain, &master(), gone_id).await.unwrap().unwrap();
    assert_eq!(outcome, CloseOutcome::Failed);
    assert_eq!(state(&store, gone_id).await, ChannelState::Failed);
    let outcome = close_now(&store, &chain, &master(), gone_id).await.unwrap().unwrap();
    assert_eq!(outcome, CloseOutcome::NotClosable(ChannelState::Failed));
}

/// A memory store on which `late`, a better payment, lands just before the channel moves to
/// closing: a request that raced the settlement pass (security review S7).
fn racing(inner: MemoryStore, late: Transaction) -> common::hooked::Hooked {
    use common::hooked::{Hooked, Op};
    let late = Arc::new(std::sync::Mutex::new(Some(late)));
    let store = inner.clone();
    Hooked::new(inner, move |op| {
        let (store, late) = (store.clone(), late.clone());
        Box::pin(async move {
            if let Op::Transition { id, to: ChannelState::Closing } = op {
                let late = late.lock().unwrap().take();
                if let Some(payment) = late {
                    let _stored = store.store_payment(id, payment).await?;
                }
            }
            Ok(())
        })
    })
}

#[tokio::test]
async fn the_margin_close_includes_a_payment_stored_after_the_pass_listed_the_channel() {
    let (chain, inner, funded, id) = one_channel(150, 5_000).await;
    chain.mine(1);
    let late = payment(&funded, 0, 7_000);
    let store = racing(inner, late.clone());
    let mut task = settlement(store.clone(), chain.clone());
    while !funded.channel.params().is_closing(chain.tip()) {
        chain.mine(1);
    }
    let report = task.run_once().await.unwrap();
    assert_eq!((report.closing, report.broadcast), (1, 1), "{report:?}");
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!(record.best.as_ref(), Some(&late), "the late payment is the frozen best");
    chain.mine(1);
    assert_eq!(task.run_once().await.unwrap().settled, 1);
    let close = record.close_transaction(&master()).unwrap();
    assert!(
        matches!(chain.tx_status(&close.compute_txid()), TxStatus::Confirmed { .. }),
        "the close of the late payment (7 000 sat) is what confirmed"
    );
    assert_eq!(task.metrics().lock().unwrap().sats_settled, Amount::from_sat(7_000));
}

/// The funding watch's decisions, as a pure function of the funding output's depth (`None`:
/// neither in the mempool nor in the UTXO set), the record and the tip.
#[test]
fn the_funding_watch_fails_a_channel_only_at_its_deadline() {
    use paychan::channel::FundingAction::{Close, Fail, Keep, Open, Suspend};
    let chain = SimulatedChain::new();
    let funded = fund(&chain, 0, 300, false);
    let funded_at = chain.tip().height;
    let record = |state| {
        ChannelRecord::open(funded.channel.clone(), 0, payment(&funded, 0, 1_000))
            .with_funded_at(funded_at)
            .with_state(state)
    };
    let at = |height| ChainTip { height, median_time_past: 0 };
    let policy = FundingPolicy::default().with_confirm_within_blocks(10);
    let (pending, open) = (record(ChannelState::Pending), record(ChannelState::Open));
    let now = at(funded_at + 1);
    let late = at(funded_at + 10);
    let cases = [
        (&open, Some(0), now, Keep),
        (&pending, Some(0), now, Keep),
        (&pending, Some(1), now, Open),
        (&open, Some(1), now, Keep),
        // Gone from the mempool: an open channel stops serving, nothing fails yet.
        (&open, None, now, Suspend),
        (&pending, None, now, Keep),
        // The deadline: unconfirmed or missing fails; confirmed never does.
        (&pending, None, late, Fail),
        (&open, Some(0), late, Fail),
        (&open, Some(3), late, Keep),
        (&pending, Some(1), late, Open),
        // The close margin: an unspent funding output is closed, whatever the state.
        (&pending, Some(0), at(funded_at + 270), Close),
        (&open, Some(5), at(funded_at + 270), Close),
    ];
    for (record, funding, tip, expected) in cases {
        assert_eq!(
            record.funding_action(&policy, funding, tip),
            expected,
            "{} with {funding:?} at {}",
            record.state.as_str(),
            tip.height
        );
    }
    let two = policy.with_min_confirmations(2);
    assert_eq!(pending.funding_action(&two, Some(1), now), Keep);
    assert_eq!(pending.funding_action(&two, Some(2), now), Open);
    // A channel recorded without a funding height has no deadline.
    let legacy = ChannelRecord { funded_at: 0, ..pending.clone() };
    assert_eq!(legacy.funding_action(&policy, None, at(funded_at + 200)), Keep);
}

/// Zero confirmations only for a small channel whose funding cannot be replaced cheaply:
/// version 1 or 2, no replaceability signal, only confirmed inputs.
#[test]
fn zero_confirmation_service_needs_a_small_channel_and_a_safe_funding() {
    let chain = SimulatedChain::new();
    let funded = fund(&chain, 0, 300, false);
    let safe = {
        let mut tx = funded.funding.clone();
        tx.input[0].sequence = bitcoin::Sequence::ENABLE_LOCKTIME_NO_RBF;
        tx
    };
    let value = funded.channel.params().value;
    let policy = FundingPolicy::default();
    assert!(policy.allows_zero_conf(value, &safe, &[1]));
    assert_eq!(policy.initial_state(value, &safe, &[1]), ChannelState::Open);
    let rbf = Transaction {
        input: vec![bitcoin::TxIn {
            sequence: bitcoin::Sequence::ENABLE_RBF_NO_LOCKTIME,
            ..safe.input[0].clone()
        }],
        ..safe.clone()
    };
    let truc = Transaction { version: bitcoin::transaction::Version(3), ..safe.clone() };
    for (why, tx, depths, value) in [
        ("signals replacement", &rbf, &[1][..], value),
        ("TRUC", &truc, &[1], value),
        ("unconfirmed input", &safe, &[0], value),
        ("a depth per input", &safe, &[], value),
        ("above the cap", &safe, &[1], Amount::from_sat(100_001)),
    ] {
        assert!(!policy.allows_zero_conf(value, tx, depths), "{why}");
        assert_eq!(policy.initial_state(value, tx, depths), ChannelState::Pending, "{why}");
    }
    let off = policy.with_zero_conf_max_value(Amount::ZERO);
    assert!(!off.allows_zero_conf(value, &safe, &[1]));
}

/// A channel failed although its funding is confirmed (a backend answered wrongly once): the
/// next pass finds the funding and the channel serves again; it is not closed early.
#[tokio::test]
async fn a_failed_channel_whose_funding_is_confirmed_opens_again() {
    let (chain, store, _funded, id) = one_channel(300, 5_000).await;
    chain.mine(1);
    assert!(store.transition(id, ChannelState::Open, ChannelState::Failed).await.unwrap());
    let mut task = settlement(store.clone(), chain.clone());
    let report = task.run_once().await.unwrap();
    assert_eq!((report.opened, report.closing, report.broadcast), (1, 0, 0), "{report:?}");
    assert_eq!(state(&store, id).await, ChannelState::Open);
}

/// A backend that cannot tell its network (`ChainBackend::network`'s default,
/// `ChainError::Unsupported`, as `Flaky` here) is not refused: the network check passes with a
/// warning and a `Merchant` of any network starts on it. (The backends that tell, and refuse a
/// mismatch, are tested in `tests/esplora.rs`, `tests/real_node.rs` and `tests/cli.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_cannot_tell_its_network_is_not_refused() {
    let chain = SimulatedChain::new();
    let flaky = Flaky { chain, failures: Arc::new(AtomicUsize::new(0)), tip_down: false };
    assert!(flaky.network().await.unwrap_err().is_unsupported());
    assert_eq!(paychan::chain::check_network(&flaky, Network::Bitcoin).await, Ok(()));
    let master = Xpriv::new_master(Network::Bitcoin, &[0x42; 32]).unwrap();
    paychan::Merchant::new(Network::Bitcoin, master, p2wpkh(&secret(2)), flaky)
        .start(MilliSats::from_msat(1_000))
        .await
        .expect("not checked, not refused")
        .stop();
}

/// A `Merchant` wires the layer, the negotiation endpoints and the settlement task on one
/// store: a channel opened and paid through its layer is closed at the margin and settled by
/// the task it spawned, with nothing run by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_merchant_collects_without_any_manual_wiring() {
    let chain = SimulatedChain::new();
    let store = MemoryStore::new();
    let master = Xpriv::new_master(Network::Regtest, &[0x42; 32]).unwrap();
    let paid = paychan::Merchant::new(Network::Regtest, master, p2wpkh(&secret(2)), chain.clone())
        .with_store(store.clone())
        .with_intervals(Duration::from_millis(20), Duration::from_millis(20))
        .start(MilliSats::from_msat(1_000_000))
        .await
        .unwrap();
    let app = Router::new().route("/paid", get(|| async { "ok" })).layer(paid.layer());
    let addr = serve(app).await;
    assert_eq!(call(addr, "GET", "/paid", &[], None).await.status, 402);
    let opened = common::client::open_channel(addr, &chain, 100_000, 2_000).await;
    chain.mine(1); // the funding confirms: the task opens the channel
    let id = wire::ChannelId::new(opened.channel.outpoint());
    let header = opened.header(2_000);
    let mut served = false;
    for _ in 0..500 {
        if call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "the task opened the channel once its funding confirmed");

    // At the close margin the task closes with the best payment; once mined, it is settled.
    let params = opened.channel.params();
    let margin = params.expiry.to_consensus_u32() - params.close_margin;
    chain.mine(margin - chain.tip().height);
    let mut settled = false;
    for _ in 0..500 {
        if let Some(record) = store.load(id).await.unwrap() {
            match record.state {
                ChannelState::Closed => {
                    chain.mine(1);
                }
                ChannelState::Settled => {
                    settled = true;
                    break;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(settled, "the merchant's own task closed and settled the channel");
    assert_eq!(paid.metrics().sats_settled, Amount::from_sat(2_000));
}

/// The fair close (issue #15): the client settles at what was metered, not at its best
/// payment. A settlement below what was spent is refused with 409 and changes nothing, as is
/// one that is not a payment; a top-up that lands first raises what was paid, not what was
/// spent; the fair settlement is what the server broadcasts, what the store holds, and what
/// the settlement task confirms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_close_settles_at_what_was_metered() {
    let (chain, store, funded, id) = one_channel(200, 4_000).await;
    // 1 000 sat a request.
    let addr = paid_api(&chain, &store, chain.clone(), MilliSats::from_msat(1_000_000)).await;
    let header = wire::encode_payment(&payment(&funded, 0, 4_000));
    for _ in 0..2 {
        let reply = call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let path = format!("/payment-channel/channels/{id}/close");
    let close = |fair: &str, proof: &str| {
        let body = serde_json::json!({ "fair_payment": fair });
        let proof = proof.to_owned();
        let path = path.clone();
        async move { call(addr, "POST", &path, &[("payment-channel", &proof)], Some(&body)).await }
    };
    let before = store.load(id).await.unwrap().unwrap();

    // Below the 2 000 sat spent: 409 with the channel's snapshot, nothing changed.
    let short = wire::encode_payment(&payment(&funded, 0, 1_500));
    let reply = close(&short, &header).await;
    assert_eq!(reply.status, 409, "{}", reply.body);
    assert_eq!(reply.json()["code"], "payment-below-spent");
    assert_eq!(reply.json()["channel"]["spent_msat"], 2_000_000);
    // Not a payment: 400, nothing changed.
    assert_eq!(close("not a payment", &header).await.status, 400);
    assert_eq!(store.load(id).await.unwrap().unwrap(), before, "the channel is untouched");

    // A late top-up lands first: paid 5 000, spent 3 000.
    let topped = wire::encode_payment(&payment(&funded, 0, 5_000));
    let reply = call(addr, "GET", "/paid", &[("payment-channel", &topped)], None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let fair = payment(&funded, 0, 3_000);
    let reply = close(&wire::encode_payment(&fair), &topped).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["server_amount_sat"], 3_000);
    let settled: Transaction =
        bitcoin::consensus::encode::deserialize_hex(reply.json()["close_tx"].as_str().unwrap())
            .unwrap();
    assert_eq!(settled.output[0].value, Amount::from_sat(3_000));
    assert_eq!(settled.output, fair.output, "the client's fair payment, co-signed");
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!((record.best.as_ref(), record.state), (Some(&fair), ChannelState::Closed));

    // The settlement task confirms the fair settlement (it builds the same close).
    chain.mine(1);
    let mut task = settlement(store.clone(), chain.clone());
    assert_eq!(task.run_once().await.unwrap().settled, 1);
    assert_eq!(task.metrics().lock().unwrap().sats_settled, Amount::from_sat(3_000));
    let out = chain.utxo(&OutPoint::new(settled.compute_txid(), 0)).unwrap();
    assert_eq!(out.value, Amount::from_sat(3_000));
}

/// `Merchant::with_settlement(false)` starts the layer without a settlement task: a channel at
/// its close margin stays open (nobody closes it), where the default merchant closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_without_settlement_closes_nothing_and_one_with_it_closes() {
    for settles in [false, true] {
        let (chain, store, funded, id) = one_channel(150, 5_000).await;
        chain.mine(1);
        while !funded.channel.params().is_closing(chain.tip()) {
            chain.mine(1);
        }
        let merchant = paychan::Merchant::new(Network::Regtest, master(), p2wpkh(&payout()), chain)
            .with_store(store.clone())
            .with_intervals(Duration::from_millis(20), Duration::from_millis(20))
            .with_settlement(settles)
            .start(MilliSats::from_msat(1_000))
            .await
            .unwrap();
        let mut closed = false;
        for _ in 0..50 {
            closed = state(&store, id).await != ChannelState::Open;
            if closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(closed, settles, "settlement task running: {settles}");
        merchant.stop();
    }
}
