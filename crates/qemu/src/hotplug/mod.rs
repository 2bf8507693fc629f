//! Hot-plug: one queue per VM ([`Queue`]), and on it vCPU hot-plug ([`Cpus`]), memory
//! hot-plug as DIMMs or through virtio-mem ([`Memory`]), and disk and NIC hot-plug
//! ([`add_disk`], [`add_nic`], [`remove_device`]).
//!
//! Every hot-plug call on a VM runs as a job on the VM's queue, one after another (a
//! queue, not a lock held across QMP calls). A job ends early with a clear error when
//! the VM starts shutting down or is gone.

mod cpu;
mod devices;
mod memory;
mod virtio_mem;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, sleep};
use vmkit_core::{Error as CoreError, VmEvent, VmState};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{WaitResourcesRequest, WaitResourcesResponse};

pub(crate) use cpu::Cpus;
pub(crate) use devices::{HotDevice, add_disk, add_nic, remove_device};
pub(crate) use memory::Memory;
pub(crate) use virtio_mem::Grant;

use crate::error::Error;
use crate::instance::Shared;

/// How often the guest or QEMU is asked again while waiting.
const POLL: Duration = Duration::from_millis(10);
/// Bytes in a MiB.
const MIB: u64 = 1 << 20;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The VM's hot-plug queue; its worker task starts with the first job.
#[derive(Default)]
pub(crate) struct Queue {
    tx: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl Queue {
    fn sender(&self) -> &mpsc::UnboundedSender<Job> {
        self.tx.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    job.await;
                }
            });
            tx
        })
    }

    /// Runs `work` after the jobs queued before it. It ends with an error naming `op`
    /// when the VM begins shutting down first.
    pub(crate) async fn run<T, F>(
        &self,
        shared: &Arc<Shared>,
        op: String,
        work: F,
    ) -> vmkit_core::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = vmkit_core::Result<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let mut stopping = shared.cancel.subscribe();
        let job_op = op.clone();
        let job: Job = Box::pin(async move {
            let result = tokio::select! {
                result = work => result,
                _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) } => {
                    Err(CoreError::backend(job_op, Error::ShuttingDown))
                }
            };
            let _ = reply.send(result);
        });
        if self.sender().send(job).is_err() {
            return Err(CoreError::backend(op, Error::ShuttingDown));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(CoreError::backend(op, Error::ShuttingDown)))
    }
}

/// The VM behind a hot-plugger; a dropped instance counts as shut down.
fn upgrade(shared: &Weak<Shared>, op: &'static str) -> vmkit_core::Result<Arc<Shared>> {
    shared.upgrade().ok_or(CoreError::InvalidState {
        op,
        state: VmState::Shutdown,
    })
}

fn qmp_err(op: &str, e: vmkit_qmp::Error) -> CoreError {
    CoreError::backend(op.to_owned(), Error::Qmp(e))
}

fn agent_err(op: &str, call: &'static str, e: &ttrpc::Error) -> CoreError {
    CoreError::backend(
        op.to_owned(),
        Error::Agent {
            call,
            cause: e.to_string(),
        },
    )
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(10_000_000_000)
}

/// Runs the QMP query `command` and reads its answer as `T`.
async fn qmp_query<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    op: &str,
    command: &str,
) -> vmkit_core::Result<T> {
    let qmp = shared.qmp("hotplug")?;
    let value = qmp
        .execute_raw(command, None)
        .await
        .map_err(|e| qmp_err(op, e))?;
    serde_json::from_value(value).map_err(|e| {
        CoreError::backend(
            op.to_owned(),
            Error::QmpAnswer {
                command: command.to_owned(),
                reason: e.to_string(),
            },
        )
    })
}

/// Has the agent wait inside the guest until `req` holds, onlining what is still
/// offline as it goes, within `limit`. A timeout names `what` was awaited; an onlining
/// failure comes back with the guest's reason.
async fn wait_in_guest(
    agent: &AgentClient,
    op: &str,
    what: &str,
    mut req: WaitResourcesRequest,
    limit: Duration,
) -> vmkit_core::Result<WaitResourcesResponse> {
    req.online = true;
    req.timeout_ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
    // The call's own deadline leaves the agent time to answer after its wait ends.
    let call_limit = limit + Duration::from_secs(10);
    let ctx =
        ttrpc::context::with_timeout(i64::try_from(call_limit.as_nanos()).unwrap_or(i64::MAX));
    let resp = agent
        .wait_resources(ctx, &req)
        .await
        .map_err(|e| agent_err(op, "WaitResources", &e))?;
    if !resp.failures.is_empty() {
        return Err(CoreError::backend(
            op.to_owned(),
            Error::Agent {
                call: "WaitResources",
                cause: resp.failures.join("; "),
            },
        ));
    }
    if !resp.reached {
        return Err(CoreError::Timeout {
            op: format!("{op}: {what}"),
            after: limit,
        });
    }
    Ok(resp)
}

/// The `_OST` source code of an eject request (ACPI 6.5, 6.3.5).
const OST_EJECT_REQUEST: u64 = 0x03;
/// The `_OST` status "ejection is in progress": not an answer yet.
const OST_EJECT_IN_PROGRESS: u64 = 0x84;

