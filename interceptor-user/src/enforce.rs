//! Statement policy on the frontend path: each Query, Parse, Bind and
//! FunctionCall is checked before it is forwarded.
//!
//! A refused message is not dropped: it is replaced by a statement that
//! makes the server itself raise the refusal (`DO ... RAISE`). The client
//! then gets the ErrorResponse in its place in the reply stream, and the
//! server's transaction state matches the client's: inside a transaction
//! block the server aborts it, exactly as for any other error.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use policies::{Check, Policy, Principal, Refusal, SessionPolicy, Subject};
use tracing::{debug, info};

use crate::audit::session::StatementInfo;
use crate::limits::{Bucket, ResultCap};
use crate::protocol::build;
use crate::protocol::frontend::{FrontendMessage, Target};
use crate::runtime::Shared;

/// What to do with one frontend message.
pub enum Action {
    Forward,
    /// Send these bytes instead.
    Replace(BytesMut),
    /// Park it until an approver decides (see `relay::park`).
    Hold(Box<Held>),
}

/// A statement a hold rule caught.
#[derive(Debug, Clone)]
pub struct Held {
    pub sql: String,
    /// The Parse's statement name; `None` for a simple Query.
    pub statement: Option<Vec<u8>>,
    pub fingerprint: u64,
    pub rule: String,
    pub reason: String,
    pub needs: policies::ApprovalNeeds,
}

/// Approvals in a session: who it is, to file requests.
#[derive(Debug, Clone)]
pub struct HoldContext {
    pub session: uuid::Uuid,
    pub target: String,
    pub database: String,
    pub user: String,
}

/// An approver's decision on the text about to be checked again.
struct Decided {
    sql: Vec<u8>,
    outcome: crate::approvals::Outcome,
}

/// How a text was decided.
enum Checked {
    Allowed(u32),
    Refused(Refusal),
    Held(Box<Held>),
}

/// A session's policy enforcement.
pub struct Enforcer {
    shared: Arc<Shared>,
    principal: Principal,
    /// The policy `session` was made for; a reload makes a new one.
    policy: Arc<Policy>,
    session: SessionPolicy,
    /// Prepared statements whose Parse was refused; their Binds are
    /// emptied so the server reaches the raised error at Execute.
    refused_statements: HashSet<Vec<u8>>,
    session_id: u64,
    /// (statements per second, burst) and the identity's shared bucket.
    rate: Option<(f64, u32, Arc<Bucket>)>,
    /// Statements seen since the last [`pace`](Self::pace).
    pending: u32,
    /// What the last checked text was and how it was decided, for the
    /// audit trail.
    last: Option<StatementInfo>,
    /// The last allowed text as it is to be sent: with the session's
    /// temporary tables it changes named as pg_temp.name.
    pinned: Option<String>,
    /// The last text's analysis (see [`policies::LastAnalysis`]).
    last_analysis: policies::LastAnalysis,
    /// With masking: statements that would store masked data are refused.
    launder: Option<crate::masking::LaunderCheck>,
    /// With `[approvals]`: held statements wait for an approver.
    holds: Option<HoldContext>,
    decided: Option<Decided>,
    /// Prepared statements run on an approval, and until when they may
    /// be executed again.
    approved_statements: HashMap<Vec<u8>, Instant>,
}

impl Enforcer {
    /// `subject` is `principal` as `policy` sees it (worked out at login).
    pub fn new(
        shared: Arc<Shared>,
        policy: Arc<Policy>,
        principal: Principal,
        subject: Subject,
        session_id: u64,
    ) -> Self {
        let mut e = Enforcer {
            session: SessionPolicy::new(subject),
            shared,
            principal,
            policy,
            refused_statements: HashSet::new(),
            session_id,
            rate: None,
            pending: 0,
            last: None,
            pinned: None,
            last_analysis: Default::default(),
            launder: None,
            holds: None,
            decided: None,
            approved_statements: HashMap::new(),
        };
        e.apply_limits();
        e
    }

    /// Refuses, from now on, statements that would store masked data.
    pub fn guard_masked(&mut self, check: crate::masking::LaunderCheck) {
        self.launder = Some(check);
    }

    /// Parks held statements for approval rather than refusing them.
    pub fn enable_holds(&mut self, ctx: HoldContext) {
        self.holds = Some(ctx);
    }

