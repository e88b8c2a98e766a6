//! SIGTERM and SIGINT as a flag the work loop polls, so a stop is clean: the partial
//! archive is removed and the exit is prompt, well inside baqup-run's `--grace`.
//!
//! The standard library has no signal API, so the C library's `signal(2)` is declared
//! here (std links the C library anyway). The handler only stores the signal number in
//! an atomic: nothing else is async-signal-safe.

use std::sync::atomic::{AtomicI32, Ordering};

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;
const SIG_ERR: usize = !0;

static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
}

extern "C" fn record(signum: i32) {
    RECEIVED.store(signum, Ordering::SeqCst);
}

/// Install the handlers; false when the C library refused (then a signal kills us
/// outright, which baqup-run also reports as ABORTED).
pub fn install() -> bool {
    // SAFETY: `record` is async-signal-safe (one atomic store) and lives forever.
    unsafe { signal(SIGTERM, record) != SIG_ERR && signal(SIGINT, record) != SIG_ERR }
}

/// The stop signal received so far, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signum => Some(signum),
    }
}
