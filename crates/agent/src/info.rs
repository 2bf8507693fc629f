//! What the guest sees, read from /proc and /sys. The reads are plain `std::fs` calls
//! made on one blocking-pool thread per request (procfs and sysfs answer from memory):
//! one hop instead of one per file, which matters in an emulated guest.

use std::path::Path;

use vmkit_proto::agent::{BlockDevice, CpuPlace, FsDevice, GuestInfoResponse, NetInterface};

use crate::root::Root;

/// Reads a small kernel file, trimmed (async, for the agent's other callers).
pub(crate) async fn read_trimmed(path: impl AsRef<Path>) -> std::io::Result<String> {
    Ok(tokio::fs::read_to_string(path).await?.trim().to_owned())
}

/// Reads a small kernel file, trimmed.
fn read_sync(path: impl AsRef<Path>) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// Milliseconds since boot: a clock read, no file I/O, so `Ping` stays a pure round
/// trip.
pub(crate) fn uptime_ms() -> u64 {
    vmkit_platform::system::uptime_ms()
}

/// Parses a kernel CPU list ("0-2,5") into ascending numbers; malformed parts are
/// skipped.
pub(crate) fn parse_cpu_list(text: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>())
                    && a <= b
                    && b - a < 65_536
                {
                    cpus.extend(a..=b);
                }
            }
            None => {
                if let Ok(n) = part.parse() {
                    cpus.push(n);
                }
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// A value in kB from /proc/meminfo, in bytes.
pub(crate) fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The memory block size (bytes) and the number of online blocks.
fn memory_blocks(root: &Root) -> (u64, u64) {
    let base = root.path("/sys/devices/system/memory");
    let block = read_sync(base.join("block_size_bytes"))
        .ok()
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or(0);
    let mut online = 0;
    if let Ok(dir) = std::fs::read_dir(base) {
        for entry in dir.flatten() {
            if entry.file_name().to_string_lossy().starts_with("memory")
                && read_sync(entry.path().join("online")).ok().as_deref() == Some("1")
            {
                online += 1;
            }
        }
    }
    (block, online)
}

fn disks(root: &Root) -> Vec<BlockDevice> {
    let mut disks = Vec::new();
    let Ok(dir) = std::fs::read_dir(root.path("/sys/block")) else {
        return disks;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") && !name.starts_with("sd") && !name.starts_with("nvme") {
            continue;
        }
        let path = entry.path();
        let sectors: u64 = read_sync(path.join("size"))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut disk = BlockDevice::new();
        disk.serial = read_sync(path.join("serial")).unwrap_or_default();
        disk.size_bytes = sectors * 512;
        disk.read_only = read_sync(path.join("ro")).ok().as_deref() == Some("1");
        disk.name = name;
        disks.push(disk);
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

fn nics(root: &Root) -> Vec<NetInterface> {
    let mut nics = Vec::new();
    let Ok(dir) = std::fs::read_dir(root.path("/sys/class/net")) else {
        return nics;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let mut nic = NetInterface::new();
        nic.mac = read_sync(entry.path().join("address")).unwrap_or_default();
        nic.name = name;
        nics.push(nic);
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// The virtio status bit a driver sets once the device is live.
const VIRTIO_DRIVER_OK: u32 = 4;

/// Whether the virtio device at `dir` has DRIVER_OK in its status (`0x0000000f`).
fn driver_ok(dir: &Path) -> bool {
    read_sync(dir.join("status"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .is_some_and(|status| status & VIRTIO_DRIVER_OK != 0)
}

/// The virtio devices bound to the virtio-fs and 9p drivers, by name.
fn fs_devices(root: &Root) -> Vec<FsDevice> {
    let mut found = Vec::new();
    for (driver, tag_file) in [("virtiofs", "tag"), ("9pnet_virtio", "mount_tag")] {
        let dir = root.path(&format!("/sys/bus/virtio/drivers/{driver}"));
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Listed once its driver has finished with it: the driver links the device
            // before its probe runs, and sets DRIVER_OK in the virtio status near the
            // probe's end (virtio-fs right before it registers the tag).
            if !name.starts_with("virtio") || !driver_ok(&entry.path()) {
                continue;
            }
            let mut device = FsDevice::new();
            // 9p's mount_tag may end in NULs.
            device.tag = read_sync(entry.path().join(tag_file))
                .map(|t| t.trim_end_matches('\0').to_owned())
                .unwrap_or_default();
            device.driver = driver.to_owned();
            device.name = name;
            found.push(device);
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Where CPU `cpu` sits (`cpuN/topology`): its package, core, and its position among its
/// thread siblings. `None` when the kernel does not say.
fn cpu_place(root: &Root, cpu: u32) -> Option<CpuPlace> {
    let dir = root.path(&format!("/sys/devices/system/cpu/cpu{cpu}/topology"));
    let number = |file: &str| read_sync(dir.join(file)).ok()?.parse::<u32>().ok();
    let siblings = parse_cpu_list(&read_sync(dir.join("thread_siblings_list")).ok()?);
    let mut place = CpuPlace::new();
    place.cpu = cpu;
    place.socket = number("physical_package_id")?;
    place.core = number("core_id")?;
    place.thread = u32::try_from(siblings.iter().position(|&s| s == cpu)?).ok()?;
    Some(place)
}

/// Everything [`GuestInfoResponse`] carries.
fn guest_info_sync(root: &Root) -> GuestInfoResponse {
    let mut info = GuestInfoResponse::new();
    info.kernel_release = read_sync(root.path("/proc/sys/kernel/osrelease")).unwrap_or_default();
    info.kernel_version = read_sync(root.path("/proc/sys/kernel/version")).unwrap_or_default();
    info.online_cpus =
        parse_cpu_list(&read_sync(root.path("/sys/devices/system/cpu/online")).unwrap_or_default());
    info.online_places = info
        .online_cpus
        .iter()
        .filter_map(|&cpu| cpu_place(root, cpu))
        .collect();
    let meminfo = std::fs::read_to_string(root.path("/proc/meminfo")).unwrap_or_default();
    info.mem_total_bytes = meminfo_bytes(&meminfo, "MemTotal");
    let (block, online) = memory_blocks(root);
    info.memory_block_size_bytes = block;
    info.mem_online_bytes = block * online;
    info.uptime_ms = uptime_ms();
    info.disks = disks(root);
    info.nics = nics(root);
    info.fs_devices = fs_devices(root);
    info
}

/// Everything [`GuestInfoResponse`] carries, read under `root` on the blocking pool.
pub(crate) async fn guest_info(root: Root) -> GuestInfoResponse {
    tokio::task::spawn_blocking(move || guest_info_sync(&root))
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_directory_devices_are_listed_with_their_tags() {
        let dir = tempfile::tempdir().unwrap();
        let drivers = dir.path().join("sys/bus/virtio/drivers");
        let nine = drivers.join("9pnet_virtio/virtio4");
        let fs = drivers.join("virtiofs/virtio2");
        std::fs::create_dir_all(&nine).unwrap();
        std::fs::create_dir_all(&fs).unwrap();
        std::fs::create_dir_all(drivers.join("virtiofs/bind")).unwrap();
        std::fs::write(nine.join("mount_tag"), b"data\0").unwrap();
        std::fs::write(nine.join("status"), "0x0000000f\n").unwrap();
        std::fs::write(fs.join("status"), "0x0000000f\n").unwrap();
        // Bound but not live yet: not listed.
        let probing = drivers.join("virtiofs/virtio5");
        std::fs::create_dir_all(&probing).unwrap();
        std::fs::write(probing.join("status"), "0x00000003\n").unwrap();
        let root = Root::at(dir.path());
        let found: Vec<(String, String, String)> = fs_devices(&root)
            .into_iter()
            .map(|d| (d.name, d.driver, d.tag))
            .collect();
        assert_eq!(
            found,
            [
                ("virtio2".into(), "virtiofs".into(), String::new()),
                ("virtio4".into(), "9pnet_virtio".into(), "data".into()),
            ]
        );
    }

    #[test]
    fn a_cpu_place_comes_from_its_sysfs_topology() {
        let dir = tempfile::tempdir().unwrap();
        let topo = dir.path().join("sys/devices/system/cpu/cpu1/topology");
        std::fs::create_dir_all(&topo).unwrap();
        // cpu1 is the guest's number for the vCPU QEMU put in core 2 (plugged out of
        // order), the second thread of its core.
        for (file, text) in [
            ("physical_package_id", "0\n"),
            ("core_id", "2\n"),
            ("thread_siblings_list", "0-1\n"),
        ] {
            std::fs::write(topo.join(file), text).unwrap();
        }
        let root = Root::at(dir.path());
        let place = cpu_place(&root, 1).unwrap();
        assert_eq!(
            (place.cpu, place.socket, place.core, place.thread),
            (1, 0, 2, 1)
        );
        assert!(cpu_place(&root, 0).is_none(), "no topology, no place");
    }

    #[test]
    fn cpu_lists_parse_like_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0\n"), [0]);
        assert_eq!(parse_cpu_list("0-3,5,7-8"), [0, 1, 2, 3, 5, 7, 8]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        assert_eq!(
            parse_cpu_list("3-1,x,2"),
            [2],
            "malformed parts are skipped"
        );
    }

    #[test]
    fn meminfo_values_are_bytes() {
        let text = "MemTotal:         242052 kB\nMemFree:          200000 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal"), 242_052 * 1024);
        assert_eq!(meminfo_bytes(text, "Missing"), 0);
    }
}
