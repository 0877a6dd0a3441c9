//! [`Hooked`]: a memory store whose every operation first runs a hook, which may fail it or
//! act on the store first, and whose replies may be lost after the operation happened — the
//! tests' failing, flaky, racing and lossy stores, in one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bitcoin::Transaction;
use paychan::MilliSats;
use paychan::channel::ChannelState;
use paychan::channel::CheckedPayment;
use paychan::store::ops::Debit;
use paychan::store::ops::DebitOnce;
use paychan::store::ops::IdempotencyClaim;
use paychan::store::ops::Lease;
use paychan::store::ops::LeaseRequest;
use paychan::store::ops::StorePayment;
use paychan::store::{ChannelRecord, ChannelStore, MemoryStore, StoreError};
use paychan::wire::ChannelId;

/// The operation a hook is about to let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Load,
    StorePayment,
    Debit,
    Pay,
    DebitOnce,
    FinishOnce,
    CloseWith,
    Credit,
    /// A transition of `id` to `to`.
    Transition {
        id: ChannelId,
        to: ChannelState,
    },
    NextKeyIndex,
    List,
    Lease,
    ExpireLeases,
}

pub type HookFuture = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;
type Hook = Arc<dyn Fn(Op) -> HookFuture + Send + Sync>;
type Lost = Arc<dyn Fn(Op) -> bool + Send + Sync>;

/// A [`MemoryStore`] behind a hook.
#[derive(Clone)]
pub struct Hooked {
    pub inner: MemoryStore,
    hook: Hook,
    lost: Lost,
}

impl Hooked {
    /// `inner`, each operation of which first awaits `hook(op)`: an error fails the operation
    /// with nothing changed.
    pub fn new(
        inner: MemoryStore,
        hook: impl Fn(Op) -> HookFuture + Send + Sync + 'static,
    ) -> Self {
        Self { inner, hook: Arc::new(hook), lost: Arc::new(|_| false) }
    }

    /// The same store, whose operations happen but answer an error while `lost(op)` says
    /// so (a reply lost on the network after the store applied the operation).
    #[allow(dead_code)]
    pub fn losing_replies(mut self, lost: impl Fn(Op) -> bool + Send + Sync + 'static) -> Self {
        self.lost = Arc::new(lost);
        self
    }

    /// `inner`, whose operations fail while `fails(op)` says so.
    pub fn failing(inner: MemoryStore, fails: impl Fn(Op) -> bool + Send + Sync + 'static) -> Self {
        Self::new(inner, move |op| {
            let failed = fails(op).then(|| StoreError::unavailable("scripted failure"));
            Box::pin(std::future::ready(failed.map_or(Ok(()), Err)))
        })
    }
}

macro_rules! hooked {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty => $op:expr;)*) => {
        impl ChannelStore for Hooked {
            $(fn $name(&self, $($arg: $ty),*) -> impl Future<Output = Result<$out, StoreError>> + Send {
                let op = $op;
                let hook = (self.hook)(op);
                async move {
                    hook.await?;
                    let out = self.inner.$name($($arg),*).await;
                    if (self.lost)(op) {
                        return Err(StoreError::unavailable("the reply was lost"));
                    }
                    out
                }
            })*
        }
    };
}

hooked! {
    create(record: ChannelRecord) -> () => Op::Create;
    load(id: ChannelId) -> Option<ChannelRecord> => Op::Load;
    store_payment(id: ChannelId, payment: Transaction) -> StorePayment => Op::StorePayment;
    debit(id: ChannelId, amount: MilliSats) -> Debit => Op::Debit;
    pay(id: ChannelId, payment: CheckedPayment, amount: MilliSats) -> Debit => Op::Pay;
    debit_once(id: ChannelId, amount: MilliSats, claim: &IdempotencyClaim) -> DebitOnce => Op::DebitOnce;
    finish_once(id: ChannelId, claim: &IdempotencyClaim, response: Option<Vec<u8>>, expires_at: u64) -> () => Op::FinishOnce;
    close_with(id: ChannelId, payment: CheckedPayment) -> bool => Op::CloseWith;
    credit(id: ChannelId, amount: MilliSats) -> MilliSats => Op::Credit;
    transition(id: ChannelId, from: ChannelState, to: ChannelState) -> bool => Op::Transition { id, to };
    next_key_index() -> u32 => Op::NextKeyIndex;
    list(state: ChannelState) -> Vec<ChannelRecord> => Op::List;
    lease(id: ChannelId, request: LeaseRequest) -> Lease => Op::Lease;
    expire_leases(now: u64) -> MilliSats => Op::ExpireLeases;
}
