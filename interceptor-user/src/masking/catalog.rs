//! What a result column's table OID and attribute number name, and what a
//! view is made of: looked up on the proxy's own connection to the
//! target's database, with the vaulted credentials, and cached.
//!
//! Sessions wait on a lookup only the first time a relation shows up (and
//! again after [`FRESH`]); the connection is opened on first use and
//! reopened after an error. When the catalog cannot be read, the columns
//! that needed it are masked (fail closed), and the failure is cached
//! briefly so a down server does not stall every row description.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use policies::analysis::lineage::{StatementLineage, lineage};
use tracing::warn;

use crate::protocol::backend::BackendMessage;
use crate::protocol::{Reader, build, next_frame};
use crate::runtime::TargetRuntime;
use crate::stream::Conn;
use crate::upstream::{self, BACKEND_MAX_MESSAGE};

/// How long a looked-up relation is trusted.
const FRESH: Duration = Duration::from_secs(60);
/// How long a failed lookup is remembered.
const FAILED: Duration = Duration::from_secs(5);

/// A table, view or other relation.
#[derive(Debug)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `pg_class.relkind`: `r` table, `v` view, `m` materialized view...
    pub kind: u8,
    /// Column names by attribute number - 1 (dropped columns are empty).
    pub columns: Vec<String>,
    /// A view's or materialized view's definition, as lineage.
    pub definition: Option<Arc<StatementLineage>>,
    /// (schema, name) of the tables it inherits from or is a partition of,
    /// nearest first: a column rule on a parent covers its children.
    pub ancestors: Vec<(String, String)>,
}

impl Relation {
    pub fn is_view(&self) -> bool {
        matches!(self.kind, b'v' | b'm')
    }
}

/// What the cache says of a relation.
#[derive(Debug, Clone)]
pub enum Known {
    /// Not looked up yet, or stale.
    Missing,
    /// Looked up: the relation, or `None` when the catalog connection
    /// sees no such relation (it may be the session's own, or made in its
    /// open transaction).
    Found(Option<Arc<Relation>>),
    /// The lookup failed: fail closed.
    Failed,
}

type Entry = (Instant, Duration, Option<Arc<Relation>>);

/// An idle catalog connection is closed after this long. A connection
/// the proxy keeps open to a database stops `DROP DATABASE` (which waits
/// 5 s for other sessions to leave), and a harness that drops and makes
/// its database again between sessions would fail; the cache outlives
/// the connection.
const IDLE_CLOSE: Duration = Duration::from_secs(1);

/// The catalog of one target's database.
pub struct Catalog {
    target: Arc<TargetRuntime>,
    database: String,
    connect_timeout: Duration,
    mark: u32,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// When the connection was last used: it is closed once idle for
    /// [`IDLE_CLOSE`].
    last_used: Mutex<Instant>,
    by_oid: Mutex<HashMap<u32, Entry>>,
    by_name: Mutex<HashMap<String, Entry>>,
    /// This catalog, for the task that closes its idle connection.
    me: std::sync::Weak<Catalog>,
}

fn fresh(e: Option<&Entry>) -> Known {
    match e {
        Some((at, ttl, _)) if at.elapsed() < *ttl && *ttl == FAILED => Known::Failed,
        Some((at, ttl, r)) if at.elapsed() < *ttl => Known::Found(r.clone()),
        _ => Known::Missing,
    }
}

impl Catalog {
    pub fn new(
        target: Arc<TargetRuntime>,
        database: String,
        connect_timeout: Duration,
        mark: u32,
    ) -> Arc<Catalog> {
        Arc::new_cyclic(|me| Catalog {
            me: me.clone(),
            target,
            database,
            connect_timeout,
            mark,
            conn: tokio::sync::Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
            by_oid: Mutex::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
        })
    }

    pub fn by_oid(&self, oid: u32) -> Known {
        fresh(lock(&self.by_oid).get(&oid))
    }

    pub fn by_name(&self, name: &str) -> Known {
        fresh(lock(&self.by_name).get(name))
    }

