//! Output-column lineage: for each column a statement returns, which
//! source columns may flow into it.
//!
//! RowDescription names a result column's table and attribute only when
//! the column is a plain column reference. An expression, an alias of a
//! subquery's expression, an aggregate, a whole-row value or the result of
//! a function carries table OID 0, and masking by source column would miss
//! it. Lineage closes that gap from the statement's parse tree. It is
//! conservative: an unqualified name may belong to any relation the
//! statement reads, a whole-row reference or `*` carries every column of
//! its relation, and whatever cannot be followed (query text that is not a
//! literal) is marked unknown, which masking treats as masked.

use std::collections::HashMap;

use serde_json::Value;

use super::catalog::{FunctionClass, classify_function, runs_query_text};
use super::{AnalysisError, syntax};

/// What may flow into one value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    /// Column references: (base relation if the reference names one,
    /// column). `None`: any relation of the statement.
    pub columns: Vec<(Option<String>, String)>,
    /// Relations whose whole row (or `*`) flows in.
    pub whole: Vec<String>,
    /// Lineage cannot follow what flows in.
    pub unknown: bool,
    /// Code that lineage cannot see into (a function that is not a
    /// built-in) computes the value.
    pub opaque: bool,
}

impl Flow {
    /// Adds what flows in `o`.
    pub fn add(&mut self, o: &Flow) {
        for c in &o.columns {
            if !self.columns.contains(c) {
                self.columns.push(c.clone());
            }
        }
        for w in &o.whole {
            if !self.whole.contains(w) {
                self.whole.push(w.clone());
            }
        }
        self.unknown |= o.unknown;
        self.opaque |= o.opaque;
    }
}

/// One statement's lineage.
#[derive(Debug, Clone, Default)]
pub struct StatementLineage {
    /// Every base relation the statement reads, as written (`schema.name`
    /// or `name`).
    pub relations: Vec<String>,
    /// Each output column's flow, when the statement returns rows and its
    /// columns can be listed (a top-level `*` cannot be without the
    /// catalog: then `None`).
    pub outputs: Option<Vec<Flow>>,
    /// The output columns' names, as PostgreSQL names them (for results
    /// that carry no RowDescription: COPY).
    pub names: Vec<String>,
    /// Everything the statement reads, anywhere: what an error, a notice or
    /// an unlisted column may carry.
    pub all: Flow,
    /// `COPY table [(columns)] TO`: the table and the listed columns
    /// (empty: all).
    pub copy_table: Option<(String, Vec<String>)>,
    /// COPY's options as written (`format`, `delimiter`, `null`, `header`...).
    pub copy_options: Vec<(String, String)>,
    /// Values the statement stores where masking cannot follow them: into
    /// a table (INSERT, UPDATE, MERGE, CREATE TABLE AS, SELECT INTO), a
    /// setting (`set_config`) or a notification (`pg_notify`). Masked data
    /// in one of these is laundered, so masking refuses the statement.
    pub stores: Vec<Flow>,
    /// `PREPARE name` or `DECLARE name CURSOR`: results of the name later
    /// (`EXECUTE`, `FETCH`) have this statement's lineage.
    pub defines: Option<String>,
    /// `EXECUTE name` or `FETCH ... name`: the results are those of what
    /// `name` was defined as.
    pub uses: Option<String>,
    /// `CREATE [TEMP] VIEW`: what its columns carry.
    pub view: Option<ViewDef>,
    /// `ALTER ... name RENAME TO new`: a relation's new name.
    pub renames: Option<(String, String)>,
}

/// A view as its defining statement shows it. Results that read a view
/// the catalog cannot show (one in the session's own temporary schema,
/// which another connection's search path does not reach, or one made in
/// a transaction that is still open) are masked by this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewDef {
    /// As written, without its schema.
    pub name: String,
    /// Each column's name and what flows into it; one unnamed entry,
    /// standing for every column, when they cannot be listed (`*`).
    pub columns: Vec<(String, Flow)>,
    /// The relations its query reads.
    pub relations: Vec<String>,
}

/// A query string's lineage, a statement at a time.
#[derive(Debug, Clone, Default)]
pub struct Lineage {
    pub statements: Vec<StatementLineage>,
}

impl Lineage {
    /// Everything any statement reads.
    pub fn all(&self) -> Flow {
        let mut f = Flow::default();
        for s in &self.statements {
            f.add(&s.all);
        }
        f
    }

    pub fn relations(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in &self.statements {
            for r in &s.relations {
                if !v.contains(r) {
                    v.push(r.clone());
                }
            }
        }
        v
    }
}

/// Lineages by statement text, shared by sessions: drivers send the same
/// statements again and again. A text that does not parse gets a lineage
/// that is all unknown (policy refuses it anyway).
pub struct LineageCache {
    cache: std::sync::Mutex<lru::LruCache<Box<str>, std::sync::Arc<Lineage>>>,
}

