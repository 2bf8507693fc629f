//! The QEMU command line. QEMU is spawned directly (no shell), so only QEMU's own
//! option syntax needs care: inside a `key=value,…` option a comma in a value must be
//! doubled (`escape.rs`); devices are passed as JSON instead.

use std::ffi::OsString;
use std::os::fd::RawFd;

use serde_json::json;
use vmkit_core::{
    Accel, DiskConfig, InstanceConfig, MemoryHotplug, NicConfig, ShareConfig, ShareVia,
};

use crate::devices::{
    ROOT_PORT_PREFIX, cold_share_name, disk_args, nic_args, nine_p_args, virtio_fs_args,
    virtiofsd_socket,
};
use crate::escape::{escape_opt, escape_path};
use crate::guest::GuestDevice;
use crate::options::{Machine, QemuOptions};

/// The `-sandbox` policy vmkit uses: seccomp on, and QEMU may not use obsolete system
/// calls, gain privileges, spawn processes or change its scheduling and CPU affinity.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The `-sandbox` policy with `run_as`: QEMU installs its seccomp filter before it
/// drops to the user, so the drop's set*id calls must stay allowed (measured: with
/// `elevateprivileges=deny` or `children` QEMU 10 dies of SIGSYS). Once QEMU is that
/// user, setuid cannot make it root again.
pub(crate) const SANDBOX_RUN_AS: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// The chardev id of the QMP socket.
pub(crate) const QMP_CHARDEV: &str = "vmkit-qmp";
/// The chardev id of the serial console.
pub(crate) const CONSOLE_CHARDEV: &str = "vmkit-console";
/// The id of the guest RAM's memory backend when it must be shared (vhost-user).
pub(crate) const RAM_BACKEND: &str = "vmkit-ram";
/// The id of the virtio-mem device (with `memory_hotplug = virtio_mem`).
pub(crate) const VIRTIO_MEM_ID: &str = "vmkit-vmem";
/// The virtio-mem device's block size in MiB: hot-plug granularity (x86's default).
pub(crate) const VIRTIO_MEM_BLOCK_MIB: u64 = 2;
/// The id of the virtio-mem device's memory backend.
pub(crate) const VIRTIO_MEM_BACKEND: &str = "vmkit-vmem-ram";
/// The id of the vsock device (and of its chardev, for vhost-user).
pub(crate) const VSOCK_ID: &str = "vmkit-vsock";
/// The id of the PCIe root port the hybrid-vsock device sits on (q35): a hot-plug slot
/// of its own, so that a vsock device whose daemon stopped serving can be replaced
/// (see `relink`). Its chassis number comes after the hot-plug ports' (1–32).
pub(crate) const VSOCK_PORT_ID: &str = "vmkit-rp-vsock";
const VSOCK_PORT_CHASSIS: u32 = 33;

/// The id of the pvpanic device (PCI machines): the guest kernel reports a panic through it,
/// QEMU emits GUEST_PANICKED and the instance ends with `ExitReason::GuestPanic`.
pub(crate) const PVPANIC_ID: &str = "vmkit-pvpanic";

/// Everything the command line is built from.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    /// The instance's config (id, resources, kernel, sockets via its layout).
    pub config: &'a InstanceConfig,
    /// The backend options.
    pub options: &'a QemuOptions,
    /// The resolved accelerator (never `Auto`).
    pub accel: Accel,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Whether to pass `-sandbox`.
    pub sandbox: bool,
    /// Whether QEMU is to exit when vmkit does (`-run-with exit-with-parent=on`), for
    /// platforms that cannot see to it themselves.
    pub exit_with_parent: bool,
    /// Disks, in order.
    pub disks: &'a [DiskConfig],
    /// NICs, each with the open TAP fd QEMU inherits.
    pub nics: &'a [(NicConfig, Option<RawFd>)],
    /// The vsock device, if the guest is reached over vsock.
    pub vsock: Option<&'a GuestDevice>,
    /// Shares, in order, each with its transport decided; a virtio-fs one's daemon
    /// serves at `devices::virtiofsd_socket(state_dir, devices::cold_share_name(i))`.
    pub shares: &'a [ShareConfig],
    /// Virtio-fs shares may be attached (now or hot-plugged later): guest RAM must be
    /// a shared memfd for their daemons.
    pub vhost_user_fs: bool,
}

