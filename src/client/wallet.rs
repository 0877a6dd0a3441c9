use core::fmt;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::chain::{ChainBackend, ChainError};
use bitcoin::secp256k1::SecretKey;
use bitcoin::{
    Amount, CompressedPublicKey, FeeRate, OutPoint, Psbt, ScriptBuf, Transaction, TxOut,
};

/// The future a [`Wallet`] returns.
pub type WalletFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, WalletError>> + Send + 'a>>;

/// Where the coins of a channel's funding transaction T1 come from.
///
/// Funding goes through a PSBT (BIP-0174) in two steps, so any wallet can take part — Bitcoin
/// Core (`walletcreatefundedpsbt`, then `walletprocesspsbt`), BDK, a hardware signer, or
/// [`KeyWallet`]:
///
/// 1. [`fund`](Self::fund) returns an **unsigned** transaction paying the channel output, with
///    its inputs chosen and a change output added, as a PSBT whose inputs carry their
///    `witness_utxo`. The client has the server sign the refund T2 against this transaction.
/// 2. Only once the client holds a valid refund, [`sign`](Self::sign) gets the PSBT back and
///    returns it with every input finalised.
///
/// Every input must be native SegWit: signing must not change the transaction id the refund
/// spends. The client checks this, and that the signed transaction is the unsigned one.
pub trait Wallet: Send + Sync + fmt::Debug {
    /// An unsigned transaction paying `output`, at `fee_rate` or more.
    fn fund(&self, output: TxOut, fee_rate: FeeRate) -> WalletFuture<'_, Psbt>;

    /// Signs and finalises every input of `psbt`.
    fn sign(&self, psbt: Psbt) -> WalletFuture<'_, Psbt>;

    /// Gives back the coins of a funding [`fund`](Self::fund) built and the client abandoned
    /// without asking for signatures (the server refused, or its refund signature was wrong).
    /// The default does nothing.
    fn release(&self, psbt: &Psbt) {
        let _ = psbt;
    }

    /// The funding `psbt` (signed) was handed to the server, which did not acknowledge it
    /// (`/fund` failed or timed out): the server may broadcast it at any time, or never.
    ///
    /// A wallet should then not count the funding's change as a coin, and should spend at
    /// least one of its inputs in every later funding until one is acknowledged
    /// ([`funding_acknowledged`](Self::funding_acknowledged)), so that at most one of them
    /// can confirm. [`KeyWallet`] does. The payer checks it either way: it signs no funding
    /// that could confirm beside one in doubt. The default does nothing (such a wallet
    /// cannot fund again until the funding in doubt is seen on the chain or conflicted).
    fn funding_in_doubt(&self, psbt: &Psbt) {
        let _ = psbt;
    }

    /// The server acknowledged the funding `tx` (its `/fund` answered): the fundings in
    /// doubt it conflicts with can only confirm if it does not. The default does nothing.
    fn funding_acknowledged(&self, tx: &Transaction) {
        let _ = tx;
    }
}

/// A wallet failed to fund or sign: what it reported. Implementers of [`Wallet`] build it with
/// `WalletError::new(error_or_message)`.
pub type WalletError = crate::BackendError;

/// A wallet of P2WPKH coins of one key, given to it as outputs: enough for tests, demos and a
/// service that keeps a hot float for its channels.
///
/// It chooses the largest coins first, adds a change output back to its key unless the change
/// would be dust, and reserves the coins it chose (they are not offered twice). Once it signed
/// a funding transaction, its change output becomes a coin of the wallet — unless the funding
/// is [in doubt](Wallet::funding_in_doubt): then its change is no coin, and every later
/// funding spends one input of it (before any other coin) until a funding is acknowledged,
/// so that at most one of them can confirm. It keeps that in memory only: a new `KeyWallet`
/// knows no funding in doubt, and the payer then opens no channel until its chain view shows
/// the funding in doubt broadcast or conflicted (see
/// [`ClientChannel::unacknowledged_funding`](crate::client::ClientChannel::unacknowledged_funding)).
///
/// # Examples
///
/// ```
/// use bitcoin::secp256k1::SecretKey;
/// use bitcoin::{Amount, FeeRate, OutPoint, ScriptBuf, TxOut};
/// use paychan::client::{KeyWallet, Wallet};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = SecretKey::from_slice(&[7; 32])?;
/// let wallet = KeyWallet::new(key);
/// let coin = TxOut { value: Amount::from_sat(50_000), script_pubkey: wallet.script_pubkey() };
/// wallet.add_coin(OutPoint::default(), coin);
///
/// let pay = TxOut { value: Amount::from_sat(20_000), script_pubkey: ScriptBuf::new_op_return([]) };
/// let psbt = wallet.fund(pay, FeeRate::from_sat_per_vb_u32(2)).await?;
/// assert_eq!(psbt.unsigned_tx.output.len(), 2); // the payment and the change
/// let signed = wallet.sign(psbt).await?;
/// assert!(signed.inputs[0].final_script_witness.is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyWallet {
    key: SecretKey,
    public: CompressedPublicKey,
    coins: Arc<Mutex<Coins>>,
}

