//! # vmkit-plugin-qemu
//!
//! vmkit's QEMU backend, built to arrive at run time: this library as a plugin
//! (`libvmkit_plugin_qemu.so`, loaded with `vmkit_plugin::loader::load`) and the
//! `vmkit-backend-qemu` executable, which serves it out of process
//! (`vmkit-backend-qemu qemu serve --socket PATH`, launched with
//! `vmkit_plugin::process::ProcessChannel::launch`).
//!
//! ```
//! use vmkit_core::Backend;
//! assert_eq!(vmkit_qemu::QemuBackend.name(), "qemu");
//! ```

vmkit_plugin::export_backend!(vmkit_qemu::QemuBackend);
