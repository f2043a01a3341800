//! Masking on the backend path: every value the client receives (rows in
//! text and binary format, COPY output, error and notice texts,
//! notification payloads, fast-path function results) passes the
//! session's masks first.
//!
//! The two directions share a queue of the replies the frontend's messages
//! will bring, so each RowDescription, DataRow and CopyData is matched to
//! the statement (and its output-column lineage) that produced it.
//! RowDescriptions are kept per prepared statement and portal; when a
//! driver executes a portal whose row shape nobody asked for, the proxy
//! asks itself (an injected Describe whose reply the client never sees).

pub mod catalog;
pub mod rewrite;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};

use aho_corasick::AhoCorasick;
use bytes::{BufMut, BytesMut};
use policies::analysis::lineage::{Flow, Lineage, LineageCache, StatementLineage, ViewDef};
use policies::masking::{Masks, Relations, Taint, ValueType};

use crate::protocol::build::{ProxyError, frame};
use crate::protocol::frontend::{FrontendMessage, Target};
use catalog::{Catalog, Known};
use rewrite::{Action, Column, CopyFormat, CopyRows, Counts, Field, Malformed};

/// Where a statement's lineage comes from: most results need none (their
/// columns name their tables), so the text waits until one does.
#[derive(Clone)]
enum Source {
    Text(Arc<str>),
    Ready(Arc<Lineage>),
}

/// Whether a text may define or use a name (PREPARE, EXECUTE, DECLARE,
/// FETCH, MOVE, a view and its renaming): its lineage is then needed as it
/// is sent, in order.
fn names_anything(sql: &str) -> bool {
    static WORDS: LazyLock<AhoCorasick> = LazyLock::new(|| {
        any_case(&[
            "prepare", "execute", "declare", "fetch", "move", "view", "rename",
        ])
    });
    WORDS.is_match(sql)
}

/// Views this session defined, by name without schema: every definition
/// each name has had, kept for the session's life (a rollback or a DROP
/// leaves them: only more is masked).
type Views = Arc<HashMap<String, Vec<Arc<ViewDef>>>>;

/// Whether `l` defines or renames a relation that may be a view.
fn touches_views(l: &Lineage) -> bool {
    l.statements
        .iter()
        .any(|st| st.view.is_some() || st.renames.is_some())
}

/// Records the views `l` defines and renames into `views`. A definition
/// sent again (a job that makes its view each run) is kept once.
fn record_views(views: &mut Views, l: &Lineage) {
    fn add(views: &mut Views, name: &str, defs: Vec<Arc<ViewDef>>) {
        let known = views.get(name);
        let new: Vec<_> = defs
            .into_iter()
            .filter(|d| known.is_none_or(|k| !k.contains(d)))
            .collect();
        if !new.is_empty() {
            Arc::make_mut(views)
                .entry(name.to_owned())
                .or_default()
                .extend(new);
        }
    }
    for st in &l.statements {
        if let Some(v) = &st.view {
            add(views, &v.name, vec![Arc::new(v.clone())]);
        }
        if let Some((from, to)) = &st.renames
            && let Some(defs) = views.get(from).cloned()
        {
            add(views, to, defs);
        }
    }
}

/// A searcher for `words` in any ASCII case: a cheap test before lineage,
/// which may be needed only when one of them is in the text.
fn any_case(words: &[&str]) -> AhoCorasick {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(words)
        .expect("a few short literal words")
}

/// A reply the server owes for a frontend message, in order.
enum Expect {
    /// A simple Query (or a FunctionCall): everything until ReadyForQuery.
    Query(Option<Source>),
    /// With the statement's lineage: an error at Parse or Bind (a relation
    /// that does not exist, a constant folded at planning) quotes what it
    /// read.
    Parse(Option<Source>),
    Bind(Option<Source>),
    Close,
    DescribeStatement(Vec<u8>),
    /// `true`: the proxy's own Describe; its reply is not forwarded.
    DescribePortal(Vec<u8>, bool),
    Execute(Vec<u8>),
    Sync,
}

struct Statement {
    lineage: Option<Source>,
    fields: Option<Arc<Vec<Field>>>,
}

/// A statement name no client can use (names are C strings): a portal's
/// statement when the portal was not made by Bind.
const NO_STATEMENT: &[u8] = b"\0";

struct Portal {
    statement: Vec<u8>,
    formats: Vec<i16>,
    fields: Option<Arc<Vec<Field>>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Expect>,
    statements: HashMap<Vec<u8>, Statement>,
    portals: HashMap<Vec<u8>, Portal>,
    views: Views,
}

