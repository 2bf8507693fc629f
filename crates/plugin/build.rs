//! Records the target triple the crate is built for: a plugin's descriptor carries it,
//! and the loader refuses a library built for another target.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=VMKIT_PLUGIN_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
