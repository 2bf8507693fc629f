//! Plugin libraries loaded into this process: the workspace's own (`vmkit-plugin-testing`,
//! FakeBackend with a create that panics and descriptors wrong on demand;
//! `vmkit-plugin-example`), a system library that is not a plugin, a truncated copy,
//! and copies in places others may write. `cargo xtask test` builds the libraries first.
//!
//! A custom harness: each wrong-descriptor case loads in a child process (this binary
//! with `VMKIT_PLUGIN_LOAD_CASE` set), so the case's environment stays its own; the
//! parent checks the child's words and that it exited normally.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a test binary

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;

use vmkit_core::{Backend, Instance, InstanceConfig, Registry, StartOptions};
use vmkit_plugin::loader;

const CASE_ENV: &str = "VMKIT_PLUGIN_LOAD_CASE";

mod common;
use common::{TestFn, config, slow_config};

fn main() -> ExitCode {
    if let Ok(case) = std::env::var(CASE_ENV) {
        if case == "wedge" {
            wedge_child();
            return ExitCode::SUCCESS;
        }
        // The child only loads and reports. An ABI 1.0 plugin takes no options: asked
        // for some it is refused, and with the defaults it loads.
        if case == "abi-1.0" {
            let options = loader::PluginOptions {
                worker_threads: 2,
                ..loader::PluginOptions::default()
            };
            if let Err(e) = loader::load_with(&library("vmkit_plugin_testing"), &options) {
                println!("{e}");
            }
        }
        match loader::load(&library("vmkit_plugin_testing")) {
            Ok(backend) => println!("loaded {} for {case}", backend.name()),
            Err(e) => println!("{e}"),
        }
        return ExitCode::SUCCESS;
    }
    let tests: &[(&str, TestFn)] = &[
        ("a_plugin_keeps_the_contract", conformance),
        ("the_example_plugin_keeps_the_contract", example),
        (
            "wrong_descriptors_are_named_and_nothing_is_called",
            wrong_descriptors,
        ),
        (
            "a_panic_in_the_plugin_is_an_error_and_it_keeps_serving",
            panic_in_create,
        ),
        ("a_library_that_is_not_a_plugin_is_named", not_a_plugin),
        ("a_truncated_library_is_a_load_error", truncated),
        ("libraries_others_may_write_are_refused", unsafe_places),
        ("a_plugin_directory_registers_each_backend", directory),
        ("a_plugins_log_records_reach_the_host", logs),
        (
            "a_hung_plugin_times_out_typed_and_leaves_nothing",
            hung_library,
        ),
        ("a_wedged_plugin_runtime_is_named", wedged_runtime),
    ];
    // Before any plugin is loaded: what the plugins log must arrive here.
    tracing::subscriber::set_global_default(Capture).unwrap();
    common::run("plugin library tests", tests)
}

