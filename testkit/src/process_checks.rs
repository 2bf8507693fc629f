//! Checks of a guest's process service and filesystem calls, for any instance whose guest runs the vmkit
//! agent: FakeBackend's host-mode agent, and the real test guest under QEMU over each
//! guest channel. Each check drives [`vmkit_process`] as a runtime would and returns
//! what it measured, or what went wrong.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use vmkit_core::{GuestClient, GuestCommunicator, GuestStream};
use vmkit_process::{Command, Error, ExitStatus, Filesystem, Mount, Processes, Resume};

/// How big the checks are: the acceptance sizes on a real guest, smaller ones where
/// only the logic is under test.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Bytes streamed through `cat` (stdin in, stdout out).
    pub stdout_bytes: usize,
    /// Processes run at once.
    pub processes: usize,
    /// How long a reader stalls.
    pub stall: Duration,
    /// The deadline of each call.
    pub deadline: Duration,
}

impl Scale {
    /// The acceptance: 64 MiB, 32 processes, a 10 s stall.
    pub fn acceptance() -> Scale {
        Scale {
            stdout_bytes: 64 << 20,
            processes: 32,
            stall: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
        }
    }

    /// For the host test mode: 8 MiB, 32 processes, a 1 s stall.
    pub fn quick() -> Scale {
        Scale {
            stdout_bytes: 8 << 20,
            processes: 32,
            stall: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
        }
    }
}

fn fail(what: &str) -> impl Fn(Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Bytes that are not all alike (so a lost or doubled chunk shows): a xorshift stream.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The low byte: the truncation is the point.
            #[allow(clippy::cast_possible_truncation)]
            let byte = x as u8;
            byte
        })
        .collect()
}

async fn read_all(mut from: impl AsyncRead + Unpin, what: &str) -> Result<Vec<u8>, String> {
    let mut all = Vec::new();
    from.read_to_end(&mut all)
        .await
        .map_err(|e| format!("read {what}: {e}"))?;
    Ok(all)
}

/// `cat` echoes `scale.stdout_bytes` streamed into its stdin, byte for byte, while a
/// second process in the same shell writes 200 numbered lines to stderr; it exits 0.
/// Returns the throughput in MiB/s (in and out at once).
pub async fn stdio_round_trip(p: &Processes, scale: Scale) -> Result<f64, String> {
    let script =
        "(i=0; while [ $i -lt 200 ]; do echo \"err $i\"; i=$((i+1)); done) >&2 & cat; wait";
    let mut cat = p
        .spawn(&Command::new(["sh", "-c", script]), scale.deadline)
        .await
        .map_err(fail("spawn cat"))?;
    let data = Arc::new(pattern(scale.stdout_bytes));
    let started = Instant::now();
    let (mut stdin, stdout, stderr) = (
        cat.take_stdin().ok_or("no stdin")?,
        cat.take_stdout().ok_or("no stdout")?,
        cat.take_stderr().ok_or("no stderr")?,
    );
    let feed = {
        let data = Arc::clone(&data);
        tokio::spawn(async move {
            stdin.write_all(&data).await?;
            stdin.shutdown().await
        })
    };
    let out = tokio::spawn(async move { read_all(stdout, "stdout").await });
    let err = read_all(stderr, "stderr").await?;
    let out = out.await.map_err(|e| e.to_string())??;
    feed.await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("write stdin: {e}"))?;
    let status = cat
        .wait(scale.deadline)
        .await
        .map_err(fail("wait for cat"))?;
    let secs = started.elapsed().as_secs_f64();
    if out.len() != data.len() {
        return Err(format!("stdout: {} bytes, {} sent", out.len(), data.len()));
    }
    if let Some(at) = out.iter().zip(data.iter()).position(|(a, b)| a != b) {
        return Err(format!("stdout differs from stdin at byte {at}"));
    }
    let lines: Vec<String> = (0..200).map(|i| format!("err {i}\n")).collect();
    if err != lines.concat().as_bytes() {
        return Err(format!(
            "stderr: {} bytes, not the 200 lines (starts {:?})",
            err.len(),
            String::from_utf8_lossy(&err[..err.len().min(40)])
        ));
    }
    if status != ExitStatus::Code(0) {
        return Err(format!("cat ended with {status}"));
    }
    #[allow(clippy::cast_precision_loss)] // a figure to print
    Ok(data.len() as f64 / f64::from(1 << 20) / secs)
}

