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
    /// What this session's allowed statements created and have not
    /// dropped. Not always what the server has (a CREATE may fail or be
    /// rolled back, an `ON COMMIT DROP` table goes at commit): statements
    /// allowed because of them are sent with the names pinned to pg_temp
    /// (see [`take_pins`](Self::take_pins)), so that the server refuses
    /// them when the table is not there.
    temp_tables: HashSet<String>,
    temp_views: HashSet<String>,
    /// Every name this session has created a temporary table or view
    /// under. A name used for both is refused for the second: the session
    /// could otherwise take for a table what the server has as a view over
    /// permanent tables (a DROP and CREATE rolled back), and a write
    /// through a view writes the tables it reads.
    ever_tables: HashSet<String>,
    ever_views: HashSet<String>,
    prepared: HashMap<String, Statement>,
    last_allowed: Option<LastAllowed>,
    /// The temporary relations the last allowed query string changes.
    pins: Vec<String>,
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
    pins: Vec<String>,
}

enum Change {
    Temp(String),
    TempView(String),
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
            temp_views: HashSet::new(),
            ever_tables: HashSet::new(),
            ever_views: HashSet::new(),
            prepared: HashMap::new(),
            last_allowed: None,
            pins: Vec::new(),
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
            self.pins.clone_from(&l.pins);
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
                pins: self.pins.clone(),
            });
        }
        check
    }

    /// The temporary tables and views the query string last allowed
    /// changes, which it must name as `pg_temp.name` when it is sent
    /// (see [`crate::pin_temp`]); empty for most.
    pub fn take_pins(&mut self) -> Vec<String> {
        std::mem::take(&mut self.pins)
    }

    /// The check, and whether it changed the session's state.
    fn decide_all(
        &mut self,
        policy: &Policy,
        analysis: &Result<Analysis, AnalysisError>,
        approved: bool,
    ) -> (Check, bool) {
        self.pins.clear();
        let analysis = match analysis {
            Ok(a) => a,
            Err(e) => return (Check::Refused(Refusal::unparseable(e)), false),
        };
        let mut changes = Vec::new();
        let mut rules = Vec::with_capacity(analysis.statements.len());
        let n = analysis.statements.len();
        for (i, st) in analysis.statements.iter().enumerate() {
            let targets = self.temp_targets(st, &changes);
            let d = self.decide_one(policy, st, targets.is_some(), &changes);
            if d.verdict != Verdict::Allow && !(approved && d.verdict == Verdict::Hold) {
                self.pins.clear();
                return (Check::Refused(Refusal::from_decision(d, i, n)), false);
            }
            rules.push(d.rule);
            // What the statement creates needs no pin: it names itself
            // temporary.
            for t in targets.into_iter().flatten() {
                let created = st.creates_temp.contains(&t) || st.creates_temp_views.contains(&t);
                if !created && !self.pins.contains(&t) {
                    self.pins.push(t);
                }
            }
            self.record(st, &mut changes);
        }
        let changed = !changes.is_empty();
        if changed {
            self.last_allowed = None;
        }
        for c in changes {
            match c {
                Change::Temp(t) => {
                    self.ever_tables.insert(t.clone());
                    self.temp_tables.insert(t);
                }
                Change::TempView(t) => {
                    self.ever_views.insert(t.clone());
                    self.temp_views.insert(t);
                }
                Change::DropTemp(t) => {
                    self.temp_tables.remove(&t);
                    self.temp_views.remove(&t);
                }
                Change::Prepare(name, st) => {
                    self.prepared.insert(name, *st);
                }
                Change::Deallocate(name) => {
                    self.prepared.remove(&name);
                }
                Change::DiscardTemp => {
                    self.temp_tables.clear();
                    self.temp_views.clear();
                }
                Change::DiscardPrepared => self.prepared.clear(),
            }
        }
        (Check::Allowed(rules.into()), changed)
    }

    /// Whether `bare` is a temporary table (or, with `view`, view) of the
    /// session, after the `pending` changes of earlier statements of the
    /// query string.
    fn is_temp(&self, bare: &str, view: bool, pending: &[Change]) -> bool {
        let mut temp = if view {
            self.temp_views.contains(bare)
        } else {
            self.temp_tables.contains(bare)
        };
        for c in pending {
            match c {
                Change::Temp(t) if t == bare && !view => temp = true,
                Change::TempView(t) if t == bare && view => temp = true,
                Change::DropTemp(t) if t == bare => temp = false,
                Change::DiscardTemp => temp = false,
                _ => {}
            }
        }
        temp
    }

    /// Whether the session has ever created `bare` as a temporary table
    /// (or, with `view`, view), counting `st` and the `pending` changes.
    fn ever(&self, bare: &str, view: bool, st: &Statement, pending: &[Change]) -> bool {
        let (set, own) = if view {
            (&self.ever_views, &st.creates_temp_views)
        } else {
            (&self.ever_tables, &st.creates_temp)
        };
        set.contains(bare)
            || own.iter().any(|t| t == bare)
            || pending.iter().any(|c| match c {
                Change::Temp(t) => !view && t == bare,
                Change::TempView(t) => view && t == bare,
                _ => false,
            })
    }

    /// The names `st` changes, unqualified, when every one is a temporary
    /// table or view of this session (or one `st` creates); `None` when
    /// any is not, or it changes nothing. A view counts for DDL (its own
    /// CREATE and DROP), never as a table written.
    fn temp_targets(&self, st: &Statement, pending: &[Change]) -> Option<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        for t in st.changed_tables() {
            let bare = match t.split_once('.') {
                Some(("pg_temp", b)) => b,
                Some(_) => return None,
                None => t.as_str(),
            };
            let table = (st.creates_temp.iter().any(|c| c == bare)
                || self.is_temp(bare, false, pending))
                && !self.ever(bare, true, st, pending);
            let view = (st.creates_temp_views.iter().any(|c| c == bare)
                || self.is_temp(bare, true, pending))
                && !st.writes.contains(t)
                && !self.ever(bare, false, st, pending);
            if !(table || view) {
                return None;
            }
            if !names.iter().any(|n| n == bare) {
                names.push(bare.to_owned());
            }
        }
        (!names.is_empty()).then_some(names)
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

    /// `temporary_only`: every table `st` changes is one of the session's
    /// temporary tables (see [`temp_targets`](Self::temp_targets)).
    fn decide_one(
        &self,
        policy: &Policy,
        st: &Statement,
        temporary_only: bool,
        pending: &[Change],
    ) -> Decision {
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
                Some(inner) => {
                    let temporary_only = self.temp_targets(inner, pending).is_some();
                    self.decide_one(policy, inner, temporary_only, pending)
                }
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
        for t in &st.creates_temp_views {
            changes.push(Change::TempView(t.clone()));
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
