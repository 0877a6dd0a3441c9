//! A funded channel on the simulated chain, built through the protocol's own steps.
#![allow(dead_code, unreachable_pub)]

use bitcoin::absolute::LockTime;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Transaction, TxOut};
use paychan::chain::policy;
use paychan::chain::sim::{SimulatedChain, sign_p2wpkh_input};
use paychan::channel::{ChainTip, Channel, ChannelParams, Terms};

pub mod hooked;

/// Now, in milliseconds since the Unix epoch (what leases and idempotency claims lapse by).
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

#[cfg(all(feature = "esplora", feature = "bitcoind"))]
pub mod electrs;
#[cfg(feature = "esplora")]
pub mod esplora_fake;
#[cfg(feature = "esplora")]
pub mod esplora_settle;
#[cfg(feature = "bitcoind")]
pub mod node;
pub mod stores;

/// Asks each node `tries` times for a debit of `price` on channel `id`, which left open (for
/// `state`): none may be served, every node's lease must go back, and what was served before
/// (`served`) must be spent in the store, to the msat, with nothing leased or forfeited.
pub async fn assert_no_lease_serves<S: paychan::store::ChannelStore + Clone + 'static>(
    store: &S,
    nodes: [&paychan::store::Leased<S>; 2],
    id: paychan::wire::ChannelId,
    price: paychan::MilliSats,
    (state, tries): (paychan::channel::ChannelState, usize),
    served: paychan::MilliSats,
) {
    use paychan::store::ChannelStore as _;
    use paychan::store::ops::Debit;
    let mut after = 0;
    for node in nodes {
        for _ in 0..tries {
            match node.debit(id, price).await.unwrap() {
                Debit::Debited { .. } => after += 1,
                Debit::NotOpen { state: now } => assert_eq!(now, state),
                other @ Debit::Insufficient { .. } => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(after, 0, "{after} requests served from a lease of a {state:?} channel");
    for node in nodes {
        assert_eq!(node.return_all().await, 0, "every lease goes back");
    }
    let record = store.load(id).await.unwrap().unwrap();
    assert_eq!(
        (record.spent, record.leased, record.forfeited),
        (served, paychan::MilliSats::ZERO, paychan::MilliSats::ZERO),
        "what was served is spent, to the msat"
    );
}

pub const CHANNEL_VALUE: Amount = Amount::from_sat(100_000);
pub const FAUCET_VALUE: Amount = Amount::from_sat(250_000);
pub const FUNDING_FEE: Amount = Amount::from_sat(1_000);
pub const LIFETIME_BLOCKS: u32 = 200;

pub fn secret(byte: u8) -> SecretKey {
    SecretKey::from_slice(&[byte; 32]).expect("non-zero")
}

pub fn public(secret: &SecretKey) -> CompressedPublicKey {
    CompressedPublicKey(secret.public_key(&Secp256k1::new()))
}

/// The negotiation of the tests' servers: regtest, the default terms, a master key from
/// `seed`, paid to `p2wpkh(secret(2))`.
pub fn negotiation(
    chain: &SimulatedChain,
    seed: u8,
) -> paychan::server::Negotiation<SimulatedChain> {
    let master = bitcoin::bip32::Xpriv::new_master(bitcoin::Network::Regtest, &[seed; 32]).unwrap();
    paychan::server::Negotiation::new(
        bitcoin::Network::Regtest,
        Terms::default(),
        master,
        p2wpkh(&secret(2)),
        chain.clone(),
    )
}

pub fn p2wpkh(secret: &SecretKey) -> ScriptBuf {
    ScriptBuf::new_p2wpkh(&public(secret).wpubkey_hash())
}

/// Everything a test needs about one channel, opened step by step.
pub struct Setup {
    pub chain: SimulatedChain,
    pub terms: Terms,
    pub client: SecretKey,
    pub server: SecretKey,
    pub wallet: SecretKey,
    pub params: ChannelParams,
    /// The unsigned funding transaction the refund was signed against.
    pub unsigned_funding: Transaction,
    /// The signed funding transaction.
    pub funding: Transaction,
    pub funding_prevouts: Vec<TxOut>,
    pub outpoint: OutPoint,
    /// The unsigned refund.
    pub refund: Transaction,
    pub channel: Channel,
}

impl Setup {
    /// Client key byte 1, server key byte 2 (or the given pair), default terms, an expiry
    /// [`LIFETIME_BLOCKS`] after the tip.
    pub fn new() -> Self {
        Self::with(1, 2, Terms::default(), None)
    }

    /// Agrees, funds from the faucet and builds (but does not broadcast) the funding.
    pub fn with(client: u8, server: u8, terms: Terms, expiry: Option<LockTime>) -> Self {
        let chain = SimulatedChain::new();
        let (client, server, wallet) = (secret(client), secret(server), secret(9));
        let tip = chain.tip();
        let expiry = expiry.unwrap_or_else(|| {
            LockTime::from_height(tip.height + LIFETIME_BLOCKS).expect("valid height")
        });
        let params = terms
            .agree(
                public(&client),
                public(&server),
                CHANNEL_VALUE,
                expiry,
                p2wpkh(&client),
                p2wpkh(&server),
                tip,
            )
            .expect("default terms accept the channel");
        let (coin, prevout) = chain.faucet_p2wpkh(&public(&wallet), FAUCET_VALUE);
        let change = TxOut {
            value: FAUCET_VALUE - CHANNEL_VALUE - FUNDING_FEE,
            script_pubkey: p2wpkh(&wallet),
        };
        let (unsigned_funding, outpoint) = params.build_funding(&[coin], Some(change));
        let mut funding = unsigned_funding.clone();
        sign_p2wpkh_input(&mut funding, 0, &prevout, &wallet);
        let refund = params.build_refund(outpoint, params.refund_fee());
        let channel = params.clone().at(outpoint);
        Self {
            chain,
            terms,
            client,
            server,
            wallet,
            params,
            unsigned_funding,
            funding,
            funding_prevouts: vec![prevout],
            outpoint,
            refund,
            channel,
        }
    }

    pub fn tip(&self) -> ChainTip {
        self.chain.tip()
    }

    /// Steps 4-6: the server checks and signs the refund, the client verifies it, the server
    /// checks and broadcasts the funding. Returns the fully signed refund.
    pub fn open(&self) -> Transaction {
        let checked = self
            .params
            .check_refund(&self.terms, &self.unsigned_funding, &self.refund, self.tip())
            .expect("refund passes");
        assert_eq!(checked.funding_outpoint(), self.outpoint);
        let server_sig = checked.sign(&self.server).expect("server key");
        self.params.verify_refund_signature(&self.refund, &server_sig).expect("valid signature");
        let refund = self
            .params
            .complete_refund(&self.refund, &self.client, &server_sig)
            .expect("client key");
        self.params
            .check_funding(&self.terms, self.outpoint, &self.funding, &self.funding_prevouts)
            .expect("funding passes");
        self.chain.submit(&self.funding).expect("funding accepted by the chain");
        refund
    }

    /// A signed payment of `sat` to the server.
    pub fn pay(&self, sat: u64) -> Transaction {
        let mut tx = self.channel.build_payment(Amount::from_sat(sat)).expect("buildable");
        self.channel.sign_payment(&mut tx, &self.client).expect("client key");
        tx
    }

    /// Re-signs input 0 of an arbitrary (mutated) payment with the client's key.
    pub fn resign(&self, mut tx: Transaction) -> Transaction {
        self.channel.sign_payment(&mut tx, &self.client).expect("client key");
        tx
    }

    pub fn funding_txout(&self) -> TxOut {
        self.funding.output[self.outpoint.vout as usize].clone()
    }

    /// Verifies a spend of the funding output with Bitcoin Core's interpreter and the
    /// relay-policy checks.
    pub fn assert_valid_spend(&self, tx: &Transaction) {
        let txout = self.funding_txout();
        let outpoint = self.outpoint;
        tx.verify(|op| (*op == outpoint).then(|| txout.clone()))
            .unwrap_or_else(|e| panic!("consensus rejects {}: {e}", tx.compute_txid()));
        policy::check_standard(tx, std::slice::from_ref(&txout))
            .unwrap_or_else(|e| panic!("policy rejects {}: {e}", tx.compute_txid()));
    }
}

/// A minimal HTTP/1.1 client over a real loopback socket: one request per connection.
pub mod http {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A parsed response.
    #[derive(Debug)]
    pub struct Reply {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl Reply {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        pub fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }
    }

    /// Serves `app` on a fresh loopback port (with the peer address available to handlers).
    pub async fn serve(app: axum::Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .await
                .expect("serve");
        });
        addr
    }

    pub async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Reply {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            request.push_str("content-type: application/json\r\n");
        }
        request.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
        let mut lines = head.lines();
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect::<Vec<_>>();
        let body = if headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Reply { status, headers, body }
    }

    fn dechunk(mut body: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = body.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.push_str(&rest[..size]);
            body = &rest[size + 2..];
        }
        out
    }
}

