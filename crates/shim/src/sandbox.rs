//! The VM that holds a container, or a pod's containers: booted with the first
//! container's directory as a share, later ones hot-plugged; its agent runs crun.

use std::sync::Arc;
use std::time::Duration;

use vmkit_core::{DeviceConfigurator, DeviceSpec, Instance, ShareConfig, ShareVia, StartOptions};
use vmkit_process::{Command, Filesystem, Mount, Process, Processes};

use crate::config::ShimConfig;
use crate::error::{Error, Result};
use crate::resize::Ask;

/// How long one guest call may take (a mount, a spawn, a `crun kill`).
pub(crate) const CALL: Duration = Duration::from_secs(30);

/// One VM and the guest services the shim uses.
pub(crate) struct Sandbox {
    vm: Arc<dyn Instance>,
    /// vCPUs and MiB the VM booted with, and its vCPU ceiling.
    base: Ask,
    max_vcpus: u32,
    /// Removed when the VM ends.
    state_dir: std::path::PathBuf,
    processes: Processes,
    fs: Filesystem,
}

/// A directory of the host the guest mounts: the share's id and tag.
pub(crate) fn share(id: &str, tag: &str, dir: &std::path::Path) -> ShareConfig {
    ShareConfig {
        via: ShareVia::VirtioFs,
        ..ShareConfig::new(id, tag, dir)
    }
}

impl Sandbox {
    /// Makes the VM `key` (its state in `<state_root>/<key>`) with `first` shared, and
    /// starts it: the agent answered.
    pub(crate) async fn boot(
        config: &ShimConfig,
        key: &str,
        first: ShareConfig,
    ) -> Result<Sandbox> {
        let vm_id = format!("vm{key}");
        let op = format!("start VM {vm_id}");
        let backend = config.backend()?;
        let instance = config.instance(&vm_id, key);
        let state_dir = instance.state_dir.clone();
        let vm: Arc<dyn Instance> = Arc::from(backend.create(instance).map_err(Error::vm(&op))?);
        vm.add_device(DeviceSpec::Share(first))
            .map_err(Error::vm(&op))?;
        if let Err(e) = vm.start(StartOptions::new()).await {
            let _ = vm.shutdown().await;
            let _ = std::fs::remove_dir_all(&state_dir);
            return Err(Error::vm(op)(e));
        }
        Ok(Sandbox {
            base: Ask {
                vcpus: config.resources.boot_vcpus,
                memory_mib: config.resources.memory_mib,
            },
            max_vcpus: config.resources.max_vcpus,
            state_dir,
            processes: Processes::new(vm.clone()),
            fs: Filesystem::new(vm.clone()),
            vm,
        })
    }

    /// Hot-plugs another container's directory.
    pub(crate) async fn add_share(&self, share: ShareConfig) -> Result<()> {
        let op = format!("share {} with the VM", share.path.display());
        self.vm
            .hotplug_device(DeviceSpec::Share(share))
            .await
            .map_err(Error::vm(op))
    }

    /// Unplugs a container's directory.
    pub(crate) async fn remove_share(&self, id: &str) -> Result<()> {
        self.vm
            .unplug(id)
            .await
            .map_err(Error::vm(format!("unplug share {id}")))
    }

    /// Mounts the share `tag` at `target` in the guest.
    pub(crate) async fn mount(&self, tag: &str, target: &str) -> Result<()> {
        self.fs
            .mount(&Mount::share(tag, target).create_target(), CALL)
            .await
            .map_err(Error::guest(format!(
                "mount share {tag} at {target} in the guest"
            )))
    }

    /// Unmounts `target` in the guest.
    pub(crate) async fn unmount(&self, target: &str) -> Result<()> {
        self.fs
            .unmount(target, true, CALL)
            .await
            .map_err(Error::guest(format!("unmount {target} in the guest")))
    }

