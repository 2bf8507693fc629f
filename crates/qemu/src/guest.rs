//! Guest communication: the vsock link and the agent.
//!
//! - Kernel vsock where `/dev/vhost-vsock` works: a CID reserved in the kernel
//!   (`VHOST_VSOCK_SET_GUEST_CID`) through the host-wide [`CidAllocator`], its fd handed
//!   to QEMU's `vhost-vsock-pci`.
//! - Otherwise hybrid vsock: one `vhost-device-vsock` daemon per VM, QEMU's
//!   `vhost-user-vsock-pci` on its vhost-user socket, guest RAM in a shared memfd (the
//!   daemon maps it), and the host dials the daemon's Unix socket (`CONNECT <port>`).
//!   The daemon lives exactly as long as the VM: spawned with a parent-death signal,
//!   killed and reaped when the VM is gone, its sockets removed.
//!
//! The agent's first answer to `Ping` is the guest's ready signal; the client that got
//! it is cached, and re-dialled once its connection is seen to close.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use vmkit_core::{Error as CoreError, GuestTransport, InstanceConfig};
use vmkit_vsock::{
    CidAllocator, CidLease, CidOptions, ConnHealth, GuestAddr, LinkGate, Reservation, TtrpcClient,
};

use crate::error::Error;
use crate::host;
use crate::options::QemuOptions;
use crate::process::{Process, tail};
use crate::serial_bridge::SerialBridge;

/// The guest CID every hybrid-vsock VM gets: each has its own daemon, so CIDs need not
/// differ between VMs.
pub(crate) const HYBRID_GUEST_CID: u32 = 3;
/// How long after QEMU's `cont` answer (or its RESUME) the vsock link opens. QEMU sends
/// RESUME before it restarts the vhost-user device, and the restart's messages are only
/// queued for the daemon when `cont` answers; traffic that reaches vhost-device-vsock
/// before it has processed them ends its worker (see [`vmkit_vsock::LinkGate`]).
pub(crate) const LINK_SETTLE: Duration = Duration::from_millis(50);
/// How long the daemon may take to die after SIGKILL.
const DAEMON_REAP: Duration = Duration::from_secs(5);
/// How many lines of the daemon's output go into an error.
const DAEMON_LOG_LINES: usize = 8;

/// How the guest will be reached, decided before QEMU starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// No agent: readiness is the serial console's ready line.
    None,
    /// Hybrid vsock through a vhost-device-vsock daemon serving `uds`.
    Hybrid { port: u32, uds: PathBuf },
    /// Kernel vsock; `cid` as configured, or allocated.
    Kernel { port: u32, cid: Option<u32> },
    /// A virtio-serial port on QEMU's `chardev` socket, its ports served as sockets in
    /// `dir` (see [`crate::serial_bridge`]).
    Serial { chardev: PathBuf, dir: PathBuf },
}

impl Plan {
    /// The plan for `config` on this host. `Auto` picks kernel vsock when it works,
    /// else hybrid vsock when this host's QEMU has vhost-user and the daemon is there to
    /// run, else virtio-serial.
    pub(crate) fn for_config(config: &InstanceConfig, options: &QemuOptions) -> Plan {
        let layout = config.layout();
        let serial = || Plan::Serial {
            chardev: layout.serial_socket(),
            dir: layout.guest_dir(),
        };
        match &config.transport {
            GuestTransport::None => Plan::None,
            GuestTransport::Auto { port } if host::vhost_vsock_usable() => Plan::Kernel {
                port: *port,
                cid: None,
            },
            GuestTransport::Auto { port }
                if host::vhost_user_supported() && options.vhost_vsock_binary.is_file() =>
            {
                Plan::Hybrid {
                    port: *port,
                    uds: layout.vsock_socket(),
                }
            }
            GuestTransport::Auto { .. } | GuestTransport::VirtioSerial => serial(),
            GuestTransport::Vsock { cid, port } => Plan::Kernel {
                port: *port,
                cid: *cid,
            },
            GuestTransport::HybridVsock { uds, port } => Plan::Hybrid {
                port: *port,
                uds: uds.clone().unwrap_or_else(|| layout.vsock_socket()),
            },
        }
    }
}