/// `target/<profile>/lib<name>.so`, built by `cargo xtask test` (or `cargo build -p`).
fn library(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(format!("lib{name}.so"));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p {}` (`cargo xtask test` does)",
        path.display(),
        name.replace('_', "-")
    );
    path
}

struct Loaded {
    backend: vmkit_plugin::PluginBackend,
    dir: tempfile::TempDir,
    /// A fake behind the plugin: its start can be made slow (for `cancelled_start`).
    fake: bool,
}

#[async_trait::async_trait]
impl vmkit_testkit::conformance::Target for Loaded {
    fn backend(&self) -> &dyn Backend {
        &self.backend
    }

    fn config(&self, id: &str) -> InstanceConfig {
        config(self.dir.path(), id)
    }

    fn disk(&self) -> Option<PathBuf> {
        Some(self.dir.path().join("vmlinuz"))
    }

    fn nic(&self, id: &str) -> Option<vmkit_core::NicConfig> {
        Some(vmkit_core::NicConfig::user(id))
    }

    async fn crash(&self, _vm: &dyn Instance) -> bool {
        // The fake VMs live in the library's own copy of the testkit: out of reach.
        false
    }

    fn slow_start(&self, id: &str) -> Option<InstanceConfig> {
        self.fake.then(|| slow_config(self.dir.path(), id))
    }
}

fn conformance(rt: &tokio::runtime::Runtime) {
    let target = Loaded {
        backend: loader::load(&library("vmkit_plugin_testing")).unwrap(),
        dir: tempfile::tempdir().unwrap(),
        fake: true,
    };
    assert_eq!(target.backend.name(), "fake");
    let report = rt.block_on(vmkit_testkit::conformance::run(&target));
    report.assert_passed();
    // Only the crash check may be skipped here (the fakes are out of this copy's reach).
    let skipped: Vec<&str> = report.skipped().iter().map(|o| o.check).collect();
    assert_eq!(skipped, ["wait_after_a_crash"]);
}

fn example(rt: &tokio::runtime::Runtime) {
    let target = Loaded {
        backend: loader::load(&library("vmkit_plugin_example")).unwrap(),
        dir: tempfile::tempdir().unwrap(),
        fake: false,
    };
    assert_eq!(target.backend.name(), "null");
    let report = rt.block_on(vmkit_testkit::conformance::run(&target));
    report.assert_passed();
}

fn hung_library(rt: &tokio::runtime::Runtime) {
    let backend = loader::load(&library("vmkit_plugin_testing")).unwrap();
    common::hung_plugin(rt, &backend);
}

/// A plugin whose one runtime thread an async call blocks (the bug a plugin must not
/// have): its calls time out, typed, and the error says the runtime is wedged. In a
/// child process: the blocked thread stays blocked.
fn wedged_runtime(_rt: &tokio::runtime::Runtime) {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CASE_ENV, "wedge")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the host died: {out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in lines {
        assert!(
            line.contains("no answer from the plugin")
                && line.contains("every thread of its runtime is blocked"),
            "{line}"
        );
    }
}

/// The child of [`wedged_runtime`]: a one-thread plugin runtime, a pause that blocks
/// it, then a resume; prints each call's error.
fn wedge_child() {
    let options = loader::PluginOptions {
        worker_threads: 1,
        ..loader::PluginOptions::default()
    };
    let backend = loader::load_with(&library("vmkit_plugin_testing"), &options).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), "wedged");
    config.timeouts.command = std::time::Duration::from_millis(300);
    config
        .backend_options
        .insert("faults".into(), "pause=block".into());
    let vm = backend.create(config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(vm.start(StartOptions::new())).unwrap();
    for result in [rt.block_on(vm.pause()), rt.block_on(vm.resume())] {
        match result {
            Err(e) => println!("{e}"),
            Ok(()) => println!("answered"),
        }
    }
}

fn wrong_descriptors(_rt: &tokio::runtime::Runtime) {
    let me = std::env::current_exe().unwrap();
    for (mode, expected) in [
        (
            "bad-magic",
            "magic: [78, 79, 84, 86, 77, 75, 73, 84], expected",
        ),
        ("abi-2", "abi_major: ABI 2.1, this host speaks 1.x"),
        ("short", "size: 16 bytes, at least"),
        (
            "other-target",
            "target: \"riscv64gc-unknown-linux-gnu\", this host is",
        ),
        ("schema-1", "schema: 1, this host speaks 2"),
        (
            "old-vmkit",
            "vmkit_version: built with vmkit \"0.0.9\", this host is",
        ),
        (
            "panic-abort",
            "panic: built with panic=abort: a panic in it would abort this process",
        ),
        ("no-name", "name: empty or not UTF-8"),
        ("null", "descriptor: vmkit_plugin_v1 returned null"),
        (
            "abi-1.0",
            "configure: the plugin speaks ABI 1.0, which takes no options",
        ),
    ] {
        let out = Command::new(&me)
            .env(CASE_ENV, mode)
            .env("VMKIT_TEST_PLUGIN_DESCRIPTOR", mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode}: the host died: {out:?}");
        assert!(
            text.starts_with("plugin ") && text.contains("libvmkit_plugin_testing.so: "),
            "{mode}: the error names the file: {text}"
        );
        assert!(text.contains(expected), "{mode}: {text}");
        assert_eq!(
            text.contains("loaded fake"),
            mode == "abi-1.0",
            "{mode}: only an ABI 1.0 plugin with the default options loads: {text}"
        );
    }
}

fn panic_in_create(rt: &tokio::runtime::Runtime) {
    let backend = loader::load(&library("vmkit_plugin_testing")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = backend
        .create(config(dir.path(), "panic-1"))
        .err()
        .expect("a create that panics fails")
        .to_string();
    assert!(
        err.starts_with(
            "create: the backend panicked: the testing plugin panics for \"panic-1\" as told"
        ),
        "{err}"
    );
    // A panic inside an async call (its future polled on the plugin's runtime) too.
    let mut panicky = config(dir.path(), "boom-in-start");
    panicky
        .backend_options
        .insert("faults".into(), "start=panic".into());
    let vm = backend.create(panicky).unwrap();
    let err = rt
        .block_on(vm.start(StartOptions::new()))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("start: the backend panicked: the fake was told to panic in start"),
        "{err}"
    );
    // The plugin and this process go on.
    let vm = backend.create(config(dir.path(), "after")).unwrap();
    rt.block_on(vm.start(StartOptions::new())).unwrap();
    assert_eq!(vm.state(), vmkit_core::VmState::Running);
    rt.block_on(vm.shutdown()).unwrap();
    assert_eq!(vm.state(), vmkit_core::VmState::Shutdown);
}

fn not_a_plugin(_rt: &tokio::runtime::Runtime) {
    let system = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("libm, a shared library that is no plugin");
    let err = loader::load(&system).err().unwrap().to_string();
    assert!(
        err.contains("symbol: no vmkit_plugin_v1: not a vmkit plugin"),
        "{err}"
    );
}

/// A private copy of the testing library in a new directory.
fn copy(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(library("vmkit_plugin_testing"), &path).unwrap();
    path
}

fn truncated(_rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let path = copy(dir.path(), "libtruncated.so");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(4096).unwrap();
    let err = loader::load(&path).err().unwrap();
    assert!(matches!(err, vmkit_plugin::Error::Load { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "load plugin {}: ",
            path.canonicalize().unwrap().display()
        )),
        "{text}"
    );
}

fn unsafe_places(_rt: &tokio::runtime::Runtime) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    let path = copy(&open, "libplugin.so");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = loader::load(&path).err().unwrap().to_string();
    assert!(
        err.ends_with("(mode 777)") && err.contains("is writable by group or others"),
        "{err}"
    );
    let err = loader::load_dir(&open).err().unwrap().to_string();
    assert!(
        err.contains("the plugin directory is writable by group or others"),
        "{err}"
    );
    // A library others may write.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = loader::load(&path).err().unwrap().to_string();
    assert!(
        err.contains("refused: writable by group or others (mode 666)"),
        "{err}"
    );
}

fn directory(_rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["vmkit_plugin_example", "vmkit_plugin_testing"] {
        std::fs::copy(library(name), dir.path().join(format!("lib{name}.so"))).unwrap();
    }
    std::fs::write(dir.path().join("README"), b"not a library").unwrap();
    let loaded = loader::load_dir(dir.path()).unwrap();
    let mut registry = Registry::new();
    registry
        .register(Arc::new(vmkit_testkit::fake_backend::FakeBackend))
        .unwrap();
    let mut registry_of_plugins = Registry::new();
    for (path, backend) in loaded {
        let backend = backend.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        backend.register_into(&mut registry_of_plugins).unwrap();
    }
    assert_eq!(registry_of_plugins.names(), ["fake", "null"]);
    // The linked-in "fake" and the loaded one cannot share a registry: named, refused.
    let again = loader::load(&dir.path().join("libvmkit_plugin_testing.so")).unwrap();
    let err = again.register_into(&mut registry).unwrap_err().to_string();
    assert_eq!(err, "backend \"fake\" is registered twice");
    let listing = registry_of_plugins.listing();
    let null = listing.iter().find(|l| l.name == "null").unwrap();
    assert_eq!(
        null.origin,
        vmkit_core::BackendOrigin::Library(
            dir.path()
                .join("libvmkit_plugin_example.so")
                .canonicalize()
                .unwrap()
        )
    );
    assert_eq!(null.capabilities, vmkit_core::Capabilities::PAUSE);
    assert_eq!(registry.listing()[0].origin.to_string(), "linked in");
}

/// The records this process's `tracing` received from plugins (target `vmkit_plugin`).
static RECORDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// A subscriber that keeps the plugins' records as `field=value …` text.
struct Capture;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() == "vmkit_plugin" {
            let mut fields = Fields(format!("{} ", event.metadata().level()));
            event.record(&mut fields);
            RECORDS.lock().unwrap().push(fields.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn logs(_rt: &tokio::runtime::Runtime) {
    let backend = loader::load(&library("vmkit_plugin_testing")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    drop(backend.create(config(dir.path(), "logged-1")).unwrap());
    let records = RECORDS.lock().unwrap().clone();
    assert!(
        records.iter().any(|r| r.starts_with("INFO ")
            && r.contains("plugin_target=\"vmkit_plugin_testing\"")
            && r.contains("testing plugin: create id=logged-1")),
        "{records:?}"
    );
}
