//! The shim binary's life as containerd drives it: `start` (spawn the shim server, or
//! hand back the address of the pod's), the server, and `delete` (clean up after a
//! shim that died).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{ExitSignal, Shim, spawn};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;

use crate::config::ShimConfig;
use crate::container::{cleanup_bundle, short_key};
use crate::events::{Events, timestamp};
use crate::service::Service;

/// Where the shim server's address is kept, in the bundle.
const ADDRESS_FILE: &str = "address";

/// The annotation CRI sets on a pod's containers: the pod's sandbox id.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The shim.
pub(crate) struct VmkitShim {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

/// Which shim serves the container in the bundle at `cwd`: the pod's (every container
/// of one CRI sandbox shares one shim, so one VM), or its own.
fn grouping(id: &str, spec: Option<&serde_json::Value>) -> String {
    spec.and_then(|s| s["annotations"][SANDBOX_ID].as_str())
        .filter(|g| crate::container::check_id("sandbox", g).is_ok())
        .unwrap_or(id)
        .to_owned()
}

#[async_trait]
impl Shim for VmkitShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        VmkitShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: if args.bundle.is_empty() {
                std::env::current_dir().unwrap_or_default()
            } else {
                PathBuf::from(&args.bundle)
            },
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let spec = std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let group = grouping(&opts.id, spec.as_ref());
        let address = spawn(opts, &group, Vec::new()).await?;
        // The server removes its socket at its end by this file (cwd is the bundle);
        // `delete` does when the server was killed.
        write_str_to_file(ADDRESS_FILE, &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim that held this container is gone (containerd runs `delete` then):
        // its QEMU and daemons died with it (parent-death signal); what is left are
        // the mounts in the bundle and the VM's state dir.
        cleanup_bundle(&self.bundle, true);
        if let Ok(address) = std::fs::read_to_string(self.bundle.join(ADDRESS_FILE)) {
            let socket = address.trim().trim_start_matches("unix://");
            if socket.starts_with("/run/containerd/s/") && !socket.contains("..") {
                let _ = std::fs::remove_file(socket);
            }
        }
        if let Ok(config) = ShimConfig::load() {
            let dir = config
                .state_root
                .join(short_key(&format!("{}/{}", self.namespace, self.id)));
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(DeleteResponse {
            exit_status: 128 + 9,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let events = Events::new(publisher, self.namespace.clone());
        Service::new(&self.namespace, &self.id, events, self.exit.clone())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_pods_containers_share_the_pods_shim() {
        let pod = json!({"annotations": {SANDBOX_ID: "pod1", "io.kubernetes.cri.container-type": "container"}});
        assert_eq!(grouping("c1", Some(&pod)), "pod1");
        assert_eq!(grouping("c1", Some(&json!({}))), "c1");
        assert_eq!(grouping("c1", None), "c1");
        let hostile = json!({"annotations": {SANDBOX_ID: "../../etc"}});
        assert_eq!(grouping("c1", Some(&hostile)), "c1");
    }
}
