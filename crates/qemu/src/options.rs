//! The QEMU backend's own settings, read from `InstanceConfig::backend_options`
//! (the keys are listed at [`QemuOptions`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, Error as _, IntoDeserializer};
use serde::{Deserialize, de::value::MapDeserializer};

use crate::error::Error;

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// PC with PCIe (`q35`): hot-plug of CPUs, memory and PCIe devices.
    Q35,
    /// The minimal `microvm` machine: virtio-mmio, fastest boot, no PCI hot-plug.
    Microvm,
    /// The Arm `virt` board (`qemu-system-aarch64`; Apple Silicon, arm64 hosts): PCIe,
    /// so disk and NIC hot-plug and virtio-mem; no vCPU hot-plug (QEMU cannot add CPUs
    /// to it) and no DIMMs (their hot-plug needs ACPI, which a directly booted kernel
    /// does not get).
    Virt,
}

impl Machine {
    /// QEMU's name for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
            Machine::Virt => "virt",
        }
    }

    /// The machine for a guest of the host's own architecture: `virt` on aarch64,
    /// `q35` elsewhere.
    pub fn native() -> Machine {
        Machine::for_arch(std::env::consts::ARCH)
    }

    /// The machine for a guest of architecture `arch` (Rust's names, `"aarch64"`).
    pub fn for_arch(arch: &str) -> Machine {
        if arch == "aarch64" {
            Machine::Virt
        } else {
            Machine::Q35
        }
    }

    /// Whether its devices sit on PCIe (root bus `pcie.0`), not virtio-mmio.
    pub(crate) const fn has_pci(self) -> bool {
        matches!(self, Machine::Q35 | Machine::Virt)
    }

    /// Its guests' architecture, in Rust's names (`"x86_64"`, `"aarch64"`).
    pub(crate) const fn guest_arch(self) -> &'static str {
        match self {
            Machine::Q35 | Machine::Microvm => "x86_64",
            Machine::Virt => "aarch64",
        }
    }

    /// The QEMU binary that emulates it.
    pub(crate) const fn binary_name(self) -> &'static str {
        match self {
            Machine::Q35 | Machine::Microvm => "qemu-system-x86_64",
            Machine::Virt => "qemu-system-aarch64",
        }
    }
}

/// `-sandbox` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sandbox {
    /// On when the QEMU binary was built with seccomp.
    Auto,
    /// Always on (start fails when QEMU lacks seccomp).
    On,
    /// Never.
    Off,
}

/// Most PCIe root ports that can be reserved.
pub const MAX_HOTPLUG_PORTS: u32 = 32;

/// The backend's settings for one instance, read from `InstanceConfig::backend_options`
/// (every value a string; an unknown key is refused):
///
/// | key | values | default |
/// | --- | --- | --- |
/// | `binary` | path of the QEMU binary | `$VMKIT_QEMU`, else the machine's (`qemu-system-x86_64`, or `qemu-system-aarch64` for `virt`) on `PATH` |
/// | `machine` | `q35`, `microvm`, `virt` | the host's own: `virt` on aarch64, else `q35` |
/// | `hotplug_ports` | PCIe root ports reserved for hot-plug (q35), 0–32 | `4` |
/// | `ready_line` | the serial-console line prefix that says the guest is up | `VMKIT_READY` |
/// | `sandbox` | `auto` (on when QEMU has seccomp), `on`, `off` | `auto` |
/// | `vhost_vsock_binary` | the `vhost-device-vsock` daemon for hybrid vsock | `$VMKIT_VHOST_VSOCK`, else on `PATH`, else `~/.cargo/bin` |
/// | `virtiofsd_binary` | the `virtiofsd` daemon for virtio-fs shares | `$VMKIT_VIRTIOFSD`, else on `PATH`, else `~/.cargo/bin`, else `/usr/libexec/virtiofsd` |
/// | `run_as` | the unprivileged user QEMU drops to (`-run-with user=`): a user name or `uid:gid` | none |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOptions {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// The machine type.
    pub machine: Machine,
    /// PCIe root ports reserved for hot-plug (q35 only).
    pub hotplug_ports: u32,
    /// The serial-console line prefix that marks the guest ready.
    pub ready_line: String,
    /// `-sandbox` policy.
    pub sandbox: Sandbox,
    /// The `vhost-device-vsock` binary (hybrid vsock, when the host has no
    /// `/dev/vhost-vsock`).
    pub vhost_vsock_binary: PathBuf,
    /// The `virtiofsd` binary (virtio-fs shares; without it shares go over virtio-9p).
    pub virtiofsd_binary: PathBuf,
    /// The unprivileged user QEMU drops to once it has opened what it needs at start
    /// (`-run-with user=`): a user name, or `uid:gid`. `None`: QEMU keeps vmkit's user.
    pub run_as: Option<String>,
}