/// One session's masking: the frontend half, the backend half, and the
/// enforcer's check against laundering.
pub fn session(
    masks: Arc<Masks>,
    lineages: Arc<LineageCache>,
    catalog: Arc<Catalog>,
) -> (FrontMask, BackMask, LaunderCheck) {
    let state = Arc::new(Mutex::new(State::default()));
    let guard = LaunderCheck {
        masks: masks.clone(),
        lineages: lineages.clone(),
        catalog: catalog.clone(),
        state: state.clone(),
    };
    (
        FrontMask {
            state: state.clone(),
            lineage: lineages.clone(),
            defined: HashMap::new(),
            described: HashSet::new(),
        },
        BackMask {
            state,
            masks,
            catalog,
            lineages,
            current: None,
            copy: None,
            counts: Counts::default(),
            flushed: Vec::new(),
            scratch: BytesMut::new(),
            pending: None,
        },
        guard,
    )
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The frontend half: records what each message will bring back.
pub struct FrontMask {
    state: Arc<Mutex<State>>,
    /// Lineage, for column rules and for COPY (its options and output
    /// names).
    lineage: Arc<LineageCache>,
    /// PREPARE and DECLARE CURSOR names, with what they were defined as.
    defined: HashMap<String, StatementLineage>,
    /// Statements (false) and portals (true) whose row shape was asked for.
    described: HashSet<(bool, Vec<u8>)>,
}

impl FrontMask {
    fn lineage_of(&mut self, sql: &[u8]) -> Source {
        let text = String::from_utf8_lossy(sql);
        if !names_anything(&text) {
            return Source::Text(text.into());
        }
        let l = self.lineage.get(&text);
        // "view" also matches texts that only read `reviews`: those take
        // no lock.
        if touches_views(&l) {
            record_views(&mut lock(&self.state).views, &l);
        }
        // EXECUTE and FETCH return what their name was defined as.
        let mut resolved: Option<Lineage> = None;
        for (i, st) in l.statements.iter().enumerate() {
            if let Some(name) = &st.defines {
                self.defined.insert(name.clone(), st.clone());
            }
            if let Some(name) = &st.uses {
                let r = resolved.get_or_insert_with(|| (*l).clone());
                r.statements[i] = match self.defined.get(name) {
                    Some(def) => {
                        let mut d = StatementLineage {
                            defines: None,
                            uses: None,
                            ..def.clone()
                        };
                        // EXECUTE's own arguments may flow into any output.
                        d.all.add(&st.all);
                        for o in d.outputs.iter_mut().flatten() {
                            o.add(&st.all);
                        }
                        for rel in &st.relations {
                            if !d.relations.contains(rel) {
                                d.relations.push(rel.clone());
                            }
                        }
                        d
                    }
                    None => StatementLineage {
                        all: Flow {
                            unknown: true,
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                };
            }
        }
        Source::Ready(resolved.map_or(l, Arc::new))
    }

    /// Bytes to send before `msg` (the proxy's own Describe), if any.
    pub fn inspect(&mut self, msg: &FrontendMessage<'_>) -> Option<BytesMut> {
        match msg {
            FrontendMessage::Query { sql } => {
                let l = self.lineage_of(sql);
                lock(&self.state).queue.push_back(Expect::Query(Some(l)));
            }
            FrontendMessage::FunctionCall(_) => {
                lock(&self.state).queue.push_back(Expect::Query(None));
            }
            FrontendMessage::Parse(p) => {
                let l = self.lineage_of(p.sql);
                self.described.remove(&(false, p.name.to_vec()));
                let mut s = lock(&self.state);
                s.queue.push_back(Expect::Parse(Some(l.clone())));
                s.statements.insert(
                    p.name.to_vec(),
                    Statement {
                        lineage: Some(l),
                        fields: None,
                    },
                );
            }
            FrontendMessage::Bind(b) => {
                self.described.remove(&(true, b.portal.to_vec()));
                let mut s = lock(&self.state);
                let lineage = s
                    .statements
                    .get(b.statement)
                    .and_then(|st| st.lineage.clone());
                s.queue.push_back(Expect::Bind(lineage));
                s.portals.insert(
                    b.portal.to_vec(),
                    Portal {
                        statement: b.statement.to_vec(),
                        formats: b.result_formats().collect(),
                        fields: None,
                    },
                );
            }
            FrontendMessage::Describe { target, name } => {
                let portal = *target == Target::Portal;
                self.described.insert((portal, name.to_vec()));
                lock(&self.state).queue.push_back(if portal {
                    Expect::DescribePortal(name.to_vec(), false)
                } else {
                    Expect::DescribeStatement(name.to_vec())
                });
            }
            FrontendMessage::Execute { portal, .. } => {
                let known = self.described.contains(&(true, portal.to_vec()))
                    || lock(&self.state)
                        .portals
                        .get(*portal)
                        .is_some_and(|p| self.described.contains(&(false, p.statement.clone())));
                let mut s = lock(&self.state);
                let inject = (!known).then(|| {
                    s.queue
                        .push_back(Expect::DescribePortal(portal.to_vec(), true));
                    self.described.insert((true, portal.to_vec()));
                    frame(b'D', |b| {
                        b.put_u8(b'P');
                        b.put_slice(portal);
                        b.put_u8(0);
                    })
                });
                s.queue.push_back(Expect::Execute(portal.to_vec()));
                return inject;
            }
            FrontendMessage::Close { target, name } => {
                self.described
                    .remove(&(*target == Target::Portal, name.to_vec()));
                let mut s = lock(&self.state);
                match target {
                    Target::Statement => {
                        s.statements.remove(*name);
                    }
                    Target::Portal => {
                        s.portals.remove(*name);
                    }
                }
                s.queue.push_back(Expect::Close);
            }
            FrontendMessage::Sync => lock(&self.state).queue.push_back(Expect::Sync),
            _ => {}
        }
        None
    }
}

/// What to do with one backend message.
pub enum Step {
    Keep,
    Replace(BytesMut),
    Drop,
    /// The catalog must be read first: call [`BackMask::resolve`], then
    /// offer the same message again.
    Pause,
}

/// Values masked in one statement's results by one rule, for one column or
/// detector: what the audit trail records (never the values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskCount {
    pub rule: String,
    pub column: String,
    pub detector: String,
    pub count: u64,
}

/// The result being sent: how to treat each column.
struct Current {
    columns: Vec<Column>,
    /// Nothing to mask or scan, and nothing denied: rows go as they are.
    passthrough: bool,
    names: Vec<String>,
    source: Option<Source>,
    /// Errors and notices may quote masked values: withhold their texts
    /// (worked out on the first error or notice).
    withhold: Option<bool>,
    /// A masked column was asked for in binary format under `binary =
    /// "deny"`: the rows are refused with this error.
    deny: Option<String>,
    denied: bool,
}

/// The backend half: rewrites what the client would see.
pub struct BackMask {
    state: Arc<Mutex<State>>,
    masks: Arc<Masks>,
    catalog: Arc<Catalog>,
    lineages: Arc<LineageCache>,
    current: Option<Current>,
    copy: Option<(CopyRows, Vec<String>)>,
    pub counts: Counts,
    /// Counts of a result that ended, for the audit trail to take.
    pub flushed: Vec<MaskCount>,
    scratch: BytesMut,
    /// Relations the catalog must be asked about before going on.
    pending: Option<(Vec<u32>, Vec<String>)>,
}

/// The session's own views `relation` may name: bare, or in pg_temp
/// (where an unqualified name finds a temporary relation first).
fn own_views_named<'v>(views: &'v Views, relation: &str) -> Option<&'v Vec<Arc<ViewDef>>> {
    let bare = match relation.rsplit_once('.') {
        None => relation,
        Some(("pg_temp", n)) => n,
        Some(_) => return None,
    };
    views.get(bare)
}

