//! The C ABI of an in-process plugin: one exported symbol ([`SYMBOL`]) returns a
//! `'static` [`DescriptorV1`]. Only plain C data, function pointers and byte buffers
//! cross; requests, replies and events are the [wire](crate::wire) schema's JSON. Every
//! owned buffer ([`RawBuffer`]) carries the free function of the side that allocated it,
//! so the two sides may use different allocators.
//!
//! Fields are only ever appended: a host reads `magic`, `abi_major` and `size` first (at
//! the same offsets in every version) and nothing beyond `size`. A change that is not an
//! append bumps the major version and renames the symbol.

#![allow(unsafe_code)] // the ABI: raw buffers handed between two copies of Rust

#[doc(hidden)]
pub mod export;

use std::ffi::c_void;

/// The first bytes of every descriptor.
pub const MAGIC: [u8; 8] = *b"VMKITPL\0";
/// The ABI's major version (the symbol's name carries it).
pub const ABI_MAJOR: u32 = 1;
/// The ABI's minor version (fields appended): 1 added [`DescriptorV1::configure`].
pub const ABI_MINOR: u32 = 1;
/// The exported symbol, NUL-terminated.
pub const SYMBOL: &[u8] = b"vmkit_plugin_v1\0";
/// The target triple this crate was built for.
pub const TARGET: &str = env!("VMKIT_PLUGIN_TARGET");
/// `panic` when panics unwind (and can be caught at the boundary), `abort` otherwise.
pub const PANIC_UNWIND: u32 = 0;
/// See [`PANIC_UNWIND`].
pub const PANIC_ABORT: u32 = 1;

/// This build's panic strategy, as a descriptor states it.
pub const fn panic_strategy() -> u32 {
    if cfg!(panic = "unwind") {
        PANIC_UNWIND
    } else {
        PANIC_ABORT
    }
}

/// A borrowed UTF-8 string (not NUL-terminated).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawStr {
    /// Its bytes.
    pub ptr: *const u8,
    /// Their count.
    pub len: usize,
}

