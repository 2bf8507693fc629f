//! Onlining hot-added CPUs and memory blocks that are still offline.

use std::path::Path;

use vmkit_proto::agent::OnlineResourcesResponse;

use crate::info::read_trimmed;
use crate::root::Root;

/// The number in a sysfs name like `cpu3` or `memory12`.
fn index_of(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.parse().ok()
}

async fn entries(dir: std::path::PathBuf, prefix: &str) -> Vec<(u32, std::path::PathBuf)> {
    let mut found = Vec::new();
    if let Ok(mut read) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(entry)) = read.next_entry().await {
            if let Some(n) = index_of(&entry.file_name().to_string_lossy(), prefix) {
                found.push((n, entry.path()));
            }
        }
    }
    found.sort_unstable_by_key(|(n, _)| *n);
    found
}

/// Writes `value` to `path`, naming both in the error.
async fn write(path: &Path, value: &str) -> Result<(), String> {
    tokio::fs::write(path, value)
        .await
        .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// Brings offline CPUs (when `cpus`) and memory blocks (when `memory`, as movable so
/// they can be unplugged again) online, in the sysfs under `root`.
pub(crate) async fn online(root: &Root, cpus: bool, memory: bool) -> OnlineResourcesResponse {
    let mut out = OnlineResourcesResponse::new();
    if cpus {
        for (n, path) in entries(root.path("/sys/devices/system/cpu"), "cpu").await {
            let state = path.join("online");
            // cpu0 usually has no `online` file: it cannot go offline.
            if read_trimmed(&state).await.ok().as_deref() != Some("0") {
                continue;
            }
            match write(&state, "1").await {
                Ok(()) => out.cpus_onlined.push(n),
                // The guest's own hotplug helper may have won the race: fine.
                Err(_) if read_trimmed(&state).await.ok().as_deref() == Some("1") => {}
                Err(e) => out.failures.push(format!("cpu{n}: {e}")),
            }
        }
    }
    if memory {
        for (n, path) in entries(root.path("/sys/devices/system/memory"), "memory").await {
            let state = path.join("state");
            if read_trimmed(&state).await.ok().as_deref() != Some("offline") {
                continue;
            }
            // Movable first (unpluggable later); plain online when the zone forbids it.
            let result = match write(&state, "online_movable").await {
                Ok(()) => Ok(()),
                Err(_) => write(&state, "online").await,
            };
            match result {
                Ok(()) => out.memory_blocks_onlined.push(n),
                // The guest's own hotplug helper may have won the race: fine.
                Err(_) if read_trimmed(&state).await.ok().as_deref() != Some("offline") => {}
                Err(e) => out.failures.push(format!("memory{n}: {e}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_names_give_their_index() {
        assert_eq!(index_of("cpu12", "cpu"), Some(12));
        assert_eq!(index_of("cpufreq", "cpu"), None);
        assert_eq!(index_of("memory3", "memory"), Some(3));
    }
}
