//! containerd's task service over the shim's containers and their VM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::{TtrpcContext, TtrpcResult, api};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::types::task::Status as TaskStatus;

use crate::config::ShimConfig;
use crate::container::{Container, short_key};
use crate::error::{Error, Result};
use crate::events::{Events, timestamp};
use crate::process::{Exit, Proc, Status};
use crate::resize::Ask;
use crate::sandbox::{self, Sandbox};
use crate::stats;
use crate::stdio::StdioPaths;

/// The task service of one shim: the containers it holds and their VM.
pub(crate) struct Service {
    namespace: String,
    /// Names the VM's state dir: the shim's id (the pod's, or the container's).
    key: String,
    events: Events,
    exit: Arc<ExitSignal>,
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    /// The VM's pid on the host, once it runs: the pid containerd is told for every
    /// process (a guest pid means nothing on the host).
    vm_pid: AtomicU32,
    /// The guest pid of the pod's sandbox container, once it runs.
    sandbox_pid: Mutex<Option<u32>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl Service {
    pub(crate) fn new(
        namespace: &str,
        shim_id: &str,
        events: Events,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service {
            namespace: namespace.to_owned(),
            key: short_key(&format!("{namespace}/{shim_id}")),
            events,
            exit,
            sandbox: tokio::sync::Mutex::new(None),
            vm_pid: AtomicU32::new(0),
            sandbox_pid: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        self.containers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found("task", format!("container {id}")))
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>> {
        self.sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| Error::state("task", "the VM is not running"))
    }

    /// Shares `container`'s directory with the VM (booting it for the first container)
    /// and mounts it in the guest.
    async fn attach(&self, container: &Container) -> Result<Arc<Sandbox>> {
        let share = sandbox::share(&container.share_id, &container.tag, container.host_dir());
        let mut slot = self.sandbox.lock().await;
        let vm = match slot.as_ref() {
            Some(vm) => {
                vm.add_share(share).await?;
                vm.clone()
            }
            None => {
                let config = ShimConfig::load()?;
                let vm = Arc::new(Sandbox::boot(&config, &self.key, share).await?);
                self.vm_pid.store(vm.pid(), Ordering::Relaxed);
                *slot = Some(vm.clone());
                vm
            }
        };
        drop(slot);
        vm.mount(&container.tag, &container.guest_dir).await?;
        Ok(vm)
    }

    async fn create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        if self.containers().contains_key(&req.id) {
            return Err(Error::state(
                format!("create container {}", req.id),
                "it exists",
            ));
        }
        let sandbox_pid = *self
            .sandbox_pid
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let began = std::time::Instant::now();
        let container = Arc::new(Container::prepare(&self.namespace, req, sandbox_pid)?);
        let vm = match self.attach(&container).await {
            Ok(vm) => vm,
            Err(e) => {
                container.cleanup_host();
                self.shutdown_if_empty().await;
                return Err(e);
            }
        };
        self.containers().insert(req.id.clone(), container.clone());
        // The limits the spec gives it (CRI's CreateContainer carries them there) size
        // the VM now, as an Update would.
        if container.ask() != Ask::default()
            && let Err(e) = vm.resize(self.total_ask()).await
        {
            self.detach(&container).await;
            return Err(e);
        }
        let pid = vm.pid();
        log::info!("created {} in {:?}", req.id, began.elapsed());
        self.events.send(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        });
        Ok(pid)
    }

    async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let proc = container.process(exec_id)?;
        log::info!("start {id} {exec_id:?}");
        let vm = self.sandbox().await?;
        let events = self.events.clone();
        let (cid, eid) = (id.to_owned(), exec_id.to_owned());
        // containerd gets host pids: the VM's (the container's pid is the guest's).
        let pid = vm.pid();
        let began = std::time::Instant::now();
        proc.start(&vm, move |exit: Exit| {
            log::info!("{cid} {eid:?} exited: {}", exit.code);
            events.send(TaskExit {
                container_id: cid.clone(),
                id: if eid.is_empty() { cid } else { eid },
                pid,
                exit_status: exit.code,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            });
        })
        .await?;
        log::info!("started {id} {exec_id:?} in {:?}", began.elapsed());
        if exec_id.is_empty() && container.is_sandbox {
            *self
                .sandbox_pid
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(proc.pid());
        }
        if exec_id.is_empty() {
            self.events.send(TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            });
        } else {
            self.events.send(TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            });
        }
        Ok(pid)
    }

    async fn kill(&self, req: &api::KillRequest) -> Result<()> {
        let container = self.container(&req.id)?;
        let proc = container.process(&req.exec_id)?;
        if let Some(exit) = proc.end_unstarted(req.signal) {
            self.send_exit(&container.id, &proc, exit);
            return Ok(());
        }
        if !req.exec_id.is_empty() {
            return proc.signal(req.signal).await;
        }
        if proc.status() == Status::Stopped {
            return Err(Error::not_found(
                format!("kill {}", req.id),
                "process already finished",
            ));
        }
        let vm = self.sandbox().await?;
        vm.run(&container.kill_command(req.signal, req.all))
            .await
            .map(drop)
    }

    fn send_exit(&self, id: &str, proc: &Proc, exit: Exit) {
        self.events.send(TaskExit {
            container_id: id.to_owned(),
            id: if proc.exec_id.is_empty() {
                id.to_owned()
            } else {
                proc.exec_id.clone()
            },
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        });
    }

    async fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let container = self.container(id)?;
        let proc = container.process(exec_id)?;
        let op = format!("delete {id} {exec_id}");
        let exit = match (proc.status(), proc.exit()) {
            (Status::Running, _) => return Err(Error::state(op, "it is still running")),
            (_, Some(exit)) => exit,
            (_, None) => Exit::of(vmkit_process::ExitStatus::Code(0)),
        };
        if exec_id.is_empty() {
            let began = std::time::Instant::now();
            self.detach(&container).await;
            log::info!("deleted {id} in {:?}", began.elapsed());
            self.events.send(TaskDelete {
                container_id: id.to_owned(),
                exit_status: exit.code,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            });
        } else {
            container.remove_exec(exec_id);
        }
        Ok(api::DeleteResponse {
            pid: self.vm_pid.load(Ordering::Relaxed),
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    /// What the containers in the VM ask of it together.
    fn total_ask(&self) -> Ask {
        let asks: Vec<Ask> = self.containers().values().map(|c| c.ask()).collect();
        Ask::total(&asks)
    }

    /// Takes `container` out: out of the list, out of crun's state and its share out of
    /// the VM (the last one's go with the VM, which stops), its files off the host.
    async fn detach(&self, container: &Container) {
        self.containers().remove(&container.id);
        let others = !self.containers().is_empty();
        if let Some(vm) = self.sandbox.lock().await.clone().filter(|_| others) {
            if let Err(e) = vm.run(&container.delete_command()).await {
                log::warn!("{e}");
            }
            if let Err(e) = vm.unmount(&container.guest_dir).await {
                log::warn!("{e}");
            }
            if let Err(e) = vm.remove_share(&container.share_id).await {
                log::warn!("{e}");
            }
        }
        self.shutdown_if_empty().await;
        container.cleanup_host();
    }

    /// Stops the VM once no container is left in it.
    async fn shutdown_if_empty(&self) {
        if !self.containers().is_empty() {
            return;
        }
        let vm = self.sandbox.lock().await.take();
        if let Some(vm) = vm {
            vm.shutdown().await;
        }
    }

    /// The container's cgroup counters, read in the guest.
    async fn stats(&self, id: &str) -> Result<api::StatsResponse> {
        let container = self.container(id)?;
        let op = format!("stats of container {id}");
        if container.init.status() != Status::Running {
            return Err(Error::state(op, "it is not running"));
        }
        let vm = self.sandbox().await?;
        let text = vm.run(&stats::command(container.init.pid())).await?;
        let any = containerd_shim::util::convert_to_any(Box::new(stats::parse(&text)))
            .map_err(|e| Error::bad(op, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    /// Resizes the VM for what its containers now ask, then applies the container's
    /// limits in the guest.
    async fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        let container = self.container(&req.id)?;
        let op = format!("update container {}", req.id);
        let resources: serde_json::Value = serde_json::from_slice(&req.resources.value)
            .map_err(|e| Error::bad(&op, format!("resources: {e}")))?;
        let crun_update = container.update(&resources)?;
        let vm = self.sandbox().await?;
        vm.resize(self.total_ask()).await?;
        if container.init.status() == Status::Running {
            vm.run(&crun_update).await?;
        }
        Ok(())
    }

    fn state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let container = self.container(id)?;
        let proc = container.process(exec_id)?;
        let status = match proc.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Stopped => TaskStatus::STOPPED,
        };
        let exit = proc.exit();
        Ok(api::StateResponse {
            id: id.to_owned(),
            bundle: container.bundle.display().to_string(),
            pid: self.vm_pid.load(Ordering::Relaxed),
            status: status.into(),
            stdin: proc.stdio.stdin.clone(),
            stdout: proc.stdio.stdout.clone(),
            stderr: proc.stdio.stderr.clone(),
            terminal: proc.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.code),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let container = self.container(&req.id)?;
        let op = format!("exec {} in {}", req.exec_id, req.id);
        let process: serde_json::Value = serde_json::from_slice(&req.spec.value)
            .map_err(|e| Error::bad(&op, format!("process spec: {e}")))?;
        container.add_exec(
            &req.exec_id,
            &process,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        )?;
        self.events.send(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {}", req.id);
        let pid = Service::create(self, &req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = Service::start(self, &req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(Service::state(self, &req.id, &req.exec_id)?)
    }

    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let proc = self.container(&req.id)?.process(&req.exec_id)?;
        let exit = proc.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        Service::kill(self, &req).await?;
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(Service::delete(self, &req.id, &req.exec_id).await?)
    }

    async fn exec(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        Service::exec(self, &req)?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let proc = self.container(&req.id)?.process(&req.exec_id)?;
        proc.resize(req.width, req.height).await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.container(&req.id)?
                .process(&req.exec_id)?
                .close_stdin();
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let container = self.container(&req.id)?;
        let processes = container
            .pids()
            .into_iter()
            .map(|pid| containerd_shim_protos::types::task::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(Service::stats(self, &req.id).await?)
    }

    async fn update(
        &self,
        _: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Service::update(self, &req).await?;
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match self.sandbox.lock().await.as_ref() {
            Some(vm) => vm.pid(),
            None => 0,
        };
        let _ = self.container(&req.id)?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.containers().is_empty() {
            self.shutdown_if_empty().await;
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}
