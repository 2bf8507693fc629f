//! # vmkit-qmp
//!
//! An async client for QEMU's machine protocol (QMP) over a Unix socket that never
//! hangs and never breaks on a QEMU newer or older than its schema:
//!
//! - [`QmpClient::connect`] retries while QEMU has not created the socket yet (from 1 ms,
//!   backing off), reads the greeting and negotiates `oob` when offered — all before a
//!   deadline.
//! - One reader task routes each reply to its caller, so many tasks can have commands
//!   in flight on one connection. QEMU answers in-band commands in order, so by default
//!   replies go to the oldest waiter and no id is sent ([`CommandIds`]); with
//!   `CommandIds::Always` each command carries a short id and replies are routed by it. Each call has a deadline; a timeout
//!   fails that call only, and a late reply is discarded.
//! - Commands and results are the `qapi-qmp` crate's types; [`QmpClient::execute_raw`]
//!   covers commands its schema lacks. Commands are encoded compactly: QEMU reads QMP
//!   one byte per system call.
//! - Events arrive on a broadcast channel, typed where the schema knows them and as
//!   [`Event::Unknown`] where it does not; the stream never ends on an unknown event.
//! - Bad input (not JSON, a reply that matches no command, a message over the size limit, EOF in
//!   mid-message) ends the connection with a reason; every waiter fails at once with
//!   [`Error::Disconnected`] and subscribers get [`Event::Disconnected`].
//!
//! ```no_run
//! use vmkit_qmp::{QmpClient, QmpOptions, qapi_qmp};
//!
//! # async fn run() -> vmkit_qmp::Result<()> {
//! let qmp = QmpClient::connect("/run/vmkit/vm1/control.sock", QmpOptions::default()).await?;
//! println!("QEMU {}", qmp.version());
//! let mut events = qmp.events();
//! let status = qmp.execute(qapi_qmp::query_status {}).await?;
//! println!("running: {}", status.running);
//! qmp.execute(qapi_qmp::stop {}).await?;
//! let event = events.recv().await; // STOP
//! let cpus = qmp.execute_raw("query-hotpluggable-cpus", None).await?;
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod event;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod options;
mod wire;

pub use client::{QemuVersion, QmpClient};
pub use error::{Error, Result};
pub use event::{Event, Timestamp};
pub use options::{CommandIds, QmpOptions};
/// The QMP schema's types (commands, results, events), re-exported.
pub use qapi_qmp;
/// The QAPI base traits (`Command`), re-exported.
pub use qapi_spec;
