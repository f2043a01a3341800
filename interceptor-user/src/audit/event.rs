//! What the audit trail records. Events are written to the spool as
//! bincode, read back by `interceptor audit`, and shipped to ClickHouse,
//! where [`StatementRow`] and [`SessionEnd`] are rows as they are (their
//! fields are the tables' columns, in order; see `warehouse.rs`). A field
//! added here is added at the end of its struct, and to the table.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    DaemonStart {
        ts_us: i64,
        version: String,
        pid: u32,
    },
    DaemonStop {
        ts_us: i64,
        reason: String,
    },
    PolicyReload {
        ts_us: i64,
        file: String,
        ok: bool,
        detail: String,
    },
    SessionStart(Box<SessionStart>),
    SessionEnd(SessionEnd),
    Statement(Box<StatementRow>),
    /// Values masked in one statement's results by one rule, for one
    /// column or detector. Never the values themselves.
    Masked(Box<MaskRow>),
    /// A held statement's approval request, a decision on it, or an
    /// approvals API call.
    Approval(Box<ApprovalRow>),
}

impl Event {
    pub fn ts_us(&self) -> i64 {
        match self {
            Event::DaemonStart { ts_us, .. }
            | Event::DaemonStop { ts_us, .. }
            | Event::PolicyReload { ts_us, .. } => *ts_us,
            Event::SessionStart(s) => s.ts_us,
            Event::SessionEnd(s) => s.ts_us,
            Event::Statement(s) => s.ts_us,
            Event::Masked(m) => m.ts_us,
            Event::Approval(a) => a.ts_us,
        }
    }

    pub fn session(&self) -> Option<Uuid> {
        match self {
            Event::SessionStart(s) => Some(s.session),
            Event::SessionEnd(s) => Some(s.session),
            Event::Statement(s) => Some(s.session),
            Event::Masked(m) => Some(m.session),
            Event::Approval(a) if !a.session.is_nil() => Some(a.session),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStart {
    pub session: Uuid,
    pub ts_us: i64,
    /// As the upstream's application_name shows it.
    pub principal: String,
    pub user: String,
    pub database: String,
    pub target: String,
    pub client_addr: String,
    pub tls: bool,
    pub intercepted: bool,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub exe: String,
    pub comm: String,
    pub cgroup: String,
    pub job: String,
    pub token_issuer: String,
    pub token_subject: String,
    pub claims: Vec<(String, Vec<String>)>,
    /// Login time, from the first byte to the session being ready.
    pub login_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct SessionEnd {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session: Uuid,
    pub ts_us: i64,
    pub outcome: String,
    pub duration_us: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub statements: u64,
}

/// One client request: a simple Query (which may hold several statements)
/// or an Execute of a prepared statement's portal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct StatementRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session: Uuid,
    /// 1, 2, 3... within the session, in the order the client sent them.
    pub seq: u64,
    /// When the proxy received it, µs since the Unix epoch.
    pub ts_us: i64,
    /// The session's principal, as in its start event: "who" without a
    /// join.
    pub principal: String,
    pub text: String,
    pub fingerprint: u64,
    /// The riskiest kind among its statements; empty without a policy.
    pub kind: String,
    pub tables: Vec<String>,
    /// allow, deny or hold; "unchecked" without a policy.
    pub decision: String,
    pub rule: String,
    pub approval: String,
    /// Until the server finished it (CommandComplete, an error, or
    /// ReadyForQuery).
    pub duration_us: u64,
    /// Rows returned (DataRow, COPY TO rows) or, when none were, the
    /// count in the command tag (INSERT/UPDATE/DELETE/COPY FROM).
    pub rows: u64,
    /// Bytes of result rows sent to the client.
    pub bytes: u64,
    pub masked: u64,
    /// The first error's SQLSTATE; empty when it succeeded.
    pub sqlstate: String,
    /// The previous statement row's `hash` (zeros for the first).
    pub prev_hash: [u8; 32],
    /// SHA-256 over `prev_hash` and this row's other fields.
    pub hash: [u8; 32],
}

/// A statement row as the shipper reads it from its spool frame, its
/// strings borrowed from the frame: field for field [`StatementRow`] (a
/// test holds the two encodings and column lists equal), without the
/// allocation and copy per string that decoding an owned row costs.
#[derive(Debug, Serialize, Deserialize, clickhouse::Row)]
pub struct StatementRowWire<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session: Uuid,
    pub seq: u64,
    pub ts_us: i64,
    pub principal: &'a str,
    pub text: &'a str,
    pub fingerprint: u64,
    pub kind: &'a str,
    #[serde(borrow)]
    pub tables: Vec<&'a str>,
    pub decision: &'a str,
    pub rule: &'a str,
    pub approval: &'a str,
    pub duration_us: u64,
    pub rows: u64,
    pub bytes: u64,
    pub masked: u64,
    pub sqlstate: &'a str,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl<'a> StatementRowWire<'a> {
    /// The row in `payload`, a statement frame's bincode after the
    /// event's variant tag.
    pub fn decode(payload: &'a [u8]) -> Option<Self> {
        bincode::serde::borrow_decode_from_slice(payload, bincode::config::standard())
            .ok()
            .map(|(row, _)| row)
    }
}

/// How many values one rule masked in one statement's results, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct MaskRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session: Uuid,
    /// The statement's `seq`.
    pub seq: u64,
    pub ts_us: i64,
    pub principal: String,
    /// The mask rule's id.
    pub rule: String,
    /// The result column a column or name rule masked ("" for detector
    /// findings and message texts).
    pub column: String,
    /// The detector that found the values ("" for column and name rules).
    pub detector: String,
    pub count: u64,
}

/// Something that happened to an approval request: `requested`, `vote`,
/// `approved`, `denied`, `timed_out`, `cancelled`, `session_lost`,
/// `released` (the statement was sent on), or `api` (a call to the
/// approvals API, whoever made it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct ApprovalRow {
    /// The held session (nil for API calls about no request).
    #[serde(with = "clickhouse::serde::uuid")]
    pub session: Uuid,
    pub ts_us: i64,
    /// The request's id ("" for API calls about no request).
    pub approval: String,
    pub event: String,
    /// The approver, "interceptor" for the proxy's own steps, or who
    /// called the API.
    pub actor: String,
    pub reason: String,
    pub principal: String,
    pub target: String,
    pub database: String,
    pub statement: String,
    /// What the approval covers: see `approvals::binding`.
    pub binding: String,
    pub rule: String,
}