    /// Starts `cmd` in the guest.
    pub(crate) async fn spawn(&self, cmd: &Command) -> Result<Process> {
        self.processes
            .spawn(cmd, CALL)
            .await
            .map_err(Error::guest(format!("run {:?} in the guest", cmd.argv())))
    }

    /// Runs `cmd` in the guest to its end; its stdout (the first 64 KiB), or its stderr
    /// in the error when it fails.
    pub(crate) async fn run(&self, cmd: &Command) -> Result<String> {
        use tokio::io::AsyncReadExt;
        const KEEP: u64 = 64 << 10;
        let op = format!("{:?} in the guest", cmd.argv());
        let mut process = self.spawn(cmd).await?;
        let stdout = process.take_stdout().map(|out| {
            tokio::spawn(async move {
                let mut kept = Vec::new();
                let mut out = out;
                let _ = (&mut out).take(KEEP).read_to_end(&mut kept).await;
                let _ = tokio::io::copy(&mut out, &mut tokio::io::sink()).await;
                kept
            })
        });
        let mut message = String::new();
        if let Some(mut err) = process.take_stderr() {
            let _ = tokio::time::timeout(CALL, (&mut err).take(KEEP).read_to_string(&mut message))
                .await;
            let _ =
                tokio::time::timeout(CALL, tokio::io::copy(&mut err, &mut tokio::io::sink())).await;
        }
        let status = process.wait(CALL).await.map_err(Error::guest(&op))?;
        let kept = match stdout {
            Some(task) => task.await.unwrap_or_default(),
            None => Vec::new(),
        };
        if status.success() {
            Ok(String::from_utf8_lossy(&kept).into_owned())
        } else {
            Err(Error::state(op, format!("{status}: {}", message.trim())))
        }
    }

    /// Sizes the VM for its containers' `asks` on top of its base: vCPUs to the sum
    /// (at most its ceiling), memory grown by hot-plug (never shrunk: a guest rarely
    /// gives memory back).
    pub(crate) async fn resize(&self, asks: Ask) -> Result<()> {
        let vcpus = self
            .base
            .vcpus
            .saturating_add(asks.vcpus)
            .min(self.max_vcpus);
        let op = format!("resize the VM to {vcpus} vCPUs");
        let cpus = self
            .vm
            .cpu_hotplugger()
            .ok_or_else(|| Error::unsupported(&op, "the backend cannot change vCPUs"))?;
        let resized = cpus.set_vcpus(vcpus).await.map_err(Error::vm(&op))?;
        if let Some(failure) = resized.failures.first() {
            return Err(Error::state(
                op,
                format!("vCPU {}: {}", failure.index, failure.error),
            ));
        }
        if asks.memory_mib == 0 {
            return Ok(());
        }
        let want = self.base.memory_mib.saturating_add(asks.memory_mib);
        let op = format!("grow the VM's memory to {want} MiB");
        let memory = self.vm.memory_hotplugger().ok_or_else(|| {
            Error::unsupported(
                &op,
                "the VM cannot grow its memory (the shim config's resources give it \
                     no room: memory_slots and max_memory_mib; or the backend cannot)",
            )
        })?;
        let now = memory.query_memory().await.map_err(Error::vm(&op))?;
        let have = now.base_mib + now.plugged_mib;
        if want > have {
            memory
                .hotplug_memory(want - have)
                .await
                .map_err(Error::vm(op))?;
        }
        Ok(())
    }

    /// The VMM's process id on the host (what containerd shows as the task's pid).
    pub(crate) fn pid(&self) -> u32 {
        self.vm.vm_info().pid.unwrap_or(0)
    }

    /// Stops the VM and removes its state dir (its logs too): it leaves nothing behind.
    pub(crate) async fn shutdown(&self) {
        if let Err(e) = self.vm.shutdown().await {
            log::warn!("shut the VM down: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.state_dir) {
            log::warn!(
                "remove the VM's state dir {}: {e}",
                self.state_dir.display()
            );
        }
    }
}
