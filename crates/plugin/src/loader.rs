//! Loading plugin libraries: [`load`] opens one, [`load_dir`] every `*.so` in a
//! directory. Before anything of a library runs, its place is checked (a regular file,
//! not writable by group or others, owned by this user or root, in directories that
//! are not writable by others unless sticky); it is opened with `RTLD_NOW |
//! RTLD_LOCAL | RTLD_NODELETE` (a missing symbol fails now, and it is never unloaded:
//! TLS destructors of an unloaded library crash); every field of its descriptor is
//! checked before its first function is called. Each failure is an [`Error`] naming
//! the file and what was wrong.

#![allow(unsafe_code)] // opening the library and the descriptor's raw fields

use std::ffi::c_void;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;
use vmkit_core::Error as CoreError;

use crate::abi::{
    ABI_MAJOR, DescriptorV1, MAGIC, PANIC_UNWIND, RawBuffer, RawStr, SYMBOL, TARGET, V1_0_SIZE,
};
use crate::adapter::{Channel, Origin, PluginBackend};
use crate::error::Error;
use crate::feed::InstanceFeed;
pub use crate::wire::PluginOptions;
use crate::wire::{EventMessage, InstanceId, MAX_MESSAGE, Reply, Request, SCHEMA_VERSION};

/// The first fields of every descriptor version, read before `size` says more exist.
#[repr(C)]
struct Header {
    magic: [u8; 8],
    abi_major: u32,
    abi_minor: u32,
    size: u32,
}

/// Why `path` (or its directory) may not be loaded from, if it may not.
fn unsafe_place(path: &Path) -> Option<String> {
    let me = vmkit_core::state_dir::euid();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot read it: {e}")),
    };
    if !meta.is_file() {
        return Some("not a regular file".into());
    }
    let owned_well = |uid: u32| uid == me || uid == 0;
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o777
        ));
    }
    if !owned_well(meta.uid()) {
        return Some(format!(
            "owned by uid {}, not by this user or root",
            meta.uid()
        ));
    }
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky {
            return Some(format!(
                "its directory {} is writable by group or others (mode {:o})",
                dir.display(),
                mode & 0o777
            ));
        }
        if !owned_well(meta.uid()) && !sticky {
            return Some(format!(
                "its directory {} is owned by uid {}",
                dir.display(),
                meta.uid()
            ));
        }
    }
    None
}

/// A string field of a descriptor.
///
/// # Safety
/// `raw` must point at `len` bytes that live as long as the library (forever).
unsafe fn text(raw: RawStr) -> Option<&'static str> {
    // SAFETY: a descriptor's strings are the plugin's statics; it is never unloaded.
    std::str::from_utf8(unsafe { raw.bytes() }).ok()
}

