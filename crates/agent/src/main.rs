//! `vmkit-agent`: the guest agent binary (see the library's docs for what it serves).
//!
//! ```text
//! vmkit-agent                 # in a guest: vsock ports 1025 (TTRPC) and 1026 (streams)
//! vmkit-agent --unix DIR      # anywhere, for tests: DIR/agent.sock and DIR/stream.sock;
//!                             # PowerOff is refused in this mode
//! vmkit-agent --serial DEV    # in a guest without vsock: the channels of the
//!                             # virtio-serial port DEV (e.g. /dev/vport0p1)
//! vmkit-agent --serial-socket PATH
//!                             # for tests: a Unix socket standing in for the port
//! vmkit-agent --root DIR      # read /proc and /sys under DIR (a fake guest's files)
//! vmkit-agent --max-connections N --max-streams N --body-budget BYTES \
//!             --frame-timeout-ms MS --idle-timeout-ms MS \
//!             --max-processes N --output-buffer BYTES
//!                             # the limits (see `Limits`), defaults 64, 512, 16 MiB,
//!                             # 30 s, 10 min, 128, 256 KiB
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use vmkit_agent::{Limits, Listen, SerialEnd};

const USAGE: &str = "usage: vmkit-agent [--unix DIR | --serial DEV | --serial-socket PATH] \
                     [--root DIR] [--max-connections N] [--max-streams N] \
                     [--body-budget BYTES] [--frame-timeout-ms MS] [--idle-timeout-ms MS] \
                     [--max-processes N] [--output-buffer BYTES]";

/// What the command line asks for.
struct Args {
    listen: Listen,
    limits: Limits,
    root: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = Listen::Vsock;
    let mut limits = Limits::default();
    let mut root = PathBuf::from("/");
    while let Some(arg) = args.next() {
        let mut number = |what: &str| -> Result<u64, String> {
            let value = args.next().ok_or(format!("{what} needs a number"))?;
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{what} {value:?}: not a positive whole number"))
        };
        match arg.as_str() {
            "--unix" => {
                let dir = args.next().ok_or("--unix needs a directory")?;
                listen = Listen::Unix(dir.into());
            }
            "--serial" => {
                let dev = args.next().ok_or("--serial needs a device")?;
                listen = Listen::Serial(SerialEnd::Device(dev.into()));
            }
            "--serial-socket" => {
                let path = args.next().ok_or("--serial-socket needs a path")?;
                listen = Listen::Serial(SerialEnd::Socket(path.into()));
            }
            "--root" => root = args.next().ok_or("--root needs a directory")?.into(),
            "--max-connections" => {
                limits.max_connections = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--max-streams" => {
                limits.max_streams = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--max-processes" => {
                limits.max_processes = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--output-buffer" => {
                limits.output_buffer = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--body-budget" => {
                limits.body_budget = usize::try_from(number(&arg)?).unwrap_or(usize::MAX);
            }
            "--frame-timeout-ms" => {
                limits.frame_timeout = std::time::Duration::from_millis(number(&arg)?);
            }
            "--idle-timeout-ms" => {
                limits.idle_timeout = std::time::Duration::from_millis(number(&arg)?);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen,
        limits,
        root,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            vmkit_agent::log_line(&format!("vmkit-agent: {e}"));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            vmkit_agent::log_line(&format!("vmkit-agent: start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            vmkit_agent::log_line(&format!("vmkit-agent: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM; in a guest the agent lives as long as the guest.
async fn serve(args: Args) -> Result<(), String> {
    let serving = vmkit_agent::start_with_root(&args.listen, args.limits, &args.root)
        .map_err(|e| e.to_string())?;
    vmkit_agent::log_line(&format!("vmkit-agent: serving {}", serving.describe()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("watch SIGTERM: {e}"))?;
    term.recv().await;
    Ok(())
}
