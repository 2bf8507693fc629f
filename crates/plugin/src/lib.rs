//! # vmkit-plugin
//!
//! Backends that plug in at run time and look to a runtime exactly like one linked in:
//! the same [`Registry`](vmkit_core::Registry), the same traits, the same errors.
//!
//! - [`wire`]: the one schema — requests on a backend or an instance (an opaque id,
//!   never a pointer), replies, events, and vmkit-core errors with their kind intact.
//! - [`Dispatcher`]: the plugin side; answers requests from any `Backend`, catching its
//!   panics.
//! - [`PluginBackend`] / [`PluginInstance`]: the host side; vmkit-core's traits over a
//!   [`Channel`]. The guest channel stays on the host: the plugin reports where the
//!   agent listens and the adapter dials it with vmkit-vsock.
//! - [`loader`] and [`export_backend!`]: in process — a `cdylib` exports one C-ABI
//!   descriptor ([`abi`]); the loader checks its place and every field before calling
//!   it, catches panics at every entry point, and never unloads it.
//! - [`process`]: out of process — the backend as its own executable over a Unix
//!   socket; a backend that dies fails every pending call at once and ends its
//!   instances as crashed, and the runtime keeps running.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmkit_plugin::{PluginBackend, process::ProcessChannel};
//!
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let channel = ProcessChannel::launch("/usr/libexec/vmkit-backend-qemu".as_ref(), "qemu")?;
//! let backend = PluginBackend::describe(channel)?;
//! let mut registry = vmkit_core::Registry::new();
//! registry.register(Arc::new(backend))?;
//! # Ok(())
//! # }
//! ```

pub mod abi;
mod adapter;
mod dispatch;
mod elf;
mod error;
mod feed;
mod lines;
pub mod loader;
mod logs;
pub mod process;
pub mod wire;

/// vmkit-core, for [`export_backend!`]'s expansion.
#[doc(hidden)]
pub use vmkit_core as __core;

pub use adapter::{Channel, Origin, PluginBackend, PluginInstance};
pub use dispatch::Dispatcher;
pub use error::Error;
pub use feed::InstanceFeed;