/// The guest's refusal to eject device `id`, when `event` is one: an `ACPI_DEVICE_OST`
/// answering an eject request with a failure status.
fn ost_refusal(event: &VmEvent, id: &str) -> Option<Error> {
    let VmEvent::Other { name, data } = event else {
        return None;
    };
    let info = data.get("info")?;
    if name != "ACPI_DEVICE_OST"
        || info.get("device")?.as_str()? != id
        || info.get("source")?.as_u64()? != OST_EJECT_REQUEST
    {
        return None;
    }
    let status = info.get("status")?.as_u64()?;
    let meaning = match status {
        0 | OST_EJECT_IN_PROGRESS => return None,
        0x01 => "non-specific failure",
        0x02 => "unrecognized notify code",
        0x80 => {
            "ejection not supported by the guest: its ACPI hot-plug is off or cannot remove this device"
        }
        0x81 => "device in use by an application",
        0x82 => "device busy",
        0x83 => "an ejection dependency is busy or cannot be ejected",
        _ => "a status the ACPI specification does not define",
    };
    Some(Error::GuestRefusedEject { status, meaning })
}

/// Runs `device_del` on `id`, then waits until `gone` reports it gone, asking every
/// [`POLL`] within `timeouts.hotplug`. The guest's ACPI refusal ends the wait at once
/// with its reason; a timeout names `what` lingered.
async fn eject<F, Fut>(
    shared: &Shared,
    op: &str,
    id: &str,
    what: &str,
    mut gone: F,
) -> vmkit_core::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = vmkit_core::Result<bool>>,
{
    let qmp = shared.qmp("unplug")?;
    // Subscribed first, so the guest's answer cannot slip past.
    let mut events = shared.events.subscribe();
    qmp.execute_raw("device_del", Some(serde_json::json!({ "id": id })))
        .await
        .map_err(|e| qmp_err(&format!("device_del {id}"), e))?;
    let limit = shared.config.timeouts.hotplug;
    let deadline = Instant::now() + limit;
    loop {
        if gone().await? {
            return Ok(());
        }
        loop {
            match events.try_recv() {
                Ok(event) => {
                    if let Some(refusal) = ost_refusal(&event, id) {
                        return Err(CoreError::backend(op.to_owned(), refusal));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        if Instant::now() >= deadline {
            return Err(CoreError::Timeout {
                op: format!("{op}: {what}"),
                after: limit,
            });
        }
        sleep(POLL).await;
    }
}

/// The agent for a query's guest view, when the guest can answer: not while the VM is
/// paused (its vCPUs are stopped, so the agent cannot run, and a call would only wait
/// for its deadline), nor when it has no agent.
async fn agent_for_query(shared: &Arc<Shared>) -> Option<AgentClient> {
    if shared.state.get() != VmState::Running {
        return None;
    }
    agent(shared).await.ok()
}

async fn agent(shared: &Arc<Shared>) -> vmkit_core::Result<AgentClient> {
    let client = crate::instance::cached_client(shared).await?;
    Ok(AgentClient::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An `ACPI_DEVICE_OST` as vmkit relays it (data seen from QEMU 10 with a Linux
    /// guest whose `/sys/firmware/acpi/hotplug/memory/enabled` was 0).
    fn ost(device: &str, source: u64, status: u64) -> VmEvent {
        VmEvent::Other {
            name: "ACPI_DEVICE_OST".into(),
            data: json!({"info": {"device": device, "slot": "0", "slot-type": "DIMM",
                                  "source": source, "status": status}}),
        }
    }

    #[test]
    fn an_eject_refusal_says_why_and_anything_else_is_not_one() {
        let refusal = ost_refusal(&ost("vmkit-mem0", 3, 0x80), "vmkit-mem0").unwrap();
        assert_eq!(
            refusal.to_string(),
            "the guest refused to eject it: ACPI _OST status 0x80 (ejection not supported by \
             the guest: its ACPI hot-plug is off or cannot remove this device)"
        );
        assert!(
            ost_refusal(&ost("vmkit-mem0", 3, 0x82), "vmkit-mem0")
                .unwrap()
                .to_string()
                .ends_with("(device busy)")
        );
        // Success, "in progress", an insert's answer, another device, another event.
        assert!(ost_refusal(&ost("vmkit-mem0", 3, 0), "vmkit-mem0").is_none());
        assert!(ost_refusal(&ost("vmkit-mem0", 3, 0x84), "vmkit-mem0").is_none());
        assert!(ost_refusal(&ost("vmkit-mem0", 1, 0x80), "vmkit-mem0").is_none());
        assert!(ost_refusal(&ost("vmkit-mem1", 3, 0x80), "vmkit-mem0").is_none());
        assert!(ost_refusal(&VmEvent::Powerdown, "vmkit-mem0").is_none());
        // QEMU leaves `device` out once the device is gone.
        let gone = VmEvent::Other {
            name: "ACPI_DEVICE_OST".into(),
            data: json!({"info": {"slot": "0", "slot-type": "DIMM", "source": 3, "status": 1}}),
        };
        assert!(ost_refusal(&gone, "vmkit-mem0").is_none());
    }
}
