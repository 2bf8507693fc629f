//! `vmkit`: the command-line face of vmkit.
//!
//! ```text
//! vmkit demo [--image-dir DIR] [--no-nic]
//! vmkit backends [--plugins DIR]... [--library FILE]... [--process NAME=EXECUTABLE]...
//! ```
//!
//! `demo` boots the test guest (`cargo xtask image`) with a disk and, where TAP
//! devices can be created, a NIC; prints each step with its time; pauses and resumes;
//! shuts down gracefully; and checks that nothing was left behind. `backends` lists the
//! backends linked in and those brought in from plugins, with their origin and
//! capabilities.

mod backends;
mod demo;

use std::process::ExitCode;

const USAGE: &str = "usage: vmkit demo [--image-dir DIR] [--no-nic]\n       \
                     vmkit backends [--plugins DIR]... [--library FILE]... [--process NAME=EXECUTABLE]...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::Options::parse(&args[1..]).and_then(|opts| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            runtime.block_on(demo::run(opts))
        }),
        Some("backends") => backends::Options::parse(&args[1..]).and_then(|o| backends::run(&o)),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("vmkit: {message}");
            ExitCode::FAILURE
        }
    }
}
