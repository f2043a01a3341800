//! Statement policy on the frontend path: each Query, Parse, Bind and
//! FunctionCall is checked before it is forwarded.
//!
//! A refused message is not dropped: it is replaced by a statement that
//! makes the server itself raise the refusal (`DO ... RAISE`). The client
//! then gets the ErrorResponse in its place in the reply stream, and the
//! server's transaction state matches the client's: inside a transaction
//! block the server aborts it, exactly as for any other error.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

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
    /// With masking: statements that would store masked data are refused.
    launder: Option<crate::masking::LaunderCheck>,
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
            launder: None,
        };
        e.apply_limits();
        e
    }

    /// Refuses, from now on, statements that would store masked data.
    pub fn guard_masked(&mut self, check: crate::masking::LaunderCheck) {
        self.launder = Some(check);
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
    fn current_policy(&mut self) -> Arc<Policy> {
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
        self.policy.clone()
    }

    /// Decides a query string; on success, says how many statements it holds.
    fn check_sql(&mut self, sql: &[u8]) -> Result<u32, Refusal> {
        let policy = self.current_policy();
        let analysis = match std::str::from_utf8(sql) {
            Ok(text) => self.shared.analyzer.analyze(text),
            Err(_) => Arc::new(Err(policies::AnalysisError::NotUtf8)),
        };
        let mut check = self.session.check(&policy, &analysis);
        if let (Check::Allowed(_), Some(guard), Ok(text)) =
            (&check, &self.launder, std::str::from_utf8(sql))
            && let Some(r) = guard.check(text)
        {
            check = Check::Refused(r);
        }
        if self.shared.audit.is_some() {
            self.last = Some(audit_info(sql, &analysis, &check, &policy));
        }
        match check {
            Check::Allowed(rules) => {
                debug!(session_id = self.session_id, ?rules, "statement allowed");
                Ok(rules.len() as u32)
            }
            Check::Refused(r) => {
                info!(
                    session_id = self.session_id,
                    rule = r.rule.as_deref().unwrap_or("default-deny"),
                    sqlstate = r.sqlstate,
                    "statement refused: {}",
                    r.message
                );
                Err(r)
            }
        }
    }

    /// The audit view of the text last checked (by Query or Parse).
    pub fn take_last(&mut self) -> Option<StatementInfo> {
        self.last.take()
    }

    pub fn inspect(&mut self, msg: &FrontendMessage<'_>) -> Action {
        match msg {
            FrontendMessage::Query { sql } => match self.check_sql(sql) {
                Ok(n) => {
                    self.pending += n;
                    Action::Forward
                }
                Err(r) => Action::Replace(build::query(&raise_sql(&r))),
            },
            FrontendMessage::Execute { .. } => {
                self.pending += 1;
                Action::Forward
            }
            FrontendMessage::Parse(p) => match self.check_sql(p.sql) {
                Ok(_) => {
                    self.refused_statements.remove(p.name);
                    Action::Forward
                }
                Err(r) => {
                    self.refused_statements.insert(p.name.to_vec());
                    Action::Replace(build::parse(p.name, &raise_sql(&r)))
                }
            },
            FrontendMessage::Bind(b) if self.refused_statements.contains(b.statement) => {
                Action::Replace(build::empty_bind(b.portal, b.statement))
            }
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } => {
                self.refused_statements.remove(*name);
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
            .map_or("", |k| k.as_str())
            .to_owned();
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
            info.decision = "allow".into();
            info.rule = rules
                .iter()
                .flatten()
                .next()
                .map_or_else(String::new, |r| r.to_string());
        }
        Check::Refused(r) => {
            info.decision = if r.held { "hold" } else { "deny" }.into();
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
