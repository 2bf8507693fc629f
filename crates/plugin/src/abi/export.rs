//! The plugin side of the C ABI: what [`export_backend!`](crate::export_backend)
//! expands to calls [`descriptor`], and the entry points here drive one
//! [`Dispatcher`] on the plugin's own tokio runtime (created by `init`, never dropped:
//! the host's runtime is another copy of tokio and must never poll the plugin's
//! futures). Every entry point catches panics and answers them as errors; every
//! spawned operation calls its completion exactly once, cancelled or not.

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmkit_core::{Backend, Error as CoreError};

use crate::abi::{
    ABI_MAJOR, ABI_MINOR, CompleteFn, Ctx, DescriptorV1, EventFn, LogFn, MAGIC, RawBuffer, RawStr,
    StaticDescriptor, TARGET, panic_strategy,
};
use crate::dispatch::{Dispatcher, panic_text};
use crate::wire::{EventMessage, PluginOptions, Reply, Request, SCHEMA_VERSION};

/// The plugin's state once `init` ran.
struct Exported {
    dispatcher: Arc<Dispatcher>,
    runtime: tokio::runtime::Runtime,
    ops: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next: AtomicU64,
}

static BACKEND: OnceLock<Arc<dyn Backend>> = OnceLock::new();
static OPTIONS: OnceLock<PluginOptions> = OnceLock::new();
static DESCRIPTOR: OnceLock<StaticDescriptor> = OnceLock::new();
static EXPORTED: OnceLock<Exported> = OnceLock::new();

/// The descriptor of the backend `make` builds (called once, on the first call).
/// Null when `make` panics. Used by [`export_backend!`](crate::export_backend).
#[doc(hidden)]
pub fn descriptor(make: fn() -> Arc<dyn Backend>) -> *const DescriptorV1 {
    let built = std::panic::catch_unwind(|| {
        DESCRIPTOR.get_or_init(|| {
            let backend = BACKEND.get_or_init(make);
            // Leaked once: the descriptor is 'static and the library is never unloaded.
            let name: &'static str = Box::leak(backend.name().to_owned().into_boxed_str());
            StaticDescriptor(DescriptorV1 {
                magic: MAGIC,
                abi_major: ABI_MAJOR,
                abi_minor: ABI_MINOR,
                size: u32::try_from(std::mem::size_of::<DescriptorV1>()).unwrap_or(u32::MAX),
                schema: SCHEMA_VERSION,
                vmkit_version: RawStr::of(env!("CARGO_PKG_VERSION")),
                target: RawStr::of(TARGET),
                panic: panic_strategy(),
                name: RawStr::of(name),
                capabilities: backend.capabilities().bits(),
                init,
                invoke,
                spawn,
                cancel,
                subscribe,
                configure,
            })
        })
    });
    match built {
        Ok(descriptor) => &descriptor.0,
        Err(_) => std::ptr::null(),
    }
}

fn reply_buffer(reply: &Reply) -> RawBuffer {
    // Plain data with string keys: serialising cannot fail.
    RawBuffer::from_vec(serde_json::to_vec(reply).unwrap_or_default())
}

fn failure(what: &str, why: String) -> Reply {
    Reply::failed(&CoreError::backend(
        what.to_owned(),
        crate::wire::RemoteError(why),
    ))
}

fn exported() -> Result<&'static Exported, Reply> {
    EXPORTED
        .get()
        .ok_or_else(|| failure("plugin call", "the plugin was not initialised".into()))
}

/// Reads a request out of `raw`.
///
/// # Safety
/// `raw` must point at `len` bytes that stay readable during the call.
unsafe fn request_of(raw: RawStr) -> Result<Request, Reply> {
    // SAFETY: the host passes a buffer it owns for the duration of the call.
    let bytes = unsafe { raw.bytes() };
    serde_json::from_slice(bytes)
        .map_err(|e| failure("plugin call", format!("an unreadable request: {e}")))
}

/// `init`: the runtime, the dispatcher, the log forwarding. 0 on success.
unsafe extern "C" fn init(log: Option<LogFn>) -> u32 {
    let done = std::panic::catch_unwind(|| {
        if let Some(log) = log {
            crate::logs::install(Box::new(move |level, target, message| {
                crate::abi::log_to(log, level, target, message);
            }));
        }
        if EXPORTED.get().is_some() {
            return 0;
        }
        let Some(backend) = BACKEND.get() else {
            return 2;
        };
        let options = OPTIONS.get().cloned().unwrap_or_default();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads)
            .max_blocking_threads(options.max_blocking_threads)
            .thread_name(format!("vmkit-plugin-{}", backend.name()))
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(_) => return 3,
        };
        let _ = EXPORTED.set(Exported {
            dispatcher: Arc::new(Dispatcher::new(Arc::clone(backend))),
            runtime,
            ops: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        });
        0
    });
    done.unwrap_or(1)
}

