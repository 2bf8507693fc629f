//! Waiting inside the guest for hot-plugged CPUs and memory to come online.
//!
//! The host could poll `GuestInfo` over vsock instead, but each look is a round trip
//! and a full sysfs walk; here each look reads two small kernel files every 2 ms.

use std::time::{Duration, Instant};

use vmkit_proto::agent::{WaitResourcesRequest, WaitResourcesResponse};

use crate::info::{meminfo_bytes, parse_cpu_list};
use crate::root::Root;

/// How often the conditions are checked.
const POLL: Duration = Duration::from_millis(2);
/// The guest's own hot-plug helper gets this long first; then the agent onlines what
/// is still offline, and again after each further period.
const ONLINE_EVERY: Duration = Duration::from_millis(100);
/// The longest wait a caller may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The online CPUs and MemTotal (bytes), as the kernel reports them now.
fn look(root: &Root) -> (Vec<u32>, u64) {
    let cpus =
        std::fs::read_to_string(root.path("/sys/devices/system/cpu/online")).unwrap_or_default();
    let meminfo = std::fs::read_to_string(root.path("/proc/meminfo")).unwrap_or_default();
    (parse_cpu_list(&cpus), meminfo_bytes(&meminfo, "MemTotal"))
}

/// Whether `online` and `mem_total` satisfy `req`.
fn reached(req: &WaitResourcesRequest, online: &[u32], mem_total: u64) -> bool {
    req.cpus.iter().all(|c| online.contains(c)) && mem_total >= req.mem_total_at_least
}

/// Whether an onlining failure ("cpu3: …", "memory12: …") concerns `req`.
fn concerns(req: &WaitResourcesRequest, failure: &str) -> bool {
    match failure.split_once(':') {
        Some((name, _)) if name.starts_with("memory") => req.mem_total_at_least > 0,
        Some((name, _)) => name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| req.cpus.contains(&n)),
        None => false,
    }
}

/// Waits until `req` holds (as read under `root`), something fails to come online, or
/// its timeout passes.
pub(crate) async fn wait(req: WaitResourcesRequest, root: Root) -> WaitResourcesResponse {
    let limit = Duration::from_millis(u64::from(req.timeout_ms)).min(MAX_WAIT);
    let began = Instant::now();
    let mut next_online = began + ONLINE_EVERY;
    let mut out = WaitResourcesResponse::new();
    loop {
        // Two small reads; off the runtime threads all the same.
        let look_root = root.clone();
        let (online, mem_total) = tokio::task::spawn_blocking(move || look(&look_root))
            .await
            .unwrap_or_default();
        out.reached = reached(&req, &online, mem_total);
        out.online_cpus = online;
        out.mem_total_bytes = mem_total;
        let now = Instant::now();
        if out.reached || now.duration_since(began) >= limit {
            break;
        }
        if req.online && now >= next_online {
            let wants_cpus = !req.cpus.is_empty();
            let wants_memory = req.mem_total_at_least > 0;
            let done = crate::online::online(&root, wants_cpus, wants_memory).await;
            // Only what this wait is about counts (another CPU may be stuck offline).
            let failures: Vec<String> = done
                .failures
                .into_iter()
                .filter(|f| concerns(&req, f))
                .collect();
            if !failures.is_empty() {
                out.failures = failures;
                break;
            }
            next_online = Instant::now() + ONLINE_EVERY;
        }
        tokio::time::sleep(POLL).await;
    }
    out.waited_ms = u32::try_from(began.elapsed().as_millis()).unwrap_or(u32::MAX);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpus: &[u32], floor: u64) -> WaitResourcesRequest {
        let mut r = WaitResourcesRequest::new();
        r.cpus = cpus.to_vec();
        r.mem_total_at_least = floor;
        r
    }

    #[test]
    fn both_conditions_must_hold() {
        assert!(reached(&req(&[], 0), &[], 0));
        assert!(reached(&req(&[0, 2], 100), &[0, 1, 2], 100));
        assert!(!reached(&req(&[0, 3], 100), &[0, 1, 2], 100));
        assert!(!reached(&req(&[0], 101), &[0, 1, 2], 100));
    }

    #[test]
    fn only_failures_of_what_is_awaited_count() {
        let cpus = req(&[3], 0);
        assert!(concerns(&cpus, "cpu3: write \"1\": EIO"));
        assert!(!concerns(&cpus, "cpu4: write \"1\": EIO"));
        assert!(!concerns(&cpus, "memory9: busy"));
        let memory = req(&[], 1);
        assert!(concerns(&memory, "memory9: busy"));
        assert!(!concerns(&memory, "cpu3: EIO"));
    }
}
