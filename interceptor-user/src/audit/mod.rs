//! The audit trail: every session, statement and decision, written first
//! to a durable local spool.
//!
//! The data path hands events to a bounded channel and goes on; one
//! writer thread batches them into the spool (every millisecond while
//! events keep coming), fsyncing per batch at most every
//! `fsync_interval` (group commit). When the spool cannot be written
//! (a full disk) the writer keeps the batch and retries, and
//! [`Auditor::healthy`] says so.

pub mod cli;
pub mod event;
pub mod session;
pub mod shipper;
pub mod spool;
pub mod warehouse;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

pub use event::{
    ApprovalRow, Event, MaskRow, SessionEnd, SessionStart, StatementRow, StatementRowRef, now_us,
};

use crate::config::{AuditConfig, Fsync, SpoolFailure};

/// A batch is written once it reaches this size, even if more is queued.
const BATCH_BYTES: usize = 1 << 20;
/// How often a busy writer collects queued events. A daemon killed with -9
/// loses at most what arrived in the last one, and `interceptor audit
/// tail` shows a statement about this soon after its client saw it end.
/// 10 ms halved the writer's CPU per statement (0.97 to 0.50 µs at
/// pgbench -S c10) but left a statement missing from `audit tail` for up
/// to 10 ms after it ended.
const LINGER: Duration = Duration::from_millis(1);
/// Most event bytes held in memory while the spool cannot be written.
const HOLD_BYTES: usize = 256 << 20;

enum Msg {
    Event(Event),
    /// Whole frames, encoded by the session (statement rows, sealed).
    Frames(Vec<u8>),
    Stop,
}

pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    healthy: Arc<AtomicBool>,
    on_failure: SpoolFailure,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
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
            on_failure: config.on_spool_failure,
        };
        let handle = std::thread::Builder::new()
            .name("interceptor-audit".into())
            .spawn(move || writer.run())?;
        Ok(Auditor {
            tx,
            healthy,
            on_failure: config.on_spool_failure,
            writer: std::sync::Mutex::new(Some(handle)),
        })
    }

    /// Queues an event; waits only while the queue is full (the spool is
    /// behind), never for ClickHouse.
    pub async fn record(&self, event: Event) {
        self.send(Msg::Event(event)).await
    }

    /// Queues an event without waiting, for code that cannot (a drop);
    /// with the queue full, the event is lost and the loss logged.
    pub fn record_now(&self, event: Event) {
        if let Err(e) = self.tx.try_send(Msg::Event(event)) {
            error!(
                "audit event not recorded: the audit queue is {}",
                match e {
                    mpsc::error::TrySendError::Full(_) => "full",
                    mpsc::error::TrySendError::Closed(_) => "closed",
                }
            );
        }
    }

    /// Queues frames already encoded (see `spool::seal_statement_frame`).
    pub async fn record_frames(&self, frames: Vec<u8>) {
        self.send(Msg::Frames(frames)).await
    }

    /// Waits only when the queue is full; the common case takes no trip
    /// through the scheduler.
    async fn send(&self, msg: Msg) {
        let msg = match self.tx.try_send(msg) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(m)) => m,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                error!("audit event after the audit writer stopped; it is not recorded");
                return;
            }
        };
        if self.tx.send(msg).await.is_err() {
            error!("audit event after the audit writer stopped; it is not recorded");
        }
    }

    /// What sessions check before each statement, when they are to refuse
    /// statements that could not be audited.
    pub fn refusal_gate(&self) -> Option<SpoolGate> {
        (self.on_failure == SpoolFailure::Refuse).then(|| SpoolGate(self.healthy.clone()))
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

/// Open while the spool can be written.
#[derive(Clone)]
pub struct SpoolGate(Arc<AtomicBool>);

impl SpoolGate {
    pub fn open(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct Writer {
    rx: mpsc::Receiver<Msg>,
    spool: spool::SpoolWriter,
    fsync: Fsync,
    interval: Duration,
    healthy: Arc<AtomicBool>,
    on_failure: SpoolFailure,
}

impl Writer {
    fn run(mut self) {
        // Only for waiting on the queue with a timeout.
        let clock = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                error!("audit writer cannot start its timer ({e}); events are not recorded");
                return;
            }
        };
        let mut buf = Vec::with_capacity(BATCH_BYTES + 4096);
        let mut dirty = false;
        let mut busy = false;
        // The last collection stopped at BATCH_BYTES with more queued.
        let mut behind = false;
        let mut last_sync = Instant::now();
        loop {
            let first = if busy {
                // Under load the writer polls every LINGER instead of
                // sleeping on the queue: a sender then never has to wake
                // it, which costs the session more than the event itself.
                // A writer that is behind goes on at once.
                if !behind {
                    std::thread::sleep(LINGER);
                }
                match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        busy = false;
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => Msg::Stop,
                }
            } else if dirty {
                // Idle with an fsync due: wait for the next event or the
                // fsync, whichever comes first.
                let wait = self.interval.saturating_sub(last_sync.elapsed());
                let rx = &mut self.rx;
                match clock.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                    Ok(m) => m.unwrap_or(Msg::Stop),
                    Err(_) => {
                        self.sync();
                        dirty = false;
                        last_sync = Instant::now();
                        continue;
                    }
                }
            } else {
                self.rx.blocking_recv().unwrap_or(Msg::Stop)
            };
            busy = true;
            let mut stop = false;
            let mut take = |m: Msg, buf: &mut Vec<u8>| match m {
                Msg::Event(e) => spool::encode_frame(&e, buf),
                Msg::Frames(f) => buf.extend_from_slice(&f),
                Msg::Stop => stop = true,
            };
            take(first, &mut buf);
            behind = true;
            while buf.len() < BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(m) => take(m, &mut buf),
                    Err(_) => {
                        behind = false;
                        break;
                    }
                }
            }
            if !buf.is_empty() {
                self.write(&mut buf, &mut stop);
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

    /// Retries until the frames are written: events are never dropped for
    /// a full disk. While it fails, events keep coming off the queue into
    /// memory (up to [`HOLD_BYTES`], then sessions wait on the queue), so
    /// that `on_spool_failure = "continue"` keeps statements flowing; the
    /// session side refuses statements meanwhile under "refuse". At
    /// shutdown it gives up after a few seconds, loudly.
    fn write(&mut self, frames: &mut Vec<u8>, stop: &mut bool) {
        let started = Instant::now();
        let mut logged = started;
        loop {
            match self.spool.append(frames) {
                Ok(()) => {
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        info!(
                            "audit spool is writable again after {:.1} s; {} bytes of held events written",
                            started.elapsed().as_secs_f64(),
                            frames.len()
                        );
                    }
                    return;
                }
                Err(e) => {
                    if self.healthy.swap(false, Ordering::Relaxed) {
                        error!(
                            "audit spool write failed: {e}; events are held in memory and retried{}",
                            match self.on_failure {
                                SpoolFailure::Refuse =>
                                    "; new statements are refused (SQLSTATE 53100) until it can be written",
                                SpoolFailure::Continue =>
                                    "; statements go on (on_spool_failure = \"continue\")",
                            }
                        );
                    } else if logged.elapsed() > Duration::from_secs(10) {
                        logged = Instant::now();
                        error!(
                            "audit spool still cannot be written after {} s ({e}); {} bytes of events held in memory",
                            started.elapsed().as_secs(),
                            frames.len()
                        );
                    }
                    if *stop && started.elapsed() > Duration::from_secs(5) {
                        error!(
                            "audit spool still cannot be written at shutdown ({e}); {} bytes of audit events are lost",
                            frames.len()
                        );
                        return;
                    }
                    while !*stop && frames.len() < HOLD_BYTES {
                        match self.rx.try_recv() {
                            Ok(Msg::Event(ev)) => spool::encode_frame(&ev, frames),
                            Ok(Msg::Frames(f)) => frames.extend_from_slice(&f),
                            Ok(Msg::Stop) => *stop = true,
                            Err(_) => break,
                        }
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
