//! # downstream-runtime
//!
//! A small sandbox manager, written the way a runtime built on vmkit would be: against
//! vmkit-core's traits and a [`Registry`] only, with no knowledge of any backend's
//! insides. Its own logic is what its tests check, with vmkit-testkit's mocks and
//! `FakeBackend` and no VM:
//!
//! - **create and start with retry**: a start that times out is cleaned up and tried
//!   again on a fresh instance, up to [`Policy::start_attempts`]; any other failure is
//!   final at once (a bad config will not get better);
//! - **resize on demand**: vCPUs through the backend's `CpuHotplugger`, refused clearly
//!   where the backend has none;
//! - **run commands** in a sandbox through its guest agent, each call bounded;
//! - **stop on idle**: sandboxes unused for [`Policy::idle_after`] are shut down.
//!
//! ```no_run
//! use std::time::Duration;
//! use downstream_runtime::{Policy, SandboxManager};
//!
//! # async fn run(registry: vmkit_core::Registry, config: vmkit_core::InstanceConfig) -> Result<(), downstream_runtime::ManagerError> {
//! let manager = SandboxManager::new(registry, "qemu", Policy::default());
//! manager.create(config).await?;
//! let out = manager.exec("sandbox-1", &["uname", "-a"]).await?;
//! manager.resize("sandbox-1", 2).await?;
//! manager.stop_idle().await;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use vmkit_core::{Error, Instance, InstanceConfig, Registry, StartOptions};
use vmkit_proto::AgentClient;
use vmkit_proto::agent::{ExecRequest, ExecResponse};

/// How the manager treats its sandboxes.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Starts tried before giving up (each on a fresh instance).
    pub start_attempts: u32,
    /// The deadline of each start.
    pub start_timeout: Duration,
    /// The pause between attempts.
    pub retry_pause: Duration,
    /// The deadline of each command in a sandbox.
    pub exec_timeout: Duration,
    /// How long a sandbox may go unused before [`SandboxManager::stop_idle`] stops it.
    pub idle_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            start_attempts: 3,
            start_timeout: Duration::from_secs(30),
            retry_pause: Duration::from_millis(200),
            exec_timeout: Duration::from_secs(10),
            idle_after: Duration::from_secs(300),
        }
    }
}

/// What went wrong in the manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// vmkit refused or failed an operation.
    #[error("{sandbox}: {source}")]
    Vmkit {
        /// The sandbox.
        sandbox: String,
        /// vmkit's error.
        #[source]
        source: Error,
    },
    /// Every start attempt timed out.
    #[error("{sandbox}: no start succeeded in {attempts} attempts; the last: {last}")]
    StartGaveUp {
        /// The sandbox.
        sandbox: String,
        /// How many were made.
        attempts: u32,
        /// The last attempt's error.
        last: Error,
    },
    /// No sandbox of that name.
    #[error("no sandbox {0:?}")]
    Unknown(String),
    /// A sandbox of that name exists already.
    #[error("sandbox {0:?} exists already")]
    Exists(String),
    /// The backend cannot do what was asked.
    #[error("{sandbox}: {what} is not offered by this backend")]
    Unsupported {
        /// The sandbox.
        sandbox: String,
        /// What was asked.
        what: &'static str,
    },
    /// A call to the guest agent failed.
    #[error("{sandbox}: {call}: {cause}")]
    Guest {
        /// The sandbox.
        sandbox: String,
        /// The agent call.
        call: &'static str,
        /// What it returned.
        cause: String,
    },
}

struct Sandbox {
    vm: Box<dyn Instance>,
    last_used: Instant,
}

