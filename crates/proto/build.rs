//! Generates the agent's messages (rust-protobuf, pure Rust: no `protoc`) and its
//! async TTRPC client and server into `OUT_DIR`, plus `generated.rs`, which declares
//! the generated files as modules by path: `include!`-ing them directly fails on their
//! inner attributes.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed=proto/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .unwrap_or_else(|e| panic!("ttrpc codegen for proto/agent.proto: {e}"));
    let modules = ["agent", "agent_ttrpc"]
        .iter()
        .map(|name| {
            format!(
                "#[path = {:?}]\npub mod {name};\n",
                out.join(format!("{name}.rs")).display().to_string()
            )
        })
        .collect::<String>();
    std::fs::write(out.join("generated.rs"), modules)
        .unwrap_or_else(|e| panic!("write generated.rs: {e}"));
}
