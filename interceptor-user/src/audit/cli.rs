//! `interceptor audit tail | query | verify | init` and `interceptor
//! replay`: the spool read locally, and ClickHouse when configured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use uuid::Uuid;

use super::event::{Event, StatementRow};
use super::spool;
use super::warehouse::{self, Version, Warehouse};
use crate::config::{ClickHouseConfig, Secret};

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn when(ts_us: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(ts_us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// `value` between `before` and `after`, or nothing when it is empty.
fn around(before: &str, value: &str, after: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!("{before}{value}{after}")
    }
}

/// One line per event, for people.
fn line(e: &Event) -> String {
    match e {
        Event::DaemonStart {
            ts_us,
            version,
            pid,
        } => {
            format!("{} daemon start version={version} pid={pid}", when(*ts_us))
        }
        Event::DaemonStop { ts_us, reason } => format!("{} daemon stop: {reason}", when(*ts_us)),
        Event::PolicyReload {
            ts_us,
            file,
            ok,
            detail,
        } => format!(
            "{} policy {} {file}{}",
            when(*ts_us),
            if *ok { "reloaded" } else { "rejected" },
            around(": ", detail, "")
        ),
        Event::SessionStart(s) => format!(
            "{} session {} start principal={:?} user={} db={} target={} from={} tls={}{}",
            when(s.ts_us),
            s.session,
            s.principal,
            s.user,
            s.database,
            s.target,
            s.client_addr,
            s.tls,
            if s.token_subject.is_empty() {
                String::new()
            } else {
                format!(" token_sub={:?}", s.token_subject)
            }
        ),
        Event::SessionEnd(s) => format!(
            "{} session {} end {} after {} ms, {} statements, {} bytes in, {} bytes out",
            when(s.ts_us),
            s.session,
            s.outcome,
            s.duration_us / 1000,
            s.statements,
            s.bytes_from_client,
            s.bytes_to_client
        ),
        Event::Statement(s) => format!(
            "{} session {} #{} {} {}{} rows={} bytes={} {}us{} {:?}",
            when(s.ts_us),
            s.session,
            s.seq,
            s.decision,
            if s.kind.is_empty() { "-" } else { &s.kind },
            around(" rule=", &s.rule, ""),
            s.rows,
            s.bytes,
            s.duration_us,
            around(" sqlstate=", &s.sqlstate, ""),
            s.text
        ),
        Event::Masked(m) => format!(
            "{} session {} #{} masked {} by rule {}{}{}",
            when(m.ts_us),
            m.session,
            m.seq,
            m.count,
            m.rule,
            around(" column=", &m.column, ""),
            around(" detector=", &m.detector, "")
        ),
        Event::Approval(a) => format!(
            "{} approval {} {} by {}{}{}",
            when(a.ts_us),
            if a.approval.is_empty() {
                "-"
            } else {
                &a.approval
            },
            a.event,
            a.actor,
            if a.session.is_nil() {
                String::new()
            } else {
                format!(" session {}", a.session)
            },
            around(": ", &a.reason, "")
        ),
    }
}

fn print_events<'a>(events: impl IntoIterator<Item = &'a Event>, as_json: bool) {
    for e in events {
        if as_json {
            println!("{}", json(e));
        } else {
            println!("{}", line(e));
        }
    }
}

fn json(e: &Event) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    // Hashes as hex, not arrays of numbers.
    if let (Event::Statement(s), Some(obj)) = (e, v.get_mut("Statement")) {
        obj["prev_hash"] = hex(&s.prev_hash).into();
        obj["hash"] = hex(&s.hash).into();
        obj["fingerprint"] = format!("{:016x}", s.fingerprint).into();
    }
    v
}

/// Prints the last `n` events (of one session, if given).
pub fn tail(dir: &Path, n: usize, session: Option<Uuid>, as_json: bool) -> Result<()> {
    let events = spool::newest(dir, n, |e| session.is_none() || e.session() == session)
        .with_context(|| format!("reading the audit spool {}", dir.display()))?;
    print_events(&events, as_json);
    Ok(())
}

/// Where the audit trail is: the spool, and ClickHouse when configured.
pub struct Source {
    pub dir: PathBuf,
    pub clickhouse: Option<(ClickHouseConfig, Option<Secret>)>,
}

