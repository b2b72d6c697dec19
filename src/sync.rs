//! Locks that survive a panicking holder. Every shared structure guarded
//! here (stream lists, counters, the MP3 ring) stays usable after a panic
//! elsewhere: losing one update matters less than stopping the service, so a
//! poisoned lock is taken over instead of propagating the panic.

use std::sync::{Condvar, Mutex, MutexGuard, WaitTimeoutResult};
use std::time::Duration;

/// Locks `m`, recovering it if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv`, recovering the lock if a holder panicked.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` at most `limit`, recovering the lock if a holder panicked.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    limit: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(guard, limit)
        .unwrap_or_else(|e| e.into_inner())
}
