//! The cache: keys, the content-addressed store, its locks and external file digests.

pub mod file_digests;
pub mod key;
pub mod lease;
pub mod lock;
pub mod store;
pub mod verified;

pub use key::{CacheKey, KEY_FORMAT};
pub use lock::{CacheLock, KeyLock};
pub use store::{ActionRecord, Lookup, ObjectRef, RecordError, Sidecar, Store, StoreError};
