//! A real electrs (the Esplora server: Blockstream's `new-index`, or mempool's fork) on a
//! [`Node`]: the binary from `ELECTRS_EXE`, a temporary database directory, free ports,
//! `--jsonrpc-import` (Core 28+ obfuscates its `blk*.dat` files, which older electrs read
//! directly otherwise), the node's cookie read from its data directory. See
//! docs/ESPLORA-RUN.md for building electrs and the run recorded there. The tests that use it
//! are `#[ignore]`d: CI keeps the fake (`esplora_fake`).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::http::{Reply, call};
use super::node::Node;

/// A regtest node (5 MB mempool, large OP_RETURN filler allowed: see `Node::fill_mempool`)
/// with a mined wallet, and electrs on it; `None` (after "skipped: …") without `ELECTRS_EXE` or
/// `BITCOIND_EXE`.
pub async fn node_with_electrs() -> Option<(Node, Electrs)> {
    if std::env::var_os("ELECTRS_EXE").is_none_or(|exe| exe.is_empty()) {
        println!("{SKIPPED}");
        return None;
    }
    let extra_args = ["-maxmempool=5", "-datacarriersize=100000"].map(String::from).to_vec();
    let node = Node::start(super::node::NodeConfig { txindex: false, extra_args }).await?;
    node.create_wallet("w").await;
    node.mine(180).await;
    let electrs = Electrs::start(&node).await?;
    Some((node, electrs))
}

pub const SKIPPED: &str =
    "skipped: ELECTRS_EXE is not set (a real electrs is needed; see docs/ESPLORA-RUN.md)";

/// A running electrs; killed and its database removed on drop.
pub struct Electrs {
    child: Child,
    dbdir: PathBuf,
    http: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Electrs {
    /// Starts electrs on `node` (whose chain must be out of initial block download: mine
    /// first) and waits until it serves and has caught up with the node; `None` (after one
    /// `skipped: …` line) without `ELECTRS_EXE`.
    pub async fn start(node: &Node) -> Option<Electrs> {
        let exe = match std::env::var_os("ELECTRS_EXE") {
            Some(exe) if !exe.is_empty() => PathBuf::from(exe),
            _ => {
                println!("{SKIPPED}");
                return None;
            }
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let dbdir = std::env::temp_dir().join(format!(
            "paychan-electrs-{}-{}",
            std::process::id(),
            nanos.as_nanos()
        ));
        std::fs::create_dir_all(&dbdir).unwrap();
        // electrs appends `regtest/` to the daemon directory and reads `.cookie` there at
        // every connection (the node's cookie changes when it restarts).
        let daemon_dir = node.cookie_path().parent().unwrap().parent().unwrap().to_owned();
        let rpc = node.url().trim_start_matches("http://").to_owned();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(&exe)
            .args(["--network", "regtest", "--jsonrpc-import", "-vv"])
            .arg("--daemon-dir")
            .arg(&daemon_dir)
            .arg("--db-dir")
            .arg(dbdir.join("db"))
            .args(["--daemon-rpc-addr", &rpc])
            .args(["--http-addr", &http.to_string()])
            .args(["--electrum-rpc-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--monitoring-addr", &format!("127.0.0.1:{}", free_port())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dbdir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let mut electrs = Electrs { child, dbdir, http };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = electrs.child.try_wait() {
                panic!("electrs exited with {status}: {}", electrs.log_tail());
            }
            if tokio::net::TcpStream::connect(http).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "electrs did not serve: {}", electrs.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        electrs.sync(node).await;
        Some(electrs)
    }

    /// The Esplora API's URL, for `Esplora::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// One request to the API, outside the backend under test.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        call(self.http, method, path, &[], body).await
    }

    /// Whether this electrs has `POST /txs/package` (`404 endpoint does not exist` where not).
    pub async fn has_package_endpoint(&self) -> bool {
        let reply = self.call("POST", "/txs/package", Some(&json!([]))).await;
        !(reply.status == 404 && reply.body.contains("endpoint does not exist"))
    }

    /// Waits until electrs's view is the node's: the same tip, the same mempool. electrs polls
    /// its node (every 5 s in Blockstream's, or at once on SIGUSR1, which is sent here): what
    /// reached the node other than through electrs (mined blocks, a restart that emptied the
    /// mempool, a package submitted to the node) shows in its answers only after that.
    pub async fn sync(&self, node: &Node) {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(60);
        let mut next_signal = start;
        loop {
            // Not more often: a SIGUSR1 restarts the 3 s wait before electrs reconnects to a
            // restarted node (`Waiter::wait` without `accept_sigusr`), so a stream of them
            // would keep it from ever reconnecting. Only once it serves: SIGUSR1's default
            // action ends a process without a handler.
            if Instant::now() >= next_signal {
                let pid = self.child.id().to_string();
                let _ = Command::new("kill").args(["-USR1", &pid]).status();
                next_signal = Instant::now() + Duration::from_secs(5);
            }
            let tip = node.rpc("getbestblockhash", json!([])).await;
            let mut mempool: Vec<String> =
                serde_json::from_value(node.rpc("getrawmempool", json!([])).await).unwrap();
            mempool.sort();
            let served_tip = self.call("GET", "/blocks/tip/hash", None).await;
            let served_mempool = self.call("GET", "/mempool/txids", None).await;
            if served_tip.status == 200 && served_mempool.status == 200 {
                let mut served: Vec<String> = serde_json::from_str(&served_mempool.body).unwrap();
                served.sort();
                if served_tip.body.trim() == tip.as_str().unwrap() && served == mempool {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "electrs did not catch up with the node within 60 s: {}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dbdir.join("stderr.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Electrs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("PAYCHAN_KEEP_ELECTRS_LOG").is_some() {
            eprintln!("electrs log kept in {}", self.dbdir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dbdir);
        }
    }
}
