//! One session's statement rows: the frontend direction opens a row for
//! each Query and Execute, the backend direction fills in rows, bytes and
//! SQLSTATE from the replies and closes it. Replies come in request order,
//! so the rows are a queue; Sync and Query mark where a ReadyForQuery ends
//! a batch (an error skips the rest of an extended-protocol batch, and
//! its rows are closed with that error).
//!
//! A closed row goes to the auditor's queue as it is; the writer thread
//! seals it (encodes it and links it into the session's hash chain). Done
//! on the session's thread, between one client's statements and the
//! next's, sealing ran on cold caches at 3-5 times its cost in a batch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use uuid::Uuid;

use super::event::{Event, MaskRow, StatementRowRef, now_us};
use super::spool::{encode_frame, seal_statement_frame};

/// What is known of a statement when it is sent: from its text and the
/// policy's decision.
#[derive(Debug, Clone, Default)]
pub struct StatementInfo {
    pub text: String,
    pub fingerprint: u64,
    pub kind: &'static str,
    pub tables: Vec<String>,
    pub decision: &'static str,
    pub rule: String,
    /// The approval request that decided a held statement.
    pub approval: String,
}

impl StatementInfo {
    /// Without a policy: the text only.
    pub fn unchecked(text: &[u8]) -> Self {
        // from_utf8 first: its ASCII fast path took half the time of the
        // lossy scan here, and statement texts are UTF-8.
        let text = match std::str::from_utf8(text) {
            Ok(t) => t.to_owned(),
            Err(_) => String::from_utf8_lossy(text).into_owned(),
        };
        StatementInfo {
            text,
            decision: "unchecked",
            ..Default::default()
        }
    }
}

enum Entry {
    /// Inline rather than boxed: no allocation per statement.
    Open(Open),
    /// A Sync: the next ReadyForQuery ends the batch up to here.
    Sync,
}

struct Open {
    info: Arc<StatementInfo>,
    seq: u64,
    ts_us: i64,
    start: Instant,
    /// A simple Query ends at ReadyForQuery; an Execute at its own
    /// CommandComplete, EmptyQueryResponse, PortalSuspended or error.
    simple: bool,
    returned: u64,
    tagged: u64,
    bytes: u64,
    masked: u64,
    /// By rule, column and detector; recorded after the row.
    mask_counts: Vec<crate::masking::MaskCount>,
    sqlstate: String,
}

/// A session's hash chain: what every row of it is sealed with. Only the
/// writer thread advances it, in the order the session closed its rows.
pub struct Chain {
    session: Uuid,
    principal: String,
    prev: Mutex<[u8; 32]>,
}

/// A statement that ended, with what its replies said: a row for the
/// writer to seal.
pub struct Ended {
    chain: Arc<Chain>,
    info: Arc<StatementInfo>,
    seq: u64,
    ts_us: i64,
    duration_us: u64,
    rows: u64,
    bytes: u64,
    masked: u64,
    mask_counts: Vec<crate::masking::MaskCount>,
    sqlstate: String,
}

impl Ended {
    /// The spool events it becomes: its row, and one per mask count.
    pub fn events(&self) -> usize {
        1 + self.mask_counts.len()
    }

    /// Links the row into its session's chain and appends its frames (the
    /// row's, then its mask counts') to `out`.
    pub fn seal(self, out: &mut Vec<u8>) {
        let chain = &*self.chain;
        let info = &*self.info;
        let row = StatementRowRef {
            session: chain.session,
            seq: self.seq,
            ts_us: self.ts_us,
            principal: &chain.principal,
            text: &info.text,
            fingerprint: info.fingerprint,
            kind: info.kind,
            tables: &info.tables,
            decision: info.decision,
            rule: &info.rule,
            approval: &info.approval,
            duration_us: self.duration_us,
            rows: self.rows,
            bytes: self.bytes,
            masked: self.masked,
            sqlstate: &self.sqlstate,
        };
        {
            let mut prev = chain.prev.lock().unwrap_or_else(|p| p.into_inner());
            *prev = seal_statement_frame(row, *prev, out);
        }
        for c in self.mask_counts {
            let event = Event::Masked(Box::new(MaskRow {
                session: chain.session,
                seq: self.seq,
                ts_us: self.ts_us,
                principal: chain.principal.clone(),
                rule: c.rule,
                column: c.column,
                detector: c.detector,
                count: c.count,
            }));
            encode_frame(&event, out);
        }
    }
}

