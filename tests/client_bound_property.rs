//! Property test of the client's loss bound (issue #23): a payer driven through random
//! sequences of server answers — served with and without balance headers and receipts, 402s
//! with arbitrary numbers, prices beyond the policy, "channel not open", 5xx with and without
//! a balance, forged receipts, metered streams with and without units and top-up demands —
//! never signs, on any channel, a payment that pays the server more than
//! `max(first payment, what the server served × the quote) + one price + max_prepaid`.
//!
//! The server is the real stack (negotiation, paywall, memory store, simulated chain), called
//! in process, behind a middleware that answers each paid `/job` as the sequence says.
//! `PAYCHAN_BOUND_CASES` sets the number of cases (CI: the default, 1 000).

mod common;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use axum::routing::get;
use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, Network};
use bytes::Bytes;
use common::secret;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use paychan::MilliSats;
use paychan::chain::follow_tip;
use paychan::chain::sim::SimulatedChain;
use paychan::client::{
    ClientStore, KeyWallet, MemoryClientStore, Payer, PaymentLayer, SpendingPolicy,
};
use paychan::server::PaywallLayer;
use paychan::store::MemoryStore;
use paychan::wire::{self, ChannelId, PAYMENT_CHANNEL};
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::{Service, ServiceBuilder, ServiceExt};

const QUOTE: MilliSats = MilliSats::from_msat(2_000);
const UNIT: MilliSats = MilliSats::from_msat(1_000);
const PREPAID: Amount = Amount::from_sat(1_000);
const FIRST: Amount = Amount::from_sat(294);

/// How the server answers one paid `/job`.
#[derive(Debug, Clone)]
enum Answer {
    /// The paywall's own answer (served, or its real 402).
    Honest,
    /// The paywall's answer without its balance header and receipt.
    Hidden,
    /// 402 `insufficient-balance`: spent `spent`‰ of the latest payment, asks `min` and
    /// `suggested` sat more.
    Forged { spent_permille: u64, min: u64, suggested: u64 },
    /// A 402 quoting a price beyond the policy.
    TooDear,
    /// 402 `channel-not-open`.
    NotOpen,
    /// 500, with or without a balance header.
    Failed { balance: bool },
    /// The paywall's answer with a receipt that is not one.
    BadReceipt,
    /// A metered SSE stream of `units` events at [`UNIT`], then (maybe) a top-up demand.
    Stream { units: u64, ask: bool },
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        6 => Just(Answer::Honest),
        2 => Just(Answer::Hidden),
        4 => (0u64..2_000, 0u64..3_000, 0u64..10_000)
            .prop_map(|(spent_permille, min, suggested)| Answer::Forged { spent_permille, min, suggested }),
        1 => Just(Answer::TooDear),
        1 => Just(Answer::NotOpen),
        1 => any::<bool>().prop_map(|balance| Answer::Failed { balance }),
        1 => Just(Answer::BadReceipt),
        2 => (0u64..6, any::<bool>()).prop_map(|(units, ask)| Answer::Stream { units, ask }),
    ]
}

#[derive(Default)]
struct Script {
    answers: VecDeque<Answer>,
    /// What the server served on each channel, valued as the client must count it.
    served: HashMap<ChannelId, MilliSats>,
    /// The highest server amount of a payment the server was handed, by channel.
    latest: HashMap<ChannelId, Amount>,
}

fn payment(header: &http::HeaderValue) -> Option<(ChannelId, Amount)> {
    let payment = wire::decode_payment(header.as_bytes()).ok()?;
    let id = ChannelId::new(payment.input.first()?.previous_output);
    Some((id, paychan::channel::server_amount(&payment)))
}

fn problem(status: u16, code: &str, body: Value) -> Response {
    let mut document = json!({
        "type": format!("urn:paychan:problem:{code}"), "title": "refused", "status": status,
        "detail": "scripted", "code": code,
    });
    if let (Some(document), Some(body)) = (document.as_object_mut(), body.as_object()) {
        document.extend(body.clone());
    }
    Response::builder()
        .status(status)
        .header("content-type", "application/problem+json")
        .body(Body::from(document.to_string()))
        .unwrap()
}

fn forged(id: ChannelId, paid: Amount, spent_permille: u64, min: u64, suggested: u64) -> Response {
    let paid_msat = paid.to_sat() * 1_000;
    let spent = paid_msat.saturating_mul(spent_permille) / 1_000;
    problem(
        402,
        "insufficient-balance",
        json!({
            "price_msat": QUOTE.to_msat(),
            "channel": {
                "channel": id.to_string(), "state": "open",
                "paid_msat": paid_msat, "spent_msat": spent,
                "balance_msat": paid_msat.saturating_sub(spent),
                "price_msat": QUOTE.to_msat(), "capacity_left_sat": 0,
                "min_server_amount_sat": paid.to_sat() + min,
                "suggested_server_amount_sat": paid.to_sat() + suggested,
                "expiry": 0, "close_by": 0
            }
        }),
    )
}

