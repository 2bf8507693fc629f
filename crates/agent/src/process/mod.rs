//! The process service: processes that outlive the call that spawned them, with their
//! stdio on the stream port (see `docs/decision-process-service.md`).
//!
//! - [`reaper`]: the one reaper of every child the agent spawns;
//! - [`spawn`]: checking a request and starting its process, on pipes or a TTY;
//! - [`output`] and [`input`]: the bounded buffers between a process and the host;
//! - [`tty`]: a TTY's primary side as async streams;
//! - [`table`]: the processes by id, and the calls on them.

pub(crate) mod input;
pub(crate) mod output;
pub(crate) mod reaper;
pub(crate) mod spawn;
pub(crate) mod table;
pub(crate) mod tty;

pub(crate) use reaper::Reaper;
pub(crate) use table::{Attached, ProcError, Processes};
