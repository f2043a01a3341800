//! A session's view of policy: what earlier statements left behind
//! (temporary tables, SQL-level prepared statements), and all-or-nothing
//! checks of query strings that carry several statements.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::analysis::{Analysis, AnalysisError, SharedAnalysis, Statement};
use crate::policy::{Decision, Policy, SessionFacts, Subject, Verdict};

/// A refusal, ready to be sent as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
    pub hint: Option<String>,
    /// The deciding rule; `None` for the default deny or a parse failure.
    pub rule: Option<Arc<str>>,
    /// Held for approval rather than denied.
    pub held: bool,
}

impl Refusal {
    fn from_decision(d: Decision, index: usize, of: usize) -> Refusal {
        let which = if of > 1 {
            format!(" (statement {} of {of}; none of them ran)", index + 1)
        } else {
            String::new()
        };
        let (sqlstate, message) = match d.verdict {
            Verdict::Hold => (
                "42501",
                format!(
                    "interceptor: statement requires approval{which}: {}",
                    d.reason
                ),
            ),
            _ => (
                "42501",
                format!("interceptor: statement denied{which}: {}", d.reason),
            ),
        };
        Refusal {
            sqlstate,
            message,
            hint: match d.verdict {
                Verdict::Hold => Some(d.hint.unwrap_or_else(|| {
                    "An approver must approve this statement before it runs.".into()
                })),
                _ => d.hint,
            },
            held: d.verdict == Verdict::Hold,
            rule: d.rule,
        }
    }

    pub fn unparseable(e: &AnalysisError) -> Refusal {
        Refusal {
            sqlstate: e.sqlstate(),
            message: format!("interceptor: statement refused because it cannot be analysed: {e}"),
            hint: Some("interceptor only runs statements PostgreSQL's grammar accepts.".into()),
            rule: None,
            held: false,
        }
    }
}

/// The outcome for a whole query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Every statement is allowed; the rules that allowed them, in order.
    Allowed(Arc<[Option<Arc<str>>]>),
    Refused(Refusal),
}

/// Per-session policy state.
pub struct SessionPolicy {
    pub subject: Subject,
    temp_tables: HashSet<String>,
    prepared: HashMap<String, Statement>,
    last_allowed: Option<LastAllowed>,
}

/// The last query string allowed without changing the session, as
/// [`SessionPolicy::check_shared`] remembers it: the same analysis under
/// the same policy, in the same session state, is allowed by the same
/// rules. The rules are kept as one slice this session alone counts
/// references to, so that a hit touches nothing shared with other
/// threads (the rules' names are the policy's, in every session).
struct LastAllowed {
    policy: Arc<Policy>,
    analysis: SharedAnalysis,
    rules: Arc<[Option<Arc<str>>]>,
}

enum Change {
    Temp(String),
    DropTemp(String),
    Prepare(String, Box<Statement>),
    Deallocate(String),
    DiscardTemp,
    DiscardPrepared,
}

impl SessionPolicy {
    pub fn new(subject: Subject) -> Self {
        SessionPolicy {
            subject,
            temp_tables: HashSet::new(),
            prepared: HashMap::new(),
            last_allowed: None,
        }
    }

    /// Checks every statement of a query string; remembers what they leave
    /// behind only when all are allowed (none run otherwise).
    pub fn check(&mut self, policy: &Policy, analysis: &Result<Analysis, AnalysisError>) -> Check {
        self.check_approved(policy, analysis, false)
    }

    /// As [`check`](Self::check); with `approved`, statements that hold
    /// rules catch count as allowed (an approver approved this text).
    pub fn check_approved(
        &mut self,
        policy: &Policy,
        analysis: &Result<Analysis, AnalysisError>,
        approved: bool,
    ) -> Check {
        self.decide_all(policy, analysis, approved).0
    }

    /// As [`check_approved`](Self::check_approved), answered without
    /// deciding when `analysis` is the one last allowed under `policy`
    /// and nothing has changed the session since.
    pub fn check_shared(
        &mut self,
        policy: &Arc<Policy>,
        analysis: &SharedAnalysis,
        approved: bool,
    ) -> Check {
        if let Some(l) = &self.last_allowed
            && !approved
            && Arc::ptr_eq(&l.analysis, analysis)
            && Arc::ptr_eq(&l.policy, policy)
        {
            return Check::Allowed(l.rules.clone());
        }
        let (check, changed) = self.decide_all(policy, analysis, approved);
        if let Check::Allowed(rules) = &check
            && !changed
            && !approved
        {
            self.last_allowed = Some(LastAllowed {
                policy: policy.clone(),
                analysis: analysis.clone(),
                rules: rules.clone(),
            });
        }
        check
    }