async fn scripted(
    State(script): State<Arc<Mutex<Script>>>,
    request: Request,
    next: Next,
) -> Response {
    let paid = request.headers().get(PAYMENT_CHANNEL).and_then(payment);
    if let Some((id, amount)) = paid {
        let mut script = script.lock().unwrap();
        let latest = script.latest.entry(id).or_default();
        *latest = (*latest).max(amount);
    }
    let (Some((id, _)), "/job") = (paid, request.uri().path()) else {
        return next.run(request).await;
    };
    let (answer, latest) = {
        let mut script = script.lock().unwrap();
        let answer = script.answers.pop_front().unwrap_or(Answer::Honest);
        (answer, script.latest[&id])
    };
    let served = |value: MilliSats| {
        let mut script = script.lock().unwrap();
        let entry = script.served.entry(id).or_default();
        *entry = entry.saturating_add(value);
    };
    match answer {
        Answer::Honest | Answer::Hidden | Answer::BadReceipt => {
            let mut response = next.run(request).await;
            if response.status() == StatusCode::OK {
                served(QUOTE);
            }
            let headers = response.headers_mut();
            match answer {
                Answer::Hidden => {
                    headers.remove(wire::PAYMENT_CHANNEL_BALANCE);
                    headers.remove(wire::PAYMENT_RECEIPT);
                }
                Answer::BadReceipt if headers.contains_key(wire::PAYMENT_RECEIPT) => {
                    headers.insert(wire::PAYMENT_RECEIPT, http::HeaderValue::from_static("AAAA"));
                }
                _ => {}
            }
            response
        }
        Answer::Forged { spent_permille, min, suggested } => {
            forged(id, latest, spent_permille, min, suggested)
        }
        Answer::TooDear => problem(402, "insufficient-balance", json!({ "price_msat": 50_000 })),
        Answer::NotOpen => problem(402, "channel-not-open", json!({})),
        Answer::Failed { balance } => {
            let mut response = Response::builder().status(500);
            if balance {
                response = response.header(wire::PAYMENT_CHANNEL_BALANCE, "0");
                // A 5xx with a balance says it was paid for: the client counts it.
                served(QUOTE);
            }
            response.body(Body::from("failed")).unwrap()
        }
        Answer::Stream { units, ask } => {
            served(QUOTE.saturating_add(UNIT.checked_mul(units).unwrap()));
            let mut events = String::new();
            for unit in 0..units {
                events.push_str(&format!("data: {unit}\n\n"));
            }
            if ask {
                let demand = forged(id, latest, 1_000, 2, 1_000);
                let body = axum::body::to_bytes(demand.into_body(), 1 << 16).await.unwrap();
                let body = String::from_utf8_lossy(&body).into_owned();
                events.push_str(&format!("event: payment-required\ndata: {body}\n\n"));
            }
            Response::builder()
                .header("content-type", "text/event-stream")
                .header(wire::PAYMENT_CHANNEL_STREAM, format!("sse; per-event={}", UNIT.to_msat()))
                .body(Body::from(events))
                .unwrap()
        }
    }
}

/// The server's router, called in process.
#[derive(Clone)]
struct InProcess(Router);

impl Service<http::Request<Full<Bytes>>> for InProcess {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Full<Bytes>>) -> Self::Future {
        let router = self.0.clone();
        Box::pin(async move { router.oneshot(request.map(Body::new)).await })
    }
}

/// Runs one sequence of answers; checks the bound on every channel the client paid.
async fn run(answers: Vec<Answer>) -> Result<(), TestCaseError> {
    let chain = SimulatedChain::new();
    let negotiation = common::negotiation(&chain, 0x5e);
    let tip = follow_tip(chain.clone(), Duration::from_secs(60)).await.unwrap();
    let paywall = PaywallLayer::new(MemoryStore::new(), QUOTE, tip)
        .with_prepaid_top_up(MilliSats::from_sat(PREPAID).unwrap())
        .with_negotiation(negotiation);
    let n = answers.len();
    let script = Arc::new(Mutex::new(Script { answers: answers.into(), ..Script::default() }));
    let router = Router::new()
        .route("/job", get(|| async { "done" }))
        .layer(paywall)
        .layer(from_fn_with_state(Arc::clone(&script), scripted));

    let wallet = KeyWallet::new(secret(0x33));
    let coin = chain.faucet(wallet.script_pubkey(), Amount::from_sat(1_000_000));
    wallet.add_coin(coin, chain.utxo(&coin).unwrap());
    let store = MemoryClientStore::new();
    let key = Xpriv::new_master(Network::Regtest, &[0x11; 32]).unwrap();
    let payer = Payer::builder("http://server.test", Network::Regtest, key)
        .policy(SpendingPolicy::default().with_max_prepaid(PREPAID))
        .wallet(wallet)
        .store(store.clone())
        .channel_value(Amount::from_sat(100_000))
        .build()
        .unwrap();
    let mut client =
        ServiceBuilder::new().layer(PaymentLayer::new(payer.clone())).service(InProcess(router));
    for _ in 0..n {
        let request = http::Request::get("http://server.test/job").body(Full::default()).unwrap();
        let Ok(ready) = client.ready().await else { break };
        if let Ok(response) = ready.call(request).await {
            let _ = response.into_body().collect().await;
        }
    }
    // Stream top-ups run as tasks: let them finish.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let served = script.lock().unwrap().served.clone();
    for channel in store.list().await.unwrap() {
        let counted = served.get(&channel.id()).copied().unwrap_or(MilliSats::ZERO);
        let bound = FIRST.max(counted.to_sat_ceil()) + QUOTE.to_sat_ceil() + PREPAID;
        prop_assert!(
            channel.paid() <= bound,
            "channel {} signed {} to the server, which served {counted}: bound {bound}",
            channel.id(),
            channel.paid()
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PAYCHAN_BOUND_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn no_server_answer_takes_the_client_beyond_its_bound(
        answers in prop::collection::vec(answer(), 1..30)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(answers))?;
    }
}