impl LineageCache {
    pub fn new(capacity: usize) -> Self {
        let capacity = std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN);
        LineageCache {
            cache: std::sync::Mutex::new(lru::LruCache::new(capacity)),
        }
    }

    pub fn get(&self, sql: &str) -> std::sync::Arc<Lineage> {
        let lock = || self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = lock().get(sql) {
            return hit.clone();
        }
        let l = std::sync::Arc::new(lineage(sql).unwrap_or_else(|_| Lineage {
            statements: vec![StatementLineage {
                all: Flow {
                    unknown: true,
                    ..Default::default()
                },
                ..Default::default()
            }],
        }));
        lock().put(sql.into(), l.clone());
        l
    }
}

/// The lineage of every statement in `sql`.
pub fn lineage(sql: &str) -> Result<Lineage, AnalysisError> {
    lineage_at_depth(sql, 0)
}

/// pg_query's SubLinkType values.
const SUBLINK_EXISTS: i64 = 1;
const SUBLINK_EXPR: i64 = 5;
const SUBLINK_ARRAY: i64 = 7;

/// Query text inside query text is followed this deep, then unknown.
const MAX_TEXT_DEPTH: u32 = 4;

fn lineage_at_depth(sql: &str, depth: u32) -> Result<Lineage, AnalysisError> {
    // Deep trees need the big stack the full parse already runs on.
    super::on_parse_stack(|| {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::default()).map_err(syntax)?;
        let mut statements = Vec::new();
        for raw in &parsed.protobuf.stmts {
            let Some(stmt) = &raw.stmt else { continue };
            let tree = serde_json::to_value(stmt)
                .map_err(|e| AnalysisError::Resources(format!("parse tree: {e}")))?;
            statements.push(Walker::new(&tree, depth).statement(&tree));
        }
        Ok(Lineage { statements })
    })
}

/// The node's type and body: `{"node": {"T": body}}` or `{"T": body}`.
fn node(v: &Value) -> Option<(&str, &Value)> {
    let v = v.get("node").unwrap_or(v);
    let m = v.as_object()?;
    if m.len() != 1 {
        return None;
    }
    m.iter().next().map(|(k, b)| (k.as_str(), b))
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| match node(n) {
                    Some(("String", s)) => s.get("sval")?.as_str().map(str::to_owned),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn str_field<'a>(v: &'a Value, f: &str) -> &'a str {
    v.get(f).and_then(Value::as_str).unwrap_or_default()
}

fn list<'a>(v: &'a Value, f: &str) -> &'a [Value] {
    v.get(f)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A DML statement's RETURNING expressions (PostgreSQL 18 keeps them in a
/// ReturningClause).
fn returning(body: &Value) -> &[Value] {
    body.get("returning_clause")
        .map(|r| list(r, "exprs"))
        .unwrap_or_default()
}

/// A string literal, possibly cast (`'secrets'::regclass`).
fn literal(v: &Value) -> Option<&str> {
    match node(v)? {
        ("AConst", c) => c.get("val")?.get("Sval")?.get("sval")?.as_str(),
        ("TypeCast", c) => literal(c.get("arg")?),
        _ => None,
    }
}

/// Built-ins that read a whole table named by their first argument.
fn reads_named_table(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    matches!(
        bare,
        "table_to_xml" | "table_to_xmlschema" | "table_to_xml_and_xmlschema"
    )
}

/// Built-ins that read every table of a schema or database.
fn reads_every_table(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    bare.starts_with("schema_to_xml") || bare.starts_with("database_to_xml")
}

/// A subquery or CTE in FROM: its output columns by name.
type Derived = Vec<(String, Flow)>;

struct Walker<'t> {
    depth: u32,
    /// Base relations as written.
    relations: Vec<String>,
    /// Alias (or bare name) to base relation.
    aliases: HashMap<String, String>,
    /// Base relations whose columns were renamed by an alias list.
    renamed: Vec<String>,
    /// Subqueries and CTEs by alias or name, with their trees.
    derived_trees: Vec<(String, &'t Value, Vec<String>)>,
    derived: HashMap<String, Derived>,
}

