//! The whole money path against a real Bitcoin Core node (regtest), because a simulated chain
//! shares our bugs: the axum app behind `PaywallLayer` + `Negotiation` over loopback HTTP, the
//! `Payer` client funded by the node's wallet, the `Settlement` task driven pass by pass, and
//! every transaction the crate builds judged by Core itself (mempool acceptance, blocks, the
//! UTXO set). Each scenario runs on a node with `-txindex=0` and one with `-txindex=1`.
//!
//! Needs `BITCOIND_EXE` (CI sets it); without it every test prints `skipped: …` and passes.
#![cfg(feature = "bitcoind")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, Network, OutPoint, ScriptBuf, TxOut, Txid};
use bytes::Bytes;
use common::counting::{Counting, http_client};
use common::node::{Node, NodeConfig, btc};
use common::{p2wpkh, secret};
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::chain::bitcoind::BitcoindRpc;
use paychan::chain::{ChainError, RejectReason, follow_tip};
use paychan::channel::ChainTip;
use paychan::channel::ChannelState;
use paychan::channel::FundingPolicy;
use paychan::channel::{Terms, channel_key};
use paychan::client::{
    ClientChannel, ClientError, KeyWallet, MemoryClientStore, Payer, PaymentLayer, PaymentService,
    ServiceTransport, SpendingPolicy,
};
use paychan::server::{Negotiation, PaywallLayer};
use paychan::settlement::Settlement;
use paychan::store::{ChannelStore, MemoryStore};
use paychan::wire::{self, PAYMENT_CHANNEL};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tower::{Service, ServiceBuilder, ServiceExt};

const PRICE: MilliSats = MilliSats::from_msat(150_000);
/// A small channel (the funding policy may serve it before its funding confirms) and a large
/// one (above the default zero-confirmation cap of 100 000 sat: pending until it confirms).
const SMALL: Amount = Amount::from_sat(50_000);
const LARGE: Amount = Amount::from_sat(150_000);
const WALLET: Amount = Amount::from_sat(500_000);
/// Channel lifetime in blocks (the default terms' minimum is 144, the close margin 36).
const LIFETIME: u32 = 150;

/// Runs a scenario `async fn name(txindex: bool)` as `name::txindex_0` and `name::txindex_1`.
macro_rules! on_both_indexes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn txindex_0() {
                super::$name(false).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn txindex_1() {
                super::$name(true).await
            }
        }
    )*};
}

on_both_indexes!(
    a_pay_top_up_close_cooperatively,
    b_the_server_closes_before_the_refund_is_final,
    c_a_restarted_server_keeps_the_channel,
    d_the_client_refunds_after_the_server_vanished,
    f_a_payment_with_a_script_sig_is_refused,
    i_payments_pay_at_least_the_nodes_relay_fee,
    j_a_stalled_close_is_mined_with_a_cpfp_child,
    k_a_close_below_the_mempool_minimum_goes_out_as_a_package,
);

fn master() -> Xpriv {
    Xpriv::new_master(Network::Regtest, &[0x5e; 32]).unwrap()
}

fn client_master() -> Xpriv {
    Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap()
}

/// The key of the server's payout script.
fn payout() -> SecretKey {
    secret(0x22)
}

/// Requests are served from the funding's first confirmation on, or at once for a small
/// channel with a safe funding if the policy allows zero-confirmation channels (the same
/// policy goes to the negotiation and the settlement task).
fn funding_policy() -> FundingPolicy {
    FundingPolicy::default().with_min_confirmations(1)
}

async fn start_node(txindex: bool) -> Option<Node> {
    start_node_with(txindex, &[]).await
}

async fn start_node_with(txindex: bool, args: &[&str]) -> Option<Node> {
    let extra_args = args.iter().map(|arg| (*arg).to_owned()).collect();
    let node = Node::start(NodeConfig { txindex, extra_args }).await?;
    node.create_wallet("w").await;
    node.mine(101).await;
    Some(node)
}

/// The API server: `GET /work` at [`PRICE`], the negotiation endpoints, on `store`.
struct Server<S> {
    origin: String,
    port: u16,
    store: S,
    tip: watch::Receiver<ChainTip>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves the app on 127.0.0.1:`port` (0: a fresh port).
async fn serve<S: ChannelStore + Clone + 'static>(node: &Node, store: S, port: u16) -> Server<S> {
    let chain = node.chain();
    let negotiation = Negotiation::new(
        Network::Regtest,
        Terms::default(),
        master(),
        p2wpkh(&payout()),
        chain.clone(),
    )
    .with_funding_policy(funding_policy());
    let tip = follow_tip(chain, Duration::from_millis(20)).await.expect("the node answers");
    let paywall =
        PaywallLayer::new(store.clone(), PRICE, tip.clone()).with_negotiation(negotiation);
    let app = Router::new().route("/work", get(|| async { "done" })).layer(paywall);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    Server { origin: format!("http://127.0.0.1:{port}"), port, store, tip, stop, task }
}

impl<S> Server<S> {
    /// Stops serving and waits until every connection is closed.
    async fn shutdown(self) {
        let _ = self.stop.send(());
        let abort = self.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), self.task).await.is_err() {
            abort.abort();
        }
    }

    /// Waits until the layer's tip (polled from the node) is at `height`.
    async fn sync(&self, height: u32) {
        let mut tip = self.tip.clone();
        while tip.borrow_and_update().height < height {
            tokio::time::timeout(Duration::from_secs(5), tip.changed())
                .await
                .expect("the tip follower sees the new block")
                .unwrap();
        }
    }
}

fn settlement<S: ChannelStore>(store: S, node: &Node) -> Settlement<S, BitcoindRpc> {
    Settlement::new(store, node.chain(), master())
        .with_funding_policy(funding_policy())
        .with_cpfp_key(payout())
        .with_backoff(Duration::ZERO, Duration::ZERO)
}

async fn state<S: ChannelStore>(store: &S, channel: &ClientChannel) -> ChannelState {
    store.load(channel.id()).await.unwrap().expect("the server knows the channel").state
}

