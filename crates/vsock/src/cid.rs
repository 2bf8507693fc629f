//! Guest context ids (CIDs) for kernel vsock: unique among live VMs on the host, never
//! 0–2, and not handed out again until a cooldown has passed since their release.
//!
//! Three layers hold a CID, each released when the [`CidLease`] drops:
//! - in this process, a set of leased CIDs and the release time of cooling ones;
//! - across processes, an exclusive `flock` on `<lock_dir>/<cid>.lock`, which the
//!   kernel drops when the holder dies, so a crashed runtime leaks nothing. On release
//!   the file keeps the release time, so other processes honour the cooldown too;
//! - optionally the caller's own reservation (the QEMU backend passes one that calls
//!   `VHOST_VSOCK_SET_GUEST_CID` on `/dev/vhost-vsock`, the kernel's reservation).

use std::collections::{HashMap, HashSet};
use std::fs::{File, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// The lowest CID a guest may have (0 hypervisor, 1 local, 2 host).
pub const FIRST_GUEST_CID: u32 = 3;
/// The most candidates one allocation looks at before it gives up.
const MAX_SCAN: u64 = 65_536;

/// Settings of a [`CidAllocator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidOptions {
    /// The CIDs to hand out; must stay within `3..=u32::MAX - 1`.
    pub range: RangeInclusive<u32>,
    /// How long a released CID rests before it is handed out again (a guest's old
    /// connections must not reach its successor).
    pub cooldown: Duration,
    /// Where the per-CID lock files go (shared by every process that allocates on this
    /// host); `None` keeps the reservation to this process.
    pub lock_dir: Option<PathBuf>,
}

impl Default for CidOptions {
    fn default() -> Self {
        CidOptions {
            range: FIRST_GUEST_CID..=u32::MAX - 1,
            cooldown: Duration::from_secs(5),
            lock_dir: None,
        }
    }
}

/// What a reservation hook says about one CID.
#[derive(Debug)]
pub enum Reservation<T> {
    /// Reserved; the value (e.g. the vhost-vsock fd) is kept with the lease.
    Reserved(T),
    /// Someone else has it (e.g. `EADDRINUSE` from the kernel): try the next.
    Taken,
}

struct State {
    next: u32,
    leased: HashSet<u32>,
    cooling: HashMap<u32, Instant>,
}

struct Shared {
    opts: CidOptions,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the sets consistent before any call that could
        // panic, so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands out CIDs. Cheap to clone; clones share one allocator. Safe across threads, and
/// across processes when [`CidOptions::lock_dir`] is set.
///
/// Allocation does a few small file operations on the lock dir (meant to be on tmpfs,
/// e.g. `/run`); it does not wait on anything.
#[derive(Clone)]
pub struct CidAllocator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CidAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CidAllocator")
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

/// A CID held for one VM. Dropping it releases the CID into its cooldown.
pub struct CidLease<T = ()> {
    cid: u32,
    shared: Arc<Shared>,
    lock: Option<LockFile>,
    reservation: Option<T>,
}

impl<T> std::fmt::Debug for CidLease<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CidLease")
            .field("cid", &self.cid)
            .field("lock", &self.lock)
            .field("reserved", &self.reservation.is_some())
            .finish()
    }
}

impl<T> CidLease<T> {
    /// The CID.
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// What the reservation hook returned (e.g. the vhost-vsock fd to hand to QEMU).
    pub fn reservation(&self) -> Option<&T> {
        self.reservation.as_ref()
    }

    /// Takes the reservation's value out (the lease still holds the CID).
    pub fn take_reservation(&mut self) -> Option<T> {
        self.reservation.take()
    }
}

impl<T> Drop for CidLease<T> {
    fn drop(&mut self) {
        // The kernel reservation (if any) goes first, then the cross-process lock, then
        // the in-process set: the CID becomes visible as free in that order.
        self.reservation = None;
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
        let mut state = self.shared.lock();
        state.leased.remove(&self.cid);
        state.cooling.insert(self.cid, Instant::now());
    }
}

