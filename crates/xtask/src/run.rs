//! Running commands: echoed, timed, with errors that say which command failed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The workspace root (the xtask lives in `crates/xtask`).
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.clone(), PathBuf::from)
}

/// The cargo that runs us (so `+toolchain` and `CARGO` overrides carry through).
pub(crate) fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio, printing it first and its duration after.
pub(crate) fn step(what: &str, cmd: &mut Command) -> Result<(), String> {
    println!("==> {what}: {}", show(cmd));
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot run {}: {e}", show(cmd)))?;
    let took = started.elapsed().as_secs_f64();
    if status.success() {
        println!("==> {what}: ok ({took:.1} s)");
        Ok(())
    } else {
        Err(format!(
            "{what}: {} failed ({status}) after {took:.1} s",
            show(cmd)
        ))
    }
}

/// A step running beside others (see [`beside`]); [`Beside::finish`] waits for it.
pub(crate) struct Beside {
    what: String,
    shown: String,
    child: std::process::Child,
    log: PathBuf,
    started: Instant,
}

/// Starts `cmd` as the step `what` without waiting for it, its output going to the file
/// `log` (shown if it fails): two builds at once keep both cores busy where one alone
/// leaves one idle (its link, its last crates).
pub(crate) fn beside(what: &str, cmd: &mut Command, log: PathBuf) -> Result<Beside, String> {
    let shown = show(cmd);
    println!(
        "==> {what} (beside the next steps, output in {}): {shown}",
        log.display()
    );
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let file = std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|e| format!("{what}: {}: {e}", log.display()))?;
    let child = cmd
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{what}: cannot run {shown}: {e}"))?;
    Ok(Beside {
        what: what.to_owned(),
        shown,
        child,
        log,
        started: Instant::now(),
    })
}

impl Beside {
    /// Waits for the step; its error carries the end of its output.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        let status = self
            .child
            .wait()
            .map_err(|e| format!("{}: wait for {}: {e}", self.what, self.shown))?;
        let took = self.started.elapsed().as_secs_f64();
        if status.success() {
            println!("==> {}: ok ({took:.1} s)", self.what);
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{}: {} failed ({status}) after {took:.1} s; its output ends:\n{}",
            self.what,
            self.shown,
            tail.join("\n")
        ))
    }
}

impl Drop for Beside {
    /// A step nobody waited for (an earlier step failed) does not run on alone.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `true` when `cmd` runs and exits 0 (its output discarded).
pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cmd`'s stdout when it runs and exits 0.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line as a user would type it.
pub(crate) fn show(cmd: &Command) -> String {
    let program = cmd.get_program();
    let is_our_cargo = std::env::var_os("CARGO").is_some_and(|c| c == program);
    let program = if is_our_cargo {
        "cargo".into()
    } else {
        program.to_string_lossy().into_owned()
    };
    let mut parts = vec![program];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let env: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    if env.is_empty() {
        parts.join(" ")
    } else {
        format!("{} {}", env.join(" "), parts.join(" "))
    }
}

/// The text of the file `path`; the error names it.
pub(crate) fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// The bytes of the file `path`; the error names it.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// Cargo's target dir: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}
