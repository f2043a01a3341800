//! The audit trail in ClickHouse: the tables, their DDL, the start-up
//! schema check, and inserts.
//!
//! The DDL runs on ClickHouse 18.16 (the oldest server we meet) and, on
//! 20.5 and later, adds what newer servers offer: LowCardinality strings,
//! a DateTime64 column, ZSTD on the statement text, and a TTL. The
//! columns an INSERT sends are the same on both, so one row type serves
//! every server.
//!
//! Every table is a ReplacingMergeTree whose sort key ends in the row's
//! identity (session and sequence number, for statements): a batch sent
//! twice after a crash collapses to one row, and the analyst views read
//! with FINAL so duplicates not yet merged never show.
//!
//! The `clickhouse` crate's own schema validation needs a newer server,
//! so it is off, and [`Warehouse::check`] compares `DESCRIBE TABLE` with
//! these definitions instead: a mismatched table would otherwise take
//! rows that misparse silently.

use std::fmt::Write as _;

use serde::Serialize;
use tracing::error;
use uuid::Uuid;

use super::event::{
    ApprovalRow, Event, MaskRow, SessionEnd, SessionStart, StatementRow, StatementRowWire,
};
use crate::config::{ClickHouseConfig, Secret};

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("ClickHouse at {url}: {source}")]
    Unreachable {
        url: String,
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse: {what}: {source}")]
    Query {
        what: String,
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse table {table}: {problem}")]
    Schema { table: String, problem: String },
}

type Result<T> = std::result::Result<T, WarehouseError>;

/// A server's version, from `SELECT version()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let mut parts = s.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Version(major, minor))
    }

    /// DateTime64, LowCardinality without a setting, codecs, TTL and
    /// `fromUnixTimestamp64Micro` are all there from 20.5.
    pub fn modern(self) -> bool {
        self >= Version(20, 5)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

#[derive(Clone, Copy)]
enum Extra {
    None,
    /// A string of few distinct values: LowCardinality on modern servers.
    LowCardinality,
    /// Long text: compressed harder on modern servers.
    Zstd,
}

struct Column {
    name: &'static str,
    ty: &'static str,
    extra: Extra,
}

const fn col(name: &'static str, ty: &'static str) -> Column {
    Column {
        name,
        ty,
        extra: Extra::None,
    }
}

const fn lc(name: &'static str, ty: &'static str) -> Column {
    Column {
        name,
        ty,
        extra: Extra::LowCardinality,
    }
}

pub struct Table {
    pub name: &'static str,
    columns: &'static [Column],
    order_by: &'static str,
}

/// Every table has `ts_us` (µs since the epoch); `ts` and, on modern
/// servers, `ts64` are computed from it.
const TS: &str = "toDateTime(intDiv(ts_us, 1000000))";
const TS64: &str = "fromUnixTimestamp64Micro(ts_us, 'UTC')";

/// The columns are the fields of [`StatementRow`], in order.
pub const STATEMENTS: Table = Table {
    name: "statement_rows",
    columns: &[
        col("session", "UUID"),
        col("seq", "UInt64"),
        col("ts_us", "Int64"),
        lc("principal", "String"),
        Column {
            name: "text",
            ty: "String",
            extra: Extra::Zstd,
        },
        col("fingerprint", "UInt64"),
        lc("kind", "String"),
        lc("tables", "Array(String)"),
        lc("decision", "String"),
        lc("rule", "String"),
        col("approval", "String"),
        col("duration_us", "UInt64"),
        col("rows", "UInt64"),
        col("bytes", "UInt64"),
        col("masked", "UInt64"),
        lc("sqlstate", "String"),
        col("prev_hash", "FixedString(32)"),
        col("hash", "FixedString(32)"),
    ],
    order_by: "toStartOfHour(ts), principal, session, seq",
};

/// The columns are the fields of [`SessionRow`].
pub const SESSIONS: Table = Table {
    name: "session_starts",
    columns: &[
        col("session", "UUID"),
        col("ts_us", "Int64"),
        lc("host", "String"),
        lc("principal", "String"),
        lc("user", "String"),
        lc("database", "String"),
        lc("target", "String"),
        col("client_addr", "String"),
        col("tls", "UInt8"),
        col("intercepted", "UInt8"),
        col("pid", "Nullable(UInt32)"),
        col("uid", "Nullable(UInt32)"),
        lc("exe", "String"),
        lc("comm", "String"),
        col("cgroup", "String"),
        col("job", "String"),
        lc("token_issuer", "String"),
        col("token_subject", "String"),
        // Not Array(Tuple(...)): 18.16 turns that into a Nested column.
        col("claim_names", "Array(String)"),
        col("claim_values", "Array(Array(String))"),
        col("login_us", "UInt64"),
    ],
    order_by: "toStartOfHour(ts), principal, session",
};

/// The columns are the fields of [`SessionEnd`].
pub const SESSION_ENDS: Table = Table {
    name: "session_ends",
    columns: &[
        col("session", "UUID"),
        col("ts_us", "Int64"),
        lc("outcome", "String"),
        col("duration_us", "UInt64"),
        col("bytes_from_client", "UInt64"),
        col("bytes_to_client", "UInt64"),
        col("statements", "UInt64"),
    ],
    order_by: "toStartOfHour(ts), session",
};

/// The columns are the fields of [`DaemonRow`].
pub const DAEMON: Table = Table {
    name: "daemon_events",
    columns: &[
        col("ts_us", "Int64"),
        lc("host", "String"),
        lc("kind", "String"),
        col("ok", "UInt8"),
        col("detail", "String"),
    ],
    order_by: "toStartOfHour(ts), host, ts_us, kind",
};

/// The columns are the fields of [`MaskRow`].
pub const MASKS: Table = Table {
    name: "mask_events",
    columns: &[
        col("session", "UUID"),
        col("seq", "UInt64"),
        col("ts_us", "Int64"),
        lc("principal", "String"),
        lc("rule", "String"),
        lc("column", "String"),
        lc("detector", "String"),
        col("count", "UInt64"),
    ],
    order_by: "toStartOfHour(ts), principal, session, seq, rule, column, detector",
};

/// The columns are the fields of [`ApprovalRow`].
pub const APPROVALS: Table = Table {
    name: "approval_events",
    columns: &[
        col("session", "UUID"),
        col("ts_us", "Int64"),
        col("approval", "String"),
        lc("event", "String"),
        lc("actor", "String"),
        col("reason", "String"),
        lc("principal", "String"),
        lc("target", "String"),
        lc("database", "String"),
        Column {
            name: "statement",
            ty: "String",
            extra: Extra::Zstd,
        },
        col("binding", "String"),
        lc("rule", "String"),
    ],
    order_by: "toStartOfHour(ts), approval, ts_us, event, actor",
};

pub const TABLES: [&Table; 6] = [
    &STATEMENTS,
    &SESSIONS,
    &SESSION_ENDS,
    &DAEMON,
    &MASKS,
    &APPROVALS,
];

/// What analysts query: the tables without not-yet-merged duplicates,
/// and sessions with their ends. `{db}` is the database.
const VIEWS: &[(&str, &str)] = &[
    ("statements", "SELECT *, ts FROM {db}.statement_rows FINAL"),
    (
        "sessions",
        "SELECT session, ts, ts_us, host, principal, user, database, target, client_addr, tls, \
         intercepted, pid, uid, exe, comm, cgroup, job, token_issuer, token_subject, claim_names, \
         claim_values, login_us, outcome, end_us, duration_us, bytes_from_client, bytes_to_client, \
         statements \
         FROM (SELECT *, ts FROM {db}.session_starts FINAL) \
         ANY LEFT JOIN (SELECT session, outcome, ts_us AS end_us, duration_us, bytes_from_client, \
         bytes_to_client, statements FROM {db}.session_ends FINAL) USING session",
    ),
    ("daemon", "SELECT *, ts FROM {db}.daemon_events FINAL"),
    ("masks", "SELECT *, ts FROM {db}.mask_events FINAL"),
    ("approvals", "SELECT *, ts FROM {db}.approval_events FINAL"),
];

impl Table {
    /// The row's columns, for a SELECT.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn column_type(c: &Column, modern: bool) -> String {
        match (c.extra, modern) {
            (Extra::LowCardinality, true) => match c.ty.strip_prefix("Array(") {
                Some(inner) => format!("Array(LowCardinality({inner})"),
                None => format!("LowCardinality({})", c.ty),
            },
            _ => c.ty.to_owned(),
        }
    }

    /// (name, type) as `DESCRIBE TABLE` lists them on `server`.
    pub fn described(&self, server: Version) -> Vec<(String, String)> {
        let modern = server.modern();
        let mut out: Vec<(String, String)> = self
            .columns
            .iter()
            .map(|c| (c.name.to_owned(), Self::column_type(c, modern)))
            .collect();
        out.push(("ts".into(), "DateTime('UTC')".into()));
        if modern {
            out.push(("ts64".into(), "DateTime64(6, 'UTC')".into()));
        }
        out
    }

    pub fn create(&self, db: &str, server: Version, retention_days: u32) -> String {
        let modern = server.modern();
        let mut sql = format!("CREATE TABLE IF NOT EXISTS {db}.{} (\n", self.name);
        for c in self.columns {
            let _ = write!(sql, "    {} {}", c.name, Self::column_type(c, modern));
            if modern && matches!(c.extra, Extra::Zstd) {
                sql.push_str(" CODEC(ZSTD(3))");
            }
            sql.push_str(",\n");
        }
        let _ = write!(sql, "    ts DateTime('UTC') MATERIALIZED {TS}");
        if modern {
            let _ = write!(sql, ",\n    ts64 DateTime64(6, 'UTC') MATERIALIZED {TS64}");
        }
        let _ = write!(
            sql,
            "\n) ENGINE = ReplacingMergeTree\nPARTITION BY toYYYYMMDD(ts)\nORDER BY ({})",
            self.order_by
        );
        if modern && retention_days > 0 {
            let _ = write!(sql, "\nTTL ts + INTERVAL {retention_days} DAY");
        }
        sql
    }
}

