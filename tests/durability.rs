//! Durability and multi-node accounting with real server processes (`examples/durable_server`):
//! a node on SQLite killed with SIGKILL under load keeps every payment it acknowledged, and
//! two nodes sharing PostgreSQL (and, separately, Redis) serve exactly what was paid.
#![cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
// The helpers serve tests behind different features; with only some on, some are unused.
#![allow(dead_code, unused_imports)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bitcoin::absolute::LockTime;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, OutPoint, Txid};
use common::http::call;
use common::{p2wpkh, public, secret};
use paychan::MilliSats;
use paychan::channel::{ChainTip, Channel, Terms};
use paychan::store::{ChannelRecord, ChannelStore};
use paychan::wire::{self, ChannelId};

const PRICE_MSAT: u64 = 100_000;

/// A server process, killed when dropped.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(env: &[(&str, String)]) -> Node {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().unwrap().parent().unwrap().join("examples").join("durable_server");
    let mut child = Command::new(&binary)
        .env("PAYCHAN_ADDR", "127.0.0.1:0")
        // The channels below are written into the store on no chain: the node's settlement
        // task, on its own simulated chain, would suspend them.
        .env("PAYCHAN_NO_SETTLEMENT", "1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (`cargo test --all-features` builds it; or run \
                 `cargo build --all-features --example durable_server`)",
                binary.display()
            )
        });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("{line:?}"));
    Node { addr: addr.parse().unwrap(), child }
}

/// A funded channel (recorded directly in the store; the servers need no chain to meter it),
/// unique to this run.
fn channel() -> Channel {
    let tip = ChainTip { height: 200, median_time_past: 0 };
    let mut terms = Terms::default();
    terms.blocks.min = 0;
    let params = terms
        .agree(
            public(&secret(1)),
            public(&secret(2)),
            Amount::from_sat(1_000_000),
            LockTime::from_height(2_000).unwrap(),
            p2wpkh(&secret(1)),
            p2wpkh(&secret(2)),
            tip,
        )
        .unwrap();
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let mut txid = [0u8; 32];
    txid[..16].copy_from_slice(&nanos.to_le_bytes());
    params.at(OutPoint { txid: Txid::from_byte_array(txid), vout: std::process::id() })
}

fn header(channel: &Channel, sat: u64) -> String {
    let mut tx = channel.build_payment(Amount::from_sat(sat)).unwrap();
    channel.sign_payment(&mut tx, &secret(1)).unwrap();
    wire::encode_payment(&tx)
}

