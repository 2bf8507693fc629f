//! What a test counts to prove nothing was left behind: this process's children
//! (zombies included), its open fds, and processes whose command line names a path
//! (a VM's state dir names its QEMU and vsock daemon). Linux `/proc` readers; an
//! unreadable entry counts as absent.

use std::path::Path;

/// Pids whose parent is this process, zombies included.
pub fn children() -> Vec<u32> {
    let me = std::process::id();
    pids().filter(|pid| parent_of(*pid) == Some(me)).collect()
}

/// How many fds this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Processes whose command line mentions `needle` (e.g. a VM's state dir).
pub fn processes_mentioning(needle: impl AsRef<Path>) -> Vec<u32> {
    let needle = needle.as_ref().display().to_string();
    pids()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
        })
        .collect()
}

/// Every pid in `/proc`.
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
}

/// The parent of `pid`, from `/proc/<pid>/stat` ("pid (comm) state ppid …"; comm may
/// hold spaces and parentheses, so split after the last ')').
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_counted_until_reaped_and_found_by_its_arguments() {
        let marker = format!("vmkit-leaks-test-{}", std::process::id());
        // A shell builtin that waits on stdin: no grandchild shares the marker.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read line", &marker])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(children().contains(&pid));
        // Until the child has exec'd, its command line is still ours.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while processes_mentioning(&marker).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(processes_mentioning(&marker), [pid]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children().contains(&pid));
        assert!(processes_mentioning(&marker).is_empty());
    }
}
