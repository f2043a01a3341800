//! The relay after login: both directions at once, in one task.
//!
//! Complete messages are decoded into borrowed views (for tracking now, for
//! policy and masking later) and the original bytes are forwarded in one
//! write per read. Only the backend direction writes to the client; the
//! frontend direction hands it errors to send through a channel, so a
//! proxy-made message can never land in the middle of a relayed one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::audit::session::{BackendAudit, FrontendAudit, SessionAudit, StatementInfo};
use crate::audit::{Auditor, SpoolGate};
use crate::config::Limits;
use crate::enforce::{Action, Enforcer};
use crate::limits::{CapAction, ResultCap};
use crate::masking::{BackMask, FrontMask, Step};
use crate::protocol::backend::{BackendMessage, TransactionStatus};
use crate::protocol::build::{self, ProxyError};
use crate::protocol::frontend::{FrontendMessage, Target};
use crate::protocol::{FrameHeader, ProtocolError, next_frame};
use crate::runtime::{Phase, Shared};
use crate::stream::{Conn, MaybeTls, READ_CHUNK};
use crate::upstream::BACKEND_MAX_MESSAGE;

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate.
    Terminated(Stats),
    /// The client closed its socket.
    ClientClosed(Stats),
    /// The server closed its socket (after a FATAL, or a crash).
    UpstreamClosed(Stats),
    /// The proxy ended the session with this error, sent to the client.
    Fatal(ProxyError, Stats),
    /// An IO error on either side.
    Error(String),
}

/// Counters for the end-of-session log line and audit event.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub frontend_messages: u64,
    pub backend_messages: u64,
    pub queries: u64,
    pub rows: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

/// What the frontend direction asks the backend direction to send the
/// client, between whole messages.
#[derive(Debug)]
pub enum Injected {
    /// A NoticeResponse; the session goes on.
    Notice(BytesMut),
    /// A FATAL error; the session ends.
    Fatal(ProxyError),
}

/// What the frontend direction knows of the session.
#[derive(Default)]
struct FrontendState {
    stats: Stats,
    enforcer: Option<Enforcer>,
    audit: Option<FrontendAudit>,
    /// Closed while the audit spool cannot be written, when statements
    /// are then refused (`on_spool_failure = "refuse"`).
    spool_gate: Option<SpoolGate>,
    /// How the spool gate decided the current message, for its audit row.
    gated: Option<StatementInfo>,
    mask: Option<FrontMask>,
    /// The statement parked for approval at the front of the buffer.
    held: Option<Box<crate::enforce::Held>>,
    /// Relations the catalog must look up before the message at the front
    /// of the buffer is decided.
    lookups: Vec<String>,
    /// They were: decide it now.
    looked_up: bool,
}

impl FrontendState {
    fn observe(&mut self, msg: &FrontendMessage<'_>) {
        self.stats.frontend_messages += 1;
        if matches!(
            msg,
            FrontendMessage::Query { .. } | FrontendMessage::Execute { .. }
        ) {
            self.stats.queries += 1;
        }
    }

    /// Fails closed while the spool cannot be written: a Query or Parse
    /// becomes one that raises 53100, so nothing runs unaudited.
    fn gate(&mut self, msg: &FrontendMessage<'_>) -> Option<BytesMut> {
        let (sql, replaced) = match msg {
            FrontendMessage::Query { sql } => (*sql, None),
            FrontendMessage::Parse(p) => (p.sql, Some(p.name)),
            _ => return None,
        };
        if self.spool_gate.as_ref().is_none_or(SpoolGate::open) {
            return None;
        }
        let refusal = policies::Refusal {
            sqlstate: "53100",
            message: "interceptor: statement refused: the audit spool cannot be written (disk full?), and statements that cannot be audited do not run".into(),
            hint: Some("Free space where the audit spool is; statements run again as soon as it can be written.".into()),
            rule: None,
            held: false,
        };
        warn!("statement refused: the audit spool cannot be written");
        self.gated = Some(StatementInfo {
            decision: "deny",
            rule: "audit-spool-unwritable".into(),
            ..StatementInfo::unchecked(sql)
        });
        let raise = crate::enforce::raise_sql(&refusal);
        Some(match replaced {
            None => build::query(&raise),
            Some(name) => build::parse(name, &raise),
        })
    }