/// The arguments (without the binary).
pub(crate) fn build(launch: &Launch<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::with_capacity(48);
    args.extend(identity_args(launch));
    args.extend(machine_args(launch));
    args.extend(memory_args(launch));
    args.extend(sandbox_args(launch));
    args.extend(channel_args(launch));
    args.extend(kernel_args(launch));
    args.extend(device_args(launch));
    args
}

fn strs(parts: &[&str]) -> Vec<OsString> {
    parts.iter().map(OsString::from).collect()
}

/// Whether guest RAM is shared with vhost-user daemons (hybrid vsock, virtio-fs).
fn shares_ram(launch: &Launch<'_>) -> bool {
    matches!(launch.vsock, Some(GuestDevice::VhostUser { .. })) || launch.vhost_user_fs
}

/// The VM's name, and no defaults, display or reboot.
fn identity_args(launch: &Launch<'_>) -> Vec<OsString> {
    strs(&[
        "-name",
        &format!("guest={},debug-threads=on", escape_opt(&launch.config.id)),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
}

/// The machine (with a shared RAM backend for a vhost-user daemon), accelerator, CPU
/// model and vCPUs.
fn machine_args(launch: &Launch<'_>) -> Vec<OsString> {
    let res = &launch.config.resources;
    let mut machine = machine_name(launch.options.machine, launch.accel);
    let mut args = Vec::new();
    if shares_ram(launch) {
        // A vhost-user daemon maps guest RAM: it must be a shared memfd.
        let ram = json!({
            "qom-type": "memory-backend-memfd",
            "id": RAM_BACKEND,
            "size": res.memory_mib << 20,
            "share": true,
        });
        machine.push_str(&format!(",memory-backend={RAM_BACKEND}"));
        args.extend(strs(&["-object", &ram.to_string()]));
    }
    args.splice(0..0, strs(&["-machine", &machine]));
    args.extend(strs(&["-accel", launch.accel.as_str()]));
    if let Some(cpu) = cpu_model(launch.options.machine, launch.accel) {
        args.extend(strs(&["-cpu", cpu]));
    }
    args.extend(strs(&[
        "-smp",
        &format!("{},maxcpus={}", res.boot_vcpus, res.max_vcpus),
    ]));
    args
}

/// `-machine`'s value: on `virt`, a GICv3 (up to 512 vCPUs, where GICv2 stops at 8),
/// or under KVM the host's own interrupt controller.
fn machine_name(machine: Machine, accel: Accel) -> String {
    match (machine, accel) {
        (Machine::Virt, Accel::Kvm) => "virt,gic-version=host".to_owned(),
        (Machine::Virt, _) => "virt,gic-version=3".to_owned(),
        (other, _) => other.as_str().to_owned(),
    }
}

/// `-cpu`: the host's own CPU under hardware acceleration (KVM, HVF); under TCG, `max`
/// on `virt` (whose default, a Cortex-A15, is 32-bit) and QEMU's default on x86.
fn cpu_model(machine: Machine, accel: Accel) -> Option<&'static str> {
    match (accel, machine) {
        (Accel::Kvm | Accel::Hvf, _) => Some("host"),
        (_, Machine::Virt) => Some("max"),
        _ => None,
    }
}

/// `-m` (with DIMM slots, or the room virtio-mem needs) and the virtio-mem device.
fn memory_args(launch: &Launch<'_>) -> Vec<OsString> {
    let res = &launch.config.resources;
    let virtio_mem = res.memory_hotplug == MemoryHotplug::VirtioMem;
    let memory = if res.memory_slots > 0 {
        format!(
            "{}M,slots={},maxmem={}M",
            res.memory_mib,
            res.memory_slots,
            res.max_memory()
        )
    } else if virtio_mem {
        // virtio-mem needs the device-memory region (maxmem), not slots.
        format!("{}M,maxmem={}M", res.memory_mib, res.max_memory())
    } else {
        format!("{}M", res.memory_mib)
    };
    let mut args = strs(&["-m", &memory]);
    if virtio_mem {
        // One backend spanning all the room; nothing is allocated until the guest
        // touches plugged blocks. Shared like boot RAM when a vhost-user daemon maps it.
        let room = (res.max_memory() - res.memory_mib) << 20;
        let backend = if shares_ram(launch) {
            json!({"qom-type": "memory-backend-memfd", "id": VIRTIO_MEM_BACKEND,
                   "size": room, "share": true})
        } else {
            json!({"qom-type": "memory-backend-ram", "id": VIRTIO_MEM_BACKEND,
                   "size": room, "reserve": false})
        };
        // On the root complex: it is never unplugged, so it takes no hot-plug port.
        let device = json!({"driver": "virtio-mem-pci", "id": VIRTIO_MEM_ID,
                            "memdev": VIRTIO_MEM_BACKEND, "requested-size": 0,
                            "block-size": VIRTIO_MEM_BLOCK_MIB << 20,
                            "bus": "pcie.0"});
        args.extend(strs(&[
            "-object",
            &backend.to_string(),
            "-device",
            &device.to_string(),
        ]));
    }
    args
}

/// `-sandbox`, the user QEMU drops to, and whether it exits with vmkit.
fn sandbox_args(launch: &Launch<'_>) -> Vec<OsString> {
    let mut args = Vec::new();
    if launch.sandbox {
        let policy = if launch.options.run_as.is_some() {
            SANDBOX_RUN_AS
        } else {
            SANDBOX
        };
        args.extend(strs(&["-sandbox", policy]));
    }
    let mut run_with = Vec::new();
    if let Some(user) = &launch.options.run_as {
        // Checked to be a user name or uid:gid (no comma) when the options were read.
        run_with.push(format!("user={}", escape_opt(user)));
    }
    if launch.exit_with_parent {
        run_with.push("exit-with-parent=on".to_owned());
    }
    if !run_with.is_empty() {
        args.extend(strs(&["-run-with", &run_with.join(",")]));
    }
    args
}

/// QMP on the control socket and the serial console into its log.
fn channel_args(launch: &Launch<'_>) -> Vec<OsString> {
    let layout = launch.config.layout();
    strs(&[
        "-chardev",
        &format!(
            "socket,id={QMP_CHARDEV},path={},server=on,wait=off",
            escape_path(&layout.control_socket())
        ),
        "-mon",
        &format!("chardev={QMP_CHARDEV},mode=control"),
        "-chardev",
        &format!(
            "file,id={CONSOLE_CHARDEV},path={}",
            escape_path(&layout.console_log())
        ),
        "-serial",
        &format!("chardev:{CONSOLE_CHARDEV}"),
    ])
}

/// The kernel, initrd and command line: each value whole, no escaping.
fn kernel_args(launch: &Launch<'_>) -> Vec<OsString> {
    let kernel = &launch.config.kernel;
    let mut args: Vec<OsString> = vec!["-kernel".into(), kernel.path.clone().into()];
    if let Some(initrd) = &kernel.initrd {
        args.push("-initrd".into());
        args.push(initrd.clone().into());
    }
    args.push("-append".into());
    args.push(launch.cmdline.into());
    args
}

/// The id of the entropy device (virtio-rng) and of its backend object.
pub(crate) const RNG_ID: &str = "vmkit-rng";

/// The entropy device: virtio-rng fed from the host's `/dev/urandom`. Without it a
/// guest's CRNG takes about a second of jitter to initialise, and whatever reads
/// `getrandom()` first (crun, for one) waits that long.
fn rng_args(machine: Machine) -> Vec<OsString> {
    let backend = json!({"qom-type": "rng-random", "id": format!("{RNG_ID}-backend"),
                         "filename": "/dev/urandom"});
    let device = if machine.has_pci() {
        json!({"driver": "virtio-rng-pci", "id": RNG_ID, "rng": format!("{RNG_ID}-backend"),
               "bus": "pcie.0"})
    } else {
        json!({"driver": "virtio-rng-device", "id": RNG_ID, "rng": format!("{RNG_ID}-backend")})
    };
    strs(&[
        "-object",
        &backend.to_string(),
        "-device",
        &device.to_string(),
    ])
}

/// pvpanic and the hot-plug root ports (PCI machines), the entropy device, the cold disks
/// and NICs, and the vsock device (on a root port of its own when it can be replaced).
fn device_args(launch: &Launch<'_>) -> Vec<OsString> {
    let machine = launch.options.machine;
    let mut args: Vec<OsString> = Vec::new();
    let mut device = |json: serde_json::Value| {
        args.push("-device".into());
        args.push(json.to_string().into());
    };
    if machine.has_pci() {
        // On the root complex: it is never unplugged, so it takes no hot-plug port.
        device(json!({"driver": "pvpanic-pci", "id": PVPANIC_ID, "bus": "pcie.0"}));
        for i in 0..launch.options.hotplug_ports {
            device(json!({
                "driver": "pcie-root-port",
                "id": format!("{ROOT_PORT_PREFIX}{i}"),
                "chassis": i + 1,
            }));
        }
    }
    args.extend(rng_args(machine));
    for (i, disk) in launch.disks.iter().enumerate() {
        args.extend(disk_args(i, disk, machine));
    }
    for (i, (nic, fd)) in launch.nics.iter().enumerate() {
        args.extend(nic_args(i, &launch.config.id, nic, *fd, machine));
    }
    for (i, share) in launch.shares.iter().enumerate() {
        args.extend(match share.via {
            ShareVia::VirtioFs => {
                let socket = virtiofsd_socket(&launch.config.state_dir, &cold_share_name(i));
                virtio_fs_args(i, share, &socket, machine)
            }
            ShareVia::Auto | ShareVia::NineP => nine_p_args(i, share, machine),
        });
    }
    if let Some(vsock) = launch.vsock {
        if machine.has_pci() && matches!(vsock, GuestDevice::VhostUser { .. }) {
            let port = json!({"driver": "pcie-root-port", "id": VSOCK_PORT_ID,
                              "chassis": VSOCK_PORT_CHASSIS});
            args.push("-device".into());
            args.push(port.to_string().into());
        }
        args.extend(vsock_args(vsock, machine));
    }
    args
}

/// The hybrid-vsock device for `device_add` (q35): on its own root port, its chardev
/// named like it.
pub(crate) fn vhost_user_vsock_device() -> serde_json::Value {
    json!({"driver": "vhost-user-vsock-pci", "id": VSOCK_ID, "chardev": VSOCK_ID,
           "bus": VSOCK_PORT_ID})
}

/// The guest link's device arguments: a vsock device, or the virtio-serial port.
pub(crate) fn vsock_args(vsock: &GuestDevice, machine: Machine) -> Vec<OsString> {
    let pci = machine.has_pci();
    match vsock {
        GuestDevice::VhostUser { socket } => {
            let driver = if pci {
                "vhost-user-vsock-pci"
            } else {
                "vhost-user-vsock-device"
            };
            let device = if pci {
                vhost_user_vsock_device()
            } else {
                json!({"driver": driver, "id": VSOCK_ID, "chardev": VSOCK_ID})
            };
            vec![
                "-chardev".into(),
                format!("socket,id={VSOCK_ID},path={}", escape_path(socket)).into(),
                "-device".into(),
                device.to_string().into(),
            ]
        }
        GuestDevice::Kernel { cid, vhostfd } => {
            let driver = if pci {
                "vhost-vsock-pci"
            } else {
                "vhost-vsock-device"
            };
            let device = json!({
                "driver": driver,
                "id": VSOCK_ID,
                "guest-cid": cid,
                "vhostfd": vhostfd.to_string(),
            });
            vec!["-device".into(), device.to_string().into()]
        }
        GuestDevice::Serial { chardev } => serial_args(chardev, pci),
    }
}

/// The id of the virtio-serial controller.
const SERIAL_ID: &str = "vmkit-serial";
/// The id of the agent's port's chardev.
const SERIAL_CHARDEV: &str = "vmkit-agent";
/// The name the guest sees the agent's port by (`/sys/class/virtio-ports/*/name`).
pub(crate) const SERIAL_PORT_NAME: &str = "vmkit.agent";

/// A virtio-serial controller (on the root complex: never unplugged) with one port,
/// the agent's, on a Unix-socket chardev QEMU listens on (vmkit connects).
fn serial_args(chardev: &std::path::Path, pci: bool) -> Vec<OsString> {
    let controller = if pci {
        json!({"driver": "virtio-serial-pci", "id": SERIAL_ID, "bus": "pcie.0"})
    } else {
        json!({"driver": "virtio-serial-device", "id": SERIAL_ID})
    };
    let port = json!({"driver": "virtserialport", "bus": format!("{SERIAL_ID}.0"),
                      "chardev": SERIAL_CHARDEV, "name": SERIAL_PORT_NAME, "id": crate::guest::SERIAL_PORT_ID});
    vec![
        "-chardev".into(),
        format!(
            "socket,id={SERIAL_CHARDEV},path={},server=on,wait=off",
            escape_path(chardev)
        )
        .into(),
        "-device".into(),
        controller.to_string().into(),
        "-device".into(),
        port.to_string().into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_core::Resources;

    fn config() -> InstanceConfig {
        let mut c = InstanceConfig::new("vm1", "/run/vmkit/a,b", "/boot/vmlinuz");
        c.kernel.initrd = Some("/boot/initrd,x.img".into());
        c
    }

    fn args_of(launch: &Launch<'_>) -> Vec<String> {
        build(launch)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// The arguments for `c` with no disks, NICs, kernel command line or sandbox.
    fn plain_args(
        c: &InstanceConfig,
        opts: &QemuOptions,
        accel: Accel,
        vsock: Option<&GuestDevice>,
    ) -> Vec<String> {
        args_of(&Launch {
            config: c,
            options: opts,
            accel,
            cmdline: "",
            sandbox: false,
            exit_with_parent: false,
            disks: &[],
            nics: &[],
            vsock,
            shares: &[],
            vhost_user_fs: false,
        })
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_typical_q35_command_line() {
        let mut c = config();
        c.resources = Resources {
            boot_vcpus: 1,
            max_vcpus: 4,
            memory_mib: 256,
            memory_slots: 4,
            max_memory_mib: Some(2048),
            memory_hotplug: MemoryHotplug::Dimm,
        };
        let opts = QemuOptions::q35();
        let launched = |options: &QemuOptions, exit_with_parent: bool| {
            args_of(&Launch {
                config: &c,
                options,
                accel: Accel::Tcg,
                cmdline: "console=ttyS0 quiet",
                sandbox: true,
                exit_with_parent,
                disks: &[],
                nics: &[],
                vsock: None,
                shares: &[],
                vhost_user_fs: false,
            })
        };
        let sandboxed = |options: &QemuOptions| launched(options, false);
        let args = sandboxed(&opts);
        assert_eq!(value_after(&args, "-accel"), ["tcg"]);
        assert!(
            value_after(&args, "-cpu").is_empty(),
            "TCG keeps the default CPU model"
        );
        assert_eq!(value_after(&args, "-smp"), ["1,maxcpus=4"]);
        assert_eq!(value_after(&args, "-m"), ["256M,slots=4,maxmem=2048M"]);
        assert_eq!(value_after(&args, "-machine"), ["q35"]);
        assert_eq!(value_after(&args, "-sandbox"), [SANDBOX]);
        assert!(value_after(&args, "-run-with").is_empty());
        let mut unprivileged = opts.clone();
        unprivileged.run_as = Some("vmkit-qemu".into());
        let dropping = sandboxed(&unprivileged);
        assert_eq!(value_after(&dropping, "-run-with"), ["user=vmkit-qemu"]);
        assert_eq!(value_after(&dropping, "-sandbox"), [SANDBOX_RUN_AS]);
        // Where the platform cannot tie QEMU to vmkit (macOS), QEMU is asked to: one
        // -run-with carries both.
        let tied = launched(&unprivileged, true);
        assert_eq!(
            value_after(&tied, "-run-with"),
            ["user=vmkit-qemu,exit-with-parent=on"]
        );
        assert_eq!(value_after(&args, "-append"), ["console=ttyS0 quiet"]);
        let devices = value_after(&args, "-device");
        assert_eq!(
            devices.len(),
            6,
            "the pvpanic device, 4 root ports and the entropy device by default"
        );
        assert!(
            devices[5].contains(r#""driver":"virtio-rng-pci""#),
            "{}",
            devices[5]
        );
        assert_eq!(
            devices[0],
            r#"{"bus":"pcie.0","driver":"pvpanic-pci","id":"vmkit-pvpanic"}"#
        );
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
    }

    #[test]
    fn an_apple_silicon_command_line() {
        // What a Mac with Apple Silicon runs: the virt board under HVF, the guest
        // reached over virtio-serial, user networking, QEMU told to exit with vmkit.
        let c = config();
        let opts = QemuOptions {
            machine: Machine::Virt,
            ..QemuOptions::q35()
        };
        let serial = GuestDevice::Serial {
            chardev: "/Users/a/vm/serial.sock".into(),
        };
        let nic = NicConfig {
            id: "net0".into(),
            backend: vmkit_core::NicBackend::User,
            mac: None,
        };
        let cmdline = crate::kernel_cmdline::build(Machine::Virt, None, &[]).unwrap();
        let launch = |accel: Accel| {
            args_of(&Launch {
                config: &c,
                options: &opts,
                accel,
                cmdline: &cmdline,
                sandbox: false,
                exit_with_parent: true,
                disks: &[],
                nics: &[(nic.clone(), None)],
                vsock: Some(&serial),
                shares: &[],
                vhost_user_fs: false,
            })
        };
        let args = launch(Accel::Hvf);
        assert_eq!(value_after(&args, "-machine"), ["virt,gic-version=3"]);
        assert_eq!(value_after(&args, "-accel"), ["hvf"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
        assert_eq!(value_after(&args, "-smp"), ["1,maxcpus=1"]);
        assert_eq!(value_after(&args, "-run-with"), ["exit-with-parent=on"]);
        assert!(value_after(&args, "-append")[0].starts_with("console=ttyAMA0 "));
        assert_eq!(value_after(&args, "-netdev"), ["user,id=vmkit-net0"]);
        assert!(
            !args.iter().any(|a| a.contains("vsock")),
            "no vsock device or daemon: {args:?}"
        );
        let devices: Vec<serde_json::Value> = value_after(&args, "-device")
            .into_iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let drivers: Vec<&str> = devices
            .iter()
            .map(|d| d["driver"].as_str().unwrap())
            .collect();
        assert_eq!(
            drivers,
            [
                "pvpanic-pci",
                "pcie-root-port",
                "pcie-root-port",
                "pcie-root-port",
                "pcie-root-port",
                "virtio-rng-pci",
                "virtio-net-pci",
                "virtio-serial-pci",
                "virtserialport"
            ]
        );
        assert_eq!(devices[7]["bus"], "pcie.0");
        // The same board under TCG (an Intel Mac or a Linux host emulating arm64)
        // needs a 64-bit CPU model; under KVM on an arm64 host, the host's GIC.
        let tcg = launch(Accel::Tcg);
        assert_eq!(value_after(&tcg, "-cpu"), ["max"]);
        let kvm = launch(Accel::Kvm);
        assert_eq!(value_after(&kvm, "-machine"), ["virt,gic-version=host"]);
        assert_eq!(value_after(&kvm, "-cpu"), ["host"]);
    }

    #[test]
    fn virtio_mem_spans_the_room_above_boot_memory_and_is_shared_under_vhost_user() {
        let mut c = config();
        c.resources.memory_hotplug = MemoryHotplug::VirtioMem;
        c.resources.max_memory_mib = Some(1280);
        let opts = QemuOptions::q35();
        let hybrid = GuestDevice::VhostUser {
            socket: "/run/v.sock".into(),
        };
        for (vsock, qom_type) in [
            (None, "memory-backend-ram"),
            (Some(&hybrid), "memory-backend-memfd"),
        ] {
            let args = plain_args(&c, &opts, Accel::Tcg, vsock);
            assert_eq!(value_after(&args, "-m"), ["256M,maxmem=1280M"]);
            let objects: Vec<serde_json::Value> = value_after(&args, "-object")
                .into_iter()
                .map(|o| serde_json::from_str(o).unwrap())
                .collect();
            let backend = objects
                .iter()
                .find(|o| o["id"] == VIRTIO_MEM_BACKEND)
                .expect("virtio-mem backend");
            assert_eq!(backend["qom-type"], qom_type);
            assert_eq!(backend["size"], 1024u64 << 20);
            assert_eq!(backend["share"].as_bool(), vsock.map(|_| true));
            let device: serde_json::Value = value_after(&args, "-device")
                .into_iter()
                .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
                .find(|d| d["driver"] == "virtio-mem-pci")
                .expect("virtio-mem-pci device");
            assert_eq!(device["id"], VIRTIO_MEM_ID);
            assert_eq!(device["memdev"], VIRTIO_MEM_BACKEND);
            assert_eq!(device["requested-size"], 0);
            assert_eq!(device["block-size"], 2u64 << 20);
            assert_eq!(device["bus"], "pcie.0");
        }
    }

    #[test]
    fn a_serial_guest_link_is_a_controller_a_named_port_and_a_listening_chardev() {
        let serial = GuestDevice::Serial {
            chardev: "/run/vmkit/a,b/serial.sock".into(),
        };
        let args: Vec<String> = vsock_args(&serial, Machine::Q35)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "-chardev",
                "socket,id=vmkit-agent,path=/run/vmkit/a,,b/serial.sock,server=on,wait=off",
                "-device",
                r#"{"bus":"pcie.0","driver":"virtio-serial-pci","id":"vmkit-serial"}"#,
                "-device",
                r#"{"bus":"vmkit-serial.0","chardev":"vmkit-agent","driver":"virtserialport","id":"vmkit-agent-port","name":"vmkit.agent"}"#,
            ]
        );
        let mmio = vsock_args(&serial, Machine::Microvm);
        assert!(
            mmio[3].to_str().unwrap().contains("virtio-serial-device"),
            "{mmio:?}"
        );
    }

    #[test]
    fn vhost_user_vsock_shares_guest_ram_and_kernel_vsock_passes_its_fd() {
        let c = config();
        let opts = QemuOptions::q35();
        let hybrid = GuestDevice::VhostUser {
            socket: "/run/vmkit/a,b/vhost.sock".into(),
        };
        let args = plain_args(&c, &opts, Accel::Tcg, Some(&hybrid));
        assert_eq!(
            value_after(&args, "-machine"),
            ["q35,memory-backend=vmkit-ram"]
        );
        let ram: serde_json::Value =
            serde_json::from_str(value_after(&args, "-object")[0]).unwrap();
        assert_eq!(
            ram,
            serde_json::json!({"qom-type": "memory-backend-memfd", "id": "vmkit-ram",
                "size": 256u64 << 20, "share": true})
        );
        assert_eq!(
            value_after(&args, "-chardev").last().copied(),
            Some("socket,id=vmkit-vsock,path=/run/vmkit/a,,b/vhost.sock")
        );
        // On a root port of its own (after the 4 hot-plug ports), so it can be replaced.
        let devices = value_after(&args, "-device");
        assert_eq!(
            &devices[devices.len() - 2..],
            [
                r#"{"chassis":33,"driver":"pcie-root-port","id":"vmkit-rp-vsock"}"#,
                r#"{"bus":"vmkit-rp-vsock","chardev":"vmkit-vsock","driver":"vhost-user-vsock-pci","id":"vmkit-vsock"}"#
            ]
        );

        let kernel = GuestDevice::Kernel {
            cid: 42,
            vhostfd: 9,
        };
        assert_eq!(
            vsock_args(&kernel, Machine::Microvm),
            [
                OsString::from("-device"),
                r#"{"driver":"vhost-vsock-device","guest-cid":42,"id":"vmkit-vsock","vhostfd":"9"}"#
                    .into()
            ]
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_slots_means_plain_memory() {
        let c = config();
        let opts = QemuOptions::q35();
        let args = plain_args(&c, &opts, Accel::Kvm, None);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert!(value_after(&args, "-sandbox").is_empty());
    }

    #[test]
    fn commas_in_paths_are_doubled_in_options_and_kept_whole_elsewhere() {
        let c = config();
        let opts = QemuOptions::q35();
        let args = plain_args(&c, &opts, Accel::Tcg, None);
        let chardevs = value_after(&args, "-chardev");
        assert_eq!(
            chardevs[0],
            "socket,id=vmkit-qmp,path=/run/vmkit/a,,b/control.sock,server=on,wait=off"
        );
        assert_eq!(
            chardevs[1],
            "file,id=vmkit-console,path=/run/vmkit/a,,b/logs/console.log"
        );
        assert_eq!(value_after(&args, "-initrd"), ["/boot/initrd,x.img"]);
    }

    proptest::proptest! {
        /// Whatever a value holds, escaped it stays exactly one QEMU option.
        #[test]
        fn an_escaped_value_is_one_option(value in "[ -~]{0,24}") {
            let opt = format!("file,id=x,path={}", escape_opt(&value));
            let parts = vmkit_testkit::fake_qemu::split_qemu_opts(&opt);
            proptest::prop_assert_eq!(parts.len(), 3);
            proptest::prop_assert_eq!(&parts[2], &format!("path={value}"));
        }
    }
}
