//! # vmkit-process
//!
//! Processes in a vmkit guest, from the host: [`Processes::spawn`] starts a
//! [`Command`] through the guest agent's process service and gives back a [`Process`]
//! whose stdin is an `AsyncWrite` and whose stdout and stderr are `AsyncRead`s (or one
//! [`Tty`] stream), with [`Process::wait`], [`Process::kill`] and [`Process::resize`].
//! Every call takes a deadline and fails with a typed [`Error`]. A process outlives the
//! connection that started it: [`Processes::attach`] finds it again and resumes its
//! output where the host left off.
//!
//! [`Filesystem`] mounts disks (by serial), tmpfs, overlays and shares (by tag) in the
//! guest, unmounts them and creates directories, with the same deadlines and errors.
//!
//! Output is never dropped: a reader that stops holds the process back. So read a
//! process's outputs while you wait for it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use vmkit_process::{Command, Processes};
//!
//! # async fn run(vm: Arc<dyn vmkit_core::Instance>) -> Result<(), Box<dyn std::error::Error>> {
//! let processes = Processes::new(vm);
//! let second = Duration::from_secs(1);
//! let mut cat = processes.spawn(&Command::new(["cat"]), 10 * second).await?;
//! let (mut stdin, mut stdout) = (cat.take_stdin().unwrap(), cat.take_stdout().unwrap());
//! stdin.write_all(b"hello").await?;
//! stdin.shutdown().await?; // cat reads end of file
//! let mut echoed = Vec::new();
//! stdout.read_to_end(&mut echoed).await?;
//! assert_eq!(echoed, b"hello");
//! assert!(cat.wait(10 * second).await?.success());
//! # Ok(())
//! # }
//! ```

mod command;
mod error;
mod mount;
mod process;
mod stdio;

pub use command::Command;
pub use error::{Error, Result};
pub use mount::{Filesystem, Mount};
pub use process::{ExitStatus, Process, ProcessInfo, Processes, Resume};
pub use stdio::{Output, Stdin, Tty};
