//! TTRPC over a guest connection.

use std::time::Duration;

use crate::addr::GuestAddr;
use crate::dial::{GuestConn, dial, dial_with_retry};
use crate::error::Result;

/// The TTRPC client type (`ttrpc::r#async::Client`); wrap it in
/// `vmkit_proto::AgentClient` for typed calls.
pub type TtrpcClient = ttrpc::r#async::Client;

/// A TTRPC client over an open connection.
pub fn ttrpc_client(conn: GuestConn) -> TtrpcClient {
    ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(conn))
}

/// Dials `addr` once and speaks TTRPC over it.
///
/// # Errors
/// As [`crate::dial`].
pub async fn connect_ttrpc(addr: &GuestAddr, timeout: Duration) -> Result<TtrpcClient> {
    Ok(ttrpc_client(dial(addr, timeout).await?))
}

/// Dials `addr` with retry until `timeout` and speaks TTRPC over it.
///
/// # Errors
/// As [`crate::dial_with_retry`].
pub async fn connect_ttrpc_with_retry(addr: &GuestAddr, timeout: Duration) -> Result<TtrpcClient> {
    Ok(ttrpc_client(dial_with_retry(addr, timeout).await?))
}
