//! The commands on detached VMs: `ps`, `inspect`, `hotplug`, `unplug`, `pause`,
//! `resume`, `stop`, `rm`, `logs`, `exec` — each a call to the VM's supervisor, or a
//! read of what a stopped VM's supervisor left in its entry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use vmkit_core::{DeviceSpec, ExitInfo};

use crate::args::{ExecArgs, HotplugWhat, StopArgs};
use crate::control::{self, Ended, Reply, Request, Status};
use crate::device_args;
use crate::error::{Error, Result};
use crate::guest_command::{self, Attach};
use crate::launch::Launch;
use crate::output::Output;
use crate::remote_guest::RemoteGuest;
use crate::runtime_dir::{Entry, Liveness, RuntimeDir};

/// How long a quick question to a supervisor may take.
const QUICK: Duration = Duration::from_secs(10);
/// How long a hot-plug or a pause may take, the VM's own deadlines included.
const SLOW: Duration = Duration::from_secs(120);
/// The dial deadline of `exec`'s guest connections.
const DIAL: Duration = Duration::from_secs(10);

/// Asks `name`'s supervisor `req`; a VM that is not running is an error naming its state.
pub(crate) async fn ask(
    rt: &RuntimeDir,
    name: &str,
    op: &str,
    req: &Request,
    deadline: Duration,
) -> Result<serde_json::Value> {
    let entry = existing(rt, name)?;
    match entry.liveness() {
        Liveness::Alive => {}
        Liveness::Launching => return Err(state(op, name, "starting")),
        Liveness::Exited => {
            let how = ended(&entry).map_or_else(|| "stopped".to_owned(), |e| stopped(&e.exit));
            return Err(state(op, name, &how));
        }
        Liveness::Stale => {
            entry.remove()?;
            return Err(state(
                op,
                name,
                "gone: its supervisor died without a record (the stale entry was removed)",
            ));
        }
    }
    let reply = control::call(&entry.control_socket(), req, deadline)
        .await
        .map_err(|e| Error::Supervisor {
            vm: name.to_owned(),
            message: format!("{op}: {e}"),
        })?;
    match reply {
        Reply::Ok { value } => Ok(value),
        Reply::Failed { message } => Err(Error::Supervisor {
            vm: name.to_owned(),
            message: format!("{op}: {message}"),
        }),
    }
}

fn existing(rt: &RuntimeDir, name: &str) -> Result<Entry> {
    let entry = rt.entry(name)?;
    if entry.exists() {
        Ok(entry)
    } else {
        Err(Error::NoSuchVm(name.to_owned()))
    }
}

fn state(op: &str, vm: &str, state: &str) -> Error {
    Error::VmState {
        op: op.to_owned(),
        vm: vm.to_owned(),
        state: state.to_owned(),
    }
}

/// What a stopped VM's supervisor recorded.
fn ended(entry: &Entry) -> Option<Ended> {
    let text = std::fs::read(entry.exit_file()).ok()?;
    serde_json::from_slice(&text).ok()
}

/// "stopped (guest_shutdown: …)".
fn stopped(exit: &ExitInfo) -> String {
    let reason = serde_json::to_value(&exit.reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", exit.reason));
    match &exit.message {
        Some(message) => format!("stopped ({reason}: {message})"),
        None => format!("stopped ({reason})"),
    }
}

async fn status(rt: &RuntimeDir, name: &str, op: &str) -> Result<Status> {
    let value = ask(rt, name, op, &Request::Status, QUICK).await?;
    serde_json::from_value(value).map_err(|e| Error::Supervisor {
        vm: name.to_owned(),
        message: format!("{op}: a malformed status: {e}"),
    })
}

/// One row of `ps`.
#[derive(Debug, Serialize)]
struct Row {
    name: String,
    state: String,
    backend: Option<String>,
    pid: Option<u32>,
    vcpus: Option<usize>,
    memory_mib: Option<u64>,
    started_at: Option<u64>,
    exit: Option<ExitInfo>,
}

/// `vmkit ps`.
pub(crate) async fn ps(rt: &RuntimeDir, out: &Output) -> Result<()> {
    let mut rows = Vec::new();
    for entry in rt.entries()? {
        let name = entry.name().to_owned();
        let row = match entry.liveness() {
            Liveness::Stale => {
                entry.remove()?;
                out.note(&format!(
                    "{name}: its supervisor died without a record; removed"
                ));
                continue;
            }
            Liveness::Launching => Row::bare(name, "starting"),
            Liveness::Exited => {
                let exit = ended(&entry).map(|e| e.exit);
                let state = exit.as_ref().map_or_else(|| "stopped".into(), stopped);
                Row {
                    exit,
                    ..Row::bare(name, &state)
                }
            }
            Liveness::Alive => match status(rt, &name, "ps").await {
                Ok(status) => Row {
                    state: serde_json::to_value(status.info.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_lowercase))
                        .unwrap_or_else(|| format!("{:?}", status.info.state).to_lowercase()),
                    backend: Some(status.info.backend),
                    pid: status.info.pid,
                    vcpus: status.vcpus,
                    memory_mib: status.memory.map(|m| m.base_mib + m.plugged_mib),
                    started_at: Some(status.started_at),
                    ..Row::bare(name, "")
                },
                Err(e) => Row::bare(name, &format!("unresponsive ({e})")),
            },
        };
        rows.push(row);
    }
    if out.json {
        return out.json(&rows);
    }
    out.line(&format!(
        "{:<20} {:<10} {:>8} {:>6} {:>8} {:>8}  STATE",
        "NAME", "BACKEND", "PID", "VCPUS", "MEMORY", "UP"
    ));
    let now = crate::supervisor::unix_now();
    for row in rows {
        let dash = || "-".to_owned();
        out.line(&format!(
            "{:<20} {:<10} {:>8} {:>6} {:>8} {:>8}  {}",
            row.name,
            row.backend.unwrap_or_else(dash),
            row.pid.map_or_else(dash, |p| p.to_string()),
            row.vcpus.map_or_else(dash, |v| v.to_string()),
            row.memory_mib.map_or_else(dash, |m| format!("{m}M")),
            row.started_at
                .map_or_else(dash, |at| format!("{}s", now.saturating_sub(at))),
            row.state
        ));
    }
    Ok(())
}