/// `configure`: the host's [`PluginOptions`], before `init`. 0 when taken; 4 when they
/// are unreadable or out of range; 5 when other options were taken first (a library
/// loaded twice: its one runtime has the first ones).
unsafe extern "C" fn configure(options: RawStr) -> u32 {
    let done = std::panic::catch_unwind(|| {
        // SAFETY: the host keeps the options' bytes alive during the call.
        let bytes = unsafe { options.bytes() };
        let Ok(options) = serde_json::from_slice::<PluginOptions>(bytes) else {
            return 4;
        };
        if options.validate().is_err() {
            return 4;
        }
        let wanted = options.clone();
        let taken = OPTIONS.get_or_init(|| options);
        if *taken != wanted {
            return 5;
        }
        0
    });
    done.unwrap_or(1)
}

/// `invoke`: answers at once (an operation that waits runs to its end on the plugin's
/// runtime, blocking the caller: the host sends only its synchronous calls here).
unsafe extern "C" fn invoke(request: RawStr) -> RawBuffer {
    let reply = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host keeps the request's bytes alive during the call.
        let req = match unsafe { request_of(request) } {
            Ok(req) => req,
            Err(reply) => return reply,
        };
        let plugin = match exported() {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        match plugin.dispatcher.answer_now(&req) {
            Some(reply) => reply,
            None => plugin
                .runtime
                .block_on(Arc::clone(&plugin.dispatcher).answer(req)),
        }
    }));
    let reply = reply.unwrap_or_else(|p| failure("plugin call", panic_text(p.as_ref())));
    reply_buffer(&reply)
}

/// Calls `done(ctx, reply)` once: with the reply, or with a cancellation when dropped
/// before (the operation was cancelled or its task panicked).
struct Completion {
    ctx: Ctx,
    done: CompleteFn,
    sent: bool,
}

impl Completion {
    fn send(mut self, reply: &Reply) {
        self.sent = true;
        // SAFETY: `done` and `ctx` came together from the host, which made `done` to
        // be called once per spawn from any thread; this is that once.
        unsafe { (self.done)(self.ctx.0, reply_buffer(reply)) };
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.sent {
            let reply = failure("plugin call", "the operation was cancelled".into());
            // SAFETY: as in `send`; `sent` is false, so this is the only call.
            unsafe { (self.done)(self.ctx.0, reply_buffer(&reply)) };
        }
    }
}

/// `spawn`: runs the request on the plugin's runtime; `done` gets the reply.
unsafe extern "C" fn spawn(request: RawStr, ctx: *mut c_void, done: CompleteFn) -> u64 {
    let completion = Completion {
        ctx: Ctx(ctx),
        done,
        sent: false,
    };
    // SAFETY: the host keeps the request's bytes alive during the call.
    let parsed = unsafe { request_of(request) };
    let started = std::panic::catch_unwind(AssertUnwindSafe(move || {
        let req = match parsed {
            Ok(req) => req,
            Err(reply) => {
                completion.send(&reply);
                return 0;
            }
        };
        let plugin = match exported() {
            Ok(p) => p,
            Err(reply) => {
                completion.send(&reply);
                return 0;
            }
        };
        let id = plugin.next.fetch_add(1, Ordering::Relaxed);
        let dispatcher = Arc::clone(&plugin.dispatcher);
        let task = plugin.runtime.spawn(async move {
            let reply = dispatcher.answer(req).await;
            completion.send(&reply);
            if let Ok(plugin) = exported() {
                plugin
                    .ops
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
        });
        plugin
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, task.abort_handle());
        id
    }));
    // A panic dropped the completion, which answered it.
    started.unwrap_or(0)
}

/// `cancel`: aborts a spawned operation (its completion answers with a cancellation).
unsafe extern "C" fn cancel(op: u64) {
    let _ = std::panic::catch_unwind(|| {
        if let Ok(plugin) = exported()
            && let Some(task) = plugin
                .ops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&op)
        {
            task.abort();
        }
    });
}

/// Sends events to `on_event(ctx, …)`; an empty buffer ends them (then never again).
struct EventSink {
    ctx: Ctx,
    on_event: EventFn,
}