/// The device QEMU gets for the guest link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GuestDevice {
    /// A virtio-serial port on the chardev socket QEMU listens on.
    Serial {
        /// The chardev's socket.
        chardev: PathBuf,
    },
    /// `vhost-user-vsock` on the daemon's vhost-user `socket`; guest RAM must then be a
    /// shared memfd.
    VhostUser {
        /// The daemon's vhost-user socket.
        socket: PathBuf,
    },
    /// `vhost-vsock` with the kernel-reserved fd.
    Kernel {
        /// The guest's CID.
        cid: u32,
        /// The `/dev/vhost-vsock` fd the CID is reserved on (QEMU inherits it).
        vhostfd: RawFd,
    },
}

/// The CID reservation of a kernel-vsock VM.
enum Reserved {
    /// From the allocator (lock file + kernel fd).
    Leased(CidLease<OwnedFd>),
    /// The CID the config named, reserved in the kernel only.
    Fixed(OwnedFd),
}

impl Reserved {
    fn fd(&self) -> Option<RawFd> {
        match self {
            Reserved::Leased(lease) => lease.reservation().map(AsRawFd::as_raw_fd),
            Reserved::Fixed(fd) => Some(fd.as_raw_fd()),
        }
    }
}

/// The agent's virtio-serial port's QEMU device id (what `VSERPORT_CHANGE` names).
pub(crate) const SERIAL_PORT_ID: &str = "vmkit-agent-port";

/// What exists for guest communication while the VM lives. Dropping it kills the
/// daemon (without waiting); [`Link::release`] also waits for it and removes sockets.
pub(crate) struct Link {
    /// The agent's address.
    pub(crate) agent: GuestAddr,
    /// The guest's CID (kernel vsock) or [`HYBRID_GUEST_CID`]; `None` over
    /// virtio-serial.
    pub(crate) cid: Option<u32>,
    daemon: Option<Arc<Process>>,
    /// The host end of a virtio-serial link.
    bridge: Option<SerialBridge>,
    reserved: Option<Reserved>,
    /// Sockets created for this VM, removed on release.
    sockets: Vec<PathBuf>,
    /// Dirs made for those sockets, removed after them.
    dirs: Vec<PathBuf>,
    /// The daemon's vhost-user socket and its identity once QEMU could connect (hybrid).
    vhost_server: Option<(PathBuf, SocketIdentity)>,
    /// Holds this process's traffic to the daemon while the VM is paused (hybrid; see
    /// [`LinkGate`]).
    gate: Option<LinkGate>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("agent", &self.agent)
            .field("cid", &self.cid)
            .field("daemon", &self.daemon.as_ref().map(|d| d.pid()))
            .finish_non_exhaustive()
    }
}

impl Link {
    /// The daemon's vhost-user socket and its identity when QEMU connected (hybrid).
    pub(crate) fn vhost_server(&self) -> Option<(PathBuf, SocketIdentity)> {
        self.vhost_server.clone()
    }

    /// Holds (`false`) or lets through (`true`) the host's traffic to the guest. Only
    /// hybrid vsock needs it: the kernel's vhost-vsock copes with a paused VM.
    pub(crate) fn set_open(&self, open: bool) {
        if let Some(gate) = &self.gate {
            if open {
                gate.open();
            } else {
                gate.close();
            }
        }
    }

    /// The virtio-serial link to the agent, when that is the transport.
    pub(crate) fn serial_mux(&self) -> Option<vmkit_serial::Mux> {
        self.bridge.as_ref().and_then(SerialBridge::mux)
    }

    /// QEMU says the guest closed its virtio-serial port `id`: when it is the agent's,
    /// the bridge ends the agent's channels (see [`SerialBridge::guest_closed`]).
    pub(crate) fn guest_port_closed(&self, id: &str) {
        if let Some(bridge) = &self.bridge
            && id == SERIAL_PORT_ID
        {
            bridge.guest_closed();
        }
    }

    /// Whether the host's traffic is gated (hybrid vsock; see [`Link::set_open`]).
    pub(crate) fn is_gated(&self) -> bool {
        self.gate.is_some()
    }

    /// Takes the daemon out (hybrid vsock, see `relink`), for the caller to kill.
    pub(crate) fn take_daemon(&mut self) -> Option<Arc<Process>> {
        self.daemon.take()
    }

