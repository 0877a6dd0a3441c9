//! [`BitcoindRpc`]: a [`ChainBackend`] over Bitcoin Core's JSON-RPC interface.

use std::path::PathBuf;
use std::str::FromStr;

use base64::Engine as _;
use bitcoin::consensus::encode::serialize_hex;
use bitcoin::{
    Amount, Denomination, FeeRate, Network, OutPoint, ScriptBuf, Transaction, TxOut, Txid,
};
use http::{Request, header};
use http_body_util::Full;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ChainBackend, ChainError, ChainTip, TxStatus, Utxo};

/// How to authenticate to Bitcoin Core.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Auth {
    /// The `.cookie` file Bitcoin Core writes in its data directory (read on every call, so a
    /// node restart that rotates the cookie is picked up).
    CookieFile(PathBuf),
    /// `rpcuser` / `rpcpassword` (or an `rpcauth` line's credentials).
    UserPass(String, String),
}

/// Bitcoin Core's JSON-RPC interface as a [`ChainBackend`].
///
/// | method | RPC |
/// |---|---|
/// | [`broadcast`](ChainBackend::broadcast) | `sendrawtransaction` (already in the mempool: success) |
/// | [`tx_status`](ChainBackend::tx_status) | `getrawtransaction` verbose (a confirmed transaction is found only with `-txindex`: the crate never relies on it) |
/// | [`tip`](ChainBackend::tip) | `getblockchaininfo` (`blocks`, `mediantime`) |
/// | [`estimate_fee_rate`](ChainBackend::estimate_fee_rate) | `estimatesmartfee` |
/// | [`unspent`](ChainBackend::unspent) | `gettxout` with the mempool (no index needed) |
/// | [`unspent_outputs_of`](ChainBackend::unspent_outputs_of) | `scantxoutset` (the UTXO set: confirmed outputs; no index or wallet needed) |
/// | [`broadcast_package`](ChainBackend::broadcast_package) | `submitpackage` (Core 28 or later) |
/// | [`min_relay_fee_rate`](ChainBackend::min_relay_fee_rate) | `getmempoolinfo` (`minrelaytxfee`) |
/// | [`mempool_min_fee_rate`](ChainBackend::mempool_min_fee_rate) | `getmempoolinfo` (`mempoolminfee`) |
/// | [`network`](ChainBackend::network) | `getblockchaininfo` (`chain`: `main`, `test`, `testnet4`, `signet`, `regtest`) |
///
/// Rejections are mapped from Core's error codes and reject reasons: `-26` policy and
/// consensus rejections (`non-final`, `non-BIP68-final`, `min relay fee not met`, `dust`,
/// `txn-mempool-conflict`, `mandatory-script-verify-flag-failed`, …), `-25` missing inputs and
/// `max-fee-exceeded`, `-27` already in a block. Amounts in Core's JSON are decimal BTC and are
/// parsed exactly, never through a float.
#[derive(Debug, Clone)]
pub struct BitcoindRpc {
    target: Target,
    path: String,
    auth: Auth,
}

#[derive(Debug, Deserialize)]
struct RpcResponse {
    result: Option<Value>,
    error: Option<RpcError>,
}

#[derive(Debug, Deserialize)]
struct RpcError {
    code: i64,
    message: String,
}

use super::core_reject::{BroadcastError, map_broadcast_error, package_result};
use super::http::{Target, send, split_url, unavailable};

/// Parses one of Core's decimal BTC amounts exactly.
fn btc(value: &Value) -> Result<Amount, ChainError> {
    let text = match value {
        // serde_json prints small numbers in exponent form (0.000005 as "5e-6").
        Value::Number(n) => positional(&n.to_string()),
        Value::String(s) => s.clone(),
        other => return Err(unavailable(format!("expected an amount, got {other}"))),
    };
    Amount::from_str_in(&text, Denomination::Bitcoin)
        .map_err(|e| unavailable(format!("amount {text}: {e}")))
}

/// Writes a decimal number given in exponent form (`1.5e-6`) positionally (`0.0000015`),
/// digit for digit; other text is returned as it is.
fn positional(number: &str) -> String {
    let Some((mantissa, exponent)) = number.split_once(['e', 'E']) else {
        return number.to_owned();
    };
    let Ok(exponent) = exponent.parse::<i32>() else { return number.to_owned() };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{whole}{fraction}");
    // Where the decimal point falls in `digits`.
    let point = whole.len() as i64 + i64::from(exponent);
    let text = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        let (left, right) = digits.split_at(point as usize);
        format!("{left}.{right}")
    };
    format!("{sign}{text}")
}

