//! Top-level errors and the one table of exit codes.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (also: stdout closed early, e.g. piped into `head`) |
//! | 1    | one or more stage instances failed |
//! | 2    | bad usage or an invalid pipeline spec |
//! | 3    | `verify` found corrupt or missing cache entries |
//! | 4    | `run --locked`: a cache key differs from the lock file |
//! | 5    | the cache or another file could not be read or written |
//! | 130  | interrupted (Ctrl-C); the cache stays consistent and the next run resumes |

use crate::spec::SpecErrors;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Spec(#[from] SpecErrors),
    #[error("{0}")]
    Usage(String),
    #[error("{failed} instance(s) failed")]
    StagesFailed { failed: usize },
    #[error("verify found {0} problem(s)")]
    VerifyFailed(usize),
    #[error("--locked: {0}")]
    LockMismatch(String),
    #[error("{0}")]
    Io(String),
    #[error("interrupted; finished work is cached and the next run resumes")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::StagesFailed { .. } => 1,
            Error::Spec(_) | Error::Usage(_) => 2,
            Error::VerifyFailed(_) => 3,
            Error::LockMismatch(_) => 4,
            Error::Io(_) => 5,
            Error::Interrupted => 130,
        }
    }
}

impl From<crate::cache::StoreError> for Error {
    fn from(e: crate::cache::StoreError) -> Self {
        Error::Io(e.to_string())
    }
}
