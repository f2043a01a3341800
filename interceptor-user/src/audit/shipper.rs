//! Ships the spool to ClickHouse, oldest event first, and deletes a
//! segment only once ClickHouse has acknowledged every event in it.
//!
//! How far shipping got is a cursor (segment, byte offset) in the file
//! `shipped` next to the segments, written after each acknowledged batch.
//! A crash between the acknowledgement and the cursor write sends that
//! batch again; the tables' ReplacingMergeTree keys fold the copies into
//! one row, and the analyst views read with FINAL.
//!
//! A segment is finished once a later one exists: the spool writer only
//! starts a new segment after its last write to the old one. The shipper
//! lists the segments before it reads, so what it reads of a segment it
//! already knew to be finished is all there is.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::event::{Event, StatementRowWire};
use super::spool;
use super::warehouse::{Batch, StatementFrames, Warehouse, WarehouseError};
use crate::config::{ClickHouseConfig, Secret};

const CURSOR_FILE: &str = "shipped";
/// Longest wait between attempts while ClickHouse is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a continuing outage is logged again.
const REPEAT_ERROR: Duration = Duration::from_secs(30);
/// Longest a connection check may take at start-up: a server that
/// swallows packets must not hold the daemon's start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one batch may take before it is abandoned and sent again.
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);

/// How far the spool has been shipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

impl Cursor {
    pub fn load(dir: &Path) -> std::io::Result<Cursor> {
        let text = match std::fs::read_to_string(dir.join(CURSOR_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursor::default()),
            Err(e) => return Err(e),
        };
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(segment)), Some(Ok(offset))) => Ok(Cursor { segment, offset }),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not `SEGMENT OFFSET`: {text:?}", CURSOR_FILE),
            )),
        }
    }

    /// Written to a new file and renamed over the old one, so a crash
    /// leaves one or the other.
    pub fn store(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{CURSOR_FILE}.tmp"));
        let mut f = File::create(&tmp)?;
        writeln!(f, "{} {}", self.segment, self.offset)?;
        f.sync_data()?;
        std::fs::rename(&tmp, dir.join(CURSOR_FILE))?;
        File::open(dir)?.sync_all()
    }
}

/// Events read from the spool after a cursor.
#[derive(Debug, Default)]
pub struct Unshipped {
    /// Statement rows, as their frames hold them.
    pub statements: StatementFrames,
    /// The other events.
    pub events: Vec<Event>,
    /// Where the next read starts, once these are shipped.
    pub next: Cursor,
    /// Segments wholly read: deleted once these are shipped.
    pub finished: Vec<PathBuf>,
    /// Bytes of finished segments that were not whole frames (damage).
    pub skipped: u64,
}

