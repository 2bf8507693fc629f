//! # vmkit-qemu
//!
//! The QEMU backend of vmkit: [`QemuBackend`] creates [`QemuInstance`]s that boot a
//! Linux guest under QEMU (KVM where it really works, TCG elsewhere), drive it over QMP,
//! talk to the vmkit agent in the guest over kernel or hybrid vsock, and stop
//! it in bounded stages (the agent's power-off, the ACPI power button, `quit`, SIGTERM,
//! SIGKILL). QEMU (and the
//! per-VM vhost-device-vsock daemon) are spawned directly with a parent-death signal, so
//! they never outlive the host process; a failed or finished VM leaves no process,
//! socket or CID behind.
//!
//! Linking the crate registers the backend as `"qemu"` (name it somewhere so it links:
//! `use vmkit_qemu as _;`).
//!
//! ```no_run
//! use vmkit_core::{DiskConfig, InstanceConfig, Registry, StartOptions};
//! use vmkit_qemu as _;
//!
//! # async fn run() -> vmkit_core::Result<()> {
//! let mut config = InstanceConfig::new("vm1", "/run/vmkit/vm1", "/var/lib/vmkit/vmlinuz");
//! config.kernel.initrd = Some("/var/lib/vmkit/initrd.img".into());
//! let vm = Registry::from_inventory()?.create("qemu", config)?;
//! vm.add_disk(DiskConfig::new("data", "/var/lib/vmkit/data.img"))?;
//! vm.start(StartOptions::new()).await?; // the guest agent answered Ping
//! let exit = vm.shutdown().await?;
//! println!("{:?} by {:?}", exit.reason, exit.stage);
//! # Ok(())
//! # }
//! ```
//!
//! Backend options (`InstanceConfig::backend_options`) are listed at [`QemuOptions`].
//! The public surface is what an embedder needs: the backend, the instance, its options,
//! the accelerator choice ([`accel`]) and the error; the inside (one owner per concern,
//! typed QMP, hot-plug behind a narrow context) is described in `docs/architecture.md`.

pub mod accel;
mod command;
mod devices;
mod error;
mod escape;
mod events;
mod features;
mod fs_daemon;
mod guest;
mod host;
mod hotplug;
mod hotplugger;
mod instance;
mod kernel_cmdline;
mod locks;
mod monitor;
mod options;
mod pause;
mod process;
mod qmp;
mod relink;
mod running;
mod runtime;
mod serial_bridge;
mod shutdown;
mod start;
mod vm;

use std::sync::Arc;

use vmkit_core::{Backend, Capabilities, Instance, InstanceConfig};

pub use devices::{ColdDevices, stable_mac};
pub use error::Error;
pub use features::CAPABILITIES;
pub use instance::QemuInstance;
pub use kernel_cmdline::BASE_PARAMS;
pub use options::{MAX_HOTPLUG_PORTS, Machine, QemuOptions, Sandbox};

/// Checks that vmkit can open (and so create) the TAP interface `name` on this host:
/// opens it and closes it again (a TAP vmkit created is not persistent, so it vanishes).
///
/// # Errors
/// Why not: no `/dev/net/tun`, no `CAP_NET_ADMIN`, a bad name, the TAP in use.
pub fn probe_tap(name: &str) -> std::io::Result<()> {
    host::open_tap(name).map(drop)
}

/// Whether the kernel-vsock CID `cid` is leased on this host: by a VM of this process,
/// or by any process holding its lock file in the QEMU backend's CID lock dir (see
/// `VMKIT_CID_DIR`) — what a leak check asks once a VM that reported it has ended.
/// `false` when the lock dir cannot be set up (then no CID can have been leased).
pub fn cid_in_use(cid: u32) -> bool {
    guest::cid_allocator().is_ok_and(|cids| cids.in_use(cid))
}

/// The backend's registry name.
pub const BACKEND_NAME: &str = "qemu";

/// The QEMU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuBackend;

impl QemuBackend {
    /// Creates a [`QemuInstance`] (the concrete type; [`Backend::create`] boxes it).
    ///
    /// # Errors
    /// `InvalidConfig` naming the field, for the config or a backend option.
    pub fn create_instance(&self, config: InstanceConfig) -> vmkit_core::Result<QemuInstance> {
        config.validate()?;
        config.kernel.validate()?;
        let options = QemuOptions::from_map(&config.backend_options).map_err(|e| match e {
            Error::Option { key, reason } => {
                vmkit_core::Error::config(format!("backend_options.{key}"), reason)
            }
            other => vmkit_core::Error::backend("create", other),
        })?;
        check_machine(&config.resources, options.machine)?;
        check_kernel_format(&config.kernel.path, options.machine)?;
        // The sockets vmkit and QEMU make must fit this host's socket addresses.
        for (what, socket) in config.layout().sockets() {
            host::check_socket_path(&socket)
                .map_err(|e| vmkit_core::Error::config("state_dir", format!("{what}: {e}")))?;
        }
        // The config's own devices go through the same checks as later add_* calls.
        Ok(QemuInstance::new(vm::Vm::new(config, options)?))
    }
}

impl Backend for QemuBackend {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn create(&self, config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
        Ok(Box::new(self.create_instance(config)?))
    }
}

vmkit_core::register_backend!(|| Arc::new(QemuBackend));

