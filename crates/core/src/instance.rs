//! The instance traits: [`Instance`] (life cycle) and the parts it is made of,
//! [`DeviceConfigurator`] and [`GuestCommunicator`]. Resource hot-plug is in
//! [`crate::resources`].

use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;

use crate::device_spec::{DeviceInfo, DeviceSpec};
use crate::devices::{DiskConfig, MacAddr, NicConfig};
use crate::error::Result;
use crate::info::{ExitInfo, VmEvent, VmInfo};
use crate::resources::ResourceManager;
use crate::state::VmState;

/// A TTRPC client connected to the guest agent. Cheap to clone; wrap it in the
/// generated typed client (`vmkit_proto::AgentClient::new(client)`) and give each call
/// a deadline (`ttrpc::context::with_timeout(nanos)`).
pub type GuestClient = ttrpc::r#async::Client;

/// A raw, bidirectional byte stream to the guest (stdio, file copy).
pub trait GuestStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> GuestStream for T {}

/// Options for [`Instance::start`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartOptions {
    /// Overrides the config's `timeouts.start` for this start.
    pub timeout: Option<Duration>,
}

impl StartOptions {
    /// Start with the config's deadline.
    pub fn new() -> Self {
        StartOptions::default()
    }

    /// Start with this deadline instead of the config's.
    pub fn with_timeout(timeout: Duration) -> Self {
        StartOptions {
            timeout: Some(timeout),
        }
    }
}

/// One virtual machine, created by a [`crate::Backend`].
///
/// State machine: `New → Starting → Running ⇄ Paused`, and any state `→ Shutdown`
/// (see [`VmState::can_transition_to`]). A method called in a state it does not allow
/// returns [`crate::Error::InvalidState`].
///
/// **Deadlines.** Every method ends by its deadline, from the config's
/// [`crate::Timeouts`] (named on each method), with [`crate::Error::Timeout`] naming the
/// operation — through every transport, a plugin library or a backend process
/// included. Only [`Instance::wait`] waits as long as the VM runs.
///
/// **Cancellation.** Dropping the future of any method cancels its work: the backend's
/// own work stops, not only the caller's wait (through a plugin too). A `start`
/// cancelled midway ends like a failed one: the VM in `Shutdown`, everything it took
/// released, `Exited` published, `wait()` saying `StartFailed` and "cancelled".
/// Dropping an instance ends its VM and releases everything it holds. Backends get
/// both from [`crate::Lifecycle`] ([`crate::Lifecycle::begin_start`],
/// [`crate::Lifecycle::on_end`]); the conformance suite (vmkit-testkit) checks them.
#[async_trait]
pub trait Instance: DeviceConfigurator + GuestCommunicator + ResourceManager + Send + Sync {
    /// Boots the VM: `New → Starting → Running`. Returns once the guest's ready signal
    /// (its agent's first answer) arrived.
    ///
    /// Allowed in: `New`. Deadline: `opts.timeout`, else the config's `timeouts.start`.
    ///
    /// # Errors
    /// `InvalidState` outside `New`; `Timeout` past the deadline; `Backend` when the VMM
    /// could not be spawned or died. A failed start releases everything it took
    /// (process, sockets, CID, TAP) and leaves the instance in `Shutdown`.
    async fn start(&self, opts: StartOptions) -> Result<()>;

    /// Stops the VM, gracefully first, then by force, each stage bounded by the config's
    /// `timeouts.shutdown_grace`. Ends in `Shutdown`, always reaps the VMM process and
    /// removes its sockets.
    ///
    /// Allowed in: any state. Idempotent: a second or concurrent caller waits for the
    /// first and gets the same [`ExitInfo`].
    ///
    /// # Errors
    /// Only when cleanup itself failed (e.g. a socket could not be removed); the VM is
    /// gone all the same.
    async fn shutdown(&self) -> Result<ExitInfo>;

    /// Stops the vCPUs: `Running → Paused`.
    ///
    /// Allowed in: `Running`. Deadline: the config's `timeouts.command`.
    ///
    /// The state follows what the VMM reports, not what was asked: after an error (a
    /// timeout on a stalled VMM, which may still carry the command out later) the
    /// state is what the VMM says when asked, and changes when the VMM announces a
    /// change, so [`VmEvent::StateChanged`] is only sent for changes that happened.
    ///
    /// # Errors
    /// `InvalidState`, `Timeout`, `Unsupported` (no [`crate::Capabilities::PAUSE`]).
    async fn pause(&self) -> Result<()>;

    /// Restarts the vCPUs: `Paused → Running`. The state follows the VMM as for
    /// [`Self::pause`].
    ///
    /// Allowed in: `Paused`. Deadline: the config's `timeouts.command`.
    ///
    /// # Errors
    /// `InvalidState`, `Timeout`, `Unsupported`.
    async fn resume(&self) -> Result<()>;

    /// Resolves when the VMM process is gone, for any reason (shutdown, crash, failed
    /// start), with how it ended. Resolves at once in `Shutdown`. Waits as long as the
    /// VM runs: bound it with `tokio::time::timeout` if needed.
    async fn wait(&self) -> ExitInfo;

    /// The current state.
    fn state(&self) -> VmState;

    /// A snapshot of id, pid, CID, sockets and capabilities.
    fn vm_info(&self) -> VmInfo;

    /// A new subscription to the VM's events. A slow subscriber that falls behind gets
    /// `RecvError::Lagged`, never blocks the VM.
    fn events(&self) -> broadcast::Receiver<VmEvent>;
}