/// Views, for lineage, as this session's masks see them: the catalog's,
/// and the session's own.
struct SessionViews<'a> {
    masks: &'a Masks,
    catalog: &'a Catalog,
    own: Views,
    depth: std::cell::Cell<u32>,
}

impl<'a> SessionViews<'a> {
    fn new(masks: &'a Masks, catalog: &'a Catalog, own: Views) -> Self {
        SessionViews {
            masks,
            catalog,
            own,
            depth: std::cell::Cell::new(0),
        }
    }

    /// The session's own views named `relation` (bare, or in pg_temp,
    /// where an unqualified name finds a temporary relation first).
    fn own_taints(&self, relation: &str) -> Option<Vec<(String, Taint)>> {
        let defs = own_views_named(&self.own, relation)?;
        if self.depth.get() > 8 {
            return Some(vec![(String::new(), Taint::UNKNOWN)]);
        }
        self.depth.set(self.depth.get() + 1);
        let out = defs
            .iter()
            .flat_map(|d| {
                d.columns
                    .iter()
                    .map(|(n, f)| (n.clone(), self.masks.taint(f, &d.relations, self)))
            })
            .collect();
        self.depth.set(self.depth.get() - 1);
        Some(out)
    }

    fn view_taints(&self, rel: &catalog::Relation) -> Vec<(String, Taint)> {
        let Some(def) = &rel.definition else {
            return Vec::new();
        };
        if self.depth.get() > 8 {
            return rel
                .columns
                .iter()
                .map(|c| (c.clone(), Taint::UNKNOWN))
                .collect();
        }
        self.depth.set(self.depth.get() + 1);
        let out = rel
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let flow = def
                    .outputs
                    .as_ref()
                    .filter(|o| o.len() == rel.columns.len())
                    .map_or(&def.all, |o| &o[i]);
                (c.clone(), self.masks.taint(flow, &def.relations, self))
            })
            .collect();
        self.depth.set(self.depth.get() - 1);
        out
    }
}