impl<'t> Walker<'t> {
    fn new(tree: &'t Value, depth: u32) -> Walker<'t> {
        let mut w = Walker {
            depth,
            relations: Vec::new(),
            aliases: HashMap::new(),
            renamed: Vec::new(),
            derived_trees: Vec::new(),
            derived: HashMap::new(),
        };
        let mut ctes = Vec::new();
        collect_ctes(tree, &mut ctes);
        for (name, query, cols) in ctes {
            w.derived_trees.push((name, query, cols));
        }
        w.collect_from(tree);
        // Each pass follows one more level of subqueries in subqueries:
        // repeat until nothing changes.
        for _ in 0..=w.derived_trees.len() {
            let mut next = HashMap::new();
            for (name, query, cols) in &w.derived_trees {
                let mut outs = w.select_outputs_named(query);
                for (i, c) in cols.iter().enumerate() {
                    if let Some(o) = outs.get_mut(i) {
                        o.0 = c.clone();
                    }
                }
                next.insert(name.clone(), outs);
            }
            if next == w.derived {
                break;
            }
            w.derived = next;
        }
        w
    }

    fn collect_from(&mut self, v: &'t Value) {
        match v {
            Value::Object(m) => {
                if let Some(rv) = m.get("RangeVar") {
                    let rel = str_field(rv, "relname").to_owned();
                    let schema = str_field(rv, "schemaname");
                    let alias = rv.get("alias").filter(|a| !a.is_null());
                    let is_cte =
                        schema.is_empty() && self.derived_trees.iter().any(|(n, _, _)| *n == rel);
                    if is_cte {
                        if let Some(a) = alias {
                            let name = str_field(a, "aliasname").to_owned();
                            if let Some(d) = self
                                .derived_trees
                                .iter()
                                .find(|(n, _, _)| *n == rel)
                                .cloned()
                            {
                                let cols = strings(a.get("colnames").unwrap_or(&Value::Null));
                                self.derived_trees.push((
                                    name,
                                    d.1,
                                    if cols.is_empty() { d.2 } else { cols },
                                ));
                            }
                        }
                    } else {
                        let full = if schema.is_empty() {
                            rel.clone()
                        } else {
                            format!("{schema}.{rel}")
                        };
                        if !self.relations.contains(&full) {
                            self.relations.push(full.clone());
                        }
                        self.aliases.insert(rel, full.clone());
                        if let Some(a) = alias {
                            self.aliases
                                .insert(str_field(a, "aliasname").to_owned(), full.clone());
                            if !list(a, "colnames").is_empty() {
                                self.renamed.push(full);
                            }
                        }
                    }
                }
                if let Some(rs) = m.get("RangeSubselect")
                    && let Some(q) = rs.get("subquery")
                {
                    let alias = rs.get("alias").filter(|a| !a.is_null());
                    let name = alias.map(|a| str_field(a, "aliasname")).unwrap_or_default();
                    let cols = alias
                        .and_then(|a| a.get("colnames"))
                        .map(strings)
                        .unwrap_or_default();
                    self.derived_trees.push((name.to_owned(), q, cols));
                }
                for child in m.values() {
                    self.collect_from(child);
                }
            }
            Value::Array(a) => {
                for child in a {
                    self.collect_from(child);
                }
            }
            _ => {}
        }
    }

    fn statement(&self, tree: &Value) -> StatementLineage {
        let mut out = StatementLineage {
            relations: self.relations.clone(),
            all: self.flow(tree),
            ..Default::default()
        };
        self.stores(tree, &mut out.stores);
        let Some((kind, body)) = node(tree) else {
            out.all.unknown = true;
            return out;
        };
        match kind {
            "SelectStmt" => {
                out.names = self.output_names(body);
                out.outputs = self.select_outputs(body);
            }
            "PrepareStmt" => {
                out.defines = Some(str_field(body, "name").to_owned());
                out.outputs = body.get("query").and_then(|q| self.query_outputs(q));
            }
            "DeclareCursorStmt" => {
                out.defines = Some(str_field(body, "portalname").to_owned());
                out.outputs = body.get("query").and_then(|q| self.query_outputs(q));
            }
            "ExecuteStmt" => out.uses = Some(str_field(body, "name").to_owned()),
            "ViewStmt" => {
                let name = body
                    .get("view")
                    .map(|v| str_field(v, "relname"))
                    .unwrap_or_default()
                    .to_owned();
                let aliases = strings(body.get("aliases").unwrap_or(&Value::Null));
                let query = body.get("query").unwrap_or(&Value::Null);
                let listed = match node(query) {
                    Some(("SelectStmt", b)) => self.select_outputs_inner(b),
                    _ => None,
                };
                let columns = match listed {
                    Some(cols) => cols
                        .into_iter()
                        .enumerate()
                        .map(|(i, (n, f))| (aliases.get(i).cloned().unwrap_or(n), f))
                        .collect(),
                    None => vec![(String::new(), self.flow(query))],
                };
                let relations = self
                    .relations
                    .iter()
                    .filter(|r| r.rsplit('.').next() != Some(name.as_str()))
                    .cloned()
                    .collect();
                out.view = Some(ViewDef {
                    name,
                    columns,
                    relations,
                });
            }
            "RenameStmt" => {
                if let Some(rv) = body.get("relation").filter(|r| !r.is_null())
                    && str_field(body, "subname").is_empty()
                    && !str_field(body, "newname").is_empty()
                {
                    out.renames = Some((
                        str_field(rv, "relname").to_owned(),
                        str_field(body, "newname").to_owned(),
                    ));
                }
            }
            "FetchStmt" => out.uses = Some(str_field(body, "portalname").to_owned()),
            "CopyStmt" => {
                out.copy_options = copy_options(body);
                match body.get("query").filter(|q| !q.is_null()) {
                    Some(q) => {
                        if let Some(("SelectStmt", b)) = node(q) {
                            out.names = self.output_names(b);
                        }
                        out.outputs = self.query_outputs(q);
                    }
                    None => {
                        if let Some(rv) = body.get("relation") {
                            let rel = str_field(rv, "relname");
                            let schema = str_field(rv, "schemaname");
                            let full = if schema.is_empty() {
                                rel.to_owned()
                            } else {
                                format!("{schema}.{rel}")
                            };
                            let cols = strings(body.get("attlist").unwrap_or(&Value::Null));
                            out.all.whole.push(full.clone());
                            out.copy_table = Some((full, cols));
                        }
                    }
                }
            }
            // A plan holds the statement's own text, names from the
            // catalog and the planner's estimates and counts, never a
            // row's value. Only code lineage cannot see into (which the
            // planner may run on constants) or query text could put data
            // in it.
            "ExplainStmt" => {
                out.names = vec!["QUERY PLAN".into()];
                out.outputs = Some(vec![Flow {
                    unknown: out.all.unknown,
                    opaque: out.all.opaque,
                    ..Default::default()
                }]);
            }
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                let returning = returning(body);
                if !returning.is_empty() {
                    out.outputs = self.targets(returning);
                }
            }
            _ => {}
        }
        out
    }