impl RawStr {
    /// Borrows `s` (which must outlive every use of the result).
    pub const fn of(s: &str) -> RawStr {
        RawStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// `ptr` must point at `len` readable bytes that live as long as `'a`.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: the caller vouches for `len` readable bytes at `ptr` for `'a`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// An owned byte buffer and the function that frees it (the allocating side's).
#[repr(C)]
#[derive(Debug)]
pub struct RawBuffer {
    /// Its bytes (null for an empty buffer).
    pub ptr: *mut u8,
    /// Their count.
    pub len: usize,
    /// The allocation's capacity.
    pub cap: usize,
    /// Frees it; `None` for an empty buffer.
    pub free: Option<unsafe extern "C" fn(RawBuffer)>,
}

/// Frees a buffer made by [`RawBuffer::from_vec`] of this copy of the crate.
unsafe extern "C" fn free_vec(buffer: RawBuffer) {
    if !buffer.ptr.is_null() {
        // SAFETY: `from_vec` of this very copy made `ptr`, `len` and `cap` from a Vec
        // with this allocator, and the buffer is freed exactly once (the receiver's
        // `take` consumes it).
        drop(unsafe { Vec::from_raw_parts(buffer.ptr, buffer.len, buffer.cap) });
    }
}

impl RawBuffer {
    /// An empty buffer (the end of an event stream).
    pub const fn empty() -> RawBuffer {
        RawBuffer {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
            free: None,
        }
    }

    /// Hands `bytes` over; the receiver frees them with the buffer's `free`.
    pub fn from_vec(bytes: Vec<u8>) -> RawBuffer {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        RawBuffer {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
            free: Some(free_vec),
        }
    }

    /// Whether it is the empty buffer.
    pub fn is_empty(&self) -> bool {
        self.ptr.is_null()
    }

    /// Copies the bytes out and frees the buffer with its own `free`.
    ///
    /// # Safety
    /// The buffer must come from [`RawBuffer::from_vec`] (of either side) or be
    /// [`RawBuffer::empty`], and not have been taken before.
    pub unsafe fn take(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: a buffer from `from_vec` holds `len` initialised bytes at `ptr`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec();
        if let Some(free) = self.free {
            // SAFETY: `free` is the allocating side's own, called once, here.
            unsafe { free(self) };
        }
        bytes
    }

    /// [`RawBuffer::take`], unless the buffer holds more than `limit` bytes: then it is
    /// freed unread and its length is the error.
    ///
    /// # Safety
    /// As for [`RawBuffer::take`].
    pub unsafe fn take_within(self, limit: usize) -> Result<Vec<u8>, usize> {
        if self.len <= limit {
            // SAFETY: the caller's promise, passed on.
            return Ok(unsafe { self.take() });
        }
        let len = self.len;
        if let Some(free) = self.free {
            // SAFETY: `free` is the allocating side's own, called once, here.
            unsafe { free(self) };
        }
        Err(len)
    }
}

/// Called exactly once per spawned operation, from any thread, with its reply.
pub type CompleteFn = unsafe extern "C" fn(ctx: *mut c_void, reply: RawBuffer);
/// Called per event, from any thread; an empty buffer ends the stream (then never
/// again).
pub type EventFn = unsafe extern "C" fn(ctx: *mut c_void, event: RawBuffer);
/// The host's log sink: a level (1 error … 5 trace), the record's target and message.
pub type LogFn = unsafe extern "C" fn(level: u32, target: RawStr, message: RawStr);

/// What a plugin exports, version 1.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DescriptorV1 {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_MAJOR`] of the plugin's build.
    pub abi_major: u32,
    /// [`ABI_MINOR`] of the plugin's build.
    pub abi_minor: u32,
    /// `size_of::<DescriptorV1>()` in the plugin's build.
    pub size: u32,
    /// The wire schema's version.
    pub schema: u32,
    /// The vmkit-plugin version it was built with.
    pub vmkit_version: RawStr,
    /// Its target triple.
    pub target: RawStr,
    /// [`PANIC_UNWIND`] or [`PANIC_ABORT`].
    pub panic: u32,
    /// The backend's name.
    pub name: RawStr,
    /// The backend's capabilities (bits of `vmkit_core::Capabilities`).
    pub capabilities: u32,
    /// Prepares the plugin (its runtime, its log forwarding); 0 on success.
    pub init: unsafe extern "C" fn(log: Option<LogFn>) -> u32,
    /// Answers a request at once (for the contract's synchronous calls).
    pub invoke: unsafe extern "C" fn(request: RawStr) -> RawBuffer,
    /// Starts a request; `done(ctx, reply)` is called exactly once. Returns its id.
    pub spawn: unsafe extern "C" fn(request: RawStr, ctx: *mut c_void, done: CompleteFn) -> u64,
    /// Cancels a spawned request (its `done` is still called, with a cancellation).
    pub cancel: unsafe extern "C" fn(op: u64),
    /// Sends instance `instance`'s events to `on_event(ctx, …)` until they end.
    pub subscribe: unsafe extern "C" fn(instance: u64, ctx: *mut c_void, on_event: EventFn),
    /// ABI 1.1: takes the host's options for the plugin (JSON of
    /// [`PluginOptions`](crate::wire::PluginOptions)) before `init`; 0 on success.
    pub configure: unsafe extern "C" fn(options: RawStr) -> u32,
}

/// The size of an ABI 1.0 descriptor (without `configure`), the least a host of this
/// major version accepts.
pub const V1_0_SIZE: usize = std::mem::offset_of!(DescriptorV1, configure);

/// A descriptor that can live in a `static`.
#[derive(Debug)]
pub struct StaticDescriptor(pub DescriptorV1);

// SAFETY: the descriptor is immutable after construction; its pointers are to
// `'static` strings and its functions are plain `extern "C"` functions.
unsafe impl Sync for StaticDescriptor {}
// SAFETY: as above.
unsafe impl Send for StaticDescriptor {}

/// Hands one log record to the host's sink.
pub(crate) fn log_to(sink: LogFn, level: u32, target: &str, message: &str) {
    // SAFETY: the host's sink copies both strings before it returns; they outlive the
    // call.
    unsafe { sink(level, RawStr::of(target), RawStr::of(message)) };
}

/// A host pointer carried to another thread (the ABI's contexts are opaque to the
/// plugin and only handed back).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx(pub(crate) *mut c_void);

// SAFETY: the plugin never dereferences a context; it only passes it back to the
// host's callback, which is written to be called from any thread.
unsafe impl Send for Ctx {}
