use tower::Layer;

use super::PaymentService;
use crate::client::{ClientStore, MemoryClientStore, Payer};

/// Adds channel payments to an HTTP client: every request to the [`Payer`]'s server carries
/// the `Payment-Channel` header, and a 402 is answered by paying (top-up or a new channel,
/// within the policy) and retrying.
///
/// # Examples
///
/// ```
/// use bitcoin::Network;
/// use bitcoin::bip32::Xpriv;
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use paychan::client::{PaymentLayer, Payer};
/// use tower::ServiceBuilder;
///
/// let key = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
/// let payer = Payer::builder("http://127.0.0.1:3000", Network::Regtest, key).build().unwrap();
/// let http = tower::service_fn(|_: http::Request<Full<Bytes>>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
/// });
/// let client = ServiceBuilder::new().layer(PaymentLayer::new(payer)).service(http);
/// # let _ = client;
/// ```
#[derive(Debug)]
pub struct PaymentLayer<St = MemoryClientStore> {
    payer: Payer<St>,
}

impl<St> Clone for PaymentLayer<St> {
    fn clone(&self) -> Self {
        Self { payer: self.payer.clone() }
    }
}

impl<St: ClientStore> PaymentLayer<St> {
    /// Pays with `payer`.
    pub fn new(payer: Payer<St>) -> Self {
        Self { payer }
    }
}

impl<S, St: ClientStore> Layer<S> for PaymentLayer<St> {
    type Service = PaymentService<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        PaymentService::new(inner, self.payer.clone())
    }
}