impl Row {
    fn bare(name: String, state: &str) -> Row {
        Row {
            name,
            state: state.to_owned(),
            backend: None,
            pid: None,
            vcpus: None,
            memory_mib: None,
            started_at: None,
            exit: None,
        }
    }
}

/// `vmkit inspect`: the status of a running VM, the record of a stopped one; JSON in
/// either mode.
pub(crate) async fn inspect(rt: &RuntimeDir, name: &str, out: &Output) -> Result<()> {
    let entry = existing(rt, name)?;
    if entry.liveness() == Liveness::Exited {
        let ended = ended(&entry)
            .ok_or_else(|| state("inspect", name, "stopped, with no readable record"))?;
        return out.json(&ended);
    }
    let status = status(rt, name, "inspect").await?;
    out.json(&status)
}

/// `vmkit hotplug`.
pub(crate) async fn hotplug(
    rt: &RuntimeDir,
    name: &str,
    what: &HotplugWhat,
    out: &Output,
) -> Result<()> {
    let default_id = |kind: &str| format!("{kind}-{}", std::process::id());
    let (req, op) = match what {
        HotplugWhat::Cpu { count } => (Request::SetCpus { count: *count }, "hotplug cpu"),
        HotplugWhat::Memory { mib } => (Request::AddMemory { mib: *mib }, "hotplug memory"),
        HotplugWhat::Disk { spec } => (
            Request::AddDevice {
                device: DeviceSpec::Disk(device_args::disk(spec, &default_id("disk"))?),
            },
            "hotplug disk",
        ),
        HotplugWhat::Nic { spec } => (
            Request::AddDevice {
                device: DeviceSpec::Nic(device_args::nic(spec, &default_id("net"))?),
            },
            "hotplug nic",
        ),
        HotplugWhat::Share { spec } => (
            Request::AddDevice {
                device: DeviceSpec::Share(device_args::share(spec, &default_id("share"))?),
            },
            "hotplug share",
        ),
    };
    let value = ask(rt, name, op, &req, SLOW).await?;
    if out.json {
        return out.json(&value);
    }
    match what {
        HotplugWhat::Cpu { .. } => out.line(&format!(
            "{name}: vCPUs {} -> {}",
            value["before"], value["achieved"]
        )),
        _ => out.line(&format!(
            "{name}: added {}",
            value["id"].as_str().unwrap_or("?")
        )),
    }
    Ok(())
}

/// `vmkit unplug`, `pause`, `resume`: a request whose answer is "done".
pub(crate) async fn simple(
    rt: &RuntimeDir,
    name: &str,
    op: &str,
    req: &Request,
    out: &Output,
) -> Result<()> {
    ask(rt, name, op, req, SLOW).await?;
    if out.json {
        return out.json(&serde_json::json!({ "name": name, "done": op }));
    }
    out.line(&format!("{name}: {op} done"));
    Ok(())
}

