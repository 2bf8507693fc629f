//! Guest addresses and their URL forms: where a guest's agent listens, as
//! [`VmInfo::guest`](crate::VmInfo::guest) reports it and vmkit-vsock dials it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Where a guest listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum GuestAddr {
    /// Kernel vsock (`vhost-vsock`): the guest's context id and port.
    /// URL form: `vsock://<cid>:<port>`.
    Vsock {
        /// The guest's context id (3 or more).
        cid: u32,
        /// The port in the guest.
        port: u32,
    },
    /// Hybrid vsock: a Unix socket on the host (served by `vhost-device-vsock`,
    /// Firecracker or Cloud Hypervisor) where the client writes `CONNECT <port>\n` and
    /// reads `OK <n>\n`. URL form: `hvsock://<absolute socket path>:<port>`.
    HybridVsock {
        /// The Unix socket.
        uds: PathBuf,
        /// The port in the guest.
        port: u32,
    },
    /// The agent's host test mode (`vmkit-agent --unix DIR`, vmkit-testkit's fake VMs):
    /// no vsock, one Unix socket per port in `dir` — `agent.sock` for the TTRPC port
    /// (1025), `stream.sock` for the stream port (1026). URL form:
    /// `unix://<absolute dir>:<port>`.
    Unix {
        /// The directory holding the sockets.
        dir: PathBuf,
        /// The port asked for.
        port: u32,
    },
}

impl GuestAddr {
    /// The port in the guest.
    pub fn port(&self) -> u32 {
        match self {
            GuestAddr::Vsock { port, .. }
            | GuestAddr::HybridVsock { port, .. }
            | GuestAddr::Unix { port, .. } => *port,
        }
    }

    /// The same place, another port.
    #[must_use]
    pub fn with_port(&self, port: u32) -> GuestAddr {
        match self {
            GuestAddr::Vsock { cid, .. } => GuestAddr::Vsock { cid: *cid, port },
            GuestAddr::HybridVsock { uds, .. } => GuestAddr::HybridVsock {
                uds: uds.clone(),
                port,
            },
            GuestAddr::Unix { dir, .. } => GuestAddr::Unix {
                dir: dir.clone(),
                port,
            },
        }
    }
}

impl fmt::Display for GuestAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestAddr::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            GuestAddr::HybridVsock { uds, port } => {
                write!(f, "hvsock://{}:{port}", uds.display())
            }
            GuestAddr::Unix { dir, port } => write!(f, "unix://{}:{port}", dir.display()),
        }
    }
}

impl FromStr for GuestAddr {
    type Err = Error;

    fn from_str(url: &str) -> Result<GuestAddr, Error> {
        let bad = |reason: &str| Error::InvalidAddress {
            addr: url.to_owned(),
            reason: reason.to_owned(),
        };
        let port_of = |text: &str| {
            text.parse::<u32>().map_err(|_| {
                bad(&format!(
                    "port {text:?} is not a number from 0 to 4294967295"
                ))
            })
        };
        if let Some(rest) = url.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected vsock://<cid>:<port>"))?;
            let cid = cid
                .parse::<u32>()
                .map_err(|_| bad(&format!("cid {cid:?} is not a number")))?;
            if cid <= 2 || cid == u32::MAX {
                return Err(bad(&format!(
                    "cid {cid} is reserved (0-2 and 4294967295 are never a guest)"
                )));
            }
            return Ok(GuestAddr::Vsock {
                cid,
                port: port_of(port)?,
            });
        }
        for (scheme, what) in [("hvsock://", "socket path"), ("unix://", "directory")] {
            let Some(rest) = url.strip_prefix(scheme) else {
                continue;
            };
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("expected {scheme}<{what}>:<port>")))?;
            if !path.starts_with('/') {
                return Err(bad(&format!("the {what} must be absolute")));
            }
            if path.contains('\0') {
                return Err(bad(&format!("the {what} contains a NUL byte")));
            }
            let (path, port) = (PathBuf::from(path), port_of(port)?);
            return Ok(if scheme == "unix://" {
                GuestAddr::Unix { dir: path, port }
            } else {
                GuestAddr::HybridVsock { uds: path, port }
            });
        }
        Err(bad(
            "expected vsock://<cid>:<port>, hvsock://<socket path>:<port> or unix://<directory>:<port>",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls_parse_and_print_back() {
        for url in [
            "vsock://3:1025",
            "hvsock:///run/vm/a:b/vsock.sock:1026",
            "unix:///run/vm/a:1025",
        ] {
            assert_eq!(url.parse::<GuestAddr>().unwrap().to_string(), url);
        }
        assert_eq!(
            "hvsock:///run/vm/a:b/vsock.sock:1026"
                .parse::<GuestAddr>()
                .unwrap(),
            GuestAddr::HybridVsock {
                uds: "/run/vm/a:b/vsock.sock".into(),
                port: 1026
            }
        );
    }

    #[test]
    fn addresses_cross_as_json_with_their_kind() {
        let addr = GuestAddr::HybridVsock {
            uds: "/run/vm/vsock.sock".into(),
            port: 1025,
        };
        let json = serde_json::to_string(&addr).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"hybrid_vsock","uds":"/run/vm/vsock.sock","port":1025}"#
        );
        assert_eq!(serde_json::from_str::<GuestAddr>(&json).unwrap(), addr);
    }

    #[test]
    fn bad_urls_say_why() {
        let err = |url: &str| url.parse::<GuestAddr>().unwrap_err().to_string();
        assert_eq!(
            err("vsock://2:1025"),
            "invalid guest address \"vsock://2:1025\": cid 2 is reserved (0-2 and 4294967295 are never a guest)"
        );
        assert_eq!(
            err("vsock://3:http"),
            "invalid guest address \"vsock://3:http\": port \"http\" is not a number from 0 to 4294967295"
        );
        assert_eq!(
            err("hvsock://run/x.sock:1"),
            "invalid guest address \"hvsock://run/x.sock:1\": the socket path must be absolute"
        );
        assert_eq!(
            err("tcp://x:1"),
            "invalid guest address \"tcp://x:1\": expected vsock://<cid>:<port>, hvsock://<socket path>:<port> or unix://<directory>:<port>"
        );
        assert_eq!(
            err("unix://x:1"),
            "invalid guest address \"unix://x:1\": the directory must be absolute"
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics(url in ".*") {
            let _ = url.parse::<GuestAddr>();
        }

        #[test]
        fn every_address_round_trips(cid in 3u32..u32::MAX, port: u32, path in "(/[a-z:.]{1,8}){1,4}") {
            for addr in [
                GuestAddr::Vsock { cid, port },
                GuestAddr::HybridVsock { uds: path.clone().into(), port },
                GuestAddr::Unix { dir: path.clone().into(), port },
            ] {
                prop_assert_eq!(addr.to_string().parse::<GuestAddr>().unwrap(), addr);
            }
        }
    }
}
