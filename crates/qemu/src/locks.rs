//! Locking a `std` mutex, also when a panicking holder poisoned it.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, also when a panicking holder poisoned it. Every critical section in
/// this crate is a few field reads and writes: a panic cannot leave the data
/// half-updated, so a poisoned lock is safe to keep using.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