    /// Every place in the tree that stores values: what flows into each.
    fn stores(&self, v: &Value, out: &mut Vec<Flow>) {
        match v {
            Value::Object(m) => {
                for (kind, body) in m {
                    let stored = match kind.as_str() {
                        "InsertStmt" => body.get("select_stmt").map(|q| self.flow(q)),
                        "UpdateStmt" => Some(self.flow(&serde_json::json!([
                            body.get("target_list"),
                            body.get("from_clause")
                        ]))),
                        "MergeStmt" => Some(self.flow(body)),
                        // CREATE TABLE AS EXECUTE stores what a prepared
                        // statement returns, which this text cannot show.
                        "CreateTableAsStmt" => body.get("query").map(|q| match node(q) {
                            Some(("ExecuteStmt", _)) => Flow {
                                unknown: true,
                                ..Flow::default()
                            },
                            _ => self.flow(q),
                        }),
                        "SelectStmt" if body.get("into_clause").is_some_and(|i| !i.is_null()) => {
                            Some(self.flow(body))
                        }
                        // EXECUTE's arguments may be stored by what it runs.
                        "ExecuteStmt" => {
                            Some(self.flow(body.get("params").unwrap_or(&Value::Null)))
                        }
                        "FuncCall" => {
                            let name =
                                strings(body.get("funcname").unwrap_or(&Value::Null)).join(".");
                            let bare = name.strip_prefix("pg_catalog.").unwrap_or(&name);
                            matches!(bare, "pg_notify" | "set_config")
                                .then(|| self.flow(body.get("args").unwrap_or(&Value::Null)))
                        }
                        _ => None,
                    };
                    if let Some(f) = stored
                        && (!f.columns.is_empty() || !f.whole.is_empty() || f.unknown)
                    {
                        out.push(f);
                    }
                }
                for child in m.values() {
                    self.stores(child, out);
                }
            }
            Value::Array(a) => {
                for child in a {
                    self.stores(child, out);
                }
            }
            _ => {}
        }
    }

    /// A query node (SelectStmt, or a DML statement with RETURNING).
    fn query_outputs(&self, q: &Value) -> Option<Vec<Flow>> {
        match node(q)? {
            ("SelectStmt", body) => self.select_outputs(body),
            ("InsertStmt" | "UpdateStmt" | "DeleteStmt", body) => self.targets(returning(body)),
            _ => None,
        }
    }