/// The paying client: a `KeyWallet` holding one coin the node's wallet sent it (confirmed),
/// a `Payer` behind `PaymentLayer` over hyper-util.
struct Customer {
    payer: Payer,
    wallet: KeyWallet,
    client: PaymentService<Counting, MemoryClientStore>,
    refusals: Arc<AtomicUsize>,
    origin: String,
    /// Requests answered 200.
    served: u64,
}

/// A client opening channels of `value`.
async fn customer(node: &Node, origin: &str, value: Amount) -> Customer {
    let wallet = KeyWallet::new(secret(0x33));
    let (_, output) = node.fund_address(&wallet.script_pubkey(), WALLET).await;
    assert_eq!(output.value, WALLET);
    let chain = node.chain();
    assert_eq!(wallet.sync(&chain, 1).await.unwrap(), Amount::ZERO, "not confirmed yet");
    node.mine(1).await;
    // The wallet finds its coin in Core's UTXO set (`scantxoutset`), once.
    assert_eq!(wallet.sync(&chain, 1).await.unwrap(), WALLET);
    assert_eq!(wallet.sync(&chain, 1).await.unwrap(), WALLET);
    let payer = Payer::builder(origin, Network::Regtest, client_master())
        .policy(
            SpendingPolicy::default()
                .with_max_per_request(MilliSats::from_msat(200_000))
                .with_max_channel_value(LARGE),
        )
        .wallet(wallet.clone())
        .channel_value(value)
        .lifetime_blocks(LIFETIME)
        .build()
        .unwrap();
    let refusals = Arc::new(AtomicUsize::new(0));
    let inner = Counting { http: http_client(), refusals: Arc::clone(&refusals) };
    let client = ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(inner);
    Customer { payer, wallet, client, refusals, origin: origin.to_owned(), served: 0 }
}

impl Customer {
    async fn get(&mut self) -> (StatusCode, String) {
        let request =
            http::Request::get(format!("{}/work", self.origin)).body(Full::default()).unwrap();
        let response = self.client.ready().await.unwrap().call(request).await;
        let response = response.unwrap_or_else(|e| panic!("GET /work: {e}"));
        let status = response.status();
        self.served += u64::from(status == StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// `n` requests, each served.
    async fn pay(&mut self, n: usize) {
        for i in 0..n {
            let (status, body) = self.get().await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "done"), "request {i}");
        }
    }

    /// A new HTTP client for the same payer (the old one's connections went to a dead server).
    fn reconnect(&mut self) {
        let inner = Counting { http: http_client(), refusals: Arc::clone(&self.refusals) };
        self.client =
            ServiceBuilder::new().layer(PaymentLayer::new(self.payer.clone())).service(inner);
    }

    async fn channel(&self) -> ClientChannel {
        self.payer.channel().await.unwrap().expect("the client has a channel")
    }
}

