//! The shim under a real containerd 2.x (Debian sid's, unpacked by `cargo xtask
//! containerd`) on the real test guest: `ctr run` through `io.containerd.vmkit.v1`.
//! Each test starts its own containerd with a private config, root, state and socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmkit_testkit::GuestImage;
use vmkit_testkit::qemu::under_ci;

/// A containerd of the test's own.
struct Containerd {
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

/// containerd's binaries and the busybox root filesystem, or `None` (a skip) outside CI.
fn parts() -> Option<(PathBuf, PathBuf, GuestImage)> {
    let bin = std::env::var_os("VMKIT_CONTAINERD_DIR").map_or_else(
        || target_dir().join("vmkit-containerd/root/usr/bin"),
        PathBuf::from,
    );
    let rootfs = std::env::var_os("VMKIT_BUSYBOX_ROOTFS").map_or_else(
        || target_dir().join("vmkit-containerd/busybox-rootfs"),
        PathBuf::from,
    );
    let image = vmkit_testkit::require_guest_image()?;
    if !bin.join("containerd").is_file() || !rootfs.join("bin/busybox").is_file() {
        assert!(
            !under_ci(),
            "containerd or the busybox rootfs is missing ({} / {}): `cargo xtask test` fetches \
             them (`cargo xtask containerd`)",
            bin.display(),
            rootfs.display()
        );
        eprintln!("note: no containerd here (run `cargo xtask containerd`); skipping");
        return None;
    }
    if !nix_is_root() {
        assert!(!under_ci(), "containerd needs root, and CI runs as root");
        eprintln!("note: containerd needs root; skipping");
        return None;
    }
    Some((bin, rootfs, image))
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

impl Containerd {
    /// Starts containerd with the shim on its PATH and the shim's config pointing at
    /// the test guest.
    fn start(bin: &Path, image: &GuestImage) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = format!(
            "version = 3\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.runtime\", \
             \"io.containerd.cri.v1.images\", \"io.containerd.nri.v1.nri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
        );
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
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
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
        Containerd {
            dir,
            child,
            bin: bin.to_owned(),
        }
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("ctr"));
        cmd.arg("--address").arg(self.dir.path().join("c.sock"));
        cmd
    }

    /// A copy of the busybox root filesystem the container may write to.
    fn rootfs(&self, name: &str, from: &Path) -> PathBuf {
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output, containerd: &Containerd) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        containerd.log()
    )
}

#[test]
fn ctr_run_keeps_stdout_and_stderr_apart_and_passes_the_exit_code_on() {
    let Some((bin, busybox, image)) = parts() else {
        return;
    };
    let containerd = Containerd::start(&bin, &image);
    let rootfs = containerd.rootfs("rootfs1", &busybox);
    let out = containerd
        .ctr()
        .args([
            "run",
            "--rm",
            "--runtime",
            "io.containerd.vmkit.v1",
            "--rootfs",
        ])
        .arg(&rootfs)
        .args(["c1", "/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", show(&out, &containerd));
    assert_eq!(text(&out.stdout), "out\n", "{}", show(&out, &containerd));
    assert_eq!(text(&out.stderr), "err\n", "{}", show(&out, &containerd));
    let left = containerd
        .ctr()
        .args(["task", "ls", "-q"])
        .output()
        .unwrap();
    assert_eq!(text(&left.stdout), "", "no task is left");
}