impl Relations for SessionViews<'_> {
    fn view_columns(&self, relation: &str) -> Option<Vec<(String, Taint)>> {
        let own = self.own_taints(relation);
        let catalog = match self.catalog.by_name(relation) {
            Known::Found(Some(r)) if r.is_view() => Some(self.view_taints(&r)),
            // It may be a view: whatever it is, every column is unknown.
            Known::Failed => Some(vec![(String::new(), Taint::UNKNOWN)]),
            _ => None,
        };
        match (own, catalog) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            (a, b) => a.or(b),
        }
    }

    fn ancestors(&self, relation: &str) -> Vec<(String, String)> {
        match self.catalog.by_name(relation) {
            Known::Found(Some(r)) => r.ancestors.clone(),
            _ => Vec::new(),
        }
    }
}

fn one_statement(l: &Lineage) -> StatementLineage {
    match l.statements.as_slice() {
        [one] => one.clone(),
        _ => StatementLineage {
            relations: l.relations(),
            all: l.all(),
            ..Default::default()
        },
    }
}

impl BackMask {
    /// Reads the catalog for what the paused message needs.
    pub async fn resolve(&mut self) {
        if let Some((oids, names)) = self.pending.take() {
            self.catalog.load(&oids, &names).await;
        }
    }

    /// Which catalog entries a plan for `fields` needs and lacks.
    fn missing(&mut self, fields: &[Field], lineage: Option<&StatementLineage>) -> bool {
        if !self.masks.by_column {
            return false;
        }
        let mut oids = Vec::new();
        let mut names = Vec::new();
        let mut expressions = false;
        for f in fields {
            if f.table_oid != 0 && f.attnum > 0 {
                match self.catalog.by_oid(f.table_oid) {
                    Known::Missing if !oids.contains(&f.table_oid) => oids.push(f.table_oid),
                    Known::Found(None) => expressions = true,
                    _ => {}
                }
            } else {
                expressions = true;
            }
        }
        if expressions && let Some(l) = lineage {
            for r in &l.relations {
                if matches!(self.catalog.by_name(r), Known::Missing) {
                    names.push(r.clone());
                }
            }
        }
        if oids.is_empty() && names.is_empty() {
            return false;
        }
        self.pending = Some((oids, names));
        true
    }