/// The client side of the negotiation, by hand (the client library is a later issue).
pub mod client {
    use std::net::SocketAddr;

    use bitcoin::absolute::LockTime;
    use bitcoin::consensus::encode::serialize_hex;
    use bitcoin::{Amount, CompressedPublicKey, FeeRate, ScriptBuf, Transaction, TxOut, ecdsa};
    use paychan::chain::sim::{SimulatedChain, sign_p2wpkh_input};
    use paychan::channel::{Channel, ChannelParams};
    use paychan::wire;
    use serde_json::{Value, json};

    use super::http::call;
    use super::{FAUCET_VALUE, p2wpkh, public, secret};

    /// What the client rebuilds from the server's answer to `open`.
    pub fn params_from(open: &Value) -> ChannelParams {
        let s = |k: &str| open[k].as_str().unwrap().to_owned();
        ChannelParams {
            client_key: public(&secret(1)),
            server_key: s("server_pubkey").parse::<CompressedPublicKey>().unwrap(),
            value: Amount::from_sat(open["value_sat"].as_u64().unwrap()),
            expiry: LockTime::from_consensus(open["expiry"].as_u64().unwrap() as u32),
            client_script: ScriptBuf::from_hex(&s("client_script")).unwrap(),
            server_script: ScriptBuf::from_hex(&s("server_script")).unwrap(),
            min_fee_rate: FeeRate::from_sat_per_vb_u32(
                open["min_fee_rate_sat_per_vb"].as_u64().unwrap() as u32,
            ),
            max_fee_rate: FeeRate::from_sat_per_vb_u32(
                open["max_fee_rate_sat_per_vb"].as_u64().unwrap() as u32,
            ),
            close_margin: open["close_margin"].as_u64().unwrap() as u32,
        }
    }

