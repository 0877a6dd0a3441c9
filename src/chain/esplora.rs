//! [`Esplora`]: a [`ChainBackend`] over the Esplora REST API (Blockstream's esplora,
//! mempool.space).

use bitcoin::consensus::encode::serialize_hex;
use bitcoin::{BlockHash, FeeRate, Network, OutPoint, ScriptBuf, Transaction, TxOut, Txid};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::core_reject::{BroadcastError, map_broadcast_error, package_result, relayed_error};
use super::http::{Target, send, split_url, unavailable};
use super::{ChainBackend, ChainError, ChainTip, TxStatus, Utxo};

/// The Esplora REST API as a [`ChainBackend`].
///
/// | method | endpoint |
/// |---|---|
/// | [`broadcast`](ChainBackend::broadcast) | `POST /tx` (Core's error, relayed in the body, is mapped as for [`BitcoindRpc`](super::bitcoind::BitcoindRpc)) |
/// | [`tx_status`](ChainBackend::tx_status) | `GET /tx/:txid` (404: unknown; its `status`, else `GET /tx/:txid/status`) |
/// | [`tip`](ChainBackend::tip) | `GET /blocks/tip/hash`, `GET /block/:hash` (`height`, `mediantime`) |
/// | [`estimate_fee_rate`](ChainBackend::estimate_fee_rate) | `GET /fee-estimates` (the nearest target at or below the one asked) |
/// | [`unspent_output`](ChainBackend::unspent_output) | `GET /tx/:txid`, `GET /tx/:txid/outspend/:vout` |
/// | [`unspent_outputs_of`](ChainBackend::unspent_outputs_of) | `GET /scripthash/:hash/utxo` (mempool included) |
/// | [`broadcast_package`](ChainBackend::broadcast_package) | `POST /txs/package` (Core's `submitpackage`), else the [`PackageRelay`] given |
/// | [`mempool_min_fee_rate`](ChainBackend::mempool_min_fee_rate) | the [`PackageRelay`]'s node, else [`ChainError::Unsupported`] |
/// | [`network`](ChainBackend::network) | `GET /block-height/0`: the genesis block's hash, the network whose genesis it is |
///
/// `GET /tx/:txid/status` alone cannot tell a transaction in the mempool from one the server
/// never saw or that left the mempool: electrs answers `{"confirmed":false}` for both (its
/// status is only the confirming block). `GET /tx/:txid` answers 404 for a transaction in
/// neither the chain nor the mempool, so that is what [`tx_status`](ChainBackend::tx_status)
/// asks: an evicted settlement reads [`TxStatus::Unknown`] and is broadcast again.
///
/// Package relay (`POST /txs/package`) is in mempool's electrs since late 2024 and in recent
/// Blockstream electrs (`new-index`); older servers answer `404 endpoint does not exist`. Then
/// [`broadcast_package`](ChainBackend::broadcast_package) uses the [`PackageRelay`] given to
/// [`with_package_relay`](Self::with_package_relay), or fails with
/// [`ChainError::Unsupported`] — never two plain broadcasts that cannot get a parent below the
/// mempool minimum in.
///
/// It speaks HTTP/1.1, over TLS for `https://` URLs with the `tls` feature (rustls and
/// Mozilla's roots), so a public instance works as well as one you run.
#[derive(Debug, Clone)]
pub struct Esplora {
    target: Target,
    base: String,
    package_relay: Option<Box<PackageRelay>>,
}

/// Where an [`Esplora`] backend submits packages its server cannot take: a node with
/// `submitpackage`, or another Esplora server that has `POST /txs/package`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PackageRelay {
    /// Another Esplora server.
    Esplora(Esplora),
    /// A Bitcoin Core node (28 or later) over JSON-RPC (feature `bitcoind`).
    #[cfg(feature = "bitcoind")]
    Bitcoind(super::bitcoind::BitcoindRpc),
}

