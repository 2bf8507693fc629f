//! # vmkit-vsock
//!
//! How the host reaches a guest: addresses ([`GuestAddr`], vmkit-core's, re-exported:
//! `vsock://3:1025`, `hvsock:///run/vm/vsock.sock:1025`, and `unix:///run/vm:1025` for
//! the agent's host test mode), a dialer for kernel vsock and for hybrid vsock
//! (`CONNECT <port>\n` → `OK <n>\n`), [`dial_with_retry`] with error classification, raw
//! streams to the agent ([`open_stream`]), TTRPC over any of them ([`ttrpc_client`]),
//! and the host-wide [`CidAllocator`].
//!
//! ```no_run
//! use std::time::Duration;
//! use vmkit_vsock::{GuestAddr, connect_ttrpc_with_retry};
//!
//! # async fn run() -> vmkit_vsock::Result<()> {
//! let addr = GuestAddr::HybridVsock { uds: "/run/vmkit/vm1/vsock.sock".into(), port: 1025 };
//! let client = connect_ttrpc_with_retry(&addr, Duration::from_secs(5)).await?;
//! let agent = vmkit_proto::AgentClient::new(client);
//! # let _ = agent;
//! # Ok(())
//! # }
//! ```

pub mod cid;
mod client;
mod dial;
mod error;
mod gate;
mod stream;

pub use cid::{CidAllocator, CidLease, CidOptions, Reservation};
pub use client::{
    AgentCache, ConnHealth, TtrpcClient, connect_agent, connect_ttrpc, connect_ttrpc_with_retry,
    ttrpc_client, ttrpc_client_tracked,
};
pub use dial::{GuestConn, HybridConn, HybridProbe, dial, dial_with_retry, probe_hybrid};
pub use error::{Error, Result};
pub use gate::LinkGate;
pub use stream::{AgentStream, begin_stream, open_stream};
pub use vmkit_core::GuestAddr;