    fn plan(
        &self,
        fields: &[Field],
        formats: &[i16],
        lineage: Option<&StatementLineage>,
        source: Option<Source>,
    ) -> Current {
        let views = SessionViews::new(&self.masks, &self.catalog, self.own_views());
        let mut deny = None;
        let columns: Vec<Column> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let binary = match formats {
                    [] => f.format == 1,
                    [one] => *one == 1,
                    many => many.get(i) == Some(&1),
                };
                let ty = ValueType::from_oid(f.type_oid);
                let seen = (self.masks.by_column && f.table_oid != 0 && f.attnum > 0)
                    .then(|| self.source_taint(f, &views))
                    .flatten();
                let taint = if !self.masks.by_column {
                    Taint::default()
                } else if let Some(t) = seen {
                    t
                } else {
                    match lineage {
                        Some(l) => {
                            let flow = l
                                .outputs
                                .as_ref()
                                .filter(|o| o.len() == fields.len())
                                .map_or(&l.all, |o| &o[i]);
                            self.masks.taint(flow, &l.relations, &views)
                        }
                        None => Taint::UNKNOWN,
                    }
                };
                let rule = self
                    .masks
                    .rule_for(&taint)
                    .or_else(|| self.masks.name_rule(&f.name));
                let action = match rule {
                    Some(r) => {
                        if binary
                            && ty == ValueType::Other
                            && self.masks.rule(r).binary == policies::masking::BinaryAction::Deny
                        {
                            deny.get_or_insert_with(|| {
                                format!(
                                    "interceptor: column \"{}\" is masked (rule {}) and cannot be sent in binary format",
                                    f.name,
                                    self.masks.rule(r).id
                                )
                            });
                        }
                        Action::Mask(r)
                    }
                    None if self.masks.scanner().is_some()
                        && ValueType::may_hold_findings(f.type_oid) =>
                    {
                        Action::Scan
                    }
                    None => Action::Clear,
                };
                Column { action, ty, binary }
            })
            .collect();
        Current {
            passthrough: deny.is_none() && columns.iter().all(|c| c.action == Action::Clear),
            columns,
            names: fields.iter().map(|f| f.name.clone()).collect(),
            source,
            withhold: None,
            deny,
            denied: false,
        }
    }

    /// What a column of a relation carries, from the catalog; `None` when
    /// the catalog does not see the relation (see [`Self::unseen`]).
    fn source_taint(&self, f: &Field, views: &SessionViews<'_>) -> Option<Taint> {
        let unknown = Taint::UNKNOWN;
        Some(match self.catalog.by_oid(f.table_oid) {
            Known::Found(Some(rel)) => {
                let i = (f.attnum - 1) as usize;
                if rel.is_view() {
                    views.view_taints(&rel).get(i).map_or(unknown, |(_, t)| *t)
                } else {
                    match rel.columns.get(i) {
                        Some(col) => {
                            let mut rules =
                                self.masks.column_rules(Some(&rel.schema), &rel.name, col);
                            for (schema, name) in &rel.ancestors {
                                rules |= self.masks.column_rules(Some(schema), name, col);
                            }
                            Taint {
                                rules,
                                ..Default::default()
                            }
                        }
                        None => unknown,
                    }
                }
            }
            Known::Found(None) => return None,
            Known::Missing | Known::Failed => unknown,
        })
    }

    /// Where the lineage of the statement at the front of the queue is.
    fn front_source(&self) -> Option<Source> {
        let s = lock(&self.state);
        match s.queue.front()? {
            Expect::Query(l) | Expect::Parse(l) | Expect::Bind(l) => l.clone(),
            Expect::Execute(portal) | Expect::DescribePortal(portal, _) => {
                let p = s.portals.get(portal)?;
                s.statements.get(&p.statement)?.lineage.clone()
            }
            Expect::DescribeStatement(name) => s.statements.get(name)?.lineage.clone(),
            _ => None,
        }
    }

    fn lineage_of(&self, source: &Source) -> StatementLineage {
        match source {
            Source::Text(t) => one_statement(&self.lineages.get(t)),
            Source::Ready(l) => one_statement(l),
        }
    }

    /// A column of a relation the catalog connection does not see: made in
    /// the client's open transaction. Its values came through statements
    /// checked against laundering, or are the client's own; lineage says
    /// what flows into it (a view of the session's own, say).
    fn unseen(&self, f: &Field) -> bool {
        matches!(self.catalog.by_oid(f.table_oid), Known::Found(None))
    }

    /// The lineage a plan for `fields` needs: only expression columns
    /// (table OID 0), and columns of relations the catalog does not see,
    /// need the statement's.
    fn lineage_for(&self, fields: &[Field], source: Option<&Source>) -> Option<StatementLineage> {
        let expressions = fields
            .iter()
            .any(|f| f.table_oid == 0 || f.attnum <= 0 || self.unseen(f));
        if expressions && self.masks.by_column {
            source.map(|s| self.lineage_of(s))
        } else {
            None
        }
    }

    fn own_views(&self) -> Views {
        lock(&self.state).views.clone()
    }

    /// Whether the statement reads masked data (or lineage cannot tell).
    fn reads_masked(&self, source: Option<&Source>) -> bool {
        if !self.masks.by_column {
            return false;
        }
        match source {
            Some(s) => {
                let l = self.lineage_of(s);
                let views = SessionViews::new(&self.masks, &self.catalog, self.own_views());
                !self.masks.taint(&l.all, &l.relations, &views).is_clean()
            }
            None => true,
        }
    }

    fn withhold(&mut self) -> bool {
        if let Some(c) = &self.current {
            if let Some(w) = c.withhold {
                return w;
            }
            let w = self.reads_masked(c.source.as_ref());
            if let Some(c) = &mut self.current {
                c.withhold = Some(w);
            }
            return w;
        }
        self.reads_masked(self.front_source().as_ref())
    }

    /// Moves the counts so far into `flushed`, with names for the audit.
    fn flush_counts(&mut self) {
        if self.counts.entries.is_empty() {
            return;
        }
        let names = self
            .current
            .as_ref()
            .map(|c| c.names.as_slice())
            .or(self.copy.as_ref().map(|c| c.1.as_slice()))
            .unwrap_or_default();
        for ((rule, column, detector), count) in std::mem::take(&mut self.counts.entries) {
            self.flushed.push(MaskCount {
                rule: if rule == rewrite::WITHHELD {
                    "(message text withheld)".into()
                } else {
                    self.masks.rule(rule).id.to_string()
                },
                column: column
                    .and_then(|i| names.get(usize::from(i)))
                    .cloned()
                    .unwrap_or_default(),
                detector: detector.map(|d| d.name().to_owned()).unwrap_or_default(),
                count,
            });
        }
    }

    /// Pops replies up to and including the next ReadyForQuery's owner.
    fn ready(&mut self) {
        let mut s = lock(&self.state);
        while let Some(e) = s.queue.pop_front() {
            if matches!(e, Expect::Sync | Expect::Query(_)) {
                break;
            }
        }
        self.current = None;
        self.copy = None;
    }

    /// After an ErrorResponse in an extended batch, the server skips to Sync.
    fn skip_to_sync(&mut self) {
        let mut s = lock(&self.state);
        while let Some(e) = s.queue.front() {
            if matches!(e, Expect::Sync | Expect::Query(_)) {
                break;
            }
            s.queue.pop_front();
        }
        self.current = None;
        self.copy = None;
    }

    pub fn on(&mut self, frame_bytes: &[u8]) -> Result<Step, Malformed> {
        let replaced = |o: Option<BytesMut>| o.map_or(Step::Keep, Step::Replace);
        Ok(match frame_bytes[0] {
            b'D' => {
                if self.current.is_none() && !self.start_execute()? {
                    return Ok(Step::Pause);
                }
                let cur = self
                    .current
                    .as_mut()
                    .ok_or(Malformed("DataRow outside a result"))?;
                if cur.passthrough {
                    return Ok(Step::Keep);
                }
                if let Some(msg) = &cur.deny {
                    if cur.denied {
                        return Ok(Step::Drop);
                    }
                    cur.denied = true;
                    let mut out = BytesMut::new();
                    ProxyError::error("42501", msg.clone())
                        .with_hint("Request the column in text format, or leave it out.")
                        .encode(&mut out);
                    return Ok(Step::Replace(out));
                }
                // Rewritten rows reuse one buffer: the relay copies each
                // out before the next is written.
                if rewrite::data_row(
                    frame_bytes,
                    &cur.columns,
                    &self.masks,
                    &mut self.counts,
                    &mut self.scratch,
                )? {
                    Step::Replace(self.scratch.split())
                } else {
                    Step::Keep
                }
            }
            b'T' => {
                let fields =
                    rewrite::row_description(frame_bytes).ok_or(Malformed("RowDescription"))?;
                let source = self.front_source();
                let lineage = self.lineage_for(&fields, source.as_ref());
                if self.missing(&fields, lineage.as_ref()) {
                    return Ok(Step::Pause);
                }
                let mut s = lock(&self.state);
                match s.queue.front() {
                    Some(Expect::DescribeStatement(name)) => {
                        let name = name.clone();
                        if let Some(st) = s.statements.get_mut(&name) {
                            st.fields = Some(Arc::new(fields));
                        }
                        s.queue.pop_front();
                        Step::Keep
                    }
                    Some(Expect::DescribePortal(portal, injected)) => {
                        let (portal, injected) = (portal.clone(), *injected);
                        // A portal no Bind made (a cursor DECLAREd in SQL)
                        // has no statement this session knows of.
                        s.portals
                            .entry(portal)
                            .or_insert_with(|| Portal {
                                statement: NO_STATEMENT.to_vec(),
                                formats: Vec::new(),
                                fields: None,
                            })
                            .fields = Some(Arc::new(fields));
                        s.queue.pop_front();
                        if injected { Step::Drop } else { Step::Keep }
                    }
                    _ => {
                        drop(s);
                        self.current = Some(self.plan(&fields, &[], lineage.as_ref(), source));
                        Step::Keep
                    }
                }
            }
            b'n' => {
                let mut s = lock(&self.state);
                match s.queue.front() {
                    Some(Expect::DescribePortal(_, true)) => {
                        s.queue.pop_front();
                        Step::Drop
                    }
                    Some(Expect::DescribePortal(..) | Expect::DescribeStatement(_)) => {
                        s.queue.pop_front();
                        Step::Keep
                    }
                    _ => Step::Keep,
                }
            }
            b'1' | b'2' | b'3' => {
                let mut s = lock(&self.state);
                if matches!(
                    s.queue.front(),
                    Some(Expect::Parse(_) | Expect::Bind(_) | Expect::Close)
                ) {
                    s.queue.pop_front();
                }
                Step::Keep
            }
            b'C' | b'I' | b's' => {
                self.flush_counts();
                let denied = self.current.as_ref().is_some_and(|c| c.denied);
                self.current = None;
                self.copy = None;
                let mut s = lock(&self.state);
                if matches!(s.queue.front(), Some(Expect::Execute(_))) {
                    s.queue.pop_front();
                }
                if denied { Step::Drop } else { Step::Keep }
            }
            b'E' => {
                let withhold = self.withhold();
                let out =
                    rewrite::error_fields(frame_bytes, &self.masks, withhold, &mut self.counts)?;
                self.flush_counts();
                let simple = matches!(lock(&self.state).queue.front(), Some(Expect::Query(_)));
                if simple {
                    self.current = None;
                    self.copy = None;
                } else {
                    self.skip_to_sync();
                }
                replaced(out)
            }
            b'N' => {
                let withhold = self.withhold();
                replaced(rewrite::error_fields(
                    frame_bytes,
                    &self.masks,
                    withhold,
                    &mut self.counts,
                )?)
            }
            b'A' => replaced(rewrite::notification(
                frame_bytes,
                &self.masks,
                &mut self.counts,
            )?),
            b'V' => replaced(rewrite::function_result(
                frame_bytes,
                &self.masks,
                &mut self.counts,
            )?),
            b'H' => {
                if !self.start_copy(frame_bytes)? {
                    return Ok(Step::Pause);
                }
                Step::Keep
            }
            b'd' => match &mut self.copy {
                Some((rows, _)) => {
                    replaced(rows.copy_data(frame_bytes, &self.masks, &mut self.counts)?)
                }
                None => Step::Keep,
            },
            b'c' => {
                // Counted while the COPY's column names are known.
                self.flush_counts();
                self.copy = None;
                Step::Keep
            }
            b'Z' => {
                self.flush_counts();
                self.ready();
                Step::Keep
            }
            _ => Step::Keep,
        })
    }

    /// The first DataRow of an Execute: the plan from the portal's row
    /// shape. `false`: the catalog must be read first.
    fn start_execute(&mut self) -> Result<bool, Malformed> {
        let (fields, formats, source) = {
            let s = lock(&self.state);
            let Some(Expect::Execute(portal)) = s.queue.front() else {
                return Err(Malformed("DataRow without a RowDescription"));
            };
            let p = s
                .portals
                .get(portal)
                .ok_or(Malformed("DataRow for an unknown portal"))?;
            let st = s.statements.get(&p.statement);
            // A portal's own description carries its formats; a
            // statement's says text for all, and Bind's formats apply.
            let (fields, formats) = match (&p.fields, st.and_then(|st| st.fields.clone())) {
                (Some(f), _) => (f.clone(), Vec::new()),
                (None, Some(f)) => (f, p.formats.clone()),
                (None, None) => {
                    return Err(Malformed("DataRow for a portal of unknown row shape"));
                }
            };
            (fields, formats, st.and_then(|st| st.lineage.clone()))
        };
        let lineage = self.lineage_for(&fields, source.as_ref());
        if self.missing(&fields, lineage.as_ref()) {
            return Ok(false);
        }
        self.current = Some(self.plan(&fields, &formats, lineage.as_ref(), source));
        Ok(true)
    }

    /// CopyOutResponse: the plan for COPY's rows. `false`: the catalog must
    /// be read first.
    fn start_copy(&mut self, frame_bytes: &[u8]) -> Result<bool, Malformed> {
        let mut r = crate::protocol::Reader::new(&frame_bytes[5..]);
        let overall = r.u8().ok_or(Malformed("CopyOutResponse format"))?;
        let n = r.i16().ok_or(Malformed("CopyOutResponse columns"))?.max(0) as usize;
        let source = self.front_source();
        let lineage = source.as_ref().map(|s| self.lineage_of(s));
        let options = lineage
            .as_ref()
            .map(|l| l.copy_options.clone())
            .unwrap_or_default();
        let format = CopyFormat::from_options(&options, overall == 1);
        let header = options
            .iter()
            .any(|(k, v)| k == "header" && !matches!(v.as_str(), "false" | "0" | "off"));
        let binary = overall == 1;
        // COPY table TO: its columns by name from the catalog.
        let names = lineage
            .as_ref()
            .map(|l| l.names.clone())
            .unwrap_or_default();
        let mut fields: Vec<Field> = (0..n)
            .map(|i| Field {
                name: names.get(i).cloned().unwrap_or_default(),
                table_oid: 0,
                attnum: 0,
                type_oid: 25,
                format: i16::from(binary),
            })
            .collect();
        if let Some((table, listed)) = lineage.as_ref().and_then(|l| l.copy_table.clone())
            && self.masks.by_column
        {
            match self.catalog.by_name(&table) {
                Known::Missing => {
                    self.pending = Some((Vec::new(), vec![table]));
                    return Ok(false);
                }
                Known::Found(Some(rel)) => {
                    let names: Vec<String> = if listed.is_empty() {
                        rel.columns
                            .iter()
                            .filter(|c| !c.is_empty())
                            .cloned()
                            .collect()
                    } else {
                        listed
                    };
                    let oid = rel.oid;
                    for (f, name) in fields.iter_mut().zip(names) {
                        f.attnum = rel
                            .columns
                            .iter()
                            .position(|c| *c == name)
                            .map_or(0, |p| p as i16 + 1);
                        f.table_oid = if f.attnum > 0 { oid } else { 0 };
                        f.name = name;
                    }
                }
                Known::Found(None) | Known::Failed => {}
            }
        }
        let plan_lineage = lineage.as_ref().map(|l| {
            if l.copy_table.is_some() {
                // Unresolved columns of COPY table fall back to all it reads.
                StatementLineage {
                    outputs: None,
                    ..l.clone()
                }
            } else {
                l.clone()
            }
        });
        if self.missing(&fields, plan_lineage.as_ref()) {
            return Ok(false);
        }
        let plan = self.plan(&fields, &[], plan_lineage.as_ref(), source);
        self.copy = Some((
            CopyRows {
                format,
                columns: plan.columns,
                header,
                binary_header: binary,
            },
            plan.names,
        ));
        Ok(true)
    }
}

