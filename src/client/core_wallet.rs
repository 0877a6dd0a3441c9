//! [`CoreWallet`]: Bitcoin Core's wallet funds the channels.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bitcoin::{Address, Amount, Denomination, FeeRate, Network, Psbt, TxOut};
use serde_json::{Value, json};

use super::steps::StepError;
use super::{Wallet, WalletError, WalletFuture};
use crate::chain::ChainError;
use crate::chain::bitcoind::BitcoindRpc;

/// A [`Wallet`] backed by a Bitcoin Core wallet over JSON-RPC (feature `bitcoind`): point the
/// [`BitcoindRpc`] at the wallet's endpoint (`http://host:port/wallet/<name>`).
///
/// | step | RPC |
/// |---|---|
/// | [`fund`](Wallet::fund) | `walletcreatefundedpsbt` at the fee rate the client accepted, not replaceable (a server serves zero-confirmation channels only from fundings that do not signal RBF), its coins locked |
/// | [`sign`](Wallet::sign) | `walletprocesspsbt` (sign and finalise every input; an incomplete signature is an error) |
/// | [`release`](Wallet::release) | `lockunspent` to unlock the coins of an abandoned funding |
///
/// The client checks what the wallet built: the channel output paid exactly once, native
/// SegWit inputs only, and a signed transaction whose id did not change.
///
/// # Examples
///
/// ```no_run
/// use paychan::bitcoin::Network;
/// use paychan::chain::bitcoind::{Auth, BitcoindRpc};
/// use paychan::client::CoreWallet;
///
/// let rpc = BitcoindRpc::new("http://127.0.0.1:8332/wallet/spending", Auth::CookieFile("/home/me/.bitcoin/.cookie".into()))?;
/// let wallet = CoreWallet::new(rpc, Network::Bitcoin);
/// # Ok::<(), paychan::chain::ChainError>(())
/// ```
#[derive(Debug, Clone)]
pub struct CoreWallet {
    rpc: BitcoindRpc,
    network: Network,
}

impl CoreWallet {
    /// The wallet behind `rpc`, on `network` (the channel output is given to Core as an
    /// address of that network).
    pub fn new(rpc: BitcoindRpc, network: Network) -> Self {
        Self { rpc, network }
    }

    /// Core's "Insufficient funds", with what the wallet has (`getbalances`, its trusted
    /// coins: confirmed, and its own unconfirmed change) and what the channel needs, as
    /// [`KeyWallet`](super::KeyWallet) says it; Core's words if the balance cannot be read.
    async fn insufficient(&self, needed: Amount, error: ChainError) -> WalletError {
        let balances = self.rpc.call_ok("getbalances", json!([])).await;
        // An f64 of BTC (8 decimals) reads back exactly.
        let trusted = balances
            .ok()
            .and_then(|balances| balances["mine"]["trusted"].as_f64())
            .and_then(|btc| Amount::from_btc(btc).ok());
        match trusted {
            Some(available) => WalletError::new(StepError::InsufficientFunds { available, needed }),
            None => WalletError::new(error),
        }
    }
}

fn psbt_from(answer: &Value) -> Result<Psbt, WalletError> {
    let encoded =
        answer["psbt"].as_str().ok_or_else(|| WalletError::new("no psbt in the answer"))?;
    let bytes = STANDARD.decode(encoded).map_err(WalletError::new)?;
    Psbt::deserialize(&bytes).map_err(WalletError::new)
}

impl Wallet for CoreWallet {
    fn fund(&self, output: TxOut, fee_rate: FeeRate) -> WalletFuture<'_, Psbt> {
        Box::pin(async move {
            let address = Address::from_script(&output.script_pubkey, self.network)
                .map_err(WalletError::new)?;
            let amount = output.value.to_string_in(Denomination::Bitcoin);
            let options = json!({
                "fee_rate": fee_rate.to_sat_per_vb_ceil(),
                "lockUnspents": true,
                "replaceable": false,
                "add_inputs": true,
            });
            let params = json!([[], [{ address.to_string(): amount }], 0, options, true]);
            let answer = match self.rpc.call_ok("walletcreatefundedpsbt", params).await {
                Ok(answer) => answer,
                Err(error) if error.to_string().contains("Insufficient funds") => {
                    return Err(self.insufficient(output.value, error).await);
                }
                Err(error) => return Err(WalletError::new(error)),
            };
            psbt_from(&answer)
        })
    }

    fn sign(&self, psbt: Psbt) -> WalletFuture<'_, Psbt> {
        Box::pin(async move {
            let params = json!([STANDARD.encode(psbt.serialize()), true, "ALL", true, true]);
            let answer =
                self.rpc.call_ok("walletprocesspsbt", params).await.map_err(WalletError::new)?;
            if answer["complete"].as_bool() != Some(true) {
                return Err(WalletError::new("Bitcoin Core could not sign every input"));
            }
            psbt_from(&answer)
        })
    }

    fn release(&self, psbt: &Psbt) {
        let outpoints: Vec<Value> = psbt
            .unsigned_tx
            .input
            .iter()
            .map(|input| {
                json!({ "txid": input.previous_output.txid.to_string(), "vout": input.previous_output.vout })
            })
            .collect();
        let rpc = self.rpc.clone();
        // Called on the async path that abandoned the funding: unlock in the background.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = rpc.call_ok("lockunspent", json!([true, outpoints])).await {
                    tracing::warn!(%error, "could not unlock the coins of an abandoned funding");
                }
            });
        }
    }
}
