//! One container: its bundle on the host, the directory the VM shares (the guest's
//! spec and, bound in, the root filesystem), and its processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use containerd_shim_protos::api::CreateTaskRequest;
use sha2::{Digest, Sha256};
use vmkit_process::Command;

use crate::error::{Error, Result};
use crate::mounts;
use crate::process::Proc;
use crate::resize::Ask;
use crate::spec;
use crate::stdio::StdioPaths;

/// crun in the guest image, and its state dir there.
const CRUN: [&str; 3] = ["/usr/bin/crun", "--root", "/run/crun"];
/// The annotation CRI sets on a pod's containers: `sandbox` for its pause container.
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The init process's pid file, in the shared directory.
const PID_FILE: &str = "init.pid";
/// Where a container's shared directory is mounted in the guest (`/<dir>/<id>`).
const GUEST_ROOT: &str = "/containers";

/// 16 hex digits naming `what` (a container or a VM) in tags and state dirs, which are
/// too short for containerd's 76-byte ids.
pub(crate) fn short_key(what: &str) -> String {
    let digest = Sha256::digest(what.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// containerd's ids, as the shim takes them into paths and argv: a letter or digit,
/// then letters, digits, `_`, `.`, `-`; at most 76 bytes.
pub(crate) fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::bad(
            format!("{what} {id:?}"),
            "not a containerd identifier",
        ))
    }
}

/// The bundle's OCI spec.
fn read_spec(op: &str, bundle: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(bundle.join("config.json"))
        .map_err(Error::io(format!("{op}: read the bundle's config.json")))?;
    serde_json::from_slice(&text).map_err(|e| Error::bad(op, format!("config.json: {e}")))
}

/// The container's root filesystem on the host, and whether the shim mounted it:
/// containerd's mounts made at `<bundle>/rootfs`, or the directory the spec names
/// (`ctr run --rootfs DIR`).
fn rootfs_source(
    op: &str,
    bundle: &Path,
    req: &CreateTaskRequest,
    oci: &serde_json::Value,
) -> Result<(PathBuf, bool)> {
    if !req.rootfs.is_empty() {
        let rootfs = bundle.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(Error::io(format!("{op}: create rootfs")))?;
        mounts::mount_all(&req.rootfs, &rootfs)?;
        return Ok((rootfs, true));
    }
    let path = Path::new(oci["root"]["path"].as_str().unwrap_or("rootfs"));
    let source = if path.is_absolute() {
        path.to_owned()
    } else {
        bundle.join(path)
    };
    Ok((source, false))
}

/// `crun run` of container `id`, its pid file and bundle in the shared directory.
/// `--keep`: crun does not delete the container when its process ends, so the exit
/// reaches containerd without waiting for that; `Delete` does it when the VM goes on
/// ([`Container::delete_command`]), and the last container needs none (its VM stops).
fn init_command(id: &str) -> Command {
    Command::new(CRUN.iter().copied().chain([
        "run",
        "--keep",
        "--no-pivot",
        "--pid-file",
        &format!("{GUEST_ROOT}/{id}/{PID_FILE}"),
        "--bundle",
        &format!("{GUEST_ROOT}/{id}"),
        id,
    ]))
}

/// A container the shim holds.
pub(crate) struct Container {
    pub(crate) id: String,
    pub(crate) bundle: PathBuf,
    /// `<bundle>/vmkit`: the share.
    host_dir: PathBuf,
    /// Where the guest mounts it.
    pub(crate) guest_dir: String,
    /// Whether it is a pod's sandbox (pause) container, whose namespaces the pod's
    /// other containers join.
    pub(crate) is_sandbox: bool,
    /// The share's device id and tag.
    pub(crate) share_id: String,
    pub(crate) tag: String,
    /// The rootfs mounts containerd gave (unmounted at the end).
    mounted_rootfs: bool,
    pub(crate) init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// What it asks of the VM: its spec's limits, then its last `Update`'s.
    ask: Mutex<Ask>,
}

