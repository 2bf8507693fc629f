//! The one schema both run-time transports carry: a [`Request`] names an operation on
//! the backend or on one of its instances (an opaque id into the plugin's table, never
//! a pointer), a [`Reply`] answers it, and a [`WireError`] carries a vmkit-core error
//! across with its kind intact — an `InvalidState` stays an `InvalidState`, a timeout a
//! timeout. Everything is JSON of vmkit-core's serde types; no Rust object crosses.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmkit_core::{
    Capabilities, CpuFailure, CpuInfo, CpuTopology, DeviceInfo, DeviceSpec, Error as CoreError,
    ExitInfo, InstanceConfig, MemoryInfo, StartOptions, VcpuResize, VmEvent, VmInfo, VmState,
};

/// The schema's version; a host refuses a peer with another one.
pub const SCHEMA_VERSION: u32 = 2;

/// The largest message (request, reply or event) either transport carries, in bytes:
/// a `VmInfo` or a config is a few KiB. A larger one is refused before it is held
/// whole.
pub const MAX_MESSAGE: usize = 4 << 20;

/// What a host tells a plugin library before its `init` (ABI 1.1's `configure`), as
/// JSON: the size of the plugin's own tokio runtime, where its async calls run. A
/// plugin must never block inside an async call; one that does holds a worker thread,
/// and with every worker held its calls time out (typed) instead of answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginOptions {
    /// The runtime's worker threads (1 to 256).
    pub worker_threads: usize,
    /// The most threads it runs blocking work on (`spawn_blocking`; 1 to 4096).
    pub max_blocking_threads: usize,
}

impl Default for PluginOptions {
    fn default() -> Self {
        PluginOptions {
            worker_threads: 4,
            max_blocking_threads: 64,
        }
    }
}

impl PluginOptions {
    /// Checks the sizes.
    ///
    /// # Errors
    /// `Error::InvalidConfig` naming the field that is out of range.
    pub fn validate(&self) -> vmkit_core::Result<()> {
        if !(1..=256).contains(&self.worker_threads) {
            return Err(CoreError::config(
                "plugin.worker_threads",
                format!("{} is outside 1..=256", self.worker_threads),
            ));
        }
        if !(1..=4096).contains(&self.max_blocking_threads) {
            return Err(CoreError::config(
                "plugin.max_blocking_threads",
                format!("{} is outside 1..=4096", self.max_blocking_threads),
            ));
        }
        Ok(())
    }
}

/// An instance in the plugin's table.
pub type InstanceId = u64;

/// An operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The backend's name, capabilities and schema version.
    Describe,
    /// `Backend::create`.
    Create {
        /// The config.
        config: Box<InstanceConfig>,
    },
    /// Forget an instance (the host dropped it): the plugin drops its side, which ends
    /// a live VM as dropping any instance does.
    Destroy {
        /// The instance.
        instance: InstanceId,
    },
    /// `Instance::start`.
    Start {
        /// The instance.
        instance: InstanceId,
        /// `StartOptions::timeout` in milliseconds.
        timeout_ms: Option<u64>,
    },
    /// `Instance::shutdown`.
    Shutdown {
        /// The instance.
        instance: InstanceId,
    },
    /// `Instance::pause`.
    Pause {
        /// The instance.
        instance: InstanceId,
    },
    /// `Instance::resume`.
    Resume {
        /// The instance.
        instance: InstanceId,
    },
    /// `Instance::wait`.
    Wait {
        /// The instance.
        instance: InstanceId,
    },
    /// `Instance::state`.
    State {
        /// The instance.
        instance: InstanceId,
    },
    /// `Instance::vm_info`.
    VmInfo {
        /// The instance.
        instance: InstanceId,
    },
    /// Whether the instance has a vCPU and a memory hot-plugger.
    Hotpluggers {
        /// The instance.
        instance: InstanceId,
    },
    /// `DeviceConfigurator::add_device`: a device of any kind, as vmkit-core's
    /// `DeviceSpec` spells it (a new kind crosses without a change here).
    AddDevice {
        /// The instance.
        instance: InstanceId,
        /// The device.
        spec: DeviceSpec,
    },
    /// `DeviceConfigurator::hotplug_device`.
    HotplugDevice {
        /// The instance.
        instance: InstanceId,
        /// The device.
        spec: DeviceSpec,
    },
    /// `DeviceConfigurator::devices`.
    Devices {
        /// The instance.
        instance: InstanceId,
    },
    /// `DeviceConfigurator::unplug`.
    Unplug {
        /// The instance.
        instance: InstanceId,
        /// The device id.
        id: String,
    },
    /// `CpuHotplugger::query_cpus`.
    QueryCpus {
        /// The instance.
        instance: InstanceId,
    },
    /// `CpuHotplugger::hotplug_cpu`.
    HotplugCpu {
        /// The instance.
        instance: InstanceId,
    },
    /// `CpuHotplugger::hotplug_cpu_at`.
    HotplugCpuAt {
        /// The instance.
        instance: InstanceId,
        /// The slot.
        at: CpuTopology,
    },
    /// `CpuHotplugger::unplug_cpu`.
    UnplugCpu {
        /// The instance.
        instance: InstanceId,
        /// The guest CPU number.
        index: u32,
    },
    /// `CpuHotplugger::set_vcpus`.
    SetVcpus {
        /// The instance.
        instance: InstanceId,
        /// The count wanted.
        count: u32,
    },
    /// `MemoryHotplugger::query_memory`.
    QueryMemory {
        /// The instance.
        instance: InstanceId,
    },
    /// `MemoryHotplugger::hotplug_memory`.
    HotplugMemory {
        /// The instance.
        instance: InstanceId,
        /// MiB to add.
        size_mib: u64,
    },
    /// `MemoryHotplugger::unplug_memory`.
    UnplugMemory {
        /// The instance.
        instance: InstanceId,
        /// The memory device's id.
        id: String,
    },
}

