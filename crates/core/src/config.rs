//! [`InstanceConfig`]: everything a backend needs to create a VM, as plain serde data.
//! Validated once, when the instance is created ([`InstanceConfig::validate`]); every
//! error names the field that is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::devices::{DiskConfig, NicConfig};
use crate::error::{Error, Result};
use crate::validate::{
    Exists, check_cmdline_part, check_id, check_option_text, check_path, check_socket_path,
};

/// Most vCPUs a VM may be given.
pub const MAX_VCPUS: u32 = 1024;
/// Least guest memory, in MiB, that any Linux guest can boot in.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most guest memory, in MiB (16 TiB).
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// Guest memory sizes must be multiples of this many MiB (the 2 MiB huge-page size).
pub const MEMORY_ALIGN_MIB: u64 = 2;
/// Most hot-pluggable memory slots (QEMU's and ACPI's limit on x86).
pub const MAX_MEMORY_SLOTS: u32 = 256;
/// Longest any timeout may be.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The configuration of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// The VM's id: a letter, then letters, digits, `-`, `.`, `_`; at most 64 bytes.
    pub id: String,
    /// Absolute directory for the VM's sockets and runtime files, one per VM: created
    /// 0700 at start (an unsafe existing one is refused), locked while the VM lives (a
    /// second instance on it is refused), its sockets and lock removed when the VM ends;
    /// the dir itself and its logs are kept. See [`StateLayout`] for what goes inside
    /// and [`crate::state_dir`] for the rules.
    pub state_dir: PathBuf,
    /// Absolute directory for logs (VMM stderr, serial console); `None` = `<state_dir>/logs`.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// vCPUs and memory.
    #[serde(default)]
    pub resources: Resources,
    /// The guest kernel to boot.
    pub kernel: KernelConfig,
    /// The accelerator.
    #[serde(default)]
    pub accel: Accel,
    /// How the host reaches the guest agent.
    #[serde(default)]
    pub transport: GuestTransport,
    /// Disks attached before boot.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs attached before boot.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// Deadlines of the VM's operations.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Backend-specific settings (e.g. `machine = "microvm"` for QEMU); each backend
    /// documents and validates its own keys.
    #[serde(default)]
    pub backend_options: BTreeMap<String, String>,
}

impl InstanceConfig {
    /// A config with defaults for everything but the id, the state dir and the kernel.
    pub fn new(
        id: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
    ) -> Self {
        InstanceConfig {
            id: id.into(),
            state_dir: state_dir.into(),
            log_dir: None,
            resources: Resources::default(),
            kernel: KernelConfig::new(kernel),
            accel: Accel::default(),
            transport: GuestTransport::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            timeouts: Timeouts::default(),
            backend_options: BTreeMap::new(),
        }
    }

    /// Where the VM's runtime files go.
    pub fn layout(&self) -> StateLayout {
        StateLayout::new(&self.state_dir, self.log_dir.as_deref())
    }

    /// Checks every field a backend-neutral config has; stops at the first error,
    /// which names the field. The kernel is not among them: a backend that boots one
    /// checks it too ([`KernelConfig::validate`]), one that boots none ignores it.
    ///
    /// Checks the file system for the disk images (they must exist), nothing else: the
    /// state and log dirs are created at start.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`].
    pub fn validate(&self) -> Result<()> {
        check_id("id", &self.id)?;
        check_path("state_dir", &self.state_dir, Exists::Any)?;
        let layout = self.layout();
        for (name, socket) in layout.sockets() {
            check_socket_path(&format!("state_dir ({name})"), &socket)?;
        }
        if let Some(log_dir) = &self.log_dir {
            check_path("log_dir", log_dir, Exists::Any)?;
        }
        self.resources.validate()?;
        self.transport.validate()?;
        self.timeouts.validate()?;
        let mut ids = BTreeSet::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            disk.validate(&field)?;
            if !ids.insert(disk.id.as_str()) {
                return Err(duplicate(&field, &disk.id));
            }
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let field = format!("nics[{i}]");
            nic.validate(&field)?;
            if !ids.insert(nic.id.as_str()) {
                return Err(duplicate(&field, &nic.id));
            }
        }
        for (key, value) in &self.backend_options {
            check_option_text(&format!("backend_options.{key}"), value)?;
        }
        Ok(())
    }
}