impl BitcoindRpc {
    /// A client for the node at `url` (`http://host:port`, optionally with a `/wallet/<name>`
    /// path; `https://` with the `tls` feature, for a node behind a TLS-terminating proxy).
    ///
    /// # Errors
    ///
    /// [`ChainError::Unavailable`] if the URL is not `http[s]://host[:port][/path]`.
    pub fn new(url: &str, auth: Auth) -> Result<Self, ChainError> {
        let (target, path) = split_url(url)?;
        let path = if path.is_empty() { "/".to_owned() } else { path };
        Ok(Self { target, path, auth })
    }

    /// Also trusts `der`, a DER-encoded root certificate, for an `https://` URL (a node behind
    /// a TLS-terminating proxy with a private CA).
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

    fn credentials(&self) -> Result<String, ChainError> {
        let pair = match &self.auth {
            Auth::UserPass(user, pass) => format!("{user}:{pass}"),
            Auth::CookieFile(path) => std::fs::read_to_string(path)
                .map_err(|e| unavailable(format!("cookie file {}: {e}", path.display())))?
                .trim()
                .to_owned(),
        };
        Ok(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
    }

    /// Calls `method` with `params`; `Err(Ok((code, message)))` is an RPC error from Core.
    async fn call(
        &self,
        method: &str,
        params: Value,
    ) -> Result<Result<Value, (i64, String)>, ChainError> {
        let body = json!({ "jsonrpc": "1.0", "id": "paychan", "method": method, "params": params });
        let request = Request::post(&self.path)
            .header(header::HOST, &self.target.authority)
            .header(header::AUTHORIZATION, self.credentials()?)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(unavailable)?;
        let (status, bytes) = send(&self.target, request).await?;
        if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
            return Err(unavailable(format!("Bitcoin Core refused the credentials ({status})")));
        }
        // Core answers RPC errors with 404/500 and a JSON body; anything else is a failure.
        let parsed: RpcResponse = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("{status}: not a JSON-RPC answer ({e})")))?;
        match (parsed.error, parsed.result) {
            (Some(error), _) => Ok(Err((error.code, error.message))),
            (None, result) => Ok(Ok(result.unwrap_or(Value::Null))),
        }
    }

    pub(crate) async fn call_ok(&self, method: &str, params: Value) -> Result<Value, ChainError> {
        self.call(method, params)
            .await?
            .map_err(|(code, message)| unavailable(format!("{method}: {message} ({code})")))
    }
}

