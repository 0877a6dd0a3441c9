//! The client side's foundation: a paying channel's state, the stores that keep it (saved
//! **before** a new payment leaves the process), the spending policy, and the refund.
//!
//! The HTTP integration (a tower layer for hyper-util clients, a reqwest middleware, opening
//! channels and topping up on 402) builds on these; see the README for its status.

mod policy;
mod state;
mod store;

pub use policy::{PolicyRefusal, SpendingPolicy};
pub use state::{ClientChannel, ClientError};
pub use store::{ClientStore, ClientStoreError, FileClientStore, MemoryClientStore};
