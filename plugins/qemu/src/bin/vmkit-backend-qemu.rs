//! `vmkit-backend-qemu qemu serve --socket PATH`: the QEMU backend out of process.

fn main() {
    std::process::exit(vmkit_plugin::process::serve_main(std::sync::Arc::new(
        vmkit_qemu::QemuBackend,
    )));
}