impl PackageRelay {
    async fn broadcast_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> Result<Txid, ChainError> {
        match self {
            // Its own fallback is not followed: one hop.
            Self::Esplora(esplora) => esplora.submit_package(parent, child).await,
            #[cfg(feature = "bitcoind")]
            Self::Bitcoind(rpc) => rpc.broadcast_package(parent, child).await,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Status {
    confirmed: bool,
    block_height: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Block {
    height: u32,
    mediantime: u32,
}

/// Parses a decimal sat/vB value (as Esplora writes them, e.g. `87.882`) exactly into a
/// fee rate, rounding up to the next sat per 1 000 weight units.
fn sat_per_vb(text: &str) -> Result<FeeRate, ChainError> {
    let bad = || unavailable(format!("not a fee rate: {text}"));
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    // Thousandths of a sat/vB, rounding up anything finer.
    let mut millis = 0u64;
    for (i, digit) in fraction.bytes().enumerate() {
        let d = u64::from(digit.checked_sub(b'0').filter(|d| *d <= 9).ok_or_else(bad)?);
        if i < 3 {
            millis += d * 10u64.pow(2 - i as u32);
        } else if d > 0 {
            millis += 1;
            break;
        }
    }
    let millis = whole.checked_mul(1_000).and_then(|w| w.checked_add(millis)).ok_or_else(bad)?;
    // 1 sat/vB = 250 sat/kwu, so sat/kwu = millis / 4.
    Ok(FeeRate::from_sat_per_kwu(millis.div_ceil(4)))
}

impl Esplora {
    /// A client for the Esplora API at `url`: `http://127.0.0.1:3002/api`, or with the `tls`
    /// feature a public instance such as `https://blockstream.info/api` (Mozilla's roots).
    ///
    /// # Errors
    ///
    /// [`ChainError::Unavailable`] if the URL is not `http[s]://host[:port][/path]`, or is
    /// `https://` without the `tls` feature.
    ///
    /// # Examples
    ///
    /// ```
    /// use paychan::chain::esplora::Esplora;
    ///
    /// assert!(Esplora::new("http://127.0.0.1:3002/api").is_ok());
    /// assert!(Esplora::new("ftp://example.com").is_err());
    /// ```
    pub fn new(url: &str) -> Result<Self, ChainError> {
        let (target, base) = split_url(url)?;
        Ok(Self { target, base, package_relay: None })
    }

    /// Submits packages the server cannot take (no `POST /txs/package`) through `relay`, and
    /// reads the mempool minimum from it when it is a node.
    #[must_use]
    pub fn with_package_relay(mut self, relay: PackageRelay) -> Self {
        self.package_relay = Some(Box::new(relay));
        self
    }

    /// `POST /txs/package` on this server only: [`ChainError::Unsupported`] if it has no such
    /// endpoint.
    async fn submit_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> Result<Txid, ChainError> {
        let body = serde_json::json!([serialize_hex(parent), serialize_hex(child)]).to_string();
        let (status, answer) = self.request(Method::POST, "/txs/package", body).await?;
        let text = String::from_utf8_lossy(&answer);
        if no_such_endpoint(status, &text) {
            return Err(ChainError::Unsupported {
                message: format!("{} has no POST /txs/package (package relay)", self.base),
            });
        }
        if status == StatusCode::OK {
            let answer: Value = serde_json::from_slice(&answer).map_err(unavailable)?;
            return package_result(&answer, parent, child);
        }
        // Core's error for the whole call (electrs relays it in a 400 body).
        match relayed_error(&text) {
            Some((code, message)) if status.is_client_error() => {
                match map_broadcast_error(code, &message) {
                    BroadcastError::Rejected(reason) => Err(ChainError::rejected(reason, message)),
                    _ => Err(unavailable(format!("POST /txs/package: {message} ({code})"))),
                }
            }
            _ => Err(unavailable(format!("POST /txs/package: {status} {text}"))),
        }
    }

    /// Also trusts `der`, a DER-encoded root certificate (a private CA, or a test's), for an
    /// `https://` URL.
    ///
    /// # Errors
    ///
    /// [`ChainError::Unavailable`] if the URL is not `https://` or the certificate cannot be
    /// parsed.
    #[cfg(feature = "tls")]
    pub fn with_root_certificate(mut self, der: &[u8]) -> Result<Self, ChainError> {
        self.target.add_root_certificate(der)?;
        Ok(self)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), ChainError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(http::header::HOST, &self.target.authority)
            .body(Full::new(Bytes::from(body)))
            .map_err(unavailable)?;
        send(&self.target, request).await
    }

    /// A transaction the server has, confirmed or in its mempool.
    async fn status_of(&self, status: Status) -> Result<TxStatus, ChainError> {
        match (status.confirmed, status.block_height) {
            (true, Some(height)) => {
                let tip = self.tip().await?;
                Ok(TxStatus::Confirmed {
                    height,
                    confirmations: tip.height.saturating_sub(height) + 1,
                })
            }
            (true, None) => Err(unavailable("a confirmed status without a block height")),
            (false, _) => Ok(TxStatus::InMempool),
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, ChainError> {
        let (status, body) = self.request(Method::GET, path, String::new()).await?;
        match status {
            StatusCode::OK => serde_json::from_slice(&body).map(Some).map_err(unavailable),
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => Ok(None),
            other => Err(unavailable(format!("GET {path}: {other}"))),
        }
    }
}

impl ChainBackend for Esplora {
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        let txid = tx.compute_txid();
        let (status, body) = self.request(Method::POST, "/tx", serialize_hex(tx)).await?;
        if status.is_success() {
            return Ok(txid);
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        // Esplora relays Core's error: `sendrawtransaction RPC error: {"code":-26,"message":"…"}`
        // or `sendrawtransaction RPC error -26: …`.
        let (code, message) = match relayed_error(&text) {
            Some(error) => error,
            None if status.is_server_error() => {
                return Err(unavailable(format!("POST /tx: {status} {text}")));
            }
            None => (-22, text),
        };
        match map_broadcast_error(code, &message) {
            BroadcastError::AlreadyKnown => Ok(txid),
            BroadcastError::Rejected(reason) => Err(ChainError::rejected(reason, message)),
            BroadcastError::Other => Err(unavailable(format!("POST /tx: {message} ({code})"))),
        }
    }

    async fn tx_status(&self, txid: &Txid) -> Result<TxStatus, ChainError> {
        // Not `/tx/:txid/status` alone: electrs answers `{"confirmed":false}` there for a
        // transaction it never saw as for one in its mempool.
        let (status, body) =
            self.request(Method::GET, &format!("/tx/{txid}"), String::new()).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND if !no_such_endpoint(status, &String::from_utf8_lossy(&body)) => {
                return Ok(TxStatus::Unknown);
            }
            other => return Err(unavailable(format!("GET /tx/{txid}: {other}"))),
        }
        let tx: Value = serde_json::from_slice(&body).map_err(unavailable)?;
        let status = match tx.get("status") {
            Some(status) => Status::deserialize(status).map_err(unavailable)?,
            None => self
                .get_json::<Status>(&format!("/tx/{txid}/status"))
                .await?
                .ok_or_else(|| unavailable(format!("GET /tx/{txid}/status: none")))?,
        };
        self.status_of(status).await
    }

    async fn tip(&self) -> Result<ChainTip, ChainError> {
        let (status, hash) = self.request(Method::GET, "/blocks/tip/hash", String::new()).await?;
        if status != StatusCode::OK {
            return Err(unavailable(format!("GET /blocks/tip/hash: {status}")));
        }
        let hash = String::from_utf8_lossy(&hash).trim().to_owned();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unavailable(format!("not a block hash: {hash:?}")));
        }
        let block: Block = self
            .get_json(&format!("/block/{hash}"))
            .await?
            .ok_or_else(|| unavailable("the tip block is unknown"))?;
        Ok(ChainTip { height: block.height, median_time_past: block.mediantime })
    }

    async fn estimate_fee_rate(&self, target_blocks: u16) -> Result<FeeRate, ChainError> {
        let estimates: serde_json::Map<String, Value> = self
            .get_json("/fee-estimates")
            .await?
            .ok_or_else(|| unavailable("no fee estimates"))?;
        let best = estimates
            .iter()
            .filter_map(|(target, rate)| Some((target.parse::<u16>().ok()?, rate)))
            .filter(|(target, _)| *target <= target_blocks.max(1))
            .max_by_key(|(target, _)| *target)
            .ok_or_else(|| unavailable(format!("no fee estimate for {target_blocks} blocks")))?;
        match best.1 {
            Value::Number(n) => sat_per_vb(&n.to_string()),
            other => Err(unavailable(format!("not a fee rate: {other}"))),
        }
    }

    async fn unspent_outputs_of(
        &self,
        script: &bitcoin::Script,
    ) -> Result<Vec<(OutPoint, Utxo)>, ChainError> {
        #[derive(Deserialize)]
        struct Found {
            txid: Txid,
            vout: u32,
            value: u64,
            status: Status,
        }
        use bitcoin::hashes::{Hash, sha256};
        // Esplora's script hash: SHA-256 of the script, in byte order (not reversed).
        let hash = sha256::Hash::hash(script.as_bytes());
        let path = format!("/scripthash/{hash}/utxo");
        let outputs: Vec<Found> =
            self.get_json(&path).await?.ok_or_else(|| unavailable(format!("GET {path}: none")))?;
        let tip = self.tip().await?.height;
        Ok(outputs
            .into_iter()
            .map(|found| {
                let depth = match found.status.block_height {
                    Some(height) if found.status.confirmed => (tip + 1).saturating_sub(height),
                    _ => 0,
                };
                let value = bitcoin::Amount::from_sat(found.value);
                let output = TxOut { value, script_pubkey: script.to_owned() };
                (OutPoint::new(found.txid, found.vout), Utxo::new(output, depth))
            })
            .collect())
    }

    async fn unspent(&self, outpoint: &OutPoint) -> Result<Option<Utxo>, ChainError> {
        let Some(tx) = self.get_json::<Value>(&format!("/tx/{}", outpoint.txid)).await? else {
            return Ok(None);
        };
        let Some(output) = tx["vout"].get(outpoint.vout as usize) else { return Ok(None) };
        let spend: Value = self
            .get_json(&format!("/tx/{}/outspend/{}", outpoint.txid, outpoint.vout))
            .await?
            .ok_or_else(|| unavailable("no outspend answer"))?;
        if spend["spent"].as_bool() != Some(false) {
            return Ok(None);
        }
        let value = output["value"].as_u64().ok_or_else(|| unavailable("vout has no value"))?;
        let script = output["scriptpubkey"]
            .as_str()
            .ok_or_else(|| unavailable("vout has no scriptpubkey"))?;
        let output = TxOut {
            value: bitcoin::Amount::from_sat(value),
            script_pubkey: ScriptBuf::from_hex(script).map_err(unavailable)?,
        };
        let status = match tx.get("status") {
            Some(status) => Status::deserialize(status).map_err(unavailable)?,
            None => self
                .get_json::<Status>(&format!("/tx/{}/status", outpoint.txid))
                .await?
                // The transaction was just served, its status is not: a lagging or
                // load-balanced instance, not an unconfirmed funding.
                .ok_or_else(|| unavailable(format!("{}: no status", outpoint.txid)))?,
        };
        let confirmations = match self.status_of(status).await? {
            TxStatus::Confirmed { confirmations, .. } => confirmations,
            _ => 0,
        };
        let coinbase = tx["vin"][0]["is_coinbase"].as_bool().unwrap_or(false);
        Ok(Some(Utxo::new(output, confirmations).with_coinbase(coinbase)))
    }

    async fn broadcast_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> Result<Txid, ChainError> {
        let result = match (self.submit_package(parent, child).await, &self.package_relay) {
            (Err(error), Some(relay)) if error.is_unsupported() => {
                relay.broadcast_package(parent, child).await
            }
            (result, _) => result,
        };
        if result.is_ok() {
            // electrs indexes what reached its node some other way than its own `POST /tx`
            // (a package, through its endpoint or the relay) only at its next poll of the
            // node, up to seconds later (docs/ESPLORA-RUN.md): a settlement pass in between
            // would read the close as unknown and send it again. Both electrs index what
            // `POST /tx` accepted at once, and the node answers "already in the mempool":
            // what these two answer does not matter.
            let _indexed = self.broadcast(parent).await;
            let _indexed = self.broadcast(child).await;
        }
        result
    }

    /// `true` with a [`PackageRelay`]; else whether the server has `POST /txs/package` (asked
    /// with an empty package, which a server with the endpoint refuses otherwise than 404).
    async fn has_package_relay(&self) -> Result<bool, ChainError> {
        if self.package_relay.is_some() {
            return Ok(true);
        }
        let (status, body) = self.request(Method::POST, "/txs/package", "[]".into()).await?;
        Ok(!no_such_endpoint(status, &String::from_utf8_lossy(&body)))
    }

    /// The network whose genesis block is the server's block 0 (`GET /block-height/0`).
    /// Every signet, custom ones included, shares the default signet's genesis block: a
    /// custom signet reads [`Network::Signet`]. A genesis block of no [`Network`] is refused
    /// ([`ChainError::Unavailable`]).
    async fn network(&self) -> Result<Network, ChainError> {
        let (status, body) = self.request(Method::GET, "/block-height/0", String::new()).await?;
        let text = String::from_utf8_lossy(&body);
        if status != StatusCode::OK {
            return Err(unavailable(format!("GET /block-height/0: {status} {}", text.trim())));
        }
        let genesis: BlockHash = text
            .trim()
            .parse()
            .map_err(|e| unavailable(format!("GET /block-height/0: not a block hash ({e})")))?;
        genesis_network(genesis)
    }

    /// The node's `mempoolminfee` when the [`PackageRelay`] is one. Esplora itself does not
    /// tell its node's mempool minimum: [`ChainError::Unsupported`]. (Its fee estimates are
    /// not one: the lowest estimate sits above the minimum whenever blocks clear above it, and
    /// a server could answer any number; closing every channel early on them would be a
    /// denial of the operator's revenue.)
    async fn mempool_min_fee_rate(&self) -> Result<FeeRate, ChainError> {
        #[cfg(feature = "bitcoind")]
        if let Some(PackageRelay::Bitcoind(rpc)) = self.package_relay.as_deref() {
            return rpc.mempool_min_fee_rate().await;
        }
        Err(ChainError::Unsupported {
            message: "Esplora does not report its node's mempool minimum: configure a Bitcoin \
                      Core relay (Esplora::with_package_relay) for early closes"
                .to_owned(),
        })
    }
}

/// The network whose genesis block is `genesis`.
fn genesis_network(genesis: BlockHash) -> Result<Network, ChainError> {
    const NETWORKS: [Network; 5] =
        [Network::Bitcoin, Network::Testnet, Network::Testnet4, Network::Signet, Network::Regtest];
    NETWORKS
        .into_iter()
        .find(|network| bitcoin::constants::genesis_block(*network).block_hash() == genesis)
        .ok_or_else(|| {
            unavailable(format!(
                "the Esplora server's genesis block {genesis} is none of bitcoin's, testnet's, \
                 testnet4's, signet's and regtest's"
            ))
        })
}

/// electrs's answer to a route it does not have: `404 endpoint does not exist "/…"`
/// (`src/rest.rs`, the router's last arm); a 404 for a missing transaction says
/// `Transaction not found`.
fn no_such_endpoint(status: StatusCode, body: &str) -> bool {
    (status == StatusCode::NOT_FOUND && body.contains("endpoint does not exist"))
        || status == StatusCode::METHOD_NOT_ALLOWED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_hashes_name_their_network() {
        // The genesis hashes as explorers print them (reversed byte order).
        for (hash, network) in [
            ("000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f", Network::Bitcoin),
            ("000000000933ea01ad0ee984209779baaec3ced90fa3f408719526f8d77f4943", Network::Testnet),
            ("00000000da84f2bafbbc53dee25a72ae507ff4914b867c565be350b0da8bf043", Network::Testnet4),
            ("00000008819873e925422c1ff0f99f7cc9bbb232af63a077a480a3633bee1ef6", Network::Signet),
            ("0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206", Network::Regtest),
        ] {
            assert_eq!(genesis_network(hash.parse().unwrap()), Ok(network), "{hash}");
        }
        let other = "00".repeat(32).parse().unwrap();
        assert!(genesis_network(other).unwrap_err().to_string().contains(&"00".repeat(32)));
    }

    #[test]
    fn fee_rates_parse_exactly_and_round_up() {
        assert_eq!(sat_per_vb("1").unwrap(), FeeRate::from_sat_per_kwu(250));
        assert_eq!(sat_per_vb("87.882").unwrap(), FeeRate::from_sat_per_kwu(21_971)); // 87 882 / 4 = 21 970.5
        assert_eq!(sat_per_vb("2.0001").unwrap(), FeeRate::from_sat_per_kwu(501));
        assert_eq!(sat_per_vb("0.25").unwrap(), FeeRate::from_sat_per_kwu(63));
        for bad in ["", "x", "1.a", "-1", "1e3"] {
            assert!(sat_per_vb(bad).is_err(), "{bad}");
        }
    }
}