/// Refuses statements that would store masked data where masking cannot
/// follow it: into a table (`INSERT ... SELECT api_key`, `CREATE TEMP
/// TABLE AS`, `SELECT INTO`, UPDATE, MERGE), a setting (`set_config`) or a
/// notification (`pg_notify`). Read back later, such a value would carry
/// the new table's or setting's name, not its source column's.
pub struct LaunderCheck {
    masks: Arc<Masks>,
    lineages: Arc<LineageCache>,
    catalog: Arc<Catalog>,
    /// For the session's own views, and those defined earlier in the same
    /// text.
    state: Arc<Mutex<State>>,
}

/// Whether a text may store values.
fn may_store(sql: &str) -> bool {
    static WORDS: LazyLock<AhoCorasick> = LazyLock::new(|| {
        any_case(&[
            "insert",
            "update",
            "merge",
            "create",
            "into",
            "notify",
            "set_config",
        ])
    });
    WORDS.is_match(sql)
}

impl LaunderCheck {
    /// The relations a text that may store values reads (through the
    /// session's own views too) that the catalog has not looked up: until
    /// it has, a permanent view among them would be taken for a table,
    /// and what it reads from masked columns would pass.
    pub fn lookups(&self, sql: &str) -> Vec<String> {
        let Some((lineage, own)) = self.storing(sql) else {
            return Vec::new();
        };
        let mut todo: Vec<&str> = lineage
            .statements
            .iter()
            .filter(|st| !st.stores.is_empty())
            .flat_map(|st| st.relations.iter().map(String::as_str))
            .collect();
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        while let Some(name) = todo.pop() {
            if !seen.insert(name) {
                continue;
            }
            if let Some(defs) = own_views_named(&own, name) {
                todo.extend(
                    defs.iter()
                        .flat_map(|d| d.relations.iter().map(String::as_str)),
                );
            }
            if matches!(self.catalog.by_name(name), Known::Missing) {
                missing.push(name.to_owned());
            }
        }
        missing
    }

