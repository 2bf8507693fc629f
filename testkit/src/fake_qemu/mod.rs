//! A fake QEMU: a process that accepts QEMU's command line, serves QMP on the socket it
//! names (built on [`crate::MockQmpServer`]), prints the ready line on the "serial
//! console" file, and misbehaves on demand — for the failures a real QEMU cannot be made
//! to produce at will. Run it as the `vmkit-fake-qemu` binary (or call [`main`] from a
//! binary of your own) and point the backend's `binary` option at it.
//!
//! Behaviour comes from `VMKIT_FAKE_QEMU`, a comma-separated list:
//!
//! | word | the fake … |
//! | --- | --- |
//! | `crash-at-start` | prints an error on stderr and exits 1 at once |
//! | `no-socket` | never creates the QMP socket (and runs until killed) |
//! | `hang-on=<command>` | never answers `<command>` (e.g. `hang-on=quit`) |
//! | `slow=<command>:<ms>` | answers `<command>` (and sends its events) that late, holding back every later reply as a stalled QEMU does |
//! | `ignore-sigterm` | survives SIGTERM (SIGKILL still ends it) |
//! | `ignore-powerdown` | accepts `system_powerdown` and does nothing |
//! | `crash-after-ready=<ms>` | exits with code 3 that long after the ready line |
//! | `no-ready` | never prints the ready line |
//!
//! Otherwise it acts like a healthy QEMU: `query-status` (running or paused, as `stop`
//! and `cont` left it), `stop`/`cont` (with STOP and RESUME), `system_powerdown` (POWERDOWN, then SHUTDOWN by the guest, then exit 0),
//! `quit` (SHUTDOWN host-qmp-quit, exit 0); SIGTERM ends it.
//!
//! It also keeps a machine (the `machine` module): the vCPU slots of `-smp`, the memory
//! of `-m`, the `-blockdev`s and `-device`s, and answers the hot-plug commands the QEMU
//! backend sends — `device_add`/`device_del` of vCPUs, `pc-dimm`s and `virtio-blk-pci`
//! disks (with `DEVICE_DELETED`), `object-add`/`-del`, `blockdev-add`/`-del`,
//! `query-hotpluggable-cpus`, `query-cpus-fast`, `query-memory-devices` — refusing
//! what QEMU refuses, in QEMU's words. When the command line has a vhost-user vsock
//! device, its "guest" is the [`FakeGuest`](crate::fake_guest::FakeGuest) the fake
//! vsock daemon ([`crate::fake_vsock`]) serves an agent over: the fake writes what the
//! guest shows as it boots (before the ready line) and as devices come and go, so the
//! backend's waits for the guest are answered by a real agent.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::{MockQmpServer, MockReply};

mod machine;

/// The environment variable holding the behaviour.
pub const BEHAVIOUR_ENV: &str = "VMKIT_FAKE_QEMU";

/// The ready line the fake prints (the QEMU backend's default marker).
pub const READY_LINE: &str = "VMKIT_READY fake-qemu";

/// What the fake was told to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// Exit 1 at once with a message.
    pub crash_at_start: bool,
    /// Never create the QMP socket.
    pub no_socket: bool,
    /// Commands never answered.
    pub hang_on: Vec<String>,
    /// Commands answered this late (later replies wait behind them).
    pub slow: Vec<(String, Duration)>,
    /// Survive SIGTERM.
    pub ignore_sigterm: bool,
    /// Ignore `system_powerdown`.
    pub ignore_powerdown: bool,
    /// Exit 3 this long after the ready line.
    pub crash_after_ready: Option<Duration>,
    /// Never print the ready line.
    pub no_ready: bool,
}