impl Open {
    /// The row as it ended, now.
    fn end(self, chain: &Arc<Chain>) -> Ended {
        Ended {
            chain: chain.clone(),
            info: self.info,
            seq: self.seq,
            ts_us: self.ts_us,
            duration_us: u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX),
            rows: if self.returned > 0 {
                self.returned
            } else {
                self.tagged
            },
            bytes: self.bytes,
            masked: self.masked,
            mask_counts: self.mask_counts,
            sqlstate: self.sqlstate,
        }
    }
}

/// Shared by the two directions of one relay.
pub struct SessionAudit {
    chain: Arc<Chain>,
    queue: Mutex<VecDeque<Entry>>,
    /// The wall clock (µs since the epoch) and the monotonic clock, read
    /// together when the session started. A statement's timestamp is the
    /// first plus the second's progress since: one clock read per
    /// statement instead of two (each ~22 ns in this VM), and timestamps
    /// that follow `seq`'s order even if the wall clock is stepped back.
    /// A step during a session shows in the next session's timestamps,
    /// not this one's; NTP's slewing moves both clocks alike.
    epoch: (i64, Instant),
}

impl SessionAudit {
    pub fn new(session: Uuid, principal: String) -> Self {
        SessionAudit {
            chain: Arc::new(Chain {
                session,
                principal,
                prev: Mutex::new([0; 32]),
            }),
            queue: Mutex::new(VecDeque::new()),
            epoch: (now_us(), Instant::now()),
        }
    }

    pub fn session(&self) -> Uuid {
        self.chain.session
    }

    /// µs since the Unix epoch at `at`.
    fn ts_us(&self, at: Instant) -> i64 {
        let since = at.saturating_duration_since(self.epoch.1).as_micros();
        self.epoch
            .0
            .saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The frontend direction's part: sequence numbers and what prepared
/// statements and portals hold.
pub struct FrontendAudit {
    shared: Arc<SessionAudit>,
    seq: u64,
    statements: Names,
    /// The unnamed portal, kept apart: most drivers bind it for every
    /// statement, and a field costs no hashing.
    unnamed: Option<Arc<StatementInfo>>,
    portals: Names,
}

/// Prepared statements or portals by name. Binding looks one up per
/// statement; foldhash hashes a short name in a fraction of SipHash's time.
type Names = HashMap<Vec<u8>, Arc<StatementInfo>, foldhash::fast::RandomState>;

impl FrontendAudit {
    pub fn new(shared: Arc<SessionAudit>) -> Self {
        FrontendAudit {
            shared,
            seq: 0,
            statements: Names::default(),
            unnamed: None,
            portals: Names::default(),
        }
    }

    pub fn statements(&self) -> u64 {
        self.seq
    }

    fn open(&mut self, info: Arc<StatementInfo>, simple: bool) {
        self.seq += 1;
        let start = Instant::now();
        let ts_us = self.shared.ts_us(start);
        let mut q = self.shared.queue();
        q.push_back(Entry::Open(Open {
            info,
            seq: self.seq,
            ts_us,
            start,
            simple,
            returned: 0,
            tagged: 0,
            bytes: 0,
            masked: 0,
            mask_counts: Vec::new(),
            sqlstate: String::new(),
        }));
    }

    /// A simple Query (or what the proxy sent in place of a refused one).
    pub fn query(&mut self, info: StatementInfo) {
        self.open(Arc::new(info), true);
    }

    pub fn parse(&mut self, name: &[u8], info: StatementInfo) {
        self.statements.insert(name.to_vec(), Arc::new(info));
    }

    pub fn bind(&mut self, portal: &[u8], statement: &[u8]) {
        let info =
            self.statements.get(statement).cloned().unwrap_or_else(|| {
                Arc::new(StatementInfo::unchecked(b"(unknown prepared statement)"))
            });
        if portal.is_empty() {
            self.unnamed = Some(info);
        } else {
            self.portals.insert(portal.to_vec(), info);
        }
    }

    pub fn execute(&mut self, portal: &[u8]) {
        let info = if portal.is_empty() {
            self.unnamed.clone()
        } else {
            self.portals.get(portal).cloned()
        };
        let info = info.unwrap_or_else(|| Arc::new(StatementInfo::unchecked(b"(unknown portal)")));
        self.open(info, false);
    }

    pub fn close_statement(&mut self, name: &[u8]) {
        self.statements.remove(name);
    }

    pub fn close_portal(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
        } else {
            self.portals.remove(name);
        }
    }

    pub fn sync(&mut self) {
        self.shared.queue().push_back(Entry::Sync);
    }
}

/// The backend direction's part: fills rows in and hands the ended ones
/// to the auditor.
pub struct BackendAudit {
    shared: Arc<SessionAudit>,
    /// Rows whose statements ended, handed over once the replies are on
    /// their way to the client.
    ended: Vec<Ended>,
}

impl BackendAudit {
    pub fn new(shared: Arc<SessionAudit>) -> Self {
        BackendAudit {
            shared,
            ended: Vec::new(),
        }
    }

