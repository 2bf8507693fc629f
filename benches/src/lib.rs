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
//! - `shares`: a 256 MiB file and 1,000 small files read over virtio-fs, virtio-9p and
//!   a virtio-blk disk (virtio-fs must beat 9p on both).
//! - `containerd`: `ctr run --rm <image> true` through vmkit's shim, vs runc and vs a
//!   plain vmkit start of the same guest (the shim within 1.15x of the plain VM).
//! - `fleet`: 8 VMs started at once vs one after another, and the host memory per idle
//!   instance (the vmkit process's RSS growth per VM; target at most 1 MiB).
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

/// The environment variable naming the file rows are appended to (`cargo xtask bench`
/// sets it, then builds `target/bench/report.md` and `report.json` from the rows).
pub const ROWS_ENV: &str = "VMKIT_BENCH_ROWS";

/// One row of the benchmark table: a figure of vmkit's, the same-run baseline it is
/// measured against, their ratio and the target, if the row has one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// The benchmark (`qmp`, `boot`, …).
    pub bench: String,
    /// What was measured.
    pub what: String,
    /// The unit of `vmkit` and `baseline` (`ms`, `µs`, `MiB/s`, `/s`, `MiB`).
    pub unit: String,
    /// vmkit's figure.
    pub vmkit: f64,
    /// What the baseline is.
    pub baseline_name: Option<String>,
    /// The baseline's figure, same run.
    pub baseline: Option<f64>,
    /// `vmkit / baseline`.
    pub ratio: Option<f64>,
    /// The target, as words (`ratio <= 1.10`).
    pub target: Option<String>,
    /// Whether the target was met.
    pub met: Option<bool>,
    /// How many runs (samples, rounds) the figure is from.
    pub runs: usize,
}

impl Row {
    /// vmkit's `value` in `unit`, from `runs` runs, with no baseline yet.
    pub fn new(bench: &str, what: &str, unit: &str, value: f64, runs: usize) -> Row {
        Row {
            bench: bench.to_owned(),
            what: what.to_owned(),
            unit: unit.to_owned(),
            vmkit: value,
            baseline_name: None,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
            runs,
        }
    }

    /// Against `baseline` (`name` says what it is); the ratio is vmkit / baseline.
    #[must_use]
    pub fn against(mut self, name: &str, baseline: f64) -> Row {
        self.baseline_name = Some(name.to_owned());
        self.baseline = Some(baseline);
        self.ratio = (baseline != 0.0).then(|| self.vmkit / baseline);
        self
    }

    /// The target: the ratio at most `limit`.
    #[must_use]
    pub fn ratio_at_most(mut self, limit: f64) -> Row {
        self.target = Some(format!("ratio <= {limit}"));
        self.met = self.ratio.map(|r| r <= limit);
        self
    }

    /// The target: the ratio at least `limit`.
    #[must_use]
    pub fn ratio_at_least(mut self, limit: f64) -> Row {
        self.target = Some(format!("ratio >= {limit}"));
        self.met = self.ratio.map(|r| r >= limit);
        self
    }

    /// The target: vmkit's figure at most `limit` (in its unit).
    #[must_use]
    pub fn at_most(mut self, limit: f64) -> Row {
        self.target = Some(format!("<= {limit} {}", self.unit));
        self.met = Some(self.vmkit <= limit);
        self
    }

    /// Appends the row to the file `$VMKIT_BENCH_ROWS` names (one JSON line), if set.
    /// A row that cannot be written is said on stderr: the benchmark's own output
    /// stands.
    pub fn record(&self) {
        let Some(path) = std::env::var_os(ROWS_ENV) else {
            return;
        };
        let written = serde_json::to_string(self)
            .map_err(std::io::Error::other)
            .and_then(|line| {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                writeln!(file, "{line}")
            });
        if let Err(e) = written {
            eprintln!("bench row for {:?} not recorded: {e}", self.what);
        }
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
    use super::{Row, percentile};

    #[test]
    fn a_row_s_ratio_and_target() {
        let row = Row::new("qmp", "latency p50", "µs", 110.0, 2000)
            .against("raw client", 100.0)
            .ratio_at_most(1.10);
        assert_eq!(row.ratio.map(|r| (r * 1000.0).round()), Some(1100.0));
        assert_eq!(row.met, Some(true));
        let row = Row::new("x", "y", "MiB", 2.0, 8).at_most(1.0);
        assert_eq!(
            (row.met, row.target.as_deref()),
            (Some(false), Some("<= 1 MiB"))
        );
        let row = Row::new("x", "y", "/s", 1.0, 1)
            .against("z", 0.0)
            .ratio_at_least(1.8);
        assert_eq!((row.ratio, row.met), (None, None));
    }

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