impl Request {
    /// The instance the request is about, if any.
    pub fn instance(&self) -> Option<InstanceId> {
        use Request::*;
        match self {
            Describe | Create { .. } => None,
            Destroy { instance }
            | Start { instance, .. }
            | Shutdown { instance }
            | Pause { instance }
            | Resume { instance }
            | Wait { instance }
            | State { instance }
            | VmInfo { instance }
            | Hotpluggers { instance }
            | AddDevice { instance, .. }
            | HotplugDevice { instance, .. }
            | Devices { instance }
            | Unplug { instance, .. }
            | QueryCpus { instance }
            | HotplugCpu { instance }
            | HotplugCpuAt { instance, .. }
            | UnplugCpu { instance, .. }
            | SetVcpus { instance, .. }
            | QueryMemory { instance }
            | HotplugMemory { instance, .. }
            | UnplugMemory { instance, .. } => Some(*instance),
        }
    }

    /// The operation's name, as the contract's method is called (`"start"`, and a
    /// device's hot-plug by its kind: `"hotplug_disk"`); errors about the call name it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::HotplugDevice { spec, .. } => spec.hotplug_op(),
            other => other.tag(),
        }
    }

    /// The request's `op` tag on the wire (`"start"`, `"hotplug_device"`).
    pub fn tag(&self) -> &'static str {
        use Request::*;
        match self {
            Describe => "describe",
            Create { .. } => "create",
            Destroy { .. } => "destroy",
            Start { .. } => "start",
            Shutdown { .. } => "shutdown",
            Pause { .. } => "pause",
            Resume { .. } => "resume",
            Wait { .. } => "wait",
            State { .. } => "state",
            VmInfo { .. } => "vm_info",
            Hotpluggers { .. } => "hotpluggers",
            AddDevice { .. } => "add_device",
            HotplugDevice { .. } => "hotplug_device",
            Devices { .. } => "devices",
            Unplug { .. } => "unplug",
            QueryCpus { .. } => "query_cpus",
            HotplugCpu { .. } => "hotplug_cpu",
            HotplugCpuAt { .. } => "hotplug_cpu_at",
            UnplugCpu { .. } => "unplug_cpu",
            SetVcpus { .. } => "set_vcpus",
            QueryMemory { .. } => "query_memory",
            HotplugMemory { .. } => "hotplug_memory",
            UnplugMemory { .. } => "unplug_memory",
        }
    }

    /// The options a `Start` carries.
    pub fn start_options(timeout_ms: Option<u64>) -> StartOptions {
        match timeout_ms {
            Some(ms) => StartOptions::with_timeout(Duration::from_millis(ms)),
            None => StartOptions::new(),
        }
    }
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done; nothing to return.
    Done,
    /// What `Describe` asked.
    Described {
        /// The backend's name.
        name: String,
        /// Its capabilities.
        capabilities: Capabilities,
        /// The peer's [`SCHEMA_VERSION`].
        schema: u32,
    },
    /// The new instance's id.
    Created {
        /// Its id.
        instance: InstanceId,
    },
    /// A state.
    State {
        /// The state.
        state: VmState,
    },
    /// A `VmInfo`.
    VmInfo {
        /// The info.
        info: Box<VmInfo>,
    },
    /// How an instance ended.
    Exit {
        /// The exit.
        exit: ExitInfo,
    },
    /// What `Devices` asked.
    Devices {
        /// Every device, cold and hot.
        devices: Vec<DeviceInfo>,
    },
    /// Which hot-pluggers an instance has.
    Hotpluggers {
        /// A vCPU hot-plugger.
        cpu: bool,
        /// A memory hot-plugger.
        memory: bool,
    },
    /// vCPUs.
    Cpus {
        /// The vCPUs.
        cpus: Vec<CpuInfo>,
    },
    /// One vCPU.
    Cpu {
        /// The vCPU.
        cpu: CpuInfo,
    },
    /// What `set_vcpus` reached.
    Resize {
        /// The count asked for.
        requested: u32,
        /// The count before.
        before: u32,
        /// The count reached.
        achieved: u32,
        /// Per failed vCPU: its number and why.
        failures: Vec<(u32, WireError)>,
    },
    /// Memory.
    Memory {
        /// The memory.
        memory: MemoryInfo,
    },
    /// A device id.
    Id {
        /// The id.
        id: String,
    },
    /// The operation failed.
    Failed {
        /// Why.
        error: WireError,
    },
}