impl ChainBackend for BitcoindRpc {
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        let txid = tx.compute_txid();
        match self.call("sendrawtransaction", json!([serialize_hex(tx)])).await? {
            Ok(_) => Ok(txid),
            Err((code, message)) => match map_broadcast_error(code, &message) {
                BroadcastError::AlreadyKnown => Ok(txid),
                BroadcastError::Rejected(reason) => Err(ChainError::rejected(reason, message)),
                BroadcastError::Other => {
                    Err(unavailable(format!("sendrawtransaction: {message} ({code})")))
                }
            },
        }
    }

    async fn tx_status(&self, txid: &Txid) -> Result<TxStatus, ChainError> {
        match self.call("getrawtransaction", json!([txid.to_string(), true])).await? {
            Err((-5, _)) => Ok(TxStatus::Unknown),
            Err((code, message)) => {
                Err(unavailable(format!("getrawtransaction: {message} ({code})")))
            }
            Ok(tx) => match tx.get("confirmations").and_then(Value::as_u64) {
                Some(confirmations) if confirmations > 0 => {
                    let tip = self.tip().await?;
                    let confirmations = u32::try_from(confirmations).map_err(unavailable)?;
                    Ok(TxStatus::Confirmed {
                        height: tip.height + 1 - confirmations,
                        confirmations,
                    })
                }
                _ => Ok(TxStatus::InMempool),
            },
        }
    }

    async fn tip(&self) -> Result<ChainTip, ChainError> {
        let info = self.call_ok("getblockchaininfo", json!([])).await?;
        let field = |name: &str| {
            info.get(name)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| unavailable(format!("getblockchaininfo has no {name}")))
        };
        Ok(ChainTip { height: field("blocks")?, median_time_past: field("mediantime")? })
    }

    async fn estimate_fee_rate(&self, target_blocks: u16) -> Result<FeeRate, ChainError> {
        let estimate = self.call_ok("estimatesmartfee", json!([target_blocks])).await?;
        let per_kvb = estimate.get("feerate").ok_or_else(|| {
            unavailable(format!(
                "estimatesmartfee has no estimate: {}",
                estimate.get("errors").unwrap_or(&Value::Null)
            ))
        })?;
        // BTC per 1 000 vbytes → sat per 1 000 weight units (÷ 4), rounded up.
        let sat_per_kvb = btc(per_kvb)?.to_sat();
        Ok(FeeRate::from_sat_per_kwu(sat_per_kvb.div_ceil(4)))
    }

    async fn unspent(&self, outpoint: &OutPoint) -> Result<Option<Utxo>, ChainError> {
        let out = self
            .call_ok("gettxout", json!([outpoint.txid.to_string(), outpoint.vout, true]))
            .await?;
        if out.is_null() {
            return Ok(None);
        }
        let value = btc(out.get("value").ok_or_else(|| unavailable("gettxout has no value"))?)?;
        let script = out
            .get("scriptPubKey")
            .and_then(|s| s.get("hex"))
            .and_then(Value::as_str)
            .ok_or_else(|| unavailable("gettxout has no scriptPubKey.hex"))?;
        let script_pubkey = ScriptBuf::from_hex(script).map_err(unavailable)?;
        let confirmations = out
            .get("confirmations")
            .and_then(Value::as_u64)
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| unavailable("gettxout has no confirmations"))?;
        let coinbase = out.get("coinbase").and_then(Value::as_bool).unwrap_or(false);
        Ok(Some(Utxo::new(TxOut { value, script_pubkey }, confirmations).with_coinbase(coinbase)))
    }

    async fn unspent_outputs_of(
        &self,
        script: &bitcoin::Script,
    ) -> Result<Vec<(OutPoint, Utxo)>, ChainError> {
        let descriptor = format!("raw({})", script.to_hex_string());
        let scan = self.call_ok("scantxoutset", json!(["start", [descriptor]])).await?;
        let field = |v: &Value, name: &str| {
            v.get(name).cloned().ok_or_else(|| unavailable(format!("scantxoutset: no {name}")))
        };
        let number = |v: &Value, name: &str| {
            field(v, name)?
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| unavailable(format!("scantxoutset: {name} is not a height")))
        };
        let tip = number(&scan, "height")?;
        let unspents = field(&scan, "unspents")?;
        let unspents = unspents.as_array().ok_or_else(|| unavailable("unspents is not a list"))?;
        let mut found = Vec::with_capacity(unspents.len());
        for unspent in unspents {
            let txid = field(unspent, "txid")?;
            let txid = txid.as_str().and_then(|t| Txid::from_str(t).ok());
            let txid = txid.ok_or_else(|| unavailable("scantxoutset: bad txid"))?;
            let outpoint = OutPoint::new(txid, number(unspent, "vout")?);
            let value = btc(&field(unspent, "amount")?)?;
            let depth = (tip + 1).saturating_sub(number(unspent, "height")?);
            let output = TxOut { value, script_pubkey: script.to_owned() };
            found.push((outpoint, Utxo::new(output, depth)));
        }
        Ok(found)
    }

    async fn min_relay_fee_rate(&self) -> Result<FeeRate, ChainError> {
        let info = self.call_ok("getmempoolinfo", json!([])).await?;
        let per_kvb = info
            .get("minrelaytxfee")
            .ok_or_else(|| unavailable("getmempoolinfo: no minrelaytxfee"))?;
        // BTC per 1 000 vbytes → sat per 1 000 weight units (÷ 4), rounded up.
        Ok(FeeRate::from_sat_per_kwu(btc(per_kvb)?.to_sat().div_ceil(4)))
    }

    async fn broadcast_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> Result<Txid, ChainError> {
        let package = json!([[serialize_hex(parent), serialize_hex(child)]]);
        let answer = match self.call("submitpackage", package).await? {
            Ok(answer) => answer,
            Err((code, message)) => {
                return Err(match map_broadcast_error(code, &message) {
                    BroadcastError::Rejected(reason) => ChainError::rejected(reason, message),
                    _ => unavailable(format!("submitpackage: {message} ({code})")),
                });
            }
        };
        package_result(&answer, parent, child)
    }

    async fn has_package_relay(&self) -> Result<bool, ChainError> {
        Ok(true)
    }

    /// `getblockchaininfo`'s `chain`, as Core names it (`-chain=`): `main`, `test` (testnet3),
    /// `testnet4`, `signet` (custom signets too) or `regtest`. Any other name is refused
    /// ([`ChainError::Unavailable`]), never mapped to the nearest network.
    async fn network(&self) -> Result<Network, ChainError> {
        let info = self.call_ok("getblockchaininfo", json!([])).await?;
        let chain = info
            .get("chain")
            .and_then(Value::as_str)
            .ok_or_else(|| unavailable("getblockchaininfo has no chain"))?;
        core_network(chain)
    }

    async fn mempool_min_fee_rate(&self) -> Result<FeeRate, ChainError> {
        let info = self.call_ok("getmempoolinfo", json!([])).await?;
        let per_kvb = info
            .get("mempoolminfee")
            .ok_or_else(|| unavailable("getmempoolinfo: no mempoolminfee"))?;
        // BTC per 1 000 vbytes → sat per 1 000 weight units (÷ 4), rounded up.
        Ok(FeeRate::from_sat_per_kwu(btc(per_kvb)?.to_sat().div_ceil(4)))
    }
}