impl EventSink {
    fn send(&self, bytes: Vec<u8>) {
        // SAFETY: the host made `on_event` to be called from any thread with its
        // `ctx` until the empty buffer; this is before it.
        unsafe { (self.on_event)(self.ctx.0, RawBuffer::from_vec(bytes)) };
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        // SAFETY: the one final call, with the empty buffer.
        unsafe { (self.on_event)(self.ctx.0, RawBuffer::empty()) };
    }
}

/// `subscribe`: forwards instance `instance`'s events until they end.
unsafe extern "C" fn subscribe(instance: u64, ctx: *mut c_void, on_event: EventFn) {
    let sink = EventSink {
        ctx: Ctx(ctx),
        on_event,
    };
    let _ = std::panic::catch_unwind(AssertUnwindSafe(move || {
        let Ok(plugin) = exported() else {
            return;
        };
        let forward = plugin.dispatcher.subscribe(instance, move |event| {
            let message = EventMessage { instance, event };
            sink.send(serde_json::to_vec(&message).unwrap_or_default());
        });
        if let Some(forward) = forward {
            plugin.runtime.spawn(forward);
        }
    }));
}

/// Turns a `Backend` into a plugin library: put it in a `cdylib` crate's `lib.rs`.
///
/// ```ignore
/// vmkit_plugin::export_backend!(my_backend::MyBackend::new());
/// ```
#[macro_export]
macro_rules! export_backend {
    ($backend:expr) => {
        /// The plugin's descriptor (vmkit-plugin's C ABI).
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn vmkit_plugin_v1() -> *const $crate::abi::DescriptorV1 {
            fn make() -> ::std::sync::Arc<dyn $crate::__core::Backend> {
                ::std::sync::Arc::new($backend)
            }
            $crate::abi::export::descriptor(make)
        }
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn make() -> Arc<dyn Backend> {
        Arc::new(vmkit_testkit::fake_backend::FakeBackend)
    }

    /// A completion that hands the reply to the test.
    unsafe extern "C" fn record(ctx: *mut c_void, reply: RawBuffer) {
        // SAFETY: the Box made below, handed back once.
        let tx = unsafe { Box::from_raw(ctx.cast::<mpsc::Sender<Reply>>()) };
        // SAFETY: the export made the buffer with `from_vec`.
        let bytes = unsafe { reply.take() };
        let _ = tx.send(serde_json::from_slice(&bytes).unwrap());
    }

    fn spawned(d: &DescriptorV1, req: &Request) -> (u64, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel();
        let bytes = serde_json::to_vec(req).unwrap();
        let ctx = Box::into_raw(Box::new(tx)).cast::<c_void>();
        let raw = RawStr {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        };
        // SAFETY: `bytes` outlives the call; `record` takes `ctx` back once.
        let op = unsafe { (d.spawn)(raw, ctx, record) };
        (op, rx)
    }

    #[test]
    fn a_cancelled_operation_completes_once_with_a_cancellation() {
        // SAFETY: this crate's own descriptor, 'static.
        let d = unsafe { &*descriptor(make) };
        // SAFETY: the descriptor's own entry point.
        assert_eq!(unsafe { (d.init)(None) }, 0);
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"never read").unwrap();
        let config = vmkit_core::InstanceConfig::new("cancel", dir.path().join("s"), &kernel);
        let (_, created) = spawned(
            d,
            &Request::Create {
                config: Box::new(config),
            },
        );
        let Reply::Created { instance } = created.recv_timeout(Duration::from_secs(5)).unwrap()
        else {
            panic!("not created");
        };
        let (_, started) = spawned(
            d,
            &Request::Start {
                instance,
                timeout_ms: None,
            },
        );
        assert_eq!(
            started.recv_timeout(Duration::from_secs(5)).unwrap(),
            Reply::Done
        );
        // `wait` on a running VM does not end by itself.
        let (op, waited) = spawned(d, &Request::Wait { instance });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            waited.try_recv().is_err(),
            "wait answered while the VM runs"
        );
        // SAFETY: the descriptor's own entry point.
        unsafe { (d.cancel)(op) };
        match waited.recv_timeout(Duration::from_secs(5)).unwrap() {
            Reply::Failed { error } => {
                assert!(
                    error
                        .into_core()
                        .to_string()
                        .contains("the operation was cancelled"),
                    "cancelled"
                );
            }
            other => panic!("a cancelled wait answered {other:?}"),
        }
        let (_, down) = spawned(d, &Request::Shutdown { instance });
        assert!(matches!(
            down.recv_timeout(Duration::from_secs(5)).unwrap(),
            Reply::Exit { .. }
        ));
    }
}