impl Reply {
    /// The reply for a `set_vcpus` result.
    pub fn resize(r: VcpuResize) -> Reply {
        Reply::Resize {
            requested: r.requested,
            before: r.before,
            achieved: r.achieved,
            failures: r
                .failures
                .into_iter()
                .map(|f| (f.index, WireError::from_core(&f.error)))
                .collect(),
        }
    }

    /// A failed reply.
    pub fn failed(error: &CoreError) -> Reply {
        Reply::Failed {
            error: WireError::from_core(error),
        }
    }
}

/// A message from the plugin that is not a reply: an instance's event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// The instance.
    pub instance: InstanceId,
    /// The event.
    pub event: VmEvent,
}

/// A vmkit-core error in wire form: its kind and its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    /// `Error::InvalidState`.
    InvalidState {
        /// The operation.
        op: String,
        /// The state.
        state: VmState,
    },
    /// `Error::InvalidConfig`.
    InvalidConfig {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// `Error::BadArgument`.
    BadArgument {
        /// The call.
        op: String,
        /// The argument.
        arg: String,
        /// Why.
        reason: String,
    },
    /// `Error::NotFound`.
    NotFound {
        /// The call.
        op: String,
        /// What was looked for.
        what: String,
    },
    /// `Error::Exhausted`.
    Exhausted {
        /// The call.
        op: String,
        /// What ran out.
        resource: String,
        /// The figures.
        reason: String,
    },
    /// `Error::Unsupported`.
    Unsupported {
        /// The operation.
        op: String,
        /// The backend.
        backend: String,
        /// Why.
        reason: String,
    },
    /// `Error::Timeout`.
    Timeout {
        /// The operation.
        op: String,
        /// The deadline in milliseconds.
        after_ms: u64,
    },
    /// `Error::Runtime`.
    Runtime {
        /// The operation.
        op: String,
        /// Why.
        reason: String,
    },
    /// `Error::InUse`.
    InUse {
        /// The operation.
        op: String,
        /// The resource.
        resource: String,
        /// Its holder.
        holder: String,
    },
    /// `Error::UnsafePath`.
    UnsafePath {
        /// The operation.
        op: String,
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// `Error::InvalidAddress`.
    InvalidAddress {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// `Error::Io`: the OS error's text (the errno itself does not cross).
    Io {
        /// The operation.
        op: String,
        /// The error's text.
        message: String,
    },
    /// `Error::Backend` and anything else: the operation and the whole message of the
    /// cause (its chain of sources, joined).
    Backend {
        /// The operation.
        op: String,
        /// The cause's message.
        message: String,
    },
}

/// The operation names the core contract uses in `InvalidState`, which holds a
/// `&'static str`: a name that crosses the wire is mapped back onto one of these.
const OPS: &[&str] = &[
    "start",
    "shutdown",
    "pause",
    "resume",
    "add_disk",
    "add_nic",
    "hotplug_disk",
    "hotplug_nic",
    "add_device",
    "hotplug_device",
    "devices",
    "unplug",
    "client",
    "dial_client",
    "dial_client_with_retry",
    "start_stream",
    "open_stream",
    "query_cpus",
    "hotplug_cpu",
    "unplug_cpu",
    "set_vcpus",
    "query_memory",
    "hotplug_memory",
    "unplug_memory",
    "hotplug",
    "query",
];

/// `op` as one of [`OPS`], or a generic name for an operation the contract does not
/// name.
fn static_op(op: &str) -> &'static str {
    OPS.iter()
        .chain(DeviceSpec::HOTPLUG_OPS)
        .find(|known| **known == op)
        .copied()
        .unwrap_or("a plugin operation")
}

/// The whole message of `e` with its sources, `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// A remote backend's error, as it reached the host: its message (what
/// `Error::Backend`'s source is after crossing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

impl WireError {
    /// The wire form of `e`.
    pub fn from_core(e: &CoreError) -> WireError {
        match e {
            CoreError::InvalidState { op, state } => WireError::InvalidState {
                op: (*op).to_owned(),
                state: *state,
            },
            CoreError::InvalidConfig { field, reason } => WireError::InvalidConfig {
                field: field.clone(),
                reason: reason.clone(),
            },
            CoreError::BadArgument { op, arg, reason } => WireError::BadArgument {
                op: op.clone(),
                arg: arg.clone(),
                reason: reason.clone(),
            },
            CoreError::NotFound { op, what } => WireError::NotFound {
                op: op.clone(),
                what: what.clone(),
            },
            CoreError::Exhausted {
                op,
                resource,
                reason,
            } => WireError::Exhausted {
                op: op.clone(),
                resource: resource.clone(),
                reason: reason.clone(),
            },
            CoreError::Unsupported {
                op,
                backend,
                reason,
            } => WireError::Unsupported {
                op: op.clone(),
                backend: backend.clone(),
                reason: reason.clone(),
            },
            CoreError::Timeout { op, after } => WireError::Timeout {
                op: op.clone(),
                after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            },
            CoreError::Runtime { op, reason } => WireError::Runtime {
                op: op.clone(),
                reason: reason.clone(),
            },
            CoreError::InUse {
                op,
                resource,
                holder,
            } => WireError::InUse {
                op: op.clone(),
                resource: resource.clone(),
                holder: holder.clone(),
            },
            CoreError::UnsafePath { op, path, reason } => WireError::UnsafePath {
                op: op.clone(),
                path: path.clone(),
                reason: reason.clone(),
            },
            CoreError::InvalidAddress { addr, reason } => WireError::InvalidAddress {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            CoreError::Io { op, source } => WireError::Io {
                op: op.clone(),
                message: chain(source),
            },
            CoreError::Backend { op, source } => WireError::Backend {
                op: op.clone(),
                message: chain(source.as_ref()),
            },
            // Kinds a backend does not return from an instance call (the registry's),
            // and any later ones: kept as a message.
            other => WireError::Backend {
                op: "plugin".into(),
                message: other.to_string(),
            },
        }
    }

    /// The vmkit-core error this stands for.
    pub fn into_core(self) -> CoreError {
        match self {
            WireError::InvalidState { op, state } => CoreError::InvalidState {
                op: static_op(&op),
                state,
            },
            WireError::InvalidConfig { field, reason } => {
                CoreError::InvalidConfig { field, reason }
            }
            WireError::BadArgument { op, arg, reason } => {
                CoreError::BadArgument { op, arg, reason }
            }
            WireError::NotFound { op, what } => CoreError::NotFound { op, what },
            WireError::Exhausted {
                op,
                resource,
                reason,
            } => CoreError::Exhausted {
                op,
                resource,
                reason,
            },
            WireError::Unsupported {
                op,
                backend,
                reason,
            } => CoreError::Unsupported {
                op,
                backend,
                reason,
            },
            WireError::Timeout { op, after_ms } => CoreError::Timeout {
                op,
                after: Duration::from_millis(after_ms),
            },
            WireError::Runtime { op, reason } => CoreError::Runtime { op, reason },
            WireError::InUse {
                op,
                resource,
                holder,
            } => CoreError::InUse {
                op,
                resource,
                holder,
            },
            WireError::UnsafePath { op, path, reason } => {
                CoreError::UnsafePath { op, path, reason }
            }
            WireError::InvalidAddress { addr, reason } => {
                CoreError::InvalidAddress { addr, reason }
            }
            WireError::Io { op, message } => CoreError::Io {
                op,
                source: std::io::Error::other(message),
            },
            WireError::Backend { op, message } => CoreError::backend(op, RemoteError(message)),
        }
    }
}

/// The `VcpuResize` a [`Reply::Resize`] stands for.
pub(crate) fn resize_from_wire(
    requested: u32,
    before: u32,
    achieved: u32,
    failures: Vec<(u32, WireError)>,
) -> VcpuResize {
    VcpuResize {
        requested,
        before,
        achieved,
        failures: failures
            .into_iter()
            .map(|(index, e)| CpuFailure {
                index,
                error: e.into_core(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round_trip(e: CoreError) -> CoreError {
        let wire = WireError::from_core(&e);
        let json = serde_json::to_string(&wire).unwrap();
        serde_json::from_str::<WireError>(&json)
            .unwrap()
            .into_core()
    }

    #[test]
    fn errors_keep_their_kind_and_words_across_the_wire() {
        let e = round_trip(CoreError::InvalidState {
            op: "pause",
            state: VmState::New,
        });
        assert!(matches!(
            e,
            CoreError::InvalidState {
                op: "pause",
                state: VmState::New
            }
        ));
        let e = round_trip(CoreError::Timeout {
            op: "start".into(),
            after: Duration::from_millis(1500),
        });
        assert_eq!(e.to_string(), "start: timed out after 1.5s");
        let e = round_trip(CoreError::config("resources.max_vcpus", "0 is not allowed"));
        assert!(matches!(e, CoreError::InvalidConfig { .. }));
        for e in [
            CoreError::bad_argument("set_vcpus 9", "count", "must be within 1..=4"),
            CoreError::not_found("unplug x", "no hot-plugged device with that id"),
            CoreError::exhausted("hotplug_cpu", "vCPU slot", "all 4 vCPUs are present"),
        ] {
            let text = e.to_string();
            let back = round_trip(e);
            assert!(
                matches!(
                    back,
                    CoreError::BadArgument { .. }
                        | CoreError::NotFound { .. }
                        | CoreError::Exhausted { .. }
                ),
                "{back:?}"
            );
            assert_eq!(back.to_string(), text);
        }
        let source = std::io::Error::other("QMP error: Bus 'rp0' does not support hotplugging");
        let original = CoreError::backend("device_add cpu", source);
        let text = original.to_string();
        let e = round_trip(original);
        assert!(matches!(e, CoreError::Backend { .. }));
        assert_eq!(e.to_string(), text);
        let e = round_trip(CoreError::io(
            "create /run/x",
            std::io::Error::other("EACCES"),
        ));
        assert_eq!(e.to_string(), "create /run/x: EACCES");
        // An operation the contract does not name still crosses as InvalidState.
        let e = round_trip(CoreError::InvalidState {
            op: "frobnicate",
            state: VmState::Paused,
        });
        assert!(matches!(
            e,
            CoreError::InvalidState {
                op: "a plugin operation",
                ..
            }
        ));
    }

    #[test]
    fn requests_are_tagged_json() {
        let req = Request::Start {
            instance: 7,
            timeout_ms: Some(2000),
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(json, r#"{"op":"start","instance":7,"timeout_ms":2000}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        assert_eq!(req.instance(), Some(7));
        assert_eq!(
            Request::start_options(Some(2000)),
            StartOptions::with_timeout(Duration::from_secs(2))
        );
    }
}
