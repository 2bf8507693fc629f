//! The start's first phase: the state dir taken, the accelerator, sandbox and kernel
//! command line decided, the TAPs opened, the guest's vsock link set up, and QEMU's
//! command line built — everything before QEMU is spawned.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use vmkit_core::{
    Error as CoreError, HostFd, NicBackend, NicConfig, ShareConfig, ShareVia, VmEvent,
};

use super::{Progress, unless_missing};
use crate::command::{Launch, build};
use crate::devices::{cold_share_name, virtiofsd_launch};
use crate::fs_daemon::FsDaemon;
use crate::guest::{self, GuestDevice};
use crate::locks::lock;
use crate::options::{Machine, Sandbox};
use crate::running::Running;
use crate::vm::Vm;
use crate::{accel, host, kernel_cmdline};

/// What QEMU is spawned with.
pub(super) struct Prepared {
    /// Its arguments.
    pub(super) args: Vec<OsString>,
    /// The fds it inherits (TAPs, the vhost-vsock device).
    pub(super) keep_fds: Vec<RawFd>,
    /// The TAP fds, held until the VM is gone.
    pub(super) taps: Vec<HostFd>,
    /// Its stderr: the VMM log.
    pub(super) stderr: std::fs::File,
}

fn op(what: &str) -> String {
    format!("start: {what}")
}

/// The prepare phase. The boot's [`Running`] exists from the moment the state dir is
/// held, so a failure from here on releases what was taken.
pub(super) async fn prepare(vm: &Arc<Vm>, progress: &Progress<'_>) -> vmkit_core::Result<Prepared> {
    let config = vm.config();
    let options = vm.options();
    // The probe reads /proc and /dev (Linux) or runs the QEMU binary (macOS).
    let (requested, probe_options) = (config.accel, options.clone());
    let accel = tokio::task::spawn_blocking(move || accel::resolve(requested, &probe_options))
        .await
        .map_err(|e| CoreError::backend(op("accelerator"), e))?
        .map_err(|e| CoreError::backend(op("accelerator"), e))?;
    take_state_dir(vm, accel).await?;
    // The binary is asked (its `-help`) only when the answer matters.
    let ties_us = host::children_die_with_us();
    let binary = if options.sandbox == Sandbox::Auto || !ties_us {
        binary_features(&options.binary).await
    } else {
        BinaryFeatures::default()
    };
    let sandbox = match options.sandbox {
        Sandbox::On => true,
        Sandbox::Off => false,
        Sandbox::Auto => binary.seccomp,
    };
    // Where the platform cannot tie QEMU's life to ours (macOS), QEMU newer than 10.0
    // can do it itself.
    let exit_with_parent = !ties_us && binary.exit_with_parent;
    // Only microvm needs the TSC frequency (a /proc/cpuinfo read).
    let tsc_khz = (options.machine == Machine::Microvm)
        .then(host::tsc_khz)
        .flatten();
    let cmdline = kernel_cmdline::build(options.machine, tsc_khz, &config.kernel.cmdline)?;
    let devices = vm.cold_devices();
    let (nics, taps) = open_taps(&devices.nics)?;
    let mut keep_fds: Vec<RawFd> = nics.iter().filter_map(|(_, fd)| *fd).collect();
    let vsock = link(vm, progress).await?;
    share_daemons(vm, &devices.shares, progress).await?;
    if let Some(GuestDevice::Kernel { vhostfd, .. }) = &vsock {
        keep_fds.push(*vhostfd);
    }
    let args = build(&Launch {
        config,
        options,
        accel,
        cmdline: &cmdline,
        sandbox,
        exit_with_parent,
        disks: &devices.disks,
        nics: &nics,
        vsock: vsock.as_ref(),
        shares: &devices.shares,
        vhost_user_fs: vm.features().virtio_fs,
    });
    let vmm_log = config.layout().vmm_log();
    let stderr = vmkit_core::state_dir::create_private_file(&vmm_log)
        .map_err(|e| CoreError::io(op(&format!("create {}", vmm_log.display())), e))?;
    Ok(Prepared {
        args,
        keep_fds,
        taps,
        stderr,
    })
}

/// Each NIC with the TAP fd QEMU gets for it (none for the backends without TAP).
type NicFds = Vec<(NicConfig, Option<RawFd>)>;

/// Opens every TAP the NICs name (a TAP vmkit creates vanishes with the VM; QEMU
/// inherits the fds): each NIC with the fd QEMU gets, and the fds the VM holds (those
/// vmkit opened and the caller's) until it is gone.
fn open_taps(nics: &[NicConfig]) -> vmkit_core::Result<(NicFds, Vec<HostFd>)> {
    let mut with_fds = Vec::with_capacity(nics.len());
    let mut held: Vec<HostFd> = Vec::new();
    for nic in nics {
        let fd = match &nic.backend {
            NicBackend::Tap { name } => {
                let fd = host::open_tap(name).map_err(|e| {
                    CoreError::io(op(&format!("open TAP {name} for NIC {}", nic.id)), e)
                })?;
                let raw = fd.as_raw_fd();
                held.push(fd.into());
                Some(raw)
            }
            NicBackend::TapFd { fd } => {
                held.push(fd.clone());
                Some(fd.as_raw_fd())
            }
            NicBackend::User | NicBackend::Stream { .. } | NicBackend::Vmnet { .. } => None,
        };
        with_fds.push((nic.clone(), fd));
    }
    Ok((with_fds, held))
}