/// Devices, as data ([`DeviceSpec`]): added before start, hot-plugged after, unplugged,
/// listed. A backend implements the four required methods; `add_disk`, `hotplug_nic`
/// and the rest are provided wrappers that build the spec.
#[async_trait]
pub trait DeviceConfigurator: Send + Sync {
    /// Adds a device to boot with. Validated now: the kind's own checks (a disk's image
    /// exists, a NIC's MAC is unicast, a share's directory exists and is the caller's),
    /// and an id unique among the VM's devices.
    ///
    /// Allowed in: `New`.
    ///
    /// # Errors
    /// `InvalidState`, `InvalidConfig`; `Unsupported` for a kind the backend lacks
    /// (a share without [`crate::Capabilities::FS_SHARE`]).
    fn add_device(&self, spec: DeviceSpec) -> Result<()>;

    /// Attaches a device to the running VM; returns once the guest sees it.
    ///
    /// Allowed in: `Running` only: the call waits for the guest to see the device,
    /// which a paused guest never does (`Paused` is refused with `InvalidState`).
    /// Deadline: the config's `timeouts.command` per VMM command, `timeouts.hotplug`
    /// for the guest. Needs the kind's [`DeviceSpec::hotplug_capability`].
    ///
    /// # Errors
    /// `InvalidState`; `BadArgument` (a malformed spec, a taken id); `Unsupported`;
    /// `Exhausted` (no free slot); `Timeout`; `Backend` with the VMM's own error text.
    /// On failure nothing of the device is left attached.
    async fn hotplug_device(&self, spec: DeviceSpec) -> Result<()>;

    /// Detaches the hot-plugged device `id` and waits until the VMM reports it gone.
    ///
    /// Allowed in: `Running`. Deadline: the config's `timeouts.command` for the request
    /// plus the guest's acknowledgement.
    ///
    /// # Errors
    /// `InvalidState`, `NotFound` (no hot-plugged device with that id), `Timeout` (the
    /// guest never released it), `Backend`.
    async fn unplug(&self, id: &str) -> Result<()>;

    /// Every device the VM has, cold and hot, in the order added, with its state: the
    /// one answer to "what does this VM have".
    fn devices(&self) -> Vec<DeviceInfo>;

    /// Adds a disk to boot with: [`Self::add_device`] of a [`DeviceSpec::Disk`].
    ///
    /// # Errors
    /// As [`Self::add_device`].
    fn add_disk(&self, disk: DiskConfig) -> Result<()> {
        self.add_device(DeviceSpec::Disk(disk))
    }

    /// Adds a NIC to boot with: [`Self::add_device`] of a [`DeviceSpec::Nic`].
    ///
    /// # Errors
    /// As [`Self::add_device`].
    fn add_nic(&self, nic: NicConfig) -> Result<()> {
        self.add_device(DeviceSpec::Nic(nic))
    }

    /// Adds a NIC on the TAP device `tap`; shorthand for [`Self::add_nic`].
    ///
    /// # Errors
    /// As [`Self::add_device`].
    fn add_tap_nic(&self, id: &str, tap: &str, mac: Option<MacAddr>) -> Result<()> {
        self.add_nic(NicConfig::tap(id, tap, mac))
    }

    /// Attaches a disk to the running VM: [`Self::hotplug_device`] of a
    /// [`DeviceSpec::Disk`]. Needs [`crate::Capabilities::DISK_HOTPLUG`].
    ///
    /// # Errors
    /// As [`Self::hotplug_device`].
    async fn hotplug_disk(&self, disk: DiskConfig) -> Result<()> {
        self.hotplug_device(DeviceSpec::Disk(disk)).await
    }

    /// Attaches a NIC to the running VM: [`Self::hotplug_device`] of a
    /// [`DeviceSpec::Nic`]. Needs [`crate::Capabilities::NIC_HOTPLUG`].
    ///
    /// # Errors
    /// As [`Self::hotplug_device`].
    async fn hotplug_nic(&self, nic: NicConfig) -> Result<()> {
        self.hotplug_device(DeviceSpec::Nic(nic)).await
    }
}

/// Talking to the agent in the guest.
#[async_trait]
pub trait GuestCommunicator: Send + Sync {
    /// The instance's cached client; re-dialled when its connection died.
    ///
    /// Allowed in: `Running`, `Paused` (calls then wait for `resume`).
    /// Deadline: the config's `timeouts.dial` when it must re-dial.
    ///
    /// # Errors
    /// `InvalidState`, `Unsupported` (no guest agent), `Timeout`, `Backend`.
    async fn client(&self) -> Result<GuestClient>;

    /// A fresh connection to the agent, one attempt.
    ///
    /// # Errors
    /// As [`Self::client`], without retry: a refused connection fails at once.
    async fn dial_client(&self) -> Result<GuestClient>;

    /// A fresh connection, retried with backoff until `timeout` on transient errors
    /// (refused, reset, closed early); permanent errors (bad address, permission) fail
    /// at once.
    ///
    /// # Errors
    /// `Timeout` naming how many attempts were made and the last cause.
    async fn dial_client_with_retry(&self, timeout: Duration) -> Result<GuestClient>;

    /// A raw byte stream to the guest's vsock `port`.
    ///
    /// Allowed in: `Running`. Deadline: the config's `timeouts.dial`.
    ///
    /// # Errors
    /// As [`Self::dial_client`].
    async fn start_stream(&self, port: u32) -> Result<Box<dyn GuestStream>>;
}
