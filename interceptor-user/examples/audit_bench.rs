//! The audit path's own speed, for `cargo xtask bench audit` (run in a
//! release build): spool appends per second (encoding and writing frames
//! as the writer thread does, the median of five passes, and end to end
//! through the Auditor's queue), and, given a ClickHouse URL, rows per
//! second shipped from a spool into ClickHouse by the real shipper.
//!
//! Usage: audit_bench [--clickhouse URL] [--rows N]. Prints one JSON
//! object.

use std::path::Path;
use std::time::{Duration, Instant};

use interceptor::audit::session::{BackendAudit, FrontendAudit, SessionAudit, StatementInfo};
use interceptor::audit::shipper::{Cursor, Shipper};
use interceptor::audit::spool::{SpoolWriter, encode_frame, segments};
use interceptor::audit::warehouse::Warehouse;
use interceptor::audit::{Auditor, Event, StatementRow};
use interceptor::config::{AuditConfig, ClickHouseConfig};
use serde_json::json;

/// A typical statement row: a 90-byte query, one table, sealed.
fn row(session: uuid::Uuid, seq: u64) -> Event {
    let mut r = StatementRow {
        session,
        seq,
        ts_us: interceptor::audit::now_us(),
        principal: "github:repo=acme/app:job=migrate".into(),
        text: format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {seq} AND bid = 1 -- audit bench"
        ),
        fingerprint: 0x1234_5678_9abc_def0,
        kind: "read".into(),
        tables: vec!["pgbench_accounts".into()],
        decision: "allow".into(),
        rule: "read".into(),
        approval: String::new(),
        duration_us: 120,
        rows: 1,
        bytes: 30,
        masked: 0,
        sqlstate: String::new(),
        prev_hash: [0; 32],
        hash: [0; 32],
    };
    r.seal([7; 32]);
    Event::Statement(Box::new(r))
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let rows: u64 = arg("--rows").map_or(Ok(1_000_000), |s| s.parse())?;
    let session = uuid::Uuid::now_v7();

    // The first pass's spool is what is shipped to ClickHouse below.
    let dir = tempfile::tempdir()?;
    let events: Vec<Event> = (1..=rows).map(|i| row(session, i)).collect();
    let spool_secs = median_of_passes(Some(dir.path()), |d| two_threads(&events, d))?;
    let one_thread_secs = median_of_passes(None, |d| one_thread(&events, d))?;
    // Encoding alone, for scale.
    let mut buf = Vec::with_capacity(2 << 20);
    let start = Instant::now();
    let mut n = 0;
    for e in &events {
        encode_frame(e, &mut buf);
        if buf.len() >= 1 << 20 {
            n += buf.len();
            buf.clear();
        }
    }
    let encode_secs = start.elapsed().as_secs_f64();
    std::hint::black_box(n);
    let spool_bytes: u64 = segments(dir.path())?
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();

    // End to end through the bounded queue, from one session task.
    let queued_dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let copies: Vec<Event> = events.clone();
    let queued_secs = rt.block_on(async {
        let auditor = Auditor::start(&AuditConfig::default(), queued_dir.path())?;
        let start = Instant::now();
        for e in copies {
            auditor.record(e).await;
        }
        auditor.close().await;
        anyhow::Ok(start.elapsed().as_secs_f64())
    })?;

    // What a session does per statement: open its row when the Query
    // arrives, count the reply's row, and end it at ReadyForQuery, moving
    // it into the queue; and what the writer does with it: seal it (encode
    // and hash it into the session's chain).
    let shared = std::sync::Arc::new(SessionAudit::new(session, "github:repo=acme/app".into()));
    let (mut front, mut back) = (
        FrontendAudit::new(shared.clone()),
        BackendAudit::new(shared),
    );
    let texts: Vec<String> = (0..1000)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i};"))
        .collect();
    let mut queued = Vec::with_capacity(1024);
    let mut sealed = Vec::with_capacity(1 << 20);
    let (mut session_time, mut seal_time) = (Duration::ZERO, Duration::ZERO);
    for chunk in 0..rows.div_ceil(1024) {
        let start = Instant::now();
        for i in chunk * 1024..((chunk + 1) * 1024).min(rows) {
            front.query(StatementInfo::unchecked(
                texts[i as usize % texts.len()].as_bytes(),
            ));
            back.row(30);
            back.complete(b"SELECT 1\0");
            back.ready();
            queued.extend(back.take_ended());
        }
        let sealing = Instant::now();
        session_time += sealing - start;
        for row in queued.drain(..) {
            row.seal(&mut sealed);
        }
        seal_time += sealing.elapsed();
        sealed.clear();
    }
    let statement_ns = session_time.as_nanos() as f64 / rows as f64;
    let seal_ns = seal_time.as_nanos() as f64 / rows as f64;

    let mut out = json!({
        "session_audit_ns_per_statement": statement_ns,
        "writer_seal_ns_per_statement": seal_ns,
        "rows": rows,
        "spool_appends_per_s": rows as f64 / spool_secs,
        "spool_appends_one_thread_per_s": rows as f64 / one_thread_secs,
        "encodes_per_s": rows as f64 / encode_secs,
        "spool_mb_per_s": spool_bytes as f64 / spool_secs / 1e6,
        "spool_bytes_per_row": spool_bytes as f64 / rows as f64,
        "queued_appends_per_s": rows as f64 / queued_secs,
    });

    if let Some(url) = arg("--clickhouse") {
        let config: ClickHouseConfig = toml::from_str(&format!(
            "url = \"{url}\"\ndatabase = \"audit_bench\"\nflush_interval = \"50ms\"\n"
        ))?;
        let shipped = rt.block_on(async {
            let shipper = Shipper::prepare(dir.path(), &config, None).await?;
            let w = Warehouse::connect(&config, None).await?;
            let cpu = cpu_seconds();
            let start = Instant::now();
            let handle = shipper.spawn()?;
            // Done when the cursor has passed the last frame of the spool.
            let last = segments(dir.path())?.last().map(|(i, _)| *i).unwrap_or(0);
            loop {
                let c = Cursor::load(dir.path()).unwrap_or_default();
                if c.segment == last && c.offset >= spool_bytes_in(dir.path(), last) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(600) {
                    anyhow::bail!("not shipped after 600 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            let client_cpu = cpu_seconds() - cpu;
            drop(handle);
            let n: u64 = w
                .text(
                    "SELECT count() FROM audit_bench.statement_rows",
                    "TabSeparated",
                )
                .await?
                .trim()
                .parse()?;
            anyhow::Ok((secs, client_cpu, n))
        })?;
        let (secs, cpu, n) = shipped;
        out["clickhouse_rows"] = n.into();
        out["clickhouse_rows_per_s"] = (rows as f64 / secs).into();
        out["shipper_cpu_s_per_million"] = (cpu * 1e6 / rows as f64).into();
    }
    println!("{out}");
    Ok(())
}

/// Passes per append figure. A pass takes about half a second; on the
/// 2-vCPU VM one pass ran at a third of the rate of the passes just before
/// and after it (something on the shared host), and the median of five is
/// not moved by one such.
const PASSES: usize = 5;

/// The median time of [`PASSES`] passes of `pass`, each into a fresh
/// directory, except that the first writes into `keep` if given.
fn median_of_passes(
    keep: Option<&Path>,
    mut pass: impl FnMut(&Path) -> anyhow::Result<f64>,
) -> anyhow::Result<f64> {
    let mut secs = Vec::with_capacity(PASSES);
    for i in 0..PASSES {
        let fresh = tempfile::tempdir()?;
        secs.push(pass(keep.filter(|_| i == 0).unwrap_or(fresh.path()))?);
    }
    secs.sort_by(f64::total_cmp);
    Ok(secs[secs.len() / 2])
}

/// Spool appends as the daemon makes them: sessions encode their frames
/// on their own threads, and the writer thread appends 1 MiB batches and
/// fsyncs at most every `fsync_interval` (the default fsync policy).
fn two_threads(events: &[Event], dir: &Path) -> anyhow::Result<f64> {
    let (mut w, _) = SpoolWriter::open(dir, 64 << 20)?;
    let start = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        scope.spawn(move || {
            let mut buf = Vec::with_capacity(2 << 20);
            for e in events {
                encode_frame(e, &mut buf);
                if buf.len() >= 1 << 20 {
                    let next = empty_rx
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(2 << 20));
                    if full_tx.send(std::mem::replace(&mut buf, next)).is_err() {
                        return;
                    }
                }
            }
            let _ = full_tx.send(buf);
        });
        let mut sync = SyncPolicy::default();
        for mut batch in full_rx {
            w.append(&batch)?;
            sync.after_append(&mut w)?;
            batch.clear();
            let _ = empty_tx.send(batch);
        }
        w.sync()?;
        Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// The same on one thread: encode a batch, append it, and so on.
fn one_thread(events: &[Event], dir: &Path) -> anyhow::Result<f64> {
    let (mut w, _) = SpoolWriter::open(dir, 64 << 20)?;
    let start = Instant::now();
    let mut buf = Vec::with_capacity(2 << 20);
    let mut sync = SyncPolicy::default();
    for e in events {
        encode_frame(e, &mut buf);
        if buf.len() >= 1 << 20 {
            w.append(&buf)?;
            buf.clear();
            sync.after_append(&mut w)?;
        }
    }
    w.append(&buf)?;
    w.sync()?;
    Ok(start.elapsed().as_secs_f64())
}

/// The daemon's default fsync policy: sync after an append once
/// `fsync_interval` has passed since the last sync.
struct SyncPolicy {
    every: Duration,
    synced: Instant,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            every: AuditConfig::default().fsync_interval,
            synced: Instant::now(),
        }
    }
}

impl SyncPolicy {
    fn after_append(&mut self, w: &mut SpoolWriter) -> std::io::Result<()> {
        if self.synced.elapsed() >= self.every {
            w.sync()?;
            self.synced = Instant::now();
        }
        Ok(())
    }
}

fn spool_bytes_in(dir: &Path, index: u64) -> u64 {
    std::fs::metadata(dir.join(format!("seg-{index:012}.spool"))).map_or(0, |m| m.len())
}

/// This process's CPU time (user + system), in seconds.
fn cpu_seconds() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF);
    usage.map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}