/// The statements `interceptor audit init` runs, in order.
pub fn ddl(db: &str, server: Version, retention_days: u32) -> Vec<String> {
    let mut out = vec![format!("CREATE DATABASE IF NOT EXISTS {db}")];
    out.extend(TABLES.iter().map(|t| t.create(db, server, retention_days)));
    out.extend(VIEWS.iter().map(|(name, select)| {
        format!(
            "CREATE VIEW IF NOT EXISTS {db}.{name} AS {}",
            select.replace("{db}", db)
        )
    }));
    out
}

/// A session's start as the `session_starts` table holds it.
#[derive(Debug, Serialize, clickhouse::Row)]
pub struct SessionRow {
    #[serde(with = "clickhouse::serde::uuid")]
    session: Uuid,
    ts_us: i64,
    host: String,
    principal: String,
    user: String,
    database: String,
    target: String,
    client_addr: String,
    tls: u8,
    intercepted: u8,
    pid: Option<u32>,
    uid: Option<u32>,
    exe: String,
    comm: String,
    cgroup: String,
    job: String,
    token_issuer: String,
    token_subject: String,
    claim_names: Vec<String>,
    claim_values: Vec<Vec<String>>,
    login_us: u64,
}

impl SessionRow {
    fn new(s: SessionStart, host: &str) -> Self {
        let (claim_names, claim_values) = s.claims.into_iter().unzip();
        SessionRow {
            session: s.session,
            ts_us: s.ts_us,
            host: host.to_owned(),
            principal: s.principal,
            user: s.user,
            database: s.database,
            target: s.target,
            client_addr: s.client_addr,
            tls: s.tls.into(),
            intercepted: s.intercepted.into(),
            pid: s.pid,
            uid: s.uid,
            exe: s.exe,
            comm: s.comm,
            cgroup: s.cgroup,
            job: s.job,
            token_issuer: s.token_issuer,
            token_subject: s.token_subject,
            claim_names,
            claim_values,
            login_us: s.login_us,
        }
    }
}

