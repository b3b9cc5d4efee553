//! Top-level errors and the one table of exit codes.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (also: stdout closed early, e.g. piped into `head`) |
//! | 1    | one or more stage instances failed |
//! | 2    | bad usage or an invalid pipeline spec (or executor settings Slurm refuses) |
//! | 3    | `verify` found corrupt or missing cache entries |
//! | 4    | `run --locked`: a cache key, output or metric differs from the lock file; `diff`: the two sides diverged |
//! | 5    | the cache or another file could not be read or written |
//! | 6    | `gc`: a `camflow run` is using the cache (nothing was removed; `--wait` waits) |
//! | 101  | an internal error (a bug in camflow) |
//! | 130  | interrupted (Ctrl-C, SIGINT); the cache stays consistent and the next run resumes |
//! | 143  | terminated (SIGTERM, as Slurm and systemd send): handled like Ctrl-C |
//! | 129  | hung up (SIGHUP: the terminal or ssh session closed): handled like Ctrl-C |

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
    #[error("diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Io(String),
    /// Stopped by a signal (its number: 2 for SIGINT, 15 for SIGTERM).
    #[error("{}; finished work is cached and the next run resumes", match *signal {
        15 => "terminated (SIGTERM)",
        1 => "hung up (SIGHUP: the terminal or session closed)",
        _ => "interrupted",
    })]
    Interrupted { signal: i32 },
    #[error("{0}")]
    Busy(String),
    #[error("internal error (a bug in camflow): {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::StagesFailed { .. } => 1,
            Error::Spec(_) | Error::Usage(_) => 2,
            Error::VerifyFailed(_) => 3,
            Error::LockMismatch(_) | Error::Diverged(_) => 4,
            Error::Io(_) => 5,
            Error::Busy(_) => 6,
            Error::Internal(_) => 101,
            Error::Interrupted { signal } => 128 + signal,
        }
    }
}

impl From<crate::cache::StoreError> for Error {
    fn from(e: crate::cache::StoreError) -> Self {
        Error::Io(e.to_string())
    }
}