fn duplicate(field: &str, id: &str) -> Error {
    Error::config(
        format!("{field}.id"),
        format!("duplicate device id {id:?} (disks and NICs share one id space)"),
    )
}

/// vCPUs and memory. Memory sizes are in MiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// vCPUs online at boot; 1 ≤ `boot_vcpus` ≤ `max_vcpus`.
    pub boot_vcpus: u32,
    /// Most vCPUs the VM can have after hot-plug; at most [`MAX_VCPUS`].
    pub max_vcpus: u32,
    /// Boot memory in MiB: at least [`MIN_MEMORY_MIB`], a multiple of [`MEMORY_ALIGN_MIB`].
    pub memory_mib: u64,
    /// Hot-pluggable DIMM slots (0–256). Slots need `max_memory_mib` > `memory_mib`.
    pub memory_slots: u32,
    /// Most memory after hot-plug, in MiB; `None` = `memory_mib` (no room to grow).
    pub max_memory_mib: Option<u64>,
    /// How memory is hot-plugged: DIMMs (the default) or one virtio-mem device.
    pub memory_hotplug: MemoryHotplug,
}

/// The memory hot-plug strategy.
///
/// | | DIMMs | virtio-mem |
/// | --- | --- | --- |
/// | unit | one device per hot-plug call, in `memory_slots` slots | one device spanning `max_memory_mib − memory_mib`; a call grows it |
/// | granularity | the guest's memory block (128 MiB on x86) | the device block (2 MiB) |
/// | guest needs | ACPI memory hot-plug | the `virtio_mem` driver |
/// | unplug | the guest releases the whole DIMM | the guest releases any 2 MiB blocks it can |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryHotplug {
    /// A `pc-dimm` per hot-plug call; needs `memory_slots` > 0.
    #[default]
    Dimm,
    /// One virtio-mem device whose requested size grows and shrinks; needs
    /// `memory_slots` = 0 and a guest kernel with `virtio_mem`.
    VirtioMem,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            boot_vcpus: 1,
            max_vcpus: 1,
            memory_mib: 256,
            memory_slots: 0,
            max_memory_mib: None,
            memory_hotplug: MemoryHotplug::Dimm,
        }
    }
}

impl Resources {
    /// The memory ceiling: `max_memory_mib`, or `memory_mib` when unset.
    pub fn max_memory(&self) -> u64 {
        self.max_memory_mib.unwrap_or(self.memory_mib)
    }

    /// Checks the bounds and the alignment.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the `resources.*` field.
    pub fn validate(&self) -> Result<()> {
        if self.boot_vcpus == 0 {
            return Err(Error::config("resources.boot_vcpus", "must be at least 1"));
        }
        if self.max_vcpus > MAX_VCPUS {
            return Err(Error::config(
                "resources.max_vcpus",
                format!("{} is more than {MAX_VCPUS}", self.max_vcpus),
            ));
        }
        if self.boot_vcpus > self.max_vcpus {
            return Err(Error::config(
                "resources.boot_vcpus",
                format!(
                    "{} is more than max_vcpus ({})",
                    self.boot_vcpus, self.max_vcpus
                ),
            ));
        }
        check_mib("resources.memory_mib", self.memory_mib)?;
        if let Some(max) = self.max_memory_mib {
            check_mib("resources.max_memory_mib", max)?;
            if max < self.memory_mib {
                return Err(Error::config(
                    "resources.max_memory_mib",
                    format!(
                        "{max} MiB is less than memory_mib ({} MiB)",
                        self.memory_mib
                    ),
                ));
            }
        }
        if self.memory_slots > MAX_MEMORY_SLOTS {
            return Err(Error::config(
                "resources.memory_slots",
                format!("{} is more than {MAX_MEMORY_SLOTS}", self.memory_slots),
            ));
        }
        if self.memory_hotplug == MemoryHotplug::VirtioMem {
            if self.memory_slots > 0 {
                return Err(Error::config(
                    "resources.memory_slots",
                    format!(
                        "{} DIMM slots with memory_hotplug = virtio_mem: virtio-mem uses all the room above memory_mib; set memory_slots to 0",
                        self.memory_slots
                    ),
                ));
            }
            if self.max_memory() == self.memory_mib {
                return Err(Error::config(
                    "resources.max_memory_mib",
                    format!(
                        "memory_hotplug = virtio_mem but no room to grow into: set max_memory_mib above memory_mib ({} MiB)",
                        self.memory_mib
                    ),
                ));
            }
        }
        if self.memory_slots > 0 && self.max_memory() == self.memory_mib {
            return Err(Error::config(
                "resources.memory_slots",
                format!(
                    "{} slots but no room to hot-plug into: set max_memory_mib above memory_mib ({} MiB)",
                    self.memory_slots, self.memory_mib
                ),
            ));
        }
        Ok(())
    }
}