    /// Puts a new daemon in place (see `relink`), with its vhost-user socket's identity.
    pub(crate) fn put_daemon(&mut self, daemon: Arc<Process>, identity: SocketIdentity) {
        if let Some((_, known)) = self.vhost_server.as_mut() {
            *known = identity;
        }
        self.daemon = Some(daemon);
    }

    /// The sockets made for this link (hybrid vsock), removed on release.
    pub(crate) fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// The daemon's pid (hybrid vsock), for reports and tests.
    pub(crate) fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.pid())
    }

    /// Kills and reaps the daemon, removes the sockets, releases the CID.
    pub(crate) async fn release(mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.signal(libc::SIGKILL);
            if daemon.wait_timeout(DAEMON_REAP).await.is_none() {
                tracing::error!(
                    pid = daemon.pid(),
                    "vhost-device-vsock not reaped {DAEMON_REAP:?} after SIGKILL"
                );
            }
        }
        // Nothing may wait on a VM that is gone.
        self.set_open(true);
        drop(self.bridge.take());
        // Plain unlinks, on the blocking pool (Drop does them inline).
        let sockets: Vec<PathBuf> = self.sockets.drain(..).collect();
        let dirs: Vec<PathBuf> = self.dirs.drain(..).collect();
        let _ = tokio::task::spawn_blocking(move || remove_all(&sockets, &dirs)).await;
        self.reserved = None;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // `release` took the daemon and removed the sockets; a link dropped without it
        // (its instance was dropped while running) kills the daemon without waiting
        // (its supervisor reaps it) and removes the sockets now.
        if let Some(daemon) = self.daemon.take() {
            daemon.signal(libc::SIGKILL);
        }
        self.set_open(true);
        drop(self.bridge.take());
        remove_all(&self.sockets, &self.dirs);
        self.sockets.clear();
        self.dirs.clear();
    }
}

/// Removes `sockets`, then the (now empty) `dirs` that held them.
fn remove_all(sockets: &[PathBuf], dirs: &[PathBuf]) {
    for socket in sockets {
        remove_if_present(socket);
    }
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a link's dir");
        }
    }
}

fn remove_if_present(path: &Path) {
    host::remove_if_present(path, "a vsock socket");
}

/// The host-wide CID allocator of this process: lock files in `$VMKIT_CID_DIR`, else
/// `/run/vmkit/cids` when this user may create it, else `<tmp>/vmkit-cids-<euid>`. The
/// dir is private (0700, ours; see [`vmkit_core::state_dir`]): a dir another user
/// planted in a shared `/tmp` is refused, not used.
pub(crate) fn cid_allocator() -> Result<&'static CidAllocator, Error> {
    static CIDS: OnceLock<Result<CidAllocator, String>> = OnceLock::new();
    let cids = CIDS.get_or_init(|| {
        let op = "set up the CID lock dir";
        let dir = match std::env::var_os("VMKIT_CID_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let run = Path::new("/run/vmkit/cids");
                if vmkit_core::state_dir::prepare_private_dir(op, run).is_ok() {
                    run.to_owned()
                } else {
                    std::env::temp_dir()
                        .join(format!("vmkit-cids-{}", vmkit_core::state_dir::euid()))
                }
            }
        };
        vmkit_core::state_dir::prepare_private_dir(op, &dir).map_err(|e| e.to_string())?;
        CidAllocator::new(CidOptions {
            lock_dir: Some(dir),
            ..CidOptions::default()
        })
        .map_err(|e| e.to_string())
    });
    cids.as_ref().map_err(|e| Error::Io {
        op: "set up the CID allocator".into(),
        source: std::io::Error::other(e.clone()),
    })
}

/// Sets the link up before QEMU starts: reserves the CID, or spawns the daemon and
/// waits (until `deadline`) for its vhost-user socket. `None` for [`Plan::None`].
///
/// # Errors
/// The daemon missing or dying, the CID in use, the deadline (as the caller's timeout).
pub(crate) async fn establish(
    plan: &Plan,
    config: &InstanceConfig,
    options: &QemuOptions,
) -> Result<Option<(Link, GuestDevice)>, Error> {
    match plan {
        Plan::None => Ok(None),
        Plan::Kernel { port, cid } => kernel_link(*port, *cid).map(Some),
        Plan::Hybrid { port, uds } => hybrid_link(config, options, *port, uds).await.map(Some),
        Plan::Serial { chardev, dir } => serial_link(chardev, dir).await.map(Some),
    }
}