/// Creates, resizes, uses and stops sandboxes (one VM each).
pub struct SandboxManager {
    registry: Registry,
    backend: String,
    policy: Policy,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

impl SandboxManager {
    /// A manager that creates its VMs with `backend` from `registry`.
    pub fn new(registry: Registry, backend: &str, policy: Policy) -> SandboxManager {
        SandboxManager {
            registry,
            backend: backend.to_owned(),
            policy,
            sandboxes: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the sandbox `config.id` and starts it, retrying a start that timed out.
    ///
    /// # Errors
    /// [`ManagerError::Exists`], [`ManagerError::Vmkit`] for a create or a start that
    /// failed other than by timing out, [`ManagerError::StartGaveUp`].
    pub async fn create(&self, config: InstanceConfig) -> Result<(), ManagerError> {
        let id = config.id.clone();
        if self.sandboxes.lock().await.contains_key(&id) {
            return Err(ManagerError::Exists(id));
        }
        let vmkit = |source| ManagerError::Vmkit {
            sandbox: id.clone(),
            source,
        };
        let mut attempt = 0;
        let vm = loop {
            attempt += 1;
            let vm = self
                .registry
                .create(&self.backend, config.clone())
                .map_err(vmkit)?;
            match vm
                .start(StartOptions::with_timeout(self.policy.start_timeout))
                .await
            {
                Ok(()) => break vm,
                Err(e) => {
                    // Whatever the failure, nothing of this attempt may stay behind.
                    let _ = vm.shutdown().await;
                    match e {
                        Error::Timeout { .. } if attempt < self.policy.start_attempts => {
                            tokio::time::sleep(self.policy.retry_pause).await;
                        }
                        Error::Timeout { .. } => {
                            return Err(ManagerError::StartGaveUp {
                                sandbox: id,
                                attempts: attempt,
                                last: e,
                            });
                        }
                        other => return Err(vmkit(other)),
                    }
                }
            }
        };
        self.sandboxes.lock().await.insert(
            id,
            Sandbox {
                vm,
                last_used: Instant::now(),
            },
        );
        Ok(())
    }

    /// Grows or shrinks the sandbox to `vcpus`; returns how many it has now.
    ///
    /// # Errors
    /// [`ManagerError::Unknown`], [`ManagerError::Unsupported`] without vCPU hot-plug,
    /// [`ManagerError::Vmkit`].
    pub async fn resize(&self, sandbox: &str, vcpus: u32) -> Result<u32, ManagerError> {
        let mut all = self.sandboxes.lock().await;
        let entry = all
            .get_mut(sandbox)
            .ok_or_else(|| ManagerError::Unknown(sandbox.to_owned()))?;
        entry.last_used = Instant::now();
        let cpus = entry.vm.cpu_hotplugger().ok_or(ManagerError::Unsupported {
            sandbox: sandbox.to_owned(),
            what: "vCPU hot-plug",
        })?;
        let resized = cpus
            .set_vcpus(vcpus)
            .await
            .map_err(|source| ManagerError::Vmkit {
                sandbox: sandbox.to_owned(),
                source,
            })?;
        Ok(resized.achieved)
    }

    /// Runs `argv` in the sandbox through its guest agent, within the policy's deadline.
    ///
    /// # Errors
    /// [`ManagerError::Unknown`], [`ManagerError::Vmkit`] when the agent cannot be
    /// reached, [`ManagerError::Guest`] when the call fails.
    pub async fn exec(&self, sandbox: &str, argv: &[&str]) -> Result<ExecResponse, ManagerError> {
        let client = {
            let mut all = self.sandboxes.lock().await;
            let entry = all
                .get_mut(sandbox)
                .ok_or_else(|| ManagerError::Unknown(sandbox.to_owned()))?;
            entry.last_used = Instant::now();
            entry
                .vm
                .client()
                .await
                .map_err(|source| ManagerError::Vmkit {
                    sandbox: sandbox.to_owned(),
                    source,
                })?
        };
        let mut req = ExecRequest::new();
        req.argv = argv.iter().map(|a| (*a).to_owned()).collect();
        let nanos = i64::try_from(self.policy.exec_timeout.as_nanos()).unwrap_or(i64::MAX);
        AgentClient::new(client)
            .exec(ttrpc::context::with_timeout(nanos), &req)
            .await
            .map_err(|e| ManagerError::Guest {
                sandbox: sandbox.to_owned(),
                call: "Exec",
                cause: e.to_string(),
            })
    }

    /// Shuts down and forgets every sandbox unused for `idle_after`; returns their names.
    pub async fn stop_idle(&self) -> Vec<String> {
        let idle: Vec<(String, Sandbox)> = {
            let mut all = self.sandboxes.lock().await;
            let names: Vec<String> = all
                .iter()
                .filter(|(_, s)| s.last_used.elapsed() >= self.policy.idle_after)
                .map(|(name, _)| name.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|name| all.remove(&name).map(|s| (name, s)))
                .collect()
        };
        let mut stopped = Vec::new();
        for (name, sandbox) in idle {
            let _ = sandbox.vm.shutdown().await;
            stopped.push(name);
        }
        stopped.sort();
        stopped
    }

    /// Shuts the sandbox down and forgets it.
    ///
    /// # Errors
    /// [`ManagerError::Unknown`], [`ManagerError::Vmkit`].
    pub async fn stop(&self, sandbox: &str) -> Result<(), ManagerError> {
        let entry = self
            .sandboxes
            .lock()
            .await
            .remove(sandbox)
            .ok_or_else(|| ManagerError::Unknown(sandbox.to_owned()))?;
        entry
            .vm
            .shutdown()
            .await
            .map(drop)
            .map_err(|source| ManagerError::Vmkit {
                sandbox: sandbox.to_owned(),
                source,
            })
    }

    /// The sandboxes' names, sorted.
    pub async fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sandboxes.lock().await.keys().cloned().collect();
        names.sort();
        names
    }
}
