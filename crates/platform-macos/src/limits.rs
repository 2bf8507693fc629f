//! The limits macOS sets that Linux does not share.

/// The longest Unix socket path macOS accepts: `sun_path` is 104 bytes there, the last
/// for the NUL (Linux: 108, so 107).
pub const SUN_PATH_MAX: usize = 103;

/// Checks that `path` fits a macOS Unix socket address.
///
/// # Errors
/// The message says how long the path is and what fits.
pub fn check_socket_path(path: &std::path::Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(format!(
            "socket path {} is {len} bytes; on macOS a Unix socket path holds at most {SUN_PATH_MAX}",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn one_hundred_and_three_bytes_fit_and_one_more_does_not() {
        let fits = PathBuf::from(format!("/{}", "s".repeat(102)));
        assert_eq!(fits.as_os_str().len(), 103);
        check_socket_path(&fits).unwrap();
        let long = PathBuf::from(format!("/{}", "s".repeat(103)));
        assert_eq!(
            check_socket_path(&long).unwrap_err(),
            format!(
                "socket path {} is 104 bytes; on macOS a Unix socket path holds at most 103",
                long.display()
            )
        );
    }
}
