//! `vmkit-fake-qemu`: a QEMU stand-in for failure tests; see `vmkit_testkit::fake_qemu`.

fn main() {
    std::process::exit(vmkit_testkit::fake_qemu::main());
}
