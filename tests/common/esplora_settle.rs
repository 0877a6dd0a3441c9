//! The settlement task over `Esplora`: what the fake's tests (`tests/esplora.rs`) and the real
//! electrs's (`tests/real_esplora.rs`) share. Each funds its channels on its own chain.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use bitcoin::absolute::LockTime;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, Network, OutPoint, Transaction, TxOut};
use paychan::chain::ChainBackend;
use paychan::chain::sim::sign_p2wpkh_input;
use paychan::channel::ChannelState;
use paychan::channel::{ChainTip, Channel, ChannelParams, Terms, channel_key};
use paychan::settlement::Settlement;
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore};
use paychan::wire::ChannelId;

use super::{p2wpkh, public, secret};

pub fn master() -> Xpriv {
    Xpriv::new_master(Network::Regtest, &[0x5e; 32]).unwrap()
}

/// The server's payout key (and CPFP key).
pub fn payout() -> SecretKey {
    secret(0x22)
}

fn client(index: u32) -> SecretKey {
    secret(100 + index as u8)
}

/// Channel `index`'s parameters: 100 000 sat, 200 blocks from `tip`, at the default 2 sat/vB.
pub fn params(index: u32, tip: ChainTip) -> ChannelParams {
    let server = channel_key(&master(), index).unwrap();
    Terms::default()
        .agree(
            public(&client(index)),
            public(&server),
            Amount::from_sat(100_000),
            LockTime::from_height(tip.height + 200).unwrap(),
            p2wpkh(&client(index)),
            p2wpkh(&payout()),
            tip,
        )
        .unwrap()
}

/// The signed funding of `params` from `coin`, a 150 000 sat P2WPKH coin of key 3.
pub fn funding(params: &ChannelParams, coin: (OutPoint, TxOut)) -> (Transaction, OutPoint) {
    let change = TxOut { value: Amount::from_sat(49_000), script_pubkey: p2wpkh(&secret(3)) };
    let (mut funding, outpoint) = params.build_funding(&[coin.0], Some(change));
    sign_p2wpkh_input(&mut funding, 0, &coin.1, &secret(3));
    (funding, outpoint)
}

/// Stores `channel` (index `index`, funded at `height`) open in `store`, with `paid` sat paid.
pub async fn store_open(
    store: &MemoryStore,
    channel: Channel,
    index: u32,
    height: u32,
    paid: u64,
) -> ChannelId {
    let pay = |sat: u64| {
        let mut tx = channel.build_payment(Amount::from_sat(sat)).unwrap();
        channel.sign_payment(&mut tx, &client(index)).unwrap();
        tx
    };
    let id = ChannelId::new(channel.outpoint());
    let (first, best) = (pay(1_000), pay(paid));
    store.create(ChannelRecord::open(channel, index, first).with_funded_at(height)).await.unwrap();
    let _ = store.store_payment(id, best).await.unwrap();
    id
}

/// The settlement task on `chain`, with the CPFP key and no backoff.
pub fn task<C: ChainBackend>(store: &MemoryStore, chain: C) -> Settlement<MemoryStore, C> {
    Settlement::new(store.clone(), chain, master())
        .with_cpfp_key(payout())
        .with_backoff(Duration::ZERO, Duration::ZERO)
}

/// The close the server would broadcast for channel `id`.
pub async fn close_of(store: &MemoryStore, id: ChannelId) -> Transaction {
    store.load(id).await.unwrap().unwrap().close_transaction(&master()).unwrap()
}

pub async fn state(store: &MemoryStore, id: ChannelId) -> ChannelState {
    store.load(id).await.unwrap().unwrap().state
}

/// A cooperative close asked for: the channel moves to closing, as the close endpoint does.
pub async fn ask_close(store: &MemoryStore, id: ChannelId) {
    assert!(store.transition(id, ChannelState::Open, ChannelState::Closing).await.unwrap());
}

/// A close asked for on channel `id` and broadcast by one pass of `task`: the channel is
/// closed and `esplora` sees the close in the mempool. Returns its txid.
pub async fn close_into_mempool(
    store: &MemoryStore,
    id: ChannelId,
    task: &mut Settlement<MemoryStore, paychan::chain::esplora::Esplora>,
    esplora: &paychan::chain::esplora::Esplora,
) -> bitcoin::Txid {
    ask_close(store, id).await;
    assert_eq!(task.run_once().await.unwrap().broadcast, 1);
    let close = close_of(store, id).await.compute_txid();
    assert_eq!(state(store, id).await, ChannelState::Closed);
    assert_eq!(esplora.tx_status(&close).await.unwrap(), paychan::chain::TxStatus::InMempool);
    close
}
