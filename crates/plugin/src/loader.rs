//! Loading plugin libraries: [`load`] opens one, [`load_dir`] every `*.so` in a
//! directory. Before anything of a library runs, its place is checked (a regular file,
//! not writable by group or others, owned by this user or root, in directories that
//! are not writable by others unless sticky); it is opened with `RTLD_NOW |
//! RTLD_LOCAL | RTLD_NODELETE` (a missing symbol fails now, and it is never unloaded:
//! TLS destructors of an unloaded library crash); every field of its descriptor is
//! checked before its first function is called. Each failure is an [`Error`] naming
//! the file and what was wrong.

#![allow(unsafe_code)] // dlopen/dlsym and the descriptor's raw fields

use std::ffi::{CStr, CString, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, oneshot};
use vmkit_core::{Error as CoreError, VmEvent};

use crate::abi::{ABI_MAJOR, DescriptorV1, MAGIC, PANIC_UNWIND, RawBuffer, RawStr, SYMBOL, TARGET};
use crate::adapter::{Channel, Origin, PluginBackend};
use crate::error::Error;
use crate::wire::{EventMessage, InstanceId, Reply, Request, SCHEMA_VERSION};

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

/// The last `dlerror()` text.
fn dl_error() -> String {
    // SAFETY: dlerror returns a thread-local, NUL-terminated message or null.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null: a valid C string until the next dl* call on this thread.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
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
    let needed = std::mem::size_of::<DescriptorV1>();
    if (header.size as usize) < needed {
        return Err(wrong(
            "size",
            format!("{} bytes, at least {needed} expected", header.size),
        ));
    }
    // SAFETY: `size` says the whole version-1 descriptor is there, and it is 'static.
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

/// Loads the plugin library at `path` and describes its backend.
///
/// # Errors
/// [`Error::UnsafePath`], [`Error::Load`], [`Error::Descriptor`], each naming the file.
pub fn load(path: &Path) -> Result<PluginBackend, Error> {
    let path = std::fs::canonicalize(path).map_err(|e| Error::Load {
        path: path.to_owned(),
        reason: format!("cannot resolve it: {e}"),
    })?;
    if let Some(reason) = unsafe_place(&path) {
        return Err(Error::UnsafePath { path, reason });
    }
    if let Some(reason) = crate::elf::file_problem(&path) {
        return Err(Error::Load { path, reason });
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Load {
        path: path.clone(),
        reason: "the path holds a NUL byte".into(),
    })?;
    // SAFETY: a NUL-terminated path; the library's initialisers run here (that is
    // what loading a plugin means; its place was checked above).
    let handle = unsafe {
        libc::dlopen(
            c_path.as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    };
    if handle.is_null() {
        return Err(Error::Load {
            path,
            reason: dl_error(),
        });
    }
    // SAFETY: a live handle and a NUL-terminated symbol name.
    let symbol = unsafe { libc::dlsym(handle, SYMBOL.as_ptr().cast()) };
    if symbol.is_null() {
        return Err(Error::Descriptor {
            path,
            field: "symbol",
            reason: "no vmkit_plugin_v1: not a vmkit plugin (or one of another ABI major)".into(),
        });
    }
    // SAFETY: the symbol a vmkit plugin exports has this type (export_backend!).
    let entry: extern "C" fn() -> *const DescriptorV1 = unsafe { std::mem::transmute(symbol) };
    // A panic cannot leave an `extern "C"` function: the export catches its own.
    let descriptor = entry();
    // SAFETY: a plugin's descriptor is static data of the (never unloaded) library.
    let descriptor = unsafe { checked(&path, descriptor) }?;
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

/// The reply in `bytes`, or an error saying it was unreadable.
fn reply_of(bytes: &[u8]) -> vmkit_core::Result<Reply> {
    serde_json::from_slice(bytes).map_err(|e| {
        CoreError::backend(
            "plugin call",
            crate::wire::RemoteError(format!("an unreadable reply from the plugin: {e}")),
        )
    })
}

/// The completion callback: hands the reply to the waiting future.
unsafe extern "C" fn complete(ctx: *mut c_void, reply: RawBuffer) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: `ctx` is the Box made in `call`, handed back exactly once.
        let tx = unsafe { Box::from_raw(ctx.cast::<oneshot::Sender<Vec<u8>>>()) };
        // SAFETY: the plugin made the buffer with `RawBuffer::from_vec`.
        let _ = tx.send(unsafe { reply.take() });
    });
}