    /// Looks up `oids` and `names`, and the relations the views among them
    /// read (a few levels deep). Every one asked for is cached after this,
    /// found or not.
    pub async fn load(&self, oids: &[u32], names: &[String]) {
        let mut oids = oids.to_vec();
        let mut names = names.to_vec();
        for _ in 0..4 {
            if oids.is_empty() && names.is_empty() {
                return;
            }
            let (found, ttl) = match self.query(&oids, &names).await {
                Ok(rows) => (rows, FRESH),
                Err(e) => {
                    warn!(
                        target_name = %self.target.config.name,
                        database = %self.database,
                        "catalog lookup for masking failed; the columns it was for are masked: {e}"
                    );
                    (Vec::new(), FAILED)
                }
            };
            let now = Instant::now();
            let mut next_names = Vec::new();
            {
                let mut by_oid = lock(&self.by_oid);
                let mut by_name = lock(&self.by_name);
                for oid in &oids {
                    let r = found
                        .iter()
                        .find(|(_, o, _)| o == oid)
                        .map(|(_, _, r)| r.clone());
                    by_oid.insert(*oid, (now, ttl, r));
                }
                for name in &names {
                    let r = found
                        .iter()
                        .find(|(k, _, _)| k == name)
                        .map(|(_, _, r)| r.clone());
                    by_name.insert(name.clone(), (now, ttl, r));
                }
                for (_, oid, r) in &found {
                    by_oid.insert(*oid, (now, ttl, Some(r.clone())));
                    if let Some(def) = &r.definition {
                        for rel in &def.relations {
                            if matches!(fresh(by_name.get(rel)), Known::Missing)
                                && !next_names.contains(rel)
                            {
                                next_names.push(rel.clone());
                            }
                        }
                    }
                }
            }
            oids.clear();
            names = next_names;
        }
    }

