//! `Update`'s resources as VM size: a container's CPU quota asks for vCPUs, its
//! memory limit for memory, on top of what the VM boots with — the way Kata sizes a
//! sandbox. The VM grows by hot-plug; crun applies the limits to the container's
//! cgroup in the guest.

use serde_json::Value;

/// The guest's memory block: hot-plugged memory comes in multiples of it (x86).
const BLOCK_MIB: u64 = 128;

/// What one container asks of the VM beyond its base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ask {
    /// vCPUs: the CPU quota over the period, rounded up.
    pub(crate) vcpus: u32,
    /// MiB: the memory limit, rounded up to whole memory blocks.
    pub(crate) memory_mib: u64,
}

impl Ask {
    /// What OCI `LinuxResources` (as JSON) ask for; nothing for what they leave out.
    pub(crate) fn of(resources: &Value) -> Ask {
        let quota = resources["cpu"]["quota"].as_i64().filter(|q| *q > 0);
        let period = resources["cpu"]["period"]
            .as_u64()
            .filter(|p| *p > 0)
            .unwrap_or(100_000);
        let vcpus = quota.map_or(0, |q| q.unsigned_abs().div_ceil(period));
        let limit = resources["memory"]["limit"].as_i64().filter(|l| *l > 0);
        let memory_mib = limit.map_or(0, |l| {
            let mib = l.unsigned_abs().div_ceil(1 << 20);
            mib.div_ceil(BLOCK_MIB) * BLOCK_MIB
        });
        Ask {
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
            memory_mib,
        }
    }

    /// The sum of `asks`.
    pub(crate) fn total<'a>(asks: impl IntoIterator<Item = &'a Ask>) -> Ask {
        asks.into_iter().fold(Ask::default(), |sum, a| Ask {
            vcpus: sum.vcpus.saturating_add(a.vcpus),
            memory_mib: sum.memory_mib.saturating_add(a.memory_mib),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn quota_over_period_rounds_up_to_vcpus() {
        let ask = |cpu: Value| Ask::of(&json!({ "cpu": cpu })).vcpus;
        assert_eq!(ask(json!({"quota": 200000, "period": 100000})), 2);
        assert_eq!(ask(json!({"quota": 150000, "period": 100000})), 2);
        assert_eq!(
            ask(json!({"quota": 50000})),
            1,
            "the default period is 100 ms"
        );
        assert_eq!(ask(json!({"quota": -1, "period": 100000})), 0, "no limit");
        assert_eq!(ask(json!({"shares": 1024})), 0);
        assert_eq!(Ask::of(&json!({})), Ask::default());
    }

    #[test]
    fn memory_limits_round_up_to_whole_blocks() {
        let ask = |limit: i64| Ask::of(&json!({"memory": {"limit": limit}})).memory_mib;
        assert_eq!(ask(1 << 20), 128);
        assert_eq!(ask(256 << 20), 256);
        assert_eq!(ask((256 << 20) + 1), 384);
        assert_eq!(ask(-1), 0);
        let sum = Ask::total(&[
            Ask {
                vcpus: 1,
                memory_mib: 128,
            },
            Ask {
                vcpus: 2,
                memory_mib: 0,
            },
        ]);
        assert_eq!(
            sum,
            Ask {
                vcpus: 3,
                memory_mib: 128
            }
        );
    }
}