    /// The check, and whether it changed the session's state.
    fn decide_all(
        &mut self,
        policy: &Policy,
        analysis: &Result<Analysis, AnalysisError>,
        approved: bool,
    ) -> (Check, bool) {
        let analysis = match analysis {
            Ok(a) => a,
            Err(e) => return (Check::Refused(Refusal::unparseable(e)), false),
        };
        let mut changes = Vec::new();
        let mut rules = Vec::with_capacity(analysis.statements.len());
        let n = analysis.statements.len();
        for (i, st) in analysis.statements.iter().enumerate() {
            let d = self.decide_one(policy, st, &changes);
            if d.verdict != Verdict::Allow && !(approved && d.verdict == Verdict::Hold) {
                return (Check::Refused(Refusal::from_decision(d, i, n)), false);
            }
            rules.push(d.rule);
            self.record(st, &mut changes);
        }
        let changed = !changes.is_empty();
        if changed {
            self.last_allowed = None;
        }
        for c in changes {
            match c {
                Change::Temp(t) => {
                    self.temp_tables.insert(t);
                }
                Change::DropTemp(t) => {
                    self.temp_tables.remove(&t);
                }
                Change::Prepare(name, st) => {
                    self.prepared.insert(name, *st);
                }
                Change::Deallocate(name) => {
                    self.prepared.remove(&name);
                }
                Change::DiscardTemp => self.temp_tables.clear(),
                Change::DiscardPrepared => self.prepared.clear(),
            }
        }
        (Check::Allowed(rules.into()), changed)
    }

    fn is_temp(&self, name: &str, pending: &[Change]) -> bool {
        let bare = match name.split_once('.') {
            Some(("pg_temp", t)) => t,
            Some(_) => return false,
            None => name,
        };
        let mut temp = self.temp_tables.contains(bare);
        for c in pending {
            match c {
                Change::Temp(t) if t == bare => temp = true,
                Change::DropTemp(t) if t == bare => temp = false,
                Change::DiscardTemp => temp = false,
                _ => {}
            }
        }
        temp
    }

    fn prepared_statement<'a>(
        &'a self,
        name: &str,
        pending: &'a [Change],
    ) -> Option<&'a Statement> {
        let mut found = self.prepared.get(name);
        for c in pending {
            match c {
                Change::Prepare(n, st) if n == name => found = Some(st),
                Change::Deallocate(n) if n == name || n.is_empty() => found = None,
                Change::DiscardPrepared => found = None,
                _ => {}
            }
        }
        found
    }

    fn decide_one(&self, policy: &Policy, st: &Statement, pending: &[Change]) -> Decision {
        let mut targets = st.changed_tables().peekable();
        let temporary_only = targets.peek().is_some()
            && targets.all(|t| {
                st.creates_temp
                    .iter()
                    .any(|c| t == c || t.strip_prefix("pg_temp.") == Some(c.as_str()))
                    || self.is_temp(t, pending)
            });
        let d = policy.decide(&self.subject, st, SessionFacts { temporary_only });
        if d.verdict != Verdict::Allow {
            return d;
        }
        if st.read_write && policy.read_only_for(&self.subject) {
            return Decision {
                verdict: Verdict::Deny,
                rule: None,
                reason: "this identity may only read: its sessions are read-only, and READ WRITE \
                         transactions are refused"
                    .into(),
                hint: Some("Leave out READ WRITE.".into()),
            };
        }
        if let Some(name) = &st.executes {
            // EXECUTE runs what PREPARE stored; it keeps the decision the
            // stored statement gets now.
            return match self.prepared_statement(name, pending) {
                Some(inner) => self.decide_one(policy, inner, pending),
                None => Decision {
                    verdict: Verdict::Deny,
                    rule: None,
                    reason: format!(
                        "prepared statement \"{name}\" was not prepared through interceptor in this session"
                    ),
                    hint: Some("PREPARE it in this session first.".into()),
                },
            };
        }
        d
    }

    fn record(&self, st: &Statement, changes: &mut Vec<Change>) {
        if st.discards_temp {
            changes.push(Change::DiscardTemp);
        }
        if st.discards_prepared {
            changes.push(Change::DiscardPrepared);
        }
        for t in &st.creates_temp {
            changes.push(Change::Temp(t.clone()));
        }
        for t in &st.drops_tables {
            let bare = t.strip_prefix("pg_temp.").unwrap_or(t);
            if !bare.contains('.') {
                changes.push(Change::DropTemp(bare.to_owned()));
            }
        }
        if let Some(name) = &st.prepares {
            changes.push(Change::Prepare(name.clone(), Box::new(st.clone())));
        }
        if let Some(name) = &st.deallocates {
            changes.push(Change::Deallocate(name.clone()));
        }
    }
}
