//! `vmkit-fake-vsock`: a hybrid vsock daemon stand-in; see `vmkit_testkit::fake_vsock`.

fn main() {
    std::process::exit(vmkit_testkit::fake_vsock::main());
}
