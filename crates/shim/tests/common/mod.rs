//! A containerd of a test's own, with the shim on its PATH and the shim's config
//! pointing at the test guest.

#![allow(dead_code, unreachable_pub)] // each test binary uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed step should panic

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmkit_testkit::GuestImage;
use vmkit_testkit::qemu::under_ci;

/// One VM-booting test at a time (two cores, TCG).
pub static VMS: Mutex<()> = Mutex::new(());

/// Takes [`VMS`], poisoned or not.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    VMS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A containerd of the test's own.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    bin: PathBuf,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    )
}

/// What the tests need from `cargo xtask containerd` and `cargo xtask image`.
pub struct Parts {
    /// containerd's binaries.
    pub bin: PathBuf,
    /// A busybox root filesystem.
    pub busybox: PathBuf,
    /// The OCI archive of the busybox and pause images.
    pub images: PathBuf,
    /// The test guest.
    pub image: GuestImage,
}

/// The [`Parts`], or `None` (a skip) outside CI when they are missing.
pub fn parts() -> Option<Parts> {
    let from = |var: &str, default: &str| {
        std::env::var_os(var).map_or_else(|| target_dir().join(default), PathBuf::from)
    };
    let bin = from("VMKIT_CONTAINERD_DIR", "vmkit-containerd/root/usr/bin");
    let busybox = from("VMKIT_BUSYBOX_ROOTFS", "vmkit-containerd/busybox-rootfs");
    let images = from("VMKIT_TEST_IMAGES", "vmkit-containerd/images.tar");
    let image = vmkit_testkit::require_guest_image()?;
    let have = bin.join("containerd").is_file()
        && busybox.join("bin/busybox").is_file()
        && images.is_file();
    if !have {
        assert!(
            !under_ci(),
            "containerd, the busybox rootfs or the test images are missing under {}: \
             `cargo xtask test` fetches them (`cargo xtask containerd`)",
            target_dir().join("vmkit-containerd").display()
        );
        eprintln!("note: no containerd here (run `cargo xtask containerd`); skipping");
        return None;
    }
    if !nix_is_root() {
        assert!(!under_ci(), "containerd needs root, and CI runs as root");
        eprintln!("note: containerd needs root; skipping");
        return None;
    }
    Some(Parts {
        bin,
        busybox,
        images,
        image,
    })
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

impl Containerd {
    /// Starts containerd with the shim on its PATH and the shim's config pointing at
    /// the test guest; `cri`: with CRI's plugins, the `vmkit` runtime handler and the
    /// test images' pause image.
    pub fn start(parts: &Parts, cri: bool) -> Containerd {
        let (bin, image) = (&parts.bin, &parts.image);
        let dir = tempfile::tempdir().unwrap();
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
        std::fs::write(d.join("config.toml"), config).unwrap();
        let vm = image.config("template", &d.join("unused"));
        let shim = serde_json::json!({
            "state_root": d.join("vms"),
            "kernel": vm.kernel,
            "resources": vm.resources,
            "accel": vm.accel,
            "timeouts": vm.timeouts,
        });
        std::fs::write(d.join("shim.json"), shim.to_string()).unwrap();
        let child = spawn_containerd(bin, d);
        Containerd {
            dir,
            child,
            bin: bin.to_owned(),
        }
    }

    /// Stops containerd (SIGTERM; its shims live on) and starts it again on the same
    /// config, root and state.
    pub fn restart(&mut self) {
        let _ = nix_kill(self.child.id(), 15);
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().join("c.sock"));
        self.child = spawn_containerd(&self.bin, self.dir.path());
    }

    /// The containerd's own directory (its root and state are under it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Mount points under this containerd's directory.
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.dir.path().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&dir))
            .map(str::to_owned)
            .collect()
    }

    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address").arg(self.dir.path().join("c.sock"));
        cmd
    }

    /// `ctr run <flags> --runtime io.containerd.vmkit.v1 --rootfs <rootfs> <id> <argv…>`.
    pub fn run(&self, flags: &[&str], rootfs: &Path, id: &str, argv: &[&str]) -> Command {
        let mut cmd = self.ctr();
        cmd.arg("run")
            .args(flags)
            .args(["--runtime", "io.containerd.vmkit.v1", "--rootfs"])
            .arg(rootfs)
            .arg(id)
            .args(argv);
        cmd
    }

    /// `ctr task ls`'s line for `id` (`ID PID STATUS`), once its status is `status`.
    pub fn wait_status(&self, id: &str, status: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            let out = self.ctr().args(["task", "ls"]).output().unwrap();
            let line = text(&out.stdout)
                .lines()
                .find(|l| l.split_whitespace().next() == Some(id))
                .map(str::to_owned);
            if let Some(line) = line.filter(|l| l.split_whitespace().nth(2) == Some(status)) {
                return line;
            }
            assert!(
                Instant::now() < until,
                "task {id} not {status} within {within:?}: {}\n{}",
                text(&out.stdout),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// No task, container or shim socket of this containerd is left.
    pub fn assert_empty(&self) {
        let tasks = self.ctr().args(["task", "ls", "-q"]).output().unwrap();
        assert_eq!(text(&tasks.stdout), "", "tasks left");
        let containers = self.ctr().args(["container", "ls", "-q"]).output().unwrap();
        assert_eq!(text(&containers.stdout), "", "containers left");
    }

    /// Imports the test images into `namespace`.
    pub fn import_images(&self, namespace: &str, images: &Path) {
        let out = self
            .ctr()
            .args(["--namespace", namespace, "image", "import"])
            .arg(images)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", show(&out, self));
    }

    /// A copy of the busybox root filesystem the container may write to.
    pub fn rootfs(&self, name: &str, from: &Path) -> PathBuf {
        let to = self.dir.path().join(name);
        let copied = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(copied.success());
        to
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

/// The CRI part of the config: the `vmkit` runtime handler (pods in one VM each) and
/// the test images' pause image as the sandbox image.
const CRI_CONFIG: &str = "
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = 'vmkit.test/pause:1'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.vmkit]
  runtime_type = 'io.containerd.vmkit.v1'
  sandboxer = 'podsandbox'
";

/// Runs containerd on the config in `d`, and waits until it listens.
fn spawn_containerd(bin: &Path, d: &Path) -> Child {
    let shim_dir = Path::new(env!("CARGO_BIN_EXE_containerd-shim-vmkit-v1"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}:{}",
        shim_dir.display(),
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.join("containerd.log"))
        .unwrap();
    let child = Command::new(bin.join("containerd"))
        .arg("--config")
        .arg(d.join("config.toml"))
        .env("PATH", path)
        .env("VMKIT_SHIM_CONFIG", d.join("shim.json"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("containerd runs");
    let until = Instant::now() + Duration::from_secs(30);
    while !d.join("c.sock").exists() {
        assert!(
            Instant::now() < until,
            "containerd did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// `kill -<signal> <pid>`.
pub fn nix_kill(pid: u32, signal: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(") ")
            .next()
            .is_some_and(|rest| !rest.starts_with('Z'))
    })
}

/// Pids of processes whose command line holds `needle`.
pub fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
        })
        .collect()
}

impl Containerd {
    /// The pids of this containerd's shims serving `id` (all its shims: `None`).
    pub fn shims(&self, id: Option<&str>) -> Vec<u32> {
        let address = self.dir.path().join("c.sock").display().to_string();
        pids_with("containerd-shim-vmkit-v1")
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
            nix_kill(shim, 9);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn show(out: &Output, containerd: &Containerd) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        containerd.log()
    )
}
