//! Checking a spawn request and starting its process: on pipes, or on a new TTY.
//!
//! Everything the agent can check is checked before `fork`, so a bad request gets an
//! error naming its cause (a cwd that does not exist and a program that does not exist
//! are both `ENOENT` from the kernel, and only one of them would be named).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::net::unix::pipe;
use vmkit_platform::child::{new_session_on_stdin, open_pty};

use super::reaper::{ExitWatch, Reaper};

/// The PATH programs see unless the request sets one.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The longest tag.
const MAX_TAG: usize = 256;

/// Why a process could not be started.
#[derive(Debug)]
pub(crate) enum SpawnError {
    /// The request is malformed.
    Invalid(String),
    /// The program or the cwd does not exist.
    NotFound(String),
    /// The system refused (permissions, no memory, no pty).
    Failed(String),
}

impl SpawnError {
    /// The reason, whatever the kind.
    pub(crate) fn into_reason(self) -> String {
        match self {
            SpawnError::Invalid(r) | SpawnError::NotFound(r) | SpawnError::Failed(r) => r,
        }
    }
}

/// A TTY size as the kernel takes it: rows and cols each 1..=65535.
pub(crate) fn tty_size(rows: u32, cols: u32) -> Result<(u16, u16), String> {
    let fit = |n: u32| u16::try_from(n).ok().filter(|n| *n > 0);
    match (fit(rows), fit(cols)) {
        (Some(r), Some(c)) => Ok((r, c)),
        _ => Err(format!(
            "tty size {rows}x{cols}: rows and cols must be 1..=65535"
        )),
    }
}

/// A checked spawn request.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    uid: Option<u32>,
    gid: Option<u32>,
    /// (rows, cols) of a TTY to run on.
    pub(crate) tty: Option<(u16, u16)>,
    pub(crate) tag: String,
}

