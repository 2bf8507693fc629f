//! The plugin side: a [`Dispatcher`] holds a backend and the instances it created (by
//! id, in a table: a stale id is an error, never undefined behaviour) and answers
//! [`Request`]s with [`Reply`]s. Both transports drive one: the out-of-process server
//! and the in-process exports. A panic in the backend is caught here and answered as an
//! error; it never unwinds into the transport.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use vmkit_core::{Backend, Error as CoreError, Instance, VmEvent};

use crate::wire::{InstanceId, Reply, Request, SCHEMA_VERSION};

/// A backend and its instances, answering requests.
pub struct Dispatcher {
    backend: Arc<dyn Backend>,
    instances: Mutex<HashMap<InstanceId, Arc<dyn Instance>>>,
    feeds: Mutex<HashMap<InstanceId, Arc<Feed>>>,
    next: AtomicU64,
}

/// How far an instance's events have gone: a reply is sent only once every event its
/// operation caused has been handed to the transport, so the host sees them first (the
/// contract's "events in order", across two paths).
struct Feed {
    /// Counts what the instance published (a receiver of its own, only counted).
    probe: Mutex<broadcast::Receiver<VmEvent>>,
    published: AtomicU64,
    /// What the forwarder has handed to the transport (or lost to lag).
    forwarded: AtomicU64,
}

/// How long a reply waits for its events to be forwarded.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// The text of a caught panic.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}

fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> Reply {
    Reply::failed(&CoreError::backend(
        what.to_owned(),
        crate::wire::RemoteError(format!("the backend panicked: {}", panic_text(payload))),
    ))
}

fn done(result: vmkit_core::Result<()>) -> Reply {
    result.map_or_else(|e| Reply::failed(&e), |()| Reply::Done)
}