/// Kernel vsock: the CID named (reserved in the kernel) or one from the allocator.
fn kernel_link(port: u32, cid: Option<u32>) -> Result<(Link, GuestDevice), Error> {
    let reserved = match cid {
        Some(cid) => match host::reserve_vsock_cid(cid) {
            Ok(Some(fd)) => Reserved::Fixed(fd),
            Ok(None) => return Err(Error::CidInUse { cid }),
            Err(source) => {
                return Err(Error::Io {
                    op: format!("reserve guest CID {cid} on /dev/vhost-vsock"),
                    source,
                });
            }
        },
        None => Reserved::Leased(cid_allocator()?.allocate_with(|cid| {
            Ok(match host::reserve_vsock_cid(cid)? {
                Some(fd) => Reservation::Reserved(fd),
                None => Reservation::Taken,
            })
        })?),
    };
    let cid = match &reserved {
        Reserved::Leased(lease) => lease.cid(),
        Reserved::Fixed(_) => cid.unwrap_or_default(),
    };
    let vhostfd = reserved.fd().ok_or_else(|| Error::Io {
        op: format!("reserve guest CID {cid}"),
        source: std::io::Error::other("the reservation holds no fd"),
    })?;
    let link = Link {
        agent: GuestAddr::Vsock { cid, port },
        cid: Some(cid),
        daemon: None,
        bridge: None,
        reserved: Some(reserved),
        sockets: Vec::new(),
        dirs: Vec::new(),
        vhost_server: None,
        gate: None,
    };
    Ok((link, GuestDevice::Kernel { cid, vhostfd }))
}

/// Hybrid vsock: a vhost-device-vsock daemon serving QEMU and the host's `uds`.
async fn hybrid_link(
    config: &InstanceConfig,
    options: &QemuOptions,
    port: u32,
    uds: &Path,
) -> Result<(Link, GuestDevice), Error> {
    let vhost = config.layout().vhost_user_vsock_socket();
    let (daemon, identity) = spawn_daemon(config, options, uds).await?;
    let link = Link {
        agent: GuestAddr::HybridVsock {
            uds: uds.to_owned(),
            port,
        },
        cid: Some(HYBRID_GUEST_CID),
        daemon: Some(daemon),
        bridge: None,
        reserved: None,
        sockets: vec![uds.to_owned(), vhost.clone()],
        dirs: Vec::new(),
        vhost_server: Some((vhost.clone(), identity)),
        gate: Some(LinkGate::register(uds)),
    };
    Ok((link, GuestDevice::VhostUser { socket: vhost }))
}

/// virtio-serial: the bridge that serves the agent's ports in `dir` over QEMU's
/// `chardev`.
async fn serial_link(chardev: &Path, dir: &Path) -> Result<(Link, GuestDevice), Error> {
    let ports = [vmkit_proto::AGENT_PORT, vmkit_proto::STREAM_PORT];
    let (bridge, agent) =
        SerialBridge::start(chardev.to_owned(), dir, &ports, vmkit_proto::AGENT_PORT)
            .await
            .map_err(|source| Error::Io {
                op: format!("serve the guest's serial link in {}", dir.display()),
                source,
            })?;
    let mut sockets = bridge.sockets().to_vec();
    sockets.push(chardev.to_owned());
    let link = Link {
        agent,
        cid: None,
        daemon: None,
        bridge: Some(bridge),
        reserved: None,
        sockets,
        dirs: vec![dir.to_owned()],
        vhost_server: None,
        gate: None,
    };
    let device = GuestDevice::Serial {
        chardev: chardev.to_owned(),
    };
    Ok((link, device))
}

