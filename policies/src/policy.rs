//! Policy as code: a TOML file of identity groups and ordered rules.
//!
//! The first rule that matches a statement decides it. A statement no rule
//! matches is denied: the default is deny, and it cannot be changed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use globset::{Glob, GlobMatcher};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::analysis::{Kind, Opaque, Statement};
use crate::principal::Principal;

/// A policy file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version; must be 1.
    pub version: u32,
    /// Functions (globs on `schema.name`, or `name` for the search path)
    /// whose code policy trusts: they count as reads, not as opaque code.
    #[serde(default)]
    pub trusted_functions: Vec<String>,
    /// Trust DO blocks. Off by default: a DO block can do anything.
    #[serde(default)]
    pub trust_do_blocks: bool,
    /// Refuse sessions without a verified OIDC token (SQLSTATE 28000, with
    /// why the token was missing or rejected).
    #[serde(default)]
    pub require_token: bool,
    /// Identity groups. A principal belongs to every group it matches.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSpec>,
    /// Ordered rules; the first that matches decides.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
    /// Per-identity limits. Every `[[limit]]` whose groups the principal is
    /// in applies; where several set the same limit, the smallest wins.
    #[serde(default, rename = "limit")]
    pub limits: Vec<LimitSpec>,
    /// Record statement texts in the audit trail with their literal values
    /// replaced by `$1`, `$2`...: what ran stays visible, the values (which
    /// may be personal data or secrets) do not. A rule's own
    /// `redact_literals` overrides this for the statements it decides.
    #[serde(default)]
    pub redact_literals: bool,
    /// Masking: values the identity may read but not see in clear. Every
    /// `[[mask]]` that applies to a session masks what it matches.
    #[serde(default, rename = "mask")]
    pub masks: Vec<crate::masking::MaskSpec>,
}

/// Limits on what one identity may do.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// The principal is in at least one of these groups. Empty: anyone.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Statements per second across all of the identity's sessions
    /// (sessions share one budget per token subject, job, or user). Excess
    /// statements wait their turn; they are not refused.
    #[serde(default)]
    pub statements_per_second: Option<f64>,
    /// How many statements may run at once before pacing starts
    /// (default: one second's worth).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Rows one statement may return (DataRow messages, and COPY TO STDOUT
    /// rows). Beyond it the rest of the result is withheld and the
    /// statement ends with SQLSTATE 54000.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// Bytes of row data one statement may return; as `max_rows`.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

/// The limits that apply to one subject.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// (statements per second, burst)
    pub rate: Option<(f64, u32)>,
    pub max_rows: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.rate.is_none() && self.max_rows.is_none() && self.max_bytes.is_none()
    }
}

/// Who is in a group. Every field given must match; a list matches when any
/// of its globs does. A group with no fields holds everyone.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    /// PostgreSQL user names the client logged in as.
    #[serde(default)]
    pub users: Vec<String>,
    /// Unix user ids of the intercepted process.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Process names (comm) of the intercepted process.
    #[serde(default)]
    pub comms: Vec<String>,
    /// Executable paths of the intercepted process.
    #[serde(default)]
    pub exes: Vec<String>,
    /// cgroup paths of the intercepted process.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Job names given to `interceptor run --job`.
    #[serde(default)]
    pub jobs: Vec<String>,
    /// True: only connections the kernel redirected; false: only
    /// connections made to a listener directly.
    #[serde(default)]
    pub intercepted: Option<bool>,
    /// CI variables captured by `interceptor run` (unverified: the job's
    /// own environment), e.g. `{ GITHUB_REPOSITORY = ["org/*"] }`.
    #[serde(default)]
    pub ci: BTreeMap<String, Vec<String>>,
    /// Claims of the session's verified OIDC token, e.g.
    /// `{ repository = ["acme/*"], ref = ["refs/heads/main"] }`. An array
    /// claim (`groups`) matches when any of its values does. A group with
    /// claims never holds a session without a verified token.
    #[serde(default)]
    pub claims: BTreeMap<String, Vec<String>>,
}