    /// The client's funding (from the faucet) and refund for an opened proposal.
    pub fn funding_and_refund(
        chain: &SimulatedChain,
        params: &ChannelParams,
    ) -> (Transaction, Transaction, Transaction) {
        let wallet = secret(9);
        let (coin, prevout) = chain.faucet_p2wpkh(&public(&wallet), FAUCET_VALUE);
        let change = TxOut {
            value: FAUCET_VALUE - params.value - Amount::from_sat(1_000),
            script_pubkey: p2wpkh(&wallet),
        };
        let (unsigned, outpoint) = params.build_funding(&[coin], Some(change));
        let mut signed = unsigned.clone();
        sign_p2wpkh_input(&mut signed, 0, &prevout, &wallet);
        let refund = params.build_refund(outpoint, params.refund_fee());
        (unsigned, signed, refund)
    }

    /// A channel opened and funded through the server's endpoints.
    pub struct Opened {
        pub channel: Channel,
    }

    impl Opened {
        /// A `Payment-Channel` header paying the server `sat` in total.
        pub fn header(&self, sat: u64) -> String {
            let mut tx = self.channel.build_payment(Amount::from_sat(sat)).expect("payable");
            self.channel.sign_payment(&mut tx, &secret(1)).expect("client key");
            wire::encode_payment(&tx)
        }
    }

    fn hex_decode(hex: &str) -> Vec<u8> {
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    /// Opens a channel of `value` sat whose first payment is `first` sat, over HTTP.
    pub async fn open_channel(
        addr: SocketAddr,
        chain: &SimulatedChain,
        value: u64,
        first: u64,
    ) -> Opened {
        let post = |path: &'static str, body: Value| async move {
            let reply =
                call(addr, "POST", &format!("/payment-channel/{path}"), &[], Some(&body)).await;
            assert!(reply.status < 300, "{path}: {} {}", reply.status, reply.body);
            reply.json()
        };
        let open = post(
            "open",
            json!({
                "client_pubkey": public(&secret(1)).to_string(),
                "value_sat": value,
                "expiry": chain.tip().height + 200,
                "client_script": p2wpkh(&secret(1)).to_hex_string(),
            }),
        )
        .await;
        let params = params_from(&open);
        let (unsigned, signed, refund) = funding_and_refund(chain, &params);
        let signed_refund = post(
            "refund",
            json!({
                "proposal": open["proposal"],
                "funding_tx": serialize_hex(&unsigned),
                "refund_tx": serialize_hex(&refund),
            }),
        )
        .await;
        let signature =
            ecdsa::Signature::from_slice(&hex_decode(signed_refund["signature"].as_str().unwrap()))
                .unwrap();
        params.verify_refund_signature(&refund, &signature).expect("a valid refund signature");
        let opened = Opened { channel: params.clone().at(refund.input[0].previous_output) };
        post(
            "fund",
            json!({
                "proposal": open["proposal"],
                "funding_tx": serialize_hex(&signed),
                "payment": opened.header(first),
            }),
        )
        .await;
        opened
    }
}