/// A plain request; the JSON body (or the text as a JSON string).
async fn call(
    origin: &str,
    method: http::Method,
    path: &str,
    payment: Option<&str>,
) -> (StatusCode, String, Value) {
    let mut request = http::Request::builder().method(method).uri(format!("{origin}{path}"));
    if let Some(payment) = payment {
        request = request.header(PAYMENT_CHANNEL, payment);
    }
    let request = request.body(Full::new(Bytes::from_static(b"{}"))).unwrap();
    let response = http_client().request(request).await.expect("the server answers");
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    (status, content_type, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The server's snapshot of the channel (`GET /payment-channel/channels/{id}`).
/// What a fair close pays the server: what it spent (its view), rounded up to the satoshi,
/// and at least the server output's dust threshold.
async fn fair_amount(origin: &str, channel: &ClientChannel) -> Amount {
    let spent = server_view(origin, channel).await["spent_msat"].as_u64().unwrap();
    Amount::from_sat(spent.div_ceil(1_000)).max(channel.channel.params().min_server_amount())
}

async fn server_view(origin: &str, channel: &ClientChannel) -> Value {
    let path = format!("/payment-channel/channels/{}", channel.id());
    let (status, _, view) = call(origin, http::Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// The client's first request opens a channel over HTTP (T1 from its wallet, broadcast by the
/// server). A channel the funding policy serves at 0 confirmations answers at once; any other
/// is pending (409) until the settlement task sees the funding's first confirmation. Either
/// way the channel is open, and not failed, once T1 is mined.
async fn open<S: ChannelStore>(
    node: &Node,
    server: &Server<S>,
    task: &mut Settlement<S, BitcoindRpc>,
    customer: &mut Customer,
) -> ClientChannel {
    let (status, body) = customer.get().await;
    let channel = customer.channel().await;
    let params = channel.channel.params();
    let outpoint = channel.channel.outpoint();
    let zero_conf = match status {
        StatusCode::OK => true,
        StatusCode::CONFLICT => {
            assert!(body.contains("channel-pending"), "{body}");
            false
        }
        _ => panic!("the first request opens a channel: {status} {body}"),
    };

    // T1 was accepted by Core's mempool, and pays the agreed 2-of-2 P2WSH the agreed value.
    let entry = node.mempool_entry(outpoint.txid).await.expect("T1 is in Core's mempool");
    let funding = node.mempool_tx(outpoint.txid).await;
    let expected = TxOut { value: params.value, script_pubkey: params.funding_script_pubkey() };
    assert_eq!(funding.output[outpoint.vout as usize], expected);
    // Core's fee for T1 is what left the client's wallet beyond the channel.
    let fee = btc(&entry["fees"]["base"]);
    assert_eq!(fee, WALLET - funding.output.iter().map(|o| o.value).sum::<Amount>());
    assert_eq!(customer.wallet.balance(), WALLET - params.value - fee);
    // Core's UTXO set still holds the coin T1 spends while T1 is unconfirmed: a sync does not
    // count it again.
    let chain = node.chain();
    assert_eq!(customer.wallet.sync(&chain, 0).await.unwrap(), WALLET - params.value - fee);

    let report = task.run_once().await.expect("a pass");
    assert_eq!((report.opened, report.failed), (0, 0), "0 confirmations: {report:?}");
    let unconfirmed = if zero_conf { ChannelState::Open } else { ChannelState::Pending };
    assert_eq!(state(&server.store, &channel).await, unconfirmed);

    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(outpoint.txid, height).await, Some(height), "T1 is mined");
    // Now the UTXO set holds T1's change, which the wallet already has.
    assert_eq!(customer.wallet.sync(&chain, 1).await.unwrap(), WALLET - params.value - fee);
    server.sync(height).await;
    let report = task.run_once().await.expect("a pass");
    assert_eq!(
        state(&server.store, &channel).await,
        ChannelState::Open,
        "the funding has 1 confirmation: the channel must be open (pass: {report:?})"
    );
    assert_eq!((report.opened, report.failed), (usize::from(!zero_conf), 0), "{report:?}");
    channel
}

/// The close of `channel` the server would broadcast: its best payment, co-signed.
async fn server_close<S: ChannelStore>(store: &S, channel: &ClientChannel) -> bitcoin::Transaction {
    let record = store.load(channel.id()).await.unwrap().unwrap();
    record.close_transaction(&master()).unwrap()
}

/// A close in Core's mempool: Core's fee is the agreed payment fee.
async fn check_close_in_mempool(node: &Node, channel: &ClientChannel, txid: Txid) {
    let entry = node.mempool_entry(txid).await.expect("the close is in Core's mempool");
    let fee = btc(&entry["fees"]["base"]);
    assert_eq!(fee, channel.channel.params().payment_fee(true), "Core's fee for the close");
}

/// Mines the block that confirms the close `txid` of `channel`, runs a settlement pass and
/// checks the channel is settled; returns the height and the pass's report.
async fn mine_and_settle<S: ChannelStore>(
    node: &Node,
    server: &Server<S>,
    task: &mut Settlement<S, BitcoindRpc>,
    channel: &ClientChannel,
    txid: Txid,
) -> (u32, paychan::settlement::PassReport) {
    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(txid, height).await, Some(height), "the close is mined");
    server.sync(height).await;
    let report = task.run_once().await.expect("a pass");
    assert_eq!(
        state(&server.store, channel).await,
        ChannelState::Settled,
        "the close confirmed: settled (pass: {report:?})"
    );
    (height, report)
}

/// The books, on chain, to the satoshi: the confirmed close pays the server's payout script
/// exactly what the server's store says it was paid, and the client the rest minus the fee.
async fn check_books<S: ChannelStore>(node: &Node, store: &S, channel: &ClientChannel, txid: Txid) {
    let record = store.load(channel.id()).await.unwrap().unwrap();
    assert_eq!(record.state, ChannelState::Settled);
    let params = channel.channel.params();
    let paid = record.paid_amount();
    let (server, confirmations) =
        node.utxo(OutPoint::new(txid, 0)).await.expect("the server's output, unspent");
    assert!(confirmations >= 1);
    assert_eq!(server.value, paid, "the server received exactly its best payment");
    assert_eq!(server.script_pubkey, p2wpkh(&payout()));
    assert_eq!(node.balance_of_script(&p2wpkh(&payout())).await, paid, "UTXO set: server");
    let (change, _) = node.utxo(OutPoint::new(txid, 1)).await.expect("the client's change");
    assert_eq!(change.value, params.value - paid - params.payment_fee(true), "client change");
    assert_eq!(change.script_pubkey, params.client_script);
    assert_eq!(node.balance_of_script(&params.client_script).await, change.value);
    assert!(node.utxo(OutPoint::new(txid, 2)).await.is_none(), "two outputs");
    assert!(node.utxo(channel.channel.outpoint()).await.is_none(), "the funding is spent");
}

/// a. Open over HTTP, pay with top-ups, close cooperatively through the client; the close is
/// mined and settled; the books checked on chain.
async fn a_pay_top_up_close_cooperatively(txindex: bool) {
    let Some(node) = start_node(txindex).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    let channel = open(&node, &server, &mut task, &mut customer).await;

    customer.pay(20).await;
    let committed = customer.payer.committed().await.unwrap();
    let metered = PRICE.checked_mul(customer.served).unwrap();
    assert!(committed >= metered.to_sat_ceil(), "{committed} paid for {metered}");
    assert!(customer.refusals.load(Ordering::SeqCst) >= 3, "the open and at least two top-ups");
    let view = server_view(&server.origin, &channel).await;
    assert_eq!(view["paid_msat"], committed.to_sat() * 1_000);
    assert_eq!(view["spent_msat"], metered.to_msat());

    // A fair close: the server is paid what it metered, the prepaid rest comes back.
    let fair = fair_amount(&server.origin, &channel).await;
    assert!(fair < committed, "something was prepaid and unused");
    let closed = customer.client.close().await.expect("a cooperative close");
    assert_eq!(closed.server_amount, fair);
    assert_eq!(closed.fee, channel.channel.params().payment_fee(true));
    check_close_in_mempool(&node, &channel, closed.txid).await;
    let (_, report) = mine_and_settle(&node, &server, &mut task, &channel, closed.txid).await;
    assert_eq!(report.settled, 1);
    assert_eq!(task.metrics().lock().unwrap().sats_settled, fair);
    check_books(&node, &server.store, &channel, closed.txid).await;
    assert_eq!(closed.client_amount, SMALL - fair - closed.fee);
}

/// b. No cooperative close: at expiry − close margin the task co-signs and broadcasts; the
/// close is mined while the refund is still non-final, and the refund is then a double spend
/// forever.
async fn b_the_server_closes_before_the_refund_is_final(txindex: bool) {
    let Some(node) = start_node(txindex).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    let channel = open(&node, &server, &mut task, &mut customer).await;
    customer.pay(5).await;
    let params = channel.channel.params().clone();
    let expiry = params.expiry.to_consensus_u32();
    let close_at = expiry - params.close_margin;

    assert_eq!(node.test_mempool_accept(&channel.refund).await, (false, "non-final".into()));
    let height = node.mine_to(close_at - 1).await;
    server.sync(height).await;
    let report = task.run_once().await.expect("a pass");
    assert_eq!((report.closing, report.broadcast), (0, 0), "not yet in the close margin");
    assert_eq!(state(&server.store, &channel).await, ChannelState::Open);

    let height = node.mine(1).await;
    assert_eq!(height, close_at);
    server.sync(height).await;
    let report = task.run_once().await.expect("a pass");
    assert_eq!((report.closing, report.broadcast), (1, 1), "{report:?}");
    assert_eq!(state(&server.store, &channel).await, ChannelState::Closed);
    let close = server_close(&server.store, &channel).await;
    let txid = close.compute_txid();
    check_close_in_mempool(&node, &channel, txid).await;
    assert_eq!(node.test_mempool_accept(&channel.refund).await, (false, "non-final".into()));

    let (mined, _) = mine_and_settle(&node, &server, &mut task, &channel, txid).await;
    assert!(mined < expiry, "mined at {mined}, before the refund can be (after {expiry})");
    check_books(&node, &server.store, &channel, txid).await;

    // From the expiry on the refund is final, and can never be valid: its input is spent.
    for target in [expiry, expiry + 10] {
        node.mine_to(target).await;
        assert_eq!(
            node.test_mempool_accept(&channel.refund).await,
            (false, "missing-inputs".into()),
            "the refund at height {target}"
        );
        assert_eq!(
            node.send_raw(&channel.refund).await,
            Err((-25, "bad-txns-inputs-missingorspent".into()))
        );
    }
    match channel.refund_if_expired(&node.chain()).await {
        Err(ClientError::Chain(ChainError::Rejected { reason, .. })) => {
            assert_eq!(reason, RejectReason::MissingInputs)
        }
        other => panic!("the refund must be refused as a double spend: {other:?}"),
    }
}

/// c. The server restarts mid-life on its SQLite file (same master key); the client keeps
/// paying on the same channel; close and settle after the restart.
async fn c_a_restarted_server_keeps_the_channel(txindex: bool) {
    let Some(node) = start_node(txindex).await else { return };
    let file = TempDb(std::env::temp_dir().join(format!(
        "paychan-real-node-{}-{}.sqlite3",
        std::process::id(),
        u8::from(txindex)
    )));
    file.remove();
    let sqlite = || paychan::store::SqliteStore::open(&file.0).expect("sqlite");

    let server = serve(&node, sqlite(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, LARGE).await;
    let channel = open(&node, &server, &mut task, &mut customer).await;
    customer.pay(8).await;
    let before = server_view(&server.origin, &channel).await;
    assert_eq!(before["spent_msat"], PRICE.checked_mul(customer.served).unwrap().to_msat());

    // The restart: nothing survives but the file (and the master key).
    let port = server.port;
    server.shutdown().await;
    drop(task);
    let server = serve(&node, sqlite(), port).await;
    let mut task = settlement(server.store.clone(), &node);
    customer.reconnect();
    let after = server_view(&server.origin, &channel).await;
    assert_eq!(after, before, "the channel survived the restart unchanged");
    let report = task.run_once().await.expect("a pass");
    assert_eq!(report.failed, 0, "{report:?}");

    customer.pay(8).await;
    let channel_now = customer.channel().await;
    assert_eq!(channel_now.id(), channel.id(), "the same channel after the restart");
    let committed = customer.payer.committed().await.unwrap();
    let view = server_view(&server.origin, &channel).await;
    assert_eq!(view["paid_msat"], committed.to_sat() * 1_000);
    assert_eq!(view["spent_msat"], PRICE.checked_mul(customer.served).unwrap().to_msat());

    let fair = fair_amount(&server.origin, &channel).await;
    let closed = customer.client.close().await.expect("a cooperative close after the restart");
    assert_eq!(closed.server_amount, fair);
    check_close_in_mempool(&node, &channel, closed.txid).await;
    mine_and_settle(&node, &server, &mut task, &channel, closed.txid).await;
    check_books(&node, &server.store, &channel, closed.txid).await;
    server.shutdown().await;
}

/// A SQLite database file (with its WAL and shared-memory files), removed on drop.
struct TempDb(std::path::PathBuf);

impl TempDb {
    fn remove(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        self.remove();
    }
}

/// d. The server vanishes: after the expiry the client's refund (T2) is accepted by Core and
/// mined, and gives back the channel's value minus the refund fee.
async fn d_the_client_refunds_after_the_server_vanished(txindex: bool) {
    let Some(node) = start_node(txindex).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    let channel = open(&node, &server, &mut task, &mut customer).await;
    customer.pay(3).await;
    server.shutdown().await;
    drop(task);

    let params = channel.channel.params().clone();
    let expiry = params.expiry.to_consensus_u32();
    let chain = node.chain();
    node.mine_to(expiry - 1).await;
    assert_eq!(channel.refund_if_expired(&chain).await.unwrap(), None, "not before the expiry");
    assert_eq!(node.test_mempool_accept(&channel.refund).await, (false, "non-final".into()));
    assert_eq!(node.send_raw(&channel.refund).await, Err((-26, "non-final".into())));

    node.mine(1).await;
    assert_eq!(node.test_mempool_accept(&channel.refund).await, (true, String::new()));
    let txid = channel.refund_if_expired(&chain).await.expect("Core accepts the refund");
    let txid = txid.expect("the refund is broadcast at the expiry");
    assert_eq!(txid, channel.refund.compute_txid());
    let entry = node.mempool_entry(txid).await.expect("the refund is in Core's mempool");
    assert_eq!(btc(&entry["fees"]["base"]), params.refund_fee(), "Core's fee for the refund");
    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(txid, height).await, Some(height), "the refund is mined");
    let (back, _) = node.utxo(OutPoint::new(txid, 0)).await.expect("the refund's output");
    assert_eq!(back.value, params.value - params.refund_fee(), "the client got its money back");
    assert_eq!(back.script_pubkey, params.client_script);
    assert_eq!(node.balance_of_script(&params.client_script).await, back.value);
    assert_eq!(node.balance_of_script(&p2wpkh(&payout())).await, Amount::ZERO);
}

/// f. A payment whose T3 input has a non-empty scriptSig is refused (4xx problem, books
/// unchanged); Core shows why: the co-signed close of such a T3 is invalid.
async fn f_a_payment_with_a_script_sig_is_refused(txindex: bool) {
    let Some(node) = start_node(txindex).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    open(&node, &server, &mut task, &mut customer).await;
    customer.pay(3).await;
    let channel = customer.channel().await;
    let before = server_view(&server.origin, &channel).await;

    // A valid T3 paying 1 000 sat more, then the same with one OP_0 as scriptSig (BIP-0143
    // signatures do not commit to it: the client's signature still verifies).
    let client_key = channel_key(&client_master(), channel.key_index).unwrap();
    let mut t3 = channel.channel.build_payment(channel.paid() + Amount::from_sat(1_000)).unwrap();
    channel.channel.sign_payment(&mut t3, &client_key).unwrap();
    let mut bad = t3.clone();
    bad.input[0].script_sig = ScriptBuf::from_bytes(vec![0x00]);
    let header = wire::encode_payment(&bad);
    let (status, content_type, problem) =
        call(&server.origin, http::Method::GET, "/work", Some(&header)).await;
    assert!(status.is_client_error(), "a scriptSig payment must be refused: {status} {problem}");
    assert_eq!(content_type, "application/problem+json", "{problem}");
    let after = server_view(&server.origin, &channel).await;
    assert_eq!(after, before, "a refused payment changes nothing");

    // Why: Core rejects the close of such a payment, while the same payment without the
    // scriptSig closes fine.
    let record = server.store.load(channel.id()).await.unwrap().unwrap();
    let server_key = channel_key(&master(), record.key_index).unwrap();
    let good_close = record.channel.close_transaction(&t3, &server_key).unwrap();
    assert_eq!(node.test_mempool_accept(&good_close).await, (true, String::new()));
    let mut malleated = good_close.clone();
    malleated.input[0].script_sig = ScriptBuf::from_bytes(vec![0x00]);
    let (allowed, reason) = node.test_mempool_accept(&malleated).await;
    assert!(!allowed, "Core must reject a witness spend with a scriptSig");
    assert!(reason.contains("script-verify-flag-failed"), "{reason}");
    println!("Core on a close whose input has a scriptSig: {reason}");
    // The crate never co-signs it into an invalid close: it refuses, or clears the scriptSig.
    match record.channel.close_transaction(&bad, &server_key) {
        Ok(close) => {
            assert_eq!(
                node.test_mempool_accept(&close).await,
                (true, String::new()),
                "close_transaction built an invalid close from a scriptSig payment"
            );
        }
        Err(error) => println!("close_transaction refuses a scriptSig payment: {error}"),
    }

    // The books close at what was metered (a fair close of the best payment's channel),
    // the refused payment changing nothing.
    let fair = fair_amount(&server.origin, &channel).await;
    let closed = customer.client.close().await.expect("a cooperative close");
    assert_eq!(closed.server_amount, fair);
    check_close_in_mempool(&node, &channel, closed.txid).await;
    let height = node.mine(1).await;
    server.sync(height).await;
    task.run_once().await.expect("a pass");
    check_books(&node, &server.store, &channel, closed.txid).await;
}

/// g. Without `-txindex` (what most nodes run): a confirmed funding is not a vanished one, and
/// the cooperative close endpoint works and settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_without_txindex_a_confirmed_channel_stays_open_and_settles() {
    let Some(node) = start_node(false).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, LARGE).await;
    let opened = open(&node, &server, &mut task, &mut customer).await;
    let height = node.mine(3).await;
    server.sync(height).await;
    for _ in 0..2 {
        let report = task.run_once().await.expect("a pass");
        assert_eq!(report.failed, 0, "a confirmed funding must not fail the channel: {report:?}");
        assert_eq!(state(&server.store, &opened).await, ChannelState::Open);
    }
    customer.pay(2).await;

    let channel = customer.channel().await;
    let path = format!("/payment-channel/channels/{}/close", channel.id());
    let header = channel.header().unwrap();
    let (status, _, answer) = call(&server.origin, http::Method::POST, &path, Some(&header)).await;
    assert!(matches!(status.as_u16(), 200 | 202), "close: {status} {answer}");
    if status == StatusCode::ACCEPTED {
        task.run_once().await.expect("a pass");
    }
    let txid: Txid = answer["txid"].as_str().unwrap().parse().unwrap();
    check_close_in_mempool(&node, &channel, txid).await;
    mine_and_settle(&node, &server, &mut task, &channel, txid).await;
    check_books(&node, &server.store, &channel, txid).await;
}