impl Source {
    /// What `read` makes of the spool's events (without ClickHouse, none
    /// when the spool is gone).
    fn read_spool<T: Default>(&self, read: impl FnOnce(&Path) -> std::io::Result<T>) -> Result<T> {
        match read(&self.dir) {
            Ok(found) => Ok(found),
            // Never written, or everything shipped and the daemon gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.clickhouse.is_some() => {
                Ok(T::default())
            }
            Err(e) => {
                Err(e).with_context(|| format!("reading the audit spool {}", self.dir.display()))
            }
        }
    }

    async fn warehouse(&self) -> Result<Option<Warehouse>> {
        let Some((config, password)) = &self.clickhouse else {
            return Ok(None);
        };
        Ok(Some(Warehouse::connect(config, password.as_ref()).await?))
    }
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

/// What is known of one session: its statement rows by sequence number,
/// and lines for its start and end.
#[derive(Default)]
struct SessionRecord {
    start: Option<String>,
    end: Option<String>,
    rows: BTreeMap<u64, StatementRow>,
}

/// Merges ClickHouse's rows and the spool's (not yet shipped, or shipped
/// and not yet deleted): one row per sequence number.
fn session_record(source: &Source, session: Uuid) -> Result<SessionRecord> {
    let mut rec = SessionRecord::default();
    block_on(async {
        let Some(w) = source.warehouse().await? else {
            return anyhow::Ok(());
        };
        for r in w.statements(session).await? {
            rec.rows.insert(r.seq, r);
        }
        let db = &w.database;
        let start = w
            .text(
                &format!(
                    "SELECT toString(ts), principal, user, database, target, client_addr, tls, job, outcome, \
                     intDiv(end_us - ts_us, 1000), statements, bytes_from_client, bytes_to_client \
                     FROM {db}.sessions WHERE session = toUUID('{session}') LIMIT 1"
                ),
                "TabSeparated",
            )
            .await?;
        let f: Vec<&str> = start.trim_end().split('\t').collect();
        if let [
            ts,
            principal,
            user,
            database,
            target,
            from,
            tls,
            job,
            outcome,
            ms,
            n,
            bin,
            bout,
        ] = f[..]
        {
            rec.start = Some(format!(
                "{ts} session {session} start principal={principal:?} user={user} db={database} target={target} from={from} tls={} job={job:?}",
                tls == "1"
            ));
            if !outcome.is_empty() {
                rec.end = Some(format!(
                    "session {session} end {outcome} after {ms} ms, {n} statements, {bin} bytes in, {bout} bytes out"
                ));
            }
        }
        Ok(())
    })??;
    source.read_spool(|dir| {
        spool::for_each(dir, |e| match e {
            Event::Statement(s) if s.session == session => {
                rec.rows.insert(s.seq, *s);
            }
            Event::SessionStart(ref s) if s.session == session => rec.start = Some(line(&e)),
            Event::SessionEnd(ref s) if s.session == session => rec.end = Some(line(&e)),
            _ => {}
        })
    })?;
    if rec.start.is_none() && rec.rows.is_empty() {
        bail!(
            "session {session} is not in the audit trail (spool {}{})",
            source.dir.display(),
            if source.clickhouse.is_some() {
                ", and ClickHouse"
            } else {
                ""
            }
        );
    }
    Ok(rec)
}

/// Checks a session's hash chain: sequence numbers 1, 2, 3... with no
/// gap, each row's hash over its contents, each linked to the one before.
pub fn verify(source: &Source, session: Uuid) -> Result<String> {
    let rec = session_record(source, session)?;
    let rows: Vec<&StatementRow> = rec.rows.values().collect();
    verify_chain(&rows)?;
    Ok(format!(
        "session {session}: {} statement rows, hash chain intact (last {})",
        rows.len(),
        rows.last().map_or_else(|| "-".into(), |r| hex(&r.hash))
    ))
}

/// A session's transcript, for people.
pub fn replay(source: &Source, session: Uuid) -> Result<String> {
    let rec = session_record(source, session)?;
    let mut out = String::new();
    if let Some(s) = &rec.start {
        let _ = writeln!(out, "{s}");
    }
    for r in rec.rows.values() {
        let _ = writeln!(
            out,
            "  #{:<4} {} {:<9}{} {}",
            r.seq,
            when(r.ts_us),
            r.decision,
            around(" [", &r.rule, "]"),
            r.text
        );
        let _ = writeln!(
            out,
            "         -> {} rows, {} bytes, {} masked, {}, {} us{}",
            r.rows,
            r.bytes,
            r.masked,
            if r.sqlstate.is_empty() {
                "ok".to_owned()
            } else {
                format!("SQLSTATE {}", r.sqlstate)
            },
            r.duration_us,
            around(", approval ", &r.approval, "")
        );
    }
    match &rec.end {
        Some(e) => {
            let _ = writeln!(out, "{e}");
        }
        None => {
            let _ = writeln!(
                out,
                "(no session end recorded yet: still open, or not yet shipped)"
            );
        }
    }
    Ok(out)
}