/// What a finished process left: how it ended, and its stdout and stderr.
pub(crate) struct Ran {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

/// Spawns `cmd`, writes `input` to its stdin and closes it, and reads both outputs while
/// waiting for its exit (the agent answers the wait only once they are delivered).
pub(crate) async fn run(
    p: &Processes,
    cmd: &Command,
    input: &[u8],
    deadline: Duration,
) -> Result<Ran, String> {
    let argv = cmd.argv();
    let mut proc = p
        .spawn(cmd, deadline)
        .await
        .map_err(fail(&format!("spawn {argv:?}")))?;
    let mut stdin = proc.take_stdin().ok_or("no stdin")?;
    let out = proc.take_stdout().ok_or("no stdout")?;
    let err = proc.take_stderr().ok_or("no stderr")?;
    let feed = async move {
        stdin.write_all(input).await?;
        stdin.shutdown().await
    };
    let (fed, stdout, stderr, status) = tokio::join!(
        feed,
        read_all(out, "stdout"),
        read_all(err, "stderr"),
        proc.wait(deadline)
    );
    fed.map_err(|e| format!("{argv:?}'s stdin: {e}"))?;
    Ok(Ran {
        status: status.map_err(fail(&format!("wait for {argv:?}")))?,
        stdout: stdout?,
        stderr: stderr?,
    })
}

/// Runs `argv` with its output read, and returns how it ended.
async fn status_of(p: &Processes, argv: &[&str], deadline: Duration) -> Result<ExitStatus, String> {
    Ok(run(p, &Command::new(argv.iter().copied()), b"", deadline)
        .await?
        .status)
}

/// Exit codes 0 and 42 come back as they are; a process killed with SIGTERM is
/// reported as signal 15; a second signal to it is refused, naming its end.
pub async fn exit_statuses(p: &Processes, deadline: Duration) -> Result<(), String> {
    for (argv, want) in [
        (["true"].as_slice(), ExitStatus::Code(0)),
        (["sh", "-c", "exit 42"].as_slice(), ExitStatus::Code(42)),
    ] {
        let got = status_of(p, argv, deadline).await?;
        if got != want {
            return Err(format!("{argv:?}: {got}, expected {want}"));
        }
    }
    let mut sleeper = p
        .spawn(&Command::new(["sleep", "600"]), deadline)
        .await
        .map_err(fail("spawn sleep"))?;
    let stdout = sleeper.take_stdout().ok_or("no stdout")?;
    let stderr = sleeper.take_stderr().ok_or("no stderr")?;
    let readers =
        tokio::spawn(async move { (read_all(stdout, "").await, read_all(stderr, "").await) });
    sleeper
        .kill(15, deadline)
        .await
        .map_err(fail("SIGTERM to sleep"))?;
    let got = sleeper
        .wait(deadline)
        .await
        .map_err(fail("wait for sleep"))?;
    let _ = readers.await;
    if got != ExitStatus::Signal(15) {
        return Err(format!("sleep after SIGTERM: {got}, expected signal 15"));
    }
    match sleeper.kill(15, deadline).await {
        Err(Error::Refused { reason, .. }) if reason.contains("ended") => Ok(()),
        other => Err(format!(
            "a signal to an ended process: {other:?}, expected Refused"
        )),
    }
}

/// Reads the TTY until its output holds `want`; what it read.
async fn read_until(
    tty: &mut vmkit_process::Tty,
    seen: &mut String,
    want: &str,
    deadline: Duration,
) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    let work = async {
        while !seen.contains(want) {
            match tty.read(&mut buf).await {
                Ok(0) => return Err(format!("the tty ended before {want:?}; it showed {seen:?}")),
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) => return Err(format!("read the tty: {e}")),
            }
        }
        Ok(())
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| format!("no {want:?} on the tty within {deadline:?}; it showed {seen:?}"))?
}