/// The backend reads Core's amounts exactly, also below 0.00001 BTC (which a JSON float
/// prints as `1e-6`-style text): a wallet coin of 500 sat, as `/fund` reads the funding's
/// inputs, and the 2-of-2 funding output a settlement pass watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_the_backend_reads_small_amounts_exactly() {
    use paychan::chain::ChainBackend as _;
    let Some(node) = start_node(false).await else { return };
    let chain = node.chain();
    for sat in [500, 999, 1_000, 12_345, 100_000_001] {
        let script = p2wpkh(&secret(0x44));
        let (outpoint, output) = node.fund_address(&script, Amount::from_sat(sat)).await;
        assert_eq!(output.value, Amount::from_sat(sat));
        let read = chain.unspent_output(&outpoint).await;
        assert_eq!(read, Ok(Some(output)), "gettxout of a {sat} sat output");
    }
}

/// i. A node that relays nothing below 5 sat/vB, above the terms' 2 sat/vB: no package can
/// carry a close below a node's minimum relay fee, so the server agrees channels at the node's
/// rate; the cooperative close enters the mempool and is mined.
async fn i_payments_pay_at_least_the_nodes_relay_fee(txindex: bool) {
    let Some(node) = start_node_with(txindex, &["-minrelaytxfee=0.00005"]).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    let channel = open(&node, &server, &mut task, &mut customer).await;
    let floor = bitcoin::FeeRate::from_sat_per_vb_u32(5);
    assert_eq!(channel.channel.params().min_fee_rate, floor, "the channel's rate is the node's");
    let (_, _, terms) =
        call(&server.origin, http::Method::GET, "/.well-known/payment-channel", None).await;
    assert_eq!(terms["min_fee_rate_sat_per_vb"], 5);
    assert_eq!(terms["funding_min_fee_rate_sat_per_vb"], 5);

    customer.pay(4).await;
    let closed = customer.client.close().await.expect("a cooperative close");
    check_close_in_mempool(&node, &channel, closed.txid).await;
    mine_and_settle(&node, &server, &mut task, &channel, closed.txid).await;
    check_books(&node, &server.store, &channel, closed.txid).await;
    server.shutdown().await;
}