    /// Opens audit rows; after the enforcer has seen `msg`.
    fn audit(&mut self, msg: &FrontendMessage<'_>) {
        let Some(a) = &mut self.audit else { return };
        let checked = self
            .gated
            .take()
            .or_else(|| self.enforcer.as_mut().and_then(Enforcer::take_last));
        match msg {
            FrontendMessage::Query { sql } => {
                a.query(checked.unwrap_or_else(|| StatementInfo::unchecked(sql)))
            }
            FrontendMessage::Parse(p) => a.parse(
                p.name,
                checked.unwrap_or_else(|| StatementInfo::unchecked(p.sql)),
            ),
            FrontendMessage::Bind(b) => a.bind(b.portal, b.statement),
            FrontendMessage::Execute { portal, .. } => a.execute(portal),
            FrontendMessage::Sync => a.sync(),
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } => a.close_statement(name),
            FrontendMessage::Close {
                target: Target::Portal,
                name,
            } => a.close_portal(name),
            FrontendMessage::FunctionCall(f) => a.query(StatementInfo {
                text: format!("(fast-path function call, oid {})", f.function_oid),
                decision: if self.enforcer.is_some() {
                    "deny"
                } else {
                    "unchecked"
                },
                ..Default::default()
            }),
            _ => {}
        }
    }
}

/// What the backend direction knows of the session.
struct BackendState {
    status: TransactionStatus,
    stats: Stats,
    /// The identity's cap on rows and bytes per result.
    cap: Option<ResultCap>,
    audit: Option<BackendAudit>,
    mask: Option<BackMask>,
}

/// Changes to a run of complete frames in a read buffer. Changes are rare:
/// the common case forwards the buffer's frames in one write, untouched,
/// and only a changed batch is copied.
#[derive(Default)]
struct Edits {
    out: Option<BytesMut>,
    /// Where the next frame starts.
    offset: usize,
    /// Bytes of the buffer before this are already in `out`.
    copied: usize,
}

impl Edits {
    fn keep(&mut self, len: usize) {
        self.offset += len;
    }

    /// Replaces the next `len` bytes of `buf` with `with` (`None`: drops them).
    fn replace(&mut self, buf: &[u8], len: usize, with: Option<&[u8]>) {
        let out = self.out.get_or_insert_with(BytesMut::new);
        out.extend_from_slice(&buf[self.copied..self.offset]);
        if let Some(with) = with {
            out.extend_from_slice(with);
        }
        self.offset += len;
        self.copied = self.offset;
    }

    /// The bytes to send for `buf[..used]`.
    fn output<'a>(&'a mut self, buf: &'a [u8], used: usize) -> &'a [u8] {
        match self.out.as_mut() {
            Some(out) => {
                out.extend_from_slice(&buf[self.copied..used]);
                out
            }
            None => &buf[..used],
        }
    }
}

impl BackendState {
    /// `cap` is what the result cap does with `msg`: the audit records
    /// what the client got, not what the server sent.
    fn observe(&mut self, msg: &BackendMessage<'_>, len: usize, cap: Option<&CapAction>) {
        self.stats.backend_messages += 1;
        match msg {
            BackendMessage::ReadyForQuery(s) => self.status = *s,
            BackendMessage::DataRow { .. } => self.stats.rows += 1,
            _ => {}
        }
        let Some(a) = &mut self.audit else { return };
        match cap {
            Some(CapAction::Drop) => return,
            Some(CapAction::Replace(_)) => return a.error("54000"),
            _ => {}
        }
        match msg {
            BackendMessage::DataRow { .. } | BackendMessage::CopyData => a.row(len),
            BackendMessage::CommandComplete { tag } => a.complete(tag),
            BackendMessage::EmptyQueryResponse | BackendMessage::PortalSuspended => {
                a.end_of_execute()
            }
            BackendMessage::ErrorResponse(f) => a.error(f.sqlstate().unwrap_or("XX000")),
            BackendMessage::ReadyForQuery(_) => a.ready(),
            _ => {}
        }
    }
}

enum FrontEnd {
    Terminated,
    Closed,
    Violation(ProtocolError),
    Io(std::io::Error),
}

enum BackEnd {
    Closed,
    Fatal(ProxyError),
    Io(std::io::Error),
    Violation(ProtocolError),
}

