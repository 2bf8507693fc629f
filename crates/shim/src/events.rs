//! Task events to containerd, in the order they happened: one sender task publishes
//! them one after another (create → start → exit → delete).

use std::time::SystemTime;

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::ttrpc::context;
use tokio::sync::mpsc;

/// How long containerd may take to take one event.
const PUBLISH_NS: i64 = 10_000_000_000;

/// The shim's event queue.
#[derive(Clone)]
pub(crate) struct Events {
    queue: mpsc::UnboundedSender<Box<dyn Event + Send + Sync>>,
}

impl Events {
    /// Publishes through `publisher`, as namespace `namespace`'s events.
    pub(crate) fn new(publisher: RemotePublisher, namespace: String) -> Events {
        let (queue, mut rx) = mpsc::unbounded_channel::<Box<dyn Event + Send + Sync>>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let topic = event.topic();
                let ctx = context::with_timeout(PUBLISH_NS);
                if let Err(e) = publisher.publish(ctx, &topic, &namespace, event).await {
                    log::warn!("publish {topic}: {e}");
                }
            }
        });
        Events { queue }
    }

    /// Queues `event`.
    pub(crate) fn send(&self, event: impl Event + Send + Sync + 'static) {
        // The sender task lives as long as the shim; a send fails only at its end.
        let _ = self.queue.send(Box::new(event));
    }
}

/// `at` as a protobuf timestamp.
pub(crate) fn timestamp(at: SystemTime) -> Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}