/// What `machine` cannot do with `res`, refused at create rather than at the first
/// hot-plug: virtio-mem off PCI, and on Arm's `virt` vCPU hot-plug (QEMU has none for
/// it) and DIMMs (their hot-plug needs ACPI, which its directly booted kernel lacks).
fn check_machine(res: &vmkit_core::Resources, machine: Machine) -> vmkit_core::Result<()> {
    use vmkit_core::MemoryHotplug;
    let name = machine.as_str();
    if res.memory_hotplug == MemoryHotplug::VirtioMem && !machine.has_pci() {
        return Err(vmkit_core::Error::config(
            "resources.memory_hotplug",
            format!(
                "virtio_mem needs a PCI machine (q35, virt): virtio-mem is a PCI device; {name} has no PCI"
            ),
        ));
    }
    if machine == Machine::Virt {
        if res.max_vcpus > res.boot_vcpus {
            return Err(vmkit_core::Error::config(
                "resources.max_vcpus",
                format!(
                    "{} > boot_vcpus {}: QEMU cannot hot-plug vCPUs on machine virt",
                    res.max_vcpus, res.boot_vcpus
                ),
            ));
        }
        if res.memory_hotplug == MemoryHotplug::Dimm && res.memory_slots > 0 {
            return Err(vmkit_core::Error::config(
                "resources.memory_slots",
                "DIMM hot-plug needs ACPI, which machine virt does not give a directly booted kernel; use memory_hotplug virtio_mem",
            ));
        }
    }
    Ok(())
}

/// An uncompressed (ELF, PVH) kernel on microvm is refused: booted that way the guest
/// finds none of its virtio-mmio devices (seen with QEMU 10 and Debian's 6.1 kernel,
/// with ACPI on and off), so it would boot without its disks, console or agent channel.
/// q35 boots either; microvm wants the bzImage.
fn check_kernel_format(kernel: &std::path::Path, machine: Machine) -> vmkit_core::Result<()> {
    use std::io::Read;
    if machine != Machine::Microvm {
        return Ok(());
    }
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(kernel).and_then(|mut f| f.read_exact(&mut magic));
    if read.is_ok() && &magic == b"\x7fELF" {
        return Err(vmkit_core::Error::config(
            "kernel.path",
            format!(
                "{} is an uncompressed (PVH) kernel, and a microvm guest booted from one finds none of its virtio-mmio devices: give microvm the bzImage (vmlinuz)",
                kernel.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pvh_kernel_on_microvm_is_refused_at_create() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF\x02\x01").unwrap();
        let mut config = InstanceConfig::new("vm1", dir.path().join("state"), &kernel);
        assert!(
            QemuBackend.create_instance(config.clone()).is_ok(),
            "q35 boots it"
        );
        config
            .backend_options
            .insert("machine".into(), "microvm".into());
        let err = QemuBackend
            .create_instance(config)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("invalid config: kernel.path: ") && err.contains("bzImage (vmlinuz)"),
            "{err}"
        );
    }

    #[test]
    fn virtio_mem_on_microvm_is_refused_at_create() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let mut config = InstanceConfig::new("vm1", dir.path().join("state"), &kernel);
        config.resources.memory_hotplug = vmkit_core::MemoryHotplug::VirtioMem;
        config.resources.max_memory_mib = Some(1024);
        config
            .backend_options
            .insert("machine".into(), "microvm".into());
        let err = QemuBackend.create_instance(config.clone()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "invalid config: resources.memory_hotplug: virtio_mem needs a PCI machine (q35, virt): virtio-mem is a PCI device; microvm has no PCI"
        );
        config.backend_options.clear();
        assert!(QemuBackend.create_instance(config.clone()).is_ok());
        config
            .backend_options
            .insert("machine".into(), "virt".into());
        assert!(
            QemuBackend.create_instance(config).is_ok(),
            "virtio-mem on virt"
        );
    }

    #[test]
    fn virt_refuses_vcpu_and_dimm_hotplug_at_create() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("Image");
        std::fs::write(&kernel, b"k").unwrap();
        let mut config = InstanceConfig::new("vm1", dir.path().join("state"), &kernel);
        config
            .backend_options
            .insert("machine".into(), "virt".into());
        config.resources.boot_vcpus = 1;
        config.resources.max_vcpus = 2;
        let err = QemuBackend.create_instance(config.clone()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "invalid config: resources.max_vcpus: 2 > boot_vcpus 1: QEMU cannot hot-plug vCPUs on machine virt"
        );
        config.resources.max_vcpus = 1;
        config.resources.memory_slots = 2;
        config.resources.max_memory_mib = Some(1024);
        let err = QemuBackend.create_instance(config.clone()).err().unwrap();
        assert!(
            matches!(&err, vmkit_core::Error::InvalidConfig { field, .. } if field == "resources.memory_slots"),
            "{err}"
        );
        config.resources.memory_slots = 0;
        assert!(QemuBackend.create_instance(config).is_ok());
    }

    #[tokio::test]
    async fn qmp_query_takes_only_read_only_commands() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let config = InstanceConfig::new("vm1", dir.path().join("state"), &kernel);
        let vm = QemuBackend.create_instance(config).unwrap();
        for changes in ["device_add", "stop", "human-monitor-command", "qom-set"] {
            let err = vm.qmp_query(changes, None).await.unwrap_err();
            assert!(
                matches!(err, vmkit_core::Error::BadArgument { .. }),
                "{changes}: {err:?}"
            );
        }
        // A read-only one passes the check and meets the state's.
        let err = vm.qmp_query("query-status", None).await.unwrap_err();
        assert!(
            matches!(err, vmkit_core::Error::InvalidState { .. }),
            "{err:?}"
        );
    }
}

/// The README's embedding example, compiled as a doctest so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExample;