    fn output_names(&self, s: &Value) -> Vec<String> {
        self.select_outputs_inner(s)
            .map(|v| v.into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default()
    }

    fn select_outputs(&self, s: &Value) -> Option<Vec<Flow>> {
        self.select_outputs_inner(s)
            .map(|v| v.into_iter().map(|(_, f)| f).collect())
    }

    /// A subquery's outputs by name; an unlisted `*` carries all it reads.
    fn select_outputs_named(&self, q: &Value) -> Derived {
        let body = match node(q) {
            Some(("SelectStmt", b)) => b,
            _ => q,
        };
        match self.select_outputs_inner(body) {
            Some(v) => v,
            None => vec![(String::new(), self.flow(body))],
        }
    }

    fn select_outputs_inner(&self, s: &Value) -> Option<Vec<(String, Flow)>> {
        // 1 is SETOP_NONE; UNION, INTERSECT and EXCEPT merge by position.
        if s.get("op").and_then(Value::as_i64).unwrap_or(1) != 1 {
            let l = self.select_outputs_inner(s.get("larg")?)?;
            let r = self.select_outputs_inner(s.get("rarg")?)?;
            if l.len() != r.len() {
                return None;
            }
            return Some(
                l.into_iter()
                    .zip(r)
                    .map(|((n, mut a), (_, b))| {
                        a.add(&b);
                        (n, a)
                    })
                    .collect(),
            );
        }
        let values = list(s, "values_lists");
        if !values.is_empty() {
            let mut cols: Vec<(String, Flow)> = Vec::new();
            for row in values {
                let items = match node(row) {
                    Some(("List", l)) => list(l, "items"),
                    _ => return None,
                };
                for (i, item) in items.iter().enumerate() {
                    let f = self.value_flow(item);
                    match cols.get_mut(i) {
                        Some(c) => c.1.add(&f),
                        None => cols.push((format!("column{}", i + 1), f)),
                    }
                }
            }
            return Some(cols);
        }
        let targets = list(s, "target_list");
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let Some(("ResTarget", rt)) = node(t) else {
                return None;
            };
            let val = rt.get("val")?;
            if let Some(("ColumnRef", c)) = node(val)
                && list(c, "fields")
                    .last()
                    .is_some_and(|f| matches!(node(f), Some(("AStar", _))))
            {
                // `*` expands to columns only the catalog can list.
                return None;
            }
            let name = match str_field(rt, "name") {
                "" => default_name(val),
                n => n.to_owned(),
            };
            out.push((name, self.value_flow(val)));
        }
        Some(out)
    }

    fn targets(&self, targets: &[Value]) -> Option<Vec<Flow>> {
        self.select_outputs_inner(&serde_json::json!({ "target_list": targets }))
            .map(|v| v.into_iter().map(|(_, f)| f).collect())
    }

    /// Everything the subtree `v` reads: what may flow into its value, an
    /// error it raises or a notice it sends.
    fn flow(&self, v: &Value) -> Flow {
        let mut f = Flow::default();
        self.flow_into(v, &mut f, false);
        f
    }

    /// What may flow into the value of the expression `v`. Unlike
    /// [`Self::flow`], parts that pass on no value are left out: a count
    /// says how many, `IS [NOT] NULL` whether there is one, `EXISTS`
    /// whether a row matched, and a scalar or ARRAY subquery passes on its
    /// output columns, not what its WHERE compared (as a statement's own
    /// WHERE does not). Their flags stay: code lineage cannot see into
    /// still taints the value.
    fn value_flow(&self, v: &Value) -> Flow {
        let mut f = Flow::default();
        self.flow_into(v, &mut f, true);
        f
    }

    fn flow_into(&self, v: &Value, f: &mut Flow, values: bool) {
        match v {
            Value::Object(m) => {
                if let Some(c) = m.get("ColumnRef") {
                    self.column_ref(c, f);
                    return;
                }
                if values && self.passes_no_value(m, f) {
                    return;
                }
                if let Some(call) = m.get("FuncCall") {
                    self.func_call(call, f);
                }
                for child in m.values() {
                    self.flow_into(child, f, values);
                }
            }
            Value::Array(a) => {
                for child in a {
                    self.flow_into(child, f, values);
                }
            }
            _ => {}
        }
    }