    pub fn hold_context(&self) -> Option<&HoldContext> {
        self.holds.as_ref()
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn group_names(&self) -> &[String] {
        &self.session.subject.group_names
    }

    /// The decision on `sql` (the held text): it is checked again next,
    /// and runs or is refused accordingly.
    pub fn decide_held(&mut self, sql: &[u8], outcome: crate::approvals::Outcome) {
        self.decided = Some(Decided {
            sql: sql.to_vec(),
            outcome,
        });
    }

    fn apply_limits(&mut self) {
        self.rate = self
            .policy
            .limits_for(&self.session.subject)
            .rate
            .map(|(rate, burst)| {
                let bucket = self
                    .shared
                    .rate_limiter
                    .bucket(&self.principal.limit_key(), burst);
                (rate, burst, bucket)
            });
    }

    /// The cap on rows and bytes per result for this session (fixed at
    /// login).
    pub fn result_cap(&self) -> Option<ResultCap> {
        let l = self.policy.limits_for(&self.session.subject);
        ResultCap::new(l.max_rows, l.max_bytes)
    }

    /// How long to hold the statements inspected since the last call, to
    /// keep the identity within its statement rate.
    pub fn pace(&mut self) -> Duration {
        let n = std::mem::take(&mut self.pending);
        match &self.rate {
            Some((rate, burst, bucket)) if n > 0 => bucket.take(n, *rate, *burst),
            _ => Duration::ZERO,
        }
    }

    /// Picks up a reloaded policy; the session's temp tables and prepared
    /// statements carry over only while the policy is the same one.
    fn refresh_policy(&mut self) {
        let runtime = self.shared.runtime.load();
        match &runtime.policy {
            Some(p) if Arc::ptr_eq(p, &self.policy) => {}
            Some(p) => {
                let current = &self.session.subject;
                let subject = p.subject(&self.principal, &current.target, &current.database);
                self.policy = p.clone();
                self.session = SessionPolicy::new(subject);
                self.apply_limits();
            }
            // Policy removed from the config: keep enforcing the last one
            // rather than fail open mid-session.
            None => {}
        }
    }

    /// Decides a query string; when allowed, says how many statements it
    /// holds.
    fn check_sql(&mut self, sql: &[u8], statement: Option<&[u8]>) -> Checked {
        self.pinned = None;
        self.refresh_policy();
        // Borrowed, not cloned: every session shares these, and counting
        // references would move their cache lines between CPUs.
        let policy = &self.policy;
        let not_utf8;
        // Read once: the analysis, the pinning and the laundering check
        // all take the text.
        let text = std::str::from_utf8(sql).ok();
        let analysis = match text {
            Some(text) => self
                .shared
                .analyzer
                .analyze_after(text, &mut self.last_analysis),
            None => {
                not_utf8 = Arc::new(Err(policies::AnalysisError::NotUtf8));
                &not_utf8
            }
        };
        let decided = self.decided.take().filter(|d| d.sql == sql);
        let approved = matches!(
            decided,
            Some(Decided {
                outcome: crate::approvals::Outcome::Approved { .. },
                ..
            })
        );
        let mut check = self.session.check_shared(policy, analysis, approved);
        // Rare: only texts that change the session's temporary tables.
        let pins = self.session.take_pins();
        if matches!(check, Check::Allowed(_)) && !pins.is_empty() {
            match text
                .ok_or(policies::PinError::Analysis(
                    policies::AnalysisError::NotUtf8,
                ))
                .and_then(|text| policies::pin_temp(text, &pins))
            {
                Ok(text) => self.pinned = Some(text),
                Err(e) => check = Check::Refused(pin_refusal(&e)),
            }
        }
        if let (Check::Allowed(_), Some(guard), Some(text)) = (&check, &self.launder, text)
            && let Some(r) = guard.check(text)
        {
            check = Check::Refused(r);
        }
        let mut approval = String::new();
        let held = match &mut check {
            Check::Refused(r) if r.held => match &decided {
                Some(d) => {
                    approval = d.outcome.id().to_owned();
                    *r = d.outcome.refusal(r.rule.clone());
                    None
                }
                None if self.holds.is_some() => Some(Held {
                    sql: String::from_utf8_lossy(sql).into_owned(),
                    statement: statement.map(<[u8]>::to_vec),
                    fingerprint: analysis.as_ref().as_ref().map_or(0, |a| a.fingerprint),
                    rule: r.rule.as_deref().unwrap_or_default().to_owned(),
                    reason: r
                        .message
                        .strip_prefix("interceptor: statement requires approval")
                        .map_or(r.message.as_str(), |m| m.trim_start_matches(": "))
                        .to_owned(),
                    needs: policy.approval_needs(r.rule.as_deref()),
                }),
                None => {
                    r.hint = Some(
                        "This proxy has no [approvals] section, so held statements are refused; ask an operator to run it.".into(),
                    );
                    None
                }
            },
            Check::Allowed(_) => {
                if let Some(d) = &decided {
                    approval = d.outcome.id().to_owned();
                }
                None
            }
            Check::Refused(_) => None,
        };
        if self.shared.audit.is_some() {
            let mut info = audit_info(sql, analysis, &check, policy);
            info.approval = approval;
            if held.is_some() {
                info.decision = "hold";
            }
            self.last = Some(info);
        }
        if let Some(h) = held {
            info!(
                session_id = self.session_id,
                rule = %h.rule,
                "statement held for approval"
            );
            return Checked::Held(Box::new(h));
        }
        match check {
            Check::Allowed(rules) => {
                debug!(session_id = self.session_id, ?rules, "statement allowed");
                if approved && let Some(name) = statement {
                    let reuse = self
                        .shared
                        .runtime
                        .load()
                        .config
                        .approvals
                        .as_ref()
                        .map_or(Duration::ZERO, |a| a.get_ref().reuse_for);
                    self.approved_statements
                        .insert(name.to_vec(), Instant::now() + reuse);
                }
                Checked::Allowed(rules.len() as u32)
            }
            Check::Refused(r) => {
                info!(
                    session_id = self.session_id,
                    rule = r.rule.as_deref().unwrap_or("default-deny"),
                    sqlstate = r.sqlstate,
                    "statement refused: {}",
                    r.message
                );
                Checked::Refused(r)
            }
        }
    }

    /// Catalog entries the laundering check needs before it can decide the
    /// text `msg` carries (see [`look_up`](Self::look_up)).
    pub fn lookups(&self, msg: &FrontendMessage<'_>) -> Vec<String> {
        // Before the text is read: without masking, no message pays for it.
        let Some(guard) = &self.launder else {
            return Vec::new();
        };
        let sql = match msg {
            FrontendMessage::Query { sql } => *sql,
            FrontendMessage::Parse(p) => p.sql,
            _ => return Vec::new(),
        };
        std::str::from_utf8(sql).map_or_else(|_| Vec::new(), |text| guard.lookups(text))
    }

    pub async fn look_up(&self, names: &[String]) {
        if let Some(guard) = &self.launder {
            guard.look_up(names).await;
        }
    }

    /// The audit view of the text last checked (by Query or Parse).
    pub fn take_last(&mut self) -> Option<StatementInfo> {
        self.last.take()
    }

    pub fn inspect(&mut self, msg: &FrontendMessage<'_>) -> Action {
        match msg {
            FrontendMessage::Query { sql } => match self.check_sql(sql, None) {
                Checked::Allowed(n) => {
                    self.pending += n;
                    match self.pinned.take() {
                        Some(text) => Action::Replace(build::query(&text)),
                        None => Action::Forward,
                    }
                }
                Checked::Refused(r) => Action::Replace(build::query(&raise_sql(&r))),
                Checked::Held(h) => Action::Hold(h),
            },
            FrontendMessage::Execute { .. } => {
                self.pending += 1;
                Action::Forward
            }
            FrontendMessage::Parse(p) => {
                // A new statement under this name replaces an approved one.
                if !self.approved_statements.is_empty() {
                    self.approved_statements.remove(p.name);
                }
                match self.check_sql(p.sql, Some(p.name)) {
                    Checked::Allowed(_) => {
                        self.refused_statements.remove(p.name);
                        match self.pinned.take() {
                            Some(text) => {
                                let types: Vec<u32> = p.param_types().collect();
                                Action::Replace(build::parse_typed(p.name, &text, &types))
                            }
                            None => Action::Forward,
                        }
                    }
                    Checked::Refused(r) => {
                        self.refused_statements.insert(p.name.to_vec());
                        Action::Replace(build::parse(p.name, &raise_sql(&r)))
                    }
                    Checked::Held(h) => Action::Hold(h),
                }
            }
            // Most sessions have no refused statement: skip hashing the name.
            FrontendMessage::Bind(b)
                if !self.refused_statements.is_empty()
                    && self.refused_statements.contains(b.statement) =>
            {
                Action::Replace(build::empty_bind(b.portal, b.statement))
            }
            FrontendMessage::Bind(b) if !self.approved_statements.is_empty() => {
                match self.approved_statements.get(b.statement) {
                    Some(until) if *until <= Instant::now() => {
                        info!(
                            session_id = self.session_id,
                            "approved prepared statement executed after its approval expired: refused"
                        );
                        // The server has the approved statement itself: a Bind
                        // naming none makes it raise an error, whatever the
                        // statement's parameters.
                        Action::Replace(build::empty_bind(b.portal, EXPIRED_APPROVAL))
                    }
                    _ => Action::Forward,
                }
            }
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } => {
                self.refused_statements.remove(*name);
                self.approved_statements.remove(*name);
                Action::Forward
            }
            FrontendMessage::FunctionCall(f) => {
                let r = Refusal {
                    sqlstate: "42501",
                    message: format!(
                        "interceptor: statement denied: fast-path function calls (function oid {}) bypass SQL and are not allowed",
                        f.function_oid
                    ),
                    hint: Some("Call the function from a SELECT statement instead.".into()),
                    rule: None,
                    held: false,
                };
                info!(
                    session_id = self.session_id,
                    "fast-path function call refused"
                );
                Action::Replace(build::query(&raise_sql(&r)))
            }
            _ => Action::Forward,
        }
    }
}

