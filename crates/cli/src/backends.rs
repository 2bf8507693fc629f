//! `vmkit backends`: the backends this binary has (linked in) and those given on the
//! command line (plugin libraries, plugin directories, backend executables), each with
//! where it came from and what it can do.

use std::path::PathBuf;

use vmkit_core::Registry;
use vmkit_plugin::PluginBackend;
use vmkit_plugin::process::ProcessChannel;

use crate::args::BackendSources;

/// Where to look for more backends.
#[derive(Debug, Default)]
pub(crate) struct Options {
    dirs: Vec<PathBuf>,
    libraries: Vec<PathBuf>,
    processes: Vec<(String, PathBuf)>,
}

impl Options {
    /// The sources `vmkit backends` was given.
    pub(crate) fn from_args(sources: &BackendSources) -> Result<Options, String> {
        let processes = sources
            .processes
            .iter()
            .map(|spec| {
                spec.split_once('=')
                    .filter(|(name, exe)| !name.is_empty() && !exe.is_empty())
                    .map(|(name, exe)| (name.to_owned(), PathBuf::from(exe)))
                    .ok_or(format!("--process {spec:?}: expected NAME=EXECUTABLE"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Options {
            dirs: sources.dirs.clone(),
            libraries: sources.libraries.clone(),
            processes,
        })
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

    #[test]
    fn every_source_is_read_and_a_bad_one_is_named() {
        let sources = BackendSources {
            dirs: vec!["/opt/vmkit/plugins".into()],
            libraries: vec!["/opt/x.so".into()],
            processes: vec!["qemu=/usr/libexec/vmkit-backend-qemu".into()],
        };
        let opts = Options::from_args(&sources).unwrap();
        assert_eq!(opts.dirs, [PathBuf::from("/opt/vmkit/plugins")]);
        assert_eq!(opts.libraries, [PathBuf::from("/opt/x.so")]);
        assert_eq!(
            opts.processes,
            [(
                "qemu".to_owned(),
                PathBuf::from("/usr/libexec/vmkit-backend-qemu")
            )]
        );
        let bad = BackendSources {
            processes: vec!["qemu".into()],
            ..BackendSources::default()
        };
        let err = Options::from_args(&bad).unwrap_err();
        assert_eq!(err, "--process \"qemu\": expected NAME=EXECUTABLE");
    }
}
