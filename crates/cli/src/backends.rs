//! `vmkit backends`: the backends this binary has (linked in) and those given on the
//! command line (plugin libraries, plugin directories, backend executables), each with
//! where it came from and what it can do.

use std::path::PathBuf;

use vmkit_core::Registry;
use vmkit_plugin::PluginBackend;
use vmkit_plugin::process::ProcessChannel;

/// The usage line.
pub(crate) const USAGE: &str =
    "vmkit backends [--plugins DIR]... [--library FILE]... [--process NAME=EXECUTABLE]...";

/// Where to look for more backends.
#[derive(Debug, Default)]
pub(crate) struct Options {
    dirs: Vec<PathBuf>,
    libraries: Vec<PathBuf>,
    processes: Vec<(String, PathBuf)>,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Options, String> {
        let mut opts = Options::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or(format!("{arg} needs a value\nusage: {USAGE}"))
            };
            match arg.as_str() {
                "--plugins" => opts.dirs.push(value()?.into()),
                "--library" => opts.libraries.push(value()?.into()),
                "--process" => {
                    let spec = value()?;
                    let (name, exe) = spec
                        .split_once('=')
                        .ok_or(format!("--process {spec:?}: expected NAME=EXECUTABLE"))?;
                    opts.processes.push((name.to_owned(), exe.into()));
                }
                other => return Err(format!("unknown argument {other:?}\nusage: {USAGE}")),
            }
        }
        Ok(opts)
    }
}

/// Builds the registry and prints it; a backend that cannot be brought in is reported
/// and the others are still listed.
pub(crate) fn run(opts: &Options) -> Result<(), String> {
    let mut registry = Registry::from_inventory().map_err(|e| e.to_string())?;
    let mut brought: Vec<Result<PluginBackend, String>> = Vec::new();
    let mut failures = Vec::new();
    for dir in &opts.dirs {
        match vmkit_plugin::loader::load_dir(dir) {
            Ok(loaded) => brought.extend(
                loaded
                    .into_iter()
                    .map(|(_, b)| b.map_err(|e| e.to_string())),
            ),
            Err(e) => failures.push(e.to_string()),
        }
    }
    for library in &opts.libraries {
        brought.push(vmkit_plugin::loader::load(library).map_err(|e| e.to_string()));
    }
    for (name, exe) in &opts.processes {
        brought.push(
            ProcessChannel::launch(exe, name)
                .map_err(|e| e.to_string())
                .and_then(|ch| PluginBackend::describe(ch).map_err(|e| e.to_string())),
        );
    }
    for backend in brought {
        match backend.and_then(|b| b.register_into(&mut registry).map_err(|e| e.to_string())) {
            Ok(()) => {}
            Err(e) => failures.push(e),
        }
    }
    println!("{:<10} {:<60} CAPABILITIES", "NAME", "ORIGIN");
    for line in registry.listing() {
        println!(
            "{:<10} {:<60} {}",
            line.name,
            line.origin.to_string(),
            line.capabilities
        );
    }
    for failure in &failures {
        eprintln!("vmkit backends: {failure}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} backend(s) could not be brought in",
            failures.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_source_is_read_and_a_bad_one_is_named() {
        let opts = Options::parse(&args(&[
            "--plugins",
            "/opt/vmkit/plugins",
            "--library",
            "/opt/x.so",
            "--process",
            "qemu=/usr/libexec/vmkit-backend-qemu",
        ]))
        .unwrap();
        assert_eq!(opts.dirs, [PathBuf::from("/opt/vmkit/plugins")]);
        assert_eq!(opts.libraries, [PathBuf::from("/opt/x.so")]);
        assert_eq!(
            opts.processes,
            [(
                "qemu".to_owned(),
                PathBuf::from("/usr/libexec/vmkit-backend-qemu")
            )]
        );
        let err = Options::parse(&args(&["--process", "qemu"])).unwrap_err();
        assert_eq!(err, "--process \"qemu\": expected NAME=EXECUTABLE");
        let err = Options::parse(&args(&["--library"])).unwrap_err();
        assert!(err.starts_with("--library needs a value"), "{err}");
    }
}