impl CidAllocator {
    /// An allocator with these settings; creates the lock dir if needed.
    ///
    /// # Errors
    /// [`Error::CidConfig`] for a range that is empty or includes 0–2 or `u32::MAX`, or
    /// a lock dir that cannot be created.
    pub fn new(opts: CidOptions) -> Result<CidAllocator> {
        let (first, last) = (*opts.range.start(), *opts.range.end());
        if first < FIRST_GUEST_CID || last == u32::MAX || first > last {
            return Err(Error::CidConfig(format!(
                "range {first}..={last} must be non-empty and within {FIRST_GUEST_CID}..={}",
                u32::MAX - 1
            )));
        }
        if let Some(dir) = &opts.lock_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::CidConfig(format!("create lock dir {}: {e}", dir.display())))?;
        }
        Ok(CidAllocator {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    next: first,
                    leased: HashSet::new(),
                    cooling: HashMap::new(),
                }),
                opts,
            }),
        })
    }

    /// The settings.
    pub fn options(&self) -> &CidOptions {
        &self.shared.opts
    }

    /// How many CIDs this allocator has out right now.
    pub fn leased(&self) -> usize {
        self.shared.lock().leased.len()
    }

    /// Whether `cid` is leased: by this allocator, or (with a lock dir) by any process
    /// holding its lock file — what a leak check asks once a VM has ended.
    pub fn in_use(&self, cid: u32) -> bool {
        if self.shared.lock().leased.contains(&cid) {
            return true;
        }
        let Some(dir) = &self.shared.opts.lock_dir else {
            return false;
        };
        // A lock file that cannot be opened is no lease (none was ever taken there).
        let Ok(file) = File::open(dir.join(format!("{cid}.lock"))) else {
            return false;
        };
        // Our own probe's lock is dropped with `file` at once.
        matches!(file.try_lock(), Err(TryLockError::WouldBlock))
    }

    /// The next free CID.
    ///
    /// # Errors
    /// [`Error::CidExhausted`], [`Error::CidLock`].
    pub fn allocate(&self) -> Result<CidLease> {
        self.allocate_with(|_| Ok(Reservation::Reserved(())))
    }

    /// The next free CID that `reserve` also accepts. `reserve` is called with each
    /// candidate that is free here and across processes; [`Reservation::Taken`] moves on
    /// to the next candidate, an error ends the allocation.
    ///
    /// # Errors
    /// [`Error::CidExhausted`], [`Error::CidLock`], [`Error::CidReserve`].
    pub fn allocate_with<T>(
        &self,
        mut reserve: impl FnMut(u32) -> io::Result<Reservation<T>>,
    ) -> Result<CidLease<T>> {
        let opts = &self.shared.opts;
        let (first, last) = (*opts.range.start(), *opts.range.end());
        let span = u64::from(last - first) + 1;
        let mut state = self.shared.lock();
        let now = Instant::now();
        let cooldown = opts.cooldown;
        state
            .cooling
            .retain(|_, at| now.duration_since(*at) < cooldown);
        let mut scanned = 0u64;
        while scanned < span.min(MAX_SCAN) {
            scanned += 1;
            let cid = state.next;
            state.next = if cid == last { first } else { cid + 1 };
            if state.leased.contains(&cid) || state.cooling.contains_key(&cid) {
                continue;
            }
            let lock = match &opts.lock_dir {
                None => None,
                Some(dir) => match LockFile::try_acquire(dir, cid, cooldown)? {
                    Some(lock) => Some(lock),
                    None => continue,
                },
            };
            match reserve(cid) {
                Ok(Reservation::Reserved(value)) => {
                    state.leased.insert(cid);
                    drop(state);
                    return Ok(CidLease {
                        cid,
                        shared: Arc::clone(&self.shared),
                        lock,
                        reservation: Some(value),
                    });
                }
                Ok(Reservation::Taken) => {
                    if let Some(lock) = lock {
                        lock.abandon();
                    }
                }
                Err(source) => {
                    if let Some(lock) = lock {
                        lock.abandon();
                    }
                    return Err(Error::CidReserve { cid, source });
                }
            }
        }
        Err(Error::CidExhausted {
            first,
            last,
            scanned,
        })
    }
}

/// An exclusively locked `<dir>/<cid>.lock`.
#[derive(Debug)]
struct LockFile {
    file: File,
    path: PathBuf,
}