/// An interactive shell on a TTY: it sees its size and a resize (`stty size`),
/// Ctrl-C interrupts its foreground `sleep`, and `exit 7` ends it with code 7.
pub async fn tty_session(p: &Processes, deadline: Duration) -> Result<(), String> {
    let mut sh = p
        .spawn(&Command::new(["sh", "-i"]).tty(24, 80), deadline)
        .await
        .map_err(fail("spawn sh -i"))?;
    let mut tty = sh.take_tty().ok_or("no tty")?;
    if sh.take_stdin().is_some() || sh.take_stdout().is_some() {
        return Err("a TTY process has pipes too".into());
    }
    let mut seen = String::new();
    let type_in = |line: &'static [u8]| line;
    tty.write_all(type_in(b"stty size\n"))
        .await
        .map_err(|e| e.to_string())?;
    read_until(&mut tty, &mut seen, "24 80", deadline).await?;
    sh.resize(50, 132, deadline).await.map_err(fail("resize"))?;
    tty.write_all(b"stty size\n")
        .await
        .map_err(|e| e.to_string())?;
    read_until(&mut tty, &mut seen, "50 132", deadline).await?;
    // Ctrl-C must end the sleep well before its 600 s.
    tty.write_all(b"sleep 600\n")
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tty.write_all(&[0x03]).await.map_err(|e| e.to_string())?;
    tty.write_all(b"echo after-$((6*7))\n")
        .await
        .map_err(|e| e.to_string())?;
    read_until(&mut tty, &mut seen, "after-42", deadline).await?;
    tty.write_all(b"exit 7\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(deadline, tty.read_to_end(&mut rest)).await;
    let status = sh.wait(deadline).await.map_err(fail("wait for sh -i"))?;
    if status != ExitStatus::Code(7) {
        return Err(format!("sh -i after `exit 7`: {status}"));
    }
    Ok(())
}

/// `scale.processes` processes at once, each writing its own 200 lines and exiting with
/// its own code: every output and status is its own.
pub async fn many_at_once(p: &Processes, scale: Scale) -> Result<(), String> {
    let script =
        "i=0; while [ $i -lt 200 ]; do echo \"$0 line $i\"; i=$((i+1)); done; exit $(($0 % 50))";
    let mut running = tokio::task::JoinSet::new();
    for n in 0..scale.processes {
        let p = p.clone();
        running.spawn(async move {
            let argv = ["sh".to_owned(), "-c".into(), script.into(), n.to_string()];
            let ran = run(&p, &Command::new(argv), b"", scale.deadline).await?;
            let want: String = (0..200).map(|i| format!("{n} line {i}\n")).collect();
            if ran.stdout != want.as_bytes() {
                return Err(format!("process {n}: its stdout is not its own 200 lines"));
            }
            let code = i32::try_from(n % 50).unwrap_or_default();
            match ran.status {
                ExitStatus::Code(c) if c == code => Ok(()),
                other => Err(format!("process {n}: {other}, expected exit code {code}")),
            }
        });
    }
    while let Some(done) = running.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// A guest channel of its own: `client()` is one connection dialled for this wrapper
/// alone (not the instance's cached one), closed when the wrapper is dropped; streams go
/// through the instance. What a host that restarts has: new connections.
struct OwnConnection {
    guest: Arc<dyn GuestCommunicator>,
    client: tokio::sync::OnceCell<GuestClient>,
}

#[async_trait::async_trait]
impl GuestCommunicator for OwnConnection {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        self.client
            .get_or_try_init(|| self.guest.dial_client())
            .await
            .cloned()
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        self.guest.dial_client().await
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        self.guest.dial_client_with_retry(timeout).await
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        self.guest.start_stream(port).await
    }
}

fn own_connection(guest: &Arc<dyn GuestCommunicator>) -> Processes {
    Processes::new(Arc::new(OwnConnection {
        guest: Arc::clone(guest),
        client: tokio::sync::OnceCell::new(),
    }))
}

/// A host spawns a process on connections of its own, reads part of its output, and
/// drops every connection (TTRPC and streams); the process finishes with nobody
/// connected. A new host, on new connections, finds it exited, attaches from the offsets
/// the first had received, gets the rest of its output (nothing twice, nothing lost) and
/// its exit status.
pub async fn reattach(
    guest: &Arc<dyn GuestCommunicator>,
    deadline: Duration,
) -> Result<(), String> {
    let script =
        "read go; i=0; while [ $i -lt 3000 ]; do echo \"line $i\"; i=$((i+1)); done; exit 3";
    let first_host = own_connection(guest);
    let mut first = first_host
        .spawn(&Command::new(["sh", "-c", script]), deadline)
        .await
        .map_err(fail("spawn the writer"))?;
    let id = first.id();
    let mut stdout = first.take_stdout().ok_or("no stdout")?;
    let stderr = first.take_stderr().ok_or("no stderr")?;
    let mut stdin = first.take_stdin().ok_or("no stdin")?;
    stdin.write_all(b"go\n").await.map_err(|e| e.to_string())?;
    let mut got = vec![0u8; 5000];
    stdout
        .read_exact(&mut got)
        .await
        .map_err(|e| format!("read the first 5000 bytes: {e}"))?;
    let resume = Resume {
        stdout: stdout.received(),
        stderr: stderr.received(),
        tty: 0,
    };
    drop((first, stdout, stderr, stdin, first_host));
    let p = own_connection(guest);
    let ended = async {
        loop {
            let listed = p.list(deadline).await.map_err(fail("list"))?;
            match listed.iter().find(|l| l.id == id) {
                Some(l) if l.exited => return Ok(()),
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                None => return Err(format!("process {id} is gone from the list")),
            }
        }
    };
    tokio::time::timeout(deadline, ended)
        .await
        .map_err(|_| "the process did not finish with nobody connected".to_owned())??;
    let mut again = p
        .attach(id, resume, deadline)
        .await
        .map_err(fail("attach again"))?;
    let rest = read_all(
        again.take_stdout().ok_or("no stdout")?,
        "the rest of stdout",
    )
    .await?;
    got.extend(rest);
    let want: String = (0..3000).map(|i| format!("line {i}\n")).collect();
    if got != want.as_bytes() {
        return Err(format!(
            "after attaching again: {} bytes, expected {} (nothing twice, nothing lost)",
            got.len(),
            want.len()
        ));
    }
    let status = again
        .wait(deadline)
        .await
        .map_err(fail("wait after attaching again"))?;
    if status != ExitStatus::Code(3) {
        return Err(format!(
            "after attaching again: {status}, expected exit code 3"
        ));
    }
    Ok(())
}

/// What a stalled reader cost.
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    /// Output the agent held for the process while nobody read.
    pub agent_buffered: u64,
    /// This process's resident memory grew by this much during the stall (KiB; 0 when
    /// it shrank or cannot be read).
    pub host_rss_growth_kib: u64,
    /// The agent's resident memory at the end of the stall (KiB), when it is a process
    /// of its own (`vmkit-agent` in a guest; not in the host test mode).
    pub agent_rss_kib: Option<u64>,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// A process writing 64 MiB while its reader stalls for `scale.stall`: it is held back
/// (still running), the agent holds at most `max_buffered` bytes of its output, and
/// afterwards every byte arrives and it exits 0.
pub async fn stalled_reader(
    p: &Processes,
    scale: Scale,
    max_buffered: u64,
) -> Result<Stall, String> {
    const TOTAL: usize = 64 << 20;
    let mut dd = p
        .spawn(
            &Command::new(["dd", "if=/dev/zero", "bs=65536", "count=1024"]),
            scale.deadline,
        )
        .await
        .map_err(fail("spawn dd"))?;
    let stdout = dd.take_stdout().ok_or("no stdout")?;
    let stderr = dd.take_stderr().ok_or("no stderr")?;
    let before = rss_kib();
    tokio::time::sleep(scale.stall).await;
    let listed = p.list(scale.deadline).await.map_err(fail("list"))?;
    let me = listed
        .iter()
        .find(|l| l.id == dd.id())
        .ok_or("dd is not listed")?;
    let agent_rss = shell(
        p,
        "pid=$(pidof vmkit-agent) && grep VmRSS /proc/$pid/status || true",
        scale.deadline,
    )
    .await?;
    let stall = Stall {
        agent_buffered: me.buffered_bytes,
        host_rss_growth_kib: rss_kib().saturating_sub(before),
        agent_rss_kib: agent_rss
            .split_whitespace()
            .nth(1)
            .and_then(|kib| kib.parse().ok()),
    };
    if me.exited {
        return Err("dd finished while nobody read its output".into());
    }
    if me.buffered_bytes > max_buffered {
        return Err(format!(
            "the agent holds {} bytes of a stalled output, more than {max_buffered}",
            me.buffered_bytes
        ));
    }
    let readers = tokio::spawn(async move {
        let mut out = stdout;
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match out.read(&mut buf).await {
                Ok(0) => break Ok(n),
                Ok(k) if buf[..k].iter().all(|b| *b == 0) => n += k,
                Ok(_) => break Err("dd's output is not all zeros".to_owned()),
                Err(e) => break Err(format!("read dd's output: {e}")),
            }
        }
    });
    let _ = read_all(stderr, "stderr").await;
    let n = readers.await.map_err(|e| e.to_string())??;
    if n != TOTAL {
        return Err(format!("dd's output: {n} bytes, expected {TOTAL}"));
    }
    let status = dd.wait(scale.deadline).await.map_err(fail("wait for dd"))?;
    if !status.success() {
        return Err(format!("dd: {status}"));
    }
    Ok(stall)
}

