//! What `vmkit run` starts: the VM's config (from a config file, then the flags), its
//! devices and its backend — one serde value, which a detached VM's supervisor reads
//! from its entry — and the instance made from it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmkit_core::{Accel, DeviceSpec, GuestTransport, Instance, InstanceConfig, Registry};
use vmkit_plugin::PluginBackend;
use vmkit_plugin::process::ProcessChannel;

use crate::args::{AccelArg, RunArgs, TransportArg};
use crate::device_args;
use crate::error::{Error, Result};

/// The config file format this vmkit reads.
pub(crate) const CONFIG_VERSION: u32 = 1;

/// The agent's vsock port in the test guest (vmkit-proto's default).
const AGENT_PORT: u32 = vmkit_proto::AGENT_PORT;

/// Where a backend comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub(crate) enum BackendSource {
    /// Linked into this binary, by name.
    Linked {
        /// Its name.
        name: String,
    },
    /// A plugin library.
    Library {
        /// The library.
        path: PathBuf,
    },
    /// A backend executable.
    Process {
        /// The executable.
        path: PathBuf,
        /// The backend's name.
        name: String,
    },
}

/// One VM to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Launch {
    /// The VM.
    pub(crate) config: InstanceConfig,
    /// Devices added before start that the config has no field for (shares).
    pub(crate) devices: Vec<DeviceSpec>,
    /// Its backend.
    pub(crate) backend: BackendSource,
}

/// The config file: `version = 1` and a `[vm]` table of `InstanceConfig` (whose `id`
/// and `state_dir` may be left out: the name and the runtime dir fill them in).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    version: u32,
    vm: toml::Table,
}

impl Launch {
    /// The launch `args` describe, for a VM named `name` whose state goes in
    /// `state_dir`; `image_dir` is where the default kernel is looked for.
    pub(crate) fn from_args(
        args: &RunArgs,
        name: &str,
        state_dir: &Path,
        image_dir: &Path,
    ) -> Result<Launch> {
        let mut config = match &args.config {
            Some(file) => read_config_file(file, name, state_dir)?,
            None => default_config(args, name, state_dir, image_dir)?,
        };
        config.id = name.to_owned();
        config.state_dir = state_dir.to_owned();
        apply_flags(args, &mut config)?;
        let mut devices = Vec::new();
        for (i, text) in args.shares.iter().enumerate() {
            let share = device_args::share(text, &format!("share{i}"))?;
            devices.push(DeviceSpec::Share(share));
        }
        let backend = match (&args.plugin, &args.backend_process) {
            (Some(path), _) => BackendSource::Library {
                path: std::path::absolute(path)
                    .map_err(|e| Error::io(format!("--plugin {}", path.display()), e))?,
            },
            (None, Some(path)) => BackendSource::Process {
                path: std::path::absolute(path)
                    .map_err(|e| Error::io(format!("--backend-process {}", path.display()), e))?,
                name: args.backend.clone().unwrap_or_else(|| "qemu".into()),
            },
            (None, None) => BackendSource::Linked {
                name: args.backend.clone().unwrap_or_else(|| "qemu".into()),
            },
        };
        config
            .validate()
            .map_err(|e| Error::BadArgument(format!("VM {name:?}: {e}")))?;
        Ok(Launch {
            config,
            devices,
            backend,
        })
    }

    /// The instance, its devices added, not started.
    pub(crate) fn create(&self) -> Result<Box<dyn Instance>> {
        let op = format!("create VM {:?}", self.config.id);
        let vm = match &self.backend {
            BackendSource::Linked { name } => Registry::from_inventory()
                .and_then(|registry| registry.create(name, self.config.clone()))
                .map_err(|e| Error::vm(&op, e))?,
            BackendSource::Library { path } => {
                let backend = vmkit_plugin::loader::load(path).map_err(|source| Error::Plugin {
                    op: format!("load plugin {}", path.display()),
                    source: Box::new(source),
                })?;
                vmkit_core::Backend::create(&backend, self.config.clone())
                    .map_err(|e| Error::vm(&op, e))?
            }
            BackendSource::Process { path, name } => {
                let channel =
                    ProcessChannel::launch(path, name).map_err(|source| Error::Plugin {
                        op: format!("start backend process {}", path.display()),
                        source: Box::new(source),
                    })?;
                let backend = PluginBackend::describe(channel).map_err(|e| Error::vm(&op, e))?;
                vmkit_core::Backend::create(&backend, self.config.clone())
                    .map_err(|e| Error::vm(&op, e))?
            }
        };
        for device in &self.devices {
            vm.add_device(device.clone())
                .map_err(|e| Error::vm(format!("add device {}", device.id()), e))?;
        }
        Ok(vm)
    }
}