fn record(channel: &Channel, sat: u64) -> ChannelRecord {
    let mut tx = channel.build_payment(Amount::from_sat(sat)).unwrap();
    channel.sign_payment(&mut tx, &secret(1)).unwrap();
    ChannelRecord::open(channel.clone(), 0, tx)
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_node_killed_under_load_keeps_every_acknowledged_payment() {
    use paychan::store::SqliteStore;
    let dir = std::env::temp_dir().join(format!("paychan-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("channels.sqlite3");
    let channel = Arc::new(channel());
    let id = ChannelId::new(channel.outpoint());
    SqliteStore::open(&path).unwrap().create(record(&channel, 1_000)).await.unwrap();
    let node = spawn_node(&[("PAYCHAN_STORE", format!("sqlite:{}", path.display()))]);

    // Load: four clients, each request with a new, larger payment (+200 sat, 100 sat price).
    let next = Arc::new(AtomicU64::new(1_000));
    let acked = Arc::new(AtomicU64::new(0));
    let acked_max = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (next, acked, acked_max, stop, channel, addr) = (
                next.clone(),
                acked.clone(),
                acked_max.clone(),
                stop.clone(),
                channel.clone(),
                node.addr,
            );
            tokio::spawn(async move {
                for _ in 0..500 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let sat = next.fetch_add(200, Ordering::SeqCst) + 200;
                    let header = header(&channel, sat);
                    let Ok(Ok(reply)) = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        tokio::spawn(async move {
                            call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await
                        }),
                    )
                    .await
                    else {
                        break; // the node is gone
                    };
                    if reply.status == 200 {
                        acked.fetch_add(1, Ordering::SeqCst);
                        acked_max.fetch_max(sat, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    // Kill the node with SIGKILL once it has served a good number of requests.
    let mut node = node;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < 40 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        let _ = worker.await;
    }
    let (acked, acked_max) = (acked.load(Ordering::SeqCst), acked_max.load(Ordering::SeqCst));
    assert!(acked >= 40, "the node served {acked} requests before the deadline");

    let record = SqliteStore::open(&path).unwrap().load(id).await.unwrap().unwrap();
    assert!(record.paid_amount().to_sat() >= acked_max, "an acknowledged payment was lost");
    assert!(
        record.spent >= MilliSats::from_msat(acked * PRICE_MSAT),
        "an acknowledged debit was lost"
    );
    assert!(record.spent <= record.paid(), "served more than paid");

    // The restarted node carries on from the stored state.
    let node = spawn_node(&[("PAYCHAN_STORE", format!("sqlite:{}", path.display()))]);
    let top_up = record.paid_amount().to_sat() + 1_000;
    let reply =
        call(node.addr, "GET", "/paid", &[("payment-channel", &header(&channel, top_up))], None)
            .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let expected = top_up * 1_000 - record.spent.to_msat() - PRICE_MSAT;
    assert_eq!(reply.header("payment-channel-balance"), Some(expected.to_string().as_str()));
}

/// Two nodes on one shared store: requests spread over both are served exactly what was paid.
async fn two_nodes_serve_exactly_what_was_paid<S: ChannelStore>(store: S, env: NodeEnv) {
    let channel = Arc::new(channel());
    let id = ChannelId::new(channel.outpoint());
    store.create(record(&channel, 2_000)).await.unwrap();
    let nodes = [spawn_node(&env), spawn_node(&env)];
    let addrs = [nodes[0].addr, nodes[1].addr];
    let burst = |sat: u64| {
        let header = header(&channel, sat);
        async move {
            let tasks: Vec<_> = (0..64)
                .map(|i| {
                    let (addr, header) = (addrs[i % 2], header.clone());
                    tokio::spawn(async move {
                        call(addr, "GET", "/paid", &[("payment-channel", &header)], None)
                            .await
                            .status
                    })
                })
                .collect();
            let mut served = 0;
            for task in tasks {
                match task.await.unwrap() {
                    200 => served += 1,
                    402 => {}
                    other => panic!("unexpected status {other}"),
                }
            }
            served
        }
    };
    assert_eq!(burst(2_000).await, 20, "2 000 sat at 100 sat a request");
    assert_eq!(burst(3_000).await, 10, "the top-up to 3 000 sat pays for 10 more");
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!(record.paid(), MilliSats::from_msat(3_000_000));
    assert_eq!(record.spent, record.paid(), "total served equals total paid exactly");
}

/// Node processes' environment.
type NodeEnv = Vec<(&'static str, String)>;

/// A PostgreSQL store on a fresh schema, and the environment that points node processes at
/// the same schema; `None` (after "skipped: …") without `PAYCHAN_TEST_POSTGRES_URL`.
#[cfg(feature = "postgres")]
async fn postgres_nodes(name: &str) -> Option<(paychan::store::PostgresStore, NodeEnv)> {
    let config = common::stores::postgres_config(name).await?;
    let store = paychan::store::PostgresStore::connect_with(config.clone()).await.unwrap();
    let url = std::env::var("PAYCHAN_TEST_POSTGRES_URL").unwrap();
    let options = config.get_options().unwrap_or_default().replace(' ', "%20").replace('=', "%3D");
    let separator = if url.contains('?') { '&' } else { '?' };
    let node_url = format!("{url}{separator}options={options}");
    Some((store, vec![("PAYCHAN_STORE", format!("postgres:{node_url}"))]))
}

/// A Redis store under a fresh key prefix, and the environment that points node processes at
/// it; `None` (after "skipped: …") without `PAYCHAN_TEST_REDIS_URL`.
#[cfg(feature = "redis")]
async fn redis_nodes(name: &str) -> Option<(paychan::store::RedisStore, NodeEnv)> {
    let store = common::stores::redis_store(name).await?;
    let url = std::env::var("PAYCHAN_TEST_REDIS_URL").unwrap();
    let prefix = store.prefix().to_owned();
    Some((store, vec![("PAYCHAN_STORE", format!("redis:{url}")), ("PAYCHAN_REDIS_PREFIX", prefix)]))
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_postgres_serve_exactly_what_was_paid() {
    let Some((store, env)) = postgres_nodes("nodes").await else { return };
    two_nodes_serve_exactly_what_was_paid(store, env).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_redis_serve_exactly_what_was_paid() {
    let Some((store, env)) = redis_nodes("nodes").await else { return };
    two_nodes_serve_exactly_what_was_paid(store, env).await;
}

/// A loopback TCP proxy that can stop answering (refuse new connections and cut open ones).
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, connections2) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                connections2.lock().unwrap().push(task);
            }
        });
        Self { addr, up, connections }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// The layer on a store behind `proxy`: 503 while the store is cut off, then recovery.
async fn outage_fails_closed_and_recovers<S: ChannelStore + Clone>(store: S, proxy: &Proxy) {
    let channel = channel();
    store.create(record(&channel, 2_000)).await.unwrap();
    let (_tip_tx, tip) = tokio::sync::watch::channel(ChainTip { height: 200, median_time_past: 0 });
    let app = axum::Router::new()
        .route("/paid", axum::routing::get(|| async { "served" }))
        .layer(paychan::server::PaywallLayer::new(store, MilliSats::from_msat(PRICE_MSAT), tip));
    let addr = common::http::serve(app).await;
    let header = header(&channel, 2_000);
    let headers = [("payment-channel", header.as_str())];
    let get = || call(addr, "GET", "/paid", &headers, None);
    assert_eq!(get().await.status, 200);
    proxy.down();
    for _ in 0..3 {
        let reply = get().await;
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.json()["type"], "urn:paychan:problem:store-unavailable");
    }
    proxy.up();
    // Recovers by itself: bounded retries while the client library reconnects.
    let mut status = 0;
    for _ in 0..100 {
        status = get().await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the layer did not recover");
}

/// The socket address a service URL points to.
fn upstream(url: &str, default_port: u16) -> SocketAddr {
    let host_port = upstream_authority(url);
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&with_port).unwrap().next().unwrap()
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_closed_and_recovers() {
    let Ok(url) = std::env::var("PAYCHAN_TEST_POSTGRES_URL") else {
        println!("skipped: PAYCHAN_TEST_POSTGRES_URL is not set");
        return;
    };
    let proxy = Proxy::start(upstream(&url, 5432)).await;
    let via_proxy = url.replacen(&upstream_authority(&url), &proxy.addr.to_string(), 1);
    let store = paychan::store::PostgresStore::connect(&via_proxy).await.unwrap();
    outage_fails_closed_and_recovers(store, &proxy).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers() {
    let Ok(url) = std::env::var("PAYCHAN_TEST_REDIS_URL") else {
        println!("skipped: PAYCHAN_TEST_REDIS_URL is not set");
        return;
    };
    let proxy = Proxy::start(upstream(&url, 6379)).await;
    let via_proxy = url.replacen(&upstream_authority(&url), &proxy.addr.to_string(), 1);
    let store = paychan::store::RedisStore::connect(&via_proxy)
        .await
        .unwrap()
        .with_prefix(format!("{{paychan-outage-{}}}:", std::process::id()));
    outage_fails_closed_and_recovers(store, &proxy).await;
}

/// The `host[:port]` part of a URL, as written.
fn upstream_authority(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let authority = rest.split(['/', '?']).next().unwrap();
    authority.rsplit('@').next().unwrap().to_owned()
}

/// GET `/paid` on `addr` with `header`: the status, or `None` if the node is gone.
async fn try_paid(addr: SocketAddr, header: String) -> Option<u16> {
    let call = tokio::spawn(async move {
        call(addr, "GET", "/paid", &[("payment-channel", &header)], None).await.status
    });
    tokio::time::timeout(std::time::Duration::from_secs(5), call).await.ok()?.ok()
}

/// Two nodes serving from leases on one shared store, under load: one is killed with SIGKILL,
/// the other serves on, then stops gracefully (giving its leases back). The dead node's lease
/// lapses after its ttl and is forfeited, exactly; nothing was ever served unpaid, and what
/// the crash cost the client is at most that one lease (plus requests in flight).
async fn leased_nodes_killed_under_load_reconcile<S: ChannelStore>(store: S, env: NodeEnv) {
    const MAX_LEASE_MSAT: u64 = 2_000_000;
    let channel = Arc::new(channel());
    let id = ChannelId::new(channel.outpoint());
    store.create(record(&channel, 100_000)).await.unwrap();
    let node_env = |ttl: &str| {
        let mut env = env.clone();
        env.extend([
            ("PAYCHAN_LEASES", "1".to_owned()),
            ("PAYCHAN_LEASE_MAX_MSAT", MAX_LEASE_MSAT.to_string()),
            ("PAYCHAN_LEASE_IDLE_MS", "200".to_owned()),
            ("PAYCHAN_LEASE_TTL_SECS", ttl.to_owned()),
        ]);
        env
    };
    // The node to be killed lets its leases lapse after 10 s (the shortest ttl); the
    // survivor's own expiry sweep (every half of its ttl) stays out of the way, so the test
    // sees the lapse itself.
    let (mut doomed, survivor) = (spawn_node(&node_env("10")), spawn_node(&node_env("600")));
    let addrs = [doomed.addr, survivor.addr];
    let header = header(&channel, 100_000);
    // Served (200) and failed (the node was gone) requests, by node.
    let ok = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8usize)
        .map(|worker| {
            let (ok, failed, stop, header) =
                (ok.clone(), failed.clone(), stop.clone(), header.clone());
            tokio::spawn(async move {
                let mut node = worker % 2;
                while !stop.load(Ordering::SeqCst) {
                    match try_paid(addrs[node], header.clone()).await {
                        Some(200) => drop(ok[node].fetch_add(1, Ordering::SeqCst)),
                        Some(402) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                        Some(other) => panic!("unexpected status {other}"),
                        None => {
                            // The killed node: at most this one request was in flight there.
                            assert_eq!(node, 0, "the survivor failed");
                            failed.fetch_add(1, Ordering::SeqCst);
                            node = 1;
                        }
                    }
                }
            })
        })
        .collect();
    let wait_for = |node: usize, count: u64| {
        let ok = ok.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while ok[node].load(Ordering::SeqCst) < count {
                assert!(std::time::Instant::now() < deadline, "node {node} served too little");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    };
    wait_for(0, 60).await;
    wait_for(1, 60).await;
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();
    let killed_at = std::time::Instant::now();
    let after_kill = ok[1].load(Ordering::SeqCst);
    wait_for(1, after_kill + 60).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    // The survivor stops gracefully: its leases go back.
    let mut survivor = survivor;
    let term = Command::new("kill").args(["-TERM", &survivor.child.id().to_string()]).status();
    assert!(term.unwrap().success());
    assert!(survivor.child.wait().unwrap().success(), "the survivor stopped cleanly");

    let served = (ok[0].load(Ordering::SeqCst) + ok[1].load(Ordering::SeqCst)) * PRICE_MSAT;
    let in_flight = failed.load(Ordering::SeqCst) * PRICE_MSAT;
    let before = store.load(id).await.unwrap().unwrap();
    assert!(!before.leased.is_zero(), "the dead node died holding a lease");
    assert!(
        before.leased.to_msat() <= MAX_LEASE_MSAT,
        "only the dead node's one lease is left: {}",
        before.leased
    );
    // Its lease lapses after its ttl: then all of it is forfeited.
    let lapse = std::time::Duration::from_millis(10_300).saturating_sub(killed_at.elapsed());
    tokio::time::sleep(lapse).await;
    let forfeited = store.expire_leases(common::now_ms()).await.unwrap();
    assert_eq!(forfeited, before.leased, "exactly the lapsed lease");
    let after = store.load(id).await.unwrap().unwrap();
    assert_eq!((after.leased, after.spent), (MilliSats::ZERO, before.spent));
    assert_eq!(after.forfeited, before.leased, "the lapsed lease is forfeited, to the msat");
    // Reconciled: nothing served unpaid (the channel keeps what was served); what it reports
    // spent is at most what was served and what was in flight at the dead node; the crash
    // cost the client at most the lapsed lease.
    let (spent, kept) = (after.spent.to_msat(), after.committed().to_msat());
    assert!(served <= kept, "served {served} msat, only {kept} kept: served unpaid");
    assert!(spent <= served + in_flight, "reported {spent} msat spent for {served} served");
    assert!(
        kept - served <= before.leased.to_msat() + in_flight,
        "kept {kept} msat for {served} served: more lost than the lapsed lease ({}) and \
         the {in_flight} msat in flight",
        before.leased
    );
    assert!(after.committed() <= after.paid(), "never more than paid");
    println!(
        "served {served} msat; spent {spent} msat; kept {kept} msat, with the dead node's \
         lapsed lease {} and {in_flight} msat in flight",
        before.leased
    );
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_nodes_on_postgres_killed_under_load_reconcile() {
    let Some((store, env)) = postgres_nodes("leases").await else { return };
    leased_nodes_killed_under_load_reconcile(store, env).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_nodes_on_redis_killed_under_load_reconcile() {
    let Some((store, env)) = redis_nodes("leases").await else { return };
    leased_nodes_killed_under_load_reconcile(store, env).await;
}
