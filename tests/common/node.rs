//! A throwaway Bitcoin Core regtest node: the binary from `BITCOIND_EXE`, a temporary data
//! directory, free ports, JSON-RPC 1.0 over HTTP with the cookie's credentials.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::{Address, Amount, BlockHash, Network, OutPoint, Script, Transaction, TxOut, Txid};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use paychan::chain::bitcoind::{Auth, BitcoindRpc};
use serde_json::{Value, json};

pub const SKIPPED: &str = "skipped: BITCOIND_EXE is not set (a real Bitcoin Core node is needed)";

/// How to start the node.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    pub txindex: bool,
    /// More `bitcoind` arguments, e.g. `-minrelaytxfee=0.00001`.
    pub extra_args: Vec<String>,
}

/// A running regtest node; killed and its data directory removed on drop.
pub struct Node {
    child: Child,
    exe: PathBuf,
    config: NodeConfig,
    datadir: PathBuf,
    rpc_port: u16,
    http: Client<HttpConnector, Full<Bytes>>,
    /// The wallet that wallet calls go to, and its mining address.
    wallet: Mutex<Option<(String, String)>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Core's JSON amounts (decimal BTC). `f64`'s `Display` is exact for 8-decimal values.
pub fn btc(value: &Value) -> Amount {
    Amount::from_btc(value.as_f64().unwrap_or_else(|| panic!("not an amount: {value}"))).unwrap()
}

impl Node {
    /// Starts a node, or `None` (after one `skipped: …` line) without `BITCOIND_EXE`. With
    /// `CI=true` a missing binary is a failure: CI must never skip.
    pub async fn start(config: NodeConfig) -> Option<Node> {
        let exe = match std::env::var_os("BITCOIND_EXE") {
            Some(exe) if !exe.is_empty() => PathBuf::from(exe),
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CI=true but BITCOIND_EXE is not set: the real-node tests must run in CI")
            }
            _ => {
                println!("{SKIPPED}");
                return None;
            }
        };
        let mut errors = Vec::new();
        for _ in 0..3 {
            match Self::try_start(&exe, &config).await {
                Ok(node) => return Some(node),
                Err(error) => errors.push(error),
            }
        }
        panic!("bitcoind ({}) did not start:\n{}", exe.display(), errors.join("\n"))
    }