fn check_mib(field: &str, mib: u64) -> Result<()> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(Error::config(
            field,
            format!("{mib} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB"),
        ));
    }
    if !mib.is_multiple_of(MEMORY_ALIGN_MIB) {
        return Err(Error::config(
            field,
            format!("{mib} MiB is not a multiple of {MEMORY_ALIGN_MIB} MiB"),
        ));
    }
    Ok(())
}

/// The guest kernel, its initrd and the caller's command-line parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// Absolute path of the kernel image (bzImage or an uncompressed ELF for PVH).
    pub path: PathBuf,
    /// Absolute path of the initrd, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel parameters, one per entry (`"quiet"`, `"init=/init"`). The backend
    /// adds its own (console, …) before these.
    #[serde(default)]
    pub cmdline: Vec<String>,
}

impl KernelConfig {
    /// A kernel with no initrd and no extra parameters.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        KernelConfig {
            path: path.into(),
            initrd: None,
            cmdline: Vec::new(),
        }
    }

    /// Checks the files exist and each parameter stays one parameter.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming `kernel.path`, `kernel.initrd` or `kernel.cmdline[i]`.
    pub fn validate(&self) -> Result<()> {
        check_path("kernel.path", &self.path, Exists::File)?;
        if let Some(initrd) = &self.initrd {
            check_path("kernel.initrd", initrd, Exists::File)?;
        }
        for (i, part) in self.cmdline.iter().enumerate() {
            check_cmdline_part(&format!("kernel.cmdline[{i}]"), part)?;
        }
        Ok(())
    }
}

/// The hardware accelerator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where it works, else HVF on macOS, else TCG. Backends may honour an
    /// environment override (the QEMU backend reads `VMKIT_ACCEL`).
    #[default]
    Auto,
    /// Linux KVM.
    Kvm,
    /// macOS Hypervisor.framework.
    Hvf,
    /// QEMU's software emulation: slow, works everywhere.
    Tcg,
}

impl Accel {
    /// The lower-case name (`"kvm"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not an accelerator name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?}; expected one of auto, kvm, hvf, tcg")]
pub struct ParseAccelError(String);

impl FromStr for Accel {
    type Err = ParseAccelError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "hvf" => Ok(Accel::Hvf),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ParseAccelError(s.to_owned())),
        }
    }
}

/// The vsock port the guest agent listens on by default.
pub const DEFAULT_AGENT_PORT: u32 = 1025;

/// How the host reaches the agent in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestTransport {
    /// No agent: the guest's readiness is judged by the backend (e.g. a serial line).
    None,
    /// The backend picks: kernel vsock where the host has it, else hybrid vsock.
    Auto {
        /// The agent's vsock port.
        port: u32,
    },
    /// Kernel vsock (`vhost-vsock`).
    Vsock {
        /// The guest's CID; `None` = allocated (never 0–2).
        cid: Option<u32>,
        /// The agent's vsock port.
        port: u32,
    },
    /// Hybrid vsock: a Unix socket where the host writes `CONNECT <port>\n`.
    HybridVsock {
        /// The Unix socket; `None` = [`StateLayout::vsock_socket`].
        uds: Option<PathBuf>,
        /// The agent's vsock port.
        port: u32,
    },
    /// No vsock at all: a virtio-serial port carrying a multiplexed link
    /// (`vmkit-serial`) with the agent on its ports 1025 (TTRPC) and 1026 (streams), for
    /// hosts without `/dev/vhost-vsock` where no vhost-user daemon may run, and for QEMU
    /// on macOS.
    VirtioSerial,
}

