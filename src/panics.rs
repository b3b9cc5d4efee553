//! What a panic prints. camflow catches a panic wherever it runs work that may panic (a
//! stage, a backend job, an executor task) and reports it as that work's failure, with the
//! panic's message and where it happened. Rust's default hook would first print the same panic
//! as a raw `thread '...' panicked at` line with a backtrace hint, which reads as a crash of
//! the whole run while the run goes on. [`install`] replaces it: the panic goes to the log
//! (`-vv`) and is kept for [`message`]; `cli::main` catches what nothing else does and reports it
//! as an internal error. Only a thread whose panics nobody catches (a named helper thread such
//! as the lease heartbeat) still prints one line itself.

use std::any::Any;
use std::sync::Mutex;

/// The last panic's message and location (`file:line`). One slot for the process: panics are
/// rare, and a catcher checks that the message is its own before it names the location.
static LAST: Mutex<Option<(String, String)>> = Mutex::new(None);

/// Installs the hook; once, at the start of `main`.
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let msg = payload_text(info.payload());
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_else(|| "an unknown place".into());
        tracing::debug!("panic at {at}: {msg}");
        if let Ok(mut last) = LAST.lock() {
            *last = Some((msg.clone(), at.clone()));
        }
        // Caught and reported: the main thread (by `cli::main`), the async runtime's threads
        // (every task's result is looked at), unnamed threads (rayon's workers, whose panic
        // rayon raises again in the thread that waits for it; scoped threads, joined by the
        // thread that spawned them). Any other named thread is on its own.
        let thread = std::thread::current();
        if let Some(name) = thread.name()
            && name != "main"
            && !name.starts_with("tokio-")
        {
            eprintln!("error: internal error in thread `{name}` (a bug in camflow; please report it): {msg} (at {at})");
        }
    }));
}

/// A caught panic's message, with where it happened when known: `assertion failed: ... (at
/// src/ml/cpu_kernels.rs:349)`.
pub fn message(payload: &(dyn Any + Send)) -> String {
    let msg = payload_text(payload);
    let at = LAST.lock().ok().and_then(|last| last.as_ref().filter(|(m, _)| *m == msg).map(|(_, at)| at.clone()));
    match at {
        Some(at) => format!("{msg} (at {at})"),
        None => msg,
    }
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_names_its_message_and_place() {
        install();
        let caught = std::panic::catch_unwind(|| panic!("the kernel's shapes disagree")).expect_err("it panics");
        let text = message(caught.as_ref());
        assert!(text.starts_with("the kernel's shapes disagree (at src/panics.rs:"), "{text}");
        let other: Box<dyn Any + Send> = Box::new(String::from("another panic"));
        assert_eq!(message(other.as_ref()), "another panic", "a location is only named for its own panic");
        let _ = std::panic::take_hook();
    }
}