/// The event callback: each event to the instance's sender; the empty buffer frees it.
unsafe extern "C" fn event(ctx: *mut c_void, message: RawBuffer) {
    let _ = std::panic::catch_unwind(|| {
        let sink = ctx.cast::<broadcast::Sender<VmEvent>>();
        if message.is_empty() {
            // SAFETY: the Box made in `subscribe`; the empty buffer is its last use.
            drop(unsafe { Box::from_raw(sink) });
            return;
        }
        // SAFETY: the plugin made the buffer with `RawBuffer::from_vec`.
        let bytes = unsafe { message.take() };
        if let Ok(message) = serde_json::from_slice::<EventMessage>(&bytes) {
            // SAFETY: the Box lives until the empty buffer.
            let _ = unsafe { &*sink }.send(message.event);
        }
    });
}

/// Cancels a spawned operation unless it has answered.
struct CancelOnDrop {
    cancel: unsafe extern "C" fn(u64),
    op: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            // SAFETY: the plugin's own entry point; a finished op id is ignored.
            unsafe { (self.cancel)(self.op) };
        }
    }
}

impl LibraryChannel {
    fn start(&self, req: &Request) -> (u64, oneshot::Receiver<Vec<u8>>) {
        let bytes = serde_json::to_vec(req).unwrap_or_default();
        let (tx, rx) = oneshot::channel::<Vec<u8>>();
        let ctx = Box::into_raw(Box::new(tx)).cast::<c_void>();
        let raw = RawStr {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        };
        // SAFETY: `bytes` outlives the call; `complete` reclaims `ctx` exactly once.
        let op = unsafe { (self.descriptor.0.spawn)(raw, ctx, complete) };
        (op, rx)
    }
}

#[async_trait]
impl Channel for LibraryChannel {
    async fn call(&self, req: Request, deadline: Option<Duration>) -> vmkit_core::Result<Reply> {
        let (op, rx) = self.start(&req);
        let mut guard = CancelOnDrop {
            cancel: self.descriptor.0.cancel,
            op,
            armed: true,
        };
        let answer = match deadline {
            Some(limit) => {
                tokio::time::timeout(limit, rx)
                    .await
                    .map_err(|_| CoreError::Timeout {
                        op: format!("a call to the plugin ({})", self.origin),
                        after: limit,
                    })?
            }
            None => rx.await,
        };
        guard.armed = false;
        let bytes = answer.map_err(|_| {
            CoreError::backend(
                "plugin call",
                crate::wire::RemoteError("the plugin dropped the call".into()),
            )
        })?;
        reply_of(&bytes)
    }

    fn call_blocking(&self, req: Request, _deadline: Duration) -> vmkit_core::Result<Reply> {
        let bytes = serde_json::to_vec(&req).unwrap_or_default();
        let raw = RawStr {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        };
        // SAFETY: `bytes` outlives the call; the reply is the plugin's `from_vec`.
        let reply = unsafe { (self.descriptor.0.invoke)(raw).take() };
        reply_of(&reply)
    }

    fn notify(&self, req: Request) {
        // The receiver goes now: the reply is dropped when it comes.
        let _ = self.start(&req);
    }

    fn subscribe(&self, instance: InstanceId, sink: broadcast::Sender<VmEvent>) {
        let ctx = Box::into_raw(Box::new(sink)).cast::<c_void>();
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