/// Bad requests get typed errors naming their cause, and the service goes on.
pub async fn bad_requests(p: &Processes, deadline: Duration) -> Result<(), String> {
    bad_spawns(p, deadline).await?;
    bad_calls(p, deadline).await?;
    // And the service goes on.
    let got = status_of(p, &["true"], deadline).await?;
    if !got.success() {
        return Err(format!("after the bad requests, `true`: {got}"));
    }
    Ok(())
}

/// Spawns the agent must refuse, each with the error kind and the words expected.
async fn bad_spawns(p: &Processes, deadline: Duration) -> Result<(), String> {
    let empty: [&str; 0] = [];
    /// What is asked, the command, the error kind expected, and what its message names.
    type Case = (&'static str, Command, fn(&Error) -> bool, &'static str);
    let cases: Vec<Case> = vec![
        (
            "an empty argv",
            Command::new(empty),
            |e| matches!(e, Error::BadRequest { .. }),
            "argv is empty",
        ),
        (
            "a program that does not exist",
            Command::new(["no-such-program-vmkit"]),
            |e| matches!(e, Error::NotFound { .. }),
            "no-such-program-vmkit",
        ),
        (
            "a cwd that does not exist",
            Command::new(["true"]).cwd("/no/such/dir"),
            |e| matches!(e, Error::NotFound { .. }),
            "/no/such/dir",
        ),
        (
            "a relative cwd",
            Command::new(["true"]).cwd("tmp"),
            |e| matches!(e, Error::BadRequest { .. }),
            "not absolute",
        ),
        (
            "an env entry without '='",
            Command::new(["true"]).env("A", "1").env("", "x"),
            |e| matches!(e, Error::BadRequest { .. }),
            "env[1]",
        ),
    ];
    for (what, cmd, kind, names) in cases {
        match p.spawn(&cmd, deadline).await {
            Ok(_) => return Err(format!("{what}: spawned")),
            Err(e) if kind(&e) && e.to_string().contains(names) => {}
            Err(e) => {
                return Err(format!(
                    "{what}: {e:?} (expected a typed error naming {names:?})"
                ));
            }
        }
    }
    Ok(())
}

