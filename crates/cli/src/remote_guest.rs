//! A guest reached from outside the process that holds its VM: vmkit-core's
//! [`GuestCommunicator`] over the guest address a supervisor reports, dialled with
//! vmkit-vsock (kernel vsock, hybrid vsock, or the virtio-serial bridge's sockets) — so
//! `vmkit exec` drives a detached VM's processes through vmkit-process itself.

use std::time::Duration;

use async_trait::async_trait;
use vmkit_core::{GuestAddr, GuestClient, GuestCommunicator, GuestStream};

/// The guest at `addr`.
pub(crate) struct RemoteGuest {
    addr: GuestAddr,
    dial: Duration,
}

impl RemoteGuest {
    /// Dials `addr`, each dial bounded by `dial`.
    pub(crate) fn new(addr: GuestAddr, dial: Duration) -> RemoteGuest {
        RemoteGuest { addr, dial }
    }
}

#[async_trait]
impl GuestCommunicator for RemoteGuest {
    async fn client(&self) -> vmkit_core::Result<GuestClient> {
        self.dial_client().await
    }

    async fn dial_client(&self) -> vmkit_core::Result<GuestClient> {
        vmkit_vsock::connect_ttrpc(&self.addr, self.dial)
            .await
            .map_err(|e| e.into_core("dial the guest agent"))
    }

    async fn dial_client_with_retry(&self, timeout: Duration) -> vmkit_core::Result<GuestClient> {
        vmkit_vsock::connect_ttrpc_with_retry(&self.addr, timeout)
            .await
            .map_err(|e| e.into_core("dial the guest agent"))
    }

    async fn start_stream(&self, port: u32) -> vmkit_core::Result<Box<dyn GuestStream>> {
        let conn = vmkit_vsock::dial(&self.addr.with_port(port), self.dial)
            .await
            .map_err(|e| e.into_core("open a guest stream"))?;
        Ok(Box::new(conn))
    }
}
