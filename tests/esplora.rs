//! `Esplora` against a loopback server that answers what electrs answers
//! ([`common::esplora_fake`]: plain-text txids and hashes, JSON documents, Core's
//! `sendrawtransaction` error relayed in a 400 body, `{"confirmed":false}` for an unknown
//! transaction's status, no `POST /txs/package` on older servers), backed by the simulated
//! chain; and the settlement task over it.
#![cfg(feature = "esplora")]

mod common;

use bitcoin::{Amount, FeeRate, OutPoint, Txid};
use common::esplora_fake::{self, Flavor};
use common::{p2wpkh, public, secret, spend};
use paychan::chain::esplora::Esplora;
use paychan::chain::sim::SimulatedChain;
use paychan::chain::{ChainBackend, ChainError, RejectReason, TxStatus, check_network};

async fn fake_esplora(chain: SimulatedChain) -> String {
    esplora_fake::serve(chain, Flavor::Old).await
}

/// The fake Esplora's routes, under `/api`.
fn fake_app(chain: SimulatedChain) -> axum::Router {
    let scripts = (1..=16).map(|n| p2wpkh(&secret(n))).collect();
    esplora_fake::app(chain, Flavor::Old, scripts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_and_reads_state_like_esplora() {
    let chain = SimulatedChain::new();
    let esplora = Esplora::new(&fake_esplora(chain.clone()).await).unwrap();
    assert_eq!(esplora.tip().await.unwrap(), chain.tip());

    let coin = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    assert_eq!(esplora.unspent_output(&coin.0).await.unwrap(), Some(coin.1.clone()));
    let tx = spend(coin.clone(), 99_000, 0);
    let txid = esplora.broadcast(&tx).await.unwrap();
    assert_eq!(esplora.tx_status(&txid).await.unwrap(), TxStatus::InMempool);
    assert_eq!(esplora.unspent_output(&coin.0).await.unwrap(), None);
    let reject = |e: ChainError| e.reject_reason().expect("a typed rejection");
    assert_eq!(
        reject(esplora.broadcast(&spend(coin.clone(), 98_000, 0)).await.unwrap_err()),
        RejectReason::Conflict
    );
    chain.mine(3);
    assert_eq!(esplora.tip().await.unwrap(), chain.tip());
    assert_eq!(
        esplora.tx_status(&txid).await.unwrap(),
        TxStatus::Confirmed { height: chain.tip().height - 2, confirmations: 3 }
    );
    assert_eq!(
        reject(esplora.broadcast(&spend(coin, 98_000, 0)).await.unwrap_err()),
        RejectReason::MissingInputs
    );
    let fresh = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    let locked = spend(fresh.clone(), 99_000, chain.tip().height + 5);
    assert_eq!(reject(esplora.broadcast(&locked).await.unwrap_err()), RejectReason::NonFinal);
    assert_eq!(
        reject(esplora.broadcast(&spend(fresh, 100_000, 0)).await.unwrap_err()),
        RejectReason::FeeTooLow
    );
    let unknown = Txid::from_raw_hash(bitcoin::hashes::Hash::all_zeros());
    assert_eq!(esplora.tx_status(&unknown).await.unwrap(), TxStatus::Unknown);
    assert_eq!(esplora.unspent_output(&OutPoint { txid: unknown, vout: 0 }).await.unwrap(), None);

    // The outputs of a script, mempool included, with their depth.
    // Here: the first spend's output (3 confirmations), `fresh` (1), and a spend in the
    // mempool (0), whose input is no longer unspent.
    let pending = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    esplora.broadcast(&spend(pending.clone(), 99_000, 0)).await.unwrap();
    let script = p2wpkh(&secret(3));
    let found = esplora.unspent_outputs_of(&script).await.unwrap();
    assert_eq!(found, chain.unspent_outputs_of(&script).await.unwrap());
    let mut depths: Vec<_> = found.iter().map(|(_, utxo)| utxo.confirmations).collect();
    depths.sort_unstable();
    assert_eq!(depths, [0, 1, 3]);
    assert!(
        found
            .iter()
            .all(|(outpoint, utxo)| *outpoint != pending.0 && utxo.output.script_pubkey == script)
    );

    // The nearest target at or below the one asked: 6 blocks → 10.5 sat/vB = 2 625 sat/kwu.
    assert_eq!(esplora.estimate_fee_rate(6).await.unwrap(), FeeRate::from_sat_per_kwu(2_625));
    assert_eq!(esplora.estimate_fee_rate(100).await.unwrap(), FeeRate::from_sat_per_kwu(2_625));
    assert_eq!(esplora.estimate_fee_rate(1_000).await.unwrap(), FeeRate::from_sat_per_kwu(250));

    let closed = Esplora::new("http://127.0.0.1:9/api").unwrap();
    assert!(matches!(closed.tip().await, Err(ChainError::Unavailable { .. })));
}

/// The network is told by the genesis block (`GET /block-height/0`): a regtest server passes a
/// regtest check and a regtest `Merchant` starts on it; a server whose block 0 is another
/// network's genesis is refused (`ChainError::WrongNetwork`) and a regtest `Merchant` does not
/// start on it; a genesis block of no network, or an answer that is no hash, is refused too,
/// never taken for the nearest network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_genesis_block_tells_the_network_and_a_mismatch_is_refused() {
    use bitcoin::Network;
    use bitcoin::bip32::Xpriv;
    use esplora_fake::{genesis_of, serve_with_genesis};
    use paychan::{Merchant, MilliSats};

    let chain = SimulatedChain::new();
    let merchant = |esplora: Esplora| {
        let master = Xpriv::new_master(Network::Regtest, &[1; 32]).unwrap();
        Merchant::new(Network::Regtest, master, p2wpkh(&secret(2)), esplora)
    };
    let regtest = Esplora::new(&fake_esplora(chain.clone()).await).unwrap();
    assert_eq!(regtest.network().await, Ok(Network::Regtest));
    assert_eq!(check_network(&regtest, Network::Regtest).await, Ok(()));
    assert_eq!(
        check_network(&regtest, Network::Bitcoin).await,
        Err(ChainError::WrongNetwork { expected: Network::Bitcoin, actual: Network::Regtest })
    );
    merchant(regtest).start(MilliSats::from_msat(1_000)).await.expect("same network").stop();

    for network in [Network::Bitcoin, Network::Testnet, Network::Testnet4, Network::Signet] {
        let url = serve_with_genesis(chain.clone(), Flavor::Old, genesis_of(network)).await;
        let esplora = Esplora::new(&url).unwrap();
        assert_eq!(esplora.network().await, Ok(network));
        let started = merchant(esplora).start(MilliSats::from_msat(1_000)).await;
        assert_eq!(
            started.err(),
            Some(ChainError::WrongNetwork { expected: Network::Regtest, actual: network }),
            "a regtest merchant on {network}"
        );
    }

    let unknown = "11".repeat(32);
    for (genesis, said) in
        [(unknown.as_str(), unknown.as_str()), ("not a hash", "not a block hash")]
    {
        let url = serve_with_genesis(chain.clone(), Flavor::Old, genesis.to_owned()).await;
        let error = check_network(&Esplora::new(&url).unwrap(), Network::Regtest).await;
        let error = error.expect_err("refused, not guessed");
        assert!(matches!(error, ChainError::Unavailable { .. }), "{error:?}");
        assert!(error.to_string().contains(said), "{error}");
    }
}

/// With the `tls` feature an `https://` Esplora works, and its certificate is checked: the
/// same fake behind TLS with a self-signed certificate is refused until that certificate is
/// trusted.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_esplora_is_reached_and_its_certificate_checked() {
    use std::sync::Arc;

    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let chain = SimulatedChain::new();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = fake_app(chain.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    let url = format!("https://localhost:{port}/api");
    let untrusted = Esplora::new(&url).unwrap().tip().await.unwrap_err();
    assert!(untrusted.to_string().contains("certificate"), "{untrusted}");
    let trusted = Esplora::new(&url).unwrap().with_root_certificate(&cert).unwrap();
    chain.mine(2);
    assert_eq!(trusted.tip().await.unwrap(), chain.tip());
    let coin = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(100_000));
    let txid = trusted.broadcast(&spend(coin, 99_000, 0)).await.unwrap();
    assert_eq!(trusted.tx_status(&txid).await.unwrap(), TxStatus::InMempool);
    assert!(Esplora::new("http://localhost:1").unwrap().with_root_certificate(&cert).is_err());
}

