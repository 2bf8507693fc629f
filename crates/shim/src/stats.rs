//! `Stats`: the container's cgroup v2 counters in the guest, as containerd's
//! `io.containerd.cgroups.v2.Metrics` — CPU time and throttling, memory use and limit,
//! pids. Read by a shell of the guest image's busybox from the cgroup of the
//! container's init process.

use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use vmkit_process::Command;

/// The guest command that prints what [`parse`] reads, for the container whose init
/// process has guest pid `pid`.
pub(crate) fn command(pid: u32) -> Command {
    let script = format!(
        "d=/sys/fs/cgroup$(cut -d: -f3 /proc/{pid}/cgroup) && cat $d/cpu.stat && \
         echo memory $(cat $d/memory.current) $(cat $d/memory.max) && \
         echo pids $(cat $d/pids.current) $(cat $d/pids.max)"
    );
    Command::new(["/bin/busybox", "sh", "-c", script.as_str()])
}

/// The metrics in `text` (`cpu.stat`'s lines, then `memory <current> <max>` and
/// `pids <current> <max>`; `max` is no limit, 0). What it does not hold stays 0.
pub(crate) fn parse(text: &str) -> Metrics {
    let mut cpu = CPUStat::new();
    let mut memory = MemoryStat::new();
    let mut pids = PidsStat::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| {
            words
                .get(i)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match words.first().copied() {
            Some("usage_usec") => cpu.usage_usec = n(1),
            Some("user_usec") => cpu.user_usec = n(1),
            Some("system_usec") => cpu.system_usec = n(1),
            Some("nr_periods") => cpu.nr_periods = n(1),
            Some("nr_throttled") => cpu.nr_throttled = n(1),
            Some("throttled_usec") => cpu.throttled_usec = n(1),
            Some("memory") => (memory.usage, memory.usage_limit) = (n(1), n(2)),
            Some("pids") => (pids.current, pids.limit) = (n(1), n(2)),
            _ => {}
        }
    }
    let mut metrics = Metrics::new();
    metrics.cpu = Some(cpu).into();
    metrics.memory = Some(memory).into();
    metrics.pids = Some(pids).into();
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_become_metrics() {
        let text = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\n\
                    nr_throttled 1\nthrottled_usec 20\nmemory 4096 max\npids 2 10\n";
        let m = parse(text);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.system_usec, 500);
        assert_eq!(m.cpu.nr_throttled, 1);
        assert_eq!(
            (m.memory.usage, m.memory.usage_limit),
            (4096, 0),
            "max is no limit"
        );
        assert_eq!((m.pids.current, m.pids.limit), (2, 10));
        let empty = parse("garbage\nmemory x\n");
        assert_eq!(empty.cpu.usage_usec, 0);
        assert_eq!(empty.memory.usage, 0);
    }
}