impl Dispatcher {
    /// A dispatcher for `backend`, with no instances.
    pub fn new(backend: Arc<dyn Backend>) -> Dispatcher {
        Dispatcher {
            backend,
            instances: Mutex::new(HashMap::new()),
            feeds: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// The backend's name.
    pub fn name(&self) -> &str {
        self.backend.name()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<InstanceId, Arc<dyn Instance>>> {
        // A panic while the table was locked leaves it consistent (inserts and removes
        // are single calls): keep serving.
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn instance(&self, id: InstanceId) -> Result<Arc<dyn Instance>, Reply> {
        self.table().get(&id).cloned().ok_or_else(|| {
            Reply::failed(&CoreError::backend(
                format!("instance {id}"),
                crate::wire::RemoteError(format!(
                    "the {} backend has no instance {id} (destroyed, or never created)",
                    self.backend.name()
                )),
            ))
        })
    }

    /// Forwards instance `id`'s events to `sink` until the instance is gone: the
    /// future to run (on the plugin's runtime), or `None` when there is no such
    /// instance. Replies to operations on it wait until `sink` has had their events.
    pub fn subscribe(
        &self,
        id: InstanceId,
        sink: impl Fn(VmEvent) + Send + 'static,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let vm = self.table().get(&id).cloned()?;
        let (mut events, probe) = (vm.events(), vm.events());
        drop(vm);
        let feed = Arc::new(Feed {
            probe: Mutex::new(probe),
            published: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        });
        self.feeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&feed));
        Some(async move {
            loop {
                match events.recv().await {
                    Ok(event) => sink(event),
                    Err(broadcast::error::RecvError::Lagged(lost)) => {
                        feed.forwarded.fetch_add(lost, Ordering::AcqRel);
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
                feed.forwarded.fetch_add(1, Ordering::AcqRel);
            }
        })
    }

    /// Waits (at most [`SETTLE`]) until every event instance `id` published so far
    /// has been forwarded.
    async fn settle(&self, id: InstanceId) {
        let feed = self
            .feeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let Some(feed) = feed else {
            return;
        };
        let published = {
            let mut probe = feed.probe.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = 0;
            loop {
                match probe.try_recv() {
                    Ok(_) => seen += 1,
                    Err(broadcast::error::TryRecvError::Lagged(lost)) => seen += lost,
                    Err(_) => break,
                }
            }
            feed.published.fetch_add(seen, Ordering::AcqRel) + seen
        };
        let deadline = tokio::time::Instant::now() + SETTLE;
        while feed.forwarded.load(Ordering::Acquire) < published
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
    }

    /// Answers `req` when it needs no waiting (describe, create, destroy, state,
    /// vm_info, the hot-pluggers, cold devices); `None` for the others.
    pub fn answer_now(&self, req: &Request) -> Option<Reply> {
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.answer_now_inner(req)));
        match result {
            Ok(reply) => reply,
            Err(payload) => Some(panicked(req.name(), payload.as_ref())),
        }
    }

    fn answer_now_inner(&self, req: &Request) -> Option<Reply> {
        let vm = |id: InstanceId| self.instance(id);
        Some(match req {
            Request::Describe => Reply::Described {
                name: self.backend.name().to_owned(),
                capabilities: self.backend.capabilities(),
                schema: SCHEMA_VERSION,
            },
            Request::Create { config } => match self.backend.create((**config).clone()) {
                Ok(instance) => {
                    let id = self.next.fetch_add(1, Ordering::Relaxed);
                    self.table().insert(id, Arc::from(instance));
                    Reply::Created { instance: id }
                }
                Err(e) => Reply::failed(&e),
            },
            Request::Destroy { instance } => {
                // Dropped outside the lock: a live VM's drop does real work.
                let gone = self.table().remove(instance);
                drop(gone);
                self.feeds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(instance);
                Reply::Done
            }
            Request::State { instance } => match vm(*instance) {
                Ok(vm) => Reply::State { state: vm.state() },
                Err(reply) => reply,
            },
            Request::VmInfo { instance } => match vm(*instance) {
                Ok(vm) => Reply::VmInfo {
                    info: Box::new(vm.vm_info()),
                },
                Err(reply) => reply,
            },
            Request::Hotpluggers { instance } => match vm(*instance) {
                Ok(vm) => Reply::Hotpluggers {
                    cpu: vm.cpu_hotplugger().is_some(),
                    memory: vm.memory_hotplugger().is_some(),
                },
                Err(reply) => reply,
            },
            Request::AddDevice { instance, spec } => match vm(*instance) {
                Ok(vm) => done(vm.add_device(spec.clone())),
                Err(reply) => reply,
            },
            Request::Devices { instance } => match vm(*instance) {
                Ok(vm) => Reply::Devices {
                    devices: vm.devices(),
                },
                Err(reply) => reply,
            },
            _ => return None,
        })
    }

    /// Answers any request; a panic in the backend comes back as an error.
    pub async fn answer(self: Arc<Self>, req: Request) -> Reply {
        if let Some(reply) = self.answer_now(&req) {
            return reply;
        }
        let vm = match req.instance().map(|id| self.instance(id)) {
            Some(Ok(vm)) => vm,
            Some(Err(reply)) => return reply,
            None => {
                return Reply::failed(&CoreError::backend(
                    "plugin",
                    crate::wire::RemoteError("a request with no instance".into()),
                ));
            }
        };
        let id = req.instance().unwrap_or_default();
        let op = req.name();
        // Run here, not on a task of its own: dropping this future (the host cancelled
        // the call) must drop the backend's own future, so its work stops. A panic is
        // caught around each poll.
        let reply = CatchUnwind(Box::pin(run(vm, req))).await;
        self.settle(id).await;
        reply.unwrap_or_else(|payload| panicked(op, payload.as_ref()))
    }
}

/// A future whose panics, in any poll, come out as `Err` with the panic's payload.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(out)) => std::task::Poll::Ready(Ok(out)),
            Err(payload) => std::task::Poll::Ready(Err(payload)),
        }
    }
}