    async fn try_start(exe: &Path, config: &NodeConfig) -> Result<Node, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let datadir = std::env::temp_dir().join(format!(
            "paychan-bitcoind-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            nanos.subsec_nanos()
        ));
        std::fs::create_dir_all(&datadir).map_err(|e| e.to_string())?;
        let rpc_port = free_port();
        let child = Self::spawn(exe, config, &datadir, rpc_port)?;
        let http = Client::builder(TokioExecutor::new()).build_http();
        // From here on, Drop kills the process and removes the directory.
        let mut node = Node {
            child,
            exe: exe.to_owned(),
            config: config.clone(),
            datadir,
            rpc_port,
            http,
            wallet: Mutex::new(None),
        };
        node.wait_for_rpc().await?;
        Ok(node)
    }

    fn spawn(
        exe: &Path,
        config: &NodeConfig,
        datadir: &Path,
        rpc_port: u16,
    ) -> Result<Child, String> {
        Command::new(exe)
            .arg("-regtest")
            .arg(format!("-datadir={}", datadir.display()))
            .arg(format!("-txindex={}", u8::from(config.txindex)))
            .arg("-fallbackfee=0.0002")
            .arg(format!("-rpcport={rpc_port}"))
            .arg(format!("-port={}", free_port()))
            // No P2P at all (Core refuses `-bind` together with `-listen=0`).
            .args(["-listen=0", "-server=1", "-printtoconsole=0", "-debug=0"])
            .args(&config.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(datadir.join("stderr.log")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))
    }

    async fn wait_for_rpc(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log_tail()));
            }
            if self.cookie_path().exists()
                && self.rpc_result("getblockchaininfo", json!([])).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no RPC answer within 30 s: {}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the node and starts it again on the same data directory without its mempool
    /// (`-persistmempool=0`), as a node restarted after a crash: every unconfirmed transaction
    /// is gone. The wallet is loaded again.
    pub async fn restart_without_mempool(&mut self) {
        self.rpc("stop", json!([])).await;
        self.child.wait().expect("bitcoind stops");
        let _ = std::fs::remove_file(self.datadir.join("regtest").join("mempool.dat"));
        let mut config = self.config.clone();
        config.extra_args.push("-persistmempool=0".into());
        self.child = Self::spawn(&self.exe, &config, &self.datadir, self.rpc_port)
            .unwrap_or_else(|e| panic!("bitcoind restart: {e}"));
        self.wait_for_rpc().await.unwrap_or_else(|e| panic!("bitcoind restart: {e}"));
        let wallet = self.wallet.lock().unwrap().clone();
        if let Some((name, _)) = wallet {
            self.rpc("loadwallet", json!([name])).await;
        }
        let mempool = self.rpc("getrawmempool", json!([])).await;
        assert_eq!(mempool, json!([]), "restarted without a mempool");
    }

    fn log_tail(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.datadir.join(name)).unwrap_or_default();
        let log = read("stderr.log") + &read("regtest/debug.log");
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    pub fn cookie_path(&self) -> PathBuf {
        self.datadir.join("regtest").join(".cookie")
    }

    /// The crate's chain backend on this node.
    pub fn chain(&self) -> BitcoindRpc {
        BitcoindRpc::new(&self.url(), Auth::CookieFile(self.cookie_path())).unwrap()
    }

    /// One JSON-RPC call at `path` (`/` or `/wallet/<name>`): the result or Core's error.
    pub async fn rpc_at(
        &self,
        path: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, (i64, String)> {
        let body = json!({ "jsonrpc": "1.0", "id": "test", "method": method, "params": params });
        let cookie =
            std::fs::read_to_string(self.cookie_path()).map_err(|e| (-1, e.to_string()))?;
        let auth = base64::engine::general_purpose::STANDARD.encode(cookie.trim());
        let request = http::Request::post(format!("{}{path}", self.url()))
            .header(http::header::AUTHORIZATION, format!("Basic {auth}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.http.request(request).await.map_err(|e| (-1, format!("http: {e}")))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| (-1, e.to_string()))?;
        let bytes = bytes.to_bytes();
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|_| (-1, format!("{status}: {}", String::from_utf8_lossy(&bytes))))?;
        match &answer["error"] {
            Value::Null => Ok(answer["result"].clone()),
            error => Err((error["code"].as_i64().unwrap_or(0), error["message"].to_string())),
        }
        .map_err(|(code, message)| (code, message.trim_matches('"').to_owned()))
    }

    pub async fn rpc_result(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        self.rpc_at("/", method, params).await
    }

    /// A node call that must succeed (panics with Core's message).
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        let shown = params.to_string();
        self.rpc_result(method, params)
            .await
            .unwrap_or_else(|(code, message)| panic!("{method} {shown}: {message} ({code})"))
    }

    /// A call to the wallet made by [`create_wallet`](Self::create_wallet).
    pub async fn wallet_rpc(&self, method: &str, params: Value) -> Value {
        let name = self.wallet.lock().unwrap().clone().expect("create_wallet first").0;
        let shown = params.to_string();
        self.rpc_at(&format!("/wallet/{name}"), method, params)
            .await
            .unwrap_or_else(|(code, message)| panic!("{method} {shown}: {message} ({code})"))
    }

    pub async fn create_wallet(&self, name: &str) {
        *self.wallet.lock().unwrap() = Some((name.to_owned(), String::new()));
        self.rpc("createwallet", json!([name])).await;
        let address = self.wallet_rpc("getnewaddress", json!([])).await;
        let address = address.as_str().unwrap().to_owned();
        *self.wallet.lock().unwrap() = Some((name.to_owned(), address));
    }

    pub async fn height(&self) -> u32 {
        self.rpc("getblockcount", json!([])).await.as_u64().unwrap() as u32
    }

    /// Mines `n` blocks to the wallet; returns the new height.
    pub async fn mine(&self, n: u32) -> u32 {
        let address = self.wallet.lock().unwrap().clone().expect("create_wallet first").1;
        self.rpc("generatetoaddress", json!([n, address])).await;
        self.height().await
    }

    /// Mines up to `height` (nothing if the tip is already there).
    pub async fn mine_to(&self, height: u32) -> u32 {
        let tip = self.height().await;
        if tip < height { self.mine(height - tip).await } else { tip }
    }

    /// The wallet pays `amount` to `script`: the new output.
    pub async fn fund_address(&self, script: &Script, amount: Amount) -> (OutPoint, TxOut) {
        let address = Address::from_script(script, Network::Regtest).unwrap();
        let amount_btc = amount.to_string_in(bitcoin::Denomination::Bitcoin);
        let txid = self.wallet_rpc("sendtoaddress", json!([address.to_string(), amount_btc])).await;
        let txid: Txid = txid.as_str().unwrap().parse().unwrap();
        let wallet_tx = self.wallet_rpc("gettransaction", json!([txid.to_string()])).await;
        let tx: Transaction = deserialize_hex(wallet_tx["hex"].as_str().unwrap()).unwrap();
        let vout = tx.output.iter().position(|o| o.script_pubkey == *script).unwrap();
        (OutPoint::new(txid, vout as u32), tx.output[vout].clone())
    }

    /// `testmempoolaccept`: whether Core would accept `tx`, and its reject reason.
    pub async fn test_mempool_accept(&self, tx: &Transaction) -> (bool, String) {
        let result = self.rpc("testmempoolaccept", json!([[serialize_hex(tx)]])).await;
        let verdict = &result[0];
        let reason = verdict["reject-reason"].as_str().unwrap_or_default().to_owned();
        (verdict["allowed"].as_bool().unwrap(), reason)
    }

    /// `sendrawtransaction`, with Core's error.
    pub async fn send_raw(&self, tx: &Transaction) -> Result<Txid, (i64, String)> {
        let txid = self.rpc_result("sendrawtransaction", json!([serialize_hex(tx)])).await?;
        Ok(txid.as_str().unwrap().parse().unwrap())
    }

    /// The mempool's entry for `txid`, if it is there.
    pub async fn mempool_entry(&self, txid: Txid) -> Option<Value> {
        self.rpc_result("getmempoolentry", json!([txid.to_string()])).await.ok()
    }

    /// A transaction of the mempool (works without `-txindex`).
    pub async fn mempool_tx(&self, txid: Txid) -> Transaction {
        let hex = self.rpc("getrawtransaction", json!([txid.to_string(), false])).await;
        deserialize_hex(hex.as_str().unwrap()).unwrap()
    }

    /// The transactions of the block at `height` (works without `-txindex`).
    pub async fn block_txs(&self, height: u32) -> Vec<Transaction> {
        let hash = self.rpc("getblockhash", json!([height])).await;
        let hash: BlockHash = hash.as_str().unwrap().parse().unwrap();
        let block = self.rpc("getblock", json!([hash.to_string(), 0])).await;
        let block: bitcoin::Block = deserialize_hex(block.as_str().unwrap()).unwrap();
        block.txdata
    }

    /// The height of the block (from `from` to the tip) that holds `txid`.
    pub async fn confirmed_at(&self, txid: Txid, from: u32) -> Option<u32> {
        for height in from..=self.height().await {
            if self.block_txs(height).await.iter().any(|tx| tx.compute_txid() == txid) {
                return Some(height);
            }
        }
        None
    }

    /// `gettxout` (the mempool included): the unspent output and its confirmations.
    pub async fn utxo(&self, outpoint: OutPoint) -> Option<(TxOut, u32)> {
        let params = json!([outpoint.txid.to_string(), outpoint.vout, true]);
        let out = self.rpc("gettxout", params).await;
        if out.is_null() {
            return None;
        }
        let script = out["scriptPubKey"]["hex"].as_str().unwrap();
        let txout = TxOut {
            value: btc(&out["value"]),
            script_pubkey: bitcoin::ScriptBuf::from_hex(script).unwrap(),
        };
        Some((txout, out["confirmations"].as_u64().unwrap() as u32))
    }

    /// What the confirmed UTXO set holds for `script` (`scantxoutset`), to the satoshi.
    pub async fn balance_of_script(&self, script: &Script) -> Amount {
        let desc = format!("raw({})", script.to_hex_string());
        let scan = self.rpc("scantxoutset", json!(["start", [desc]])).await;
        assert_eq!(scan["success"], true, "{scan}");
        scan["unspents"].as_array().unwrap().iter().map(|u| btc(&u["amount"])).sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.datadir);
    }
}