/// The settlement task over Esplora: channels funded on the simulated chain, closed through
/// the fake electrs in front of it.
mod settlement {
    use std::time::Duration;

    use bitcoin::{Amount, FeeRate};
    use paychan::chain::esplora::{Esplora, PackageRelay};
    use paychan::chain::sim::SimulatedChain;
    use paychan::chain::{ChainBackend, TxStatus};
    use paychan::channel::ChannelState;
    use paychan::settlement::Settlement;
    use paychan::store::MemoryStore;
    use paychan::wire::ChannelId;

    use super::common::esplora_fake::{self, Flavor};
    use super::common::esplora_settle::{
        ask_close, close_into_mempool, close_of, funding, master, params, state, store_open, task,
    };
    use super::common::{p2wpkh, public, secret};

    /// A channel (index `index`) funded and confirmed on `chain`, stored open in `store` with
    /// `paid` sat paid.
    async fn open(store: &MemoryStore, chain: &SimulatedChain, index: u32, paid: u64) -> ChannelId {
        let params = params(index, chain.tip());
        let coin = chain.faucet_p2wpkh(&public(&secret(3)), Amount::from_sat(150_000));
        let (funding, outpoint) = funding(&params, coin);
        chain.submit(&funding).unwrap();
        chain.mine(1);
        store_open(store, params.at(outpoint), index, chain.tip().height, paid).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_evicted_close_is_broadcast_again_and_settles() {
        let chain = SimulatedChain::new();
        let store = MemoryStore::new();
        let id = open(&store, &chain, 0, 20_000).await;
        let esplora = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::Old).await).unwrap();
        let mut task = task(&store, esplora.clone());
        let close = close_into_mempool(&store, id, &mut task, &esplora).await;