impl Behaviour {
    /// Parses the `VMKIT_FAKE_QEMU` syntax.
    ///
    /// # Errors
    /// The word that is not understood.
    pub fn parse(text: &str) -> Result<Behaviour, String> {
        let mut b = Behaviour::default();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word.split_once('=') {
                None if word == "crash-at-start" => b.crash_at_start = true,
                None if word == "no-socket" => b.no_socket = true,
                None if word == "ignore-sigterm" => b.ignore_sigterm = true,
                None if word == "ignore-powerdown" => b.ignore_powerdown = true,
                None if word == "no-ready" => b.no_ready = true,
                Some(("hang-on", cmd)) => b.hang_on.push(cmd.to_owned()),
                Some(("slow", spec)) => {
                    let (cmd, ms) = spec
                        .split_once(':')
                        .ok_or_else(|| format!("{word:?}: expected slow=<command>:<ms>"))?;
                    let ms: u64 = ms
                        .parse()
                        .map_err(|_| format!("bad milliseconds in {word:?}"))?;
                    b.slow.push((cmd.to_owned(), Duration::from_millis(ms)));
                }
                Some(("crash-after-ready", ms)) => {
                    let ms: u64 = ms
                        .parse()
                        .map_err(|_| format!("bad milliseconds in {word:?}"))?;
                    b.crash_after_ready = Some(Duration::from_millis(ms));
                }
                _ => return Err(format!("unknown {BEHAVIOUR_ENV} word {word:?}")),
            }
        }
        Ok(b)
    }

    /// The words for `VMKIT_FAKE_QEMU`.
    pub fn to_env(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        let flags = [
            (self.crash_at_start, "crash-at-start"),
            (self.no_socket, "no-socket"),
            (self.ignore_sigterm, "ignore-sigterm"),
            (self.ignore_powerdown, "ignore-powerdown"),
            (self.no_ready, "no-ready"),
        ];
        words.extend(
            flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, w)| (*w).to_owned()),
        );
        words.extend(self.hang_on.iter().map(|c| format!("hang-on={c}")));
        words.extend(
            self.slow
                .iter()
                .map(|(c, d)| format!("slow={c}:{}", d.as_millis())),
        );
        if let Some(d) = self.crash_after_ready {
            words.push(format!("crash-after-ready={}", d.as_millis()));
        }
        words.join(",")
    }
}

/// The QMP socket and console file named on a QEMU command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeArgs {
    /// `-chardev socket,…,path=P` (the first socket chardev).
    pub qmp: Option<PathBuf>,
    /// `-chardev file,…,path=P` (the first file chardev).
    pub console: Option<PathBuf>,
}

impl FakeArgs {
    /// Reads the paths out of QEMU arguments (`,,` is a literal comma).
    pub fn parse(args: &[String]) -> FakeArgs {
        let mut out = FakeArgs::default();
        for pair in args.windows(2) {
            if pair[0] != "-chardev" {
                continue;
            }
            let opts = split_qemu_opts(&pair[1]);
            let path = opts
                .iter()
                .find_map(|o| o.strip_prefix("path="))
                .map(PathBuf::from);
            match opts.first().map(String::as_str) {
                Some("socket") if out.qmp.is_none() => out.qmp = path,
                Some("file") if out.console.is_none() => out.console = path,
                _ => {}
            }
        }
        out
    }
}

/// Splits a QEMU `key=value,…` option (QemuOpts syntax) into its parts, `,,` being a
/// literal comma: how QEMU reads an option, for tests that check escaping.
pub fn split_qemu_opts(text: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                push_char(&mut out, ',');
            }
            ',' => out.push(String::new()),
            c => push_char(&mut out, c),
        }
    }
    out
}

fn push_char(out: &mut [String], c: char) {
    if let Some(last) = out.last_mut() {
        last.push(c);
    }
}