/// Bitcoin Core's answer to a rejected `sendrawtransaction`: (code, reject reason).
pub fn core_error(reason: paychan::chain::RejectReason, message: &str) -> (i64, String) {
    match reason {
        paychan::chain::RejectReason::MissingInputs => {
            (-25, "bad-txns-inputs-missingorspent".into())
        }
        paychan::chain::RejectReason::AlreadyConfirmed => {
            (-27, "Transaction already in block chain".into())
        }
        paychan::chain::RejectReason::FeeTooHigh => {
            (-25, "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)".into())
        }
        paychan::chain::RejectReason::FeeTooLow => (-26, "min relay fee not met, 0 < 110".into()),
        paychan::chain::RejectReason::Conflict => (-26, "txn-mempool-conflict".into()),
        paychan::chain::RejectReason::NonFinal => (-26, "non-final".into()),
        paychan::chain::RejectReason::NonBip68Final => (-26, "non-BIP68-final".into()),
        paychan::chain::RejectReason::ValueCreation => (-26, "bad-txns-in-belowout".into()),
        paychan::chain::RejectReason::ScriptFailure => {
            (-26, format!("mandatory-script-verify-flag-failed ({message})"))
        }
        _ => (-26, "dust".into()),
    }
}

/// A signed spend of a P2WPKH coin of key byte 3, paying `value` back to it, with `lock_time`
/// and a non-final sequence.
pub fn spend(coin: (OutPoint, TxOut), value: u64, lock_time: u32) -> Transaction {
    let mut tx = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: LockTime::from_consensus(lock_time),
        input: vec![bitcoin::TxIn {
            previous_output: coin.0,
            sequence: bitcoin::Sequence::ENABLE_LOCKTIME_NO_RBF,
            ..bitcoin::TxIn::default()
        }],
        output: vec![TxOut { value: Amount::from_sat(value), script_pubkey: p2wpkh(&secret(3)) }],
    };
    sign_p2wpkh_input(&mut tx, 0, &coin.1, &secret(3));
    tx
}

/// A hyper-util HTTP client that counts the 402s it receives (under a paying client layer).
pub mod counting {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub type Http = Client<HttpConnector, Full<Bytes>>;

    pub fn http_client() -> Http {
        Client::builder(TokioExecutor::new()).build_http()
    }

    #[derive(Clone)]
    pub struct Counting {
        pub http: Http,
        pub refusals: Arc<AtomicUsize>,
    }

    impl tower::Service<http::Request<Full<Bytes>>> for Counting {
        type Response = http::Response<hyper::body::Incoming>;
        type Error = hyper_util::client::legacy::Error;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
        >;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Full<Bytes>>) -> Self::Future {
            let (http, refusals) = (self.http.clone(), Arc::clone(&self.refusals));
            Box::pin(async move {
                let response = http.request(request).await?;
                if response.status() == StatusCode::PAYMENT_REQUIRED {
                    refusals.fetch_add(1, Ordering::SeqCst);
                }
                Ok(response)
            })
        }
    }

    /// `GET {origin}/work` through a paying `client`: the status and the body.
    pub async fn get_work<S: paychan::client::ClientStore + 'static>(
        client: &mut paychan::client::PaymentService<Counting, S>,
        origin: &str,
    ) -> Result<(StatusCode, String), paychan::client::ClientError> {
        use http_body_util::BodyExt as _;
        use tower::{Service as _, ServiceExt as _};
        let request = http::Request::get(format!("{origin}/work")).body(Full::default()).unwrap();
        let response = client.ready().await?.call(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// The tests' paying server stack on `chain`: the negotiation of [`negotiation`] (seed
/// `0x5e`), a memory store, every request at `price`, `bundle` prepaid on a top-up, the tip
/// followed every 50 ms.
pub async fn paywall(
    chain: &SimulatedChain,
    price: paychan::MilliSats,
    bundle: Amount,
) -> paychan::server::PaywallLayer<paychan::store::MemoryStore, paychan::MilliSats> {
    let tip = paychan::chain::follow_tip(chain.clone(), std::time::Duration::from_millis(50))
        .await
        .unwrap();
    paychan::server::PaywallLayer::new(paychan::store::MemoryStore::new(), price, tip)
        .with_prepaid_top_up(paychan::MilliSats::from_sat(bundle).unwrap())
        .with_negotiation(negotiation(chain, 0x5e))
}