    /// The open connection in `guard`, opened if need be.
    async fn connection<'g>(
        &self,
        guard: &'g mut tokio::sync::MutexGuard<'_, Option<Conn>>,
    ) -> Result<&'g mut Conn, String> {
        if guard.is_none() {
            let params = vec![
                ("database".to_owned(), self.database.clone()),
                (
                    "application_name".to_owned(),
                    "interceptor catalog".to_owned(),
                ),
            ];
            let up = upstream::connect(&self.target, &params, self.connect_timeout, self.mark)
                .await
                .map_err(|e| match e {
                    upstream::UpstreamError::Client(e) => e.to_string(),
                    upstream::UpstreamError::Relayed(_) => "the server refused the login".into(),
                })?;
            **guard = Some(up.conn);
            *lock(&self.last_used) = Instant::now();
            tokio::spawn(close_when_idle(self.me.clone()));
        }
        guard.as_mut().ok_or_else(|| "no catalog connection".into())
    }

    /// The planner's estimate for a held statement, for approvers. Only
    /// planned, never run: EXPLAIN without ANALYZE, through Parse (which
    /// takes exactly one statement), in a read-only transaction that is
    /// rolled back. `params` are (format byte, value) as the client bound
    /// them.
    pub async fn explain(&self, sql: &str, params: &[Option<Vec<u8>>]) -> Result<String, String> {
        let mut guard = self.conn.lock().await;
        let _used = Used(&self.last_used);
        let conn = self.connection(&mut guard).await?;
        let run = async {
            simple_query(
                conn,
                "BEGIN TRANSACTION READ ONLY; SET LOCAL statement_timeout = '5s'",
            )
            .await?;
            let values: Vec<(i16, Option<&[u8]>)> = params
                .iter()
                .map(|p| match p.as_deref().and_then(<[u8]>::split_first) {
                    Some((f, v)) => (i16::from(*f), Some(v)),
                    None => (0, None),
                })
                .collect();
            let mut msg = build::parse(b"", &format!("EXPLAIN (FORMAT JSON) {sql}"));
            msg.extend_from_slice(&build::bind_execute_sync(&values));
            let plan = exchange(conn, &msg).await;
            simple_query(conn, "ROLLBACK").await?;
            plan
        };
        let rows = match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                *guard = None;
                return Err("EXPLAIN timed out".into());
            }
        };
        let json = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or("EXPLAIN returned no plan")?;
        Ok(summarize_plan(&String::from_utf8_lossy(&json)))
    }

    /// Runs `sql` on the catalog connection. A connection kept from
    /// earlier may have been closed since (the server restarted, the
    /// database was dropped and made again, an idle timeout): the query
    /// is tried once more on a new one before the lookup fails and its
    /// columns are masked.
    async fn read_only_query(&self, sql: &str) -> Result<Vec<Vec<Option<Vec<u8>>>>, String> {
        let mut guard = self.conn.lock().await;
        let _used = Used(&self.last_used);
        let mut retried = false;
        loop {
            let kept = guard.is_some();
            let conn = self.connection(&mut guard).await?;
            match tokio::time::timeout(
                self.connect_timeout.max(Duration::from_secs(5)),
                simple_query(conn, sql),
            )
            .await
            {
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(e)) => {
                    *guard = None;
                    if !kept || retried {
                        return Err(e);
                    }
                    // What was cached may describe a database dropped
                    // since.
                    lock(&self.by_oid).clear();
                    lock(&self.by_name).clear();
                    retried = true;
                }
                Err(_) => {
                    *guard = None;
                    return Err("the catalog query timed out".into());
                }
            }
        }
    }

    /// Rows of (name asked for, oid, relation).
    async fn query(
        &self,
        oids: &[u32],
        names: &[String],
    ) -> Result<Vec<(String, u32, Arc<Relation>)>, String> {
        let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let mut keys: Vec<String> = oids.iter().map(|o| format!("('', {o}::oid)")).collect();
        for n in names {
            let regclass = match n.split_once('.') {
                Some((s, r)) => format!("to_regclass(format('%I.%I', {}, {}))", lit(s), lit(r)),
                None => format!("to_regclass(format('%I', {}))", lit(n)),
            };
            keys.push(format!("({}, {regclass})", lit(n)));
        }
        let sql = format!(
            "SELECT x.k, c.oid::int8, n.nspname, c.relname, c.relkind, \
             (SELECT coalesce(json_agg(CASE WHEN a.attisdropped THEN '' ELSE a.attname::text END ORDER BY a.attnum), '[]') \
              FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0), \
             CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END, \
             (SELECT coalesce(json_agg(json_build_array(an.nspname, ac.relname) ORDER BY up.depth), '[]') \
              FROM (WITH RECURSIVE up(oid, depth) AS ( \
                SELECT inhparent, 1 FROM pg_inherits WHERE inhrelid = c.oid \
                UNION SELECT i.inhparent, up.depth + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.oid \
                WHERE up.depth < 32) SELECT oid, depth FROM up) up \
              JOIN pg_class ac ON ac.oid = up.oid JOIN pg_namespace an ON an.oid = ac.relnamespace) \
             FROM (VALUES {}) AS x(k, o) JOIN pg_class c ON c.oid = x.o \
             JOIN pg_namespace n ON n.oid = c.relnamespace",
            keys.join(", ")
        );
        let rows = self.read_only_query(&sql).await?;
        let mut out = Vec::new();
        for row in rows {
            let text = |i: usize| {
                row.get(i)
                    .cloned()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            };
            let (Some(key), Some(oid), Some(schema), Some(name), Some(kind), Some(cols)) =
                (text(0), text(1), text(2), text(3), text(4), text(5))
            else {
                continue;
            };
            let Ok(oid) = oid.parse::<u32>() else {
                continue;
            };
            let ancestors: Vec<(String, String)> = text(7)
                .and_then(|a| serde_json::from_str(&a).ok())
                .unwrap_or_default();
            let columns: Vec<String> = serde_json::from_str(&cols).unwrap_or_default();
            let definition = text(6).map(|def| {
                Arc::new(
                    lineage(&def)
                        .ok()
                        .and_then(|mut l| {
                            (!l.statements.is_empty()).then(|| l.statements.swap_remove(0))
                        })
                        .unwrap_or_else(|| StatementLineage {
                            all: policies::analysis::lineage::Flow {
                                unknown: true,
                                ..Default::default()
                            },
                            ..Default::default()
                        }),
                )
            });
            out.push((
                key,
                oid,
                Arc::new(Relation {
                    oid,
                    schema,
                    name,
                    kind: kind.bytes().next().unwrap_or(b'r'),
                    columns,
                    definition,
                    ancestors,
                }),
            ));
        }
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an EXPLAIN (FORMAT JSON) says, in a line.
fn summarize_plan(json: &str) -> String {
    let v: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(_) => return "no estimate: the plan is not JSON".into(),
    };
    let plan = &v[0]["Plan"];
    let cost = plan["Total Cost"].as_f64().unwrap_or(0.0);
    if plan["Node Type"] == "ModifyTable" {
        let rows = plan["Plans"][0]["Plan Rows"].as_f64().unwrap_or(0.0);
        format!(
            "about {rows:.0} rows to {} in {} (planner estimate, cost {cost:.1})",
            plan["Operation"]
                .as_str()
                .unwrap_or("change")
                .to_lowercase(),
            plan["Relation Name"].as_str().unwrap_or("?"),
        )
    } else {
        let rows = plan["Plan Rows"].as_f64().unwrap_or(0.0);
        format!("about {rows:.0} rows (planner estimate, cost {cost:.1})")
    }
}

