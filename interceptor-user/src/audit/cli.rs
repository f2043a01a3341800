//! `interceptor audit tail | verify`: the spool read locally.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use uuid::Uuid;

use super::event::{Event, StatementRow};
use super::spool;

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn when(ts_us: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(ts_us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
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
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
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
            if s.rule.is_empty() {
                String::new()
            } else {
                format!(" rule={}", s.rule)
            },
            s.rows,
            s.bytes,
            s.duration_us,
            if s.sqlstate.is_empty() {
                String::new()
            } else {
                format!(" sqlstate={}", s.sqlstate)
            },
            s.text
        ),
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
    let events = spool::read_all(dir)
        .with_context(|| format!("reading the audit spool {}", dir.display()))?;
    let chosen: Vec<&Event> = events
        .iter()
        .filter(|e| session.is_none() || e.session() == session)
        .collect();
    for e in &chosen[chosen.len().saturating_sub(n)..] {
        if as_json {
            println!("{}", json(e));
        } else {
            println!("{}", line(e));
        }
    }
    Ok(())
}

/// Checks a session's hash chain: sequence numbers 1, 2, 3... with no
/// gap, each row's hash over its contents, each linked to the one before.
pub fn verify(dir: &Path, session: Uuid) -> Result<String> {
    let events = spool::read_all(dir)
        .with_context(|| format!("reading the audit spool {}", dir.display()))?;
    let rows: Vec<&StatementRow> = events
        .iter()
        .filter_map(|e| match e {
            Event::Statement(s) if s.session == session => Some(&**s),
            _ => None,
        })
        .collect();
    let started = events
        .iter()
        .any(|e| matches!(e, Event::SessionStart(s) if s.session == session));
    if !started && rows.is_empty() {
        bail!(
            "session {session} is not in the audit spool {}",
            dir.display()
        );
    }
    verify_chain(&rows)?;
    Ok(format!(
        "session {session}: {} statement rows, hash chain intact (last {})",
        rows.len(),
        rows.last().map_or_else(|| "-".into(), |r| hex(&r.hash))
    ))
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