/// The daemon's own events: start, stop and policy reloads.
#[derive(Debug, Serialize, clickhouse::Row)]
pub struct DaemonRow {
    ts_us: i64,
    host: String,
    kind: &'static str,
    ok: u8,
    detail: String,
}

/// Statement rows as their spool frames hold them (bincode), decoded
/// into borrowed rows only as they are inserted.
#[derive(Debug, Default)]
pub struct StatementFrames {
    bytes: Vec<u8>,
    /// Where each row's bytes end.
    ends: Vec<usize>,
}

impl StatementFrames {
    /// Adds the bincode of one row (see `spool::statement_payload`).
    pub fn push(&mut self, row: &[u8]) {
        self.bytes.extend_from_slice(row);
        self.ends.push(self.bytes.len());
    }

    /// Adds an owned row, encoded as the spool encodes it.
    pub fn push_row(&mut self, row: &StatementRow) {
        // Writing into a Vec cannot fail for this type.
        let _ = bincode::serde::encode_into_std_write(
            row,
            &mut self.bytes,
            bincode::config::standard(),
        );
        self.ends.push(self.bytes.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Each row's bincode, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(a, &b)| &self.bytes[a..b])
    }
}

/// Events sorted into their tables: statement rows as their frames' bytes,
/// the others moved rather than copied.
#[derive(Default)]
pub struct Batch {
    pub statements: StatementFrames,
    pub sessions: Vec<SessionRow>,
    pub session_ends: Vec<SessionEnd>,
    pub daemon: Vec<DaemonRow>,
    pub masks: Vec<MaskRow>,
    pub approvals: Vec<ApprovalRow>,
}

impl Batch {
    pub fn push(&mut self, event: Event, host: &str) {
        let daemon = |ts_us, kind, ok: bool, detail| DaemonRow {
            ts_us,
            host: host.to_owned(),
            kind,
            ok: ok.into(),
            detail,
        };
        match event {
            Event::Statement(s) => self.statements.push_row(&s),
            Event::SessionStart(s) => self.sessions.push(SessionRow::new(*s, host)),
            Event::SessionEnd(s) => self.session_ends.push(s),
            Event::Masked(m) => self.masks.push(*m),
            Event::Approval(a) => self.approvals.push(*a),
            Event::DaemonStart {
                ts_us,
                version,
                pid,
            } => self.daemon.push(daemon(
                ts_us,
                "start",
                true,
                format!("version {version}, pid {pid}"),
            )),
            Event::DaemonStop { ts_us, reason } => {
                self.daemon.push(daemon(ts_us, "stop", true, reason))
            }
            Event::PolicyReload {
                ts_us,
                file,
                ok,
                detail,
            } => self.daemon.push(daemon(
                ts_us,
                "policy_reload",
                ok,
                if detail.is_empty() {
                    file
                } else {
                    format!("{file}: {detail}")
                },
            )),
        }
    }
}

/// A connection to the audit database.
#[derive(Clone)]
pub struct Warehouse {
    client: clickhouse::Client,
    url: String,
    pub database: String,
    pub server: Version,
}

impl Warehouse {
    /// Connects and asks the server's version.
    pub async fn connect(config: &ClickHouseConfig, password: Option<&Secret>) -> Result<Self> {
        let mut client = clickhouse::Client::default()
            .with_url(&config.url)
            .with_user(&config.user)
            .with_validation(false);
        if let Some(p) = password {
            client = client.with_password(p.expose());
        }
        let unreachable = |source| WarehouseError::Unreachable {
            url: config.url.clone(),
            source,
        };
        let version: String = client
            .query("SELECT version()")
            .fetch_one()
            .await
            .map_err(unreachable)?;
        let server = Version::parse(&version).ok_or_else(|| {
            unreachable(clickhouse::error::Error::Custom(format!(
                "cannot read the server version {version:?}"
            )))
        })?;
        Ok(Warehouse {
            client,
            url: config.url.clone(),
            database: config.database.clone(),
            server,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn execute(&self, sql: &str) -> Result<()> {
        self.client
            .query(sql)
            .execute()
            .await
            .map_err(|source| WarehouseError::Query {
                what: first_line(sql),
                source,
            })
    }

    /// Creates the database, tables and views that are missing, checking
    /// the tables before the views are made on them; returns the
    /// statements it ran.
    pub async fn init(&self, retention_days: u32) -> Result<Vec<String>> {
        let all = ddl(&self.database, self.server, retention_days);
        let views = all.len() - VIEWS.len();
        for sql in &all[..views] {
            self.execute(sql).await?;
        }
        self.check().await?;
        for sql in &all[views..] {
            self.execute(sql).await?;
        }
        Ok(all)
    }

    /// Compares each table with what `DESCRIBE TABLE` says, column by
    /// column: the first difference is the error.
    pub async fn check(&self) -> Result<()> {
        for table in TABLES {
            let name = format!("{}.{}", self.database, table.name);
            let text = self
                .text(&format!("DESCRIBE TABLE {name}"), "TabSeparatedRaw")
                .await
                .map_err(|e| WarehouseError::Schema {
                    table: name.clone(),
                    problem: format!(
                        "cannot describe it ({e}); run `interceptor audit init` to create it"
                    ),
                })?;
            let found: Vec<(String, String)> = text
                .lines()
                .filter_map(|l| {
                    let mut f = l.split('\t');
                    Some((f.next()?.to_owned(), f.next()?.to_owned()))
                })
                .collect();
            let want = table.described(self.server);
            let problem = |problem: String| WarehouseError::Schema {
                table: name.clone(),
                problem,
            };
            for (i, (col, ty)) in want.iter().enumerate() {
                match found.get(i) {
                    Some((c, t)) if c == col && t == ty => {}
                    Some((c, t)) => {
                        return Err(problem(format!(
                            "column {} is `{c} {t}`, expected `{col} {ty}`: the table was made by another version; rename it and run `interceptor audit init`",
                            i + 1
                        )));
                    }
                    None => {
                        return Err(problem(format!(
                            "column `{col} {ty}` is missing; add it with ALTER TABLE {name} ADD COLUMN {col} {ty}"
                        )));
                    }
                }
            }
            if let Some((c, t)) = found.get(want.len()) {
                return Err(problem(format!(
                    "has an extra column `{c} {t}` that interceptor does not write"
                )));
            }
        }
        Ok(())
    }

    /// Inserts a batch, one INSERT per table that has rows. Returns once
    /// ClickHouse has acknowledged every one.
    pub async fn insert(&self, batch: &Batch) -> Result<()> {
        self.insert_statements(&batch.statements).await?;
        self.insert_rows(SESSIONS.name, &batch.sessions).await?;
        self.insert_rows(SESSION_ENDS.name, &batch.session_ends)
            .await?;
        self.insert_rows(DAEMON.name, &batch.daemon).await?;
        self.insert_rows(MASKS.name, &batch.masks).await?;
        self.insert_rows(APPROVALS.name, &batch.approvals).await
    }

    /// Statement rows, each decoded in place from its frame as it is
    /// written: no allocation per string.
    async fn insert_statements(&self, frames: &StatementFrames) -> Result<()> {
        let rows = frames.iter().filter_map(|bytes| {
            // The shipper took only frames that decode.
            let row = StatementRowWire::decode(bytes);
            if row.is_none() {
                error!("audit: a statement row that does not decode was not shipped");
            }
            row
        });
        self.insert_each::<StatementRowWire<'static>, _>(STATEMENTS.name, frames.len(), rows)
            .await
    }

    async fn insert_rows<T>(&self, table: &str, rows: &[T]) -> Result<()>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        self.insert_each::<T, _>(table, rows.len(), rows).await
    }

    /// Inserts `len` rows of `T` (each `T::Value`, which may borrow) into
    /// `table`, in one INSERT.
    async fn insert_each<'r, T, R>(
        &self,
        table: &str,
        len: usize,
        rows: impl IntoIterator<Item = R>,
    ) -> Result<()>
    where
        T: clickhouse::RowWrite,
        R: std::borrow::Borrow<T::Value<'r>>,
    {
        if len == 0 {
            return Ok(());
        }
        let name = format!("{}.{table}", self.database);
        let failed = |source| WarehouseError::Query {
            what: format!("INSERT INTO {name} ({len} rows)"),
            source,
        };
        // Unescaped: the crate would quote "db.table" as one name. The
        // database name is checked to be a plain identifier at config load.
        let mut insert = self
            .client
            .insert_unescaped::<T>(&name)
            .await
            .map_err(failed)?;
        for row in rows {
            insert.write(row.borrow()).await.map_err(failed)?;
        }
        insert.end().await.map_err(failed)
    }

    /// Drops daily partitions older than `days`; returns how many.
    pub async fn drop_expired(&self, days: u32) -> Result<usize> {
        let cutoff = (std::time::SystemTime::now()
            - std::time::Duration::from_secs(u64::from(days) * 86_400))
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
        let mut dropped = 0;
        for table in TABLES {
            let sql = format!(
                "SELECT DISTINCT partition FROM system.parts WHERE database = '{}' AND table = '{}' AND active AND partition < toString(toYYYYMMDD(toDateTime({cutoff})))",
                self.database, table.name
            );
            for partition in self.text(&sql, "TabSeparatedRaw").await?.lines() {
                if partition.is_empty() || !partition.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                self.execute(&format!(
                    "ALTER TABLE {}.{} DROP PARTITION {partition}",
                    self.database, table.name
                ))
                .await?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Runs `sql` and returns its output in `format` (any ClickHouse
    /// output format, like `PrettyCompact` or `TabSeparatedWithNames`).
    pub async fn text(&self, sql: &str, format: &str) -> Result<String> {
        let failed = |source| WarehouseError::Query {
            what: first_line(sql),
            source,
        };
        let mut cursor = self.client.query(sql).fetch_bytes(format).map_err(failed)?;
        let bytes = cursor.collect().await.map_err(failed)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A session's statement rows, in order.
    pub async fn statements(&self, session: Uuid) -> Result<Vec<StatementRow>> {
        self.fetch_statements(&format!(
            "SELECT {} FROM {}.{} FINAL WHERE session = toUUID('{session}') ORDER BY seq",
            STATEMENTS.column_list(),
            self.database,
            STATEMENTS.name
        ))
        .await
    }

    /// Runs `sql`, which selects [`STATEMENTS`]'s columns in order.
    pub async fn fetch_statements(&self, sql: &str) -> Result<Vec<StatementRow>> {
        self.client
            .query(sql)
            .fetch_all::<StatementRow>()
            .await
            .map_err(|source| WarehouseError::Query {
                what: first_line(sql),
                source,
            })
    }
}

fn first_line(sql: &str) -> String {
    sql.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_gate_the_extras() {
        assert_eq!(Version::parse("18.16.1"), Some(Version(18, 16)));
        assert_eq!(Version::parse("24.8.4.13"), Some(Version(24, 8)));
        assert_eq!(Version::parse("x"), None);
        assert!(!Version(18, 16).modern());
        assert!(!Version(20, 4).modern());
        assert!(Version(20, 5).modern());
        assert!(Version(25, 1).modern());
    }

    #[test]
    fn old_servers_get_plain_types_and_new_ones_the_extras() {
        let old = STATEMENTS.create("audit", Version(18, 16), 30);
        for absent in ["LowCardinality", "CODEC", "DateTime64", "TTL"] {
            assert!(!old.contains(absent), "{absent} in {old}");
        }
        assert!(old.contains("ENGINE = ReplacingMergeTree"));
        assert!(old.contains("PARTITION BY toYYYYMMDD(ts)"));
        let new = STATEMENTS.create("audit", Version(24, 3), 30);
        assert!(new.contains("principal LowCardinality(String)"), "{new}");
        assert!(
            new.contains("tables Array(LowCardinality(String))"),
            "{new}"
        );
        assert!(new.contains("text String CODEC(ZSTD(3))"), "{new}");
        assert!(
            new.contains("ts64 DateTime64(6, 'UTC') MATERIALIZED"),
            "{new}"
        );
        assert!(new.contains("TTL ts + INTERVAL 30 DAY"), "{new}");
        assert!(
            !STATEMENTS
                .create("audit", Version(24, 3), 0)
                .contains("TTL")
        );
    }

    #[test]
    fn statement_columns_are_the_row_fields_in_order() {
        use clickhouse::Row as _;
        let cols: Vec<&str> = STATEMENTS.columns.iter().map(|c| c.name).collect();
        assert_eq!(cols, StatementRow::COLUMN_NAMES);
        let cols: Vec<&str> = SESSIONS.columns.iter().map(|c| c.name).collect();
        assert_eq!(cols, SessionRow::COLUMN_NAMES);
        let cols: Vec<&str> = SESSION_ENDS.columns.iter().map(|c| c.name).collect();
        assert_eq!(cols, SessionEnd::COLUMN_NAMES);
        let cols: Vec<&str> = DAEMON.columns.iter().map(|c| c.name).collect();
        assert_eq!(cols, DaemonRow::COLUMN_NAMES);
    }
}