/// Counts reads in both directions. A counter rather than a timestamp:
/// the idle check runs a few times per timeout, reads happen per message,
/// and a counter costs no clock read.
#[derive(Default)]
struct Activity {
    reads: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves once no read has happened for `timeout` (checked in quarter
    /// steps, so it fires between `timeout` and 1.25 x `timeout`).
    async fn quiet_for(&self, timeout: Duration) {
        let step = timeout / 4;
        let mut quiet = Duration::ZERO;
        let mut seen = self.reads.load(Ordering::Relaxed);
        while quiet < timeout {
            tokio::time::sleep(step).await;
            let now = self.reads.load(Ordering::Relaxed);
            if now == seen {
                quiet += step;
            } else {
                seen = now;
                quiet = Duration::ZERO;
            }
        }
    }
}

/// Makes room for the next read: at least the rest of a message whose
/// header has arrived, otherwise one chunk. Runs after [`complete_frames`]
/// consumed every whole message and validated this header's length.
fn reserve_for_next(buf: &mut BytesMut) {
    let want = if buf.len() >= 5 {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize + 1;
        len.saturating_sub(buf.len())
    } else {
        0
    };
    let spare = buf.capacity() - buf.len();
    if spare < want.max(1024) {
        buf.reserve(want.max(READ_CHUNK));
    }
}

/// What to do after one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    /// The frame was the last (Terminate).
    Stop,
    /// The frame is not taken yet: something must be awaited first, and
    /// then the frame offered again.
    Pause,
}