/// One rule. Every condition given must hold for the rule to match.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Named in audit rows, denials and `policy explain`.
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The principal is in at least one of these groups. Empty: anyone.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Target names (globs). Empty: any.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Database names (globs). Empty: any.
    #[serde(default)]
    pub databases: Vec<String>,
    /// Statement kinds. Empty: any.
    #[serde(default)]
    pub kinds: Vec<Kind>,
    /// Top-level commands, e.g. `insert`, `select`, `create`; `upsert` is
    /// INSERT ... ON CONFLICT DO UPDATE. Empty: any.
    #[serde(default)]
    pub commands: Vec<String>,
    /// Every table read matches one of these globs.
    #[serde(default)]
    pub reads: Option<Vec<String>>,
    /// Every table written, created, altered or dropped matches one of
    /// these globs.
    #[serde(default)]
    pub writes: Option<Vec<String>>,
    /// Every table the statement writes, creates, alters or drops is a
    /// temporary table of this session (and there is at least one).
    #[serde(default)]
    pub temporary_only: bool,
    /// Every function called that is not a pure built-in matches one of
    /// these globs.
    #[serde(default)]
    pub functions: Option<Vec<String>>,
    /// Every setting changed matches one of these globs.
    #[serde(default)]
    pub settings: Option<Vec<String>>,
    pub decision: Verdict,
    /// Why; shown to the client on deny and hold.
    #[serde(default)]
    pub reason: Option<String>,
    /// What the agent can do instead; shown as the error's HINT.
    #[serde(default)]
    pub hint: Option<String>,
    /// Redact literals from the audited text of the statements this rule
    /// decides (default: the policy's `redact_literals`).
    #[serde(default)]
    pub redact_literals: Option<bool>,
    /// Hold rules: who may approve, by approver group (the daemon's
    /// `[[approvals.approver]]` groups). Empty: any approver.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// Hold rules: how many distinct approvers must approve (default 1).
    #[serde(default)]
    pub approvals: Option<u32>,
}

/// What a held statement needs before it runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApprovalNeeds {
    /// Approver groups, any of which qualifies; empty: any approver.
    pub groups: Vec<String>,
    /// Distinct approvers needed.
    pub count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    Hold,
}

/// A policy file that failed to load, with where.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

fn glob(p: &str) -> Result<GlobMatcher, String> {
    Glob::new(p)
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("bad pattern {p:?}: {e}"))
}

fn globs(ps: &[String]) -> Result<Vec<GlobMatcher>, String> {
    ps.iter().map(|p| glob(p)).collect()
}

