//! # vmkit-plugin-testing
//!
//! A plugin library for vmkit-plugin's loader tests. It exports vmkit-testkit's
//! `FakeBackend` (`"fake"`), except that creating an instance whose id starts with
//! `panic` panics inside the plugin; and `VMKIT_TEST_PLUGIN_DESCRIPTOR` makes its
//! descriptor wrong when it is asked for: `bad-magic`, `abi-2`, `short`, `other-target`,
//! `schema-1`, `old-vmkit`, `panic-abort`, `no-name`, `null` — or an older one that is
//! still right: `abi-1.0` (no `configure`). Each create logs an INFO record (its own copy of `tracing`), which the host
//! must receive.

use std::sync::Arc;

use vmkit_core::{Backend, Capabilities, Instance, InstanceConfig};
use vmkit_plugin::abi::DescriptorV1;
use vmkit_testkit::fake_backend::FakeBackend;

/// FakeBackend, with a create that panics on demand.
struct Testing;

impl Backend for Testing {
    fn name(&self) -> &str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        FakeBackend.capabilities()
    }

    fn create(&self, config: InstanceConfig) -> vmkit_core::Result<Box<dyn Instance>> {
        assert!(
            !config.id.starts_with("panic"),
            "the testing plugin panics for {:?} as told",
            config.id
        );
        tracing::info!(id = %config.id, "testing plugin: create");
        FakeBackend.create(config)
    }
}

fn make() -> Arc<dyn Backend> {
    Arc::new(Testing)
}

/// The descriptor, made wrong as `VMKIT_TEST_PLUGIN_DESCRIPTOR` says.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn vmkit_plugin_v1() -> *const DescriptorV1 {
    let good = vmkit_plugin::abi::export::descriptor(make);
    let Ok(mode) = std::env::var("VMKIT_TEST_PLUGIN_DESCRIPTOR") else {
        return good;
    };
    if good.is_null() || mode == "null" {
        return std::ptr::null();
    }
    // SAFETY: `good` is the export's 'static descriptor (checked non-null above).
    let mut wrong = unsafe { *good };
    match mode.as_str() {
        "bad-magic" => wrong.magic = *b"NOTVMKIT",
        "abi-2" => wrong.abi_major = 2,
        "short" => wrong.size = 16,
        "other-target" => {
            wrong.target = vmkit_plugin::abi::RawStr::of("riscv64gc-unknown-linux-gnu")
        }
        "schema-1" => wrong.schema = 1,
        "old-vmkit" => wrong.vmkit_version = vmkit_plugin::abi::RawStr::of("0.0.9"),
        "panic-abort" => wrong.panic = vmkit_plugin::abi::PANIC_ABORT,
        "no-name" => wrong.name = vmkit_plugin::abi::RawStr::of(""),
        // An ABI 1.0 plugin: no `configure` (its size ends before it).
        "abi-1.0" => {
            wrong.abi_minor = 0;
            wrong.size = u32::try_from(vmkit_plugin::abi::V1_0_SIZE).unwrap_or(0);
        }
        _ => return good,
    }
    // Leaked: a descriptor must be 'static, and a test asks only a few times.
    Box::leak(Box::new(wrong))
}