impl Default for GuestTransport {
    fn default() -> Self {
        GuestTransport::Auto {
            port: DEFAULT_AGENT_PORT,
        }
    }
}

impl GuestTransport {
    /// Checks CIDs, ports and the socket path.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming `transport.cid`, `transport.port` or `transport.uds`.
    pub fn validate(&self) -> Result<()> {
        let port = match self {
            GuestTransport::None => return Ok(()),
            GuestTransport::Auto { port } => port,
            GuestTransport::Vsock { cid, port } => {
                if let Some(cid) = cid
                    && (*cid <= 2 || *cid == u32::MAX)
                {
                    return Err(Error::config(
                        "transport.cid",
                        format!(
                            "{cid} is reserved (0-2 are the hypervisor, local and host; {} is VMADDR_CID_ANY)",
                            u32::MAX
                        ),
                    ));
                }
                port
            }
            GuestTransport::HybridVsock { uds, port } => {
                if let Some(uds) = uds {
                    check_socket_path("transport.uds", uds)?;
                }
                port
            }
            GuestTransport::VirtioSerial => return Ok(()),
        };
        if *port == 0 || *port == u32::MAX {
            return Err(Error::config(
                "transport.port",
                format!("{port} is not a usable vsock port"),
            ));
        }
        Ok(())
    }
}

/// Deadlines. Serialised as human durations (`"30s"`, `"500ms"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From spawn to the guest's ready signal.
    #[serde(with = "humantime_serde")]
    pub start: Duration,
    /// Each VMM control command (a QMP command for QEMU).
    #[serde(with = "humantime_serde")]
    pub command: Duration,
    /// Dialling the guest agent.
    #[serde(with = "humantime_serde")]
    pub dial: Duration,
    /// How long a graceful shutdown may take before the backend forces it.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a hot-plug may take to show in the guest, and an unplug to leave it.
    #[serde(with = "humantime_serde")]
    pub hotplug: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            start: Duration::from_secs(30),
            command: Duration::from_secs(5),
            dial: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            hotplug: Duration::from_secs(30),
        }
    }
}

/// What a staged shutdown adds to its graceful stages: the forced stages' own waits
/// (vmkit-qemu's: 1 s after `quit`, 1 s after SIGTERM, 5 s after SIGKILL) and a second
/// to spare (see [`Timeouts::shutdown_bound`]).
const FORCED_STOP: Duration = Duration::from_secs(8);

impl Timeouts {
    /// The longest a whole `shutdown` may take: two graceful stages of
    /// `shutdown_grace` (the guest agent's power-off, the ACPI button), each begun with
    /// a command, then the forced ones (a `quit` command, SIGTERM, SIGKILL and the
    /// reap). A caller that waits on a shutdown from outside the backend (the plugin
    /// host) gives up past this.
    pub fn shutdown_bound(&self) -> Duration {
        self.shutdown_grace
            .saturating_mul(2)
            .saturating_add(self.command.saturating_mul(3))
            .saturating_add(FORCED_STOP)
    }

    /// Each timeout must be non-zero and at most [`MAX_TIMEOUT`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming `timeouts.*`.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("timeouts.start", self.start),
            ("timeouts.command", self.command),
            ("timeouts.dial", self.dial),
            ("timeouts.shutdown_grace", self.shutdown_grace),
            ("timeouts.hotplug", self.hotplug),
        ] {
            if value.is_zero() || value > MAX_TIMEOUT {
                return Err(Error::config(
                    field,
                    format!("{value:?} is outside (0, {MAX_TIMEOUT:?}]"),
                ));
            }
        }
        Ok(())
    }
}