/// Runs one simple query; its rows in text format.
async fn simple_query(conn: &mut Conn, sql: &str) -> Result<Vec<Vec<Option<Vec<u8>>>>, String> {
    exchange(conn, &build::query(sql)).await
}

/// Sends `msg` and reads up to ReadyForQuery: the rows in text format, or
/// the first error.
async fn exchange(conn: &mut Conn, msg: &[u8]) -> Result<Vec<Vec<Option<Vec<u8>>>>, String> {
    conn.send(msg).await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let Some(h) = next_frame(&conn.buf, BACKEND_MAX_MESSAGE).map_err(|e| e.to_string())? else {
            conn.fill().await.map_err(|e| e.to_string())?;
            continue;
        };
        let frame = conn.buf.split_to(h.wire_len);
        match BackendMessage::parse(&frame).map_err(|e| e.to_string())? {
            BackendMessage::DataRow { .. } => {
                let mut r = Reader::new(&frame[5..]);
                let n = r.i16().unwrap_or(0);
                let mut row = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n {
                    row.push(r.value().ok_or("malformed DataRow")?.map(<[u8]>::to_vec));
                }
                rows.push(row);
            }
            BackendMessage::ErrorResponse(f) => error = Some(f.message()),
            BackendMessage::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}

/// Marks the connection used when a query on it ends, however it ends.
struct Used<'a>(&'a Mutex<Instant>);

impl Drop for Used<'_> {
    fn drop(&mut self) {
        *lock(self.0) = Instant::now();
    }
}

/// Closes `catalog`'s connection once it has been idle for
/// [`IDLE_CLOSE`], and ends then (the next connection starts another), or
/// when the connection or the catalog is gone.
async fn close_when_idle(catalog: std::sync::Weak<Catalog>) {
    loop {
        tokio::time::sleep(IDLE_CLOSE).await;
        let Some(c) = catalog.upgrade() else {
            return;
        };
        // Locked means in use.
        let Ok(mut guard) = c.conn.try_lock() else {
            continue;
        };
        if guard.is_none() {
            return;
        }
        if lock(&c.last_used).elapsed() < IDLE_CLOSE {
            continue;
        }
        let old = guard.take();
        drop(guard);
        if let Some(mut old) = old {
            // Terminate, so that the server logs a goodbye rather than a
            // lost connection; not waited on for long.
            let bye = build::terminate();
            let _ = tokio::time::timeout(IDLE_CLOSE, old.send(&bye)).await;
        }
        return;
    }
}

/// The catalogs of every target and database sessions have used.
#[derive(Default)]
pub struct Catalogs {
    map: Mutex<HashMap<(String, String), Arc<Catalog>>>,
}

impl Catalogs {
    pub fn get(
        &self,
        target: &Arc<TargetRuntime>,
        database: &str,
        connect_timeout: Duration,
        mark: u32,
    ) -> Arc<Catalog> {
        let key = (target.config.name.clone(), database.to_owned());
        let mut map = lock(&self.map);
        match map.get(&key) {
            // A reload may have changed the target: a new catalog then.
            Some(c) if Arc::ptr_eq(&c.target, target) => c.clone(),
            _ => {
                let c = Catalog::new(target.clone(), database.to_owned(), connect_timeout, mark);
                map.insert(key, c.clone());
                c
            }
        }
    }
}