/// A statement row as it is encoded, borrowing its strings, so that
/// sealing one per statement copies none of them. Field for field what
/// [`StatementRow`] is up to its two hashes, which [`Self::encode`] appends
/// as the raw 64 bytes bincode makes of them: through serde, each of their
/// bytes was a call of its own (a session's audit work per statement went
/// from 714 to 580 ns in a loop without them). So its
/// bytes decode as a `StatementRow` (a spool test holds the two encodings
/// equal).
#[derive(Serialize)]
pub struct StatementRowRef<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    pub session: Uuid,
    pub seq: u64,
    pub ts_us: i64,
    pub principal: &'a str,
    pub text: &'a str,
    pub fingerprint: u64,
    pub kind: &'a str,
    pub tables: &'a [String],
    pub decision: &'a str,
    pub rule: &'a str,
    pub approval: &'a str,
    pub duration_us: u64,
    pub rows: u64,
    pub bytes: u64,
    pub masked: u64,
    pub sqlstate: &'a str,
}

impl StatementRowRef<'_> {
    /// Appends the row's encoding, with `prev_hash` and a zeroed `hash`,
    /// to `out`.
    pub fn encode(&self, prev_hash: &[u8; 32], out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail for these types.
        let _ = bincode::serde::encode_into_std_write(self, out, bincode::config::standard());
        out.extend_from_slice(prev_hash);
        out.extend_from_slice(&[0; 32]);
    }
}

impl StatementRow {
    pub fn as_ref(&self) -> StatementRowRef<'_> {
        StatementRowRef {
            session: self.session,
            seq: self.seq,
            ts_us: self.ts_us,
            principal: &self.principal,
            text: &self.text,
            fingerprint: self.fingerprint,
            kind: &self.kind,
            tables: &self.tables,
            decision: &self.decision,
            rule: &self.rule,
            approval: &self.approval,
            duration_us: self.duration_us,
            rows: self.rows,
            bytes: self.bytes,
            masked: self.masked,
            sqlstate: &self.sqlstate,
        }
    }

    /// The chain hash of this row as it is now (its `hash` field aside):
    /// SHA-256 over `prev_hash` and the row as encoded with `hash` zeroed.
    pub fn compute_hash(&self) -> [u8; 32] {
        let mut body = Vec::with_capacity(256 + self.text.len());
        self.as_ref().encode(&self.prev_hash, &mut body);
        Self::chain_hash(&self.prev_hash, &body)
    }

    /// The chain hash: SHA-256 over the previous row's hash and this row
    /// as bincode encodes it with its own `hash` zeroed.
    pub fn chain_hash(prev: &[u8; 32], encoded: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(prev);
        h.update(encoded);
        h.finalize().into()
    }

    /// Links this row after `prev` (the previous row's hash) and seals it.
    pub fn seal(&mut self, prev: [u8; 32]) {
        self.prev_hash = prev;
        self.hash = self.compute_hash();
    }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