/// Writes an executable script at `path` that runs `binary` with `env` exported (values
/// single-quoted, so they may hold commas and spaces but not `'`): how a backend option
/// that names a program (`binary`, `vhost_vsock_binary`) is pointed at a test binary that
/// acts as the fake QEMU, the fake vsock daemon or a backend process.
///
/// # Errors
/// When the script cannot be written or made executable.
pub fn write_wrapper(
    path: &std::path::Path,
    binary: &std::path::Path,
    env: &[(&str, &str)],
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let exports: String = env
        .iter()
        .map(|(key, value)| format!("export {key}='{value}'\n"))
        .collect();
    std::fs::write(
        path,
        format!("#!/bin/sh\n{exports}exec '{}' \"$@\"\n", binary.display()),
    )?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// Runs the fake with this process's arguments and `VMKIT_FAKE_QEMU`; returns the
/// exit code (the process should exit with it).
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let behaviour = match Behaviour::parse(&std::env::var(BEHAVIOUR_ENV).unwrap_or_default()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fake-qemu: {e}");
            return 2;
        }
    };
    if behaviour.crash_at_start {
        eprintln!("fake-qemu: -device bogus: crashing at start as told");
        return 1;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-qemu: no runtime: {e}");
            return 2;
        }
    };
    let machine = machine::Machine::from_args(&args);
    runtime.block_on(serve(FakeArgs::parse(&args), machine, behaviour))
}

async fn serve(args: FakeArgs, mut machine: machine::Machine, behaviour: Behaviour) -> i32 {
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-qemu: cannot watch SIGTERM: {e}");
            return 2;
        }
    };
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    if let Some(root) = machine.guest_root()
        && let Err(e) = machine.boot(crate::fake_guest::FakeGuest::open(&root))
    {
        eprintln!("fake-qemu: boot the fake guest in {}: {e}", root.display());
        return 1;
    }
    let machine = std::sync::Arc::new(std::sync::Mutex::new(machine));
    let mut _server = None;
    if !behaviour.no_socket {
        let Some(qmp) = &args.qmp else {
            eprintln!("fake-qemu: no -chardev socket,path=… on the command line");
            return 1;
        };
        let server = match MockQmpServer::start(qmp).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("fake-qemu: cannot listen on {}: {e}", qmp.display());
                return 1;
            }
        };
        script(&server, &behaviour, &exit_tx);
        plug_machine(&server, &machine, &behaviour);
        _server = Some(server);
    }
    if !behaviour.no_ready
        && !behaviour.no_socket
        && let Some(console) = &args.console
    {
        let _ = std::fs::write(console, format!("fake firmware\n{READY_LINE}\n"));
        if let Some(after) = behaviour.crash_after_ready {
            let tx = exit_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                eprintln!("fake-qemu: crashing after ready as told");
                let _ = tx.send(3);
            });
        }
    }
    loop {
        tokio::select! {
            Some(code) = exit_rx.recv() => {
                // Let the last reply and events reach the client.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return code;
            }
            _ = sigterm.recv() => {
                if !behaviour.ignore_sigterm {
                    eprintln!("fake-qemu: terminating on signal 15");
                    return 143;
                }
                eprintln!("fake-qemu: ignoring SIGTERM as told");
            }
        }
    }
}