/// Checks a descriptor's fields; the descriptor, or what is wrong with it.
///
/// # Safety
/// `descriptor` must point at readable memory of at least a [`Header`], and of `size`
/// bytes when the header's `size` says so.
unsafe fn checked(
    path: &Path,
    descriptor: *const DescriptorV1,
) -> Result<&'static DescriptorV1, Error> {
    let wrong = |field: &'static str, reason: String| Error::Descriptor {
        path: path.to_owned(),
        field,
        reason,
    };
    if descriptor.is_null() {
        return Err(wrong(
            "descriptor",
            "vmkit_plugin_v1 returned null (its backend panicked while being built?)".into(),
        ));
    }
    // SAFETY: every descriptor version begins with the header's fields.
    let header = unsafe { &*descriptor.cast::<Header>() };
    if header.magic != MAGIC {
        return Err(wrong(
            "magic",
            format!("{:?}, expected {:?}", header.magic, MAGIC),
        ));
    }
    if header.abi_major != ABI_MAJOR {
        return Err(wrong(
            "abi_major",
            format!(
                "ABI {}.{}, this host speaks {ABI_MAJOR}.x",
                header.abi_major, header.abi_minor
            ),
        ));
    }
    if (header.size as usize) < V1_0_SIZE {
        return Err(wrong(
            "size",
            format!("{} bytes, at least {V1_0_SIZE} expected", header.size),
        ));
    }
    // SAFETY: `size` says the version-1.0 fields are there, and they are 'static; the
    // appended ones are read only when `size` covers them (`configure`).
    let d: &'static DescriptorV1 = unsafe { &*descriptor };
    if d.schema != SCHEMA_VERSION {
        return Err(wrong(
            "schema",
            format!("{}, this host speaks {SCHEMA_VERSION}", d.schema),
        ));
    }
    // SAFETY: the descriptor's strings are the plugin's 'static data.
    let target = unsafe { text(d.target) }.unwrap_or("");
    if target != TARGET {
        return Err(wrong(
            "target",
            format!("{target:?}, this host is {TARGET:?}"),
        ));
    }
    // SAFETY: as above.
    let version = unsafe { text(d.vmkit_version) }.unwrap_or("");
    let minor = |v: &str| v.rsplit_once('.').map(|(mm, _)| mm.to_owned());
    if minor(version) != minor(env!("CARGO_PKG_VERSION")) {
        return Err(wrong(
            "vmkit_version",
            format!(
                "built with vmkit {version:?}, this host is {}",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    if d.panic != PANIC_UNWIND {
        return Err(wrong(
            "panic",
            "built with panic=abort: a panic in it would abort this process".into(),
        ));
    }
    // SAFETY: as above.
    match unsafe { text(d.name) } {
        Some(name) if !name.is_empty() => {}
        _ => return Err(wrong("name", "empty or not UTF-8".into())),
    }
    Ok(d)
}

/// The host's log callback.
unsafe extern "C" fn log_record(level: u32, target: RawStr, message: RawStr) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: the plugin keeps both strings alive during the call.
        let (target, message) = unsafe { (target.bytes(), message.bytes()) };
        crate::logs::emit(
            level,
            &String::from_utf8_lossy(target),
            &String::from_utf8_lossy(message),
        );
    });
}

/// Loads the plugin library at `path` and describes its backend, with the default
/// [`PluginOptions`].
///
/// # Errors
/// [`Error::UnsafePath`], [`Error::Load`], [`Error::Descriptor`], each naming the file.
pub fn load(path: &Path) -> Result<PluginBackend, Error> {
    load_with(path, &PluginOptions::default())
}