/// `vmkit stop`.
pub(crate) async fn stop(rt: &RuntimeDir, args: &StopArgs, out: &Output) -> Result<()> {
    let req = Request::Stop {
        grace_secs: args.time,
        force: args.force,
    };
    let deadline = Duration::from_secs(args.time.unwrap_or(60)) + SLOW;
    let value = ask(rt, &args.vm, "stop", &req, deadline).await?;
    let exit: ExitInfo = serde_json::from_value(value).map_err(|e| Error::Supervisor {
        vm: args.vm.clone(),
        message: format!("stop: a malformed answer: {e}"),
    })?;
    wait_for_exit_record(rt, &args.vm).await;
    if out.json {
        return out.json(&serde_json::json!({ "name": args.vm, "exit": exit }));
    }
    out.line(&format!("{}: {}", args.vm, stopped(&exit)));
    Ok(())
}

/// The supervisor answers a stop before it writes its record and ends: wait for both.
async fn wait_for_exit_record(rt: &RuntimeDir, name: &str) {
    let Ok(entry) = rt.entry(name) else { return };
    let deadline = tokio::time::Instant::now() + QUICK;
    while entry.liveness() == Liveness::Alive && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `vmkit rm`.
pub(crate) async fn rm(rt: &RuntimeDir, names: &[String], force: bool, out: &Output) -> Result<()> {
    for name in names {
        let entry = existing(rt, name)?;
        if matches!(entry.liveness(), Liveness::Alive | Liveness::Launching) {
            if !force {
                return Err(state(
                    "rm",
                    name,
                    "running (`vmkit stop` it first, or `vmkit rm -f`)",
                ));
            }
            let req = Request::Stop {
                grace_secs: None,
                force: true,
            };
            ask(rt, name, "rm -f", &req, SLOW).await?;
            wait_for_exit_record(rt, name).await;
        }
        entry.remove()?;
        if !out.json {
            out.line(name);
        }
    }
    if out.json {
        out.json(&serde_json::json!({ "removed": names }))?;
    }
    Ok(())
}

/// `vmkit logs`: the console on stdout, the VMM's log on stderr.
pub(crate) async fn logs(rt: &RuntimeDir, name: &str, follow: bool) -> Result<()> {
    let entry = existing(rt, name)?;
    let (console, vmm) = log_paths(&entry)?;
    let mut logs = [Tail::new(console, false), Tail::new(vmm, true)];
    loop {
        let alive = matches!(entry.liveness(), Liveness::Alive | Liveness::Launching);
        for log in &mut logs {
            log.print_new()?;
        }
        if !follow || !alive {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn log_paths(entry: &Entry) -> Result<(PathBuf, PathBuf)> {
    let path = entry.launch_file();
    let text =
        std::fs::read(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let launch: Launch = serde_json::from_slice(&text).map_err(|e| Error::ConfigFile {
        path,
        message: e.to_string(),
    })?;
    let layout = launch.config.layout();
    Ok((layout.console_log(), layout.vmm_log()))
}

/// A log file read from where the last read ended.
struct Tail {
    path: PathBuf,
    to_stderr: bool,
    offset: u64,
}

impl Tail {
    fn new(path: PathBuf, to_stderr: bool) -> Tail {
        Tail {
            path,
            to_stderr,
            offset: 0,
        }
    }

    fn print_new(&mut self) -> Result<()> {
        use std::io::{Read, Seek, Write};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Ok(());
        };
        let op = || format!("read {}", self.path.display());
        file.seek(std::io::SeekFrom::Start(self.offset))
            .map_err(|e| Error::io(op(), e))?;
        let mut new = Vec::new();
        file.read_to_end(&mut new).map_err(|e| Error::io(op(), e))?;
        self.offset += new.len() as u64;
        let written = if self.to_stderr {
            std::io::stderr().write_all(&new)
        } else {
            std::io::stdout().write_all(&new)
        };
        written.map_err(|e| Error::io("write the log", e))
    }
}

/// `vmkit exec`: the command runs through vmkit-process, over the guest address the
/// supervisor reports, from this process.
pub(crate) async fn exec(rt: &RuntimeDir, args: &ExecArgs) -> Result<i32> {
    let status = status(rt, &args.vm, "exec").await?;
    let addr = status
        .info
        .guest
        .ok_or_else(|| state("exec", &args.vm, "running without a guest agent"))?;
    let env = args
        .env
        .iter()
        .map(|text| {
            device_args::key_value("--env", text).map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect::<Result<Vec<_>>>()?;
    let attach = Attach {
        argv: args.command.clone(),
        env,
        cwd: args.workdir.clone(),
        stdin: args.interactive,
        tty: args.tty,
    };
    guest_command::run(Arc::new(RemoteGuest::new(addr, DIAL)), &attach).await
}