fn keyed_globs(
    m: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<(String, Vec<GlobMatcher>)>, String> {
    m.iter().map(|(k, v)| Ok((k.clone(), globs(v)?))).collect()
}

fn any(ms: &[GlobMatcher], s: &str) -> bool {
    ms.iter().any(|m| m.is_match(s))
}

struct Group {
    name: String,
    users: Vec<GlobMatcher>,
    uids: Vec<u32>,
    comms: Vec<GlobMatcher>,
    exes: Vec<GlobMatcher>,
    cgroups: Vec<GlobMatcher>,
    jobs: Vec<GlobMatcher>,
    intercepted: Option<bool>,
    ci: Vec<(String, Vec<GlobMatcher>)>,
    claims: Vec<(String, Vec<GlobMatcher>)>,
}

impl Group {
    fn holds(&self, p: &Principal) -> bool {
        fn field(ms: &[GlobMatcher], v: Option<&str>) -> bool {
            ms.is_empty() || v.is_some_and(|v| any(ms, v))
        }
        field(&self.users, Some(&p.user))
            && (self.uids.is_empty() || p.uid.is_some_and(|u| self.uids.contains(&u)))
            && field(&self.comms, p.comm.as_deref())
            && field(&self.exes, p.exe.as_deref())
            && field(&self.cgroups, p.cgroup.as_deref())
            && field(&self.jobs, p.job.as_deref())
            && self.intercepted.is_none_or(|i| i == p.intercepted)
            && self
                .ci
                .iter()
                .all(|(k, ms)| field(ms, p.ci.get(k).map(String::as_str)))
            && (self.claims.is_empty()
                || p.token.as_ref().is_some_and(|t| {
                    self.claims.iter().all(|(k, ms)| {
                        t.claims
                            .get(k)
                            .is_some_and(|vs| vs.iter().any(|v| any(ms, v)))
                    })
                }))
    }
}

struct Rule {
    /// `spec.id`, shared with every decision it makes.
    id: Arc<str>,
    spec: RuleSpec,
    groups: Vec<usize>,
    targets: Vec<GlobMatcher>,
    databases: Vec<GlobMatcher>,
    reads: Option<Vec<GlobMatcher>>,
    writes: Option<Vec<GlobMatcher>>,
    functions: Option<Vec<GlobMatcher>>,
    settings: Option<Vec<GlobMatcher>>,
}

/// A loaded, checked policy.
pub struct Policy {
    pub source: String,
    groups: Vec<Group>,
    rules: Vec<Rule>,
    trusted: Vec<GlobMatcher>,
    trust_do_blocks: bool,
    require_token: bool,
    /// Each `[[limit]]` with its groups resolved.
    limits: Vec<(Vec<usize>, LimitSpec)>,
    redact_literals: bool,
    masks: Vec<Arc<crate::masking::MaskRule>>,
}

/// Where a session stands: its principal's groups, target and database.
#[derive(Debug, Clone)]
pub struct Subject {
    pub groups: Vec<usize>,
    pub group_names: Vec<String>,
    pub target: String,
    pub database: String,
}

/// Facts about one statement that depend on the session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionFacts {
    /// Every table the statement writes or changes is a session temp table.
    pub temporary_only: bool,
}

/// The outcome for one statement, with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The deciding rule's id; `None` is the default deny.
    pub rule: Option<Arc<str>>,
    /// Why, for deny and hold; empty for allow.
    pub reason: String,
    pub hint: Option<String>,
}

fn strip_public(name: &str) -> &str {
    name.strip_prefix("public.").unwrap_or(name)
}

