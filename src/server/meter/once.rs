//! Idempotency keys: the answer to a held key, the response kept for replay, and the guard
//! of a claim whose request has not finished.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tower::BoxError;

use super::Meter;
use crate::MilliSats;
use crate::server::idempotency;
use crate::server::rejection::{Rejection, RejectionKind};
use crate::store::ChannelStore;
use crate::store::ops::{IdempotencyClaim, IdempotencyRecord};
use crate::wire::ChannelId;

/// A claimed idempotency key whose request has not been finished yet; dropped unfinished,
/// it marks the key served but not kept (in the background).
pub(super) struct Unfinished<St: ChannelStore> {
    store: Arc<St>,
    channel: ChannelId,
    pub(super) claim: Option<IdempotencyClaim>,
    until: u64,
}

impl<St: ChannelStore> Drop for Unfinished<St> {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, channel, until) = (Arc::clone(&self.store), self.channel, self.until);
        runtime.spawn(async move {
            let unkept = Some(idempotency::unavailable());
            if let Err(error) = store.finish_once(channel, &claim, unkept, until).await {
                tracing::warn!(%error, "an abandoned idempotency key could not be finished");
            }
        });
    }
}

impl<St: ChannelStore, P: Send + Sync + 'static> Meter<St, P> {
    /// The guard of `claim` while its request runs: a claim whose request is dropped (the
    /// client went away) or fails before it is finished is marked served but not kept; its
    /// retry is refused, never charged again.
    pub(super) fn unfinished(
        &self,
        claim: Option<&IdempotencyClaim>,
        channel: ChannelId,
    ) -> Option<Box<Unfinished<St>>> {
        let (claim, keep) = claim.zip(self.config.idempotency.as_ref())?;
        Some(Box::new(Unfinished {
            store: Arc::clone(&self.config.store),
            channel,
            claim: Some(claim.clone()),
            until: keep.keep_until(),
        }))
    }

    /// The answer to a request whose idempotency key is held: the kept response, or why not.
    pub(super) fn held<B: From<String> + From<Bytes>>(
        &self,
        record: &IdempotencyRecord,
        claim: Option<&IdempotencyClaim>,
    ) -> Response<B> {
        let kind = match (claim, &record.response) {
            (Some(claim), _) if claim.fingerprint != record.fingerprint => {
                RejectionKind::IdempotencyKeyReused
            }
            (_, None) => RejectionKind::IdempotencyKeyInProgress,
            (_, Some(stored)) => match idempotency::replay(stored) {
                Ok(response) => return response,
                Err(kind) => kind,
            },
        };
        Rejection::new(kind, None).into_response(&self.config.terms_url)
    }

    /// Finishes `claim` with `response`: kept for replay when it was charged for and fits;
    /// marked as served but not kept when it does not; released when nothing was charged.
    pub(super) async fn keep<B>(
        &self,
        channel: ChannelId,
        claim: &IdempotencyClaim,
        response: Response<B>,
        charged: MilliSats,
        streamed: bool,
    ) -> Response<B>
    where
        B: HttpBody<Data = Bytes> + From<Bytes> + From<String>,
        B::Error: Into<BoxError>,
    {
        let Some(keep) = &self.config.idempotency else { return response };
        let finish = async |stored: Option<Vec<u8>>| {
            let finished =
                self.config.store.finish_once(channel, claim, stored, keep.keep_until()).await;
            if let Err(error) = finished {
                // The claim lapses by itself; until then a retry is told to wait.
                tracing::warn!(%error, "an idempotency key could not be finished");
            }
        };
        // A 5xx whose charge was given back releases its key: the retry runs (and pays)
        // again. Any other answer is kept, even a free one: the handler ran.
        if charged == MilliSats::ZERO && response.status().is_server_error() {
            finish(None).await;
            return response;
        }
        let size = response.body().size_hint().exact();
        let fits = !streamed && size.is_some_and(|len| len <= keep.max_response_len() as u64);
        if !fits {
            finish(Some(idempotency::unavailable())).await;
            return response;
        }
        let (parts, body) = response.into_parts();
        // The body error (which need not be `Send`) is dropped before anything is awaited.
        let collected = body.collect().await.map(|collected| collected.to_bytes()).ok();
        match collected {
            Some(bytes) => {
                finish(Some(idempotency::encode(&parts, &bytes))).await;
                Response::from_parts(parts, B::from(bytes))
            }
            None => {
                // The response failed after it was charged: give the charge back.
                let _ = self.config.store.credit(channel, charged).await;
                finish(None).await;
                let mut failed = Response::new(B::from("the response failed".to_owned()));
                *failed.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                failed
            }
        }
    }
}
