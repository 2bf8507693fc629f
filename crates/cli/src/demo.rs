//! `vmkit demo`: one VM's whole life, step by step, with times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmkit_core::{DiskConfig, InstanceConfig, NicConfig, Registry, StartOptions, VmEvent};

/// The demo's settings.
pub(crate) struct Options {
    image_dir: PathBuf,
    nic: bool,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options {
            image_dir: std::env::var_os("VMKIT_IMAGE_DIR")
                .map_or_else(|| PathBuf::from("target/vmkit-image"), PathBuf::from),
            nic: true,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--image-dir" => {
                    opts.image_dir = args
                        .next()
                        .map(PathBuf::from)
                        .ok_or("--image-dir needs a directory")?;
                }
                "--no-nic" => opts.nic = false,
                other => return Err(format!("demo: unknown argument {other:?}")),
            }
        }
        Ok(opts)
    }
}

const TAP: &str = "vmkit-demo0";

pub(crate) async fn run(opts: Options) -> Result<(), String> {
    let t0 = Instant::now();
    let step = |what: &str| println!("[{:>7.3} s] {what}", t0.elapsed().as_secs_f64());
    let kernel = opts.image_dir.join("vmlinuz");
    let initrd = opts.image_dir.join("initrd.img");
    if !kernel.is_file() || !initrd.is_file() {
        return Err(format!(
            "no test guest in {} (build it with `cargo xtask image`)",
            opts.image_dir.display()
        ));
    }
    let work = std::env::temp_dir().join(format!("vmkit-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
    let result = run_in(&opts, &work, &kernel, &initrd, &step).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run_in(
    opts: &Options,
    work: &Path,
    kernel: &Path,
    initrd: &Path,
    step: &impl Fn(&str),
) -> Result<(), String> {
    let accel = vmkit_qemu::accel::resolve(vmkit_core::Accel::Auto).map_err(|e| e.to_string())?;
    step(&format!(
        "accelerator: {accel} (auto; set {}=tcg|kvm to override)",
        vmkit_qemu::accel::ACCEL_ENV
    ));

    let mut config = InstanceConfig::new("demo", work.join("state"), kernel);
    config.kernel.initrd = Some(initrd.to_owned());
    config.resources.max_vcpus = 4;
    config.timeouts.start = Duration::from_secs(60);
    let layout = config.layout();
    let vm = Registry::from_inventory()
        .and_then(|r| r.create("qemu", config))
        .map_err(|e| e.to_string())?;

    let disk_path = work.join("data.img");
    std::fs::File::create(&disk_path)
        .and_then(|f| f.set_len(16 << 20))
        .map_err(|e| format!("create {}: {e}", disk_path.display()))?;
    let mut disk = DiskConfig::new("data", &disk_path);
    disk.serial = Some("vmkit-demo".into());
    vm.add_disk(disk).map_err(|e| e.to_string())?;
    step("disk 'data' (16 MiB, serial vmkit-demo) added");
    if opts.nic {
        match vmkit_qemu::probe_tap(TAP) {
            Ok(()) => {
                vm.add_nic(NicConfig::tap("net0", TAP, None))
                    .map_err(|e| e.to_string())?;
                step(&format!(
                    "NIC 'net0' on TAP {TAP} added (created by vmkit, gone with the VM)"
                ));
            }
            Err(e) => step(&format!("no NIC: cannot create TAP {TAP} here ({e})")),
        }
    }

    let mut events = vm.events();
    let printer = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                VmEvent::StartProgress { step, elapsed_ms } => {
                    println!("            start +{elapsed_ms} ms: {step}");
                }
                VmEvent::Exited(_) => break,
                _ => {}
            }
        }
    });

    step("start: spawn QEMU, connect QMP, wait for the guest");
    let began = Instant::now();
    vm.start(StartOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    step(&format!(
        "running after {:.3} s",
        began.elapsed().as_secs_f64()
    ));
    let info = vm.vm_info();
    let console = layout.console_log();
    let ready = std::fs::read_to_string(&console)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VMKIT_READY"))
        .unwrap_or_default()
        .to_owned();
    step(&format!(
        "guest reports: {}",
        ready.trim_start_matches("VMKIT_READY").trim()
    ));

    let began = Instant::now();
    vm.pause().await.map_err(|e| e.to_string())?;
    vm.resume().await.map_err(|e| e.to_string())?;
    step(&format!(
        "paused and resumed in {:.1} ms",
        began.elapsed().as_secs_f64() * 1000.0
    ));

    match vm.client().await {
        Ok(_) => step("guest agent connected"),
        Err(e) => step(&format!("talk to the guest: {e}")),
    }
    if vm.cpu_hotplugger().is_none() {
        step("vCPU hot-plug: not offered by this backend yet (issue 6)");
    }

    let began = Instant::now();
    let exit = vm.shutdown().await.map_err(|e| e.to_string())?;
    step(&format!(
        "shut down in {:.3} s: {:?} by {:?}",
        began.elapsed().as_secs_f64(),
        exit.reason,
        exit.stage
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), printer).await;

    let pid = info.pid.ok_or("the running VM reported no pid")?;
    let leftovers: Vec<String> = [
        (
            Path::new(&format!("/proc/{pid}")).exists(),
            format!("QEMU pid {pid}"),
        ),
        (
            layout.control_socket().exists(),
            "the QMP socket".to_owned(),
        ),
        (
            Path::new(&format!("/sys/class/net/{TAP}")).exists(),
            format!("TAP {TAP}"),
        ),
    ]
    .into_iter()
    .filter_map(|(left, what)| left.then_some(what))
    .collect();
    if !leftovers.is_empty() {
        return Err(format!("left behind: {}", leftovers.join(", ")));
    }
    step("nothing left behind: no QEMU process, no socket, no TAP");
    Ok(())
}
