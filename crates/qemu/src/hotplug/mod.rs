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

use tokio::sync::{mpsc, oneshot};
use vmkit_core::{Error as CoreError, VmState};
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
            Error::Io {
                op: format!("read {command}"),
                source: std::io::Error::other(e),
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

async fn agent(shared: &Arc<Shared>) -> vmkit_core::Result<AgentClient> {
    let client = crate::instance::cached_client(shared).await?;
    Ok(AgentClient::new(client))
}
