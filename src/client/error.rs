//! Why a client operation failed.

use core::fmt;

use bitcoin::Amount;

use super::steps::{Misbehavior, StepError};
use super::{BoundExceeded, ClientStoreError, PolicyRefusal, WalletError};
use crate::MilliSats;
use crate::chain::ChainError;
use crate::channel::{PaymentError, SignError};
use crate::wire::{Problem, ProblemCode};

/// Why a client operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// A payment must pay the server more than the latest one.
    NotAnIncrease {
        /// Paid so far.
        paid: Amount,
        /// Asked for.
        requested: Amount,
    },
    /// The payment cannot be built (dust, or more than the channel holds).
    Payment(PaymentError),
    /// The key does not belong to the channel.
    Sign(SignError),
    /// The client store failed; the payment was not sent.
    Store(ClientStoreError),
    /// The chain backend failed.
    Chain(ChainError),
    /// The spending policy refused.
    Policy(PolicyRefusal),
    /// A channel must be opened, and the client has no [`Wallet`](super::Wallet) to fund it.
    NoWallet,
    /// There is no channel to act on.
    NoChannel,
    /// The operation needs the client's own chain view
    /// ([`PayerBuilder::chain`](super::PayerBuilder::chain)).
    NoChainView,
    /// [`Payer::open`](super::Payer::open) or [`Payer::close`](super::Payer::close) was called
    /// on a payer built without a transport
    /// ([`PayerBuilder::transport`](super::PayerBuilder::transport)).
    NoTransport,
    /// The wallet failed to fund or sign the funding transaction.
    Wallet(WalletError),
    /// The server's refund signature does not verify: the channel was abandoned before the
    /// funding was signed, and no money moved.
    InvalidRefundSignature,
    /// The server answered something the protocol does not allow (a proposal that differs
    /// from the request, a settlement that is not the client's payment, …).
    ServerMisbehaved(Misbehavior),
    /// The server refused, and the client cannot or may not fix it by paying.
    Rejected {
        /// The response's status.
        status: http::StatusCode,
        /// The problem's code (`urn:paychan:problem:<code>`); an empty
        /// [`Rule`](ProblemCode::Rule) if the body was not a problem document.
        code: ProblemCode,
        /// The problem's detail.
        detail: String,
    },
    /// The server charged more than the policy's `max_per_request` for the requests the
    /// client sent (read from its `Payment-Channel-Balance`): the payer pays it no more.
    Overcharged {
        /// What the server charged since the client started watching the channel.
        charged: MilliSats,
        /// The most the policy allowed for the requests sent meanwhile.
        allowed: MilliSats,
    },
    /// The HTTP client failed.
    Transport(tower::BoxError),
    /// The server is not `http(s)://host[:port]`.
    InvalidOrigin(String),
    /// A client key could not be derived.
    Key(bitcoin::bip32::Error),
    /// The server asked for a payment beyond the client's loss bound: more than what the
    /// client counted served, one price and `max_prepaid` (see
    /// [`LossBound`](super::LossBound)). Nothing was signed.
    BoundExceeded(BoundExceeded),
    /// The server's 402 asks for another payment scheme than paychan's `bitcoin-channel`
    /// (`L402`, `x402`, another `Payment` method): nothing was paid.
    ForeignScheme {
        /// The scheme it asks for.
        scheme: String,
    },
    /// The reqwest client under `PaymentMiddleware` is not known to keep redirects on the
    /// payer's origin, so the payment header was not sent: build it with
    /// `PaymentMiddleware::client` (or declare it with `PaymentMiddleware::redirects_checked`).
    RedirectsNotChecked,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnIncrease { paid, requested } => {
                write!(f, "a payment of {requested} does not exceed the {paid} already paid")
            }
            Self::Payment(e) => write!(f, "cannot build the payment: {e}"),
            Self::Sign(e) => write!(f, "cannot sign: {e}"),
            Self::Store(e) => write!(f, "client store: {e}"),
            Self::Chain(e) => write!(f, "chain: {e}"),
            Self::Policy(e) => write!(f, "spending policy: {e}"),
            Self::NoWallet => f.write_str("a channel must be opened and there is no wallet"),
            Self::NoChannel => f.write_str("no channel with this server"),
            Self::NoChainView => f.write_str("the payer has no chain view (PayerBuilder::chain)"),
            Self::NoTransport => {
                f.write_str("the payer has no transport (PayerBuilder::transport)")
            }
            Self::Wallet(e) => write!(f, "wallet: {e}"),
            Self::InvalidRefundSignature => {
                f.write_str("the server's refund signature is invalid; the channel was abandoned")
            }
            Self::ServerMisbehaved(what) => write!(f, "the server broke the protocol: {what}"),
            Self::Rejected { status, code, detail } => {
                write!(f, "the server refused ({status}, {code}): {detail}")
            }
            Self::Overcharged { charged, allowed } => write!(
                f,
                "the server charged {charged}, more than the {allowed} the policy allows for the \
                 requests sent: paying it no more"
            ),
            Self::Transport(e) => write!(f, "http: {e}"),
            Self::InvalidOrigin(origin) => {
                write!(f, "{origin:?} is not an http(s)://host[:port] origin")
            }
            Self::Key(e) => write!(f, "key derivation: {e}"),
            Self::BoundExceeded(e) => write!(f, "loss bound: {e}"),
            Self::ForeignScheme { scheme } => write!(
                f,
                "this server asks for {scheme}; paychan pays bitcoin-channel (payment channels): \
                 nothing was paid"
            ),
            Self::RedirectsNotChecked => f.write_str(
                "the reqwest client may follow a redirect off the payer's origin with the payment \
                 header: build it with PaymentMiddleware::client",
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Payment(e) => Some(e),
            Self::Sign(e) => Some(e),
            Self::Store(e) => Some(e),
            Self::Chain(e) => Some(e),
            Self::Policy(e) => Some(e),
            Self::Wallet(e) => Some(e),
            Self::Transport(e) => Some(&**e),
            Self::Key(e) => Some(e),
            Self::BoundExceeded(e) => Some(e),
            _ => None,
        }
    }
}

impl From<PolicyRefusal> for ClientError {
    fn from(refusal: PolicyRefusal) -> Self {
        Self::Policy(refusal)
    }
}

impl From<StepError> for ClientError {
    fn from(error: StepError) -> Self {
        match error {
            StepError::Policy(refusal) => Self::Policy(refusal),
            StepError::Misbehaved(what) => Self::ServerMisbehaved(what),
            StepError::Bound(exceeded) => Self::BoundExceeded(exceeded),
            StepError::Overcharged { charged, allowed } => Self::Overcharged { charged, allowed },
            funds @ (StepError::InsufficientFunds { .. }
            | StepError::NotOurCoin { .. }
            | StepError::InvalidFunding(_)) => Self::Wallet(WalletError::new(funds)),
        }
    }
}

impl From<Problem> for ClientError {
    /// A refusal the client does not act on.
    fn from(problem: Problem) -> Self {
        Self::Rejected { status: problem.status_code(), code: problem.code, detail: problem.detail }
    }
}
