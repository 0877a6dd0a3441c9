//! The error of a system outside the crate, kept whole.

use core::fmt;
use std::error::Error;
use std::sync::Arc;

/// What a backend — a database, a chain node, a file system, a wallet — reported: the
/// original error, kept as the `source()` of the crate's error so that a report shows its
/// whole chain of causes. Cheap to clone; two are equal when their messages are.
///
/// Implementers of [`ChannelStore`](crate::store::ChannelStore),
/// [`ChainBackend`](crate::chain::ChainBackend), `ClientStore` and `Wallet` build it from their
/// own errors, or from a message.
///
/// # Examples
///
/// ```
/// use std::error::Error as _;
/// use paychan::BackendError;
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = BackendError::new(io);
/// assert_eq!(error.to_string(), "connection refused");
/// assert!(error.get_ref().downcast_ref::<std::io::Error>().is_some());
/// assert_eq!(BackendError::new("disk full"), BackendError::new("disk full"));
/// # let _ = error.source();
/// ```
#[derive(Clone)]
pub struct BackendError(Arc<dyn Error + Send + Sync>);

impl BackendError {
    /// Wraps `error`: any error, or a message (`&str`, `String`).
    pub fn new(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self(Arc::from(error.into()))
    }

    /// The original error (downcast it to inspect a backend's own error type).
    pub fn get_ref(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.to_string() == other.to_string()
    }
}

impl Eq for BackendError {}

impl Error for BackendError {
    /// The original error's own cause: this type is transparent, its message is the original
    /// error's.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}
