//! What the guest sees, read from /proc and /sys.

use std::path::Path;

use vmkit_proto::agent::{BlockDevice, GuestInfoResponse, NetInterface};

/// Reads a small kernel file, trimmed.
pub(crate) async fn read_trimmed(path: impl AsRef<Path>) -> std::io::Result<String> {
    Ok(tokio::fs::read_to_string(path).await?.trim().to_owned())
}

/// Milliseconds since boot (`CLOCK_BOOTTIME`): a clock read, no file I/O, so `Ping`
/// stays a pure round trip.
pub(crate) fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let ms = u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000;
        secs * 1000 + ms
    })
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
fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The memory block size (bytes) and the number of online blocks.
pub(crate) async fn memory_blocks() -> (u64, u64) {
    let base = Path::new("/sys/devices/system/memory");
    let block = read_trimmed(base.join("block_size_bytes"))
        .await
        .ok()
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or(0);
    let mut online = 0;
    if let Ok(mut dir) = tokio::fs::read_dir(base).await {
        while let Ok(Some(entry)) = dir.next_entry().await {
            if entry.file_name().to_string_lossy().starts_with("memory")
                && read_trimmed(entry.path().join("online"))
                    .await
                    .ok()
                    .as_deref()
                    == Some("1")
            {
                online += 1;
            }
        }
    }
    (block, online)
}

async fn disks() -> Vec<BlockDevice> {
    let mut disks = Vec::new();
    let Ok(mut dir) = tokio::fs::read_dir("/sys/block").await else {
        return disks;
    };
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") && !name.starts_with("sd") && !name.starts_with("nvme") {
            continue;
        }
        let path = entry.path();
        let sectors: u64 = read_trimmed(path.join("size"))
            .await
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut disk = BlockDevice::new();
        disk.serial = read_trimmed(path.join("serial")).await.unwrap_or_default();
        disk.size_bytes = sectors * 512;
        disk.read_only = read_trimmed(path.join("ro")).await.ok().as_deref() == Some("1");
        disk.name = name;
        disks.push(disk);
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

async fn nics() -> Vec<NetInterface> {
    let mut nics = Vec::new();
    let Ok(mut dir) = tokio::fs::read_dir("/sys/class/net").await else {
        return nics;
    };
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let mut nic = NetInterface::new();
        nic.mac = read_trimmed(entry.path().join("address"))
            .await
            .unwrap_or_default();
        nic.name = name;
        nics.push(nic);
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// Everything [`GuestInfoResponse`] carries.
pub(crate) async fn guest_info() -> GuestInfoResponse {
    let mut info = GuestInfoResponse::new();
    info.kernel_release = read_trimmed("/proc/sys/kernel/osrelease")
        .await
        .unwrap_or_default();
    info.kernel_version = read_trimmed("/proc/sys/kernel/version")
        .await
        .unwrap_or_default();
    info.online_cpus = parse_cpu_list(
        &read_trimmed("/sys/devices/system/cpu/online")
            .await
            .unwrap_or_default(),
    );
    let meminfo = tokio::fs::read_to_string("/proc/meminfo")
        .await
        .unwrap_or_default();
    info.mem_total_bytes = meminfo_bytes(&meminfo, "MemTotal");
    let (block, online) = memory_blocks().await;
    info.memory_block_size_bytes = block;
    info.mem_online_bytes = block * online;
    info.uptime_ms = uptime_ms();
    info.disks = disks().await;
    info.nics = nics().await;
    info
}

#[cfg(test)]
mod tests {
    use super::*;

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