    /// For [`Self::value_flow`]: when the node `m` passes on no value (or
    /// only its subquery's outputs), adds what does to `f` and says so.
    fn passes_no_value(&self, m: &serde_json::Map<String, Value>, f: &mut Flow) -> bool {
        let flags_only = |f: &mut Flow, of: &Flow| {
            f.unknown |= of.unknown;
            f.opaque |= of.opaque;
        };
        if let Some(call) = m.get("FuncCall") {
            let name = strings(call.get("funcname").unwrap_or(&Value::Null)).join(".");
            if name == "count" || name == "pg_catalog.count" {
                flags_only(f, &self.flow(call));
                return true;
            }
        } else if let Some(test) = m.get("NullTest") {
            flags_only(f, &self.flow(test));
            return true;
        } else if let Some(link) = m.get("SubLink") {
            let sub = link.get("subselect").unwrap_or(&Value::Null);
            match link.get("sub_link_type").and_then(Value::as_i64) {
                Some(SUBLINK_EXISTS) => {
                    flags_only(f, &self.flow(sub));
                    return true;
                }
                Some(SUBLINK_EXPR | SUBLINK_ARRAY) => {
                    let body = match node(sub) {
                        Some(("SelectStmt", b)) => b,
                        _ => return false,
                    };
                    let Some(outputs) = self.select_outputs_inner(body) else {
                        return false;
                    };
                    flags_only(f, &self.flow(sub));
                    for (_, o) in &outputs {
                        f.add(o);
                    }
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    fn func_call(&self, call: &Value, f: &mut Flow) {
        let name = strings(call.get("funcname").unwrap_or(&Value::Null)).join(".");
        let first = list(call, "args").first();
        if runs_query_text(&name) {
            match first.and_then(literal) {
                Some(sql) if self.depth < MAX_TEXT_DEPTH => {
                    match lineage_at_depth(sql, self.depth + 1) {
                        Ok(inner) => {
                            let rels = inner.relations();
                            let mut all = inner.all();
                            // The inner statement's unqualified columns
                            // belong to its own relations.
                            all.columns = all
                                .columns
                                .into_iter()
                                .flat_map(|(r, c)| match r {
                                    Some(r) => vec![(Some(r), c)],
                                    None => {
                                        rels.iter().map(|r| (Some(r.clone()), c.clone())).collect()
                                    }
                                })
                                .collect();
                            f.add(&all);
                        }
                        Err(_) => f.unknown = true,
                    }
                }
                _ => f.unknown = true,
            }
        } else if reads_every_table(&name) {
            f.unknown = true;
        } else if reads_named_table(&name) {
            match first.and_then(literal) {
                Some(table) => f.whole.push(table.to_owned()),
                None => f.unknown = true,
            }
        } else if classify_function(&name) == FunctionClass::Opaque {
            f.opaque = true;
        }
    }

    fn column_ref(&self, c: &Value, f: &mut Flow) {
        let fields = list(c, "fields");
        let star = fields
            .last()
            .is_some_and(|x| matches!(node(x), Some(("AStar", _))));
        let names: Vec<String> = strings(&Value::Array(fields.to_vec()));
        if star {
            match names.as_slice() {
                [] => {
                    for r in &self.relations {
                        push(&mut f.whole, r);
                    }
                    for d in self.derived.values() {
                        for (_, x) in d {
                            f.add(x);
                        }
                    }
                }
                quals => self.whole_row(&quals.join("."), f),
            }
            return;
        }
        match names.as_slice() {
            [] => f.unknown = true,
            [col] => {
                // A bare name is a column, or a whole-row reference to a
                // relation: both, to be safe.
                if self.aliases.contains_key(col) || self.derived.contains_key(col) {
                    self.whole_row(col, f);
                }
                push_col(f, None, col);
                for r in &self.renamed {
                    push(&mut f.whole, r);
                }
                for d in self.derived.values() {
                    for (n, x) in d {
                        if n == col || n.is_empty() {
                            f.add(x);
                        }
                    }
                }
            }
            [.., qual, col] => {
                let qual = if names.len() > 2 {
                    names[..names.len() - 1].join(".")
                } else {
                    qual.clone()
                };
                if let Some(d) = self.derived.get(&qual) {
                    for (n, x) in d {
                        if n == col || n.is_empty() {
                            f.add(x);
                        }
                    }
                    return;
                }
                match self.aliases.get(&qual) {
                    Some(rel) if self.renamed.contains(rel) => push(&mut f.whole, rel),
                    Some(rel) => push_col(f, Some(rel), col),
                    None => push_col(f, Some(&qual), col),
                }
            }
        }
    }

    fn whole_row(&self, name: &str, f: &mut Flow) {
        if let Some(d) = self.derived.get(name) {
            for (_, x) in d {
                f.add(x);
            }
        } else if let Some(rel) = self.aliases.get(name) {
            push(&mut f.whole, rel);
        } else {
            push(&mut f.whole, name);
        }
    }
}

fn push(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_owned());
    }
}

fn push_col(f: &mut Flow, rel: Option<&String>, col: &str) {
    let c = (rel.cloned(), col.to_owned());
    if !f.columns.contains(&c) {
        f.columns.push(c);
    }
}

/// The name PostgreSQL gives an unnamed output column (enough to find a
/// subquery's column by name: a column reference's name, a function's).
fn default_name(val: &Value) -> String {
    match node(val) {
        Some(("ColumnRef", c)) => strings(&Value::Array(list(c, "fields").to_vec()))
            .pop()
            .unwrap_or_default(),
        Some(("FuncCall", c)) => strings(c.get("funcname").unwrap_or(&Value::Null))
            .pop()
            .unwrap_or_default(),
        Some(("TypeCast", c)) => c.get("arg").map(default_name).unwrap_or_default(),
        _ => "?column?".into(),
    }
}

/// COPY's options: each DefElem's name and its argument as text.
fn copy_options(copy: &Value) -> Vec<(String, String)> {
    list(copy, "options")
        .iter()
        .filter_map(|o| match node(o) {
            Some(("DefElem", d)) => {
                let arg = d.get("arg").and_then(node).map(|(k, v)| match k {
                    "String" => str_field(v, "sval").to_owned(),
                    "Boolean" => v
                        .get("boolval")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                        .to_string(),
                    "Integer" => v
                        .get("ival")
                        .and_then(Value::as_i64)
                        .unwrap_or(0)
                        .to_string(),
                    _ => String::new(),
                });
                Some((
                    str_field(d, "defname").to_owned(),
                    arg.unwrap_or_else(|| "true".into()),
                ))
            }
            _ => None,
        })
        .collect()
}

fn collect_ctes<'t>(v: &'t Value, out: &mut Vec<(String, &'t Value, Vec<String>)>) {
    match v {
        Value::Object(m) => {
            if let Some(c) = m.get("CommonTableExpr")
                && let Some(q) = c.get("ctequery")
            {
                out.push((
                    str_field(c, "ctename").to_owned(),
                    q,
                    strings(c.get("aliascolnames").unwrap_or(&Value::Null)),
                ));
            }
            for child in m.values() {
                collect_ctes(child, out);
            }
        }
        Value::Array(a) => {
            for child in a {
                collect_ctes(child, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> StatementLineage {
        lineage(sql).unwrap().statements.remove(0)
    }

    #[test]
    fn plain_columns_and_aliases() {
        let l = one("SELECT s.api_key AS k, id FROM public.secrets s");
        assert_eq!(l.relations, ["public.secrets"]);
        let o = l.outputs.unwrap();
        assert_eq!(
            o[0].columns,
            [(Some("public.secrets".to_owned()), "api_key".to_owned())]
        );
        assert_eq!(o[1].columns, [(None, "id".to_owned())]);
    }

    #[test]
    fn a_plan_carries_no_row() {
        let l = one("EXPLAIN (COSTS OFF) SELECT * FROM users WHERE email = 'x'");
        let o = l.outputs.unwrap();
        assert_eq!(o, [Flow::default()]);
        // Errors and notices still carry what it reads.
        assert_eq!(l.all.whole, ["users"]);
        // What lineage cannot follow stays unknown, or opaque.
        let o = one("EXPLAIN SELECT query_to_xml(current_setting('x.q'), true, false, '')")
            .outputs
            .unwrap();
        assert!(o[0].unknown, "{o:?}");
        let o = one("EXPLAIN VERBOSE SELECT my_function(api_key) FROM secrets")
            .outputs
            .unwrap();
        assert!(o[0].opaque, "{o:?}");
    }

    #[test]
    fn returning_lists_what_it_returns() {
        let o = one("DELETE FROM secrets RETURNING api_key, id")
            .outputs
            .unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].columns, [(None, "api_key".to_owned())]);
        let o = one("INSERT INTO audit_log (action) VALUES ('x') RETURNING action")
            .outputs
            .unwrap();
        assert_eq!(o[0].columns, [(None, "action".to_owned())]);
    }

    #[test]
    fn stars_whole_rows_and_renames() {
        assert!(one("SELECT * FROM secrets").outputs.is_none());
        let o = one("TABLE secrets").outputs;
        assert!(o.is_none());
        let o = one("SELECT s.*::text FROM secrets s").outputs.unwrap();
        assert_eq!(o[0].whole, ["secrets"]);
        let o = one("SELECT upper(b) FROM secrets s(a, b)").outputs.unwrap();
        assert_eq!(o[0].whole, ["secrets"]);
        let o = one("SELECT (s).api_key FROM secrets s").outputs.unwrap();
        assert_eq!(o[0].whole, ["secrets"]);
    }

    #[test]
    fn copy_prepare_cursor() {
        let l = one("COPY secrets (api_key) TO STDOUT");
        assert_eq!(
            l.copy_table,
            Some(("secrets".into(), vec!["api_key".into()]))
        );
        let l =
            one("COPY (SELECT api_key AS k, upper(x) FROM secrets) TO STDOUT WITH (FORMAT csv)");
        assert_eq!(l.outputs.unwrap().len(), 2);
        assert_eq!(l.names, ["k", "upper"]);
        assert_eq!(l.copy_options, [("format".to_owned(), "csv".to_owned())]);
        let l = one("PREPARE p AS SELECT api_key || 'x' FROM secrets");
        assert_eq!(l.defines.as_deref(), Some("p"));
        assert_eq!(l.outputs.unwrap()[0].columns.len(), 1);
        assert_eq!(one("EXECUTE p").uses.as_deref(), Some("p"));
        let l = one("DECLARE c CURSOR FOR SELECT md5(api_key) FROM secrets");
        assert_eq!(l.defines.as_deref(), Some("c"));
        assert_eq!(one("FETCH ALL FROM c").uses.as_deref(), Some("c"));
    }

    #[test]
    fn stores_are_where_masked_data_would_be_laundered() {
        let stored = |sql: &str| one(sql).stores;
        assert!(stored("CREATE TEMP TABLE t AS EXECUTE p")[0].unknown);
        assert_eq!(stored("SELECT api_key FROM secrets").len(), 0);
        assert_eq!(
            stored("INSERT INTO audit_log(action) VALUES ('x')").len(),
            0
        );
        let s = stored("INSERT INTO audit_log(action) SELECT api_key FROM secrets");
        assert_eq!(s[0].columns, [(None, "api_key".to_owned())]);
        assert_eq!(
            stored("CREATE TEMP TABLE t AS SELECT * FROM secrets")[0].whole,
            ["secrets"]
        );
        assert_eq!(stored("SELECT api_key INTO TEMP t FROM secrets").len(), 1);
        assert_eq!(stored("UPDATE t SET a = s.api_key FROM secrets s").len(), 1);
        assert_eq!(
            stored("SELECT pg_notify('c', api_key) FROM secrets").len(),
            1
        );
        assert_eq!(
            stored("SELECT set_config('application_name', api_key, false) FROM secrets").len(),
            1
        );
        assert_eq!(
            stored("WITH x AS (INSERT INTO t SELECT api_key FROM secrets RETURNING 1) SELECT 1")
                .len(),
            1
        );
        assert_eq!(
            stored("PREPARE p AS INSERT INTO t SELECT api_key FROM secrets").len(),
            1
        );
    }

    #[test]
    fn counts_null_tests_and_exists_pass_on_no_value() {
        let outputs = |sql: &str| one(sql).outputs.unwrap();
        let none = Flow::default();
        assert_eq!(outputs("SELECT count(DISTINCT email) FROM users")[0], none);
        assert_eq!(
            outputs("SELECT pg_catalog.count(email) FILTER (WHERE email > 'b') FROM users")[0],
            none
        );
        assert_eq!(
            outputs("SELECT email IS NOT NULL, api_key IS NULL FROM users, secrets")[1],
            none
        );
        assert_eq!(
            outputs("SELECT EXISTS (SELECT 1 FROM users WHERE email LIKE 'a%')")[0],
            none
        );
        assert_eq!(
            outputs("SELECT (SELECT count(*) FROM users WHERE email LIKE '%@example.com')")[0],
            none
        );
        // A scalar or ARRAY subquery passes on its own outputs.
        let o = outputs(
            "SELECT (SELECT max(email) FROM users), ARRAY(SELECT api_key FROM secrets WHERE id > 0)",
        );
        assert_eq!(o[0].columns, [(None, "email".to_owned())]);
        assert_eq!(o[1].columns, [(None, "api_key".to_owned())]);
        assert!(outputs("SELECT (SELECT s FROM secrets s)::text")[0].whole == ["secrets"]);
        assert!(
            !outputs("SELECT (SELECT * FROM secrets LIMIT 1)")[0]
                .whole
                .is_empty()
        );
        // Values computed from the column still flow.
        assert_eq!(
            outputs("SELECT length(email), email = 'x', max(email) FROM users")
                .iter()
                .filter(|f| f.columns.is_empty())
                .count(),
            0
        );
        // Code lineage cannot see into still taints a count.
        assert!(outputs("SELECT count(my_function(api_key)) FROM secrets")[0].opaque);
        // An error raised inside a count can carry the value: it is read.
        let l = one("SELECT count(api_key::int) FROM secrets");
        assert_eq!(l.all.columns, [(None, "api_key".to_owned())]);
    }

    #[test]
    fn views_say_what_their_columns_carry() {
        let v = one("CREATE TEMP VIEW v (a) AS SELECT upper(api_key), id AS b FROM secrets")
            .view
            .unwrap();
        assert_eq!(v.name, "v");
        assert_eq!(v.relations, ["secrets"]);
        assert_eq!(v.columns[0].0, "a");
        assert_eq!(v.columns[0].1.columns, [(None, "api_key".to_owned())]);
        assert_eq!(v.columns[1].0, "b");
        let v = one("CREATE OR REPLACE TEMP VIEW pg_temp.w AS SELECT * FROM secrets")
            .view
            .unwrap();
        assert_eq!(v.name, "w");
        assert_eq!(v.columns.len(), 1);
        assert_eq!(v.columns[0].0, "");
        assert_eq!(v.columns[0].1.whole, ["secrets"]);
        assert_eq!(
            one("ALTER VIEW v RENAME TO w").renames,
            Some(("v".to_owned(), "w".to_owned()))
        );
        assert_eq!(one("ALTER TABLE v RENAME COLUMN a TO b").renames, None);
    }

    #[test]
    fn nested_subqueries_pass_names_outwards() {
        let l = one(
            "SELECT z FROM (SELECT y AS z FROM (SELECT x AS y FROM (SELECT api_key AS x FROM secrets) a) b) c",
        );
        let o = l.outputs.unwrap();
        assert!(
            o[0].columns.contains(&(None, "api_key".to_owned())),
            "{o:?}"
        );
    }
}