/// Maps a hot-pluggable operation's result, or its absence, to a reply.
async fn with<T, F, Fut>(
    vm: &dyn Instance,
    op: &'static str,
    hotplugger: Option<T>,
    work: F,
) -> Reply
where
    F: FnOnce(T) -> Fut,
    Fut: Future<Output = Reply>,
{
    match hotplugger {
        Some(h) => work(h).await,
        None => Reply::failed(&CoreError::unsupported(
            op,
            vm.vm_info().backend,
            "this instance has no hot-plugger for it",
        )),
    }
}

async fn run(vm: Arc<dyn Instance>, req: Request) -> Reply {
    let vm = vm.as_ref();
    match req {
        Request::Start { timeout_ms, .. } => {
            done(vm.start(Request::start_options(timeout_ms)).await)
        }
        Request::Shutdown { .. } => match vm.shutdown().await {
            Ok(exit) => Reply::Exit { exit },
            Err(e) => Reply::failed(&e),
        },
        Request::Pause { .. } => done(vm.pause().await),
        Request::Resume { .. } => done(vm.resume().await),
        Request::Wait { .. } => Reply::Exit {
            exit: vm.wait().await,
        },
        Request::HotplugDevice { spec, .. } => done(vm.hotplug_device(spec).await),
        Request::Unplug { id, .. } => done(vm.unplug(&id).await),
        other => run_resource(vm, other).await,
    }
}

/// The vCPU and memory hot-plug requests.
async fn run_resource(vm: &dyn Instance, req: Request) -> Reply {
    match req {
        Request::QueryCpus { .. } => {
            with(vm, "query_cpus", vm.cpu_hotplugger(), |c| async move {
                c.query_cpus()
                    .await
                    .map_or_else(|e| Reply::failed(&e), |cpus| Reply::Cpus { cpus })
            })
            .await
        }
        Request::HotplugCpu { .. } => {
            with(vm, "hotplug_cpu", vm.cpu_hotplugger(), |c| async move {
                c.hotplug_cpu()
                    .await
                    .map_or_else(|e| Reply::failed(&e), |cpu| Reply::Cpu { cpu })
            })
            .await
        }
        Request::HotplugCpuAt { at, .. } => {
            with(vm, "hotplug_cpu", vm.cpu_hotplugger(), |c| async move {
                c.hotplug_cpu_at(at)
                    .await
                    .map_or_else(|e| Reply::failed(&e), |cpu| Reply::Cpu { cpu })
            })
            .await
        }
        Request::UnplugCpu { index, .. } => {
            with(vm, "unplug_cpu", vm.cpu_hotplugger(), |c| async move {
                done(c.unplug_cpu(index).await)
            })
            .await
        }
        Request::SetVcpus { count, .. } => {
            with(vm, "set_vcpus", vm.cpu_hotplugger(), |c| async move {
                c.set_vcpus(count)
                    .await
                    .map_or_else(|e| Reply::failed(&e), Reply::resize)
            })
            .await
        }
        Request::QueryMemory { .. } => {
            with(vm, "query_memory", vm.memory_hotplugger(), |m| async move {
                m.query_memory()
                    .await
                    .map_or_else(|e| Reply::failed(&e), |memory| Reply::Memory { memory })
            })
            .await
        }
        Request::HotplugMemory { size_mib, .. } => {
            with(
                vm,
                "hotplug_memory",
                vm.memory_hotplugger(),
                |m| async move {
                    m.hotplug_memory(size_mib)
                        .await
                        .map_or_else(|e| Reply::failed(&e), |id| Reply::Id { id })
                },
            )
            .await
        }
        Request::UnplugMemory { id, .. } => {
            with(
                vm,
                "unplug_memory",
                vm.memory_hotplugger(),
                |m| async move { done(m.unplug_memory(&id).await) },
            )
            .await
        }
        // Answered by `answer_now`.
        other => Reply::failed(&CoreError::backend(
            "plugin",
            crate::wire::RemoteError(format!("{other:?} is answered at once, not here")),
        )),
    }
}
