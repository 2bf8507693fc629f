//! `vmkit`: run and manage vmkit VMs from a shell.
//!
//! ```text
//! vmkit run [--cpus N] [--memory MIB] [--disk SPEC]… [--share SPEC]… [-- CMD…]
//! vmkit run -d --name web            # detached: a supervisor holds the VM
//! vmkit ps | inspect web | exec -it web -- sh | hotplug web cpu 2 | stop web | rm web
//! vmkit logs -f web | pause web | resume web | unplug web ID | backends | check
//! ```
//!
//! Built on vmkit's public API only. `run` boots a VM in the foreground (its console,
//! or a command in the guest whose exit code becomes vmkit's) or hands it to a per-VM
//! supervisor process (`--detach`) that answers the other commands on a control socket
//! in a private runtime dir. `--json` makes every command's output one JSON document;
//! errors print their cause chain, one line each, and exit non-zero.

mod args;
mod backends;
mod check;
mod control;
mod detach;
mod device_args;
mod error;
mod foreground;
mod guest_command;
mod launch;
mod manage;
mod output;
mod remote_guest;
mod runtime_dir;
mod supervisor;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use args::{Cli, Command, Format, RunArgs};
use control::Request;
use error::{Error, Result};
use launch::Launch;
use output::Output;
use runtime_dir::RuntimeDir;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return bad_usage(&e),
    };
    init_logging(
        cli.verbose,
        matches!(cli.command, Command::Supervise { .. }),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vmkit: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // A read of this terminal's stdin may still be blocked in a thread: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// A command line clap refused: one line naming the problem (help and version as
/// asked).
fn bad_usage(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("bad arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("vmkit: {first} (see `vmkit --help`)");
    ExitCode::from(2)
}

/// The error, then each cause not already in the line above it, one line each.
fn print_error(e: &Error) {
    let mut shown = e.to_string();
    eprintln!("vmkit: {shown}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !shown.contains(&text) {
            eprintln!("  caused by: {text}");
            shown = text;
        }
        source = cause.source();
    }
}

/// `tracing` on stderr: `RUST_LOG`, else by `-v` count; the supervisor logs at info
/// into its log file whatever the count.
fn init_logging(verbose: u8, supervisor: bool) {
    let level = match (verbose, supervisor) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The test guest's directory: `$VMKIT_IMAGE_DIR`, else `target/vmkit-image`.
pub(crate) fn default_image_dir() -> PathBuf {
    std::env::var_os("VMKIT_IMAGE_DIR")
        .map_or_else(|| PathBuf::from("target/vmkit-image"), PathBuf::from)
}

async fn dispatch(cli: Cli) -> Result<i32> {
    let out = Output {
        json: cli.json
            || matches!(
                cli.command,
                Command::Ps {
                    format: Format::Json
                }
            ),
    };
    let rt = || RuntimeDir::open(cli.runtime_dir.as_deref());
    match cli.command {
        Command::Run(args) => run(&rt()?, &args, &out).await,
        Command::Ps { .. } => manage::ps(&rt()?, &out).await.map(|()| 0),
        Command::Inspect { vm } => manage::inspect(&rt()?, &vm, &out).await.map(|()| 0),
        Command::Exec(args) => {
            let span = tracing::info_span!("vm", name = %args.vm);
            let _enter = span.enter();
            manage::exec(&rt()?, &args).await
        }
        Command::Hotplug { vm, what } => {
            manage::hotplug(&rt()?, &vm, &what, &out).await.map(|()| 0)
        }
        Command::Unplug { vm, id } => {
            let req = Request::Unplug { id: id.clone() };
            manage::simple(&rt()?, &vm, &format!("unplug {id}"), &req, &out)
                .await
                .map(|()| 0)
        }
        Command::Pause { vm } => manage::simple(&rt()?, &vm, "pause", &Request::Pause, &out)
            .await
            .map(|()| 0),
        Command::Resume { vm } => manage::simple(&rt()?, &vm, "resume", &Request::Resume, &out)
            .await
            .map(|()| 0),
        Command::Stop(args) => manage::stop(&rt()?, &args, &out).await.map(|()| 0),
        Command::Rm { force, vms } => manage::rm(&rt()?, &vms, force, &out).await.map(|()| 0),
        Command::Logs { follow, vm } => manage::logs(&rt()?, &vm, follow).await.map(|()| 0),
        Command::Backends(sources) => {
            let opts = backends::Options::from_args(&sources).map_err(Error::BadArgument)?;
            backends::run(&opts).map_err(Error::BadArgument).map(|()| 0)
        }
        Command::Check => check::run(&out).await.map(|()| 0),
        Command::Supervise { dir } => {
            let entry = supervised_entry(&dir)?;
            let span = tracing::info_span!("vm", name = %entry.name());
            let _enter = span.enter();
            supervisor::supervise(entry).await.map(|()| 0)
        }
    }
}

/// `vmkit run`: in the foreground, or under a supervisor with `--detach`.
async fn run(rt: &RuntimeDir, args: &RunArgs, out: &Output) -> Result<i32> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => format!("vm-{:08x}", rand_suffix()),
    };
    runtime_dir::check_name(&name)?;
    let span = tracing::info_span!("vm", name = %name);
    let _enter = span.enter();
    let image_dir = default_image_dir();
    if args.detach {
        let entry = rt.entry(&name)?;
        // Everything is checked before the entry is made: a bad flag leaves nothing.
        let launch = Launch::from_args(args, &name, &entry.state_dir(), &image_dir)?;
        entry.create()?;
        let result = detach::run(&entry, &launch, out).await;
        return result.map(|()| 0);
    }
    let scratch = rt.scratch(&name)?;
    let launch = match Launch::from_args(args, &name, &scratch.join("vm"), &image_dir) {
        Ok(launch) => launch,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    foreground::run(&launch, &scratch, &args.command, out).await
}

/// A VM name suffix: the clock and the pid, mixed.
fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

/// The entry a supervisor was started for: `dir` is `<runtime dir>/<name>`.
fn supervised_entry(dir: &std::path::Path) -> Result<runtime_dir::Entry> {
    let bad = || Error::BadArgument(format!("supervise {}: not a VM entry", dir.display()));
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?;
    let root = dir.parent().ok_or_else(bad)?;
    RuntimeDir::open(Some(root))?.entry(name)
}