/// The wallet's coins, and those it chose for a funding (reserved or spent): a
/// [`sync`](KeyWallet::sync) does not bring them back while the chain still reports them.
#[derive(Debug, Default)]
struct Coins {
    unspent: Vec<(OutPoint, TxOut)>,
    used: HashSet<OutPoint>,
    /// The inputs of each signed funding in doubt (in `used`, not in `unspent`): every new
    /// funding spends one of each, until a funding is acknowledged.
    in_doubt: Vec<Vec<(OutPoint, TxOut)>>,
}

impl fmt::Debug for KeyWallet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyWallet")
            .field("public", &self.public)
            .field("balance", &self.balance())
            .finish_non_exhaustive()
    }
}

impl KeyWallet {
    /// An empty wallet of `key`.
    pub fn new(key: SecretKey) -> Self {
        let public = crate::channel::sig::public_key(&key);
        Self { key, public, coins: Arc::default() }
    }

    /// The script of the wallet's coins (P2WPKH of its key).
    pub fn script_pubkey(&self) -> ScriptBuf {
        ScriptBuf::new_p2wpkh(&self.public.wpubkey_hash())
    }

    /// The address of the wallet's coins on `network`: where to send it money.
    ///
    /// # Examples
    ///
    /// ```
    /// use paychan::bitcoin::{Network, secp256k1::SecretKey};
    /// use paychan::client::KeyWallet;
    ///
    /// let wallet = KeyWallet::new(SecretKey::from_slice(&[9; 32]).unwrap());
    /// let address = wallet.address(Network::Regtest);
    /// assert!(address.to_string().starts_with("bcrt1q"));
    /// assert_eq!(address.script_pubkey(), wallet.script_pubkey());
    /// ```
    pub fn address(&self, network: bitcoin::Network) -> bitcoin::Address {
        bitcoin::Address::p2wpkh(&self.public, network)
    }

    /// Adds a coin; it must pay [`script_pubkey`](Self::script_pubkey).
    pub fn add_coin(&self, outpoint: OutPoint, output: TxOut) {
        let mut coins = self.coins();
        if !coins.unspent.iter().any(|(known, _)| *known == outpoint) {
            coins.unspent.push((outpoint, output));
        }
    }