fn no_nul(what: &str, text: &str) -> Result<(), SpawnError> {
    if text.contains('\0') {
        return Err(SpawnError::Invalid(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

impl Spec {
    /// Checks a request's fields; `tty` is (rows, cols).
    pub(crate) fn new(
        argv: Vec<String>,
        env: &[String],
        cwd: &str,
        user: (Option<u32>, Option<u32>),
        tty: Option<(u32, u32)>,
        tag: String,
    ) -> Result<Spec, SpawnError> {
        let Some(program) = argv.first() else {
            return Err(SpawnError::Invalid("argv is empty".into()));
        };
        if program.is_empty() {
            return Err(SpawnError::Invalid("argv[0] is empty".into()));
        }
        for (i, arg) in argv.iter().enumerate() {
            no_nul(&format!("argv[{i}]"), arg)?;
        }
        let mut pairs: Vec<(String, String)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            ("HOME".into(), "/".into()),
        ];
        if tty.is_some() {
            pairs.push(("TERM".into(), "xterm".into()));
        }
        for (i, entry) in env.iter().enumerate() {
            no_nul(&format!("env[{i}]"), entry)?;
            match entry.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    pairs.retain(|(k, _)| k != key);
                    pairs.push((key.to_owned(), value.to_owned()));
                }
                _ => {
                    return Err(SpawnError::Invalid(format!(
                        "env[{i}] {entry:?} is not KEY=VALUE"
                    )));
                }
            }
        }
        let cwd = if cwd.is_empty() { "/" } else { cwd };
        no_nul("cwd", cwd)?;
        if !cwd.starts_with('/') {
            return Err(SpawnError::Invalid(format!("cwd {cwd:?} is not absolute")));
        }
        let tty = match tty {
            None => None,
            Some((rows, cols)) => Some(tty_size(rows, cols).map_err(SpawnError::Invalid)?),
        };
        // A uid alone would keep group 0: a process meant to be unprivileged must name
        // its group too.
        if user.0.is_some() != user.1.is_some() {
            return Err(SpawnError::Invalid(
                "uid and gid come together (a uid alone would keep group 0)".into(),
            ));
        }
        if tag.len() > MAX_TAG {
            return Err(SpawnError::Invalid(format!(
                "tag of {} bytes exceeds {MAX_TAG}",
                tag.len()
            )));
        }
        Ok(Spec {
            argv,
            env: pairs,
            cwd: PathBuf::from(cwd),
            uid: user.0,
            gid: user.1,
            tty,
            tag,
        })
    }

    /// A request from the exec paths (`Exec`, the exec stream): no user, no TTY.
    pub(crate) fn plain(argv: Vec<String>, env: &[String], cwd: &str) -> Result<Spec, SpawnError> {
        Spec::new(argv, env, cwd, (None, None), None, String::new())
    }

    fn env_path(&self) -> &str {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str())
    }

    /// The program's path: argv[0] itself when it has a '/', else the first PATH entry
    /// holding an executable of that name.
    fn program(&self) -> Result<PathBuf, SpawnError> {
        let name = &self.argv[0];
        if name.contains('/') {
            let path = self.cwd.join(name);
            return if path.exists() {
                Ok(path)
            } else {
                Err(SpawnError::NotFound(format!(
                    "program {name}: no such file"
                )))
            };
        }
        self.env_path()
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(|dir| Path::new(dir).join(name))
            .find(|p| is_executable(p))
            .ok_or_else(|| {
                SpawnError::NotFound(format!(
                    "program {name}: not found in PATH {}",
                    self.env_path()
                ))
            })
    }

    fn check_cwd(&self) -> Result<(), SpawnError> {
        match std::fs::metadata(&self.cwd) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(SpawnError::Invalid(format!(
                "cwd {}: not a directory",
                self.cwd.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SpawnError::NotFound(
                format!("cwd {}: no such directory", self.cwd.display()),
            )),
            Err(e) => Err(SpawnError::Failed(format!(
                "cwd {}: {e}",
                self.cwd.display()
            ))),
        }
    }

    fn command(&self) -> Result<std::process::Command, SpawnError> {
        self.check_cwd()?;
        let mut cmd = std::process::Command::new(self.program()?);
        cmd.arg0(&self.argv[0])
            .args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd);
        vmkit_platform::child::default_signals(&mut cmd);
        if let Some(gid) = self.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = self.uid {
            cmd.uid(uid);
        }
        Ok(cmd)
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A started process's stdio.
#[derive(Debug)]
pub(crate) enum Stdio3 {
    /// Three pipes.
    Pipes {
        stdin: pipe::Sender,
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
    /// The primary side of its TTY.
    Tty(OwnedFd),
}

/// A started process.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: u32,
    pub(crate) stdio: Stdio3,
    pub(crate) exit: ExitWatch,
}

fn failed(argv0: &str, e: &std::io::Error) -> SpawnError {
    match e.kind() {
        std::io::ErrorKind::NotFound => SpawnError::NotFound(format!("exec {argv0}: {e}")),
        _ => SpawnError::Failed(format!("exec {argv0}: {e}")),
    }
}

/// Starts `spec`'s process through `reaper`.
pub(crate) fn start(spec: &Spec, reaper: &Reaper) -> Result<Started, SpawnError> {
    let mut cmd = spec.command()?;
    let argv0 = &spec.argv[0];
    match spec.tty {
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let (mut child, exit) = reaper.spawn(&mut cmd).map_err(|e| failed(argv0, &e))?;
            let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
            let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
                return Err(SpawnError::Failed(format!("exec {argv0}: no stdio pipes")));
            };
            let to_async = |e: std::io::Error| SpawnError::Failed(format!("exec {argv0}: {e}"));
            let stdio = Stdio3::Pipes {
                stdin: pipe::Sender::from_owned_fd(OwnedFd::from(stdin)).map_err(to_async)?,
                stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout)).map_err(to_async)?,
                stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr)).map_err(to_async)?,
            };
            Ok(Started {
                pid: child.id(),
                stdio,
                exit,
            })
        }
        Some((rows, cols)) => {
            let pty = open_pty(rows, cols)
                .map_err(|e| SpawnError::Failed(format!("open a tty for {argv0}: {e}")))?;
            let replica = |pty: &OwnedFd| {
                pty.try_clone()
                    .map_err(|e| SpawnError::Failed(format!("open a tty for {argv0}: {e}")))
            };
            cmd.stdin(replica(&pty.replica)?)
                .stdout(replica(&pty.replica)?)
                .stderr(replica(&pty.replica)?);
            new_session_on_stdin(&mut cmd);
            let (child, exit) = reaper.spawn(&mut cmd).map_err(|e| failed(argv0, &e))?;
            // The replica stays open only in the child: its exit is the TTY's end.
            drop(cmd);
            drop(pty.replica);
            Ok(Started {
                pid: child.id(),
                stdio: Stdio3::Tty(pty.primary),
                exit,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(
        argv: &[&str],
        env: &[&str],
        cwd: &str,
        user: (Option<u32>, Option<u32>),
        tty: Option<(u32, u32)>,
        tag: &str,
    ) -> String {
        let argv = argv.iter().map(|s| (*s).to_owned()).collect();
        let env: Vec<String> = env.iter().map(|s| (*s).to_owned()).collect();
        match Spec::new(argv, &env, cwd, user, tty, tag.to_owned()) {
            Err(SpawnError::Invalid(reason)) => reason,
            other => panic!("{other:?}, expected Invalid"),
        }
    }

    #[test]
    fn malformed_requests_are_refused_before_fork_naming_the_field() {
        let none = (None, None);
        assert_eq!(refused(&[], &[], "", none, None, ""), "argv is empty");
        assert_eq!(refused(&[""], &[], "", none, None, ""), "argv[0] is empty");
        assert!(refused(&["a", "b\0c"], &[], "", none, None, "").starts_with("argv[1]"));
        assert!(refused(&["a"], &["NOEQUALS"], "", none, None, "").starts_with("env[0]"));
        assert!(refused(&["a"], &["=x"], "", none, None, "").starts_with("env[0]"));
        assert!(refused(&["a"], &[], "tmp", none, None, "").contains("not absolute"));
        assert!(refused(&["a"], &[], "/", none, Some((0, 80)), "").contains("tty size"));
        assert!(refused(&["a"], &[], "/", none, Some((24, 70_000)), "").contains("tty size"));
        assert!(refused(&["a"], &[], "/", (Some(1000), None), None, "").contains("uid and gid"));
        assert!(refused(&["a"], &[], "/", none, None, &"t".repeat(257)).contains("tag"));
    }

    #[test]
    fn the_environment_is_minimal_and_the_request_overrides_it() {
        let spec = Spec::new(
            vec!["sh".into()],
            &["PATH=/opt/bin".into(), "A=1".into()],
            "",
            (None, None),
            Some((24, 80)),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            spec.env,
            [
                ("HOME".to_owned(), "/".to_owned()),
                ("TERM".into(), "xterm".into()),
                ("PATH".into(), "/opt/bin".into()),
                ("A".into(), "1".into()),
            ]
        );
        assert_eq!(spec.cwd, Path::new("/"));
        match spec.program() {
            Err(SpawnError::NotFound(reason)) => assert!(reason.contains("/opt/bin"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
