//! [`PaymentLayer`]: pays for the requests of a tower HTTP client (hyper-util's `Client`, or
//! any `Service<http::Request<B>>`).

mod layer;
mod service;

pub use layer::PaymentLayer;
pub use service::{PaymentService, ResponseFuture};