impl Unshipped {
    /// How many events were read.
    pub fn len(&self) -> usize {
        self.statements.len() + self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads up to `max` events after `from`.
pub fn read_after(dir: &Path, from: Cursor, max: usize) -> std::io::Result<Unshipped> {
    let segments = spool::segments(dir)?;
    let mut out = Unshipped {
        next: from,
        ..Unshipped::default()
    };
    for (i, (index, path)) in segments.iter().enumerate() {
        if *index < out.next.segment {
            // Shipped, but its deletion was cut short.
            out.finished.push(path.clone());
            continue;
        }
        if *index > out.next.segment {
            out.next = Cursor {
                segment: *index,
                offset: 0,
            };
        }
        let (end, len) = spool::scan_payloads(path, out.next.offset, max - out.len(), |body| {
            match spool::statement_payload(body) {
                // Checked here as before: a frame that does not decode
                // ends its segment.
                Some(row) => {
                    let ok = StatementRowWire::decode(row).is_some();
                    if ok {
                        out.statements.push(row);
                    }
                    ok
                }
                None => match spool::decode_event(body) {
                    Some(e) => {
                        out.events.push(e);
                        true
                    }
                    None => false,
                },
            }
        })?;
        out.next.offset = end;
        if out.len() >= max {
            break;
        }
        let later = segments.get(i + 1).map(|(n, _)| *n);
        match later {
            Some(n) => {
                out.skipped += len.saturating_sub(end);
                out.finished.push(path.clone());
                out.next = Cursor {
                    segment: n,
                    offset: 0,
                };
            }
            None => break,
        }
    }
    Ok(out)
}

/// The shipping thread; stopped when dropped.
pub struct ShipperHandle {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ShipperHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Shipper {
    dir: PathBuf,
    config: ClickHouseConfig,
    password: Option<Secret>,
    warehouse: Option<Warehouse>,
    host: String,
}

impl Shipper {
    /// Connects, creates what is missing (if configured to) and checks the
    /// tables. Unreachable is not an error here: the spool holds the
    /// events until ClickHouse is back. A table that does not match is.
    pub async fn prepare(
        dir: &Path,
        config: &ClickHouseConfig,
        password: Option<Secret>,
    ) -> Result<Shipper, WarehouseError> {
        let mut shipper = Shipper {
            dir: dir.to_owned(),
            config: config.clone(),
            password,
            warehouse: None,
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, shipper.connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ WarehouseError::Unreachable { .. })) => {
                warn!("audit: {e}; events stay in the spool until it answers")
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => warn!(
                url = %config.url,
                "audit: ClickHouse did not answer within {CONNECT_TIMEOUT:?}; events stay in the spool until it does"
            ),
        }
        Ok(shipper)
    }

    async fn connect(&mut self) -> Result<(), WarehouseError> {
        let w = Warehouse::connect(&self.config, self.password.as_ref()).await?;
        if self.config.create_tables {
            w.init(self.config.retention_days).await?;
        } else {
            w.check().await?;
        }
        info!(
            url = w.url(),
            database = %w.database,
            server = %w.server,
            "audit: shipping to ClickHouse"
        );
        self.warehouse = Some(w);
        Ok(())
    }

    /// Runs on its own thread, so inserts never share a core's event loop
    /// with sessions or the accept loop.
    pub fn spawn(self) -> std::io::Result<ShipperHandle> {
        let (stop, stopped) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("interceptor-ship".into())
            .spawn(move || {
                crate::workers::background("the ClickHouse shipper");
                rt.block_on(self.run(stopped))
            })?;
        Ok(ShipperHandle {
            stop,
            thread: Some(thread),
        })
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut cursor = match Cursor::load(&self.dir) {
            Ok(c) => c,
            Err(e) => {
                error!(
                    "audit: cannot read the shipping cursor ({e}); shipping the whole spool again (ClickHouse folds the copies)"
                );
                Cursor::default()
            }
        };
        let mut backoff = Duration::from_millis(100);
        let mut outage: Option<(Instant, Instant)> = None;
        let mut last_retention = None::<Instant>;
        loop {
            if *stop.borrow() {
                // The spool writer has closed: one last pass, so a clean
                // stop leaves nothing behind while ClickHouse answers.
                let last = tokio::time::timeout(Duration::from_secs(3), async {
                    while let Ok(n) = self.ship_once(&mut cursor).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
                let _ = last.await;
                return;
            }
            // A stop abandons a batch in flight (it is sent again: the
            // cursor moves only after an acknowledgement).
            let shipped = tokio::select! {
                r = tokio::time::timeout(BATCH_TIMEOUT, self.ship_once(&mut cursor)) => {
                    r.unwrap_or(Err(ShipError::Timeout))
                }
                _ = stop.changed() => continue,
            };
            let wait = match shipped {
                Ok(shipped) => {
                    if let Some((since, _)) = outage.take() {
                        info!(
                            "audit: ClickHouse answers again after {:.1} s; the spooled events are being shipped",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    backoff = Duration::from_millis(100);
                    if self.config.retention_days > 0
                        && last_retention.is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
                    {
                        last_retention = Some(Instant::now());
                        self.retention().await;
                    }
                    if shipped >= self.config.batch_rows {
                        Duration::ZERO
                    } else {
                        self.config.flush_interval
                    }
                }
                Err(e) => {
                    let now = Instant::now();
                    match &mut outage {
                        None => {
                            error!(
                                "audit: cannot ship to ClickHouse: {e}; events stay in the spool and are retried"
                            );
                            outage = Some((now, now));
                        }
                        Some((since, logged)) if logged.elapsed() > REPEAT_ERROR => {
                            error!(
                                "audit: ClickHouse still failing after {} s: {e}",
                                since.elapsed().as_secs()
                            );
                            *logged = now;
                        }
                        Some(_) => {}
                    }
                    if matches!(
                        e,
                        ShipError::Warehouse(WarehouseError::Unreachable { .. })
                            | ShipError::Timeout
                    ) {
                        self.warehouse = None;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    backoff
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Ships one batch; returns how many events it held.
    async fn ship_once(&mut self, cursor: &mut Cursor) -> Result<usize, ShipError> {
        if self.warehouse.is_none() {
            self.connect().await?;
        }
        // Read here, blocking this thread's runtime (the shipper's alone)
        // for the few ms a batch takes from the page cache. On a blocking
        // thread, each of a batch's ~10 allocations per row was made in
        // another malloc arena than the one that freed it after the
        // insert; in a profile of the daemon under pgbench, freeing across
        // arenas took more of the shipper's samples than decoding did.
        let read = read_after(&self.dir, *cursor, self.config.batch_rows.max(1))
            .map_err(ShipError::Spool)?;
        if read.skipped > 0 {
            error!(
                "audit spool: {} bytes of damaged frames skipped in finished segments",
                read.skipped
            );
        }
        let n = read.len();
        if n > 0 {
            let mut batch = Batch {
                statements: read.statements,
                ..Batch::default()
            };
            for e in read.events {
                batch.push(e, &self.host);
            }
            if let Some(w) = &self.warehouse {
                w.insert(&batch).await?;
            }
        }
        if read.next != *cursor {
            read.next.store(&self.dir).map_err(ShipError::Spool)?;
            *cursor = read.next;
        }
        for path in &read.finished {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(segment = %path.display(), "audit: cannot delete a shipped segment: {e}");
            }
        }
        Ok(n)
    }

    async fn retention(&self) {
        let Some(w) = &self.warehouse else { return };
        match w.drop_expired(self.config.retention_days).await {
            Ok(0) => {}
            Ok(n) => info!(
                partitions = n,
                days = self.config.retention_days,
                "audit: dropped partitions past retention"
            ),
            Err(e) => warn!("audit: retention: {e}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error("reading the spool: {0}")]
    Spool(std::io::Error),
    #[error("no answer within {BATCH_TIMEOUT:?}")]
    Timeout,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::spool::{SpoolWriter, encode_frame, test_event as stop};

    fn append(w: &mut SpoolWriter, range: std::ops::Range<i64>) {
        let mut buf = Vec::new();
        for i in range {
            buf.clear();
            encode_frame(&stop(i), &mut buf);
            w.append(&buf).unwrap();
        }
    }

    fn ts(r: &Unshipped) -> Vec<i64> {
        r.events.iter().map(Event::ts_us).collect()
    }

    #[test]
    fn reads_resume_at_the_cursor_and_finish_segments_only_once_a_later_one_exists() {
        let dir = tempfile::tempdir().unwrap();
        // Frames are about 20 bytes: a few per segment.
        let (mut w, _) = SpoolWriter::open(dir.path(), 50).unwrap();
        append(&mut w, 0..5);
        let first = read_after(dir.path(), Cursor::default(), 3).unwrap();
        assert_eq!(ts(&first), [0, 1, 2]);
        let rest = read_after(dir.path(), first.next, 100).unwrap();
        assert_eq!(ts(&rest), (3..5).collect::<Vec<_>>());
        let segments = spool::segments(dir.path()).unwrap();
        assert!(segments.len() > 1, "rotated at 50 bytes");
        // Every segment but the newest is finished (the second read lists
        // again those the first finished, as nothing deleted them).
        let finished: std::collections::BTreeSet<&PathBuf> =
            first.finished.iter().chain(&rest.finished).collect();
        let older: std::collections::BTreeSet<&PathBuf> = segments[..segments.len() - 1]
            .iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(finished, older);
        // Nothing new: nothing read, and the cursor stays.
        let again = read_after(dir.path(), rest.next, 100).unwrap();
        assert!(again.events.is_empty());
        assert_eq!(again.next, rest.next);
        // Written after the read: found by the next one.
        append(&mut w, 5..7);
        let more = read_after(dir.path(), rest.next, 100).unwrap();
        assert_eq!(ts(&more), [5, 6]);
    }

    #[test]
    fn statement_rows_are_read_as_their_frames_and_count_toward_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
        let tables = vec!["t".to_owned()];
        let row = |seq| crate::audit::StatementRowRef {
            session: uuid::Uuid::nil(),
            seq,
            ts_us: 7,
            principal: "p",
            text: "SELECT 1",
            fingerprint: 1,
            kind: "read",
            tables: &tables,
            decision: "allow",
            rule: "",
            approval: "",
            duration_us: 1,
            rows: 1,
            bytes: 1,
            masked: 0,
            sqlstate: "",
        };
        let mut buf = Vec::new();
        let h1 = spool::seal_statement_frame(row(1), [0; 32], &mut buf);
        encode_frame(&stop(9), &mut buf);
        spool::seal_statement_frame(row(2), h1, &mut buf);
        w.append(&buf).unwrap();
        let r = read_after(dir.path(), Cursor::default(), 2).unwrap();
        assert_eq!((r.statements.len(), ts(&r)), (1, vec![9]));
        let rows: Vec<StatementRowWire<'_>> = r
            .statements
            .iter()
            .map(|b| StatementRowWire::decode(b).unwrap())
            .collect();
        assert_eq!((rows[0].seq, rows[0].tables.as_slice()), (1, &["t"][..]));
        let rest = read_after(dir.path(), r.next, 100).unwrap();
        assert_eq!((rest.statements.len(), rest.events.len()), (1, 0));
        let second = StatementRowWire::decode(rest.statements.iter().next().unwrap()).unwrap();
        assert_eq!((second.seq, second.prev_hash), (2, h1));
    }

    #[test]
    fn a_half_written_frame_in_the_newest_segment_waits_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = SpoolWriter::open(dir.path(), 1 << 20).unwrap();
        append(&mut w, 0..2);
        let mut frame = Vec::new();
        encode_frame(&stop(2), &mut frame);
        let (half, rest) = frame.split_at(frame.len() / 2);
        w.append(half).unwrap();
        let r = read_after(dir.path(), Cursor::default(), 100).unwrap();
        assert_eq!(ts(&r), [0, 1]);
        assert!(r.finished.is_empty());
        w.append(rest).unwrap();
        let r = read_after(dir.path(), r.next, 100).unwrap();
        assert_eq!(ts(&r), [2]);
    }

    #[test]
    fn the_cursor_survives_a_round_trip_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Cursor::load(dir.path()).unwrap(), Cursor::default());
        let c = Cursor {
            segment: 7,
            offset: 1234,
        };
        c.store(dir.path()).unwrap();
        assert_eq!(Cursor::load(dir.path()).unwrap(), c);
        std::fs::write(dir.path().join(CURSOR_FILE), "seven").unwrap();
        assert!(Cursor::load(dir.path()).is_err());
    }
}