fn script(
    server: &MockQmpServer,
    behaviour: &Behaviour,
    exit: &tokio::sync::mpsc::UnboundedSender<i32>,
) {
    let delay = |command: &str| {
        behaviour
            .slow
            .iter()
            .find(|(c, _)| c == command)
            .map_or(Duration::ZERO, |(_, d)| *d)
    };
    // The run state `stop` and `cont` change and `query-status` reports.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    for (command, runs, event) in [("stop", false, "STOP"), ("cont", true, "RESUME")] {
        let (state, late) = (std::sync::Arc::clone(&running), delay(command));
        server.on(
            command,
            MockReply::from_fn(move |_| {
                // Like QEMU, an event only when the state really changes.
                let was = state.swap(runs, std::sync::atomic::Ordering::SeqCst);
                let reply = MockReply::ok(json!({})).delayed(late);
                if was == runs {
                    reply
                } else {
                    reply.then_event(event, json!({}))
                }
            }),
        );
    }
    let (state, late) = (std::sync::Arc::clone(&running), delay("query-status"));
    server.on(
        "query-status",
        MockReply::from_fn(move |_| {
            let runs = state.load(std::sync::atomic::Ordering::SeqCst);
            MockReply::ok(json!({
                "running": runs,
                "status": if runs { "running" } else { "paused" },
                "singlestep": false
            }))
            .delayed(late)
        }),
    );
    let tx = exit.clone();
    server.on(
        "quit",
        MockReply::from_fn(move |_| {
            let _ = tx.send(0);
            MockReply::ok(json!({})).then_event(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            )
        }),
    );
    if behaviour.ignore_powerdown {
        server.on("system_powerdown", MockReply::ok(json!({})));
    } else {
        let tx = exit.clone();
        server.on(
            "system_powerdown",
            MockReply::from_fn(move |_| {
                let _ = tx.send(0);
                MockReply::ok(json!({}))
                    .then_event("POWERDOWN", json!({}))
                    .then_event(
                        "SHUTDOWN",
                        json!({"guest": true, "reason": "guest-shutdown"}),
                    )
            }),
        );
    }
    for command in &behaviour.hang_on {
        server.on(command, MockReply::never());
    }
}

/// The machine's commands, answered from `machine` (late as `slow` says; `hang_on`,
/// registered after, wins).
fn plug_machine(
    server: &MockQmpServer,
    machine: &std::sync::Arc<std::sync::Mutex<machine::Machine>>,
    behaviour: &Behaviour,
) {
    for command in machine::Machine::COMMANDS {
        let late = behaviour
            .slow
            .iter()
            .find(|(c, _)| c == command)
            .map_or(Duration::ZERO, |(_, d)| *d);
        let machine = std::sync::Arc::clone(machine);
        server.on(
            command,
            MockReply::from_fn(move |received| {
                let answer = match machine.lock() {
                    Ok(mut m) => m.handle(command, &received.arguments),
                    Err(_) => None,
                };
                let reply = match answer {
                    Some(Ok((value, events))) => events
                        .into_iter()
                        .fold(MockReply::ok(value), |r, (name, data)| {
                            r.then_event(name, data)
                        }),
                    Some(Err(refusal)) => MockReply::error(refusal.class, &refusal.desc),
                    None => MockReply::error("CommandNotFound", "The command is not handled"),
                };
                reply.delayed(late)
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaviour_round_trips_through_its_env_form() {
        let b = Behaviour::parse(
            "ignore-sigterm,hang-on=quit,hang-on=stop,slow=cont:1500,crash-after-ready=250",
        )
        .unwrap();
        assert!(b.ignore_sigterm);
        assert_eq!(b.hang_on, ["quit", "stop"]);
        assert_eq!(b.slow, [("cont".to_owned(), Duration::from_millis(1500))]);
        assert_eq!(b.crash_after_ready, Some(Duration::from_millis(250)));
        assert_eq!(Behaviour::parse(&b.to_env()).unwrap(), b);
        assert_eq!(
            Behaviour::parse("explode").unwrap_err(),
            "unknown VMKIT_FAKE_QEMU word \"explode\""
        );
    }

    #[test]
    fn paths_come_from_the_chardevs_with_commas_unescaped() {
        let args: Vec<String> = [
            "-chardev",
            "socket,id=vmkit-qmp,path=/run/a,,b/control.sock,server=on,wait=off",
            "-chardev",
            "file,id=vmkit-console,path=/run/a,,b/logs/console.log",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let parsed = FakeArgs::parse(&args);
        assert_eq!(parsed.qmp, Some(PathBuf::from("/run/a,b/control.sock")));
        assert_eq!(
            parsed.console,
            Some(PathBuf::from("/run/a,b/logs/console.log"))
        );
    }
}
