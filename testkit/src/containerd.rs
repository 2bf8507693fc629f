//! A containerd of a test's own, for testing a containerd shim (vmkit's, or a
//! downstream runtime's) against the real thing: containerd 2.x as `cargo xtask
//! containerd` unpacks it, with a private config, root, state and socket, the shim on
//! its `PATH`, and the shim's config pointing at the test guest.
//!
//! ```no_run
//! # fn run(shim_dir: &std::path::Path) -> std::io::Result<()> {
//! use vmkit_testkit::containerd::{Containerd, parts};
//! let Some(parts) = parts() else { return Ok(()) }; // skipped outside CI
//! let containerd = Containerd::start(&parts, shim_dir, false)?;
//! containerd
//!     .import_images("default", &parts.images)
//!     .map_err(std::io::Error::other)?;
//! let out = containerd
//!     .ctr()
//!     .args(["run", "--rm", "--runtime", "io.containerd.vmkit.v1"])
//!     .args(["vmkit.test/busybox:1", "c1", "echo", "hi"])
//!     .output()?;
//! assert_eq!(out.stdout, b"hi\n");
//! # Ok(())
//! # }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmkit_core::InstanceConfig;

use crate::guest::{GuestImage, dir_of};
use crate::leaks::processes_mentioning;
use crate::qemu::under_ci;

/// The busybox image of the test images (`/bin/sh` by default, `PATH` set).
pub const BUSYBOX_IMAGE: &str = "vmkit.test/busybox:1";
/// The pause image of the test images: CRI's sandbox image in [`Containerd`]'s config.
pub const PAUSE_IMAGE: &str = "vmkit.test/pause:1";
/// The runtime name containerd knows vmkit's shim by (`containerd-shim-vmkit-v1`).
pub const RUNTIME: &str = "io.containerd.vmkit.v1";

/// What a containerd test needs from `cargo xtask containerd` and `cargo xtask image`.
#[derive(Debug, Clone)]
pub struct Parts {
    /// containerd's binaries (`containerd`, `ctr`, `containerd-shim-runc-v2`):
    /// `$VMKIT_CONTAINERD_DIR`, else `target/vmkit-containerd/root/usr/bin`.
    pub bin: PathBuf,
    /// A busybox root filesystem (`ctr run --rootfs`): `$VMKIT_BUSYBOX_ROOTFS`, else
    /// `target/vmkit-containerd/busybox-rootfs`.
    pub busybox: PathBuf,
    /// The OCI archive of [`BUSYBOX_IMAGE`] and [`PAUSE_IMAGE`]: `$VMKIT_TEST_IMAGES`,
    /// else `target/vmkit-containerd/images.tar`.
    pub images: PathBuf,
    /// The test guest.
    pub image: GuestImage,
}

impl Parts {
    /// The config of VM `id` (state in `state_dir`) that the shim of a
    /// [`Containerd::start`] makes its VMs from: the test guest's, with room to grow by
    /// memory hot-plug (for `Update`'s memory limits).
    pub fn vm_config(&self, id: &str, state_dir: &Path) -> InstanceConfig {
        let mut vm = self.image.config(id, state_dir);
        vm.resources.memory_slots = 4;
        vm.resources.max_memory_mib = Some(vm.resources.memory_mib + 1024);
        vm
    }
}

/// The [`Parts`], or `None` when they are missing (or this is not root, which
/// containerd needs): a skip, which under CI is a panic instead.
pub fn parts() -> Option<Parts> {
    let bin = dir_of("VMKIT_CONTAINERD_DIR", "vmkit-containerd/root/usr/bin");
    let busybox = dir_of("VMKIT_BUSYBOX_ROOTFS", "vmkit-containerd/busybox-rootfs");
    let images = dir_of("VMKIT_TEST_IMAGES", "vmkit-containerd/images.tar");
    let image = crate::guest::require_guest_image()?;
    let have = bin.join("containerd").is_file()
        && busybox.join("bin/busybox").is_file()
        && images.is_file();
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    let missing = match (have, root) {
        (false, _) => {
            "containerd, the busybox rootfs or the test images (`cargo xtask containerd`)"
        }
        (true, false) => "root, which containerd needs",
        (true, true) => {
            return Some(Parts {
                bin,
                busybox,
                images,
                image,
            });
        }
    };
    assert!(!under_ci(), "CI is set but this has no {missing}");
    eprintln!("note: no {missing}; skipping");
    None
}

/// The CRI part of the config: the `vmkit` runtime handler and [`PAUSE_IMAGE`] as the
/// sandbox image.
const CRI_CONFIG: &str = "
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = 'vmkit.test/pause:1'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.vmkit]
  runtime_type = 'io.containerd.vmkit.v1'
  sandboxer = 'podsandbox'
";

/// A containerd of a test's own; killed (with the shims it started) when dropped.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    bin: PathBuf,
    shim_dir: PathBuf,
}

