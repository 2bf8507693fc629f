//! # vmkit-benches
//!
//! Benchmarks of vmkit, each against a baseline measured in the same run (these
//! machines are noisy, so only same-run ratios mean anything). Run them with
//! `cargo xtask bench` (or `cargo bench -p vmkit-benches`).
//!
//! - `qmp`: `query-status` latency through vmkit-qmp vs a minimal raw JSON-lines client
//!   on the same paused QEMU, interleaved; and 16 concurrent callers' throughput vs the
//!   raw client's sequential throughput.
//! - `boot`: spawn → guest ready, vmkit vs a bare QEMU command line.
//! - `guest`: TTRPC `Ping` vs a raw hybrid-vsock echo round trip, and stream throughput
//!   through vmkit vs bare frames on a hand-driven connection, on one VM.
//! - `hotplug`: command to guest-visible for vCPUs, memory and disks, vs the raw QMP
//!   sequence.
//! - `plugin`: the QEMU backend static, from its library and out of process:
//!   start → agent ready and `Ping` (each plugin within 1.05x of static), and the cost
//!   of `state()` and `vm_info()` per transport.
//! - `process`: process spawn → exit and stdout throughput through `vmkit-process`, vs
//!   `Exec` and a raw exec stream.
//! - `shares`: a 256 MiB file and 2,000 small files read over virtio-fs, virtio-9p and
//!   a virtio-blk disk (virtio-fs must beat 9p on both).
//! - `containerd`: `ctr run --rm <image> true` through vmkit's shim, vs runc and vs a
//!   plain vmkit start of the same guest (the shim within 1.15x of the plain VM).
//! - `soak`: 50 start/stop cycles of the test guest with its agent (and a TAP NIC where
//!   possible); target: no process, fd, socket, lock file or TAP left.
//!
//! ```text
//! cargo bench -p vmkit-benches --bench qmp -- --check   # exit 1 when a target is missed
//! ```

/// The runtime every benchmark runs on: multi-threaded with 2 workers, like the
/// machines it was measured on.
///
/// # Errors
/// The runtime cannot be built (out of threads or fds).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Whether `--check` was given: exit non-zero when a target is missed.
pub fn check_requested() -> bool {
    std::env::args().any(|a| a == "--check")
}

/// Ends a benchmark: exit code 1 when `--check` was given and `targets_met` is false.
pub fn finish(targets_met: bool) {
    if check_requested() && !targets_met {
        std::process::exit(1);
    }
}

/// Percentile `p` (0–100) of `samples`, which must be sorted; `None` when empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied()
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(51));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }
}
