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

/// Where a backend is: the authority for the `Host` header, the address to connect to, and,
/// for `https://`, the TLS client configuration (feature `tls`).
#[derive(Clone)]
pub(crate) struct Target {
    /// `host[:port]` as written in the URL.
    pub(crate) authority: String,
    /// `host:port`, with the scheme's default port when the URL has none.
    connect: String,
    #[cfg(feature = "tls")]
    tls: Option<tls::Tls>,
}

impl core::fmt::Debug for Target {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Target")
            .field("authority", &self.authority)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl Target {
    fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Trusts `der` (a DER-encoded certificate) as a root as well as Mozilla's, for an
    /// `https://` target.
    #[cfg(feature = "tls")]
    pub(crate) fn add_root_certificate(&mut self, der: &[u8]) -> Result<(), ChainError> {
        let tls = self.tls.as_mut().ok_or_else(|| unavailable("not an https:// URL"))?;
        tls.add_root(der)
    }
}

/// Splits `http[s]://host[:port]/path` into the target and the base path (no trailing `/`).
pub(crate) fn split_url(url: &str) -> Result<(Target, String), ChainError> {
    let (secure, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(unavailable("expected an http:// or https:// URL")),
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    let parsed: http::uri::Authority = authority.parse().map_err(unavailable)?;
    if parsed.host().is_empty() {
        return Err(unavailable("the URL has no host"));
    }
    let port = parsed.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let connect = format!("{}:{port}", parsed.host());
    #[cfg(not(feature = "tls"))]
    if secure {
        return Err(unavailable("https:// URLs need the `tls` feature"));
    }
    let target = Target {
        authority: authority.to_owned(),
        connect,
        #[cfg(feature = "tls")]
        tls: secure.then(|| tls::Tls::new(parsed.host().trim_matches(['[', ']']))).transpose()?,
    };
    Ok((target, path.trim_end_matches('/').to_owned()))
}

/// Sends `request` to `target` and returns the status and the whole body.
pub(crate) async fn send(
    target: &Target,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), ChainError> {
    let connect = tokio::net::TcpStream::connect(&target.connect);
    let stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| unavailable("connection timed out"))?
        .map_err(unavailable)?;
    #[cfg(feature = "tls")]
    if let Some(tls) = &target.tls {
        let handshake = tls.connect(stream);
        let stream = tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .map_err(|_| unavailable("TLS handshake timed out"))??;
        return exchange(TokioIo::new(stream), request).await;
    }
    exchange(TokioIo::new(stream), request).await
}

async fn exchange<I>(
    io: I,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), ChainError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(unavailable)?;
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

#[cfg(feature = "tls")]
mod tls {
    //! rustls with ring and Mozilla's roots: no system library, no process-wide provider.

    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    use super::unavailable;
    use crate::chain::ChainError;

    #[derive(Clone)]
    pub(super) struct Tls {
        name: ServerName<'static>,
        extra_roots: Vec<CertificateDer<'static>>,
        config: Arc<ClientConfig>,
    }

    impl Tls {
        pub(super) fn new(host: &str) -> Result<Self, ChainError> {
            let name = ServerName::try_from(host.to_owned()).map_err(unavailable)?;
            Ok(Self { name, extra_roots: Vec::new(), config: config(&[])? })
        }

        pub(super) fn add_root(&mut self, der: &[u8]) -> Result<(), ChainError> {
            self.extra_roots.push(CertificateDer::from(der.to_vec()));
            self.config = config(&self.extra_roots)?;
            Ok(())
        }

        pub(super) async fn connect(
            &self,
            stream: TcpStream,
        ) -> Result<TlsStream<TcpStream>, ChainError> {
            let connector = TlsConnector::from(Arc::clone(&self.config));
            connector.connect(self.name.clone(), stream).await.map_err(unavailable)
        }
    }

    fn config(extra: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, ChainError> {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for der in extra {
            roots.add(der.clone()).map_err(unavailable)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(unavailable)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The largest answer read from a backend: 32 MiB (a full block's JSON is far below it).
const MAX_BODY: usize = 32 * 1024 * 1024;
