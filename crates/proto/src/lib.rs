//! # vmkit-proto
//!
//! What the host and the vmkit guest agent say to each other:
//!
//! - the agent's TTRPC service (`proto/agent.proto`): [`AgentClient`] for the host,
//!   [`Agent`] + [`create_agent`] for the agent. Messages are in [`agent`];
//! - the header that opens a raw stream on the agent's stream port ([`StreamHeader`]),
//!   the agent's one-line answer to it ([`StreamReply`]), and the frames the stream's
//!   bytes then travel in ([`FramedStream`]), so that each side's end of data survives
//!   transports without half-close.
//!
//! ```no_run
//! use vmkit_proto::{AgentClient, agent::PingRequest};
//!
//! # async fn ping(client: ttrpc::r#async::Client) -> ttrpc::Result<()> {
//! let agent = AgentClient::new(client);
//! let pong = agent
//!     .ping(ttrpc::context::with_timeout(1_000_000_000), &PingRequest::new())
//!     .await?;
//! println!("agent {} up {} ms", pong.agent_version, pong.uptime_ms);
//! # Ok(())
//! # }
//! ```

pub mod framed;
mod stream;

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    unsafe_code
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

pub use framed::FramedStream;
pub use generated::agent;
pub use generated::agent_ttrpc::{Agent, AgentClient, create_agent};
pub use stream::{MAGIC, MAX_HEADER, StdioStream, StreamHeader, StreamHeaderError, StreamReply};

/// The vsock port the agent serves its TTRPC service on.
pub const AGENT_PORT: u32 = 1025;
/// The vsock port the agent serves raw streams on.
pub const STREAM_PORT: u32 = 1026;

/// The agent's host test mode (no vsock): the Unix socket in its directory that stands
/// for [`AGENT_PORT`].
pub const AGENT_SOCKET: &str = "agent.sock";
/// The same for [`STREAM_PORT`].
pub const STREAM_SOCKET: &str = "stream.sock";

/// The host test mode's socket name for `port`, if it serves that port.
pub fn unix_socket_name(port: u32) -> Option<&'static str> {
    match port {
        AGENT_PORT => Some(AGENT_SOCKET),
        STREAM_PORT => Some(STREAM_SOCKET),
        _ => None,
    }
}