/// One `backend_options` entry, as serde reads it: each key its own typed field, and
/// any other key refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default, deserialize_with = "some")]
    binary: Option<PathBuf>,
    #[serde(default, deserialize_with = "some")]
    machine: Option<Machine>,
    #[serde(default, deserialize_with = "number")]
    hotplug_ports: Option<u32>,
    #[serde(default, deserialize_with = "some")]
    ready_line: Option<String>,
    #[serde(default, deserialize_with = "some")]
    sandbox: Option<Sandbox>,
    #[serde(default, deserialize_with = "some")]
    vhost_vsock_binary: Option<PathBuf>,
    #[serde(default, deserialize_with = "some")]
    virtiofsd_binary: Option<PathBuf>,
    #[serde(default, deserialize_with = "some")]
    run_as: Option<String>,
}

fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A number written as text (every option value is a string).
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{text:?}: expected a number")))
}

impl QemuOptions {
    /// Reads the options from `backend_options`: each entry is deserialised on its own
    /// (so an error names its key), unknown keys are refused, then the values are
    /// checked.
    ///
    /// # Errors
    /// [`Error::Option`] naming the key.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Self, Error> {
        let mut opts = QemuOptions {
            // Found once the machine is known (below), unless given.
            binary: PathBuf::new(),
            machine: Machine::native(),
            hotplug_ports: 4,
            ready_line: "VMKIT_READY".to_owned(),
            sandbox: Sandbox::Auto,
            vhost_vsock_binary: default_vhost_vsock_binary(),
            virtiofsd_binary: default_virtiofsd_binary(),
            run_as: None,
        };
        for (key, value) in map {
            let bad = |reason: String| Error::Option {
                key: key.clone(),
                reason,
            };
            let pair = std::iter::once((key.as_str(), value.as_str().into_deserializer()));
            let entry =
                Entry::deserialize(MapDeserializer::<_, serde::de::value::Error>::new(pair))
                    .map_err(|e| bad(e.to_string()))?;
            opts.apply(entry).map_err(bad)?;
        }
        if opts.binary.as_os_str().is_empty() {
            opts.binary = default_binary(opts.machine);
        }
        Ok(opts)
    }

    /// Checks and takes the value `entry` carries.
    fn apply(&mut self, entry: Entry) -> Result<(), String> {
        let nonempty = |path: PathBuf| {
            if path.as_os_str().is_empty() {
                Err("must not be empty".to_owned())
            } else {
                Ok(path)
            }
        };
        if let Some(binary) = entry.binary {
            self.binary = nonempty(binary)?;
        }
        if let Some(machine) = entry.machine {
            self.machine = machine;
        }
        if let Some(ports) = entry.hotplug_ports {
            if ports > MAX_HOTPLUG_PORTS {
                return Err(format!("{ports}: expected 0-{MAX_HOTPLUG_PORTS}"));
            }
            self.hotplug_ports = ports;
        }
        if let Some(line) = entry.ready_line {
            if line.trim().is_empty() {
                return Err("must not be blank".into());
            }
            self.ready_line = line;
        }
        if let Some(sandbox) = entry.sandbox {
            self.sandbox = sandbox;
        }
        if let Some(binary) = entry.vhost_vsock_binary {
            self.vhost_vsock_binary = nonempty(binary)?;
        }
        if let Some(binary) = entry.virtiofsd_binary {
            self.virtiofsd_binary = nonempty(binary)?;
        }
        if let Some(user) = entry.run_as {
            check_run_as(&user)?;
            self.run_as = Some(user);
        }
        Ok(())
    }
}

#[cfg(test)]
impl QemuOptions {
    /// The defaults on q35, whatever the host's architecture (for tests of x86 argv).
    pub(crate) fn q35() -> QemuOptions {
        let mut opts = QemuOptions::from_map(&BTreeMap::new()).unwrap();
        opts.machine = Machine::Q35;
        opts
    }
}

