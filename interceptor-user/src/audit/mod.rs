//! The audit trail: every session, statement and decision, written first
//! to a durable local spool.
//!
//! The data path appends events to a bounded queue and goes on (statement
//! rows as they ended, other events encoded); one writer thread seals the
//! rows into their sessions' hash chains and moves everything into the
//! spool (every 10 ms while events keep coming), fsyncing per batch at most
//! every `fsync_interval` (group commit). When the spool cannot be written
//! (a full disk) the writer keeps the batch and retries, and [`SpoolGate`]
//! says so.

pub mod cli;
pub mod event;
pub mod session;
pub mod shipper;
pub mod spool;
pub mod warehouse;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{error, info, warn};

pub use event::{
    ApprovalRow, Event, MaskRow, SessionEnd, SessionStart, StatementRow, StatementRowRef, now_us,
};

use crate::config::{AuditConfig, Fsync, SpoolFailure};

/// A writer that collected at least this much goes on at once instead of
/// lingering: it is behind.
const BATCH_BYTES: usize = 1 << 20;
/// How often a busy writer collects queued events. A daemon killed with -9
/// loses at most what arrived in the last one (a power cut may lose up to
/// `fsync_interval`, 10 ms by default), and `interceptor audit tail`
/// shows a statement about this soon after its client saw it end. Each
/// collection is a wakeup on a CPU that sessions, PostgreSQL and the
/// client share: at pgbench -S c10 on 2 vCPUs the writer took 0.59 µs of
/// CPU per statement collecting every 1 ms and 0.25 µs every 5 ms (it also
/// runs as SCHED_BATCH). Every 10 ms, one collection per default fsync: at
/// a paced 10k statements/s the writer took 2.19 µs per statement against
/// 2.41 every 5 ms (median of 9 rounds).
const LINGER: Duration = Duration::from_millis(10);
/// Most event bytes held in memory while the spool cannot be written.
const HOLD_BYTES: usize = 256 << 20;

/// Events waiting for the writer, in lanes: one per session thread, and
/// one that every other thread shares.
///
/// A session moves its ended statement rows into its own thread's lane
/// under that lane's lock: no allocation, and (the lane being its thread's
/// alone) no cache line taken from another CPU; the writer visits each
/// lane once per batch and seals the rows there. One queue for all
/// sessions moved its lock and its buffer between the CPUs on every
/// statement. Each lane keeps its events in the order they happened, and
/// a session's events all go through its thread's lane.
#[derive(Default)]
struct Queue {
    /// Other events, encoded.
    frames: Vec<u8>,
    /// Everything in the lane, in order: statement rows, and runs of
    /// `frames`.
    items: Vec<Item>,
    events: usize,
    /// [`Auditor::close`] has run: the writer drains what is here and
    /// stops, and later events are refused.
    closed: bool,
}

enum Item {
    /// The next this many bytes of the lane's `frames`.
    Frames(usize),
    Row(session::Ended),
}

impl Queue {
    /// Moves the lane's events, in order, onto the end of `out`, sealing
    /// the rows.
    fn drain_into(&mut self, out: &mut Vec<u8>) {
        let mut at = 0;
        for item in self.items.drain(..) {
            match item {
                Item::Frames(n) => {
                    out.extend_from_slice(&self.frames[at..at + n]);
                    at += n;
                }
                Item::Row(row) => row.seal(out),
            }
        }
        self.frames.clear();
    }
}

/// A lane on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Lane(Mutex<Queue>);