impl Containerd {
    /// Starts containerd with `shim_dir` (where `containerd-shim-vmkit-v1` is) first on
    /// its `PATH` and the shim's config (`$VMKIT_SHIM_CONFIG`) booting the test guest
    /// under TCG, VM state under `<dir>/vms`. `cri`: with CRI's plugins, the `vmkit`
    /// runtime handler and [`PAUSE_IMAGE`]; without, CRI is off (a faster start).
    ///
    /// # Errors
    /// Writing the configs, or containerd not running or not listening within 30 s.
    pub fn start(parts: &Parts, shim_dir: &Path, cri: bool) -> io::Result<Containerd> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let disabled = if cri {
            "[\"io.containerd.nri.v1.nri\"]"
        } else {
            "[\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.runtime\", \
             \"io.containerd.cri.v1.images\", \"io.containerd.nri.v1.nri\"]"
        };
        let mut config = format!(
            "version = 3\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = {disabled}\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
        );
        if cri {
            config.push_str(CRI_CONFIG);
        }
        std::fs::write(d.join("config.toml"), config)?;
        let vm = parts.vm_config("template", &d.join("unused"));
        let shim = serde_json::json!({
            "state_root": d.join("vms"),
            "kernel": vm.kernel,
            "resources": vm.resources,
            "accel": vm.accel,
            "timeouts": vm.timeouts,
        });
        std::fs::write(d.join("shim.json"), shim.to_string())?;
        let child = spawn(&parts.bin, shim_dir, d)?;
        Ok(Containerd {
            dir,
            child,
            bin: parts.bin.clone(),
            shim_dir: shim_dir.to_owned(),
        })
    }

    /// Stops containerd (SIGTERM; its shims live on, as in production) and starts it
    /// again on the same config, root and state.
    ///
    /// # Errors
    /// As [`Containerd::start`].
    pub fn restart(&mut self) -> io::Result<()> {
        signal(self.child.id(), 15);
        self.child.wait()?;
        let _ = std::fs::remove_file(self.socket());
        self.child = spawn(&self.bin, &self.shim_dir, self.dir.path())?;
        Ok(())
    }

    /// Its directory: config, root, state, socket, log, VM state (`vms/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its gRPC socket (CRI clients connect here too).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// `ctr --address <its socket>`.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address").arg(self.socket());
        cmd
    }

    /// `ctr run <flags> --runtime io.containerd.vmkit.v1 --rootfs <rootfs> <id> <argv…>`.
    pub fn run(&self, flags: &[&str], rootfs: &Path, id: &str, argv: &[&str]) -> Command {
        let mut cmd = self.ctr();
        cmd.arg("run")
            .args(flags)
            .args(["--runtime", RUNTIME, "--rootfs"])
            .arg(rootfs)
            .arg(id)
            .args(argv);
        cmd
    }

    /// [`Containerd::run`]'s output, through [`Containerd::output_retrying`].
    ///
    /// # Errors
    /// `ctr` could not be run.
    pub fn run_output(
        &self,
        flags: &[&str],
        rootfs: &Path,
        id: &str,
        argv: &[&str],
    ) -> io::Result<std::process::Output> {
        self.output_retrying(id, || self.run(flags, rootfs, id, argv))
    }

    /// The output of `make()` — a `ctr run` (or `ctr run -d`) of task `id`; a run whose
    /// VM hit vhost-device-vsock 0.3's start fault ([`crate::guest::vsock_daemon_fault`],
    /// about one VM in a hundred) is cleaned up and run once more, as the other real-VM
    /// tests do.
    ///
    /// # Errors
    /// `ctr` could not be run.
    pub fn output_retrying(
        &self,
        id: &str,
        make: impl Fn() -> Command,
    ) -> io::Result<std::process::Output> {
        let out = make().output()?;
        // Both streams: `ctr run -t` under script(1) has its errors on stdout.
        let said = [out.stdout.as_slice(), out.stderr.as_slice()].concat();
        if out.status.success() || !self.met_daemon_fault(id, &said) {
            return Ok(out);
        }
        make().output()
    }

    /// Spawns `make()` — a foreground `ctr run` of task `id`, its stdout and stderr
    /// piped — and returns it once the task is `RUNNING`. A run that ends first because
    /// its VM hit the vsock daemon's start fault is cleaned up and spawned once more (see
    /// [`Containerd::output_retrying`]).
    ///
    /// # Errors
    /// The run ended before its task ran (its status, stderr and containerd's log), or
    /// the task was not running within `within` of a spawn.
    pub fn spawn_running(
        &self,
        id: &str,
        make: impl Fn() -> Command,
        within: Duration,
    ) -> Result<Child, String> {
        let mut retried = false;
        'spawn: loop {
            let mut child = make()
                .spawn()
                .map_err(|e| format!("spawn ctr run {id}: {e}"))?;
            let until = Instant::now() + within;
            loop {
                if self.task_line(id, "RUNNING")?.is_some() {
                    return Ok(child);
                }
                let ended = child
                    .try_wait()
                    .map_err(|e| format!("wait for ctr run {id}: {e}"))?;
                if ended.is_some() {
                    let out = child
                        .wait_with_output()
                        .map_err(|e| format!("ctr run {id}'s output: {e}"))?;
                    if !retried && self.met_daemon_fault(id, &out.stderr) {
                        retried = true;
                        continue 'spawn;
                    }
                    return Err(format!(
                        "ctr run {id} ended ({}) before its task ran: {}\ncontainerd log:\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr),
                        self.log()
                    ));
                }
                if Instant::now() > until {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "task {id} not RUNNING within {within:?}\ncontainerd log:\n{}",
                        self.log()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Whether a `ctr run` of `id` that failed with `stderr` met the vsock daemon's start
    /// fault; if so, what it left is removed (and the test's stderr says so), ready for
    /// the run once more.
    pub fn met_daemon_fault(&self, id: &str, stderr: &[u8]) -> bool {
        if !crate::guest::vsock_daemon_fault(&String::from_utf8_lossy(stderr)) {
            return false;
        }
        eprintln!("note: {id}: the vsock daemon's start fault; running it once more");
        let _ = self.ctr().args(["task", "rm", "-f", id]).output();
        let _ = self.ctr().args(["container", "rm", id]).output();
        true
    }

    /// `ctr task ls`'s line for `id` (`ID PID STATUS`) if its status is `status`.
    fn task_line(&self, id: &str, status: &str) -> Result<Option<String>, String> {
        let listed = self
            .ctr()
            .args(["task", "ls"])
            .output()
            .map_err(|e| format!("ctr task ls: {e}"))?;
        Ok(String::from_utf8_lossy(&listed.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .filter(|l| l.split_whitespace().nth(2) == Some(status))
            .map(str::to_owned))
    }

    /// `ctr task ls`'s line for `id` (`ID PID STATUS`) once its status is `status`.
    ///
    /// # Errors
    /// Not so within `within` (the last listing and containerd's log say why).
    pub fn wait_status(&self, id: &str, status: &str, within: Duration) -> Result<String, String> {
        let until = Instant::now() + within;
        loop {
            if let Some(line) = self.task_line(id, status)? {
                return Ok(line);
            }
            if Instant::now() > until {
                let listed = self.ctr().args(["task", "ls"]).output();
                let listed = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                return Err(format!(
                    "task {id} not {status} within {within:?}: {}\n{}",
                    listed.unwrap_or_else(|e| format!("ctr task ls: {e}")),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tasks and containers of the `default` namespace left, each named.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for what in ["task", "container"] {
            let listed = self.ctr().args([what, "ls", "-q"]).output();
            let listed = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            left.extend(
                listed
                    .unwrap_or_default()
                    .lines()
                    .map(|id| format!("{what} {id}")),
            );
        }
        left
    }

    /// Imports the OCI archive `images` into `namespace` (`k8s.io` for CRI).
    ///
    /// # Errors
    /// `ctr image import` failing, with what it said.
    pub fn import_images(&self, namespace: &str, images: &Path) -> Result<(), String> {
        let out = self
            .ctr()
            .args(["--namespace", namespace, "image", "import"])
            .arg(images)
            .output()
            .map_err(|e| format!("ctr image import: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ctr image import: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A copy of the root filesystem `from` as `<dir>/<name>`, for a container to
    /// write to.
    ///
    /// # Errors
    /// `cp -a` failing.
    pub fn rootfs(&self, name: &str, from: &Path) -> io::Result<PathBuf> {
        let to = self.dir.path().join(name);
        let copied = Command::new("cp").arg("-a").arg(from).arg(&to).status()?;
        if copied.success() {
            Ok(to)
        } else {
            Err(io::Error::other(format!(
                "cp -a {}: {copied}",
                from.display()
            )))
        }
    }

    /// containerd's log (the shims' logs are in it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The mount points under its directory (the bundles are there).
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.dir.path().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&dir))
            .map(str::to_owned)
            .collect()
    }

    /// The pids of the vmkit shims it started serving `id` (all of them: `None`).
    pub fn shims(&self, id: Option<&str>) -> Vec<u32> {
        let address = self.socket().display().to_string();
        processes_mentioning("containerd-shim-vmkit-v1")
            .into_iter()
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                let flag = |name: &str| {
                    args.iter()
                        .position(|a| *a == name.as_bytes())
                        .and_then(|i| args.get(i + 1))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                flag("-address").as_deref() == Some(address.as_str())
                    && id.is_none_or(|id| flag("-id").as_deref() == Some(id))
            })
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A failed test may leave shims (and their VMs) running: they end with it.
        for shim in self.shims(None) {
            signal(shim, 9);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -<signal> <pid>`; whether it was sent.
pub fn signal(pid: u32, signal: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs containerd on the config in `d`, the shims in `shim_dir` and containerd's own
/// binaries first on its `PATH`, and waits until it listens.
fn spawn(bin: &Path, shim_dir: &Path, d: &Path) -> io::Result<Child> {
    let path = format!(
        "{}:{}:{}",
        shim_dir.display(),
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("containerd.log"))?;
    let mut child = Command::new(bin.join("containerd"))
        .arg("--config")
        .arg(d.join("config.toml"))
        .env("PATH", path)
        .env("VMKIT_SHIM_CONFIG", d.join("shim.json"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let until = Instant::now() + Duration::from_secs(30);
    while !d.join("c.sock").exists() {
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("containerd exited: {status}")));
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("containerd did not listen within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}