/// A `run_as` value: a POSIX user name (`[a-z_][a-z0-9_-]*`, at most 32 bytes) or
/// `uid:gid` in digits. Nothing else reaches QEMU's command line.
fn check_run_as(value: &str) -> Result<(), String> {
    let name = |s: &str| {
        let mut chars = s.chars();
        s.len() <= 32
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    let id = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let ok = match value.split_once(':') {
        Some((uid, gid)) => id(uid) && id(gid),
        None => name(value),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{value:?}: expected a user name or uid:gid"))
    }
}

/// `$VMKIT_QEMU`, else `machine`'s QEMU (`qemu-system-x86_64`, `qemu-system-aarch64`)
/// found on `PATH`, else the bare name (the spawn then fails with a clear "not found").
pub(crate) fn default_binary(machine: Machine) -> PathBuf {
    find_binary("VMKIT_QEMU", machine.binary_name(), &[])
}

/// `$VMKIT_VIRTIOFSD`, else `virtiofsd` on `PATH`, else in `~/.cargo/bin` (where
/// `cargo install` puts it), else Debian's `/usr/libexec/virtiofsd`.
pub(crate) fn default_virtiofsd_binary() -> PathBuf {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    let dirs: Vec<PathBuf> = cargo_bin
        .into_iter()
        .chain([PathBuf::from("/usr/libexec")])
        .collect();
    find_binary("VMKIT_VIRTIOFSD", "virtiofsd", &dirs)
}

/// `$VMKIT_VHOST_VSOCK`, else `vhost-device-vsock` on `PATH`, else in `~/.cargo/bin`
/// (where `cargo install` puts it), else the bare name.
pub(crate) fn default_vhost_vsock_binary() -> PathBuf {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    find_binary(
        "VMKIT_VHOST_VSOCK",
        "vhost-device-vsock",
        cargo_bin.as_slice(),
    )
}

/// The path in `env_var`, else `name` in a `PATH` directory or one of `extra_dirs`,
/// else the bare name.
fn find_binary(env_var: &str, name: &str, extra_dirs: &[PathBuf]) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    path_dirs
        .iter()
        .chain(extra_dirs)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| Path::new(name).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<QemuOptions, String> {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        QemuOptions::from_map(&map).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let opts = parse(&[]).unwrap();
        assert_eq!(opts.machine, Machine::native());
        assert_eq!(opts.hotplug_ports, 4);
        assert_eq!(opts.ready_line, "VMKIT_READY");
        assert_eq!(opts.sandbox, Sandbox::Auto);
    }

    #[test]
    fn the_machine_follows_the_host_and_picks_its_qemu() {
        assert_eq!(Machine::for_arch("aarch64"), Machine::Virt);
        assert_eq!(Machine::for_arch("x86_64"), Machine::Q35);
        let virt = parse(&[("machine", "virt")]).unwrap();
        let q35 = parse(&[("machine", "q35")]).unwrap();
        if std::env::var_os("VMKIT_QEMU").is_none() {
            assert!(
                virt.binary.ends_with("qemu-system-aarch64"),
                "{:?}",
                virt.binary
            );
            assert!(
                q35.binary.ends_with("qemu-system-x86_64"),
                "{:?}",
                q35.binary
            );
        }
        // A binary given is kept, whichever the machine.
        let given = parse(&[("machine", "virt"), ("binary", "/opt/q")]).unwrap();
        assert_eq!(given.binary, Path::new("/opt/q"));
    }

    #[test]
    fn every_key_is_read() {
        let opts = parse(&[
            ("binary", "/opt/qemu/bin/qemu-system-x86_64"),
            ("machine", "microvm"),
            ("hotplug_ports", "0"),
            ("ready_line", "UP"),
            ("sandbox", "off"),
            ("vhost_vsock_binary", "/opt/vhost-device-vsock"),
            ("run_as", "vmkit-qemu"),
        ])
        .unwrap();
        assert_eq!(opts.run_as.as_deref(), Some("vmkit-qemu"));
        assert_eq!(opts.binary, Path::new("/opt/qemu/bin/qemu-system-x86_64"));
        assert_eq!(opts.machine, Machine::Microvm);
        assert_eq!(opts.hotplug_ports, 0);
        assert_eq!(opts.ready_line, "UP");
        assert_eq!(opts.sandbox, Sandbox::Off);
        assert_eq!(
            opts.vhost_vsock_binary,
            Path::new("/opt/vhost-device-vsock")
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        assert_eq!(
            parse(&[("machine", "pc")]).unwrap_err(),
            "backend option machine: unknown variant `pc`, expected one of `q35`, `microvm`, `virt`"
        );
        assert_eq!(
            parse(&[("hotplug_ports", "33")]).unwrap_err(),
            "backend option hotplug_ports: 33: expected 0-32"
        );
        assert_eq!(
            parse(&[("hotplug_ports", "four")]).unwrap_err(),
            "backend option hotplug_ports: \"four\": expected a number"
        );
        assert_eq!(
            parse(&[("sandbox", "yes")]).unwrap_err(),
            "backend option sandbox: unknown variant `yes`, expected one of `auto`, `on`, `off`"
        );
        assert_eq!(
            parse(&[("binary", "")]).unwrap_err(),
            "backend option binary: must not be empty"
        );
        assert_eq!(
            parse(&[("run_as", "65534:65534")])
                .unwrap()
                .run_as
                .as_deref(),
            Some("65534:65534")
        );
        for bad in ["", "root,chroot=/", "Nobody", "1:", ":2", "a b", "-x"] {
            assert_eq!(
                parse(&[("run_as", bad)]).unwrap_err(),
                format!("backend option run_as: {bad:?}: expected a user name or uid:gid"),
            );
        }
        assert!(
            parse(&[("cpu", "host")])
                .unwrap_err()
                .starts_with("backend option cpu: unknown field `cpu`, expected one of `binary`")
        );
    }
}
