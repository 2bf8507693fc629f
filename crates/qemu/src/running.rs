//! [`Running`]: everything one boot took — the state dir's hold, QEMU's process, the
//! QMP connection, the guest link (vsock daemon, CID, sockets), the cached agent
//! client, the TAP fds — in one value. [`Running::release`] frees it in order and
//! waits; dropping it (the instance was dropped while the VM ran) frees it at once:
//! QEMU is killed, the daemon too, the sockets are removed, the hold is let go.

use std::path::PathBuf;
use std::sync::Arc;

use vmkit_core::{Accel, HostFd, StateDirLock};
use vmkit_qmp::QmpClient;
use vmkit_vsock::GuestAddr;

use crate::guest::{Agent, Link};
use crate::process::Process;

/// What one boot took. Built up by the start's phases.
pub(crate) struct Running {
    /// The VM's hold on its state dir, for as long as it lives: files in the dir are
    /// this VM's to remove only while it is held.
    state_lock: Option<StateDirLock>,
    /// QEMU's QMP socket (QEMU makes it; this removes it).
    control_socket: PathBuf,
    /// The accelerator QEMU runs with.
    accel: Accel,
    process: Option<Arc<Process>>,
    qmp: Option<QmpClient>,
    link: Option<Link>,
    agent: Option<Agent>,
    /// Set when the guest link was found dead after a resume: every guest call then
    /// fails at once with this cause instead of waiting for its deadline.
    link_broken: Option<String>,
    /// The NICs' TAP fds; closed when the VM is gone (a TAP vmkit created vanishes).
    taps: Vec<HostFd>,
}

impl Running {
    /// A boot that holds the state dir (`lock`) and runs QEMU with `accel`.
    pub(crate) fn new(lock: StateDirLock, control_socket: PathBuf, accel: Accel) -> Self {
        Running {
            state_lock: Some(lock),
            control_socket,
            accel,
            process: None,
            qmp: None,
            link: None,
            agent: None,
            link_broken: None,
            taps: Vec::new(),
        }
    }

    pub(crate) fn accel(&self) -> Accel {
        self.accel
    }

    pub(crate) fn set_link(&mut self, link: Link) {
        self.link = Some(link);
    }

    pub(crate) fn link(&self) -> Option<&Link> {
        self.link.as_ref()
    }

    pub(crate) fn link_mut(&mut self) -> Option<&mut Link> {
        self.link.as_mut()
    }

    /// QEMU's process and the TAP fds it inherited.
    pub(crate) fn set_process(&mut self, process: Arc<Process>, taps: Vec<HostFd>) {
        self.process = Some(process);
        self.taps = taps;
    }

    pub(crate) fn process(&self) -> Option<&Arc<Process>> {
        self.process.as_ref()
    }

    pub(crate) fn set_qmp(&mut self, qmp: QmpClient) {
        self.qmp = Some(qmp);
    }

    pub(crate) fn qmp(&self) -> Option<&QmpClient> {
        self.qmp.as_ref()
    }

    pub(crate) fn set_agent(&mut self, agent: Agent) {
        self.agent = Some(agent);
    }

    /// Forgets the cached agent connection (it no longer reaches a live agent).
    pub(crate) fn forget_agent(&mut self) {
        self.agent = None;
    }

    /// The cached agent connection, while it is open.
    pub(crate) fn live_agent(&self) -> Option<&Agent> {
        self.agent.as_ref().filter(|a| a.is_alive())
    }

    /// The agent's address (the link's), unless the link is broken: then why.
    pub(crate) fn agent_addr(&self) -> Option<Result<GuestAddr, String>> {
        if let Some(cause) = &self.link_broken {
            return Some(Err(cause.clone()));
        }
        self.link.as_ref().map(|l| Ok(l.agent.clone()))
    }

    pub(crate) fn break_link(&mut self, cause: String) {
        self.link_broken = Some(cause);
    }

    /// Frees everything in order — the agent client, the link (its daemon killed and
    /// reaped, its sockets removed, its CID released), QMP, the TAP fds, QEMU's control
    /// socket (on the blocking pool), then the state dir's hold.
    pub(crate) async fn release(mut self) {
        drop(self.agent.take());
        if let Some(link) = self.link.take() {
            link.release().await;
        }
        drop(self.qmp.take());
        drop(std::mem::take(&mut self.taps));
        // The process has exited or was killed and reaped by the caller.
        drop(self.process.take());
        if let Some(lock) = self.state_lock.take() {
            let socket = self.control_socket.clone();
            let _ = tokio::task::spawn_blocking(move || remove_control_socket(&socket)).await;
            drop(lock);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Not released: the instance went while its QEMU runs, which must not outlive
        // it. Killing it is enough (its supervisor reaps it); dropping the link kills
        // the daemon and removes its sockets; then the control socket and the hold.
        if let Some(process) = self.process.take()
            && process.exited().is_none()
        {
            tracing::warn!(
                pid = process.pid(),
                "instance dropped while QEMU runs: killing it"
            );
            process.signal(libc::SIGKILL);
        }
        drop(self.link.take());
        if let Some(lock) = self.state_lock.take() {
            remove_control_socket(&self.control_socket);
            drop(lock);
        }
    }
}

/// Removes the QMP control socket (QEMU made it; nothing else removes it). The vsock
/// sockets are the link's, so each socket has one owner. A plain unlink, also needed
/// from `Drop`.
fn remove_control_socket(socket: &std::path::Path) {
    crate::host::remove_if_present(socket, "the control socket");
}