/// Sets up the guest's vsock link (a CID, or a vhost-device-vsock daemon) and hands it
/// to the boot's [`Running`]; returns the device QEMU gets (`None`: no agent).
async fn link(vm: &Vm, progress: &Progress<'_>) -> vmkit_core::Result<Option<GuestDevice>> {
    let plan = &vm.features().transport;
    match guest::establish(plan, vm.config(), vm.options()).await {
        Ok(Some((link, device))) => {
            progress.report(match (link.daemon_pid(), link.cid) {
                (Some(pid), _) => format!("vhost-device-vsock up (pid {pid})"),
                (None, Some(cid)) => format!("guest CID {cid} reserved"),
                (None, None) => format!("serial link served at {}", link.agent),
            });
            vm.with_running(|r| r.set_link(link));
            Ok(Some(device))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(CoreError::backend(op("set up the guest's vsock"), e)),
    }
}

/// Starts the virtiofsd of each cold virtio-fs share (the table holds each until the
/// VM ends) and waits until each serves, within the start's deadline.
async fn share_daemons(
    vm: &Arc<Vm>,
    shares: &[ShareConfig],
    progress: &Progress<'_>,
) -> vmkit_core::Result<()> {
    let config = vm.config();
    let deadline = Instant::now() + config.timeouts.start;
    let layout = config.layout();
    for (i, share) in shares.iter().enumerate() {
        if share.via != ShareVia::VirtioFs {
            continue;
        }
        let launch = virtiofsd_launch(
            share,
            &vm.options().virtiofsd_binary,
            &config.state_dir,
            layout.log_dir(),
            &cold_share_name(i),
        );
        let weak = Arc::downgrade(vm);
        let id = share.id.clone();
        let on_exit = move |reason| {
            if let Some(vm) = weak.upgrade() {
                vm.publish(VmEvent::DeviceFailed { id, reason });
            }
        };
        let op = op(&format!("virtiofsd for share {}", share.id));
        let daemon = FsDaemon::spawn(&op, share, launch, deadline, on_exit).await?;
        progress.report(format!(
            "virtiofsd for share {} up (pid {})",
            share.id,
            daemon.pid()
        ));
        vm.devices().set_daemon(&share.id, daemon);
    }
    Ok(())
}

/// Makes the state and log dirs private, takes this VM's hold on the state dir (the
/// boot's [`Running`] holds it from then on), and removes what an earlier owner left
/// (its QMP socket, its console log). Nothing in the dir is touched before the hold is
/// taken: it may be another live VM's.
async fn take_state_dir(vm: &Arc<Vm>, accel: vmkit_core::Accel) -> vmkit_core::Result<()> {
    let layout = vm.config().layout();
    let holder = format!("vm {:?}", vm.id());
    let prepared = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || {
            layout.prepare("start")?;
            layout.lock("start", &holder)
        })
        .await
    };
    let lock = match prepared {
        Ok(lock) => lock?,
        Err(join) => {
            return Err(CoreError::io(
                "start: prepare the state dir",
                std::io::Error::other(join.to_string()),
            ));
        }
    };
    vm.begin_running(Running::new(lock, layout.control_socket(), accel));
    for stale in [layout.control_socket(), layout.console_log()] {
        unless_missing(tokio::fs::remove_file(&stale).await)
            .map_err(|e| CoreError::io(format!("start: remove stale {}", stale.display()), e))?;
    }
    Ok(())
}

/// What a QEMU binary's `-help` says it can do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BinaryFeatures {
    /// Built with seccomp (`-sandbox`).
    seccomp: bool,
    /// `-run-with exit-with-parent=on` (QEMU newer than 10.0).
    exit_with_parent: bool,
}

impl BinaryFeatures {
    fn of(help: &str) -> BinaryFeatures {
        BinaryFeatures {
            seccomp: help.lines().any(|l| l.starts_with("-sandbox ")),
            exit_with_parent: help
                .lines()
                .any(|l| l.starts_with("-run-with ") && l.contains("exit-with-parent")),
        }
    }
}

/// What `binary` can do, from its `-help`. Asked once per binary per process; a binary
/// that cannot be asked gets none of it (its start will report the real problem).
async fn binary_features(binary: &Path) -> BinaryFeatures {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, BinaryFeatures>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(known) = lock(cache).get(binary) {
        return *known;
    }
    let mut command = tokio::process::Command::new(binary);
    command
        .arg("-help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let features = match tokio::time::timeout(Duration::from_secs(10), command.output()).await {
        Ok(Ok(out)) => BinaryFeatures::of(&String::from_utf8_lossy(&out.stdout)),
        _ => BinaryFeatures::default(),
    };
    lock(cache).insert(binary.to_owned(), features);
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_text_says_what_the_binary_can_do() {
        let qemu_10_0 = "-sandbox on[,obsolete=allow|deny]\n-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n";
        assert_eq!(
            BinaryFeatures::of(qemu_10_0),
            BinaryFeatures {
                seccomp: true,
                exit_with_parent: false
            }
        );
        let newer = "-run-with [async-teardown=on|off][,chroot=dir][exit-with-parent=on|off][user=username|uid:gid]\n";
        assert!(BinaryFeatures::of(newer).exit_with_parent);
        assert!(!BinaryFeatures::of(newer).seccomp);
    }
}