/// Spawns a vhost-device-vsock for `config`'s VM, serving QEMU on the state dir's
/// vhost-user socket and the host on `uds` (stale sockets at both are removed first),
/// and waits until it is ready for QEMU. Returns the daemon and its vhost-user socket's
/// identity. Unbounded: the caller's deadline bounds it.
///
/// # Errors
/// The daemon missing, not runnable, or exiting before it is ready (with its output).
pub(crate) async fn spawn_daemon(
    config: &InstanceConfig,
    options: &QemuOptions,
    uds: &Path,
) -> Result<(Arc<Process>, SocketIdentity), Error> {
    let layout = config.layout();
    let vhost = layout.vhost_user_vsock_socket();
    for stale in [uds, vhost.as_path()] {
        remove_if_present(stale);
    }
    let log_path = layout.log_dir().join("vsock.log");
    let log =
        vmkit_core::state_dir::create_private_file(&log_path).map_err(|source| Error::Io {
            op: format!("create {}", log_path.display()),
            source,
        })?;
    let args = vec![
        "--guest-cid".into(),
        HYBRID_GUEST_CID.to_string().into(),
        "--socket".into(),
        vhost.clone().into(),
        "--uds-path".into(),
        uds.to_owned().into(),
    ];
    let binary = &options.vhost_vsock_binary;
    // Its warnings (a refused connection, a failed vring) go to vsock.log, and so into
    // vmkit's errors; the one it logs for every dial made while the guest's driver is
    // still starting is left out.
    let env = [("RUST_LOG", DAEMON_LOG_FILTER)];
    let daemon = Process::spawn_with_env(binary, args, log, &[], &env)
        .await
        .map_err(|e| match e {
            // Only a binary that is not there (or not runnable) is "missing"; any other
            // spawn failure keeps its own words.
            Error::Spawn { binary, source }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                Error::VsockDaemonMissing { binary, source }
            }
            other => other,
        })?;
    let daemon = Arc::new(daemon);
    // The daemon creates its vhost-user socket when it is ready for QEMU; the socket's
    // identity then tells a later re-creation apart.
    match daemon.until_file(&vhost).await {
        Ok(meta) => {
            tracing::debug!(vm = %config.id, pid = daemon.pid(), "vhost-device-vsock up");
            Ok((daemon, SocketIdentity::of(&meta)))
        }
        Err(exit) => {
            for socket in [uds, vhost.as_path()] {
                remove_if_present(socket);
            }
            Err(Error::VsockDaemonExited {
                status: exit.to_string(),
                stderr: tail(&log_path, DAEMON_LOG_LINES).await,
            })
        }
    }
}

/// What vhost-device-vsock logs: warnings, without the one its `vhu_vsock` module
/// repeats for each early dial (`Received a backend event before vring
/// initialization`). A directive matches by module-path prefix, so `vhu_vsock_thread`
/// (where a refused or failed host connection is logged) is named on its own; the
/// longer name wins.
const DAEMON_LOG_FILTER: &str =
    "warn,vhost_device_vsock::vhu_vsock=error,vhost_device_vsock::vhu_vsock_thread=warn";

/// Whether the hybrid daemon has re-created its vhost-user socket (`server`: the path
/// and the inode QEMU connected to). vhost-device-vsock 0.3 does that when its
/// connection to QEMU ends: it treats a disconnect or a partial message as normal and
/// serves anew. QEMU is not told, and the new server has no guest memory, so it refuses
/// every host dial.
pub(crate) async fn daemon_restarted(server: &(PathBuf, SocketIdentity)) -> bool {
    tokio::fs::metadata(&server.0)
        .await
        .is_ok_and(|m| SocketIdentity::of(&m) != server.1)
}