/// j. Miners take nothing below 8 sat/vB: the close (at the agreed 2 sat/vB) waits in the
/// mempool; the settlement task bumps it with a child spending the server's output (CPFP, at
/// its 10 sat/vB floor: the node has no fee estimate on regtest); parent and child are mined
/// together and the server's payout is what it was paid less the child's fee.
async fn j_a_stalled_close_is_mined_with_a_cpfp_child(txindex: bool) {
    let Some(node) = start_node_with(txindex, &["-blockmintxfee=0.00008"]).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node).with_cpfp_after(1);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    let (status, body) = customer.get().await;
    assert_eq!(status, StatusCode::OK, "a small channel is served at once: {body}");
    let channel = customer.channel().await;
    // The funding pays 1 sat/vB: let the miner take it anyway.
    let funding = channel.channel.outpoint().txid;
    node.rpc("prioritisetransaction", serde_json::json!([funding.to_string(), 0, 1_000_000])).await;
    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(funding, height).await, Some(height));
    // Enough for the server's output to pay a child (about 2 600 sat at 10 sat/vB).
    customer.pay(30).await;

    let closed = customer.client.close().await.expect("a cooperative close");
    check_close_in_mempool(&node, &channel, closed.txid).await;
    let height = node.mine(2).await;
    assert!(node.mempool_entry(closed.txid).await.is_some(), "2 sat/vB is not mined");
    server.sync(height).await;
    let report = task.run_once().await.expect("a pass");
    assert_eq!(report.bumped, 0, "the timer starts: {report:?}");
    let height = node.mine(1).await;
    server.sync(height).await;
    let report = task.run_once().await.expect("a pass");
    assert_eq!(report.bumped, 1, "{report:?}");

    let mempool: Vec<String> =
        serde_json::from_value(node.rpc("getrawmempool", serde_json::json!([])).await).unwrap();
    let child: Txid = mempool
        .iter()
        .map(|txid| txid.parse().unwrap())
        .find(|txid| *txid != closed.txid)
        .expect("the CPFP child is in Core's mempool");
    let child_tx = node.mempool_tx(child).await;
    assert_eq!(child_tx.input[0].previous_output, OutPoint::new(closed.txid, 0));
    let entry = node.mempool_entry(closed.txid).await.unwrap();
    let package_fee = btc(&entry["fees"]["descendant"]);
    let package_vsize = entry["descendantsize"].as_u64().unwrap();
    assert!(package_fee.to_sat() >= 10 * package_vsize, "{package_fee} for {package_vsize} vB");

    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(closed.txid, height).await, Some(height), "the close is mined");
    assert_eq!(node.confirmed_at(child, height).await, Some(height), "with its child");
    server.sync(height).await;
    task.run_once().await.expect("a pass");
    let record = server.store.load(channel.id()).await.unwrap().unwrap();
    assert_eq!(record.state, ChannelState::Settled, "settled although its server output is spent");
    let close = server_close(&server.store, &channel).await;
    assert_eq!(close.output[0].value, record.paid_amount(), "the close paid the server in full");
    let payout = node.balance_of_script(&p2wpkh(&payout())).await;
    assert_eq!(payout, child_tx.output[0].value, "the server's payout is the child's output");
    assert!(payout < record.paid_amount() && payout > Amount::ZERO);
    server.shutdown().await;
}