        // The node restarted without its mempool: the close is gone, the funding unspent.
        chain.drop_from_mempool(&close);
        assert_eq!(esplora.tx_status(&close).await.unwrap(), TxStatus::Unknown);
        task.run_once().await.unwrap();
        assert_eq!(chain.tx_status(&close), TxStatus::InMempool, "broadcast again");
        assert_eq!(task.metrics().lock().unwrap().rebroadcasts, 1);
        chain.mine(1);
        assert_eq!(task.run_once().await.unwrap().settled, 1);
        assert_eq!(state(&store, id).await, ChannelState::Settled);
    }

    /// The mempool minimum (5 sat/vB) is above the close's 2 sat/vB: the close goes out with a
    /// CPFP child (at the server's 88 sat/vB estimate for the next block, paid from its 60 000
    /// sat) through `POST /txs/package` on a server that has it, or through the package
    /// relay given to one that has not; both confirm and the channel settles.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_below_the_mempool_minimum_goes_out_as_a_package() {
        for relayed in [false, true] {
            let chain = SimulatedChain::new();
            let store = MemoryStore::new();
            let id = open(&store, &chain, 0, 60_000).await;
            let new = esplora_fake::serve(chain.clone(), Flavor::New).await;
            let esplora = if relayed {
                let old = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::Old).await);
                old.unwrap().with_package_relay(PackageRelay::Esplora(Esplora::new(&new).unwrap()))
            } else {
                Esplora::new(&new).unwrap()
            };
            chain.set_mempool_min_fee_rate(FeeRate::from_sat_per_vb_u32(5));
            let close = close_of(&store, id).await;
            assert!(chain.submit(&close).is_err(), "the close alone is refused");
            let mut task = task(&store, esplora);
            ask_close(&store, id).await;
            let report = task.run_once().await.unwrap();
            assert_eq!((report.broadcast, report.bumped), (1, 1), "relayed {relayed}: {report:?}");
            let txid = close.compute_txid();
            assert_eq!(chain.tx_status(&txid), TxStatus::InMempool);
            assert_eq!(chain.mempool_txids().len(), 2, "the close and its child");
            let mined = chain.mine(1);
            assert!(mined.contains(&txid));
            task.run_once().await.unwrap();
            assert_eq!(state(&store, id).await, ChannelState::Settled);
            assert_eq!(task.metrics().lock().unwrap().closes_below_mempool_minimum, 0);
        }
    }

    /// An electrs without `POST /txs/package` and no package relay: when the mempool minimum
    /// reaches 80 % of the channels' 2 sat/vB (1.6 sat/vB), open channels are closed early,
    /// while their closes still get in; a close asked for once the minimum passed 2 sat/vB is
    /// refused, and counted (`closes_below_mempool_minimum`), not retried silently. With package
    /// relay nothing is closed early.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_package_relay_channels_close_early_and_a_stuck_close_is_reported() {
        let chain = SimulatedChain::new();
        let store = MemoryStore::new();
        let early = open(&store, &chain, 0, 20_000).await;
        let with_relay = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::New).await);
        let mut relayed_task = task(&store, with_relay.unwrap());
        let esplora = Esplora::new(&esplora_fake::serve(chain.clone(), Flavor::Old).await).unwrap();
        assert!(!esplora.has_package_relay().await.unwrap());
        let mut task = task(&store, esplora.clone());

        // Esplora tells no mempool minimum: early closes need a node that does (a Core relay
        // beside it, here the simulated chain's own view), never fee estimates.
        assert!(esplora.mempool_min_fee_rate().await.unwrap_err().is_unsupported());
        chain.set_package_relay(false);
        let node = || {
            Settlement::new(store.clone(), chain.clone(), master())
                .with_backoff(Duration::ZERO, Duration::ZERO)
        };
        // A mempool at its relay floor (1 sat/vB, here 50 % of the channel's rate) is no
        // pressure, whatever the share configured.
        let mut eager = node().with_early_close(50);
        assert_eq!(eager.run_once().await.unwrap().closing, 0, "no pressure at the floor");
        assert_eq!(eager.run_once().await.unwrap().closing, 0, "no pressure at the floor");
        // 1.5 sat/vB (75 %): nothing happens.
        let mut watcher = node();
        chain.set_mempool_min_fee_rate(FeeRate::from_sat_per_kwu(375));
        assert_eq!(watcher.run_once().await.unwrap().closing, 0);
        chain.set_mempool_min_fee_rate(FeeRate::from_sat_per_kwu(400));
        assert_eq!(relayed_task.run_once().await.unwrap().closing, 0, "a package path: no hurry");
        assert_eq!(task.run_once().await.unwrap().closing, 0, "Esplora alone: no early close");
        // 2 sat/vB (80 %): one reading is not enough, the second pass in a row closes.
        let mut fresh = node();
        assert_eq!(fresh.run_once().await.unwrap().closing, 0, "one reading");
        let report = fresh.run_once().await.unwrap();
        assert_eq!((report.closing, report.broadcast), (1, 1), "{report:?}");
        assert_eq!(fresh.metrics().lock().unwrap().early_closes, 1);
        chain.set_package_relay(true);
        let close = close_of(&store, early).await.compute_txid();
        assert_eq!(chain.tx_status(&close), TxStatus::InMempool, "in while it could get in");

        // Above 2 sat/vB a close cannot get in: refused, reported, kept closing.
        let late = open(&store, &chain, 1, 20_000).await;
        chain.set_mempool_min_fee_rate(FeeRate::from_sat_per_vb_u32(3));
        ask_close(&store, late).await;
        let report = task.run_once().await.unwrap();
        assert_eq!((report.broadcast, report.retrying), (0, 1), "{report:?}");
        assert_eq!(state(&store, late).await, ChannelState::Closing);
        assert_eq!(task.metrics().lock().unwrap().closes_below_mempool_minimum, 1);
        chain.mine(1);
        task.run_once().await.unwrap();
        assert_eq!(state(&store, early).await, ChannelState::Settled, "the early close settled");
    }

    /// Review (server side): the fake, with `GET /fee-estimates` answered from `estimates`.
    async fn esplora_with_estimates(
        chain: SimulatedChain,
        estimates: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    ) -> Esplora {
        let scripts = (1..=16).map(|n| p2wpkh(&secret(n))).collect();
        let fake = esplora_fake::app(chain, Flavor::Old, scripts);
        let app = axum::Router::new()
            .route(
                "/api/fee-estimates",
                axum::routing::get(move || {
                    let value = estimates.lock().unwrap().clone();
                    async move { axum::Json(value) }
                }),
            )
            .fallback_service(fake);
        let at = super::common::http::serve(app).await;
        Esplora::new(&format!("http://{at}/api")).unwrap()
    }

    /// Review: the mempool is not full (its minimum is the 1 sat/vB relay floor, a close at
    /// 2 sat/vB is accepted at once), but blocks have been clearing at ~2 sat/vB, so Core's
    /// `estimatesmartfee` for 1008 blocks — the lowest value of an ordinary mainnet
    /// `/fee-estimates` — is 1.7 sat/vB. `Esplora::mempool_min_fee_rate` reads that estimate as
    /// the mempool minimum and every open channel at the default 2 sat/vB is closed early.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn review_an_ordinary_fee_estimate_table_closes_no_channel_early() {
        let chain = SimulatedChain::new();
        let store = MemoryStore::new();
        let ids = [
            open(&store, &chain, 0, 20_000).await,
            open(&store, &chain, 1, 20_000).await,
            open(&store, &chain, 2, 20_000).await,
        ];
        let estimates = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!({
            "1": 12.0, "6": 6.1, "144": 2.3, "504": 2.0, "1008": 1.7
        })));
        let esplora = esplora_with_estimates(chain.clone(), estimates).await;
        let close = close_of(&store, ids[0]).await;
        assert!(chain.submit(&close).is_ok(), "a close at 2 sat/vB gets in: no mempool pressure");
        chain.drop_from_mempool(&close.compute_txid());
        // As the binary runs it: no CPFP key.
        let mut task = Settlement::new(store.clone(), esplora, master())
            .with_backoff(Duration::ZERO, Duration::ZERO);
        let report = task.run_once().await.unwrap();
        assert_eq!(report.closing, 0, "channels 200 blocks from expiry closed early: {report:?}");
        for id in ids {
            assert_eq!(state(&store, id).await, ChannelState::Open);
        }
    }

    /// Review: one pass with one absurd (lying, or glitching) estimate closes every open
    /// channel at once, for good; the next pass sees calm estimates but the channels stay
    /// closed. No hysteresis, no second sample, no bound on how many channels one pass closes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn review_one_glitched_fee_estimate_does_not_close_every_channel() {
        let chain = SimulatedChain::new();
        let store = MemoryStore::new();
        let mut ids = Vec::new();
        for index in 0..5 {
            ids.push(open(&store, &chain, index, 20_000).await);
        }
        let estimates =
            std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!({ "1": 5000.0 })));
        let esplora = esplora_with_estimates(chain.clone(), estimates.clone()).await;
        let mut task = self::task(&store, esplora);
        let report = task.run_once().await.unwrap();
        *estimates.lock().unwrap() = serde_json::json!({ "1": 20.0, "144": 1.0, "1008": 1.0 });
        task.run_once().await.unwrap();
        let mut closed = 0;
        for id in &ids {
            closed += usize::from(state(&store, *id).await != ChannelState::Open);
        }
        assert_eq!(closed, 0, "one estimate closed {closed} of 5 channels: {report:?}");
    }
}
