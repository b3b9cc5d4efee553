//! The cache: keys, the content-addressed store, per-key locks and external file digests.

pub mod file_digests;
pub mod key;
pub mod lock;
pub mod store;

pub use key::{CacheKey, KEY_FORMAT};
pub use store::{ActionRecord, Lookup, ObjectRef, Sidecar, Store, StoreError};