/// Fills the mempool with large low-fee transactions (3 sat/vB, 90 kB of OP_RETURN each) until
/// the node trims it and its minimum fee rises; returns the new minimum in sat/vB.
async fn fill_mempool(node: &Node) -> f64 {
    let coins = node.wallet_rpc("listunspent", serde_json::json!([1])).await;
    let address = node.wallet_rpc("getnewaddress", serde_json::json!(["", "bech32"])).await;
    let data = "00".repeat(90_000);
    for coin in coins.as_array().unwrap() {
        let fee = Amount::from_sat(3 * 90_300);
        let change = btc(&coin["amount"]) - fee;
        let inputs = serde_json::json!([{ "txid": coin["txid"], "vout": coin["vout"] }]);
        let outputs = serde_json::json!([
            { "data": data },
            { address.as_str().unwrap(): change.to_string_in(bitcoin::Denomination::Bitcoin) },
        ]);
        let raw =
            node.wallet_rpc("createrawtransaction", serde_json::json!([inputs, outputs])).await;
        let signed =
            node.wallet_rpc("signrawtransactionwithwallet", serde_json::json!([raw])).await;
        // Refused once the mempool's minimum passed 3 sat/vB: it is full.
        if node.rpc_result("sendrawtransaction", serde_json::json!([signed["hex"]])).await.is_err()
        {
            break;
        }
    }
    let info = node.rpc("getmempoolinfo", serde_json::json!([])).await;
    info["mempoolminfee"].as_f64().unwrap() * 100_000.0
}

