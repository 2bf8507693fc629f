//! The shim's configuration: which backend runs the VMs and how each VM is made. A
//! JSON file, at `$VMKIT_SHIM_CONFIG` or `/etc/vmkit/shim.json` (containerd passes its
//! environment on to its shims); see docs/containerd.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use vmkit_core::{
    Accel, Backend, GuestTransport, InstanceConfig, KernelConfig, Resources, Timeouts,
};

use crate::error::{Error, Result};

/// The environment variable naming the config file.
pub(crate) const CONFIG_ENV: &str = "VMKIT_SHIM_CONFIG";
/// The config file when the variable is not set.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/vmkit/shim.json";

/// Which backend runs the VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BackendChoice {
    /// vmkit-qemu, linked into the shim.
    #[default]
    Qemu,
    /// A backend library (`cdylib`) loaded with vmkit-plugin's loader.
    Plugin(PathBuf),
    /// A backend executable, run as its own process serving the backend `name`.
    Process {
        /// The executable.
        path: PathBuf,
        /// The backend it serves (`<path> <name> serve`).
        name: String,
    },
}

/// The shim's configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShimConfig {
    /// The backend; `"qemu"` when left out.
    #[serde(default)]
    pub(crate) backend: BackendChoice,
    /// Where each VM's state dir goes (`<state_root>/<key>`): short, for socket paths.
    #[serde(default = "default_state_root")]
    pub(crate) state_root: PathBuf,
    /// The guest kernel (and initrd) every VM boots.
    pub(crate) kernel: KernelConfig,
    /// vCPUs and memory of each VM.
    #[serde(default)]
    pub(crate) resources: Resources,
    /// The accelerator.
    #[serde(default)]
    pub(crate) accel: Accel,
    /// How the shim reaches the guest agent.
    #[serde(default)]
    pub(crate) transport: GuestTransport,
    /// The VMs' deadlines.
    #[serde(default)]
    pub(crate) timeouts: Timeouts,
    /// Backend options (QEMU's `machine`, `qemu_binary`, …).
    #[serde(default)]
    pub(crate) backend_options: BTreeMap<String, String>,
}

fn default_state_root() -> PathBuf {
    PathBuf::from("/run/vmkit-shim")
}

impl ShimConfig {
    /// Reads the config file `$VMKIT_SHIM_CONFIG` names, or the default one.
    pub(crate) fn load() -> Result<ShimConfig> {
        let path = std::env::var_os(CONFIG_ENV)
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
        ShimConfig::read(&path)
    }

    /// Reads and checks `path`.
    pub(crate) fn read(path: &Path) -> Result<ShimConfig> {
        let err = |reason: String| Error::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let config: ShimConfig = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if !config.state_root.is_absolute() {
            return Err(err(format!(
                "state_root {} is not absolute",
                config.state_root.display()
            )));
        }
        // The rest is checked by the backend when a VM is made of it; check it now so a
        // broken file fails the first Create with its own message.
        let vm = config.instance("check", "c0");
        vm.validate()
            .and_then(|()| vm.kernel.validate())
            .map_err(|e| err(e.to_string()))?;
        Ok(config)
    }

    /// The backend this config names.
    pub(crate) fn backend(&self) -> Result<Arc<dyn Backend>> {
        let op = "load the VM backend";
        Ok(match &self.backend {
            BackendChoice::Qemu => Arc::new(vmkit_qemu::QemuBackend),
            BackendChoice::Plugin(path) => Arc::new(
                vmkit_plugin::loader::load(path)
                    .map_err(|e| Error::unsupported(op, format!("{}: {e}", path.display())))?,
            ),
            BackendChoice::Process { path, name } => {
                let channel = vmkit_plugin::process::ProcessChannel::launch(path, name)
                    .map_err(|e| Error::unsupported(op, format!("{}: {e}", path.display())))?;
                Arc::new(vmkit_plugin::PluginBackend::describe(channel).map_err(Error::vm(op))?)
            }
        })
    }

    /// The config of the VM `vm_id`, its state in `<state_root>/<key>`.
    pub(crate) fn instance(&self, vm_id: &str, key: &str) -> InstanceConfig {
        let mut config = InstanceConfig::new(vm_id, self.state_root.join(key), &self.kernel.path);
        config.kernel = self.kernel.clone();
        config.resources = self.resources.clone();
        config.accel = self.accel;
        config.transport = self.transport.clone();
        config.timeouts = self.timeouts.clone();
        config.backend_options = self.backend_options.clone();
        config
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A dir with a kernel file, and a config file in it from `text`, where `KERNEL`
    /// stands for the kernel's path.
    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").unwrap();
        let path = dir.path().join("shim.json");
        std::fs::write(&path, text.replace("KERNEL", &kernel.display().to_string())).unwrap();
        (dir, path)
    }

    #[test]
    fn a_config_names_the_kernel_and_defaults_the_rest() {
        let (dir, path) = write(r#"{"kernel": {"path": "KERNEL"}, "accel": "tcg"}"#);
        let config = ShimConfig::read(&path).unwrap();
        assert_eq!(config.backend, BackendChoice::Qemu);
        assert_eq!(config.state_root, Path::new("/run/vmkit-shim"));
        let vm = config.instance("c1", "abc");
        assert_eq!(vm.state_dir, Path::new("/run/vmkit-shim/abc"));
        assert_eq!(vm.kernel.path, dir.path().join("vmlinuz"));
        assert_eq!(vm.accel, Accel::Tcg);
    }

    #[test]
    fn the_backend_is_named_by_kind() {
        let (_dir, path) = write(
            r#"{"kernel": {"path": "KERNEL"}, "backend": {"plugin": "/usr/lib/vmkit/libq.so"}}"#,
        );
        assert_eq!(
            ShimConfig::read(&path).unwrap().backend,
            BackendChoice::Plugin("/usr/lib/vmkit/libq.so".into())
        );
        let (_dir, path) = write(
            r#"{"kernel": {"path": "KERNEL"}, "backend": {"process": {"path": "/bin/b", "name": "qemu"}}}"#,
        );
        assert_eq!(
            ShimConfig::read(&path).unwrap().backend,
            BackendChoice::Process {
                path: "/bin/b".into(),
                name: "qemu".into()
            }
        );
    }

    #[test]
    fn a_bad_config_names_the_file_and_the_field() {
        for (text, needle) in [
            (
                r#"{"kernel": {"path": "KERNEL"}, "colour": 1}"#,
                "unknown field `colour`",
            ),
            (r#"{"accel": "tcg"}"#, "missing field `kernel`"),
            (
                r#"{"kernel": {"path": "KERNEL"}, "state_root": "rel"}"#,
                "state_root rel is not absolute",
            ),
            (
                r#"{"kernel": {"path": "/nonexistent/vmlinuz"}}"#,
                "kernel.path",
            ),
            (
                r#"{"kernel": {"path": "KERNEL"}, "backend": "firecracker"}"#,
                "unknown variant",
            ),
        ] {
            let (_dir, path) = write(text);
            let err = ShimConfig::read(&path).unwrap_err().to_string();
            assert!(
                err.contains("shim.json") && err.contains(needle),
                "{text}: {err}"
            );
        }
        let err = ShimConfig::read(Path::new("/nonexistent/shim.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/shim.json"), "{err}");
    }
}
