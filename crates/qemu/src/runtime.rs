//! What vmkit-qemu needs of the caller's tokio runtime: a reactor (the IO driver, for
//! QMP and vsock sockets) and timers (every wait has a deadline). tokio panics when a
//! socket or a timer is made on a runtime without them; [`check`] asks first, so a
//! start from such a runtime is refused with an error before it takes anything.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use vmkit_core::Error as CoreError;

const HOW: &str = "build the runtime with tokio::runtime::Builder::enable_all() \
                   (#[tokio::main] and #[tokio::test] do)";

/// Checks that the current context is a tokio runtime with the IO and time drivers.
///
/// # Errors
/// [`CoreError::Runtime`] naming `op` and what is missing.
pub(crate) fn check(op: &str) -> Result<(), CoreError> {
    let refuse = |reason: String| CoreError::Runtime {
        op: op.to_owned(),
        reason,
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(refuse(format!("called outside a tokio runtime; {HOW}")));
    }
    // tokio offers no way to ask which drivers a runtime has: making a timer and a
    // socket is the question, and its panic the answer. The probe costs one socketpair.
    let timers = catch_unwind(AssertUnwindSafe(|| {
        drop(tokio::time::sleep(Duration::ZERO))
    }));
    if timers.is_err() {
        return Err(refuse(format!(
            "the tokio runtime has no time driver; {HOW}"
        )));
    }
    let io = catch_unwind(AssertUnwindSafe(|| {
        tokio::net::UnixStream::pair().map(drop)
    }));
    match io {
        Err(_) => Err(refuse(format!("the tokio runtime has no IO driver; {HOW}"))),
        Ok(Err(e)) => Err(CoreError::io(format!("{op}: probe the tokio runtime"), e)),
        Ok(Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(result: Result<(), CoreError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn a_full_runtime_passes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { check("start").unwrap() });
    }

    #[test]
    fn each_missing_driver_is_named() {
        let no_io = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let err = no_io.block_on(async { reason(check("start")) });
        assert!(
            err.starts_with("start: the tokio runtime has no IO driver; build"),
            "{err}"
        );
        let no_time = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let err = no_time.block_on(async { reason(check("start")) });
        assert!(
            err.starts_with("start: the tokio runtime has no time driver"),
            "{err}"
        );
        let err = reason(check("start"));
        assert!(
            err.starts_with("start: called outside a tokio runtime"),
            "{err}"
        );
    }
}