fn tables_match<'a>(ms: &[GlobMatcher], mut tables: impl Iterator<Item = &'a String>) -> bool {
    tables.all(|t| any(ms, t) || any(ms, strip_public(t)))
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a policy; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let at = |offset: Option<usize>, message: String| {
            let (line, column) = offset.map_or((0, 0), |o| line_col(text, o));
            PolicyError::Invalid {
                path: origin.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: PolicyFile = toml::from_str(text)
            .map_err(|e| at(e.span().map(|s| s.start), e.message().to_owned()))?;
        // Semantic errors point at the offending name in the text.
        let find = |needle: &str| text.find(needle);
        if file.version != 1 {
            return Err(at(
                find("version"),
                format!(
                    "unsupported version {}; this interceptor reads version 1",
                    file.version
                ),
            ));
        }
        let mut groups = Vec::new();
        for g in &file.groups {
            if groups.iter().any(|x: &Group| x.name == g.name) {
                return Err(at(
                    find(&format!("\"{}\"", g.name)),
                    format!("group {:?} is defined twice", g.name),
                ));
            }
            let err = |m| {
                at(
                    find(&format!("\"{}\"", g.name)),
                    format!("group {:?}: {m}", g.name),
                )
            };
            groups.push(Group {
                name: g.name.clone(),
                users: globs(&g.users).map_err(err)?,
                uids: g.uids.clone(),
                comms: globs(&g.comms).map_err(err)?,
                exes: globs(&g.exes).map_err(err)?,
                cgroups: globs(&g.cgroups).map_err(err)?,
                jobs: globs(&g.jobs).map_err(err)?,
                intercepted: g.intercepted,
                ci: keyed_globs(&g.ci).map_err(err)?,
                claims: keyed_globs(&g.claims).map_err(err)?,
            });
        }
        let mut rules: Vec<Rule> = Vec::new();
        for r in &file.rules {
            let err = |m: String| {
                at(
                    find(&format!("\"{}\"", r.id)),
                    format!("rule {:?}: {m}", r.id),
                )
            };
            if rules.iter().any(|x| x.spec.id == r.id) {
                return Err(err("the id is used twice".into()));
            }
            let mut ids = Vec::new();
            for name in &r.groups {
                let i = groups
                    .iter()
                    .position(|g| g.name == *name)
                    .ok_or_else(|| err(format!("unknown group {name:?}")))?;
                ids.push(i);
            }
            if r.decision != Verdict::Allow && r.reason.is_none() {
                return Err(err("a deny or hold rule needs a `reason`".into()));
            }
            if r.decision != Verdict::Hold && (!r.approvers.is_empty() || r.approvals.is_some()) {
                return Err(err(
                    "`approvers` and `approvals` apply only to hold rules".into()
                ));
            }
            if r.approvals == Some(0) {
                return Err(err("`approvals` must be at least 1".into()));
            }
            let opt = |v: &Option<Vec<String>>| v.as_deref().map(globs).transpose();
            rules.push(Rule {
                id: r.id.as_str().into(),
                groups: ids,
                targets: globs(&r.targets).map_err(&err)?,
                databases: globs(&r.databases).map_err(&err)?,
                reads: opt(&r.reads).map_err(&err)?,
                writes: opt(&r.writes).map_err(&err)?,
                functions: opt(&r.functions).map_err(&err)?,
                settings: opt(&r.settings).map_err(&err)?,
                spec: r.clone(),
            });
        }
        let mut limits = Vec::new();
        for (n, l) in file.limits.iter().enumerate() {
            let err = |m: String| at(find("[[limit]]"), format!("limit #{}: {m}", n + 1));
            let mut ids = Vec::new();
            for name in &l.groups {
                ids.push(
                    groups
                        .iter()
                        .position(|g| g.name == *name)
                        .ok_or_else(|| err(format!("unknown group {name:?}")))?,
                );
            }
            if l.statements_per_second
                .is_some_and(|r| !(r.is_finite() && r > 0.0))
            {
                return Err(err("statements_per_second must be a positive number".into()));
            }
            if l.burst == Some(0) || l.max_rows == Some(0) || l.max_bytes == Some(0) {
                return Err(err("limits must be at least 1".into()));
            }
            limits.push((ids, l.clone()));
        }
        let mut masks: Vec<Arc<crate::masking::MaskRule>> = Vec::new();
        if file.masks.len() > crate::masking::MAX_RULES {
            return Err(at(
                find("[[mask]]"),
                format!(
                    "{} masks; a policy may have at most {}",
                    file.masks.len(),
                    crate::masking::MAX_RULES
                ),
            ));
        }
        for m in &file.masks {
            let err = |e: String| {
                at(
                    find(&format!("\"{}\"", m.id)),
                    format!("mask {:?}: {e}", m.id),
                )
            };
            if masks.iter().any(|x| *x.id == *m.id) {
                return Err(err("the id is used twice".into()));
            }
            let rule = crate::masking::MaskRule::compile(m, |name| {
                groups.iter().position(|g| g.name == name)
            })
            .map_err(err)?;
            masks.push(Arc::new(rule));
        }
        Ok(Policy {
            masks,
            redact_literals: file.redact_literals,
            require_token: file.require_token,
            limits,
            source: origin.to_owned(),
            groups,
            rules,
            trusted: globs(&file.trusted_functions)
                .map_err(|m| at(find("trusted_functions"), m))?,
            trust_do_blocks: file.trust_do_blocks,
        })
    }

    /// The groups `p` belongs to, and where the session goes.
    pub fn subject(&self, p: &Principal, target: &str, database: &str) -> Subject {
        let groups: Vec<usize> = (0..self.groups.len())
            .filter(|&i| self.groups[i].holds(p))
            .collect();
        Subject {
            group_names: groups
                .iter()
                .map(|&i| self.groups[i].name.clone())
                .collect(),
            groups,
            target: target.to_owned(),
            database: database.to_owned(),
        }
    }

    /// The masks that apply to a subject, with the key that keyed
    /// strategies use.
    pub fn masks_for(&self, s: &Subject, key: crate::masking::MaskKey) -> crate::masking::Masks {
        let rules = self
            .masks
            .iter()
            .filter(|r| r.applies_to(&s.groups))
            .cloned()
            .collect();
        crate::masking::Masks::new(rules, key)
    }

    /// Whether the policy masks anything for anyone.
    pub fn has_masks(&self) -> bool {
        !self.masks.is_empty()
    }

    /// Whether sessions must present a verified OIDC token.
    pub fn require_token(&self) -> bool {
        self.require_token
    }

    /// Whether the audit trail records a statement decided by `rule` (none:
    /// the default decision) with its literals redacted.
    pub fn redacts(&self, rule: Option<&str>) -> bool {
        rule.and_then(|id| self.rules.iter().find(|r| &*r.id == id))
            .and_then(|r| r.spec.redact_literals)
            .unwrap_or(self.redact_literals)
    }

    /// What the hold rule `rule` asks of its approvers.
    pub fn approval_needs(&self, rule: Option<&str>) -> ApprovalNeeds {
        let spec = rule
            .and_then(|id| self.rules.iter().find(|r| &*r.id == id))
            .map(|r| &r.spec);
        ApprovalNeeds {
            groups: spec.map(|s| s.approvers.clone()).unwrap_or_default(),
            count: spec.and_then(|s| s.approvals).unwrap_or(1),
        }
    }

    /// The per-identity limits for a subject: the smallest of every
    /// matching `[[limit]]`.
    pub fn limits_for(&self, s: &Subject) -> Limits {
        fn min<T: PartialOrd + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if b < a { b } else { a }),
                (a, b) => a.or(b),
            }
        }
        let mut out = Limits::default();
        for (groups, l) in &self.limits {
            if !groups.is_empty() && !groups.iter().any(|g| s.groups.contains(g)) {
                continue;
            }
            if let Some(rate) = l.statements_per_second {
                let burst = l.burst.unwrap_or((rate.ceil() as u32).max(1));
                out.rate = Some(match out.rate {
                    Some((r, b)) => (r.min(rate), b.min(burst)),
                    None => (rate, burst),
                });
            }
            out.max_rows = min(out.max_rows, l.max_rows);
            out.max_bytes = min(out.max_bytes, l.max_bytes);
        }
        out
    }

    /// The statement's kind once trusted code is taken at its word.
    pub fn effective_kind(&self, st: &Statement) -> Kind {
        let trusted = st.opaque.iter().all(|o| match o {
            Opaque::DoBlock => self.trust_do_blocks,
            Opaque::Function(n) | Opaque::Procedure(n) | Opaque::QueryText(n) => {
                any(&self.trusted, n)
            }
        });
        if trusted {
            st.base_kind.unwrap_or(Kind::Read)
        } else {
            Kind::Privilege
        }
    }

    /// Whether any allowing rule lets this subject do more than read: if
    /// not, the upstream session is opened read-only.
    pub fn read_only_for(&self, s: &Subject) -> bool {
        !self.rules.iter().any(|r| {
            r.spec.decision != Verdict::Deny
                && self.subject_matches(r, s)
                && (r.spec.kinds.is_empty()
                    || r.spec
                        .kinds
                        .iter()
                        .any(|k| !matches!(k, Kind::Read | Kind::Session | Kind::Transaction)))
        })
    }

    fn subject_matches(&self, r: &Rule, s: &Subject) -> bool {
        (r.groups.is_empty() || r.groups.iter().any(|g| s.groups.contains(g)))
            && (r.targets.is_empty() || any(&r.targets, &s.target))
            && (r.databases.is_empty() || any(&r.databases, &s.database))
    }

    fn statement_matches(&self, r: &Rule, st: &Statement, kind: Kind, facts: SessionFacts) -> bool {
        let spec = &r.spec;
        if !spec.kinds.is_empty() && !spec.kinds.contains(&kind) {
            return false;
        }
        if !spec.commands.is_empty() && !spec.commands.contains(&st.command) {
            return false;
        }
        if let Some(ms) = &r.reads
            && !tables_match(ms, st.reads.iter())
        {
            return false;
        }
        if let Some(ms) = &r.writes
            && !tables_match(ms, st.changed_tables())
        {
            return false;
        }
        if spec.temporary_only && !facts.temporary_only {
            return false;
        }
        // A function that writes (setval, nextval...) writes where no
        // table list can see: a rule that allows writes only to some
        // tables does not cover it, unless it names the function too.
        if (r.writes.is_some() || spec.temporary_only)
            && r.functions.is_none()
            && st
                .functions
                .iter()
                .any(|(_, c)| *c == crate::analysis::FunctionClass::Writes)
        {
            return false;
        }
        if let Some(ms) = &r.functions
            && !st
                .functions
                .iter()
                .filter(|(_, c)| *c != crate::analysis::FunctionClass::Pure)
                .all(|(n, _)| any(ms, n))
        {
            return false;
        }
        if let Some(ms) = &r.settings
            && !st.settings.iter().all(|n| any(ms, n))
        {
            return false;
        }
        true
    }

    /// Decides one statement for a subject.
    pub fn decide(&self, s: &Subject, st: &Statement, facts: SessionFacts) -> Decision {
        let kind = self.effective_kind(st);
        for r in &self.rules {
            if self.subject_matches(r, s) && self.statement_matches(r, st, kind, facts) {
                let spec = &r.spec;
                // Allows run per statement on the data path: they carry the
                // rule id only. Deny and hold rules always have a reason.
                let reason = match spec.decision {
                    Verdict::Allow => String::new(),
                    _ => format!(
                        "{} ({})",
                        spec.reason.as_deref().unwrap_or_default(),
                        describe(st, kind)
                    ),
                };
                return Decision {
                    verdict: spec.decision,
                    rule: Some(r.id.clone()),
                    reason,
                    hint: spec.hint.clone(),
                };
            }
        }
        let why = describe(st, kind);
        let allowed: Vec<&str> = Kind::ALL
            .iter()
            .filter(|k| {
                self.rules.iter().any(|r| {
                    r.spec.decision == Verdict::Allow
                        && self.subject_matches(r, s)
                        && r.spec.kinds.contains(k)
                })
            })
            .map(|k| k.as_str())
            .collect();
        Decision {
            verdict: Verdict::Deny,
            rule: None,
            reason: format!("no policy rule allows this {kind} statement: {why}"),
            hint: Some(if allowed.is_empty() {
                "This identity may not run any statements; ask an operator to add a policy rule."
                    .to_owned()
            } else {
                format!(
                    "This identity may run {} statements (within the policy's limits); ask an operator if you need more.",
                    allowed.join(", ")
                )
            }),
        }
    }
}

/// One line on what a statement does, for denials and `policy explain`.
pub fn describe(st: &Statement, kind: Kind) -> String {
    let mut parts = Vec::new();
    if !st.opaque.is_empty() && kind == Kind::Privilege {
        let o: Vec<String> = st.opaque.iter().map(ToString::to_string).collect();
        parts.push(format!(
            "runs code interceptor cannot inspect ({})",
            o.join(", ")
        ));
    }
    let mut reasons: Vec<&str> = st
        .reasons
        .iter()
        .map(String::as_str)
        .filter(|r| *r != "reads only")
        .collect();
    reasons.dedup();
    parts.extend(reasons.iter().map(|r| r.to_string()));
    let changed: Vec<&str> = st
        .writes
        .iter()
        .chain(&st.ddl)
        .map(String::as_str)
        .collect();
    if !changed.is_empty() {
        parts.push(format!("touches {}", changed.join(", ")));
    }
    if parts.is_empty() {
        parts.push(st.command.clone());
    }
    parts.join("; ")
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The JSON schema of the policy file.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PolicyFile)).expect("schema is JSON")
}
