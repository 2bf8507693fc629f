//! `vmkit demo`: one VM's whole life, step by step, with times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_core::{
    DiskConfig, Instance, InstanceConfig, NicConfig, Registry, StartOptions, StateLayout, VmEvent,
    VmInfo,
};
use vmkit_proto::agent::{ExecRequest, GuestInfoRequest};
use vmkit_proto::{AgentClient, STREAM_PORT, StreamHeader};

/// The demo's settings.
pub(crate) struct Options {
    image_dir: PathBuf,
    nic: bool,
}

impl Options {
    /// The demo of the guest in `image_dir` (default `$VMKIT_IMAGE_DIR`, else
    /// `target/vmkit-image`), with a NIC where one can be made unless `nic` is off.
    pub(crate) fn new(image_dir: Option<PathBuf>, nic: bool) -> Options {
        Options {
            image_dir: image_dir.unwrap_or_else(crate::default_image_dir),
            nic,
        }
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
    announce_accel(step).await?;
    let (vm, layout) = create(opts, work, kernel, initrd, step)?;
    let (info, printer) = boot(vm.as_ref(), step).await?;
    let agent = ask_the_guest(vm.as_ref(), step).await?;
    echo_a_mib(vm.as_ref(), step).await?;
    hot_plug(vm.as_ref(), &agent, step).await?;
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
            layout.vsock_socket().exists() || layout.vhost_user_vsock_socket().exists(),
            "a vsock socket".to_owned(),
        ),
        (
            still_running(&layout.state_dir().display().to_string()),
            "a process of the VM (QEMU or vhost-device-vsock)".to_owned(),
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
    step("nothing left behind: no QEMU or vsock daemon, no socket, no TAP");
    Ok(())
}

/// Says which accelerator `Auto` means here.
async fn announce_accel(step: &impl Fn(&str)) -> Result<(), String> {
    // The backend's defaults: the host's own machine and QEMU. The probe may run QEMU.
    let qemu = vmkit_qemu::QemuOptions::from_map(&Default::default()).map_err(|e| e.to_string())?;
    let accel = tokio::task::spawn_blocking(move || {
        vmkit_qemu::accel::resolve(vmkit_core::Accel::Auto, &qemu)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    step(&format!(
        "accelerator: {accel} (auto; set {}=tcg|kvm to override)",
        vmkit_qemu::accel::ACCEL_ENV
    ));

    Ok(())
}

/// The VM, with a disk and (where a TAP can be made) a NIC; and its state layout.
fn create(
    opts: &Options,
    work: &Path,
    kernel: &Path,
    initrd: &Path,
    step: &impl Fn(&str),
) -> Result<(Box<dyn Instance>, StateLayout), String> {
    let mut config = InstanceConfig::new("demo", work.join("state"), kernel);
    config.kernel.initrd = Some(initrd.to_owned());
    config.resources.max_vcpus = 4;
    config.resources.memory_slots = 2;
    config.resources.max_memory_mib = Some(1024);
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

    Ok((vm, layout))
}

/// Starts the VM (printing its start progress), then pauses and resumes it.
async fn boot(
    vm: &dyn Instance,
    step: &impl Fn(&str),
) -> Result<(VmInfo, tokio::task::JoinHandle<()>), String> {
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

    step("start: vsock daemon, spawn QEMU, connect QMP, wait for the guest agent");
    let began = Instant::now();
    vm.start(StartOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    step(&format!(
        "running after {:.3} s",
        began.elapsed().as_secs_f64()
    ));
    let info = vm.vm_info();
    step(&format!(
        "guest agent answered (guest CID {}, capabilities {})",
        info.cid.map_or_else(|| "-".to_owned(), |c| c.to_string()),
        info.capabilities
    ));

    let began = Instant::now();
    vm.pause().await.map_err(|e| e.to_string())?;
    vm.resume().await.map_err(|e| e.to_string())?;
    step(&format!(
        "paused and resumed in {:.1} ms",
        began.elapsed().as_secs_f64() * 1000.0
    ));

    Ok((info, printer))
}

/// What the guest sees, and `uname -a` run in it; returns the agent client.
async fn ask_the_guest(vm: &dyn Instance, step: &impl Fn(&str)) -> Result<AgentClient, String> {
    let agent = AgentClient::new(vm.client().await.map_err(|e| e.to_string())?);
    let guest = agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .map_err(|e| format!("GuestInfo: {e}"))?;
    let disks: Vec<String> = guest
        .disks
        .iter()
        .map(|d| {
            format!(
                "{} ({} MiB, serial {})",
                d.name,
                d.size_bytes >> 20,
                d.serial
            )
        })
        .collect();
    let nics: Vec<String> = guest
        .nics
        .iter()
        .map(|n| format!("{} {}", n.name, n.mac))
        .collect();
    step(&format!(
        "guest sees: kernel {}, CPUs {:?}, {} MiB, disks [{}], NICs [{}]",
        guest.kernel_release,
        guest.online_cpus,
        guest.mem_total_bytes >> 20,
        disks.join(", "),
        nics.join(", ")
    ));

    let began = Instant::now();
    let mut uname = ExecRequest::new();
    uname.argv = vec!["uname".into(), "-a".into()];
    let out = agent
        .exec(ctx(), &uname)
        .await
        .map_err(|e| format!("Exec uname -a: {e}"))?;
    step(&format!(
        "exec `uname -a` in {:.1} ms: exit {}, {}",
        began.elapsed().as_secs_f64() * 1000.0,
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).trim()
    ));

    Ok(agent)
}

/// 1 MiB through a raw echo stream, byte-exact.
async fn echo_a_mib(vm: &dyn Instance, step: &impl Fn(&str)) -> Result<(), String> {
    let began = Instant::now();
    let raw = vm
        .start_stream(STREAM_PORT)
        .await
        .map_err(|e| e.to_string())?;
    let echo = vmkit_vsock::begin_stream(raw, &StreamHeader::Echo, Duration::from_secs(10), "demo")
        .await
        .map_err(|e| e.to_string())?;
    let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut echo = echo;
    let mut back = Vec::with_capacity(sent.len());
    // 64 KiB at a time, each read back before the next goes: vhost-device-vsock 0.3 can
    // stall when both directions run flat out (docs/guest-communication.md).
    let exchange = async {
        for chunk in sent.chunks(64 << 10) {
            echo.write_all(chunk).await?;
            let mut part = vec![0u8; chunk.len()];
            echo.read_exact(&mut part).await?;
            back.extend_from_slice(&part);
        }
        echo.shutdown().await?;
        echo.read_to_end(&mut Vec::new()).await.map(drop)
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .map_err(|_| "echo stream: no progress for 60 s".to_owned())?
        .map_err(|e| format!("echo stream: {e}"))?;
    if back != sent {
        return Err(format!(
            "echo stream: {} bytes came back for {} sent, or they differ",
            back.len(),
            sent.len()
        ));
    }
    step(&format!(
        "1 MiB echoed byte-exact over a stream in {:.1} ms",
        began.elapsed().as_secs_f64() * 1000.0
    ));
    Ok(())
}

/// A vCPU and 256 MiB hot-plugged, and what the guest then sees.
async fn hot_plug(
    vm: &dyn Instance,
    agent: &AgentClient,
    step: &impl Fn(&str),
) -> Result<(), String> {
    let began = Instant::now();
    match vm.cpu_hotplugger() {
        Some(cpus) => {
            let grown = cpus.set_vcpus(2).await.map_err(|e| e.to_string())?;
            if let Some(failure) = grown.failures.first() {
                return Err(format!(
                    "set_vcpus 2: cpu{}: {}",
                    failure.index, failure.error
                ));
            }
            step(&format!(
                "vCPUs {} -> {} in {:.0} ms (hot-plugged, onlined by the agent)",
                grown.before,
                grown.achieved,
                began.elapsed().as_secs_f64() * 1000.0
            ));
        }
        None => step("vCPU hot-plug: not offered by this instance"),
    }
    let began = Instant::now();
    match vm.memory_hotplugger() {
        Some(memory) => {
            let id = memory
                .hotplug_memory(256)
                .await
                .map_err(|e| e.to_string())?;
            step(&format!(
                "+256 MiB as {id} in {:.0} ms",
                began.elapsed().as_secs_f64() * 1000.0
            ));
        }
        None => step("memory hot-plug: not offered by this instance"),
    }
    let guest = agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .map_err(|e| format!("GuestInfo: {e}"))?;
    step(&format!(
        "guest now sees: CPUs {:?}, {} MiB",
        guest.online_cpus,
        guest.mem_total_bytes >> 20
    ));

    Ok(())
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// Whether a process's command line mentions `needle` (the VM's state dir).
fn still_running(needle: &str) -> bool {
    std::fs::read_dir("/proc").is_ok_and(|dir| {
        dir.flatten().any(|entry| {
            entry.file_name().to_string_lossy().parse::<u32>().is_ok()
                && std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
    })
}