impl Lane {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

thread_local! {
    /// This thread's lane, before it is taken modulo the number of lanes.
    static LANE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Gives the calling thread (session thread `i`) a lane of its own.
pub fn use_lane(i: usize) {
    LANE.set(i + 1);
}

struct Shared {
    lanes: Box<[Lane]>,
    /// Events a lane may hold before its sessions wait: `audit.queue`
    /// shared among the lanes.
    cap: usize,
    /// The writer is parked on empty lanes: the next event wakes it. A
    /// busy writer polls every [`LINGER`], so sessions under load never
    /// pay for a wakeup.
    idle: AtomicBool,
    /// Every lane is closed (set after the last of them).
    closed: AtomicBool,
    /// Sessions waiting for room are woken when the writer collects.
    drained: Notify,
    healthy: Arc<AtomicBool>,
}

impl Shared {
    fn lane(&self) -> &Lane {
        &self.lanes[LANE.get() % self.lanes.len()]
    }

    fn close(&self) {
        for lane in &self.lanes {
            lane.lock().closed = true;
        }
        self.closed.store(true, Ordering::SeqCst);
    }
}

pub struct Auditor {
    shared: Arc<Shared>,
    on_failure: SpoolFailure,
    thread: Thread,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Auditor {
    /// Opens the spool under `dir` (repairing torn tails, and saying so)
    /// and starts the writer thread.
    pub fn start(config: &AuditConfig, dir: &Path) -> std::io::Result<Auditor> {
        let (mut spool, recovery) = spool::SpoolWriter::open(dir, config.segment_bytes)?;
        if config.spool_retention_days > 0 && config.clickhouse.is_none() {
            let keep = Duration::from_secs(u64::from(config.spool_retention_days) * 86_400);
            // Old events kept longer never stop the audit.
            if let Err(e) = spool.expire_after(keep) {
                warn!(dir = %dir.display(), "audit spool: could not delete expired segments: {e}");
            }
        }
        for (segment, bytes) in &recovery.torn {
            warn!(
                segment = %segment.display(),
                "audit spool: cut a torn tail of {bytes} bytes (a frame half written when the daemon stopped); every whole frame before it is kept"
            );
        }
        info!(
            dir = %dir.display(),
            segments = recovery.segments,
            newest_segment_events = recovery.events,
            "audit spool open"
        );
        // One lane per session thread (one per CPU by default) and one for
        // the rest; session threads past that share lanes.
        let lanes = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
        let shared = Arc::new(Shared {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            cap: (config.queue / lanes).max(1),
            idle: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            drained: Notify::new(),
            healthy: Arc::new(AtomicBool::new(true)),
        });
        let writer = Writer {
            shared: shared.clone(),
            spare: Queue::default(),
            spool,
            fsync: config.fsync,
            interval: config.fsync_interval,
            last_sync: Instant::now(),
            dirty: false,
            on_failure: config.on_spool_failure,
        };
        let handle = std::thread::Builder::new()
            .name("interceptor-audit".into())
            .spawn(move || {
                crate::workers::background("the audit spool writer");
                writer.run()
            })?;
        Ok(Auditor {
            shared,
            on_failure: config.on_spool_failure,
            thread: handle.thread().clone(),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Queues an event; waits only while the queue is full (the spool is
    /// behind), never for ClickHouse.
    pub async fn record(&self, event: Event) {
        if self.append(|b| spool::encode_frame(&event, b), 1) {
            self.room().await;
        }
    }

    /// Queues an event without waiting, for code that cannot (a drop),
    /// even past a full queue.
    pub fn record_now(&self, event: Event) {
        self.append(|b| spool::encode_frame(&event, b), 1);
    }

    /// Queues ended statement rows (the writer seals them), leaving `rows`
    /// empty for reuse.
    pub async fn record_rows(&self, rows: &mut Vec<session::Ended>) {
        if self.push(|q| {
            for row in rows.drain(..) {
                q.events += row.events();
                q.items.push(Item::Row(row));
            }
        }) {
            self.room().await;
        }
    }

    /// True when the lane is now over its bound.
    fn append(&self, fill: impl FnOnce(&mut Vec<u8>), events: usize) -> bool {
        self.push(|q| {
            let before = q.frames.len();
            fill(&mut q.frames);
            let n = q.frames.len() - before;
            match q.items.last_mut() {
                Some(Item::Frames(run)) => *run += n,
                _ => q.items.push(Item::Frames(n)),
            }
            q.events += events;
        })
    }

    /// Adds to this thread's lane with `fill`; true when the lane is now
    /// over its bound.
    fn push(&self, fill: impl FnOnce(&mut Queue)) -> bool {
        let mut q = self.shared.lane().lock();
        if q.closed {
            drop(q);
            error!("audit event after the audit writer stopped; it is not recorded");
            return false;
        }
        fill(&mut q);
        let full = q.events > self.shared.cap;
        drop(q);
        // Read before swapped: the flag's cache line stays shared while
        // the writer is busy.
        if self.shared.idle.load(Ordering::SeqCst) && self.shared.idle.swap(false, Ordering::SeqCst)
        {
            self.thread.unpark();
        }
        full
    }

    /// Waits until the writer has collected the lane.
    async fn room(&self) {
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let q = self.shared.lane().lock();
                if q.events <= self.shared.cap || q.closed {
                    return;
                }
            }
            drained.await;
        }
    }

    /// What sessions check before each statement, when they are to refuse
    /// statements that could not be audited.
    pub fn refusal_gate(&self) -> Option<SpoolGate> {
        (self.on_failure == SpoolFailure::Refuse).then(|| SpoolGate(self.shared.healthy.clone()))
    }

    /// Writes and fsyncs everything queued so far, then stops the writer.
    pub async fn close(&self) {
        self.shared.close();
        self.thread.unpark();
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

/// Closes the queue when the writer stops, however it stops: sessions
/// waiting for room go on (and later events are logged as lost) rather
/// than wait for a writer that is gone.
struct Closed(Arc<Shared>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.close();
        self.0.drained.notify_waiters();
    }
}

struct Writer {
    shared: Arc<Shared>,
    /// An emptied lane's buffers, swapped for the next lane's full ones:
    /// the lane is locked only for the swap, and nothing is allocated
    /// once they have grown.
    spare: Queue,
    spool: spool::SpoolWriter,
    fsync: Fsync,
    interval: Duration,
    last_sync: Instant,
    /// Written since the last fsync.
    dirty: bool,
    on_failure: SpoolFailure,
}

impl Writer {
    fn run(mut self) {
        let _closed = Closed(self.shared.clone());
        let mut buf = Vec::new();
        loop {
            let mut stop = self.collect(&mut buf);
            if buf.is_empty() {
                if stop {
                    self.sync();
                    return;
                }
                if !self.park_if_empty() {
                    continue;
                }
                if self.dirty {
                    // Idle with an fsync due: until the next event or the
                    // fsync, whichever comes first.
                    std::thread::park_timeout(
                        self.interval.saturating_sub(self.last_sync.elapsed()),
                    );
                    if self.last_sync.elapsed() >= self.interval {
                        self.sync();
                    }
                } else {
                    std::thread::park();
                }
                continue;
            }
            let behind = buf.len() >= BATCH_BYTES;
            self.write(&mut buf, &mut stop);
            buf.clear();
            trim(&mut buf);
            match self.fsync {
                Fsync::Always => self.sync(),
                Fsync::Batch if self.last_sync.elapsed() >= self.interval => self.sync(),
                Fsync::Batch => self.dirty = true,
                Fsync::Never => {}
            }
            if stop {
                self.sync();
                return;
            }
            if !behind {
                std::thread::sleep(LINGER);
            }
        }
    }

    /// Moves everything queued onto the end of `buf` (sealing statement
    /// rows), and wakes sessions waiting for room. True once the auditor is
    /// closed: then every lane is, and this took all they will ever hold.
    fn collect(&mut self, buf: &mut Vec<u8>) -> bool {
        let closed = self.shared.closed.load(Ordering::SeqCst);
        let mut full = false;
        for lane in &self.shared.lanes {
            {
                let mut q = lane.lock();
                if q.items.is_empty() {
                    continue;
                }
                full |= q.events > self.shared.cap;
                std::mem::swap(&mut q.frames, &mut self.spare.frames);
                std::mem::swap(&mut q.items, &mut self.spare.items);
                q.events = 0;
            }
            self.spare.drain_into(buf);
            trim(&mut self.spare.frames);
        }
        if full {
            self.shared.drained.notify_waiters();
        }
        closed
    }

    /// Marks the writer idle unless something was queued meanwhile.
    fn park_if_empty(&self) -> bool {
        // Before the lanes are looked at: a session that appends after
        // its lane was seen empty then finds the flag set, and wakes us.
        self.shared.idle.store(true, Ordering::SeqCst);
        let busy = self.shared.closed.load(Ordering::SeqCst)
            || self.shared.lanes.iter().any(|l| l.lock().events > 0);
        if busy {
            self.shared.idle.store(false, Ordering::SeqCst);
        }
        !busy
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
                    if !self.shared.healthy.swap(true, Ordering::Relaxed) {
                        info!(
                            "audit spool is writable again after {:.1} s; {} bytes of held events written",
                            started.elapsed().as_secs_f64(),
                            frames.len()
                        );
                    }
                    return;
                }
                Err(e) => {
                    if self.shared.healthy.swap(false, Ordering::Relaxed) {
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
                    if frames.len() < HOLD_BYTES {
                        *stop |= self.collect(frames);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.spool.sync()
            && self.shared.healthy.swap(false, Ordering::Relaxed)
        {
            error!("audit spool fsync failed: {e}");
        }
        self.last_sync = Instant::now();
        self.dirty = false;
    }
}

/// Gives back an emptied buffer's memory when a backlog (a spool that
/// could not be written for a while) grew it: it must not stay for the
/// daemon's life.
fn trim(buf: &mut Vec<u8>) {
    if buf.capacity() > 4 * BATCH_BYTES {
        *buf = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(i: usize) -> Event {
        Event::DaemonStop {
            ts_us: i as i64,
            reason: format!("event {i}"),
        }
    }

    /// The events' numbers: a stop's timestamp, a statement's text.
    fn order(dir: &Path) -> Vec<i64> {
        spool::read_all(dir)
            .unwrap()
            .into_iter()
            .map(|e| match e {
                Event::DaemonStop { ts_us, .. } => ts_us,
                Event::Statement(s) => {
                    assert_eq!(s.hash, s.compute_hash(), "row {} not sealed", s.seq);
                    s.text.parse().unwrap()
                }
                other => panic!("unexpected event {other:?}"),
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_holds_sessions_back_and_loses_nothing_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            queue: 4,
            ..AuditConfig::default()
        };
        let auditor = Arc::new(Auditor::start(&config, dir.path()).unwrap());
        // Two sessions at once, far past the bound: events, and statement
        // rows as the backend direction hands them over.
        let tasks: Vec<_> = (0..2)
            .map(|t| {
                let a = auditor.clone();
                tokio::spawn(async move {
                    let shared = Arc::new(session::SessionAudit::new(
                        uuid::Uuid::from_u128(t as u128),
                        "test".into(),
                    ));
                    let mut front = session::FrontendAudit::new(shared.clone());
                    let mut back = session::BackendAudit::new(shared);
                    for i in 0..5000 {
                        let n = t * 10_000 + i;
                        if i % 2 == 0 {
                            a.record(stop(n)).await;
                        } else {
                            front
                                .query(session::StatementInfo::unchecked(n.to_string().as_bytes()));
                            back.ready();
                            back.hand_over(&a).await;
                            assert_eq!(back.take_ended().count(), 0);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        auditor.close().await;
        // Recorded after close: refused (and logged), not written.
        auditor.record(stop(99_999)).await;
        let seen = order(dir.path());
        assert_eq!(seen.len(), 10_000);
        for t in 0..2 {
            let mine: Vec<i64> = seen.iter().copied().filter(|n| *n / 10_000 == t).collect();
            let want: Vec<i64> = (0..5000).map(|i| t * 10_000 + i).collect();
            assert_eq!(mine, want, "session {t}'s events out of order");
        }
        // Each session's rows, sealed on the writer, form one chain.
        let mut prev = std::collections::HashMap::new();
        for e in spool::read_all(dir.path()).unwrap() {
            if let Event::Statement(s) = e {
                let last = prev.insert(s.session, (s.seq, s.hash));
                let (seq, hash) = last.unwrap_or((0, [0; 32]));
                assert_eq!((s.seq, s.prev_hash), (seq + 1, hash));
            }
        }
        assert_eq!(prev.len(), 2);
    }

    #[test]
    fn an_idle_writer_is_woken_by_the_next_event() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let auditor = Auditor::start(&AuditConfig::default(), dir.path()).unwrap();
            for i in 0..3 {
                // Long enough for the writer to find the queue empty and park.
                tokio::time::sleep(Duration::from_millis(50)).await;
                auditor.record(stop(i)).await;
                let deadline = Instant::now() + Duration::from_secs(5);
                // A read racing the write may see a torn last frame.
                while spool::read_all(dir.path()).map_or(0, |e| e.len()) <= i {
                    assert!(Instant::now() < deadline, "event {i} not written");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            auditor.close().await;
        });
        assert_eq!(order(dir.path()), vec![0, 1, 2]);
    }

    #[test]
    fn the_writer_runs_as_background_work() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = Auditor::start(&AuditConfig::default(), dir.path()).unwrap();
        let writer = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| t.ok())
            .find(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "interceptor-aud")
            })
            .and_then(|t| t.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .expect("the writer thread");
        // SAFETY: no pointers are passed; a tid that has gone only makes
        // the call fail.
        let policy = unsafe { libc::sched_getscheduler(writer) };
        assert_eq!(policy, libc::SCHED_BATCH);
        drop(auditor);
    }
}