/// Statement filters for `audit query`.
#[derive(Debug, Default)]
pub struct Filter {
    pub session: Option<Uuid>,
    pub principal: Option<String>,
    pub decision: Option<String>,
    pub table: Option<String>,
    pub since: Option<std::time::Duration>,
}

impl Filter {
    fn cutoff(&self) -> Option<i64> {
        self.since
            .map(|d| super::event::now_us() - d.as_micros() as i64)
    }

    fn matches(&self, r: &StatementRow) -> bool {
        self.session.is_none_or(|s| r.session == s)
            && self.principal.as_ref().is_none_or(|p| r.principal == *p)
            && self.decision.as_ref().is_none_or(|d| r.decision == *d)
            && self.table.as_ref().is_none_or(|t| r.tables.contains(t))
            && self.cutoff().is_none_or(|c| r.ts_us >= c)
    }

    fn sql_where(&self) -> String {
        let mut w = vec!["1".to_owned()];
        if let Some(s) = self.session {
            w.push(format!("session = toUUID('{s}')"));
        }
        if let Some(p) = &self.principal {
            w.push(format!("principal = {}", quote(p)));
        }
        if let Some(d) = &self.decision {
            w.push(format!("decision = {}", quote(d)));
        }
        if let Some(t) = &self.table {
            w.push(format!("has(tables, {})", quote(t)));
        }
        if let Some(c) = self.cutoff() {
            w.push(format!("ts_us >= {c}"));
        }
        w.join(" AND ")
    }
}

/// A ClickHouse string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Prints the newest `limit` statement rows that match, oldest first.
pub fn query(source: &Source, filter: &Filter, limit: usize, as_json: bool) -> Result<()> {
    let rows: Vec<Event> = match block_on(source.warehouse())?? {
        Some(w) => {
            let sql = format!(
                "SELECT {} FROM {}.statements WHERE {} ORDER BY ts_us DESC, seq DESC LIMIT {limit}",
                warehouse::STATEMENTS.column_list(),
                w.database,
                filter.sql_where()
            );
            let mut rows = block_on(w.fetch_statements(&sql))??;
            rows.reverse();
            rows.into_iter()
                .map(|r| Event::Statement(Box::new(r)))
                .collect()
        }
        None => source.read_spool(|dir| {
            spool::newest(
                dir,
                limit,
                |e| matches!(e, Event::Statement(s) if filter.matches(s)),
            )
        })?,
    };
    print_events(&rows, as_json);
    Ok(())
}

/// Runs analyst SQL on ClickHouse and prints the result.
pub fn query_sql(source: &Source, sql: &str, format: &str) -> Result<()> {
    let out = block_on(async {
        let Some(w) = source.warehouse().await? else {
            bail!("--sql needs ClickHouse: add [audit.clickhouse] to the config and pass --config");
        };
        Ok(w.text(sql, format).await?)
    })??;
    print!("{out}");
    Ok(())
}

/// `audit init`: creates what is missing and checks the result.
pub fn init(config: &ClickHouseConfig, password: Option<Secret>) -> Result<String> {
    block_on(async {
        let w = Warehouse::connect(config, password.as_ref()).await?;
        let ran = w.init(config.retention_days).await?;
        Ok(format!(
            "ClickHouse {} at {}: database {} ready ({} statements run; tables {}; views statements, sessions, daemon)",
            w.server,
            w.url(),
            w.database,
            ran.len(),
            warehouse::TABLES.map(|t| t.name).join(", ")
        ))
    })?
}

/// `audit init --print`: the DDL for a server version.
pub fn print_ddl(version: &str, database: &str) -> Result<String> {
    let v = Version::parse(version)
        .with_context(|| format!("--server-version {version:?}: expected X.Y, like 18.16"))?;
    Ok(warehouse::ddl(database, v, 0)
        .into_iter()
        .map(|s| s + ";\n")
        .collect())
}

pub fn verify_chain(rows: &[&StatementRow]) -> Result<()> {
    let mut prev = [0u8; 32];
    for (i, r) in rows.iter().enumerate() {
        let want = i as u64 + 1;
        if r.seq != want {
            bail!(
                "statement row {want} is missing (found #{} in its place): rows were removed",
                r.seq
            );
        }
        if r.prev_hash != prev {
            bail!(
                "statement row #{} does not link to row #{}: rows were removed, reordered or replaced",
                r.seq,
                r.seq - 1
            );
        }
        if r.compute_hash() != r.hash {
            bail!(
                "statement row #{} was changed after it was written: its hash does not match its contents",
                r.seq
            );
        }
        prev = r.hash;
    }
    Ok(())
}
