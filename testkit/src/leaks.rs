//! What a test counts to prove nothing was left behind: this process's children
//! (zombies included), its open fds, processes whose command line names a path (a VM's
//! state dir names its QEMU and vsock daemon), and all a VM can leave in its state dir
//! ([`left_by`]). Linux `/proc` readers; an unreadable entry counts as absent.

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

/// What a VM of `config` left behind once it ended, each as a sentence: processes
/// whose command line names its state dir (the VMM, its helpers; zombies aside), files
/// under the state dir that a process holds open, Unix sockets bound under it (open in
/// any process, per `/proc/net/unix`) or socket files left in it, its lock still held,
/// and, with `info` (what the VM reported while it ran), its VMM process alive.
pub fn left_by(
    config: &vmkit_core::InstanceConfig,
    info: Option<&vmkit_core::VmInfo>,
) -> Vec<String> {
    let dir = &config.state_dir;
    let mut left = Vec::new();
    for pid in processes_mentioning(dir) {
        if pid != std::process::id() {
            left.push(format!(
                "process {pid} ({}) names the state dir",
                command_line(pid)
            ));
        }
    }
    for (pid, file) in open_files_under(dir) {
        left.push(format!("process {pid} holds {} open", file.display()));
    }
    for socket in bound_sockets_under(dir) {
        left.push(format!("a Unix socket is still bound at {socket}"));
    }
    for socket in socket_files_under(dir) {
        left.push(format!("the socket file {} is left", socket.display()));
    }
    if dir.is_dir()
        && let Err(e) = config
            .layout()
            .lock("check the state dir's lock", "vmkit-testkit")
    {
        left.push(format!("the state dir's lock is still held: {e}"));
    }
    if let Some(pid) = info.and_then(|i| i.pid)
        && alive(pid)
    {
        left.push(format!("the VMM process {pid} is alive"));
    }
    left
}

/// Whether `pid` runs (it exists and is no zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|at| stat.get(at + 2..))
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// A process's command line, its arguments joined by spaces.
fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Files under `dir` that some process holds open, with the process.
fn open_files_under(dir: &Path) -> Vec<(u32, std::path::PathBuf)> {
    let mut open = Vec::new();
    for pid in pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.starts_with(dir)
            {
                open.push((pid, target));
            }
        }
    }
    open
}

/// Unix sockets bound under `dir` that are still open in some process.
fn bound_sockets_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        // "Num RefCount Protocol Flags Type St Inode Path": the path is the 8th field.
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter(|path| path.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Socket files anywhere under `dir`.
fn socket_files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(next) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => todo.push(entry.path()),
                Ok(t) if t.is_socket() => found.push(entry.path()),
                _ => {}
            }
        }
    }
    found
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