/// k. A full mempool (5 MB) whose minimum fee rose above the close's 2 sat/vB: the close alone
/// is refused (the close endpoint queues it: 202), and the settlement task submits it with a
/// CPFP child as a package (`submitpackage`); both are mined before the filler.
async fn k_a_close_below_the_mempool_minimum_goes_out_as_a_package(txindex: bool) {
    let args = ["-maxmempool=5", "-datacarriersize=100000"];
    let Some(node) = start_node_with(txindex, &args).await else { return };
    node.mine(80).await; // coins for the filler
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    let mut customer = customer(&node, &server.origin, SMALL).await;
    let channel = open(&node, &server, &mut task, &mut customer).await;
    customer.pay(30).await;

    let minimum = fill_mempool(&node).await;
    let close = server_close(&server.store, &channel).await;
    let rate = close_rate(&channel);
    assert!(minimum > rate, "the mempool minimum {minimum} sat/vB is above the close's {rate}");
    assert!(!node.test_mempool_accept(&close).await.0, "the close alone is refused");

    let path = format!("/payment-channel/channels/{}/close", channel.id());
    // The proof is the client's latest payment: the first one is refused (`stale-proof`).
    let stale = channel.header().unwrap();
    let (status, _, _) = call(&server.origin, http::Method::POST, &path, Some(&stale)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let header = customer.channel().await.header().unwrap();
    let (status, _, answer) = call(&server.origin, http::Method::POST, &path, Some(&header)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "queued: {answer}");
    let report = task.run_once().await.expect("a pass");
    assert_eq!((report.broadcast, report.bumped), (1, 1), "{report:?}");
    let txid = close.compute_txid();
    let entry =
        node.mempool_entry(txid).await.expect("the close is in the mempool, with its child");
    assert_eq!(entry["descendantcount"], 2);
    mine_and_settle(&node, &server, &mut task, &channel, txid).await;
    server.shutdown().await;
}

/// The channel's payment (and close) fee rate in sat/vB.
fn close_rate(channel: &ClientChannel) -> f64 {
    channel.channel.params().min_fee_rate.to_sat_per_kwu() as f64 / 250.0
}

/// l. Bitcoin Core's own wallet funds the channel (`CoreWallet`: `walletcreatefundedpsbt`,
/// `walletprocesspsbt`), the client pays (with top-ups) and closes cooperatively, and the books
/// add up in the Core wallet; a funding the client abandons has its coins unlocked
/// (`lockunspent`); a second Core-funded channel whose server vanished is refunded by the
/// payer by itself once final, the refund mined and checked on chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l_the_core_wallet_funds_a_channel() {
    use paychan::chain::bitcoind::Auth;
    use paychan::client::{CoreWallet, Wallet as _};

    let Some(node) = start_node(false).await else { return };
    let server = serve(&node, MemoryStore::new(), 0).await;
    let mut task = settlement(server.store.clone(), &node);
    node.rpc("createwallet", serde_json::json!(["customer"])).await;
    let address = node.rpc_at("/wallet/customer", "getnewaddress", serde_json::json!([])).await;
    let address = address.unwrap().as_str().unwrap().to_owned();
    node.wallet_rpc("sendtoaddress", serde_json::json!([address, "0.01"])).await;
    node.mine(1).await;
    let initial = Amount::from_sat(1_000_000);
    let url = format!("{}/wallet/customer", node.url());
    let wallet = CoreWallet::new(
        BitcoindRpc::new(&url, Auth::CookieFile(node.cookie_path())).unwrap(),
        Network::Regtest,
    );

    // Abandoned: the coins come back.
    let output = TxOut { value: SMALL, script_pubkey: p2wpkh(&secret(0x44)) };
    let rate = bitcoin::FeeRate::from_sat_per_vb_u32(2);
    let psbt = wallet.fund(output, rate).await.expect("Core funds the output");
    let locked = node.rpc_at("/wallet/customer", "listlockunspent", serde_json::json!([])).await;
    assert_eq!(locked.unwrap().as_array().unwrap().len(), psbt.unsigned_tx.input.len());
    wallet.release(&psbt);
    let mut unlocked = false;
    for _ in 0..100 {
        let locked =
            node.rpc_at("/wallet/customer", "listlockunspent", serde_json::json!([])).await;
        if locked.unwrap().as_array().unwrap().is_empty() {
            unlocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(unlocked, "release unlocks the abandoned funding's coins");

    // Funded by Core, paid, closed.
    let payer = Payer::builder(&server.origin, Network::Regtest, client_master())
        .policy(SpendingPolicy::default().with_max_per_request(MilliSats::from_msat(200_000)))
        .wallet(wallet)
        .chain(node.chain())
        .channel_value(SMALL)
        .lifetime_blocks(LIFETIME)
        .transport(ServiceTransport::<_, Full<Bytes>>::new(http_client()))
        .build()
        .unwrap();
    let refusals = Arc::new(AtomicUsize::new(0));
    let inner = Counting { http: http_client(), refusals: Arc::clone(&refusals) };
    let mut client = ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(inner);
    for n in 0..12 {
        let request =
            http::Request::get(format!("{}/work", server.origin)).body(Full::default()).unwrap();
        let response = client.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
    }
    let channel = payer.channel().await.unwrap().expect("a channel");
    let funding = node.mempool_tx(channel.channel.outpoint().txid).await;
    assert!(!funding.is_explicitly_rbf(), "Core's funding does not signal replacement");
    let fair = fair_amount(&server.origin, &channel).await;
    let closed = client.close().await.expect("a cooperative close");
    assert_eq!(closed.server_amount, fair);
    check_close_in_mempool(&node, &channel, closed.txid).await;
    mine_and_settle(&node, &server, &mut task, &channel, closed.txid).await;
    check_books(&node, &server.store, &channel, closed.txid).await;

    // The Core wallet paid the channel's value and the funding's fee, nothing else.
    let funding_tx = node
        .rpc_at(
            "/wallet/customer",
            "gettransaction",
            serde_json::json!([channel.channel.outpoint().txid.to_string()]),
        )
        .await
        .unwrap();
    let fee = btc(&serde_json::json!(-funding_tx["fee"].as_f64().unwrap()));
    let balance = node.rpc_at("/wallet/customer", "getbalance", serde_json::json!([])).await;
    let balance = btc(&balance.unwrap());
    assert_eq!(balance + SMALL + fee, initial, "wallet: {balance}, fee {fee}");
    let vsize = funding.vsize() as u64;
    assert!(fee >= Amount::from_sat(vsize), "at least the agreed funding fee rate");
    assert!(refusals.load(Ordering::SeqCst) >= 2, "the open and at least one top-up");

    // A second channel funded by Core, opened outside any request through the payer's own
    // transport; the server vanishes, and once the refund is final the payer broadcasts it
    // by itself: the channel's value minus the refund fee comes back, on chain.
    payer.open().await.expect("a second channel");
    let second = payer.channel().await.unwrap().expect("the second channel");
    let params = second.channel.params().clone();
    assert!(node.mempool_entry(second.channel.outpoint().txid).await.is_some(), "T1 sent");
    node.mine(1).await;
    server.shutdown().await;
    drop(task);
    node.mine_to(params.expiry.to_consensus_u32() - 1).await;
    assert_eq!(payer.refund_expired().await.unwrap(), [], "not before the expiry");
    node.mine(1).await;
    let refunds = payer.refund_expired().await.expect("the refund is broadcast");
    assert_eq!(refunds, [second.refund.compute_txid()]);
    let height = node.mine(1).await;
    assert_eq!(node.confirmed_at(refunds[0], height).await, Some(height), "the refund is mined");
    let (back, _) = node.utxo(OutPoint::new(refunds[0], 0)).await.expect("the refund's output");
    assert_eq!(back.value, params.value - params.refund_fee());
    assert_eq!(back.script_pubkey, params.client_script);
    assert_eq!(payer.refund_expired().await.unwrap(), [], "refunded once");
}

/// A `KeyWallet` that mines: its coinbase output joins the wallet only at 100 confirmations.
/// Before, a funding spending it is refused by Core (`bad-txns-premature-spend-of-coinbase`);
/// after, Core accepts the wallet's funding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_a_mined_coin_is_spent_only_once_mature() {
    use paychan::chain::{COINBASE_MATURITY, ChainBackend as _};
    use paychan::client::Wallet as _;
    let Some(node) = start_node(false).await else { return };
    let chain = node.chain();
    let wallet = KeyWallet::new(secret(0x44));
    let address = wallet.address(Network::Regtest).to_string();
    node.rpc("generatetoaddress", serde_json::json!([1, address])).await;
    let height = node.height().await;
    let coinbase = node.block_txs(height).await.remove(0);
    let outpoint = OutPoint::new(coinbase.compute_txid(), 0);
    let live = chain.unspent(&outpoint).await.unwrap().expect("the coinbase output");
    assert!(live.coinbase && !live.is_spendable(), "{live:?}");
    assert_eq!(wallet.sync(&chain, 1).await.unwrap(), Amount::ZERO, "immature: not counted");

    // What it would cost to count it: a funding spending it is refused by the node.
    let eager = KeyWallet::new(secret(0x44));
    eager.add_coin(outpoint, coinbase.output[0].clone());
    let pay_to = TxOut { value: Amount::from_sat(100_000), script_pubkey: wallet.script_pubkey() };
    let rate = bitcoin::FeeRate::from_sat_per_vb_u32(2);
    let early = eager.sign(eager.fund(pay_to.clone(), rate).await.unwrap()).await.unwrap();
    let early = early.extract_tx().unwrap();
    let (accepted, reason) = node.test_mempool_accept(&early).await;
    assert!(!accepted && reason.contains("premature-spend-of-coinbase"), "{reason}");

    node.mine(COINBASE_MATURITY - 2).await;
    assert_eq!(wallet.sync(&chain, 1).await.unwrap(), Amount::ZERO, "99 confirmations");
    node.mine(1).await;
    assert_eq!(wallet.sync(&chain, 1).await.unwrap(), coinbase.output[0].value, "mature");
    let funding = wallet.sign(wallet.fund(pay_to, rate).await.unwrap()).await.unwrap();
    let (accepted, reason) = node.test_mempool_accept(&funding.extract_tx().unwrap()).await;
    assert!(accepted, "{reason}");
}

/// n. A wrong network does not start: Core's `getblockchaininfo` says `regtest`, and a
/// `Merchant` for mainnet (or testnet, testnet4, signet) on the node refuses to start with
/// `ChainError::WrongNetwork` naming both networks; a regtest `Merchant` starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_a_merchant_for_another_network_does_not_start_on_the_node() {
    use paychan::Merchant;
    use paychan::chain::ChainBackend as _;
    let config = NodeConfig { txindex: false, extra_args: Vec::new() };
    let Some(node) = Node::start(config).await else { return };
    let chain = node.chain();
    assert_eq!(chain.network().await, Ok(Network::Regtest));
    for network in [Network::Bitcoin, Network::Testnet, Network::Testnet4, Network::Signet] {
        let master = Xpriv::new_master(network, &[0x5e; 32]).unwrap();
        let merchant = Merchant::new(network, master, p2wpkh(&payout()), chain.clone());
        let refused = merchant.start(PRICE).await.err();
        let expected = ChainError::WrongNetwork { expected: network, actual: Network::Regtest };
        assert_eq!(refused.as_ref(), Some(&expected), "a {network} merchant");
        let message = expected.to_string();
        assert!(message.contains("regtest") && message.contains(&network.to_string()), "{message}");
    }
    let merchant = Merchant::new(Network::Regtest, master(), p2wpkh(&payout()), chain);
    merchant.start(PRICE).await.expect("a regtest merchant on a regtest node").stop();
}
