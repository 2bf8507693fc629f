//! [`Queue`]: every hot-plug call on a VM runs as a job on the VM's queue, one after
//! another (a queue, not a lock held across QMP calls). A job ends early with a clear
//! error when the VM starts shutting down or is gone.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};
use vmkit_core::Error as CoreError;

use crate::error::Error;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A VM's hot-plug queue; its worker task starts with the first job.
#[derive(Default)]
pub(crate) struct Queue {
    tx: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl Queue {
    fn sender(&self) -> &mpsc::UnboundedSender<Job> {
        self.tx.get_or_init(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    job.await;
                }
            });
            tx
        })
    }

    /// Runs `work` after the jobs queued before it. It ends with an error naming `op`
    /// when `stopping` resolves first (the VM began shutting down).
    pub(crate) async fn run<T, F>(
        &self,
        op: String,
        stopping: impl Future<Output = ()> + Send + 'static,
        work: F,
    ) -> vmkit_core::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = vmkit_core::Result<T>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job_op = op.clone();
        let job: Job = Box::pin(async move {
            let result = tokio::select! {
                // A stop that has begun wins over work that could still start.
                biased;
                () = stopping => Err(CoreError::backend(job_op, Error::ShuttingDown)),
                result = work => result,
            };
            let _ = reply.send(result);
        });
        if self.sender().send(job).is_err() {
            return Err(CoreError::backend(op, Error::ShuttingDown));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(CoreError::backend(op, Error::ShuttingDown)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn jobs_run_in_order_and_a_stop_ends_the_one_running() {
        let queue = Queue::default();
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o1, o2) = (order.clone(), order.clone());
        let first = queue.run("first".into(), std::future::pending(), async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            o1.lock().unwrap().push(1);
            Ok(())
        });
        let second = queue.run("second".into(), std::future::pending(), async move {
            o2.lock().unwrap().push(2);
            Ok(())
        });
        let (a, b) = tokio::join!(first, second);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(*order.lock().unwrap(), [1, 2]);
        let stopped: vmkit_core::Result<()> = queue
            .run("hotplug_cpu".into(), async {}, std::future::pending())
            .await;
        assert_eq!(
            stopped.unwrap_err().to_string(),
            "hotplug_cpu: the VM is shutting down"
        );
    }
}