    /// Finds the wallet's coins through `chain` instead of being handed them: adds every
    /// unspent output paying [`script_pubkey`](Self::script_pubkey) that the chain reports
    /// with at least `min_depth` confirmations, that no mempool transaction spends, and that
    /// the wallet neither knows nor chose for a funding; a coinbase output (a wallet that
    /// mines) once it is mature, at [`COINBASE_MATURITY`](crate::chain::COINBASE_MATURITY)
    /// confirmations. Returns the balance afterwards. Bitcoin Core reports confirmed outputs
    /// only (see [`ChainBackend::unspent_outputs_of`]). A funding [in
    /// doubt](Wallet::funding_in_doubt) one of whose inputs the chain shows spent (by it, or by
    /// a transaction conflicting with it) is settled: it no longer holds back later fundings.
    ///
    /// # Errors
    ///
    /// The chain's, among them [`ChainError::Unavailable`] from a backend that cannot list
    /// outputs by script.
    ///
    /// # Examples
    ///
    /// ```
    /// use paychan::bitcoin::{Amount, secp256k1::SecretKey};
    /// use paychan::chain::sim::SimulatedChain;
    /// use paychan::client::KeyWallet;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let chain = SimulatedChain::new();
    /// let wallet = KeyWallet::new(SecretKey::from_slice(&[9; 32])?);
    /// chain.faucet(wallet.script_pubkey(), Amount::from_sat(70_000));
    /// chain.mine(1);
    /// assert_eq!(wallet.sync(&chain, 1).await?, Amount::from_sat(70_000));
    /// assert_eq!(wallet.sync(&chain, 1).await?, Amount::from_sat(70_000)); // counted once
    /// # Ok(())
    /// # }
    /// ```
    pub async fn sync<C: ChainBackend>(
        &self,
        chain: &C,
        min_depth: u32,
    ) -> Result<Amount, ChainError> {
        // A funding in doubt whose input the chain shows spent (by it, or by a transaction
        // that conflicts with it) is settled either way: it holds back no later funding, and
        // its other inputs are coins again if the chain still has them.
        let in_doubt: Vec<OutPoint> =
            self.coins().in_doubt.iter().flatten().map(|(outpoint, _)| *outpoint).collect();
        let mut gone = HashSet::new();
        for outpoint in in_doubt {
            if chain.unspent(&outpoint).await?.is_none() {
                gone.insert(outpoint);
            }
        }
        if !gone.is_empty() {
            let mut coins = self.coins();
            let (settled, kept): (Vec<_>, Vec<_>) = core::mem::take(&mut coins.in_doubt)
                .into_iter()
                .partition(|inputs| inputs.iter().any(|(op, _)| gone.contains(op)));
            coins.in_doubt = kept;
            for (outpoint, _) in settled.into_iter().flatten() {
                if !gone.contains(&outpoint) && !coins.is_in_doubt(&outpoint) {
                    coins.used.remove(&outpoint);
                }
            }
        }
        let mut found = chain.unspent_outputs_of(&self.script_pubkey()).await?;
        // Core's UTXO set does not see mempool spends (an earlier process's unconfirmed
        // funding): ask for each coin with the mempool.
        let mut unspent = Vec::with_capacity(found.len());
        // A coinbase output joins once it is mature: a funding spending it earlier is
        // refused by every node (`bad-txns-premature-spend-of-coinbase`).
        for (outpoint, utxo) in found.drain(..) {
            if chain.unspent(&outpoint).await?.is_some_and(|live| live.is_spendable()) {
                unspent.push((outpoint, utxo));
            }
        }
        let mut coins = self.coins();
        for (outpoint, utxo) in unspent {
            let known = coins.used.contains(&outpoint)
                || coins.unspent.iter().any(|(coin, _)| *coin == outpoint);
            if !known && utxo.confirmations >= min_depth {
                coins.unspent.push((outpoint, utxo.output));
            }
        }
        Ok(coins.balance())
    }

    /// The value of the coins not yet spent by a funding transaction (the inputs of a
    /// funding in doubt do not count: the server may have broadcast it).
    pub fn balance(&self) -> Amount {
        self.coins().balance()
    }

    fn coins(&self) -> std::sync::MutexGuard<'_, Coins> {
        self.coins.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn select(&self, output: TxOut, fee_rate: FeeRate) -> Result<Psbt, WalletError> {
        let mut coins = self.coins();
        coins.unspent.sort_by_key(|(_, out)| core::cmp::Reverse(out.value));
        // First one input of every funding in doubt (its largest), so that the new funding
        // conflicts with each; then the coins, largest first; then the other inputs in doubt.
        let mut candidates: Vec<(OutPoint, TxOut)> = Vec::new();
        for inputs in &coins.in_doubt {
            let hit = inputs.iter().any(|(op, _)| candidates.iter().any(|(c, _)| c == op));
            if let Some(largest) = inputs.iter().max_by_key(|(_, out)| out.value)
                && !hit
            {
                candidates.push(largest.clone());
            }
        }
        candidates.extend(coins.unspent.iter().cloned());
        for coin in coins.in_doubt.iter().flatten() {
            if !candidates.iter().any(|(c, _)| *c == coin.0) {
                candidates.push(coin.clone());
            }
        }
        let (funding, used) =
            super::steps::funding_from_coins(&candidates, output, self.script_pubkey(), fee_rate)
                .map_err(WalletError::new)?;
        let psbt = funding.to_psbt().map_err(WalletError::new)?;
        let chosen = &candidates[..used];
        coins.unspent.retain(|(op, _)| !chosen.iter().any(|(c, _)| c == op));
        coins.used.extend(chosen.iter().map(|(outpoint, _)| *outpoint));
        Ok(psbt)
    }

