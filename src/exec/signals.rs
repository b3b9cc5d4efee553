//! SIGINT, SIGTERM and SIGHUP as one stream, so every way of running stops alike on each.
//! SIGHUP (the terminal or ssh session closed) stops a run as cleanly as Ctrl-C: without it
//! the process died at once, with no summary and pending work unaccounted for.

/// SIGINT, SIGTERM and SIGHUP as one stream of signal numbers.
pub(crate) struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(crate) fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                int: signal(SignalKind::interrupt()).ok(),
                term: signal(SignalKind::terminate()).ok(),
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The number of the next signal; never returns if none can be received.
    pub(crate) async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = recv(&mut self.int) => 2,
                _ = recv(&mut self.term) => 15,
                _ = recv(&mut self.hup) => 1,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            2
        }
    }
}