/// Calls on a process that it cannot take: a resize without a TTY, signal 0, an
/// attach to an id that never was; then its stdin closed by call ends it.
async fn bad_calls(p: &Processes, deadline: Duration) -> Result<(), String> {
    let mut plain = p
        .spawn(&Command::new(["cat"]), deadline)
        .await
        .map_err(fail("spawn cat"))?;
    match plain.resize(10, 10, deadline).await {
        Err(Error::Refused { reason, .. }) if reason.contains("no TTY") => {}
        other => return Err(format!("resize without a TTY: {other:?}")),
    }
    match plain.kill(0, deadline).await {
        Err(Error::BadRequest { .. }) => {}
        other => return Err(format!("signal 0: {other:?}")),
    }
    match p.attach(u64::MAX, Resume::default(), deadline).await {
        Err(Error::NotFound { .. }) => {}
        other => return Err(format!("attach to a process that never was: {other:?}")),
    }
    let (out, err) = (plain.take_stdout(), plain.take_stderr());
    plain
        .close_stdin(deadline)
        .await
        .map_err(fail("close stdin"))?;
    drop(plain.take_stdin());
    let drain = async move {
        if let (Some(out), Some(err)) = (out, err) {
            let _ = tokio::join!(read_all(out, ""), read_all(err, ""));
        }
    };
    let (status, ()) = tokio::join!(plain.wait(deadline), drain);
    if status.map_err(fail("wait for cat"))? != ExitStatus::Code(0) {
        return Err("cat did not end at the end of its stdin".into());
    }
    Ok(())
}

