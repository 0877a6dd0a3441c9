//! Wrapping a plain hyper `service_fn` (no axum router) with `PaywallLayer`: every request
//! costs 1 sat, the negotiation endpoints are served by the layer.
//!
//! Run with `cargo run --example wrap_hyper_service` (binds `PAYCHAN_ADDR`, default
//! `127.0.0.1:3000`). The chain is simulated.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::time::Duration;

use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::{CompressedPublicKey, Network, ScriptBuf};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use paychan::chain::sim::SimulatedChain;
use paychan::server::{Paid, Paywall};
use paychan::store::MemoryStore;
use paychan::{Merchant, MilliSats};
use tower::service_fn;
use tower::util::ServiceFn;

/// The plain hyper-style handler: it reads the receipt the layer put in the request
/// extensions.
fn hello(request: Request<Incoming>) -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
    let text = match request.extensions().get::<Paid>() {
        Some(paid) => format!("hello, channel {} ({} left)\n", paid.channel, paid.balance),
        None => "hello, free request\n".to_owned(),
    };
    ready(Ok(Response::new(Full::new(Bytes::from(text)))))
}

type Handler = fn(Request<Incoming>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// The wrapped service.
pub(crate) async fn app(
    chain: SimulatedChain,
) -> Paywall<ServiceFn<Handler>, MemoryStore, MilliSats> {
    let master = Xpriv::new_master(Network::Regtest, b"paychan hyper example seed").expect("seed");
    let payout = CompressedPublicKey(
        SecretKey::from_slice(&[0x23; 32]).expect("key").public_key(&Secp256k1::new()),
    );
    // The layer, the negotiation endpoints and the settlement task that collects on chain.
    let paid = Merchant::new(
        Network::Regtest,
        master,
        ScriptBuf::new_p2wpkh(&payout.wpubkey_hash()),
        chain,
    )
    // Short passes for the simulated chain; a real node's blocks need the defaults only.
    .with_intervals(Duration::from_millis(250), Duration::from_secs(1))
    .start(MilliSats::from_msat(1_000))
    .await
    .expect("the simulated chain answers");
    Paywall::new(service_fn(hello as Handler), &paid.layer())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr =
        std::env::var("PAYCHAN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into()).parse()?;
    let service = app(SimulatedChain::new()).await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("wrap_hyper_service listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
