//! The client's channel state: payments are saved before their header is handed out, the
//! stores keep everything across a reopen, the spending policy refuses with typed reasons, and
//! the refund recovers the money after expiry.

mod common;

use bitcoin::Amount;
use common::{CHANNEL_VALUE, LIFETIME_BLOCKS, Setup};
use paychan::MilliSats;
use paychan::chain::{RejectReason, TxStatus};
use paychan::channel::PaymentCheck;
use paychan::client::{
    ClientChannel, ClientError, ClientStore, ClientStoreError, FileClientStore, MemoryClientStore,
    PolicyRefusal, SpendingPolicy,
};
use paychan::wire::{self, ChannelId};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("paychan-client-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A funded channel on the simulated chain, as its client holds it.
fn funded() -> (Setup, ClientChannel) {
    let setup = Setup::new();
    let refund = setup.open();
    let channel = ClientChannel::new(setup.channel.clone(), 0, refund);
    (setup, channel)
}

#[tokio::test]
async fn a_payment_is_saved_before_its_header_is_returned() {
    let (setup, mut channel) = funded();
    let dir = temp_dir("saved");
    let store = FileClientStore::open(&dir).unwrap();
    let header = channel.pay(&store, &setup.client, Amount::from_sat(1_000)).await.unwrap();
    // A fresh handle on the same directory (as after a crash) already has that payment.
    let reopened = FileClientStore::open(&dir).unwrap().load(channel.id()).await.unwrap().unwrap();
    let sent = wire::decode_payment(header.as_bytes()).unwrap();
    assert_eq!(reopened.latest.as_ref(), Some(&sent));
    assert_eq!(reopened.refund, channel.refund, "the refund is kept with the channel");
    // The server accepts what the client sent.
    assert!(matches!(
        setup.channel.check_payment(None, &sent, setup.tip()),
        Ok(PaymentCheck::Increase { .. })
    ));

    let second = channel.pay(&store, &setup.client, Amount::from_sat(1_500)).await.unwrap();
    let check = setup.channel.check_payment(
        Some(&sent),
        &wire::decode_payment(second.as_bytes()).unwrap(),
        setup.tip(),
    );
    assert!(matches!(check, Ok(PaymentCheck::Increase { .. })));
    assert_eq!(FileClientStore::open(&dir).unwrap().list().await.unwrap(), vec![channel.clone()]);
    assert!(
        !std::fs::read_dir(&dir).unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "tmp"))
    );
}

#[tokio::test]
async fn refused_payments_change_nothing() {
    let (setup, mut channel) = funded();
    let store = MemoryClientStore::new();
    channel.pay(&store, &setup.client, Amount::from_sat(1_000)).await.unwrap();
    let before = channel.clone();
    for sat in [1_000, 999] {
        assert!(matches!(
            channel.pay(&store, &setup.client, Amount::from_sat(sat)).await,
            Err(ClientError::NotAnIncrease { .. })
        ));
    }
    assert!(matches!(
        channel.pay(&store, &setup.client, CHANNEL_VALUE).await,
        Err(ClientError::Payment(_))
    ));
    assert!(matches!(
        channel.pay(&store, &setup.server, Amount::from_sat(2_000)).await,
        Err(ClientError::Sign(_))
    ));
    assert_eq!(channel, before);
    assert_eq!(store.load(channel.id()).await.unwrap(), Some(before));
}

/// A store that cannot write.
struct Broken;

impl ClientStore for Broken {
    async fn save(&self, _: &ClientChannel) -> Result<(), ClientStoreError> {
        Err(ClientStoreError::new("disk full"))
    }
    async fn load(&self, _: ChannelId) -> Result<Option<ClientChannel>, ClientStoreError> {
        Ok(None)
    }
    async fn list(&self) -> Result<Vec<ClientChannel>, ClientStoreError> {
        Ok(vec![])
    }
    async fn next_key_index(&self) -> Result<u32, ClientStoreError> {
        Err(ClientStoreError::new("disk full"))
    }
}

#[tokio::test]
async fn no_header_without_a_saved_payment() {
    let (setup, mut channel) = funded();
    let before = channel.clone();
    let result = channel.pay(&Broken, &setup.client, Amount::from_sat(1_000)).await;
    assert!(matches!(result, Err(ClientError::Store(_))), "{result:?}");
    assert_eq!(channel, before, "the unsaved payment is forgotten, never sent");
}

#[tokio::test]
async fn the_refund_recovers_the_money_after_expiry() {
    let (setup, mut channel) = funded();
    channel.pay(&MemoryClientStore::new(), &setup.client, Amount::from_sat(1_000)).await.unwrap();
    setup.chain.mine(1);
    assert_eq!(channel.refund_if_expired(&setup.chain).await.unwrap(), None);
    setup.chain.mine(LIFETIME_BLOCKS - 2);
    assert_eq!(channel.refund_if_expired(&setup.chain).await.unwrap(), None, "one block early");
    setup.chain.mine(1);
    let txid =
        channel.refund_if_expired(&setup.chain).await.unwrap().expect("the refund is valid now");
    setup.chain.mine(1);
    assert!(matches!(setup.chain.tx_status(&txid), TxStatus::Confirmed { .. }));
    let refund = setup.chain.get_transaction(&txid).unwrap();
    assert_eq!(refund.output[0].value, CHANNEL_VALUE - setup.params.refund_fee());
    assert_eq!(refund.output[0].script_pubkey, setup.params.client_script);
}

#[tokio::test]
async fn no_refund_once_the_server_closed() {
    let (setup, mut channel) = funded();
    channel.pay(&MemoryClientStore::new(), &setup.client, Amount::from_sat(1_000)).await.unwrap();
    let close =
        setup.channel.close_transaction(channel.latest.as_ref().unwrap(), &setup.server).unwrap();
    setup.chain.submit(&close).unwrap();
    setup.chain.mine(LIFETIME_BLOCKS + 1);
    let error = channel.refund_if_expired(&setup.chain).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::Chain(e) if e.reject_reason() == Some(RejectReason::MissingInputs)),
        "{error}"
    );
}

#[test]
fn the_spending_policy_refuses_with_reasons() {
    let policy = SpendingPolicy::default()
        .with_max_channel_value(Amount::from_sat(50_000))
        .with_max_total(Amount::from_sat(10_000))
        .with_auto_open(false);
    assert_eq!(policy.check_open(Amount::from_sat(50_000), false), Ok(()));
    assert_eq!(
        policy.check_open(Amount::from_sat(50_001), false),
        Err(PolicyRefusal::ChannelTooLarge {
            value: Amount::from_sat(50_001),
            max: Amount::from_sat(50_000)
        })
    );
    assert_eq!(
        policy.check_open(Amount::from_sat(1_000), true),
        Err(PolicyRefusal::AutoOpenDisabled)
    );
    assert_eq!(policy.check_spend(Amount::from_sat(9_000), Amount::from_sat(1_000)), Ok(()));
    assert!(matches!(
        policy.check_spend(Amount::from_sat(9_000), Amount::from_sat(1_001)),
        Err(PolicyRefusal::BudgetExhausted { .. })
    ));
    assert!(matches!(
        policy.check_spend(Amount::MAX, Amount::ONE_SAT),
        Err(PolicyRefusal::BudgetExhausted { .. })
    ));
    assert!(policy.check_price(MilliSats::from_msat(10_000)).is_ok());
}
