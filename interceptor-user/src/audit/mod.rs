//! The audit trail: every session, statement and decision, written first
//! to a durable local spool.
//!
//! The data path hands events to a bounded channel and goes on; one
//! writer thread batches them into the spool, fsyncing per batch at most
//! every `fsync_interval` (group commit). When the spool cannot be written
//! (a full disk) the writer keeps the batch and retries, and
//! [`Auditor::healthy`] says so.

pub mod cli;
pub mod event;
pub mod session;
pub mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

pub use event::{Event, SessionEnd, SessionStart, StatementRow, now_us};

use crate::config::{AuditConfig, Fsync};

/// A batch is written once it reaches this size, even if more is queued.
const BATCH_BYTES: usize = 1 << 20;

enum Msg {
    Event(Event),
    Stop,
}

pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    healthy: Arc<AtomicBool>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
}

impl Auditor {
    /// Opens the spool under `dir` (repairing torn tails, and saying so)
    /// and starts the writer thread.
    pub fn start(config: &AuditConfig, dir: &Path) -> std::io::Result<Auditor> {
        let (spool, recovery) = spool::SpoolWriter::open(dir, config.segment_bytes)?;
        for (segment, bytes) in &recovery.torn {
            warn!(
                segment = %segment.display(),
                "audit spool: cut a torn tail of {bytes} bytes (a frame half written when the daemon stopped); every whole frame before it is kept"
            );
        }
        info!(
            dir = %dir.display(),
            segments = recovery.segments,
            events = recovery.events,
            "audit spool open"
        );
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer {
            rx,
            spool,
            fsync: config.fsync,
            interval: config.fsync_interval,
            healthy: healthy.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("interceptor-audit".into())
            .spawn(move || writer.run())?;
        Ok(Auditor {
            tx,
            healthy,
            writer: std::sync::Mutex::new(Some(handle)),
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues an event; waits only while the queue is full (the spool is
    /// behind), never for ClickHouse.
    pub async fn record(&self, event: Event) {
        if self.tx.send(Msg::Event(event)).await.is_err() {
            error!("audit event after the audit writer stopped; it is not recorded");
        }
    }

    /// False while the spool cannot be written.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Writes and fsyncs everything queued so far, then stops the writer.
    pub async fn close(&self) {
        let _ = self.tx.send(Msg::Stop).await;
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

struct Writer {
    rx: mpsc::Receiver<Msg>,
    spool: spool::SpoolWriter,
    fsync: Fsync,
    interval: Duration,
    healthy: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(BATCH_BYTES + 4096);
        let mut dirty = false;
        let mut last_sync = Instant::now();
        loop {
            let first = if dirty {
                match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let wait = self.interval.saturating_sub(last_sync.elapsed());
                        if wait.is_zero() {
                            self.sync();
                            dirty = false;
                            last_sync = Instant::now();
                        } else {
                            std::thread::sleep(wait);
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => Msg::Stop,
                }
            } else {
                self.rx.blocking_recv().unwrap_or(Msg::Stop)
            };
            let mut stop = false;
            let mut take = |m: Msg, buf: &mut Vec<u8>| match m {
                Msg::Event(e) => spool::encode_frame(&e, buf),
                Msg::Stop => stop = true,
            };
            take(first, &mut buf);
            while buf.len() < BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(m) => take(m, &mut buf),
                    Err(_) => break,
                }
            }
            if !buf.is_empty() {
                self.write(&buf, stop);
                buf.clear();
                match self.fsync {
                    Fsync::Always => {
                        self.sync();
                        last_sync = Instant::now();
                    }
                    Fsync::Batch if last_sync.elapsed() >= self.interval => {
                        self.sync();
                        last_sync = Instant::now();
                    }
                    Fsync::Batch => dirty = true,
                    Fsync::Never => {}
                }
            }
            if stop {
                self.sync();
                return;
            }
        }
    }

    /// Retries until the batch is written: events are never dropped for a
    /// full disk. At shutdown it gives up after a few seconds, loudly.
    fn write(&mut self, frames: &[u8], stopping: bool) {
        let started = Instant::now();
        loop {
            match self.spool.append(frames) {
                Ok(()) => {
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        info!("audit spool is writable again");
                    }
                    return;
                }
                Err(e) => {
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        error!(
                            "audit spool write failed: {e}; retrying, with events held in memory until it succeeds"
                        );
                    }
                    if stopping && started.elapsed() > Duration::from_secs(5) {
                        error!(
                            "audit spool still cannot be written at shutdown ({e}); {} bytes of audit events are lost",
                            frames.len()
                        );
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.spool.sync()
            && self.healthy.swap(false, Ordering::Relaxed)
        {
            error!("audit spool fsync failed: {e}");
        }
    }
}