    fn sign_all(&self, mut psbt: Psbt) -> Result<Psbt, WalletError> {
        let mut funding = super::steps::Funding::from_psbt(&psbt);
        super::steps::sign_p2wpkh_inputs(&mut funding, &self.key).map_err(WalletError::new)?;
        for (input, txin) in psbt.inputs.iter_mut().zip(funding.tx.input) {
            input.final_script_witness = Some(txin.witness);
        }
        let txid = psbt.unsigned_tx.compute_txid();
        for (vout, output) in psbt.unsigned_tx.output.iter().enumerate() {
            if output.script_pubkey == self.script_pubkey() {
                self.add_coin(OutPoint::new(txid, vout as u32), output.clone());
            }
        }
        Ok(psbt)
    }
}

impl Coins {
    fn balance(&self) -> Amount {
        self.unspent.iter().map(|(_, out)| out.value).sum()
    }
}

impl Coins {
    fn is_in_doubt(&self, outpoint: &OutPoint) -> bool {
        self.in_doubt.iter().flatten().any(|(op, _)| op == outpoint)
    }
}

impl Wallet for KeyWallet {
    fn release(&self, psbt: &Psbt) {
        let inputs = psbt.unsigned_tx.input.iter().zip(&psbt.inputs);
        for (input, coin) in inputs {
            if let Some(coin) = &coin.witness_utxo {
                // An input of a funding in doubt stays in doubt.
                if self.coins().is_in_doubt(&input.previous_output) {
                    continue;
                }
                self.coins().used.remove(&input.previous_output);
                self.add_coin(input.previous_output, coin.clone());
            }
        }
    }

    fn funding_in_doubt(&self, psbt: &Psbt) {
        let txid = psbt.unsigned_tx.compute_txid();
        let mut coins = self.coins();
        // Its change is no coin until the funding confirms (a sync finds it then).
        coins.unspent.retain(|(outpoint, _)| outpoint.txid != txid);
        let inputs = psbt.unsigned_tx.input.iter().zip(&psbt.inputs);
        let inputs: Vec<_> = inputs
            .filter_map(|(input, coin)| Some((input.previous_output, coin.witness_utxo.clone()?)))
            .collect();
        if !inputs.is_empty() {
            coins.in_doubt.push(inputs);
        }
    }

    fn funding_acknowledged(&self, tx: &Transaction) {
        let spent: HashSet<OutPoint> = tx.input.iter().map(|i| i.previous_output).collect();
        let mut coins = self.coins();
        let (settled, kept): (Vec<_>, Vec<_>) = core::mem::take(&mut coins.in_doubt)
            .into_iter()
            .partition(|inputs| inputs.iter().any(|(op, _)| spent.contains(op)));
        coins.in_doubt = kept;
        // The other inputs of a funding this one conflicts with are the wallet's again.
        for (outpoint, coin) in settled.into_iter().flatten() {
            if !spent.contains(&outpoint) && !coins.is_in_doubt(&outpoint) {
                coins.used.remove(&outpoint);
                if !coins.unspent.iter().any(|(known, _)| *known == outpoint) {
                    coins.unspent.push((outpoint, coin));
                }
            }
        }
    }

    fn fund(&self, output: TxOut, fee_rate: FeeRate) -> WalletFuture<'_, Psbt> {
        let result = self.select(output, fee_rate);
        Box::pin(async move { result })
    }

    fn sign(&self, psbt: Psbt) -> WalletFuture<'_, Psbt> {
        let result = self.sign_all(psbt);
        Box::pin(async move { result })
    }
}