    /// For a text that may store values: its lineage, and the session's
    /// views with those it defines itself.
    fn storing(&self, sql: &str) -> Option<(Arc<Lineage>, Views)> {
        if !self.masks.by_column || !may_store(sql) {
            return None;
        }
        let lineage = self.lineages.get(sql);
        let mut own = lock(&self.state).views.clone();
        if touches_views(&lineage) {
            record_views(&mut own, &lineage);
        }
        Some((lineage, own))
    }

    /// Looks `names` up in the catalog (see [`lookups`](Self::lookups)).
    pub async fn look_up(&self, names: &[String]) {
        self.catalog.load(&[], names).await;
    }

    /// The refusal for `sql`, when it would store masked data.
    pub fn check(&self, sql: &str) -> Option<policies::Refusal> {
        let (lineage, own) = self.storing(sql)?;
        let views = SessionViews::new(&self.masks, &self.catalog, own);
        for st in &lineage.statements {
            for flow in &st.stores {
                let taint = self.masks.taint(flow, &st.relations, &views);
                if let Some(rule) = self.masks.rule_for(&taint) {
                    let id = self.masks.rule(rule).id.clone();
                    return Some(policies::Refusal {
                        sqlstate: "42501",
                        message: format!(
                            "interceptor: statement denied: it would store masked data (mask `{id}`) in a table, a setting or a notification, where masking cannot follow it"
                        ),
                        hint: Some(
                            "Read the masked columns with a SELECT: their values come back masked."
                                .into(),
                        ),
                        rule: Some(id),
                        held: false,
                    });
                }
            }
        }
        None
    }
}