impl Node {
    /// Fills the node's mempool (started with `-maxmempool=5 -datacarriersize=100000`) with
    /// large transactions (90 kB of OP_RETURN each) paying just above `rate`, from its wallet's
    /// mature coins, until it trims and its minimum fee rate rises above `rate`.
    pub async fn fill_mempool(&self, rate: bitcoin::FeeRate) {
        use serde_json::json;
        let coins = self.wallet_rpc("listunspent", json!([1])).await;
        let address = self.wallet_rpc("getnewaddress", json!(["", "bech32"])).await;
        let data = "00".repeat(90_000);
        let filler_rate = rate.to_sat_per_kwu() / 250 + 1;
        for coin in coins.as_array().unwrap() {
            let fee = Amount::from_sat(filler_rate * 90_300);
            let Some(change) = btc(&coin["amount"]).checked_sub(fee) else { continue };
            let inputs = json!([{ "txid": coin["txid"], "vout": coin["vout"] }]);
            let change = change.to_string_in(bitcoin::Denomination::Bitcoin);
            let outputs = json!([{ "data": data }, { address.as_str().unwrap(): change }]);
            let raw = self.wallet_rpc("createrawtransaction", json!([inputs, outputs])).await;
            let signed = self.wallet_rpc("signrawtransactionwithwallet", json!([raw])).await;
            // Refused once the mempool's minimum passed the filler's rate: it is full.
            if self.rpc_result("sendrawtransaction", json!([signed["hex"]])).await.is_err() {
                break;
            }
        }
    }
}
