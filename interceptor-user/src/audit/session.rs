//! One session's statement rows: the frontend direction opens a row for
//! each Query and Execute, the backend direction fills in rows, bytes and
//! SQLSTATE from the replies and closes it. Replies come in request order,
//! so the rows are a queue; Sync and Query mark where a ReadyForQuery ends
//! a batch (an error skips the rest of an extended-protocol batch, and
//! its rows are closed with that error).

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

/// Shared by the two directions of one relay.
pub struct SessionAudit {
    pub session: Uuid,
    principal: String,
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
            session,
            principal,
            queue: Mutex::new(VecDeque::new()),
            epoch: (now_us(), Instant::now()),
        }
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

/// The backend direction's part: fills rows in and seals them into the
/// session's hash chain.
pub struct BackendAudit {
    shared: Arc<SessionAudit>,
    prev: [u8; 32],
    /// Rows whose statements ended, to be sealed once the replies are on
    /// their way to the client: sealing (encoding and hashing) then
    /// delays no reply.
    ended: Vec<Open>,
    /// Sealed rows, as spool frames, waiting to be handed to the auditor.
    pub done: Vec<u8>,
    /// How many frames `done` holds.
    done_events: usize,
}

impl BackendAudit {
    pub fn new(shared: Arc<SessionAudit>) -> Self {
        BackendAudit {
            shared,
            prev: [0; 32],
            ended: Vec::new(),
            done: Vec::new(),
            done_events: 0,
        }
    }

    /// Seals the rows of the statements that ended and queues them,
    /// keeping the buffers for the next.
    pub async fn hand_over(&mut self, auditor: &super::Auditor) {
        self.seal_ended();
        if !self.done.is_empty() {
            let events = std::mem::take(&mut self.done_events);
            auditor.record_frames(&mut self.done, events).await;
        }
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
            self.ended.push(o);
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
        self.ended.push(failed);
    }

    /// ReadyForQuery: the batch up to the first Sync or simple Query ends.
    pub fn ready(&mut self) {
        let mut q = self.shared.queue();
        while let Some(Entry::Open(o)) = q.pop_front() {
            let simple = o.simple;
            self.ended.push(o);
            if simple {
                return;
            }
        }
    }

    /// Seals the ended rows into `done`, in the order they ended.
    pub fn seal_ended(&mut self) {
        let mut ended = std::mem::take(&mut self.ended);
        for o in ended.drain(..) {
            self.seal_one(o);
        }
        self.ended = ended;
    }

    fn seal_one(&mut self, o: Open) {
        let info = &*o.info;
        let row = StatementRowRef {
            session: self.shared.session,
            seq: o.seq,
            ts_us: o.ts_us,
            principal: &self.shared.principal,
            text: &info.text,
            fingerprint: info.fingerprint,
            kind: info.kind,
            tables: &info.tables,
            decision: info.decision,
            rule: &info.rule,
            approval: &info.approval,
            duration_us: o.start.elapsed().as_micros() as u64,
            rows: if o.returned > 0 { o.returned } else { o.tagged },
            bytes: o.bytes,
            masked: o.masked,
            sqlstate: &o.sqlstate,
        };
        self.prev = seal_statement_frame(row, self.prev, &mut self.done);
        self.done_events += 1 + o.mask_counts.len();
        for c in o.mask_counts {
            let event = Event::Masked(Box::new(MaskRow {
                session: self.shared.session,
                seq: o.seq,
                ts_us: o.ts_us,
                principal: self.shared.principal.clone(),
                rule: c.rule,
                column: c.column,
                detector: c.detector,
                count: c.count,
            }));
            encode_frame(&event, &mut self.done);
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
        b.seal_ended();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seg-000000000001.spool"), &b.done).unwrap();
        b.done.clear();
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
