//! A minimal HTTP/1.1 client for the chain backends: one connection per call, bounded time.

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::ChainError;

pub(crate) fn unavailable(
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> ChainError {
    ChainError::unavailable(error)
}

/// Splits `http://host:port/path` into the authority and the base path (no trailing `/`).
pub(crate) fn split_url(url: &str) -> Result<(String, String), ChainError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| unavailable("only http:// URLs are supported"))?;
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    if authority.is_empty() {
        return Err(unavailable("the URL has no host"));
    }
    Ok((authority.to_owned(), path.trim_end_matches('/').to_owned()))
}

/// Sends `request` to `authority` and returns the status and the whole body.
pub(crate) async fn send(
    authority: &str,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), ChainError> {
    let connect = tokio::net::TcpStream::connect(authority);
    let stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| unavailable("connection timed out"))?
        .map_err(unavailable)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(unavailable)?;
    tokio::spawn(connection);
    // One deadline for the head and the whole body, and a bound on the body's size: a
    // broken or hostile backend can neither hang a settlement pass nor exhaust memory.
    let exchange = async {
        let response = sender.send_request(request).await.map_err(unavailable)?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unavailable(format!("response body: {e}")))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| unavailable("request timed out"))?
}

/// The largest answer read from a backend: 32 MiB (a full block's JSON is far below it).
const MAX_BODY: usize = 32 * 1024 * 1024;
