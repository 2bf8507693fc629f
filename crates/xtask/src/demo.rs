//! `cargo xtask demo`: installs only what the demo needs (QEMU; the guest channel is
//! virtio-serial, so no vsock daemon), builds the test guest and the `vmkit` command,
//! then drives that command as a user would — check the host, run a VM detached with a
//! disk, exec in it, hot-plug a vCPU and memory, pause and resume, stop, remove — and
//! checks that no process is left.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::{image, install, run};

/// Runs the demo; `args` go to `vmkit run` (e.g. `--accel tcg`).
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let began = Instant::now();
    install::ensure_demo()?;
    // The command builds while the guest's agent does (different profiles: no crate is
    // built twice by the pair).
    let cli = run::beside(
        "build the vmkit command",
        run::cargo().args(["build", "--locked", "-p", "vmkit-cli", "--bin", "vmkit"]),
        run::target_dir().join("demo-build.log"),
    )?;
    let image = image::ensure_image(image::GuestArch::X86_64)?;
    cli.finish()?;
    let vmkit = run::target_dir().join("debug/vmkit");
    let work = std::env::temp_dir().join(format!("vmkit-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
    let demo = Demo {
        vmkit,
        image,
        runtime: work.join("rt"),
    };
    let result = demo.show(&work, args);
    if result.is_err() {
        // Whatever failed, the VM does not outlive the demo.
        let _ = demo.vmkit(&["rm", "-f", "demo"]).output();
    }
    let left = processes_naming(&work);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    if !left.is_empty() {
        return Err(format!("processes left behind: {left:?}"));
    }
    println!(
        "==> demo: done in {:.1} s, build included; nothing left behind",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Demo {
    vmkit: PathBuf,
    image: PathBuf,
    runtime: PathBuf,
}

impl Demo {
    fn vmkit(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vmkit);
        cmd.env("VMKIT_IMAGE_DIR", &self.image)
            .env("VMKIT_RUNTIME_DIR", &self.runtime)
            .args(args);
        cmd
    }

    fn step(&self, args: &[&str]) -> Result<(), String> {
        run::step(&format!("vmkit {}", args[0]), &mut self.vmkit(args))
    }

    fn show(&self, work: &Path, extra: &[String]) -> Result<(), String> {
        let disk = work.join("data.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(16 << 20))
            .map_err(|e| format!("create {}: {e}", disk.display()))?;
        let disk_spec = format!("{},id=data,serial=vmkit-demo", disk.display());
        self.step(&["check"])?;
        let mut start = vec![
            "run",
            "--detach",
            "--name",
            "demo",
            "--transport",
            "virtio-serial",
            "--disk",
            &disk_spec,
        ];
        start.extend(extra.iter().map(String::as_str));
        self.step(&start)?;
        self.step(&["ps"])?;
        self.step(&["exec", "demo", "--", "uname", "-a"])?;
        self.step(&[
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "echo vCPUs: $(nproc); grep MemTotal /proc/meminfo; \
             echo disk serial: $(cat /sys/block/vda/serial)",
        ])?;
        self.step(&["hotplug", "demo", "cpu", "2"])?;
        self.step(&["hotplug", "demo", "memory", "256"])?;
        self.step(&[
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "echo vCPUs: $(nproc); grep MemTotal /proc/meminfo",
        ])?;
        self.step(&["pause", "demo"])?;
        self.step(&["resume", "demo"])?;
        self.step(&["stop", "demo"])?;
        self.step(&["ps"])?;
        self.step(&["rm", "demo"])
    }
}

/// Processes whose command line names `dir` (the VM's QEMU would).
fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}