/// What tells one socket file from a later one at the same path: the inode alone does
/// not (tmpfs hands a freed inode number straight out again), so its change time too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketIdentity {
    inode: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl SocketIdentity {
    pub(crate) fn of(meta: &std::fs::Metadata) -> SocketIdentity {
        use std::os::unix::fs::MetadataExt;
        SocketIdentity {
            inode: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// A cached agent connection.
#[derive(Clone)]
pub(crate) struct Agent {
    pub(crate) client: TtrpcClient,
    pub(crate) health: ConnHealth,
}

impl Agent {
    pub(crate) fn is_alive(&self) -> bool {
        self.health.is_alive()
    }
}

/// Dials `addr` until `deadline` and returns once the agent answers `Ping` (see
/// [`vmkit_vsock::connect_agent`]: a connection the agent drops before answering is
/// dialled again).
///
/// # Errors
/// The last dial failure when the deadline passes before any connection; `Agent` when
/// the last connection's `Ping` failed.
pub(crate) async fn wait_for_agent(addr: &GuestAddr, deadline: Instant) -> Result<Agent, Error> {
    match vmkit_vsock::connect_agent(addr, deadline).await {
        Ok((client, health)) => Ok(Agent { client, health }),
        Err(vmkit_vsock::Error::Agent { call, cause, .. }) => Err(Error::Agent { call, cause }),
        Err(e) => Err(Error::Vsock(e)),
    }
}

/// Maps a failure to reach the agent for `op` into the core's error (a dial deadline
/// stays a timeout; see [`core_error`]).
pub(crate) fn dial_error(op: &str, e: Error) -> CoreError {
    match e {
        Error::Vsock(v) => core_error(op, v),
        other => CoreError::backend(op, other),
    }
}

/// Maps a vsock error for `op` into the core's error: a dial deadline is a timeout
/// that keeps the attempt count and last cause in its operation text.
pub(crate) fn core_error(op: &str, e: vmkit_vsock::Error) -> CoreError {
    match e {
        vmkit_vsock::Error::DialTimeout { after, .. } => CoreError::Timeout {
            op: format!("{op}: {e}"),
            after,
        },
        other => CoreError::backend(op, Error::Vsock(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recreated_vhost_user_socket_counts_as_a_daemon_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost.sock");
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = (
            path.clone(),
            SocketIdentity::of(&std::fs::metadata(&path).unwrap()),
        );
        assert!(!daemon_restarted(&server).await);
        drop(first);
        std::fs::remove_file(&path).unwrap();
        // A gone socket is not a restart (the daemon may have exited; that is reported
        // elsewhere); a new one at the same path is.
        assert!(!daemon_restarted(&server).await);
        // File times tick with the kernel's coarse clock (a few ms); a real restart comes
        // long after QEMU connected.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let _second = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(daemon_restarted(&server).await);
    }

    #[test]
    fn plans_follow_the_transport() {
        let options = QemuOptions::q35();
        let mut config = InstanceConfig::new("vm", "/run/vm", "/boot/vmlinuz");
        config.transport = GuestTransport::None;
        assert_eq!(Plan::for_config(&config, &options), Plan::None);
        config.transport = GuestTransport::HybridVsock {
            uds: None,
            port: 1025,
        };
        assert_eq!(
            Plan::for_config(&config, &options),
            Plan::Hybrid {
                port: 1025,
                uds: "/run/vm/vsock.sock".into()
            }
        );
        config.transport = GuestTransport::Vsock {
            cid: Some(7),
            port: 99,
        };
        assert_eq!(
            Plan::for_config(&config, &options),
            Plan::Kernel {
                port: 99,
                cid: Some(7)
            }
        );
        config.transport = GuestTransport::VirtioSerial;
        let serial = Plan::Serial {
            chardev: "/run/vm/serial.sock".into(),
            dir: "/run/vm/guest".into(),
        };
        assert_eq!(Plan::for_config(&config, &options), serial);
        // Auto: kernel vsock where it works, else hybrid where its daemon can run, else
        // virtio-serial.
        config.transport = GuestTransport::Auto { port: 1025 };
        let daemon = tempfile::NamedTempFile::new().unwrap();
        let with_daemon = QemuOptions {
            vhost_vsock_binary: daemon.path().to_owned(),
            ..options.clone()
        };
        let without = QemuOptions {
            vhost_vsock_binary: "/nonexistent/vhost-device-vsock".into(),
            ..options.clone()
        };
        if host::vhost_vsock_usable() {
            let kernel = Plan::Kernel {
                port: 1025,
                cid: None,
            };
            assert_eq!(Plan::for_config(&config, &without), kernel);
        } else {
            let hybrid = Plan::Hybrid {
                port: 1025,
                uds: "/run/vm/vsock.sock".into(),
            };
            assert_eq!(Plan::for_config(&config, &with_daemon), hybrid);
            assert_eq!(Plan::for_config(&config, &without), serial);
        }
    }
}