/// A text allowed because it changes only temporary tables, which could
/// not be sent with their names pinned to pg_temp.
fn pin_refusal(e: &policies::PinError) -> Refusal {
    let sqlstate = match e {
        policies::PinError::Analysis(a) => a.sqlstate(),
        _ => "42501",
    };
    Refusal {
        sqlstate,
        message: format!(
            "interceptor: statement refused: it is allowed only as a change to this session's temporary tables, and {e}"
        ),
        hint: Some(
            "Name the temporary table as pg_temp.name, and give WITH queries other names.".into(),
        ),
        rule: None,
        held: false,
    }
}

/// The statement name a Bind of an expired approval is pointed at: the
/// server's error (26000) quotes it.
const EXPIRED_APPROVAL: &[u8] =
    b"interceptor: the approval of this prepared statement expired; prepare it again to request a new one";

/// What the audit trail records of a checked text.
fn audit_info(
    sql: &[u8],
    analysis: &policies::analysis::SharedAnalysis,
    check: &Check,
    policy: &Policy,
) -> StatementInfo {
    let text = String::from_utf8_lossy(sql);
    let redact = match check {
        Check::Allowed(rules) => rules.iter().any(|r| policy.redacts(r.as_deref())),
        Check::Refused(r) => policy.redacts(r.rule.as_deref()),
    };
    let mut info = StatementInfo {
        text: if redact {
            policies::redact_literals(&text)
        } else {
            text.into_owned()
        },
        ..Default::default()
    };
    if let Ok(a) = analysis.as_ref() {
        info.fingerprint = a.fingerprint;
        info.kind = a
            .statements
            .iter()
            .map(|s| s.kind())
            .max()
            .map_or("", |k| k.as_str());
        for st in &a.statements {
            for t in st.reads.iter().chain(st.changed_tables()) {
                if !info.tables.contains(t) {
                    info.tables.push(t.clone());
                }
            }
        }
    }
    match check {
        Check::Allowed(rules) => {
            info.decision = "allow";
            info.rule = rules
                .iter()
                .flatten()
                .next()
                .map_or_else(String::new, |r| r.to_string());
        }
        Check::Refused(r) => {
            info.decision = if r.held { "hold" } else { "deny" };
            info.rule = r.rule.as_deref().unwrap_or("default-deny").to_owned();
        }
    }
    info
}

/// Text safe inside a dollar-quoted literal in any client encoding.
fn plain(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '$' || !c.is_ascii() || c.is_ascii_control() {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// A statement that makes the server raise `r` as its own error.
pub fn raise_sql(r: &Refusal) -> String {
    let mut sql = format!(
        "DO $interceptor$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = $m${}$m$",
        r.sqlstate,
        plain(&r.message)
    );
    if let Some(h) = &r.hint {
        sql.push_str(&format!(", HINT = $h${}$h$", plain(h)));
    }
    sql.push_str("; END$interceptor$");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_sql_is_one_valid_statement() {
        let r = Refusal {
            sqlstate: "42501",
            message: "denied $m$; DROP TABLE x; -- é".into(),
            hint: Some("try $h$ again".into()),
            rule: None,
            held: false,
        };
        let sql = raise_sql(&r);
        let a = policies::analyze(&sql).unwrap();
        assert_eq!(a.statements.len(), 1);
        assert_eq!(a.statements[0].command, "do");
        assert!(sql.contains("denied ?m?; DROP TABLE x; -- ?"), "{sql}");
    }
}