    /// Queues the rows of the statements that ended, keeping the buffer
    /// for the next.
    pub async fn hand_over(&mut self, auditor: &super::Auditor) {
        if !self.ended.is_empty() {
            auditor.record_rows(&mut self.ended).await;
        }
    }

    /// The rows that ended since the last hand-over, in the order they
    /// ended (for the tests and the benchmark, which seal them themselves).
    pub fn take_ended(&mut self) -> std::vec::Drain<'_, Ended> {
        self.ended.drain(..)
    }

    fn with_front(&self, f: impl FnOnce(&mut Open)) {
        if let Some(Entry::Open(o)) = self.shared.queue().front_mut() {
            f(o);
        }
    }

    pub fn row(&mut self, len: usize) {
        self.with_front(|o| {
            o.returned += 1;
            o.bytes += len as u64;
        });
    }

    /// What the current statement's masked values were, by rule, column
    /// and detector; their sum is the row's `masked`.
    pub fn mask_counts(&mut self, counts: Vec<crate::masking::MaskCount>) {
        self.with_front(|o| {
            for c in counts {
                o.masked += c.count;
                match o
                    .mask_counts
                    .iter_mut()
                    .find(|x| x.rule == c.rule && x.column == c.column && x.detector == c.detector)
                {
                    Some(x) => x.count += c.count,
                    None => o.mask_counts.push(c),
                }
            }
        });
    }

    /// Under one lock: `f` updates the oldest open row and says whether
    /// its statement has ended; if so, it leaves the queue to be sealed.
    fn end_front(&mut self, f: impl FnOnce(&mut Open) -> bool) {
        let mut q = self.shared.queue();
        let ended = match q.front_mut() {
            Some(Entry::Open(o)) => f(o),
            // Replies out of step with requests (or none expected): the
            // Sync marker stays for its ReadyForQuery.
            _ => false,
        };
        if ended && let Some(Entry::Open(o)) = q.pop_front() {
            self.ended.push(o.end(&self.shared.chain));
        }
    }

    /// CommandComplete: `tag` as the server sent it ("INSERT 0 3").
    pub fn complete(&mut self, tag: &[u8]) {
        let n = tag_count(tag);
        self.end_front(|o| {
            o.tagged += n;
            !o.simple
        });
    }

    /// EmptyQueryResponse or PortalSuspended.
    pub fn end_of_execute(&mut self) {
        self.end_front(|o| !o.simple);
    }

    pub fn error(&mut self, sqlstate: &str) {
        let mut q = self.shared.queue();
        let execute_failed = match q.front_mut() {
            Some(Entry::Open(o)) => {
                if o.sqlstate.is_empty() {
                    o.sqlstate = sqlstate.to_owned();
                }
                !o.simple
            }
            _ => false,
        };
        if !execute_failed {
            return;
        }
        let Some(Entry::Open(failed)) = q.pop_front() else {
            return;
        };
        // Later Executes of this batch are skipped: they end at
        // ReadyForQuery with this error.
        for e in q.iter_mut() {
            match e {
                Entry::Open(o) if o.sqlstate.is_empty() => o.sqlstate.clone_from(&failed.sqlstate),
                Entry::Open(_) => {}
                Entry::Sync => break,
            }
        }
        self.ended.push(failed.end(&self.shared.chain));
    }