/// The test guest's config: its kernel and initramfs, 1 vCPU (up to 4), 256 MiB.
fn default_config(
    args: &RunArgs,
    name: &str,
    state_dir: &Path,
    image_dir: &Path,
) -> Result<InstanceConfig> {
    let kernel = match &args.kernel {
        Some(kernel) => absolute("--kernel", kernel)?,
        None => {
            // The uncompressed kernel boots faster (PVH), where the image has one.
            let kernel = ["vmlinux", "vmlinuz"]
                .iter()
                .map(|name| image_dir.join(name))
                .find(|path| path.is_file());
            kernel.ok_or_else(|| Error::NoTestGuest(image_dir.to_owned()))?
        }
    };
    if !kernel.is_file() {
        return Err(Error::BadArgument(format!(
            "--kernel {}: no such file",
            kernel.display()
        )));
    }
    let mut config = InstanceConfig::new(name, state_dir, &kernel);
    if args.kernel.is_none() {
        config.kernel.initrd = Some(image_dir.join("initrd.img"));
        config.kernel.cmdline = vec!["mitigations=off".into()];
        config.resources.max_vcpus = 4;
        config.resources.memory_slots = 2;
        config.resources.max_memory_mib = Some(1024);
        config.timeouts.start = Duration::from_secs(60);
    }
    Ok(config)
}

fn read_config_file(path: &Path, name: &str, state_dir: &Path) -> Result<InstanceConfig> {
    let bad = |message: String| Error::ConfigFile {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let file: ConfigFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if file.version != CONFIG_VERSION {
        return Err(bad(format!(
            "version {} is not one this vmkit reads (it reads {CONFIG_VERSION})",
            file.version
        )));
    }
    let mut vm = file.vm;
    vm.entry("id")
        .or_insert_with(|| toml::Value::String(name.to_owned()));
    vm.entry("state_dir")
        .or_insert_with(|| toml::Value::String(state_dir.display().to_string()));
    vm.try_into()
        .map_err(|e: toml::de::Error| bad(format!("[vm]: {e}")))
}

/// The flags over whatever the config already says.
fn apply_flags(args: &RunArgs, config: &mut InstanceConfig) -> Result<()> {
    if let Some(kernel) = &args.kernel {
        config.kernel.path = absolute("--kernel", kernel)?;
    }
    if let Some(initrd) = &args.initrd {
        config.kernel.initrd = Some(absolute("--initrd", initrd)?);
    }
    config.kernel.cmdline.extend(args.cmdline.iter().cloned());
    let resources = &mut config.resources;
    if let Some(cpus) = args.cpus {
        resources.boot_vcpus = cpus;
        resources.max_vcpus = resources.max_vcpus.max(cpus);
    }
    if let Some(max) = args.max_cpus {
        resources.max_vcpus = max;
    }
    if let Some(memory) = args.memory {
        resources.memory_mib = memory;
    }
    if let Some(max) = args.max_memory {
        resources.max_memory_mib = Some(max);
        resources.memory_slots = resources.memory_slots.max(2);
    }
    for (i, text) in args.disks.iter().enumerate() {
        config
            .disks
            .push(device_args::disk(text, &format!("disk{i}"))?);
    }
    for (i, text) in args.nics.iter().enumerate() {
        config
            .nics
            .push(device_args::nic(text, &format!("net{i}"))?);
    }
    if let Some(accel) = args.accel {
        config.accel = match accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Hvf => Accel::Hvf,
            AccelArg::Tcg => Accel::Tcg,
        };
    }
    if let Some(transport) = args.transport {
        config.transport = match transport {
            TransportArg::Auto => GuestTransport::Auto { port: AGENT_PORT },
            TransportArg::Vsock => GuestTransport::Vsock {
                cid: None,
                port: AGENT_PORT,
            },
            TransportArg::HybridVsock => GuestTransport::HybridVsock {
                uds: None,
                port: AGENT_PORT,
            },
            TransportArg::VirtioSerial => GuestTransport::VirtioSerial,
        };
    }
    for text in &args.backend_options {
        let (key, value) = device_args::key_value("--backend-option", text)?;
        config
            .backend_options
            .insert(key.to_owned(), value.to_owned());
    }
    if let Some(secs) = args.start_timeout {
        config.timeouts.start = Duration::from_secs(secs);
    }
    Ok(())
}

fn absolute(flag: &str, path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(format!("{flag} {}", path.display()), e))
}