/// The files a VM keeps under its state and log dirs. One place names them, so
/// validation can check socket lengths before anything is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    state_dir: PathBuf,
    log_dir: PathBuf,
}

impl StateLayout {
    /// The layout for `state_dir`, with logs in `log_dir` or `<state_dir>/logs`.
    pub fn new(state_dir: &Path, log_dir: Option<&Path>) -> Self {
        StateLayout {
            state_dir: state_dir.to_owned(),
            log_dir: log_dir.map_or_else(|| state_dir.join("logs"), Path::to_owned),
        }
    }

    /// The state dir.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The log dir.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The VMM's control socket (QMP for QEMU).
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    /// The hybrid-vsock socket the host dials (`CONNECT <port>`).
    pub fn vsock_socket(&self) -> PathBuf {
        self.state_dir.join("vsock.sock")
    }

    /// The vhost-user socket between the VMM and a vsock device daemon.
    pub fn vhost_user_vsock_socket(&self) -> PathBuf {
        self.state_dir.join("vhost-user-vsock.sock")
    }

    /// The VMM's socket for the guest agent's virtio-serial port.
    pub fn serial_socket(&self) -> PathBuf {
        self.state_dir.join("serial.sock")
    }

    /// The dir of the agent's per-port sockets a virtio-serial link is served on (the
    /// layout of the agent's host test mode).
    pub fn guest_dir(&self) -> PathBuf {
        self.state_dir.join("guest")
    }

