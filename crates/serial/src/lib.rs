//! # vmkit-serial
//!
//! Several byte streams over one: the guest channel for hosts without vsock. QEMU on
//! macOS has neither vsock nor vhost-user, and some Linux hosts may run no vhost-user
//! daemon; a `virtserialport` on a Unix-socket chardev is then the one link between
//! vmkit and its agent. [`Mux`] carries channels over it — each a stream like a socket,
//! opened to a port (the agent's TTRPC service, its raw streams) — so that several
//! calls and streams run at once.
//!
//! It is built to survive what makes a naive serial channel unreliable:
//! - frames carry a magic and checksums, and a side that (re)starts writes a sync pad,
//!   so a reader finds the next whole frame after garbage or a half-written frame;
//! - each side says hello with an epoch: when the other side restarts (the agent, or the
//!   host reconnecting), every channel of its old life fails at once and new opens work;
//! - each channel has its own credit window: a slow reader holds up only its channel;
//! - when the stream ends, every channel and every open fails at once.
//!
//! ```
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use vmkit_serial::{Mux, Side};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (host_end, guest_end) = tokio::io::duplex(64 << 10);
//! let (host, _) = Mux::new(host_end, Side::Host);
//! let (_guest, mut incoming) = Mux::new(guest_end, Side::Guest);
//! tokio::spawn(async move {
//!     while let Some(mut channel) = incoming.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = tokio::io::split(&mut channel);
//!             let _ = tokio::io::copy(&mut r, &mut w).await; // an echo service
//!         });
//!     }
//! });
//! let mut channel = host.open(1026, std::time::Duration::from_secs(5)).await.unwrap();
//! channel.write_all(b"ping").await.unwrap();
//! let mut answer = [0u8; 4];
//! channel.read_exact(&mut answer).await.unwrap();
//! assert_eq!(&answer, b"ping");
//! # }
//! ```

mod channel;
mod error;
mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod link;
mod mux;

pub use channel::Channel;
pub use error::Error;
pub use frame::MAX_PAYLOAD;
pub use link::MAX_QUEUED;
pub use mux::{Incoming, Mux, Side};