    /// ReadyForQuery: the batch up to the first Sync or simple Query ends.
    pub fn ready(&mut self) {
        let mut q = self.shared.queue();
        while let Some(Entry::Open(o)) = q.pop_front() {
            let simple = o.simple;
            self.ended.push(o.end(&self.shared.chain));
            if simple {
                return;
            }
        }
    }
}

/// The row count at the end of a command tag ("INSERT 0 3", "SELECT 1"),
/// or 0 for tags without one.
fn tag_count(tag: &[u8]) -> u64 {
    let tag = tag.strip_suffix(b"\0").unwrap_or(tag);
    let digits = tag.rsplit(|b| *b == b' ').next().unwrap_or_default();
    digits
        .iter()
        .try_fold(0u64, |n, &d| {
            if !d.is_ascii_digit() {
                return None;
            }
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::StatementRow;

    fn rows(b: &mut BackendAudit) -> Vec<StatementRow> {
        let mut frames = Vec::new();
        for e in b.take_ended() {
            e.seal(&mut frames);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seg-000000000001.spool"), &frames).unwrap();
        crate::audit::spool::read_all(dir.path())
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                crate::audit::Event::Statement(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    fn pair() -> (FrontendAudit, BackendAudit) {
        let shared = Arc::new(SessionAudit::new(Uuid::nil(), "test".into()));
        (
            FrontendAudit::new(shared.clone()),
            BackendAudit::new(shared),
        )
    }

    #[test]
    fn command_tags_give_their_counts() {
        assert_eq!(tag_count(b"INSERT 0 3\0"), 3);
        assert_eq!(tag_count(b"SELECT 1\0"), 1);
        assert_eq!(tag_count(b"COPY 1000000"), 1_000_000);
        assert_eq!(tag_count(b"CREATE TABLE\0"), 0);
        assert_eq!(tag_count(b"\0"), 0);
        assert_eq!(tag_count(b"SELECT 99999999999999999999\0"), 0);
    }

    #[test]
    fn simple_queries_end_at_ready_for_query() {
        let (mut f, mut b) = pair();
        f.query(StatementInfo::unchecked(b"SELECT 1; SELECT 2"));
        f.query(StatementInfo::unchecked(b"INSERT INTO t VALUES (1)"));
        b.row(10);
        b.complete(b"SELECT 1\0");
        b.row(12);
        b.complete(b"SELECT 1\0");
        b.ready();
        b.complete(b"INSERT 0 1\0");
        b.ready();
        let r = rows(&mut b);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].seq, r[0].rows, r[0].bytes), (1, 2, 22));
        assert_eq!((r[1].seq, r[1].rows, r[1].bytes), (2, 1, 0));
        assert_eq!(r[1].prev_hash, r[0].hash);
        assert_eq!(r[1].hash, r[1].compute_hash());
    }

    #[test]
    fn an_error_ends_the_extended_batch() {
        let (mut f, mut b) = pair();
        f.parse(b"s1", StatementInfo::unchecked(b"SELECT $1"));
        f.bind(b"", b"s1");
        f.execute(b"");
        f.bind(b"", b"s1");
        f.execute(b"");
        f.execute(b"");
        f.sync();
        f.query(StatementInfo::unchecked(b"SELECT 3"));
        b.row(5);
        b.complete(b"SELECT 1\0");
        b.error("22012");
        b.ready();
        b.row(5);
        b.complete(b"SELECT 1\0");
        b.ready();
        let r = rows(&mut b);
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].rows, r[0].sqlstate.as_str()), (1, ""));
        assert_eq!((r[1].rows, r[1].sqlstate.as_str()), (0, "22012"));
        assert_eq!((r[2].rows, r[2].sqlstate.as_str()), (0, "22012"));
        assert_eq!((r[3].text.as_str(), r[3].rows), ("SELECT 3", 1));
        assert_eq!(
            r.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }
}