/// Runs `script` with `sh -c` and returns its stdout, failing unless it exits 0.
async fn shell(p: &Processes, script: &str, deadline: Duration) -> Result<String, String> {
    let ran = run(p, &Command::new(["sh", "-c", script]), b"", deadline).await?;
    if !ran.status.success() {
        return Err(format!(
            "{script:?}: {}; stderr {:?}",
            ran.status,
            String::from_utf8_lossy(&ran.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&ran.stdout).into_owned())
}

/// Mount requests the agent must refuse before touching anything, each with a typed
/// error naming its cause — in a guest and in the host test mode alike.
pub async fn mount_bad_requests(fs: &Filesystem, deadline: Duration) -> Result<(), String> {
    /// What is asked, the mount, the error kind expected, and what its message names.
    type Case = (&'static str, Mount, fn(&Error) -> bool, &'static str);
    let cases: Vec<Case> = vec![
        (
            "a relative target",
            Mount::tmpfs("mnt"),
            |e| matches!(e, Error::BadRequest { .. }),
            "not absolute",
        ),
        (
            "a target in /proc",
            Mount::tmpfs("/proc/x"),
            |e| matches!(e, Error::BadRequest { .. }),
            "/proc",
        ),
        (
            "a mount over /",
            Mount::tmpfs("/"),
            |e| matches!(e, Error::BadRequest { .. }),
            "never",
        ),
        (
            "a .. in the target",
            Mount::tmpfs("/mnt/../dev"),
            |e| matches!(e, Error::BadRequest { .. }),
            "..",
        ),
        (
            "an option not allowed",
            Mount::tmpfs("/mnt").option("bind"),
            |e| matches!(e, Error::BadRequest { .. }),
            "bind",
        ),
        (
            "a disk serial that is not there",
            Mount::disk("no-such-serial", "ext4", "/mnt"),
            |e| matches!(e, Error::NotFound { .. }),
            "no-such-serial",
        ),
        (
            "a filesystem not allowed",
            Mount::disk("x", "nfs", "/mnt"),
            |e| matches!(e, Error::BadRequest { .. }),
            "nfs",
        ),
        (
            "a tag with a comma",
            Mount::share("a,b", "/mnt"),
            |e| matches!(e, Error::BadRequest { .. }),
            "tag",
        ),
    ];
    for (what, mount, kind, names) in cases {
        match fs.mount(&mount, deadline).await {
            Ok(()) => return Err(format!("{what}: mounted")),
            Err(e) if kind(&e) && e.to_string().contains(names) => {}
            Err(e) => {
                return Err(format!(
                    "{what}: {e:?} (expected a typed error naming {names:?})"
                ));
            }
        }
    }
    match fs.make_dir("relative/dir", 0o755, deadline).await {
        Err(Error::BadRequest { .. }) => Ok(()),
        other => Err(format!("make_dir of a relative path: {other:?}")),
    }
}

/// The disk `serial` mounted read-only at /data shows its `hello`, refuses a write, and
/// unmounts.
async fn disk_mount(
    fs: &Filesystem,
    p: &Processes,
    serial: &str,
    deadline: Duration,
) -> Result<(), String> {
    let data = Mount::disk(serial, "ext4", "/data")
        .option("ro")
        .create_target();
    fs.mount(&data, deadline)
        .await
        .map_err(fail("mount the disk"))?;
    let hello = shell(
        p,
        "cat /data/hello; touch /data/x 2>/dev/null && echo writable; true",
        deadline,
    )
    .await?;
    if hello != "hello from the host\n" {
        return Err(format!("the disk read {hello:?} (and must be read-only)"));
    }
    fs.unmount("/data", false, deadline)
        .await
        .map_err(fail("unmount the disk"))
}

/// In a guest: a directory made with its mode, a tmpfs, a writable overlay, and (given
/// `disk`, a serial whose ext4 filesystem holds `hello` = "hello from the host\n") a
/// read-only disk, each seen by a process, then unmounted; a second unmount is refused.
pub async fn mounts(
    fs: &Filesystem,
    p: &Processes,
    disk: Option<&str>,
    deadline: Duration,
) -> Result<(), String> {
    fs.make_dir("/scratch/made/here", 0o700, deadline)
        .await
        .map_err(fail("make_dir"))?;
    let mode = shell(p, "stat -c %a /scratch/made/here", deadline).await?;
    if mode.trim() != "700" {
        return Err(format!("make_dir's mode: {mode:?}, expected 700"));
    }
    let tmp = Mount::tmpfs("/scratch/tmp")
        .option("size=4m")
        .option("nosuid")
        .create_target();
    fs.mount(&tmp, deadline)
        .await
        .map_err(fail("mount a tmpfs"))?;
    let seen = shell(
        p,
        "echo kept > /scratch/tmp/f && grep ' /scratch/tmp ' /proc/mounts",
        deadline,
    )
    .await?;
    if !seen.contains("tmpfs") || !seen.contains("nosuid") || !seen.contains("size=4096k") {
        return Err(format!("the tmpfs in /proc/mounts: {seen:?}"));
    }
    shell(
        p,
        "mkdir -p /scratch/tmp/lower /scratch/tmp/upper /scratch/tmp/work && echo below > /scratch/tmp/lower/file",
        deadline,
    )
    .await?;
    let overlay = Mount::overlay(["/scratch/tmp/lower"], "/scratch/merged")
        .upper("/scratch/tmp/upper", "/scratch/tmp/work")
        .create_target();
    fs.mount(&overlay, deadline)
        .await
        .map_err(fail("mount an overlay"))?;
    let merged = shell(
        p,
        "cat /scratch/merged/file && echo above > /scratch/merged/new && cat /scratch/tmp/upper/new",
        deadline,
    )
    .await?;
    if merged != "below\nabove\n" {
        return Err(format!("through the overlay: {merged:?}"));
    }
    if let Some(serial) = disk {
        disk_mount(fs, p, serial, deadline).await?;
    }
    fs.unmount("/scratch/merged", false, deadline)
        .await
        .map_err(fail("unmount the overlay"))?;
    fs.unmount("/scratch/tmp", false, deadline)
        .await
        .map_err(fail("unmount the tmpfs"))?;
    match fs.unmount("/scratch/tmp", false, deadline).await {
        Err(Error::Refused { reason, .. }) if reason.contains("nothing is mounted") => Ok(()),
        other => Err(format!("a second unmount: {other:?}, expected Refused")),
    }
}

/// Zombies in the guest now: processes whose state (in `/proc/<pid>/stat`) is `Z`.
async fn zombies(p: &Processes, deadline: Duration) -> Result<usize, String> {
    let listed = shell(
        p,
        "for s in /proc/[0-9]*/stat; do read -r line < $s 2>/dev/null && case \"${line##*) }\" in Z*) echo z;; esac; done; true",
        deadline,
    )
    .await?;
    Ok(listed.lines().count())
}

/// In a guest: processes that leave orphans behind (a background `sleep` outliving its
/// shell) leave no zombie once the orphans end — the agent, a child subreaper, reaps
/// them.
pub async fn orphans_reaped(p: &Processes, deadline: Duration) -> Result<(), String> {
    let before = zombies(p, deadline).await?;
    for _ in 0..4 {
        shell(p, "sleep 0.3 </dev/null >/dev/null 2>&1 & exit 0", deadline).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = zombies(p, deadline).await?;
    if after > before {
        return Err(format!(
            "{after} zombies after the orphans ended ({before} before): nobody reaped them"
        ));
    }
    Ok(())
}

/// A process spawned as user and group 1000 runs as them, in its cwd, with its env.
/// (In a guest, where the agent is root.)
pub async fn runs_as_user(p: &Processes, deadline: Duration) -> Result<(), String> {
    let cmd = Command::new(["sh", "-c", "echo $(id -u) $(id -g) $(pwd) $GREETING"])
        .user(1000, 1000)
        .cwd("/tmp")
        .env("GREETING", "hi");
    let ran = run(p, &cmd, b"", deadline).await?;
    let out = String::from_utf8_lossy(&ran.stdout);
    if out != "1000 1000 /tmp hi\n" || !ran.status.success() {
        return Err(format!("as user 1000: {out:?}, {}", ran.status));
    }
    Ok(())
}