/// Splits off the complete frames at the front of `buf`, calling `each` on
/// every one. Returns how many bytes they span.
fn complete_frames(
    buf: &[u8],
    max: usize,
    mut each: impl FnMut(&[u8]) -> Result<Next, ProtocolError>,
) -> (usize, Result<Next, ProtocolError>) {
    let mut off = 0;
    loop {
        match next_frame(&buf[off..], max) {
            Ok(Some(FrameHeader { wire_len, .. })) => {
                let frame = &buf[off..off + wire_len];
                match each(frame) {
                    Ok(Next::Continue) => off += wire_len,
                    Ok(Next::Stop) => return (off + wire_len, Ok(Next::Stop)),
                    Ok(Next::Pause) => return (off, Ok(Next::Pause)),
                    Err(e) => return (off, Err(e)),
                }
            }
            Ok(None) => return (off, Ok(Next::Continue)),
            Err(e) => return (off, Err(e)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn pump_frontend<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    max: usize,
    state: &mut FrontendState,
    activity: &Activity,
    shared: &Shared,
    inject: &mpsc::Sender<Injected>,
) -> FrontEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut edits = Edits::default();
        let (used, verdict) = complete_frames(buf, max, |frame| {
            let msg = FrontendMessage::parse(frame)?;
            if !std::mem::take(&mut state.looked_up)
                && let Some(e) = &state.enforcer
            {
                let names = e.lookups(&msg);
                if !names.is_empty() {
                    // Offered again once the catalog has them.
                    state.lookups = names;
                    return Ok(Next::Pause);
                }
            }
            let replaced = match state.gate(&msg) {
                Some(bytes) => Some(bytes),
                None => match state.enforcer.as_mut().map(|e| e.inspect(&msg)) {
                    Some(Action::Replace(bytes)) => Some(bytes),
                    Some(Action::Hold(held)) => {
                        // Offered again once an approver has decided.
                        state.held = Some(held);
                        return Ok(Next::Pause);
                    }
                    Some(Action::Forward) | None => None,
                },
            };
            state.observe(&msg);
            // Masking's own Describe goes just before the message.
            let before = state.mask.as_mut().and_then(|m| m.inspect(&msg));
            match (before, replaced) {
                (None, None) => edits.keep(frame.len()),
                (None, Some(bytes)) => edits.replace(buf, frame.len(), Some(&bytes)),
                (Some(mut before), bytes) => {
                    before.extend_from_slice(bytes.as_deref().unwrap_or(frame));
                    edits.replace(buf, frame.len(), Some(&before));
                }
            }
            state.audit(&msg);
            Ok(if matches!(msg, FrontendMessage::Terminate) {
                Next::Stop
            } else {
                Next::Continue
            })
        });
        if used > 0 {
            // Within the identity's statement rate: hold the batch until
            // its turn (the client sees latency, not errors).
            if let Some(enforcer) = &mut state.enforcer {
                let wait = enforcer.pace();
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            state.stats.bytes_from_client += used as u64;
            if let Err(e) = write_out(wr, edits.output(buf, used)).await {
                return FrontEnd::Io(e);
            }
            buf.advance(used);
        }
        match verdict {
            Ok(Next::Pause) => {
                if !state.lookups.is_empty() {
                    let names = std::mem::take(&mut state.lookups);
                    if let Some(enforcer) = &state.enforcer {
                        enforcer.look_up(&names).await;
                    }
                    state.looked_up = true;
                    continue;
                }
                let (Some(held), Some(enforcer)) = (state.held.take(), state.enforcer.as_mut())
                else {
                    continue;
                };
                let touch = || activity.touch();
                match crate::approvals::park::park(
                    *held, rd, buf, max, shared, enforcer, inject, &touch,
                )
                .await
                {
                    Ok((sql, outcome)) => enforcer.decide_held(sql.as_bytes(), outcome),
                    Err(crate::approvals::park::Gone::Closed) => return FrontEnd::Closed,
                    Err(crate::approvals::park::Gone::Io(e)) => return FrontEnd::Io(e),
                }
                continue;
            }
            Ok(Next::Continue) => {}
            Ok(Next::Stop) => return FrontEnd::Terminated,
            Err(e) => return FrontEnd::Violation(e),
        }
        reserve_for_next(buf);
        match rd.read_buf(buf).await {
            Ok(0) => return FrontEnd::Closed,
            Ok(_) => activity.touch(),
            Err(e) => return FrontEnd::Io(e),
        }
    }
}

async fn pump_backend<R, W>(
    rd: &mut R,
    buf: &mut BytesMut,
    wr: &mut W,
    injected: &mut mpsc::Receiver<Injected>,
    state: &mut BackendState,
    activity: &Activity,
    auditor: Option<&Auditor>,
) -> BackEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut edits = Edits::default();
        let (used, verdict) = complete_frames(buf, BACKEND_MAX_MESSAGE, |frame| {
            let msg = BackendMessage::parse(frame)?;
            let masked = match &mut state.mask {
                Some(m) => {
                    let step = m.on(frame).map_err(|e| ProtocolError::Malformed {
                        tag: frame[0],
                        what: e.0,
                    })?;
                    // Counts come at the end of each result, not per row.
                    if !m.flushed.is_empty() {
                        let counts = std::mem::take(&mut m.flushed);
                        if let Some(a) = &mut state.audit {
                            a.mask_counts(counts);
                        }
                    }
                    step
                }
                None => Step::Keep,
            };
            if matches!(masked, Step::Pause) {
                return Ok(Next::Pause);
            }
            let action = state.cap.as_mut().map(|c| c.on(frame[0], frame.len()));
            state.observe(&msg, frame.len(), action.as_ref());
            match (action, masked) {
                (Some(CapAction::Drop), _) | (_, Step::Drop) => {
                    edits.replace(buf, frame.len(), None)
                }
                (Some(CapAction::Replace(err)), _) => edits.replace(buf, frame.len(), Some(&err)),
                (_, Step::Replace(bytes)) => edits.replace(buf, frame.len(), Some(&bytes)),
                _ => edits.keep(frame.len()),
            }
            Ok(Next::Continue)
        });
        if used > 0 {
            let out = edits.output(buf, used);
            state.stats.bytes_to_client += out.len() as u64;
            if let Err(e) = write_out(wr, out).await {
                return BackEnd::Io(e);
            }
            buf.advance(used);
        }
        // After the replies are sent, so that encoding and hashing the rows
        // delay none of them; `run` hands over what is left when this
        // direction stops.
        if let (Some(a), Some(auditor)) = (&mut state.audit, auditor) {
            a.hand_over(auditor).await;
        }
        match verdict {
            Err(e) => return BackEnd::Violation(e),
            Ok(Next::Pause) => {
                if let Some(m) = &mut state.mask {
                    m.resolve().await;
                }
                continue;
            }
            Ok(_) => {}
        }
        reserve_for_next(buf);
        tokio::select! {
            biased;
            Some(injected) = injected.recv() => match injected {
                Injected::Notice(notice) => {
                    if let Err(e) = write_out(wr, &notice).await {
                        return BackEnd::Io(e);
                    }
                }
                Injected::Fatal(err) => {
                    let mut out = BytesMut::new();
                    err.encode(&mut out);
                    let _ = write_out(wr, &out).await;
                    let _ = wr.shutdown().await;
                    return BackEnd::Fatal(err);
                }
            },
            r = rd.read_buf(buf) => match r {
                Ok(0) => return BackEnd::Closed,
                Ok(_) => activity.touch(),
                Err(e) => return BackEnd::Io(e),
            },
        }
    }
}

async fn write_out<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Plain TCP splits into owned halves with no lock between them; a TLS
/// stream shares one session state, so its halves take turns.
fn split(io: MaybeTls) -> (ReadHalf, WriteHalf) {
    match io {
        MaybeTls::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            (Box::new(r), Box::new(w))
        }
        other => {
            let (r, w) = tokio::io::split(other);
            (Box::new(r), Box::new(w))
        }
    }
}