/// The network of a chain Bitcoin Core names `chain` (`getblockchaininfo`, `-chain=`).
fn core_network(chain: &str) -> Result<Network, ChainError> {
    Network::from_core_arg(chain).map_err(|_| {
        unavailable(format!(
            "Bitcoin Core is on chain {chain:?}, none of main, test, testnet4, signet and regtest"
        ))
    })
}

impl FromStr for Auth {
    type Err = ChainError;

    /// Parses `user:password`, or `cookie:<path>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("cookie:") {
            return Ok(Self::CookieFile(PathBuf::from(path)));
        }
        let (user, pass) = s
            .split_once(':')
            .ok_or_else(|| unavailable("expected user:password or cookie:<path>"))?;
        Ok(Self::UserPass(user.to_owned(), pass.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amounts_exactly() {
        assert_eq!(btc(&json!(0.00012345)).unwrap(), Amount::from_sat(12_345));
        assert_eq!(
            btc(&serde_json::from_str::<Value>("20999999.97690000").unwrap()).unwrap().to_sat(),
            2_099_999_997_690_000
        );
        assert!(btc(&json!("abc")).is_err());
        // Amounts below 0.0001 BTC come in exponent form from serde_json.
        assert_eq!(json!(0.000005).to_string(), "5e-6");
        assert_eq!(btc(&json!(0.000005)).unwrap(), Amount::from_sat(500));
        assert_eq!(btc(&json!(0.0000123)).unwrap(), Amount::from_sat(1_230));
        assert_eq!(btc(&json!(0.00000001)).unwrap(), Amount::ONE_SAT);
        assert_eq!(positional("2.5e3"), "2500");
        assert_eq!(positional("1.25e1"), "12.5");
        assert_eq!(positional("-1e-2"), "-0.01");
        assert!(btc(&json!(0.000000001)).is_err(), "more precision than a satoshi is refused");
    }

    #[test]
    fn maps_cores_chain_names_and_refuses_others() {
        for (name, network) in [
            ("main", Network::Bitcoin),
            ("test", Network::Testnet),
            ("testnet4", Network::Testnet4),
            ("signet", Network::Signet),
            ("regtest", Network::Regtest),
        ] {
            assert_eq!(core_network(name), Ok(network), "{name}");
        }
        for unknown in ["bitcoin", "mainnet", "testnet", "testnet5", "Main", ""] {
            let error = core_network(unknown).unwrap_err();
            assert!(!error.is_unsupported() && error.to_string().contains(unknown), "{error}");
        }
    }

    #[test]
    fn parses_urls_and_auth() {
        let rpc = BitcoindRpc::new(
            "http://127.0.0.1:18443/wallet/w",
            Auth::UserPass("u".into(), "p".into()),
        )
        .unwrap();
        assert_eq!(
            (rpc.target.authority.as_str(), rpc.path.as_str()),
            ("127.0.0.1:18443", "/wallet/w")
        );
        let auth = || Auth::UserPass("u".into(), "p".into());
        // https:// only with the `tls` feature; other schemes never.
        assert_eq!(BitcoindRpc::new("https://x:1", auth()).is_ok(), cfg!(feature = "tls"));
        assert!(BitcoindRpc::new("ftp://x:1", auth()).is_err());
        assert!(BitcoindRpc::new("http://", auth()).is_err());
        assert_eq!(
            "cookie:/tmp/.cookie".parse::<Auth>().unwrap(),
            Auth::CookieFile("/tmp/.cookie".into())
        );
        assert_eq!("a:b:c".parse::<Auth>().unwrap(), Auth::UserPass("a".into(), "b:c".into()));
    }
}
