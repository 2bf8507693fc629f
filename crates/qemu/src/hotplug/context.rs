//! [`Context`]: everything a hot-plug operation may use, and nothing more — the typed
//! QMP connection, the guest agent ([`AgentSource`]), the VM's limits and deadline, its
//! event stream, and its hot-plug state. An operation built on it runs the same against
//! a real QEMU and against `MockQmpServer` with the agent's host test mode.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use vmkit_core::{Accel, Error as CoreError, Resources, VmEvent};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{GuestInfoRequest, WaitResourcesRequest, WaitResourcesResponse};

use super::state::Hotplug;
use crate::devices::DeviceTable;
use crate::error::Error;
use crate::options::Machine;
use crate::qmp::Qmp;

/// How often the guest or QEMU is asked again while waiting.
pub(crate) const POLL: Duration = Duration::from_millis(10);
/// How long an unplug waits for `DEVICE_DELETED` before it repeats `device_del`. A guest
/// can miss an unplug request that arrives while it still handles the plug (a device
/// unplugged right after it appeared: seen once in a hundred under TCG), and QEMU lets
/// the request be made again once 5 s have passed since the last one.
pub(crate) const UNPLUG_ASK_AGAIN: Duration = Duration::from_secs(6);
/// Bytes in a MiB.
pub(crate) const MIB: u64 = 1 << 20;
/// The deadline of one short agent call (a query).
const AGENT_CALL: Duration = Duration::from_secs(10);

/// Where an operation gets the guest's agent.
#[async_trait::async_trait]
pub(crate) trait AgentSource: Send + Sync {
    /// Whether the guest can answer now (its vCPUs run): a query asks the agent only
    /// then, instead of waiting for a paused guest's deadline.
    fn guest_runs(&self) -> bool;

    /// The agent's client.
    async fn agent(&self) -> vmkit_core::Result<AgentClient>;
}

/// What the VM allows, fixed for its life.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The VM's id (derives NIC MACs).
    pub(crate) vm_id: String,
    pub(crate) resources: Resources,
    pub(crate) machine: Machine,
    /// Reserved PCIe root ports for disks and NICs.
    pub(crate) hotplug_ports: u32,
    /// Guest RAM is shared with a vhost-user daemon: hot-added RAM must be too.
    pub(crate) shares_ram: bool,
    /// The accelerator QEMU runs with.
    pub(crate) accel: Accel,
    /// How long one hot-plug may wait for the guest (`timeouts.hotplug`).
    pub(crate) deadline: Duration,
    /// How long an unplug waits for the guest before it asks again
    /// ([`UNPLUG_ASK_AGAIN`] but in tests).
    pub(crate) unplug_ask_again: Duration,
    /// The VM's private state dir (a hot share's daemon socket goes there).
    pub(crate) state_dir: PathBuf,
    /// Where daemons log.
    pub(crate) log_dir: PathBuf,
    /// The virtiofsd binary.
    pub(crate) virtiofsd: PathBuf,
}

/// One hot-plug operation's view of the VM.
#[derive(Clone)]
pub(crate) struct Context {
    qmp: Qmp,
    agent: Arc<dyn AgentSource>,
    limits: Arc<Limits>,
    events: broadcast::Sender<VmEvent>,
    state: Arc<Hotplug>,
    devices: Arc<DeviceTable>,
}

impl Context {
    pub(crate) fn new(
        qmp: Qmp,
        agent: Arc<dyn AgentSource>,
        limits: Limits,
        events: broadcast::Sender<VmEvent>,
        state: Arc<Hotplug>,
        devices: Arc<DeviceTable>,
    ) -> Self {
        Context {
            qmp,
            agent,
            limits: Arc::new(limits),
            events,
            state,
            devices,
        }
    }

    pub(crate) fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn state(&self) -> &Hotplug {
        &self.state
    }

    /// The VM's device table.
    pub(crate) fn devices(&self) -> &Arc<DeviceTable> {
        &self.devices
    }

    /// Where the VM's events are published (a share's daemon reports its death there).
    pub(crate) fn publisher(&self) -> broadcast::Sender<VmEvent> {
        self.events.clone()
    }

    /// A receiver of the VM's events (subscribe before the command whose answer it
    /// waits for).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    /// The guest's agent.
    pub(crate) async fn agent(&self) -> vmkit_core::Result<AgentClient> {
        self.agent.agent().await
    }

    /// The agent for a query's guest view, when the guest can answer: not while the VM
    /// is paused, nor when it has no agent.
    pub(crate) async fn agent_for_query(&self) -> Option<AgentClient> {
        if !self.agent.guest_runs() {
            return None;
        }
        self.agent.agent().await.ok()
    }
}

/// A QMP failure of `op`.
pub(crate) fn qmp_err(op: &str, e: vmkit_qmp::Error) -> CoreError {
    CoreError::backend(op.to_owned(), Error::Qmp(e))
}

/// An agent call's failure in `op`.
pub(crate) fn agent_err(op: &str, call: &'static str, e: &ttrpc::Error) -> CoreError {
    CoreError::backend(
        op.to_owned(),
        Error::Agent {
            call,
            cause: e.to_string(),
        },
    )
}

/// The ttrpc context of one short agent call.
pub(crate) fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(AGENT_CALL.as_nanos()).unwrap_or(i64::MAX))
}

/// The guest's GuestInfo, for `op`.
pub(crate) async fn guest_info(
    agent: &AgentClient,
    op: &str,
) -> vmkit_core::Result<vmkit_proto::agent::GuestInfoResponse> {
    agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .map_err(|e| agent_err(op, "GuestInfo", &e))
}

/// Has the agent wait inside the guest until `req` holds, onlining what is still
/// offline as it goes, within `limit`. A timeout names `what` was awaited; an onlining
/// failure comes back with the guest's reason.
pub(crate) async fn wait_in_guest(
    agent: &AgentClient,
    op: &str,
    what: &str,
    mut req: WaitResourcesRequest,
    limit: Duration,
) -> vmkit_core::Result<WaitResourcesResponse> {
    req.online = true;
    req.timeout_ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
    // The call's own deadline leaves the agent time to answer after its wait ends.
    let call_limit = limit + AGENT_CALL;
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

/// The guest's MemTotal and memory block size, in bytes.
pub(crate) async fn guest_memory(agent: &AgentClient, op: &str) -> vmkit_core::Result<(u64, u64)> {
    guest_info(agent, op)
        .await
        .map(|info| (info.mem_total_bytes, info.memory_block_size_bytes))
}

/// Waits up to `limit` until the guest's MemTotal reaches `at_least` bytes; the agent
/// waits in the guest and onlines new blocks (movable) when the guest's own helper is
/// slow. A timeout names `what` was awaited.
pub(crate) async fn until_guest_memory(
    agent: &AgentClient,
    op: &str,
    what: &str,
    at_least: u64,
    limit: Duration,
) -> vmkit_core::Result<()> {
    let mut req = WaitResourcesRequest::new();
    req.mem_total_at_least = at_least;
    wait_in_guest(agent, op, what, req, limit).await.map(drop)
}