pub async fn run(
    client: Conn,
    upstream: Conn,
    shared: &Shared,
    limits: &Limits,
    enforcer: Option<Enforcer>,
    audit: Option<Arc<SessionAudit>>,
    masking: Option<(FrontMask, BackMask)>,
) -> RelayEnd {
    let Conn {
        io: client_io,
        buf: mut client_buf,
    } = client;
    let Conn {
        io: upstream_io,
        buf: mut upstream_buf,
    } = upstream;
    let (mut client_rd, mut client_wr) = split(client_io);
    let (mut upstream_rd, mut upstream_wr) = split(upstream_io);
    let (inject, mut injected) = mpsc::channel::<Injected>(4);
    let activity = Activity::default();
    let (front_mask, back_mask) = match masking {
        Some((f, b)) => (Some(f), Some(b)),
        None => (None, None),
    };
    let mut back_state = BackendState {
        mask: back_mask,
        status: TransactionStatus::Idle,
        stats: Stats::default(),
        cap: enforcer.as_ref().and_then(Enforcer::result_cap),
        audit: audit.clone().map(BackendAudit::new),
    };
    let auditor = shared.audit.as_ref();
    let mut front_state = FrontendState {
        stats: Stats::default(),
        enforcer,
        spool_gate: audit.as_ref().and(auditor).and_then(Auditor::refusal_gate),
        audit: audit.map(FrontendAudit::new),
        gated: None,
        mask: front_mask,
        held: None,
        lookups: Vec::new(),
        looked_up: false,
    };
    let max = limits.max_message_size as usize;

    let outcome = {
        let front = pump_frontend(
            &mut client_rd,
            &mut client_buf,
            &mut upstream_wr,
            max,
            &mut front_state,
            &activity,
            shared,
            &inject,
        );
        let back = pump_backend(
            &mut upstream_rd,
            &mut upstream_buf,
            &mut client_wr,
            &mut injected,
            &mut back_state,
            &activity,
            auditor,
        );
        tokio::pin!(front, back);

        let mut phase = shared.phase.clone();
        let idle_timeout = limits.idle_timeout;
        let idle = async {
            if idle_timeout.is_zero() {
                return std::future::pending().await;
            }
            activity.quiet_for(idle_timeout).await
        };
        tokio::pin!(idle);

        // Asks the backend direction to send `err` and waits (bounded) for it.
        async fn finish_with<F: std::future::Future<Output = BackEnd>>(
            inject: &mpsc::Sender<Injected>,
            back: std::pin::Pin<&mut F>,
            err: ProxyError,
        ) -> BackEnd {
            if inject.send(Injected::Fatal(err.clone())).await.is_err() {
                return BackEnd::Fatal(err);
            }
            tokio::time::timeout(Duration::from_secs(2), back)
                .await
                .unwrap_or(BackEnd::Fatal(err))
        }

        let outcome: Result<BackEnd, FrontEnd> = tokio::select! {
            end = &mut back => Ok(end),
            end = &mut front => match end {
                FrontEnd::Violation(e) => {
                    let err = ProxyError::fatal("08P01", format!("protocol violation: {e}"));
                    Ok(finish_with(&inject, back.as_mut(), err).await)
                }
                other => Err(other),
            },
            _ = crate::runtime::reached(&mut phase, Phase::Closing) => {
                let err = ProxyError::fatal("57P01", "terminating connection because interceptor is shutting down");
                Ok(finish_with(&inject, back.as_mut(), err).await)
            }
            _ = &mut idle => {
                let err = ProxyError::fatal("57P05", format!("terminating connection after {idle_timeout:?} without traffic (interceptor idle_timeout)"));
                Ok(finish_with(&inject, back.as_mut(), err).await)
            }
        };
        outcome
    };
    // The rows of statements whose replies were (or were being) sent when
    // the backend direction stopped.
    if let (Some(a), Some(auditor)) = (&mut back_state.audit, auditor) {
        a.hand_over(auditor).await;
    }
    let mut stats = back_state.stats.clone();
    stats.frontend_messages = front_state.stats.frontend_messages;
    stats.queries = front_state.stats.queries;
    stats.bytes_from_client = front_state.stats.bytes_from_client;
    match outcome {
        Ok(BackEnd::Closed) => RelayEnd::UpstreamClosed(stats),
        Ok(BackEnd::Fatal(e)) => RelayEnd::Fatal(e, stats),
        Ok(BackEnd::Io(e)) => RelayEnd::Error(format!("upstream read or client write: {e}")),
        Ok(BackEnd::Violation(e)) => RelayEnd::Error(format!("upstream protocol violation: {e}")),
        Err(FrontEnd::Terminated) => RelayEnd::Terminated(stats),
        Err(FrontEnd::Closed) => RelayEnd::ClientClosed(stats),
        Err(FrontEnd::Io(e)) => RelayEnd::Error(format!("client read or upstream write: {e}")),
        Err(FrontEnd::Violation(_)) => unreachable!("handled above"),
    }
}
