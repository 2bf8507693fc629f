//! What the serial console says: the guest's ready line (a start without an agent
//! waits for it) and, when QEMU exits during a start, why — a guest kernel panic, a
//! guest reset, or QEMU's own failure.

use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::sleep;
use vmkit_core::Error as CoreError;

use crate::error::Error;
use crate::process::{ProcessExit, tail};
use crate::vm::{STDERR_LINES, Vm};

/// How often the serial console log is checked for the ready line.
const READY_POLL: Duration = Duration::from_millis(5);

/// Why QEMU exited before the VM was running: a guest kernel panic (its line on the
/// console), a guest reset (QEMU's SHUTDOWN event said so), or QEMU's own failure (its
/// stderr).
pub(super) async fn exited_early(vm: &Vm, exit: ProcessExit) -> CoreError {
    let layout = vm.config().layout();
    let status = exit.to_string();
    let console = tail(&layout.console_log(), CONSOLE_SCAN_LINES).await;
    let reset = vm.guest_reset();
    let error = if let Some(console) = panic_report(&console) {
        Error::GuestPanickedAtStart { status, console }
    } else if reset {
        let lines: Vec<&str> = console.lines().collect();
        Error::GuestResetAtStart {
            status,
            console: lines[lines.len().saturating_sub(PANIC_CONTEXT_LINES)..].join("\n"),
        }
    } else {
        Error::ExitedEarly {
            status,
            stderr: tail(&layout.vmm_log(), STDERR_LINES).await,
        }
    };
    CoreError::backend("start", error)
}

/// How many of the console's last lines are searched for a panic.
const CONSOLE_SCAN_LINES: usize = 200;
/// How many console lines a start error quotes.
const PANIC_CONTEXT_LINES: usize = 8;

/// The console lines that end with the guest kernel's last panic line (`Kernel panic -
/// not syncing: …`), with the lines before it that say what led there; `None` when the
/// console shows no panic.
fn panic_report(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().collect();
    let at = lines
        .iter()
        .rposition(|l| l.contains("Kernel panic - not syncing") && !l.contains("---[ end "))?;
    let from = (at + 1).saturating_sub(PANIC_CONTEXT_LINES);
    Some(lines[from..=at].join("\n"))
}

/// Waits until a line of the file at `path` starts with `ready`. The file may not exist
/// yet (QEMU creates it). Unbounded: the caller's deadline bounds it.
pub(super) async fn wait_ready_line(path: &Path, ready: &str) -> std::io::Result<()> {
    let mut file = loop {
        match tokio::fs::File::open(path).await {
            Ok(file) => break file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => sleep(READY_POLL).await,
            Err(e) => return Err(e),
        }
    };
    let mut scanner = LineScanner::new(ready);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            sleep(READY_POLL).await;
            continue;
        }
        if scanner.feed(&buf[..n]) {
            return Ok(());
        }
    }
}

/// Finds a line starting with a marker in a byte stream fed in arbitrary pieces.
struct LineScanner {
    marker: Vec<u8>,
    /// The start of the current line, up to the marker's length.
    line: Vec<u8>,
    /// The current line is already longer than the marker and did not match.
    skip: bool,
    /// The current line starts with the marker; it counts once it is complete.
    matched: bool,
}

impl LineScanner {
    fn new(marker: &str) -> Self {
        LineScanner {
            marker: marker.as_bytes().to_vec(),
            line: Vec::new(),
            skip: false,
            matched: false,
        }
    }

    /// `true` once a whole line (ended by a newline) started with the marker, so the
    /// line the guest printed is complete in the log when `start` returns.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                if self.matched {
                    return true;
                }
                self.line.clear();
                self.skip = false;
                continue;
            }
            if self.skip {
                continue;
            }
            self.line.push(b);
            if self.line == self.marker {
                self.matched = true;
                self.skip = true;
                continue;
            }
            if !self.marker.starts_with(&self.line) {
                self.skip = true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_panic_is_quoted_with_what_led_to_it() {
        let console = "[    0.5] Run /bin/false as init process\n\
                       [    0.6] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n\
                       [    0.6] CPU: 0 PID: 1 Comm: false\n\
                       [    0.6] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---";
        let report = panic_report(console).unwrap();
        assert!(
            report.starts_with("[    0.5] Run /bin/false as init process\n"),
            "{report}"
        );
        assert!(
            report.ends_with(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
            ),
            "{report}"
        );
        assert_eq!(panic_report("[ 0.1] booting\nVMKIT_READY\n"), None);
    }

    #[test]
    fn the_marker_must_start_a_line() {
        let mut s = LineScanner::new("VMKIT_READY");
        assert!(!s.feed(b"[    0.1] booting\nnot VMKIT_READY here\n"));
        assert!(s.feed(b"VMKIT_READY uptime=1.2\n"));
        let mut s = LineScanner::new("VMKIT_READY");
        assert!(
            !s.feed(b"VMKIT_READY up"),
            "not before the line is complete"
        );
        assert!(s.feed(b"time=1\n"), "the very first line counts");
    }

    proptest! {
        /// However the console output is cut into reads, the marker is found exactly
        /// when some line starts with it.
        #[test]
        fn found_whatever_the_chunking(
            before in proptest::collection::vec("[a-zA-Z _]{0,20}", 0..5),
            with_marker in any::<bool>(),
            cuts in proptest::collection::vec(1usize..8, 1..40),
        ) {
            let mut text = before.join("\n");
            if with_marker {
                text.push_str("\r\nVMKIT_READY x=1\n");
            }
            let bytes = text.as_bytes();
            let segments: Vec<&str> = text.split(['\n', '\r']).collect();
            let complete = &segments[..segments.len() - 1];
            let expected = complete.iter().any(|l| l.starts_with("VMKIT_READY"));
            let mut s = LineScanner::new("VMKIT_READY");
            let mut found = false;
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= bytes.len() { break; }
                let end = (at + cut).min(bytes.len());
                found |= s.feed(&bytes[at..end]);
                at = end;
            }
            prop_assert_eq!(found, expected, "{:?}", text);
        }
    }
}