    /// The guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.log_dir.join("console.log")
    }

    /// The VMM process's stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.log_dir.join("vmm.log")
    }

    /// Creates the state and log dirs 0700, or checks existing ones (see
    /// [`crate::state_dir`]). Call before anything is written into them.
    ///
    /// # Errors
    /// [`crate::Error::UnsafePath`] for a dir someone else controls; [`crate::Error::Io`].
    pub fn prepare(&self, op: &str) -> crate::Result<()> {
        crate::state_dir::prepare_private_dir(op, &self.state_dir)?;
        if self.log_dir != self.state_dir {
            crate::state_dir::prepare_private_dir(op, &self.log_dir)?;
        }
        Ok(())
    }

    /// Locks the state dir for `holder` until the returned guard is dropped.
    ///
    /// # Errors
    /// [`crate::Error::InUse`] when a live instance holds it.
    pub fn lock(&self, op: &str, holder: &str) -> crate::Result<crate::StateDirLock> {
        crate::StateDirLock::acquire(op, &self.state_dir, holder)
    }

    /// The state dir's lock file (see [`crate::StateDirLock`]).
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join(crate::state_dir::LOCK_FILE)
    }

    /// Every socket a backend may create, with a short name for messages.
    /// (The agent sockets in [`StateLayout::guest_dir`] are shorter than the vhost-user
    /// socket's path, so they fit wherever it does.)
    pub fn sockets(&self) -> [(&'static str, PathBuf); 4] {
        [
            ("control socket", self.control_socket()),
            ("vsock socket", self.vsock_socket()),
            ("vhost-user socket", self.vhost_user_vsock_socket()),
            ("serial socket", self.serial_socket()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{MacAddr, NicBackend};

    struct Fixture {
        _dir: tempfile::TempDir,
        config: InstanceConfig,
        image: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        let image = dir.path().join("disk.img");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&image, b"").unwrap();
        let config = InstanceConfig::new("vm1", dir.path().join("state"), &kernel);
        Fixture {
            _dir: dir,
            config,
            image,
        }
    }

    /// Runs `edit` on a valid config and returns `"field: reason"` of the error.
    fn error_after(edit: impl FnOnce(&mut InstanceConfig, &Path)) -> String {
        let mut f = fixture();
        f.config.validate().expect("fixture is valid");
        f.config
            .kernel
            .validate()
            .expect("fixture's kernel is valid");
        edit(&mut f.config, &f.image);
        match f
            .config
            .validate()
            .and_then(|()| f.config.kernel.validate())
        {
            Err(Error::InvalidConfig { field, reason }) => format!("{field}: {reason}"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn the_kernel_is_the_booting_backends_to_check() {
        let mut f = fixture();
        f.config.kernel.path = "/nonexistent/vmlinuz".into();
        f.config
            .validate()
            .expect("a config for a backend that boots no kernel");
        assert!(f.config.kernel.validate().is_err());
    }

    #[test]
    fn a_full_config_validates_and_round_trips_through_json() {
        let mut f = fixture();
        f.config.resources = Resources {
            boot_vcpus: 1,
            max_vcpus: 4,
            memory_mib: 256,
            memory_slots: 4,
            max_memory_mib: Some(2048),
            memory_hotplug: MemoryHotplug::Dimm,
        };
        f.config.disks.push(DiskConfig::new("root", &f.image));
        f.config.nics.push(NicConfig::tap(
            "net0",
            "tap0",
            Some(MacAddr([0x52, 0x54, 0, 0, 0, 1])),
        ));
        f.config.kernel.cmdline = vec!["quiet".into(), "init=/init".into()];
        f.config.validate().unwrap();
        let json = serde_json::to_string(&f.config).unwrap();
        assert!(json.contains(r#""start":"30s""#), "{json}");
        let back: InstanceConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f.config);
    }

    #[test]
    fn minimal_json_takes_defaults_and_unknown_fields_are_refused() {
        let back: InstanceConfig = serde_json::from_str(
            r#"{"id":"a","state_dir":"/run/a","kernel":{"path":"/k"},"timeouts":{"start":"90s"}}"#,
        )
        .unwrap();
        assert_eq!(back.resources, Resources::default());
        assert_eq!(back.timeouts.start, Duration::from_secs(90));
        assert_eq!(back.timeouts.command, Timeouts::default().command);
        assert_eq!(back.transport, GuestTransport::Auto { port: 1025 });
        let err = serde_json::from_str::<InstanceConfig>(
            r#"{"id":"a","state_dir":"/run/a","kernel":{"path":"/k"},"memory":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn bad_vm_id() {
        assert!(error_after(|c, _| c.id = "vm 1".into()).starts_with("id: \"vm 1\" must start"));
    }

    #[test]
    fn relative_state_dir() {
        assert_eq!(
            error_after(|c, _| c.state_dir = "run/vm".into()),
            "state_dir: run/vm is relative; an absolute path is required"
        );
    }

    #[test]
    fn socket_path_too_long_names_the_socket_and_its_length() {
        // 85 + 22 = 107 bytes: the longest socket just fits.
        let mut f = fixture();
        f.config.state_dir = format!("/{}", "d".repeat(84)).into();
        f.config.validate().unwrap();
        // 87 + 22 = 109: the control socket (100) fits, the vhost-user one does not.
        let long = format!("/{}", "d".repeat(86));
        assert_eq!(
            error_after(|c, _| c.state_dir = long.clone().into()),
            format!(
                "state_dir (vhost-user socket): socket path {long}/vhost-user-vsock.sock is 109 bytes; a Unix socket path holds at most 107"
            )
        );
    }

    #[test]
    fn relative_log_dir() {
        assert_eq!(
            error_after(|c, _| c.log_dir = Some("logs".into())),
            "log_dir: logs is relative; an absolute path is required"
        );
    }

    #[test]
    fn zero_boot_vcpus() {
        assert_eq!(
            error_after(|c, _| c.resources.boot_vcpus = 0),
            "resources.boot_vcpus: must be at least 1"
        );
    }

    #[test]
    fn boot_vcpus_over_max() {
        assert_eq!(
            error_after(|c, _| {
                c.resources.boot_vcpus = 3;
                c.resources.max_vcpus = 2;
            }),
            "resources.boot_vcpus: 3 is more than max_vcpus (2)"
        );
    }

    #[test]
    fn absurd_max_vcpus() {
        assert_eq!(
            error_after(|c, _| c.resources.max_vcpus = 5000),
            "resources.max_vcpus: 5000 is more than 1024"
        );
    }

    #[test]
    fn virtio_mem_takes_no_slots_and_needs_room() {
        assert_eq!(
            error_after(|c, _| {
                c.resources.memory_hotplug = MemoryHotplug::VirtioMem;
                c.resources.memory_slots = 2;
                c.resources.max_memory_mib = Some(1024);
            }),
            "resources.memory_slots: 2 DIMM slots with memory_hotplug = virtio_mem: virtio-mem uses all the room above memory_mib; set memory_slots to 0"
        );
        assert_eq!(
            error_after(|c, _| c.resources.memory_hotplug = MemoryHotplug::VirtioMem),
            "resources.max_memory_mib: memory_hotplug = virtio_mem but no room to grow into: set max_memory_mib above memory_mib (256 MiB)"
        );
        let mut f = fixture();
        f.config.resources.memory_hotplug = MemoryHotplug::VirtioMem;
        f.config.resources.max_memory_mib = Some(1024);
        f.config.validate().unwrap();
        let json = serde_json::to_string(&f.config).unwrap();
        assert!(json.contains(r#""memory_hotplug":"virtio_mem""#), "{json}");
        let back: InstanceConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.resources.memory_hotplug, MemoryHotplug::VirtioMem);
    }

    #[test]
    fn zero_memory() {
        assert_eq!(
            error_after(|c, _| c.resources.memory_mib = 0),
            "resources.memory_mib: 0 MiB is outside 16..=16777216 MiB"
        );
    }

    #[test]
    fn absurd_memory() {
        assert_eq!(
            error_after(|c, _| c.resources.memory_mib = u64::MAX),
            format!(
                "resources.memory_mib: {} MiB is outside 16..=16777216 MiB",
                u64::MAX
            )
        );
    }

    #[test]
    fn unaligned_memory() {
        assert_eq!(
            error_after(|c, _| c.resources.memory_mib = 257),
            "resources.memory_mib: 257 MiB is not a multiple of 2 MiB"
        );
    }

    #[test]
    fn max_memory_below_memory() {
        assert_eq!(
            error_after(|c, _| c.resources.max_memory_mib = Some(128)),
            "resources.max_memory_mib: 128 MiB is less than memory_mib (256 MiB)"
        );
    }

    #[test]
    fn unaligned_max_memory() {
        assert_eq!(
            error_after(|c, _| c.resources.max_memory_mib = Some(1023)),
            "resources.max_memory_mib: 1023 MiB is not a multiple of 2 MiB"
        );
    }

    #[test]
    fn slots_without_room() {
        assert_eq!(
            error_after(|c, _| c.resources.memory_slots = 2),
            "resources.memory_slots: 2 slots but no room to hot-plug into: set max_memory_mib above memory_mib (256 MiB)"
        );
    }

    #[test]
    fn too_many_slots() {
        assert_eq!(
            error_after(|c, _| {
                c.resources.memory_slots = 300;
                c.resources.max_memory_mib = Some(4096);
            }),
            "resources.memory_slots: 300 is more than 256"
        );
    }

    #[test]
    fn missing_kernel() {
        let msg = error_after(|c, _| c.kernel.path = "/nonexistent/vmlinuz".into());
        assert_eq!(
            msg,
            "kernel.path: /nonexistent/vmlinuz: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn missing_initrd() {
        let msg = error_after(|c, _| c.kernel.initrd = Some("/nonexistent/initrd".into()));
        assert!(
            msg.starts_with("kernel.initrd: /nonexistent/initrd: No such file"),
            "{msg}"
        );
    }

    #[test]
    fn cmdline_part_that_would_split() {
        assert_eq!(
            error_after(|c, _| c.kernel.cmdline = vec!["quiet".into(), "a=1 b=2".into()]),
            "kernel.cmdline[1]: \"a=1 b=2\" contains unquoted whitespace and would split into several kernel parameters"
        );
    }

    #[test]
    fn cmdline_part_with_newline() {
        assert_eq!(
            error_after(|c, _| c.kernel.cmdline = vec!["a\nb".into()]),
            "kernel.cmdline[0]: \"a\\nb\" contains the control character '\\n'"
        );
    }

    #[test]
    fn reserved_cid() {
        assert!(
            error_after(|c, _| c.transport = GuestTransport::Vsock {
                cid: Some(2),
                port: 1025
            })
            .starts_with("transport.cid: 2 is reserved")
        );
    }

    #[test]
    fn zero_port() {
        assert_eq!(
            error_after(|c, _| c.transport = GuestTransport::Auto { port: 0 }),
            "transport.port: 0 is not a usable vsock port"
        );
    }

    #[test]
    fn hybrid_socket_too_long() {
        let long = PathBuf::from(format!("/{}.sock", "u".repeat(110)));
        let msg = error_after(|c, _| {
            c.transport = GuestTransport::HybridVsock {
                uds: Some(long.clone()),
                port: 1025,
            }
        });
        assert_eq!(
            msg,
            format!(
                "transport.uds: socket path {} is 116 bytes; a Unix socket path holds at most 107",
                long.display()
            )
        );
    }

    #[test]
    fn zero_timeout() {
        assert_eq!(
            error_after(|c, _| c.timeouts.command = Duration::ZERO),
            "timeouts.command: 0ns is outside (0, 3600s]"
        );
    }

    #[test]
    fn absurd_timeout() {
        assert_eq!(
            error_after(|c, _| c.timeouts.shutdown_grace = Duration::from_secs(7200)),
            "timeouts.shutdown_grace: 7200s is outside (0, 3600s]"
        );
    }

    #[test]
    fn duplicate_disk_ids() {
        assert_eq!(
            error_after(|c, img| {
                c.disks.push(DiskConfig::new("data", img));
                c.disks.push(DiskConfig::new("data", img));
            }),
            "disks[1].id: duplicate device id \"data\" (disks and NICs share one id space)"
        );
    }

    #[test]
    fn duplicate_id_across_disk_and_nic() {
        assert_eq!(
            error_after(|c, img| {
                c.disks.push(DiskConfig::new("dev0", img));
                c.nics.push(NicConfig::tap("dev0", "tap0", None));
            }),
            "nics[0].id: duplicate device id \"dev0\" (disks and NICs share one id space)"
        );
    }

    #[test]
    fn missing_disk_image() {
        let msg = error_after(|c, _| c.disks.push(DiskConfig::new("d", "/nonexistent.img")));
        assert!(
            msg.starts_with("disks[0].path: /nonexistent.img: No such file"),
            "{msg}"
        );
    }

    #[test]
    fn bad_nic_is_named_by_index() {
        let msg = error_after(|c, _| {
            c.nics.push(NicConfig::tap("n0", "tap0", None));
            c.nics.push(NicConfig {
                id: "n1".into(),
                backend: NicBackend::Tap {
                    name: "much-too-long-ifname".into(),
                },
                mac: None,
            });
        });
        assert!(
            msg.starts_with("nics[1].backend.name: \"much-too-long-ifname\""),
            "{msg}"
        );
    }

    #[test]
    fn backend_option_with_newline() {
        assert_eq!(
            error_after(|c, _| {
                c.backend_options.insert("machine".into(), "q35\n".into());
            }),
            "backend_options.machine: \"q35\\n\" contains the control character '\\n'"
        );
    }

    #[test]
    fn accel_parses_case_insensitively_and_names_the_choices() {
        assert_eq!("TCG".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!(" kvm ".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!(
            "xen".parse::<Accel>().unwrap_err().to_string(),
            "unknown accelerator \"xen\"; expected one of auto, kvm, hvf, tcg"
        );
        for a in [Accel::Auto, Accel::Kvm, Accel::Hvf, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>().unwrap(), a);
        }
    }

    #[test]
    fn layout_defaults_logs_under_state_dir() {
        let layout = StateLayout::new(Path::new("/run/vm"), None);
        assert_eq!(layout.console_log(), Path::new("/run/vm/logs/console.log"));
        assert_eq!(layout.control_socket(), Path::new("/run/vm/control.sock"));
        let layout = StateLayout::new(Path::new("/run/vm"), Some(Path::new("/var/log/vm")));
        assert_eq!(layout.vmm_log(), Path::new("/var/log/vm/vmm.log"));
    }
}