impl LockFile {
    /// Locks the CID's file without waiting. `None` when another process holds it or
    /// released it less than `cooldown` ago.
    fn try_acquire(dir: &Path, cid: u32, cooldown: Duration) -> Result<Option<LockFile>> {
        let path = dir.join(format!("{cid}.lock"));
        let io_err = |source| Error::CidLock {
            cid,
            path: path.clone(),
            source,
        };
        // 0600, and a link planted at the name is refused, not followed.
        let mut file = vmkit_core::state_dir::open_private_rw(&path).map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let mut text = String::new();
        // An unreadable or foreign content counts as "no release time": free.
        let _ = file.read_to_string(&mut text);
        if let Some(ms) = text
            .strip_prefix("released ")
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            let released = UNIX_EPOCH + Duration::from_millis(ms);
            let resting = SystemTime::now()
                .duration_since(released)
                .unwrap_or(Duration::ZERO);
            if resting < cooldown {
                return Ok(None); // dropping `file` unlocks it
            }
        }
        let mut lock = LockFile {
            file,
            path: path.clone(),
        };
        lock.write(&format!("held by pid {}\n", std::process::id()))
            .map_err(io_err)?;
        Ok(Some(lock))
    }

    fn write(&mut self, text: &str) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())
    }

    /// Records the release time for other processes' cooldown, then unlocks (by
    /// closing the file).
    fn release(mut self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Err(e) = self.write(&format!("released {ms}\n")) {
            tracing::warn!(path = %self.path.display(), error = %e, "CID release time not recorded");
        }
    }

    /// Unlocks without recording a release: the CID was never used.
    fn abandon(mut self) {
        let _ = self.write("");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn opts(range: RangeInclusive<u32>, cooldown_ms: u64) -> CidOptions {
        CidOptions {
            range,
            cooldown: Duration::from_millis(cooldown_ms),
            lock_dir: None,
        }
    }

    #[test]
    fn never_hands_out_reserved_cids_and_rejects_bad_ranges() {
        #[allow(clippy::reversed_empty_ranges)] // the empty range is the point
        for range in [0..=10, 2..=10, 5..=4, 3..=u32::MAX] {
            let err = CidAllocator::new(opts(range.clone(), 0)).unwrap_err();
            assert!(err.to_string().starts_with("CID allocator: range"), "{err}");
        }
        let cids = CidAllocator::new(CidOptions::default()).unwrap();
        assert_eq!(cids.allocate().unwrap().cid(), 3);
    }

    #[test]
    fn a_released_cid_waits_for_its_cooldown() {
        let cids = CidAllocator::new(opts(3..=4, 300)).unwrap();
        let a = cids.allocate().unwrap();
        let b = cids.allocate().unwrap();
        assert_eq!((a.cid(), b.cid()), (3, 4));
        let err = cids.allocate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "allocate CID: none free in 3..=4 (2 tried)"
        );
        drop(a);
        assert!(
            cids.allocate().is_err(),
            "CID 3 was handed out again inside its cooldown"
        );
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(cids.allocate().unwrap().cid(), 3);
    }

    #[test]
    fn a_taken_cid_is_skipped_and_a_reservation_error_is_reported() {
        let cids = CidAllocator::new(opts(3..=10, 0)).unwrap();
        let lease = cids
            .allocate_with(|cid| {
                Ok(if cid < 6 {
                    Reservation::Taken
                } else {
                    Reservation::Reserved(cid * 10)
                })
            })
            .unwrap();
        assert_eq!((lease.cid(), lease.reservation()), (6, Some(&60)));
        let err = cids
            .allocate_with(|_| -> io::Result<Reservation<()>> {
                Err(io::Error::from_raw_os_error(13))
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("reserve CID 7: Permission denied"),
            "{err}"
        );
        assert_eq!(cids.leased(), 1);
    }

    #[test]
    fn lock_files_hold_across_allocators_and_keep_the_cooldown() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |cooldown| {
            CidAllocator::new(CidOptions {
                range: 3..=5,
                cooldown: Duration::from_millis(cooldown),
                lock_dir: Some(dir.path().into()),
            })
            .unwrap()
        };
        // Two allocators stand for two processes: flock is per open file, so they
        // exclude each other exactly as two processes would.
        let (one, two) = (mk(300), mk(300));
        let a = one.allocate().unwrap();
        let b = two.allocate().unwrap();
        assert_eq!((a.cid(), b.cid()), (3, 4));
        drop(a);
        // `two` never leased 3 itself, so only the lock file's release time stops it.
        assert_eq!(two.allocate().unwrap().cid(), 5);
        assert!(two.allocate().is_err(), "3 is cooling, 4 and 5 are held");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(two.allocate().unwrap().cid(), 3);
    }

    #[test]
    fn in_use_sees_leases_here_and_in_other_processes() {
        let dir = tempfile::tempdir().unwrap();
        let mk = || {
            CidAllocator::new(CidOptions {
                range: 3..=5,
                cooldown: Duration::ZERO,
                lock_dir: Some(dir.path().into()),
            })
            .unwrap()
        };
        let (one, two) = (mk(), mk());
        let lease = one.allocate().unwrap();
        assert!(one.in_use(3), "leased here");
        assert!(two.in_use(3), "its lock file is held elsewhere");
        assert!(!two.in_use(4), "never leased");
        drop(lease);
        assert!(!one.in_use(3) && !two.in_use(3), "released");
        assert_eq!(two.allocate().unwrap().cid(), 3, "the probe took no lease");
    }
}