impl Container {
    /// Prepares the host side of `req`'s container: mounts its root filesystem, binds
    /// it into the directory the VM will share, and writes the guest's spec there.
    pub(crate) fn prepare(
        namespace: &str,
        req: &CreateTaskRequest,
        sandbox_pid: Option<u32>,
    ) -> Result<Container> {
        check_id("container", &req.id)?;
        let op = format!("create container {}", req.id);
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.is_absolute() {
            return Err(Error::bad(
                &op,
                format!("bundle {:?} is not absolute", req.bundle),
            ));
        }
        let oci = read_spec(&op, &bundle)?;
        let guest_dir = format!("{GUEST_ROOT}/{}", req.id);
        let guest = spec::for_guest(
            &req.id,
            &oci,
            spec::Guest {
                dir: &guest_dir,
                sandbox_pid,
            },
        )?;
        let is_sandbox = oci["annotations"][CONTAINER_TYPE].as_str() == Some("sandbox");

        let (source, mounted_rootfs) = rootfs_source(&op, &bundle, req, &oci)?;
        let host_dir = bundle.join("vmkit");
        let container = Container {
            id: req.id.clone(),
            guest_dir: guest_dir.clone(),
            is_sandbox,
            share_id: format!("c-{}", short_key(&format!("{namespace}/{}", req.id))),
            tag: format!("c{}", short_key(&format!("{namespace}/{}", req.id))),
            init: Arc::new(Proc::new(
                "",
                StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: guest.terminal || req.terminal,
                },
                init_command(&req.id),
                host_dir.join(PID_FILE),
            )),
            host_dir: host_dir.clone(),
            bundle,
            mounted_rootfs,
            execs: Mutex::new(HashMap::new()),
            ask: Mutex::new(Ask::of(&oci["linux"]["resources"])),
        };
        // From here on, what failed is undone by cleanup.
        if let Err(e) = container.fill_share(&op, &source, &guest) {
            container.cleanup_host();
            return Err(e);
        }
        Ok(container)
    }

    /// Lays out the directory the VM shares: the root filesystem `source` bound at
    /// `rootfs`, the spec's host binds at `mounts/<n>`, the guest's `config.json`.
    fn fill_share(&self, op: &str, source: &Path, guest: &spec::GuestSpec) -> Result<()> {
        let dir = &self.host_dir;
        std::fs::create_dir_all(dir.join("rootfs"))
            .map_err(Error::io(format!("{op}: create {}", dir.display())))?;
        mounts::bind(source, &dir.join("rootfs"), false)?;
        for (index, bind) in guest.binds.iter().enumerate() {
            let at = dir.join("mounts").join(index.to_string());
            mounts::bind_placeholder(Path::new(&bind.source), &at)?;
            mounts::bind(Path::new(&bind.source), &at, bind.read_only)?;
        }
        let spec =
            serde_json::to_vec_pretty(&guest.spec).map_err(|e| Error::bad(op, e.to_string()))?;
        std::fs::write(dir.join("config.json"), spec)
            .map_err(Error::io(format!("{op}: write the guest's config.json")))
    }

    /// The directory the VM shares.
    pub(crate) fn host_dir(&self) -> &Path {
        &self.host_dir
    }

    /// Undoes the host side: the bind and containerd's rootfs mounts.
    pub(crate) fn cleanup_host(&self) {
        cleanup_bundle(&self.bundle, self.mounted_rootfs);
    }

    /// The process `exec_id` (empty: the init process).
    pub(crate) fn process(&self, exec_id: &str) -> Result<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs().get(exec_id).cloned().ok_or_else(|| {
            Error::not_found(format!("container {}", self.id), format!("exec {exec_id}"))
        })
    }

    fn execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        self.execs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the exec `exec_id` running `process` (an OCI process spec).
    pub(crate) fn add_exec(
        &self,
        exec_id: &str,
        process: &serde_json::Value,
        stdio: StdioPaths,
    ) -> Result<Arc<Proc>> {
        check_id("exec", exec_id)?;
        let op = format!("exec {exec_id} in container {}", self.id);
        if self.execs().contains_key(exec_id) {
            return Err(Error::state(&op, "the exec id is taken"));
        }
        let guest = spec::process_for_guest(process)?;
        let name = format!("exec-{exec_id}.json");
        let bytes = serde_json::to_vec(&guest.spec).map_err(|e| Error::bad(&op, e.to_string()))?;
        std::fs::write(self.host_dir.join(&name), bytes)
            .map_err(Error::io(format!("{op}: write its process spec")))?;
        let path = format!("{}/{name}", self.guest_dir);
        let pid_file = format!("exec-{exec_id}.pid");
        let guest_pid_file = format!("{}/{pid_file}", self.guest_dir);
        let command = Command::new(CRUN.iter().copied().chain([
            "exec",
            "--pid-file",
            &guest_pid_file,
            "--process",
            &path,
            &self.id,
        ]));
        let stdio = StdioPaths {
            terminal: stdio.terminal || guest.terminal,
            ..stdio
        };
        let proc = Arc::new(Proc::new(
            exec_id,
            stdio,
            command,
            self.host_dir.join(pid_file),
        ));
        self.execs().insert(exec_id.to_owned(), proc.clone());
        Ok(proc)
    }

    /// Forgets the exec `exec_id`.
    pub(crate) fn remove_exec(&self, exec_id: &str) {
        self.execs().remove(exec_id);
        let _ = std::fs::remove_file(self.host_dir.join(format!("exec-{exec_id}.json")));
        let _ = std::fs::remove_file(self.host_dir.join(format!("exec-{exec_id}.pid")));
    }

    /// What it asks of the VM: its spec's limits, then its last `Update`'s.
    pub(crate) fn ask(&self) -> Ask {
        *self
            .ask
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `resources` (OCI `LinuxResources`) as the container's: what it asks of the
    /// VM, and the file `crun update` reads in the guest; returns `crun update`'s
    /// command.
    pub(crate) fn update(&self, resources: &serde_json::Value) -> Result<Command> {
        let op = format!("update container {}", self.id);
        let bytes = serde_json::to_vec(resources).map_err(|e| Error::bad(&op, e.to_string()))?;
        std::fs::write(self.host_dir.join("resources.json"), bytes)
            .map_err(Error::io(format!("{op}: write resources.json")))?;
        *self
            .ask
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Ask::of(resources);
        let path = format!("{}/resources.json", self.guest_dir);
        Ok(Command::new(CRUN.iter().copied().chain([
            "update",
            "--resources",
            &path,
            &self.id,
        ])))
    }

    /// `crun delete --force <id>`, for the guest: what `crun run --keep` left (its state
    /// and cgroup), and any process still in it.
    pub(crate) fn delete_command(&self) -> Command {
        Command::new(
            CRUN.iter()
                .copied()
                .chain(["delete", "--force", self.id.as_str()]),
        )
    }

    /// `crun kill [--all] <id> <signal>`, for the guest.
    pub(crate) fn kill_command(&self, signal: u32, all: bool) -> Command {
        let signal = signal.to_string();
        let mut argv: Vec<&str> = CRUN.to_vec();
        argv.push("kill");
        if all {
            argv.push("--all");
        }
        argv.extend([self.id.as_str(), signal.as_str()]);
        Command::new(argv)
    }

    /// The guest pids of the container's processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.init.pid()];
        pids.extend(self.execs().values().map(|p| p.pid()));
        pids.retain(|p| *p != 0);
        pids
    }
}

/// Unmounts what the shim mounted in `bundle`: everything under `vmkit/` (the
/// rootfs bind and the host binds), and `rootfs` when containerd's mounts were made
/// there. Also what the `delete` subcommand runs after a shim was killed.
pub(crate) fn cleanup_bundle(bundle: &Path, mounted_rootfs: bool) {
    let mut targets = mounts::under(&bundle.join("vmkit"));
    if mounted_rootfs {
        targets.push(bundle.join("rootfs"));
    }
    for target in targets {
        if let Err(e) = mounts::unmount(&target) {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_containerd_identifiers() {
        for ok in ["c1", "a", "0abc_d.e-f", &"x".repeat(76)] {
            assert!(check_id("container", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "../x", "a b", "a\0", &"x".repeat(77)] {
            let err = check_id("container", bad).unwrap_err().to_string();
            assert!(
                err.contains("not a containerd identifier"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn short_keys_are_stable_and_distinct() {
        assert_eq!(short_key("default/c1"), short_key("default/c1"));
        assert_ne!(short_key("default/c1"), short_key("default/c2"));
        assert_eq!(short_key("x").len(), 16);
    }
}
