//! Where the agent reads the guest's kernel state: `/` in a guest, or a directory laid
//! out like it (`proc/meminfo`, `sys/devices/system/cpu/online`, …) in the host test
//! mode, where a fake guest keeps those files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The root the agent's `/proc` and `/sys` paths are read under.
#[derive(Debug, Clone)]
pub(crate) struct Root(Arc<PathBuf>);

impl Root {
    /// The root under `dir`.
    pub(crate) fn at(dir: &Path) -> Root {
        Root(Arc::new(dir.to_owned()))
    }

    /// The file the kernel path `abs` (e.g. `/proc/meminfo`) names under this root.
    pub(crate) fn path(&self, abs: &str) -> PathBuf {
        self.0.join(abs.trim_start_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_paths_are_taken_under_the_root() {
        assert_eq!(
            Root::at(Path::new("/")).path("/proc/meminfo"),
            Path::new("/proc/meminfo")
        );
        assert_eq!(
            Root::at(Path::new("/tmp/guest")).path("/sys/block"),
            Path::new("/tmp/guest/sys/block")
        );
    }
}