/// The key behind keyed masking (`hmac`, `format-preserving`), kept at
/// `state_dir/masking.key` and made on first start: the same value masks
/// the same way across sessions and restarts, so joins still work.
pub fn load_key(state_dir: &std::path::Path) -> std::io::Result<policies::masking::MaskKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("masking.key");
    match std::fs::read(&path) {
        Ok(key) if key.len() >= 16 => return Ok(policies::masking::MaskKey::from_bytes(&key)),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} holds fewer than 16 bytes; delete it to have a new key made",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(state_dir)?;
    let key: [u8; 32] = rand::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(&key)?;
    f.sync_all()?;
    Ok(policies::masking::MaskKey::from_bytes(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_recorded_once_and_follow_renames() {
        let mut views = Views::default();
        let def = |sql: &str| policies::analysis::lineage::lineage(sql).unwrap();
        let v = def("CREATE TEMP VIEW v AS SELECT api_key AS k FROM secrets");
        record_views(&mut views, &v);
        record_views(&mut views, &v);
        assert_eq!(views["v"].len(), 1);
        record_views(
            &mut views,
            &def("CREATE OR REPLACE TEMP VIEW v AS SELECT 1 AS k"),
        );
        assert_eq!(views["v"].len(), 2);
        record_views(&mut views, &def("ALTER VIEW v RENAME TO w"));
        assert_eq!(views["w"].len(), 2);
        // A rename of what is not one of the session's views records nothing.
        record_views(&mut views, &def("ALTER TABLE t RENAME TO u"));
        assert!(!views.contains_key("u"));
    }
}
