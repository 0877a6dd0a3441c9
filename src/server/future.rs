use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

pin_project! {
    /// The response future of [`Paywall`](super::Paywall): the inner future itself for free
    /// requests, a boxed metering future for priced ones.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Free { #[pin] future: F },
        Metered { future: Pin<Box<dyn Future<Output = T> + Send>> },
    }
}

impl<F, T> ResponseFuture<F, T> {
    pub(super) fn free(future: F) -> Self {
        Self { kind: Kind::Free { future } }
    }

    pub(super) fn metered(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self { kind: Kind::Metered { future: Box::pin(future) } }
    }
}

impl<F: Future<Output = T>, T> Future for ResponseFuture<F, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project().kind.project() {
            KindProj::Free { future } => future.poll(cx),
            KindProj::Metered { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, T> core::fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ResponseFuture")
    }
}