/// Loads the plugin library at `path` with `options` (its runtime's size) and
/// describes its backend. A library is loaded once per process: loading it again
/// gives another handle on the same plugin, whose runtime keeps the first options.
///
/// # Errors
/// [`Error::UnsafePath`], [`Error::Load`], [`Error::Descriptor`], each naming the file;
/// `Descriptor` with field `configure` when the plugin refuses the options.
pub fn load_with(path: &Path, options: &PluginOptions) -> Result<PluginBackend, Error> {
    let path = std::fs::canonicalize(path).map_err(|e| Error::Load {
        path: path.to_owned(),
        reason: format!("cannot resolve it: {e}"),
    })?;
    options.validate().map_err(|e| Error::Load {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if let Some(reason) = unsafe_place(&path) {
        return Err(Error::UnsafePath { path, reason });
    }
    if let Some(reason) = crate::elf::file_problem(&path) {
        return Err(Error::Load { path, reason });
    }
    // SAFETY: the library's initialisers run here (that is what loading a plugin
    // means; its place and its ELF were checked above). RTLD_NOW fails a missing
    // symbol now; RTLD_NODELETE keeps it mapped for ever (TLS destructors of an
    // unloaded library crash).
    let library = unsafe {
        libloading::os::unix::Library::open(
            Some(&path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    }
    .map_err(|e| Error::Load {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // SAFETY: the symbol a vmkit plugin exports has this type (export_backend!).
    let entry = unsafe { library.get::<extern "C" fn() -> *const DescriptorV1>(SYMBOL) }
        .map(|symbol| *symbol)
        .map_err(|e| Error::Descriptor {
            path: path.clone(),
            field: "symbol",
            reason: format!(
                "no vmkit_plugin_v1: not a vmkit plugin (or one of another ABI major): {e}"
            ),
        })?;
    // Never closed: the plugin's code and statics live as long as this process.
    std::mem::forget(library);
    // A panic cannot leave an `extern "C"` function: the export catches its own.
    let descriptor = entry();
    // SAFETY: a plugin's descriptor is static data of the (never unloaded) library.
    let descriptor = unsafe { checked(&path, descriptor) }?;
    configure(&path, descriptor, options)?;
    // SAFETY: checked above; `init` is the plugin's own entry point.
    let status = unsafe { (descriptor.init)(Some(log_record)) };
    if status != 0 {
        return Err(Error::Descriptor {
            path,
            field: "init",
            reason: format!("init returned {status} (1: it panicked)"),
        });
    }
    let channel = Arc::new(LibraryChannel {
        descriptor: Descriptor(descriptor),
        origin: Origin::Library(path.clone()),
    });
    PluginBackend::describe(channel).map_err(|e| Error::Descriptor {
        path,
        field: "describe",
        reason: e.to_string(),
    })
}

/// Hands `options` to the plugin (ABI 1.1); an ABI 1.0 plugin takes none, so only the
/// defaults are accepted for it.
fn configure(
    path: &Path,
    descriptor: &'static DescriptorV1,
    options: &PluginOptions,
) -> Result<(), Error> {
    let refused = |reason: String| Error::Descriptor {
        path: path.to_owned(),
        field: "configure",
        reason,
    };
    if (descriptor.size as usize) < std::mem::size_of::<DescriptorV1>() {
        if *options != PluginOptions::default() {
            return Err(refused(format!(
                "the plugin speaks ABI {}.{}, which takes no options; asked for {options:?}",
                descriptor.abi_major, descriptor.abi_minor
            )));
        }
        return Ok(());
    }
    // Plain data with string keys: serialising cannot fail.
    let json = serde_json::to_vec(options).unwrap_or_default();
    // SAFETY: `size` covers `configure` (checked above); the JSON outlives the call.
    let status = unsafe {
        (descriptor.configure)(RawStr {
            ptr: json.as_ptr(),
            len: json.len(),
        })
    };
    match status {
        0 => Ok(()),
        4 => Err(refused(format!("it refused the options {options:?}"))),
        5 => Err(refused(format!(
            "it runs with other options already (loaded before with them); asked for {options:?}"
        ))),
        other => Err(refused(format!(
            "configure returned {other} (1: it panicked)"
        ))),
    }
}

/// One library of a directory and what loading it gave.
pub type Loaded = (PathBuf, Result<PluginBackend, Error>);

/// Loads every `*.so` in `dir` (sorted by name). The directory itself must be a safe
/// place; each library's own result is in the list.
///
/// # Errors
/// [`Error::UnsafePath`] or [`Error::Load`] for the directory.
pub fn load_dir(dir: &Path) -> Result<Vec<Loaded>, Error> {
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::Load {
        path: dir.to_owned(),
        reason: format!("cannot resolve it: {e}"),
    })?;
    let meta = std::fs::metadata(&dir).map_err(|e| Error::Load {
        path: dir.clone(),
        reason: e.to_string(),
    })?;
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(Error::UnsafePath {
            reason: format!(
                "the plugin directory is writable by group or others (mode {:o})",
                meta.permissions().mode() & 0o777
            ),
            path: dir,
        });
    }
    let mut libraries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| Error::Load {
            path: dir.clone(),
            reason: e.to_string(),
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    libraries.sort();
    Ok(libraries
        .into_iter()
        .map(|path| {
            let loaded = load(&path);
            (path, loaded)
        })
        .collect())
}

/// A checked descriptor, usable from any thread.
struct Descriptor(&'static DescriptorV1);

// SAFETY: the descriptor is immutable static data of a library that is never
// unloaded; the ABI requires its entry points to be callable from any thread.
unsafe impl Send for Descriptor {}
// SAFETY: as above.
unsafe impl Sync for Descriptor {}

/// The host's end of a loaded library.
struct LibraryChannel {
    descriptor: Descriptor,
    origin: Origin,
}

/// What the plugin's completion hands over: a reply's bytes, or the length of one over
/// [`MAX_MESSAGE`] (freed unread).
type Answer = Result<Vec<u8>, usize>;

/// Where a completion goes (boxed once more, so that the context is a thin pointer).
type Deliver = Box<dyn FnOnce(Answer) + Send>;

/// How long a plugin that let a call time out has to answer a `describe`, before it is
/// reported as wedged (every thread of its runtime blocked).
const WEDGE_PROBE: Duration = Duration::from_millis(250);

impl LibraryChannel {
    /// The reply in `answer`, or an error saying why there is none.
    fn reply_of(&self, op: &str, answer: Answer) -> vmkit_core::Result<Reply> {
        let bytes = answer.map_err(|size| {
            CoreError::backend(
                op.to_owned(),
                Error::Oversized {
                    origin: self.origin.to_string(),
                    what: "reply",
                    size,
                    limit: MAX_MESSAGE,
                },
            )
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            CoreError::backend(
                op.to_owned(),
                Error::Protocol {
                    origin: self.origin.to_string(),
                    what: format!("an unreadable reply: {e}"),
                },
            )
        })
    }

    /// Starts `req` in the plugin; `deliver` gets its answer, once. Returns the
    /// operation's id (for `cancel`).
    fn start(&self, req: &Request, deliver: Deliver) -> u64 {
        // Plain data with string keys: serialising cannot fail.
        let bytes = serde_json::to_vec(req).unwrap_or_default();
        let ctx = Box::into_raw(Box::new(deliver)).cast::<c_void>();
        let raw = RawStr {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        };
        // SAFETY: `bytes` outlives the call; `complete` reclaims `ctx` exactly once.
        unsafe { (self.descriptor.0.spawn)(raw, ctx, complete) }
    }

    fn cancel(&self, op: u64) {
        // SAFETY: the plugin's own entry point; a finished op id is ignored.
        unsafe { (self.descriptor.0.cancel)(op) };
    }

    /// Asks the plugin a `describe`, to tell a slow call from a wedged plugin: the
    /// probe's id and where its answer arrives.
    fn probe(&self) -> (u64, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let id = self.start(
            &Request::Describe,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        (id, rx)
    }

    /// The timeout of `op` after `limit`; `wedged` when the plugin did not even answer
    /// the probe (which is then cancelled).
    fn timed_out(&self, op: &str, limit: Duration, probe: u64, wedged: bool) -> CoreError {
        let why = if wedged {
            self.cancel(probe);
            format!(
                "; it answers nothing, not even describe within {WEDGE_PROBE:?}: every \
                 thread of its runtime is blocked (a plugin must never block inside an \
                 async call)"
            )
        } else {
            String::new()
        };
        CoreError::Timeout {
            op: format!("{op}: no answer from the plugin ({}){why}", self.origin),
            after: limit,
        }
    }
}

/// The completion callback: hands the reply (bounded) to its caller.
unsafe extern "C" fn complete(ctx: *mut c_void, reply: RawBuffer) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the Box made in `start`, handed back exactly once.
        let deliver = unsafe { Box::from_raw(ctx.cast::<Deliver>()) };
        // SAFETY: the plugin made the buffer with `RawBuffer::from_vec`.
        deliver(unsafe { reply.take_within(MAX_MESSAGE) });
    });
}

/// The event callback: each event to the instance's feed; the empty buffer frees it.
unsafe extern "C" fn event(ctx: *mut c_void, message: RawBuffer) {
    let _ = std::panic::catch_unwind(|| {
        let feed = ctx.cast::<Arc<InstanceFeed>>();
        if message.is_empty() {
            // SAFETY: the Box made in `subscribe`; the empty buffer is its last use.
            drop(unsafe { Box::from_raw(feed) });
            return;
        }
        // SAFETY: the plugin made the buffer with `RawBuffer::from_vec`.
        let Ok(bytes) = (unsafe { message.take_within(MAX_MESSAGE) }) else {
            tracing::warn!("vmkit-plugin: an event over {MAX_MESSAGE} bytes was dropped");
            return;
        };
        match serde_json::from_slice::<EventMessage>(&bytes) {
            // SAFETY: the Box lives until the empty buffer.
            Ok(message) => unsafe { &*feed }.publish(message.event),
            Err(e) => tracing::warn!(error = %e, "vmkit-plugin: an unreadable event was dropped"),
        }
    });
}

/// Cancels a spawned operation unless it has answered.
struct CancelOnDrop<'a> {
    channel: &'a LibraryChannel,
    op: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.channel.cancel(self.op);
        }
    }
}

#[async_trait]
impl Channel for LibraryChannel {
    async fn call(&self, req: Request, deadline: Option<Duration>) -> vmkit_core::Result<Reply> {
        let op = req.name();
        let (tx, rx) = oneshot::channel::<Answer>();
        let id = self.start(
            &req,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        let mut guard = CancelOnDrop {
            channel: self,
            op: id,
            armed: true,
        };
        let answer = match deadline {
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    drop(guard);
                    let (probe, answered) = self.probe();
                    let wedged = tokio::time::timeout(WEDGE_PROBE, answered).await.is_err();
                    return Err(self.timed_out(op, limit, probe, wedged));
                }
            },
            None => rx.await,
        };
        guard.armed = false;
        let answer = answer.map_err(|_| {
            CoreError::backend(
                op,
                Error::Protocol {
                    origin: self.origin.to_string(),
                    what: "it dropped the call without answering".into(),
                },
            )
        })?;
        self.reply_of(op, answer)
    }

    fn call_blocking(&self, req: Request, deadline: Duration) -> vmkit_core::Result<Reply> {
        // On the plugin's runtime like any call, so that a plugin that hangs cannot
        // hold this thread past the deadline (a direct `invoke` would).
        let op = req.name();
        let (tx, rx) = mpsc::channel::<Answer>();
        let id = self.start(
            &req,
            Box::new(move |answer| {
                let _ = tx.send(answer);
            }),
        );
        match rx.recv_timeout(deadline) {
            Ok(answer) => self.reply_of(op, answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.cancel(id);
                let (probe, mut answered) = self.probe();
                let began = std::time::Instant::now();
                let wedged = loop {
                    match answered.try_recv() {
                        Ok(_) => break false,
                        Err(oneshot::error::TryRecvError::Closed) => break true,
                        Err(oneshot::error::TryRecvError::Empty)
                            if began.elapsed() < WEDGE_PROBE =>
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(oneshot::error::TryRecvError::Empty) => break true,
                    }
                };
                Err(self.timed_out(op, deadline, probe, wedged))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(CoreError::backend(
                op,
                Error::Protocol {
                    origin: self.origin.to_string(),
                    what: "it dropped the call without answering".into(),
                },
            )),
        }
    }

    fn notify(&self, req: Request) {
        // Nobody waits: the reply is dropped when it comes.
        let _ = self.start(&req, Box::new(|_| {}));
    }

    fn subscribe(&self, instance: InstanceId, feed: Arc<InstanceFeed>) {
        let ctx = Box::into_raw(Box::new(feed)).cast::<c_void>();
        // SAFETY: `event` frees `ctx` on the stream's empty buffer, its last call.
        unsafe { (self.descriptor.0.subscribe)(instance, ctx, event) };
    }

    fn gone(&self) -> Option<String> {
        // A library cannot go away without this process.
        None
    }

    fn origin(&self) -> &Origin {
        &self.origin
    }
}
