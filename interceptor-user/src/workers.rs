//! Session threads: one single-threaded tokio runtime per thread, each
//! session pinned to one of them.
//!
//! A session is two sockets served by one task. On a work-stealing runtime
//! every wakeup may hop threads (futex wakes, cache misses) and the
//! scheduler times every poll; measured under pgbench that cost ~35% more
//! CPU per transaction than pgbouncer's single event loop. Pinning keeps a
//! session's whole life on one thread, as pgbouncer does, while several
//! threads still use several cores.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

pub struct SessionThreads {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl SessionThreads {
    /// Starts `n` threads (at least one), each running its own runtime
    /// until the process exits.
    pub fn start(n: usize) -> std::io::Result<SessionThreads> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("interceptor-s{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                })?;
            handles.push(rx.recv().map_err(std::io::Error::other)??);
        }
        Ok(SessionThreads {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs a session on the next thread, round robin.
    pub fn spawn<F>(&self, session: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(session);
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}
