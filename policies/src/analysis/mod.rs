//! Statement analysis by PostgreSQL's own grammar (libpg_query).
//!
//! Every statement is summarised by libpg_query, whose walker is
//! PostgreSQL's: the tables and functions it reports are every one in the
//! tree, however deeply nested. Statement types whose meaning lives in
//! options (COPY, EXPLAIN, SET, PREPARE, CREATE/DROP of temporary tables...)
//! are parsed fully as well, and only their top-level fields are read.
//! Nothing here depends on a session: what a statement means for this
//! session (temporary tables, prepared names) is worked out in
//! [`crate::session`].

pub mod catalog;
pub mod lineage;
pub mod pin;
mod shape;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use pg_query::protobuf::{self, node::Node as N, summary_result::Context as Ctx};
use serde::Serialize;

pub use catalog::FunctionClass;
use catalog::{
    affects_parsing, classify_function, is_credential_catalog, keeps_parsing, runs_query_text,
    setting_is_guarded,
};
use shape::shape;

/// What a statement does, from least to most risky. A statement's kind is
/// the riskiest thing anything inside it does.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// SELECT, SHOW, FETCH, plain EXPLAIN, COPY ... TO STDOUT.
    Read,
    /// SET of ordinary settings, LISTEN/NOTIFY, DEALLOCATE, DISCARD.
    Session,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT.
    Transaction,
    /// VACUUM and ANALYZE.
    Maintenance,
    /// INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY FROM STDIN, sequences.
    Write,
    /// CREATE, ALTER, DROP and friends.
    Ddl,
    /// LOCK, CHECKPOINT, REINDEX, CLUSTER, two-phase commit.
    Utility,
    /// Roles, grants, guarded settings, server files and programs, admin
    /// functions, credential catalogs, and opaque code.
    Privilege,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Read,
        Kind::Session,
        Kind::Transaction,
        Kind::Maintenance,
        Kind::Write,
        Kind::Ddl,
        Kind::Utility,
        Kind::Privilege,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Session => "session",
            Kind::Transaction => "transaction",
            Kind::Maintenance => "maintenance",
            Kind::Write => "write",
            Kind::Ddl => "ddl",
            Kind::Utility => "utility",
            Kind::Privilege => "privilege",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where COPY moves data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyEndpoint {
    /// STDIN/STDOUT: the client.
    Client,
    /// A file on the database server.
    ServerFile(String),
    /// A program run by the database server.
    Program(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    /// True for COPY FROM (into a table).
    pub from: bool,
    pub endpoint: CopyEndpoint,
}

/// Code whose effect no parser can see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "name", rename_all = "snake_case")]
pub enum Opaque {
    DoBlock,
    /// A user-defined or unknown function.
    Function(String),
    /// CALL of a procedure.
    Procedure(String),
    /// A built-in that runs SQL given as text.
    QueryText(String),
}

impl std::fmt::Display for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opaque::DoBlock => f.write_str("a DO block"),
            Opaque::Function(n) => write!(f, "function {n}()"),
            Opaque::Procedure(n) => write!(f, "procedure {n}()"),
            Opaque::QueryText(n) => write!(f, "{n}(), which runs SQL given as text"),
        }
    }
}

/// One statement, as PostgreSQL's grammar sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Statement {
    /// The top-level command, e.g. `select`, `insert`, `drop`, `set`.
    pub command: String,
    /// The riskiest thing the statement does, leaving opaque code aside.
    pub base_kind: Option<Kind>,
    /// Why `base_kind` is what it is, one line per contributing fact.
    pub reasons: Vec<String>,
    /// Tables and views read (CTE names excluded).
    pub reads: Vec<String>,
    /// Tables written by DML, TRUNCATE or COPY FROM.
    pub writes: Vec<String>,
    /// Objects created, altered or dropped.
    pub ddl: Vec<String>,
    /// Names of temporary tables this statement creates.
    pub creates_temp: Vec<String>,
    /// Names of temporary views this statement creates. Apart from
    /// tables: what is written through a view is written to the tables it
    /// reads, which need not be temporary.
    pub creates_temp_views: Vec<String>,
    /// Tables and views this statement drops (DROP TABLE, DROP VIEW).
    pub drops_tables: Vec<String>,
    /// Functions called, with what each can do.
    pub functions: Vec<(String, FunctionClass)>,
    /// Settings changed (SET, RESET, set_config).
    pub settings: Vec<String>,
    pub copy: Option<Copy>,
    /// `Some(analyze)` for EXPLAIN.
    pub explain_analyze: Option<bool>,
    pub opaque: Vec<Opaque>,
    /// PREPARE name AS ...
    pub prepares: Option<String>,
    /// EXECUTE name
    pub executes: Option<String>,
    /// DEALLOCATE name; `Some("")` for DEALLOCATE ALL.
    pub deallocates: Option<String>,
    /// DISCARD ALL or DISCARD TEMP forgets temporary tables.
    pub discards_temp: bool,
    /// DISCARD ALL or DISCARD PLANS forgets prepared statements.
    pub discards_prepared: bool,
    /// Asks for READ WRITE transactions (BEGIN, START TRANSACTION, SET
    /// TRANSACTION, SET SESSION CHARACTERISTICS), which would undo the
    /// read-only upstream session of an identity that may only read.
    pub read_write: bool,
}

impl Statement {
    /// Every table written, created, altered or dropped.
    pub fn changed_tables(&self) -> impl Iterator<Item = &String> {
        self.writes
            .iter()
            .chain(&self.ddl)
            .chain(&self.drops_tables)
    }

    /// The kind with opaque code counted as the worst it could do.
    pub fn kind(&self) -> Kind {
        if self.opaque.is_empty() {
            self.base_kind.unwrap_or(Kind::Read)
        } else {
            Kind::Privilege
        }
    }

    fn raise(&mut self, kind: Kind, why: impl Into<String>) {
        if self.base_kind.is_none_or(|k| kind > k) {
            self.base_kind = Some(kind);
        }
        self.reasons.push(why.into());
    }
}

/// A whole query string: one or more statements.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub statements: Vec<Statement>,
    /// The same for every text of one token shape (literal values and
    /// comments left out), and stable across runs: the audit trail groups
    /// statements by it. 0 when the scanner could not read the text.
    pub fingerprint: u64,
}

/// Why a query string could not be analysed. The statement is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalysisError {
    #[error("the statement is not valid UTF-8")]
    NotUtf8,
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("the query string is empty")]
    Empty,
    #[error("the statement could not be analysed: {0}")]
    Resources(String),
}

impl AnalysisError {
    /// The SQLSTATE a client sees.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AnalysisError::NotUtf8 => "22021",
            AnalysisError::Syntax(_) | AnalysisError::Empty => "42601",
            AnalysisError::Resources(_) => "53000",
        }
    }
}

/// Analyses `sql`, which may hold several statements.
/// `sql` with every literal value replaced by `$1`, `$2`... (libpg_query's
/// normalisation), for an audit trail that shows what ran but not the
/// values. Text that does not parse cannot be told apart from its values,
/// so none of it is kept.
pub fn redact_literals(sql: &str) -> String {
    match pg_query::normalize(sql) {
        Ok(text) => text,
        Err(_) => format!("(redacted: {} bytes that do not parse)", sql.len()),
    }
}

pub fn analyze(sql: &str) -> Result<Analysis, AnalysisError> {
    let shape = shape(sql);
    analyze_detailed(sql, shape.as_deref()).map(|(a, _)| a)
}

/// Whether the quick reading of `sql`'s shape, where it answers, is the
/// scanner's (for the fuzz target).
#[doc(hidden)]
pub fn quick_shape_agrees(sql: &str) -> bool {
    shape::quick(sql).is_none_or(|q| Some(q) == shape::scanned(sql))
}

fn fingerprint(shape: Option<&[u8]>) -> u64 {
    use sha2::Digest;
    shape.map_or(0, |s| {
        let digest = sha2::Sha256::digest(s);
        u64::from_be_bytes(digest[..8].try_into().expect("32-byte digest"))
    })
}

/// The analysis, and whether any statement needed a full parse: only an
/// analysis built from summaries alone is the same for every literal value.
fn analyze_detailed(sql: &str, shape: Option<&[u8]>) -> Result<(Analysis, bool), AnalysisError> {
    let pieces = pg_query::split_with_parser(sql).map_err(syntax)?;
    let mut statements = Vec::with_capacity(pieces.len());
    let mut detailed = false;
    for piece in pieces {
        if piece.trim().is_empty() {
            continue;
        }
        let (st, d) = analyze_one(piece)?;
        detailed |= d;
        statements.push(st);
    }
    let analysis = Analysis {
        statements,
        fingerprint: fingerprint(shape),
    };
    Ok((analysis, detailed))
}

fn syntax(e: pg_query::Error) -> AnalysisError {
    let msg = match e {
        pg_query::Error::Parse(m) | pg_query::Error::Split(m) => m,
        other => other.to_string(),
    };
    AnalysisError::Syntax(msg)
}

/// Statement types whose meaning is in their options: parse them fully.
const NEEDS_DETAIL: &[&str] = &[
    "CopyStmt",
    "ExplainStmt",
    "VariableSetStmt",
    "PrepareStmt",
    "ExecuteStmt",
    "DeallocateStmt",
    "CreateStmt",
    "CreateTableAsStmt",
    "DropStmt",
    "DiscardStmt",
    "TransactionStmt",
    "ViewStmt",
    "RenameStmt",
];

/// Statement types whose every table and function call libpg_query's
/// summary lists, RETURNING aside (checked in the tests below). The
/// summary walks only the node types PostgreSQL's raw expression walker
/// knows, and stops at others: a cursor's query, EXECUTE's arguments
/// (also inside EXPLAIN or CREATE TABLE AS), column defaults and CHECK
/// constraints, COPY FROM's WHERE, and PostgreSQL 18's RETURNING clause.
/// Statements with those are parsed in full and their whole tree searched:
/// `DECLARE c CURSOR FOR SELECT f_wipe()` or `INSERT INTO audit_log ...
/// RETURNING pg_read_file(...)` would otherwise run a function that policy
/// never saw. The full parse costs ~40 µs more per analysis, so the common
/// types keep the summary alone.
const SUMMARY_SEES_ALL: &[&str] = &[
    "SelectStmt",
    "InsertStmt",
    "UpdateStmt",
    "DeleteStmt",
    "MergeStmt",
    "TransactionStmt",
    "VariableSetStmt",
    "VariableShowStmt",
    "ListenStmt",
    "UnlistenStmt",
    "NotifyStmt",
    "FetchStmt",
    "ClosePortalStmt",
    "DeallocateStmt",
    "DiscardStmt",
    "CheckPointStmt",
    "LockStmt",
    "VacuumStmt",
    "DoStmt",
];

/// Whether `sql` may hold `keyword` (RETURNING, whose expressions the
/// summary does not walk; ON CONFLICT, whose DO UPDATE makes an INSERT
/// an upsert). A keyword cannot be split by comments or escapes, so text
/// without the word has none.
fn mentions(sql: &str, keyword: &[u8]) -> bool {
    sql.as_bytes()
        .windows(keyword.len())
        .any(|w| w.eq_ignore_ascii_case(keyword))
}

/// Adds to `summary` the relations and function calls anywhere in the
/// parsed tree that it does not list: functions (and trigger functions)
/// as called, the targets of INSERT, UPDATE, DELETE and MERGE (a rule's
/// actions) as written, other relations as read (CTE names aside).
fn add_what_the_summary_missed(
    summary: &mut pg_query::SummaryResult,
    tree: &protobuf::ParseResult,
) -> Result<(), AnalysisError> {
    let tree = serde_json::to_value(tree).map_err(|e| AnalysisError::Resources(e.to_string()))?;
    let mut found = Found::default();
    found.walk(&tree);
    for name in found.functions {
        if summary.functions.iter().any(|f| f.name == name) {
            continue;
        }
        let (schema_name, function_name) = match name.rsplit_once('.') {
            Some((s, f)) => (Some(s.to_owned()), f.to_owned()),
            None => (None, name.clone()),
        };
        summary.functions.push(pg_query::Function {
            name,
            function_name,
            schema_name,
            context: Ctx::Call,
        });
    }
    let written = found.written.into_iter().map(|r| (r, Ctx::Dml));
    let read = found.relations.into_iter().map(|r| (r, Ctx::Select));
    for ((schema_name, table_name), context) in written.chain(read) {
        if schema_name.is_empty() && found.ctes.contains(&table_name) {
            continue;
        }
        let name = if schema_name.is_empty() {
            table_name.clone()
        } else {
            format!("{schema_name}.{table_name}")
        };
        // Listed already: as written, or at all when only read here.
        if summary
            .tables
            .iter()
            .any(|t| t.name == name && (t.context == context || context == Ctx::Select))
        {
            continue;
        }
        summary.tables.push(pg_query::Table {
            name,
            schema_name,
            table_name,
            context,
        });
    }
    Ok(())
}

/// What a walk of a parse tree (as JSON) found.
#[derive(Default)]
struct Found {
    functions: Vec<String>,
    /// (schema, relation)
    relations: Vec<(String, String)>,
    /// (schema, relation) that an INSERT, UPDATE, DELETE or MERGE targets.
    written: Vec<(String, String)>,
    ctes: Vec<String>,
}

impl Found {
    fn walk(&mut self, v: &serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match k.as_str() {
                        // A trigger's function runs at every event on its
                        // table: it is called as surely as a FuncCall.
                        "FuncCall" | "CreateTrigStmt" => {
                            if let Some(name) = func_name(x).filter(|n| !n.is_empty()) {
                                self.functions.push(name);
                            }
                        }
                        // Where a rule's actions write.
                        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                            self.written.extend(x.get("relation").and_then(range_var));
                        }
                        "RangeVar" => self.relations.extend(range_var(x)),
                        "CommonTableExpr" => {
                            let name = x.get("ctename").and_then(Value::as_str);
                            self.ctes.push(name.unwrap_or_default().to_owned());
                        }
                        _ => {}
                    }
                    self.walk(x);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| self.walk(x)),
            _ => {}
        }
    }
}

/// A RangeVar's (schema, relation), as JSON; `None` without a relation.
fn range_var(v: &serde_json::Value) -> Option<(String, String)> {
    let text = |key: &str| v.get(key).and_then(serde_json::Value::as_str);
    let relname = text("relname").filter(|r| !r.is_empty())?;
    Some((
        text("schemaname").unwrap_or_default().to_owned(),
        relname.to_owned(),
    ))
}

/// A full parse decodes and later drops its tree with one chain of Rust
/// frames per nesting level. libpg_query accepts nesting (a few hundred
/// CASEs or function calls) that overflows a 2 MiB worker stack, and a stack
/// overflow aborts the whole daemon, so full parses run on a thread with
/// room for the deepest tree the parser accepts (measured: under 128 MiB
/// in a debug build). The stack is reserved address space, touched only as
/// deep as the tree goes.
const FULL_PARSE_STACK: usize = 256 << 20;

fn analyze_one(sql: &str) -> Result<(Statement, bool), AnalysisError> {
    let summary = pg_query::summary(sql, pg_query::ParserOptions::default(), -1).map_err(syntax)?;
    let top = summary
        .statement_types
        .first()
        .map(String::as_str)
        .ok_or(AnalysisError::Empty)?;
    let select_into = top == "SelectStmt" && summary.tables.iter().any(|t| t.context == Ctx::Ddl);
    let walk = !SUMMARY_SEES_ALL.contains(&top) || mentions(sql, b"returning");
    let upsert = top == "InsertStmt" && mentions(sql, b"conflict");
    if !(select_into
        || walk
        || upsert
        || NEEDS_DETAIL.contains(&top)
        || summary.functions.iter().any(|f| is_set_config(&f.name)))
    {
        return Ok((statement(&summary, None), false));
    }
    let mut summary = summary;
    on_parse_stack(|| {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::default()).map_err(syntax)?;
        if walk {
            add_what_the_summary_missed(&mut summary, &parsed.protobuf)?;
        }
        let node = parsed
            .protobuf
            .stmts
            .into_iter()
            .next()
            .and_then(|s| s.stmt)
            .and_then(|s| s.node);
        Ok((statement(&summary, node), true))
    })
}

/// Runs `f` (a full parse, and the walk and drop of its tree) on a thread
/// with [`FULL_PARSE_STACK`].
fn on_parse_stack<T: Send>(
    f: impl FnOnce() -> Result<T, AnalysisError> + Send,
) -> Result<T, AnalysisError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("interceptor-parse".into())
            .stack_size(FULL_PARSE_STACK)
            .spawn_scoped(scope, f)
            .map_err(|e| AnalysisError::Resources(e.to_string()))?;
        worker
            .join()
            .map_err(|_| AnalysisError::Resources("the parser thread panicked".into()))?
    })
}

/// Builds the statement from libpg_query's summary and, for statement types
/// whose meaning is in their options, the fully parsed top-level node.
fn statement(summary: &pg_query::SummaryResult, detail: Option<N>) -> Statement {
    let types: Vec<&str> = summary.statement_types.iter().map(String::as_str).collect();
    let top = types[0];
    // PREPARE is judged as what it prepares.
    let command = match (top, types.get(1)) {
        ("PrepareStmt", Some(inner)) => command_name(inner),
        _ => command_name(top),
    };
    let mut st = Statement {
        command,
        ..Statement::default()
    };

    // EXPLAIN without ANALYZE plans but does not run what it explains.
    let explain_only = match &detail {
        Some(N::ExplainStmt(e)) => {
            let analyze = e.options.iter().any(|o| match &o.node {
                Some(N::DefElem(d)) => d.defname == "analyze" && def_is_true(d),
                _ => false,
            });
            st.explain_analyze = Some(analyze);
            !analyze
        }
        _ => false,
    };

    let counted = if explain_only {
        &types[..1]
    } else {
        &types[..]
    };
    for ty in counted {
        type_kind(&mut st, ty);
    }
    if explain_only {
        st.raise(Kind::Read, "EXPLAIN without ANALYZE does not execute");
    }

    // libpg_query lists tables and functions in an order that varies with
    // the text (not only the tree): sorted, two texts of one shape give one
    // analysis, which the cache by shape relies on.
    let mut tables: Vec<_> = summary.tables.iter().collect();
    tables.sort_by(|a, b| (&a.name, a.context as i32).cmp(&(&b.name, b.context as i32)));
    let mut functions: Vec<_> = summary.functions.iter().collect();
    functions.sort_by(|a, b| (&a.name, a.context as i32).cmp(&(&b.name, b.context as i32)));

    for t in tables {
        let name = t.name.clone();
        if is_credential_catalog(&name) {
            st.raise(
                Kind::Privilege,
                format!("reads {name}, which holds credentials or server files"),
            );
        }
        match t.context {
            Ctx::Dml if !explain_only => push_unique(&mut st.writes, name),
            Ctx::Ddl if !explain_only => match top {
                "VacuumStmt" => push_unique(&mut st.reads, name),
                "TruncateStmt" => push_unique(&mut st.writes, name),
                _ => push_unique(&mut st.ddl, name),
            },
            _ => push_unique(&mut st.reads, name),
        }
    }

    for f in functions {
        if f.context == Ctx::Ddl {
            // Created, altered or dropped, not called: the statement type
            // already makes it DDL.
            continue;
        }
        let name = f.name.clone();
        let class = if top == "CallStmt" {
            FunctionClass::Opaque
        } else {
            classify_function(&name)
        };
        match class {
            FunctionClass::Pure => {}
            FunctionClass::Writes => st.raise(Kind::Write, format!("calls {name}(), which writes")),
            FunctionClass::Session => st.raise(Kind::Session, format!("calls {name}()")),
            FunctionClass::Privileged => st.raise(
                Kind::Privilege,
                format!("calls privileged built-in {name}()"),
            ),
            FunctionClass::Opaque if top == "CallStmt" => {
                st.opaque.push(Opaque::Procedure(name.clone()))
            }
            FunctionClass::Opaque if runs_query_text(&name) => {
                st.opaque.push(Opaque::QueryText(name.clone()))
            }
            FunctionClass::Opaque => st.opaque.push(Opaque::Function(name.clone())),
        }
        if !st.functions.iter().any(|(n, _)| *n == name) {
            st.functions.push((name, class));
        }
    }

    if let Some(node) = detail {
        if st.functions.iter().any(|(n, _)| is_set_config(n)) {
            set_config_calls(&mut st, &node);
        }
        apply_detail(&mut st, node);
    }
    if st.base_kind.is_none() {
        st.raise(Kind::Read, "reads only");
    }
    st
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// `SelectStmt` -> `select`, `CreateTableAsStmt` -> `create_table_as`.
fn command_name(ty: &str) -> String {
    let base = ty.strip_suffix("Stmt").unwrap_or(ty);
    let mut out = String::with_capacity(base.len() + 4);
    for (i, c) in base.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The kind each statement node type contributes.
fn type_kind(st: &mut Statement, ty: &str) {
    use Kind::*;
    let kind = match ty {
        "SelectStmt" | "VariableShowStmt" | "FetchStmt" | "ClosePortalStmt"
        | "DeclareCursorStmt" | "ExplainStmt" => Read,
        "ListenStmt" | "UnlistenStmt" | "NotifyStmt" | "DeallocateStmt" | "DiscardStmt"
        | "PrepareStmt" | "ExecuteStmt" | "VariableSetStmt" => Session,
        "TransactionStmt" => Transaction,
        "VacuumStmt" => Maintenance,
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" | "TruncateStmt" => Write,
        "CopyStmt" => Read,
        "LockStmt" | "CheckPointStmt" | "ReindexStmt" | "ClusterStmt" | "RefreshMatViewStmt"
        | "ConstraintsSetStmt" => Utility,
        "DoStmt" => {
            st.opaque.push(Opaque::DoBlock);
            return;
        }
        "CallStmt" => Read,
        "CreateRoleStmt"
        | "AlterRoleStmt"
        | "AlterRoleSetStmt"
        | "DropRoleStmt"
        | "GrantStmt"
        | "GrantRoleStmt"
        | "AlterDefaultPrivilegesStmt"
        | "ReassignOwnedStmt"
        | "DropOwnedStmt"
        | "AlterSystemStmt"
        | "LoadStmt"
        | "CreateExtensionStmt"
        | "AlterExtensionStmt"
        | "AlterExtensionContentsStmt"
        | "CreateFdwStmt"
        | "AlterFdwStmt"
        | "CreateForeignServerStmt"
        | "AlterForeignServerStmt"
        | "CreateUserMappingStmt"
        | "AlterUserMappingStmt"
        | "DropUserMappingStmt"
        | "ImportForeignSchemaStmt"
        | "AlterDatabaseSetStmt"
        | "AlterDatabaseStmt"
        | "SecLabelStmt"
        | "CreateEventTrigStmt"
        | "AlterEventTrigStmt"
        | "CreatePLangStmt"
        | "CreateSubscriptionStmt"
        | "AlterSubscriptionStmt"
        | "DropSubscriptionStmt"
        | "CreatePublicationStmt"
        | "AlterPublicationStmt"
        | "AlterOwnerStmt"
        | "CreateTableSpaceStmt"
        | "DropTableSpaceStmt"
        | "AlterTableSpaceOptionsStmt"
        | "AlterTableMoveAllStmt"
        | "CreatedbStmt"
        | "DropdbStmt"
        | "AlterDatabaseRefreshCollStmt"
        | "CreateConversionStmt"
        | "CreateCastStmt"
        | "CreateTransformStmt"
        | "CreateAmStmt"
        | "AlterSystem" => Privilege,
        t if t.starts_with("Create")
            || t.starts_with("Alter")
            || t.starts_with("Drop")
            || matches!(
                t,
                "RenameStmt"
                    | "CommentStmt"
                    | "DefineStmt"
                    | "IndexStmt"
                    | "RuleStmt"
                    | "ViewStmt"
                    | "CompositeTypeStmt"
                    | "ReplicaIdentityStmt"
            ) =>
        {
            Ddl
        }
        other => {
            st.raise(
                Privilege,
                format!("{other} is a statement type interceptor does not classify"),
            );
            return;
        }
    };
    let what = match kind {
        Read => "reads",
        Session => "changes session state",
        Transaction => "controls the transaction",
        Maintenance => "runs maintenance",
        Write => "writes",
        Ddl => "changes the schema",
        Utility => "runs a utility command",
        Privilege => "changes privileges or the server",
    };
    st.raise(kind, format!("{} {what}", command_name(ty)));
}

/// Whether transaction options hold READ WRITE (the grammar's
/// `transaction_read_only` set to 0).
fn asks_read_write(options: &[protobuf::Node]) -> bool {
    options.iter().any(|o| match &o.node {
        Some(N::DefElem(d)) if d.defname == "transaction_read_only" => {
            match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
                Some(N::AConst(c)) => {
                    matches!(&c.val, Some(protobuf::a_const::Val::Ival(i)) if i.ival == 0)
                }
                Some(N::Integer(i)) => i.ival == 0,
                _ => false,
            }
        }
        _ => false,
    })
}

fn def_is_true(d: &protobuf::DefElem) -> bool {
    match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
        None => true,
        Some(N::Boolean(b)) => b.boolval,
        Some(N::String(s)) => !matches!(
            s.sval.to_ascii_lowercase().as_str(),
            "false" | "off" | "0" | "no"
        ),
        Some(N::Integer(i)) => i.ival != 0,
        Some(_) => true,
    }
}

fn qualified(rv: &protobuf::RangeVar) -> String {
    if rv.schemaname.is_empty() {
        rv.relname.clone()
    } else {
        format!("{}.{}", rv.schemaname, rv.relname)
    }
}

fn names(list: &[protobuf::Node]) -> String {
    list.iter()
        .filter_map(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn into_temp(st: &mut Statement, rel: &protobuf::RangeVar) {
    let name = qualified(rel);
    if is_temporary(rel) {
        push_unique(&mut st.creates_temp, rel.relname.clone());
    }
    push_unique(&mut st.ddl, name);
}

fn is_temporary(rel: &protobuf::RangeVar) -> bool {
    rel.relpersistence == "t" || rel.schemaname == "pg_temp"
}

/// Reads the top-level fields of statements whose meaning is in options.
fn apply_detail(st: &mut Statement, node: N) {
    match node {
        // INSERT ... ON CONFLICT DO UPDATE changes rows already there: a
        // rule that allows INSERT does not allow that.
        N::InsertStmt(i)
            if i.on_conflict_clause.as_ref().is_some_and(|c| {
                c.action == protobuf::OnConflictAction::OnconflictUpdate as i32
            }) =>
        {
            st.command = "upsert".into();
            st.raise(Kind::Write, "ON CONFLICT DO UPDATE updates existing rows");
        }
        N::CopyStmt(c) => {
            let endpoint = if c.is_program {
                CopyEndpoint::Program(c.filename.clone())
            } else if !c.filename.is_empty() {
                CopyEndpoint::ServerFile(c.filename.clone())
            } else {
                CopyEndpoint::Client
            };
            match &endpoint {
                CopyEndpoint::Client => {}
                CopyEndpoint::ServerFile(f) => {
                    st.raise(Kind::Privilege, format!("COPY touches server file {f:?}"))
                }
                CopyEndpoint::Program(p) => {
                    st.raise(Kind::Privilege, format!("COPY runs server program {p:?}"))
                }
            }
            if c.is_from {
                if let Some(rel) = &c.relation {
                    let name = qualified(rel);
                    st.reads.retain(|r| *r != name);
                    push_unique(&mut st.writes, name);
                }
                st.raise(Kind::Write, "COPY FROM writes a table");
            }
            // COPY's own ENCODING: in a client-only encoding, a two-byte
            // character can end in the backslash that masking's COPY
            // reader takes for an escape, and columns slip.
            for o in &c.options {
                if let Some(N::DefElem(d)) = &o.node
                    && d.defname == "encoding"
                {
                    let value = match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
                        Some(N::String(s)) => Some(s.sval.as_str()),
                        _ => None,
                    };
                    unsafe_value(st, "client_encoding", value);
                }
            }
            st.copy = Some(Copy {
                from: c.is_from,
                endpoint,
            });
        }
        N::VariableSetStmt(v) => set_statement(st, &v),
        N::PrepareStmt(p) => st.prepares = Some(p.name),
        N::ExecuteStmt(e) => st.executes = Some(e.name),
        N::DeallocateStmt(d) => st.deallocates = Some(if d.isall { String::new() } else { d.name }),
        N::DiscardStmt(d) => {
            let mode = protobuf::DiscardMode::try_from(d.target).ok();
            st.discards_temp = matches!(
                mode,
                Some(protobuf::DiscardMode::DiscardAll | protobuf::DiscardMode::DiscardTemp)
            );
            st.discards_prepared = matches!(
                mode,
                Some(protobuf::DiscardMode::DiscardAll | protobuf::DiscardMode::DiscardPlans)
            );
        }
        N::TransactionStmt(t) => {
            st.read_write = asks_read_write(&t.options);
            use protobuf::TransactionStmtKind as T;
            if matches!(
                T::try_from(t.kind),
                Ok(T::TransStmtPrepare | T::TransStmtCommitPrepared | T::TransStmtRollbackPrepared)
            ) {
                st.raise(
                    Kind::Utility,
                    "two-phase commit leaves a transaction holding locks",
                );
            }
        }
        N::CreateStmt(c) => {
            if let Some(rel) = &c.relation {
                into_temp(st, rel);
            }
        }
        N::CreateTableAsStmt(c) => {
            if let Some(rel) = c.into.as_ref().and_then(|i| i.rel.as_ref()) {
                into_temp(st, rel);
            }
        }
        N::ViewStmt(v) => {
            if let Some(rel) = &v.view {
                if is_temporary(rel) {
                    push_unique(&mut st.creates_temp_views, rel.relname.clone());
                }
                push_unique(&mut st.ddl, qualified(rel));
            }
        }
        N::SelectStmt(s) => {
            if let Some(rel) = s.into_clause.as_ref().and_then(|i| i.rel.as_ref()) {
                st.raise(Kind::Ddl, "SELECT INTO creates a table");
                st.ddl.clear();
                into_temp(st, rel);
            }
        }
        // The summary names no table for a column's or constraint's new
        // name: the table is what changes (a temporary table's own
        // columns are the session's to rename).
        N::RenameStmt(r)
            if matches!(
                protobuf::ObjectType::try_from(r.rename_type),
                Ok(protobuf::ObjectType::ObjectColumn | protobuf::ObjectType::ObjectTabconstraint)
            ) =>
        {
            if let Some(rel) = &r.relation {
                push_unique(&mut st.ddl, qualified(rel));
            }
        }
        N::DropStmt(d)
            if matches!(
                protobuf::ObjectType::try_from(d.remove_type),
                Ok(protobuf::ObjectType::ObjectTable | protobuf::ObjectType::ObjectView)
            ) =>
        {
            for o in &d.objects {
                if let Some(N::List(l)) = &o.node {
                    push_unique(&mut st.drops_tables, names(&l.items));
                }
            }
        }
        _ => {}
    }
}

fn set_statement(st: &mut Statement, v: &protobuf::VariableSetStmt) {
    use protobuf::VariableSetKind as K;
    let kind = K::try_from(v.kind).unwrap_or(K::Undefined);
    match kind {
        K::VarResetAll => {
            st.settings.push("all".into());
            st.raise(Kind::Session, "RESET ALL");
        }
        K::VarSetMulti => {
            // SET TRANSACTION / SET SESSION CHARACTERISTICS AS TRANSACTION.
            st.read_write = asks_read_write(&v.args);
            st.settings.push(v.name.clone());
            st.raise(Kind::Transaction, format!("SET {}", v.name));
        }
        _ => {
            let name = v.name.to_ascii_lowercase();
            let harmless = || match kind {
                K::VarSetValue => v
                    .args
                    .iter()
                    .map(|a| match &a.node {
                        Some(N::AConst(c)) => match &c.val {
                            Some(protobuf::a_const::Val::Sval(s)) => Some(s.sval.as_str()),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect::<Option<Vec<&str>>>()
                    .is_some_and(|values| harmless_value(&name, &values)),
                // Back to the server's default.
                K::VarSetDefault | K::VarReset => name == "search_path",
                _ => false,
            };
            if setting_is_guarded(&name) && !harmless() {
                st.raise(Kind::Privilege, format!("changes guarded setting {name}"));
            }
            if affects_parsing(&name) && kind == K::VarSetValue {
                let value = v.args.first().and_then(|a| match &a.node {
                    Some(N::AConst(c)) => match &c.val {
                        Some(protobuf::a_const::Val::Sval(s)) => Some(s.sval.clone()),
                        _ => None,
                    },
                    _ => None,
                });
                unsafe_value(st, &name, value.as_deref());
            }
            st.settings.push(name);
        }
    }
}

/// Finds every `set_config(name, ...)` call and judges it by its setting.
/// A name that is not a literal is guarded: it could be anything.
/// A guarded setting's value that guards nothing: a search_path of the
/// default's schemas (`"$user"`, `public`), with `pg_catalog` first if it
/// is named at all (named later, a function in public would shadow a
/// built-in the analysis takes for the real one).
fn harmless_value(name: &str, items: &[&str]) -> bool {
    if name != "search_path" || items.is_empty() {
        return false;
    }
    items.iter().enumerate().all(|(i, item)| {
        let item = item.trim();
        let item = item
            .strip_prefix('"')
            .and_then(|i| i.strip_suffix('"'))
            .unwrap_or(item);
        matches!(item, "$user" | "public") || (item == "pg_catalog" && i == 0)
    })
}

fn set_config_calls(st: &mut Statement, node: &N) {
    let Ok(tree) = serde_json::to_value(node) else {
        st.raise(Kind::Privilege, "set_config() could not be inspected");
        return;
    };
    let mut found = 0;
    let mut stack = vec![&tree];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(call) = m.get("FuncCall")
                    && func_name(call).is_some_and(|n| is_set_config(&n))
                {
                    found += 1;
                    match arg_literal(call, 0) {
                        Some(name) => {
                            let name = name.to_ascii_lowercase();
                            let harmless = || {
                                arg_literal(call, 1).is_some_and(|v| {
                                    let items: Vec<&str> = v.split(',').collect();
                                    harmless_value(&name, &items)
                                })
                            };
                            if setting_is_guarded(&name) && !harmless() {
                                st.raise(
                                    Kind::Privilege,
                                    format!("set_config() changes guarded setting {name}"),
                                );
                            }
                            if affects_parsing(&name) {
                                unsafe_value(st, &name, arg_literal(call, 1).as_deref());
                            }
                            st.settings.push(name);
                        }
                        None => st.raise(
                            Kind::Privilege,
                            "set_config() with a setting name that is not a literal",
                        ),
                    }
                }
                stack.extend(m.values());
            }
            serde_json::Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    if found == 0 {
        st.raise(
            Kind::Privilege,
            "set_config() is called where interceptor cannot read its arguments",
        );
    }
}

fn is_set_config(name: &str) -> bool {
    name == "set_config" || name == "pg_catalog.set_config"
}

fn func_name(call: &serde_json::Value) -> Option<String> {
    let parts: Vec<&str> = call
        .get("funcname")?
        .as_array()?
        .iter()
        .filter_map(|n| n.get("node")?.get("String")?.get("sval")?.as_str())
        .collect();
    Some(parts.join("."))
}

/// Refuses a value of a setting that [`affects_parsing`] when PostgreSQL
/// would then read statements differently from interceptor, or when it is
/// not a literal.
fn unsafe_value(st: &mut Statement, name: &str, value: Option<&str>) {
    match value {
        Some(v) if keeps_parsing(name, v) => {}
        Some(v) => st.raise(
            Kind::Privilege,
            format!(
                "sets {name} to {v}, with which PostgreSQL would read statements differently from interceptor's parser"
            ),
        ),
        None => st.raise(
            Kind::Privilege,
            format!("sets {name} to a value that is not a literal"),
        ),
    }
}

fn arg_literal(call: &serde_json::Value, i: usize) -> Option<String> {
    let arg = call.get("args")?.as_array()?.get(i)?;
    let c = arg.get("node")?.get("AConst")?;
    let s = c.get("val")?.get("Sval")?.get("sval")?.as_str()?;
    Some(s.to_owned())
}

/// An analysis as cached and shared between sessions.
pub type SharedAnalysis = Arc<Result<Analysis, AnalysisError>>;

/// Analyses remembered in two LRUs, because drivers and agents send the
/// same statements again and again: by exact text, and by token shape.
///
/// The shape is the statement's tokens as PostgreSQL's own scanner
/// (libpg_query) reads them, with each literal's value left out. Clients
/// that inline values (psql, ORMs in simple mode, pgbench -S) send a new
/// text for every row they ask for, but the same shape. Only analyses built
/// from libpg_query's summary alone are shared by shape: tables, functions
/// and statement types are identifiers and grammar, never literal values.
/// Statements whose meaning is in their options (EXPLAIN (ANALYZE 0), COPY
/// ... PROGRAM 'x', set_config('role', ...)) were parsed fully, may depend
/// on a literal, and are cached by exact text only. So are errors: one
/// literal can be out of range where another is not.
pub struct Analyzer {
    cache: Mutex<Caches>,
}

/// A text's analysis, and whether texts of its shape share it.
type TextEntry = (SharedAnalysis, bool);

struct Caches {
    text: lru::LruCache<Box<str>, TextEntry>,
    shape: lru::LruCache<Box<[u8]>, SharedAnalysis>,
}

/// One session's last analysis, in front of the shared caches. A session
/// that sends one shape again and again (one query, new values each time)
/// is answered from here without touching what other threads write: the
/// caches' lock, their LRU order, and the analysis's reference count. On
/// two shared cores those cache lines moving between CPUs cost more than
/// the rest of a decision.
#[derive(Default)]
pub struct LastAnalysis(Option<Last>);

impl LastAnalysis {
    /// No analysis yet (as `default()`, in a `static`).
    pub const NONE: LastAnalysis = LastAnalysis(None);
}

struct Last {
    /// Its shape, when texts of that shape share the analysis.
    shape: Option<Vec<u8>>,
    analysis: SharedAnalysis,
}

impl Analyzer {
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity.max(1)).expect("max(1)");
        Analyzer {
            cache: Mutex::new(Caches {
                text: lru::LruCache::new(capacity),
                shape: lru::LruCache::new(capacity),
            }),
        }
    }

    pub fn analyze(&self, sql: &str) -> SharedAnalysis {
        self.lookup(sql, None).0
    }

    /// As [`analyze`](Self::analyze), answered from `last` when `sql` has
    /// the shape `last` was shared by; else `last` becomes `sql`'s.
    pub fn analyze_after<'a>(&self, sql: &str, last: &'a mut LastAnalysis) -> &'a SharedAnalysis {
        // Only the quick reading is cheap enough to try first; texts it
        // leaves to the scanner go to the text cache before the scanner.
        let quick = shape::quick(sql);
        let same =
            matches!((&quick, &last.0), (Some(key), Some(l)) if l.shape.as_ref() == Some(key));
        if !same {
            last.0 = None;
        }
        let last = last.0.get_or_insert_with(|| {
            let (analysis, shape) = self.lookup(sql, quick);
            Last { shape, analysis }
        });
        &last.analysis
    }

    /// The analysis, and the shape that shares it if any. `quick` is the
    /// quick reading of `sql`'s shape, if already taken.
    fn lookup(&self, sql: &str, quick: Option<Vec<u8>>) -> (SharedAnalysis, Option<Vec<u8>>) {
        if let Some((hit, by_shape)) = self.lock().text.get(sql) {
            let (hit, by_shape) = (hit.clone(), *by_shape);
            return (hit, quick.filter(|_| by_shape));
        }
        let shape = quick.or_else(|| shape(sql));
        if let Some(key) = &shape
            && let Some(hit) = self.lock().shape.get(key.as_slice())
        {
            return (hit.clone(), shape);
        }
        let (result, by_shape) = match analyze_detailed(sql, shape.as_deref()) {
            Ok((analysis, detailed)) => (Ok(analysis), !detailed),
            Err(e) => (Err(e), false),
        };
        let result = Arc::new(result);
        let shape = shape.filter(|_| by_shape);
        let mut caches = self.lock();
        caches.text.put(sql.into(), (result.clone(), by_shape));
        if let Some(key) = &shape {
            caches.shape.put(key.as_slice().into(), result.clone());
        }
        (result, shape)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Caches> {
        // A panic while holding the lock leaves a cache, not a broken
        // invariant: keep using it.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statement types trusted to [`SUMMARY_SEES_ALL`], with a function
    /// call in every place their grammar takes an expression: the summary
    /// lists every call that a walk of the whole tree finds.
    #[test]
    fn the_summary_lists_every_call_in_the_types_it_is_trusted_with() {
        const SQL: &[&str] = &[
            "SELECT DISTINCT ON (f1()) f2(), (SELECT f3()), ARRAY(SELECT f4()), CASE WHEN f5() THEN f6() ELSE f7() END, \
             count(*) FILTER (WHERE f8()), percentile_cont(0.5) WITHIN GROUP (ORDER BY f9()), sum(1) OVER (PARTITION BY f10() ORDER BY f11()) \
             FROM f12() a, LATERAL f13(a) b, ROWS FROM (f14()) c, (VALUES (f15())) d, t TABLESAMPLE SYSTEM (f16()) \
             JOIN u ON f17() WHERE EXISTS (SELECT f18()) GROUP BY ROLLUP (f19()) HAVING f20() ORDER BY f21() LIMIT f22() OFFSET f23()",
            "WITH w AS (SELECT f1()) SELECT * FROM w, XMLTABLE('/a' PASSING f2() COLUMNS x int PATH f3()) x UNION SELECT f4() FOR UPDATE",
            "SELECT * FROM JSON_TABLE(f1(), '$' COLUMNS (a int PATH '$.a')) j, t WHERE (a, b) = (f2(), f3()) AND a = ANY (f4()) AND a IN (f5())",
            "VALUES (f1()), (f2())",
            "SELECT f1() INTO TEMP t FROM u WHERE f2()",
            "WITH w AS (SELECT f1()) INSERT INTO t (a) SELECT f2() FROM w ON CONFLICT (a) WHERE f3() DO UPDATE SET a = f4() WHERE f5()",
            "INSERT INTO t VALUES (f1(), DEFAULT) ON CONFLICT DO NOTHING",
            "WITH w AS (SELECT f1()) UPDATE t SET a = f2(), (b, c) = (SELECT f3(), f4()) FROM f5() x WHERE f6()",
            "WITH w AS (SELECT f1()) DELETE FROM t USING f2() x WHERE f3()",
            "MERGE INTO t USING (SELECT f1() AS a) s ON t.a = f2() WHEN MATCHED AND f3() THEN UPDATE SET a = f4() \
             WHEN NOT MATCHED AND f5() THEN INSERT (a) VALUES (f6()) WHEN MATCHED THEN DELETE",
            "SET search_path = a, b",
            "NOTIFY c, 'x'",
            "LOCK TABLE t IN ACCESS SHARE MODE",
            "VACUUM (ANALYZE) t (a)",
        ];
        for sql in SQL {
            let summary = pg_query::summary(sql, pg_query::ParserOptions::default(), -1).unwrap();
            let top = summary.statement_types[0].as_str();
            assert!(
                SUMMARY_SEES_ALL.contains(&top),
                "{top} is not trusted: {sql}"
            );
            let tree = pg_query::parse(sql, pg_query::ParserOptions::default()).unwrap();
            let mut found = Found::default();
            found.walk(&serde_json::to_value(&tree.protobuf).unwrap());
            for f in &found.functions {
                assert!(
                    summary.functions.iter().any(|s| &s.name == f),
                    "the summary of {top} misses {f}(): {sql}"
                );
            }
        }
    }

    #[test]
    fn read_write_transactions_are_noticed() {
        for (sql, rw) in [
            ("BEGIN READ WRITE", true),
            (
                "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
                true,
            ),
            ("SET TRANSACTION READ WRITE", true),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
                true,
            ),
            ("BEGIN", false),
            ("BEGIN READ ONLY", false),
            ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", false),
        ] {
            assert_eq!(analyze(sql).unwrap().statements[0].read_write, rw, "{sql}");
        }
    }

    /// Where libpg_query's summary does not look, the walk does: these are
    /// refused for the function they would run.
    #[test]
    fn calls_the_summary_misses_are_found() {
        for (sql, f) in [
            ("DECLARE c CURSOR FOR SELECT f_wipe() FROM t", "f_wipe"),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT pg_read_file('/etc/passwd')",
                "pg_read_file",
            ),
            ("EXECUTE p(pg_terminate_backend(1))", "pg_terminate_backend"),
            ("CREATE TEMP TABLE t (a int DEFAULT f_wipe())", "f_wipe"),
            ("CREATE TEMP TABLE t (a int CHECK (f_wipe()))", "f_wipe"),
            (
                "ALTER TABLE t ALTER COLUMN a SET DEFAULT f_wipe()",
                "f_wipe",
            ),
            ("COPY audit_log FROM STDIN WHERE f_wipe() IS NULL", "f_wipe"),
            ("CREATE TEMP TABLE t AS EXECUTE p(pg_sleep(1))", "pg_sleep"),
            ("EXPLAIN ANALYZE EXECUTE p(f_wipe())", "f_wipe"),
            (
                "INSERT INTO audit_log VALUES ('x') RETURNING pg_read_file('/etc/passwd')",
                "pg_read_file",
            ),
            (
                "WITH x AS (DELETE FROM t ReTuRnInG f_wipe()) SELECT * FROM x",
                "f_wipe",
            ),
            ("UPDATE t SET a = 1 RETURNING (SELECT f_wipe())", "f_wipe"),
            (
                "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE RETURNING f_wipe()",
                "f_wipe",
            ),
            (
                "CREATE TRIGGER g BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f_audit()",
                "f_audit",
            ),
        ] {
            let a = analyze(sql).unwrap();
            assert!(
                a.statements[0].functions.iter().any(|(n, _)| n == f),
                "{f} not found in {sql}: {:?}",
                a.statements[0]
            );
        }
        let a =
            analyze("DECLARE c CURSOR FOR WITH w AS (SELECT 1) SELECT * FROM w, secrets").unwrap();
        assert_eq!(a.statements[0].reads, vec!["secrets".to_owned()]);
        let a =
            analyze("INSERT INTO audit_log VALUES ('x') RETURNING (SELECT api_key FROM secrets)")
                .unwrap();
        assert_eq!(a.statements[0].reads, vec!["secrets".to_owned()]);
        // A rule's actions write where they say.
        let a = analyze("CREATE RULE r AS ON INSERT TO t DO ALSO (DELETE FROM orders; UPDATE public.users SET a = 1)").unwrap();
        assert_eq!(
            a.statements[0].writes,
            vec!["orders".to_owned(), "public.users".to_owned()]
        );
    }

    #[test]
    fn redaction_keeps_the_statement_and_drops_the_values() {
        assert_eq!(
            redact_literals("UPDATE users SET ssn = '123-45-6789', age = 42 WHERE id = 7"),
            "UPDATE users SET ssn = $1, age = $2 WHERE id = $3"
        );
        assert_eq!(
            redact_literals("SELECT $q$secret$q$, E'x', 1.5"),
            "SELECT $1, $2, $3"
        );
        let garbage = redact_literals("SELEC 'card 4111111111111111'");
        assert!(!garbage.contains("4111"), "{garbage}");
    }

    fn one(sql: &str) -> Statement {
        let mut a = analyze(sql).unwrap();
        assert_eq!(a.statements.len(), 1, "{sql}");
        a.statements.remove(0)
    }

    #[test]
    fn kinds() {
        for (sql, kind) in [
            ("SELECT 1", Kind::Read),
            ("SELECT 'drop table users'", Kind::Read),
            ("-- DROP TABLE x\nSELECT count(*) FROM users", Kind::Read),
            ("EXPLAIN DELETE FROM orders", Kind::Read),
            ("EXPLAIN ANALYZE DELETE FROM orders", Kind::Write),
            ("EXPLAIN (ANALYZE false) DELETE FROM orders", Kind::Read),
            ("EXPLAIN (ANALYZE) DELETE FROM orders", Kind::Write),
            (
                "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
                Kind::Write,
            ),
            ("DROP/**/TABLE/**/users", Kind::Ddl),
            ("SET statement_timeout = '5s'", Kind::Session),
            ("SET ROLE postgres", Kind::Privilege),
            ("SET SESSION AUTHORIZATION postgres", Kind::Privilege),
            ("RESET ROLE", Kind::Privilege),
            ("SET LOCAL search_path = evil", Kind::Privilege),
            ("SET search_path TO public", Kind::Session),
            ("SET search_path = \"$user\", public", Kind::Session),
            ("SET search_path = pg_catalog, public", Kind::Session),
            ("SET search_path = public, pg_catalog", Kind::Privilege),
            ("SET search_path = public, evil", Kind::Privilege),
            ("SET search_path = 'public, evil'", Kind::Privilege),
            ("SET search_path = public, pg_temp", Kind::Privilege),
            ("RESET search_path", Kind::Session),
            ("SET search_path TO DEFAULT", Kind::Session),
            (
                "SELECT set_config('search_path', 'evil, public', false)",
                Kind::Privilege,
            ),
            (
                "SELECT set_config('role', 'postgres', false)",
                Kind::Privilege,
            ),
            (
                "SELECT set_config('statement_timeout', '5s', false)",
                Kind::Session,
            ),
            (
                "SELECT 1 WHERE set_config(current_user, 'x', false) IS NULL",
                Kind::Privilege,
            ),
            (
                "SELECT pg_catalog.set_config('ROLE', 'x', false)",
                Kind::Privilege,
            ),
            ("COPY (SELECT 1) TO PROGRAM 'id'", Kind::Privilege),
            ("COPY orders TO '/tmp/x'", Kind::Privilege),
            ("COPY orders TO STDOUT", Kind::Read),
            ("COPY orders FROM STDIN", Kind::Write),
            ("SELECT * INTO t FROM users", Kind::Ddl),
            ("DO $$ BEGIN END $$", Kind::Privilege),
            ("CALL p()", Kind::Privilege),
            ("SELECT f_wipe()", Kind::Privilege),
            ("SELECT ARRAY[pg_read_file('x')]", Kind::Privilege),
            ("SELECT * FROM pg_authid", Kind::Privilege),
            ("BEGIN", Kind::Transaction),
            ("PREPARE TRANSACTION 'x'", Kind::Utility),
            ("ANALYZE users", Kind::Maintenance),
            ("VACUUM (VERBOSE) users", Kind::Maintenance),
            ("GRANT pg_read_server_files TO agent", Kind::Privilege),
            ("ALTER SYSTEM SET log_statement = 'none'", Kind::Privilege),
            ("SELECT nextval('s')", Kind::Write),
            ("TRUNCATE orders", Kind::Write),
            ("LISTEN x", Kind::Session),
            ("PREPARE x AS DELETE FROM orders", Kind::Write),
            (
                "SELECT query_to_xml('select 1', true, true, '')",
                Kind::Privilege,
            ),
        ] {
            assert_eq!(one(sql).kind(), kind, "{sql}: {:?}", one(sql));
        }
    }

    #[test]
    fn tables_and_temp() {
        let s = one("CREATE TEMP TABLE scratch(a int)");
        assert_eq!(s.creates_temp, vec!["scratch"]);
        let s = one("CREATE TABLE pg_temp.scratch(a int)");
        assert_eq!(s.creates_temp, vec!["scratch"]);
        let s = one("CREATE TABLE scratch(a int)");
        assert!(s.creates_temp.is_empty());
        let s = one("DROP TABLE scratch, public.users");
        assert_eq!(s.drops_tables, vec!["scratch", "public.users"]);
        let s = one("CREATE TEMP VIEW v AS SELECT * FROM orders");
        assert!(s.creates_temp.is_empty());
        assert_eq!(s.creates_temp_views, vec!["v"]);
        assert_eq!(
            one("CREATE VIEW pg_temp.v AS SELECT 1").creates_temp_views,
            vec!["v"]
        );
        assert!(
            one("CREATE VIEW v AS SELECT 1")
                .creates_temp_views
                .is_empty()
        );
        assert_eq!(one("DROP VIEW v").drops_tables, vec!["v"]);
        assert_eq!(one("ALTER TABLE t RENAME COLUMN a TO b").ddl, vec!["t"]);
        assert_eq!(
            one("ALTER TABLE s.t RENAME CONSTRAINT c TO d").ddl,
            vec!["s.t"]
        );
        let s = one("INSERT INTO audit_log SELECT id::text FROM users");
        assert_eq!(s.writes, vec!["audit_log"]);
        assert_eq!(s.reads, vec!["users"]);
        let s = one("SELECT * INTO TEMP t2 FROM users");
        assert_eq!(s.creates_temp, vec!["t2"]);
    }

    #[test]
    fn multi_and_lexer_tricks() {
        let a = analyze("SELECT $a$ ; $a$; DROP TABLE orders; SELECT $b$ $a$ $b$").unwrap();
        assert_eq!(a.statements.len(), 3);
        assert_eq!(a.statements[1].kind(), Kind::Ddl);
        assert!(analyze("SELEC 1").is_err());
        assert!(analyze("").is_ok_and(|a| a.statements.is_empty()));
    }

    #[test]
    fn deep_trees_are_analysed_not_crashed() {
        // Deeper than a 2 MiB stack holds when the tree is decoded, shallow
        // enough for libpg_query to accept; and beyond what it accepts.
        for n in [300, 5000] {
            let sql = format!(
                "COPY (SELECT {}1{}) TO STDOUT",
                "CASE WHEN true THEN ".repeat(n),
                " END".repeat(n)
            );
            let deep = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || analyze(&sql).map(|a| a.statements[0].kind()))
                .unwrap()
                .join()
                .unwrap();
            match n {
                300 => assert_eq!(deep, Ok(Kind::Read)),
                _ => assert!(deep.is_err()),
            }
        }
    }

    #[test]
    fn prepare_and_execute_names() {
        let a = analyze("PREPARE q(int) AS SELECT 1; EXECUTE q(1); DEALLOCATE q").unwrap();
        assert_eq!(a.statements[0].prepares.as_deref(), Some("q"));
        assert_eq!(a.statements[1].executes.as_deref(), Some("q"));
        assert_eq!(a.statements[2].deallocates.as_deref(), Some("q"));
    }

    #[test]
    fn cache_returns_same_analysis() {
        let an = Analyzer::new(4);
        let a = an.analyze("SELECT 1");
        let b = an.analyze("SELECT 1");
        assert!(Arc::ptr_eq(&a, &b));
    }

    fn kind_of(a: &SharedAnalysis) -> Kind {
        a.as_ref().as_ref().unwrap().statements[0].kind()
    }

    #[test]
    fn shapes_share_only_literal_free_analyses() {
        let an = Analyzer::new(16);
        let a = an.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 17");
        let b = an.analyze("select abalance FROM pgbench_accounts WHERE aid = 99 -- hi");
        // Keywords keep their spelling: same meaning, another shape.
        assert!(!Arc::ptr_eq(&a, &b));
        let c = an.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 123456789");
        assert!(Arc::ptr_eq(&a, &c), "only the literal differs");
        let d = an.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = /* x */ 'x'");
        assert!(
            !Arc::ptr_eq(&a, &d),
            "a string literal is another token kind"
        );

        // Quoted identifiers keep case and quotes.
        let e = an.analyze("SELECT * FROM \"Users\" WHERE id = 1");
        let f = an.analyze("SELECT * FROM \"users\" WHERE id = 1");
        assert!(!Arc::ptr_eq(&e, &f));

        // Literals inside options decide these: never shared by shape.
        let g = an.analyze("EXPLAIN (ANALYZE 0) DELETE FROM orders");
        let h = an.analyze("EXPLAIN (ANALYZE 1) DELETE FROM orders");
        assert_eq!((kind_of(&g), kind_of(&h)), (Kind::Read, Kind::Write));
        let i = an.analyze("SELECT set_config('statement_timeout', '1s', false)");
        let j = an.analyze("SELECT set_config('role', 'postgres', false)");
        assert_eq!((kind_of(&i), kind_of(&j)), (Kind::Session, Kind::Privilege));
        let k = an.analyze("SELECT 1; EXPLAIN (ANALYZE off) DELETE FROM orders");
        let l = an.analyze("SELECT 2; EXPLAIN (ANALYZE on) DELETE FROM orders");
        assert!(!Arc::ptr_eq(&k, &l));
        assert_eq!(
            l.as_ref().as_ref().unwrap().statements[1].kind(),
            Kind::Write
        );

        // Errors are remembered by exact text only.
        let m = an.analyze("SELEC 1");
        let n = an.analyze("SELEC 2");
        assert!(m.is_err() && n.is_err() && !Arc::ptr_eq(&m, &n));
    }

    #[test]
    fn a_session_reuses_its_last_analysis_only_for_a_shared_shape() {
        let an = Analyzer::new(16);
        let mut last = LastAnalysis::default();
        let mut after = |sql: &str| an.analyze_after(sql, &mut last).clone();
        let a = after("SELECT abalance FROM t WHERE aid = 1");
        let b = after("SELECT abalance FROM t WHERE aid = 2");
        assert!(Arc::ptr_eq(&a, &b));
        let c = after("SELECT abalance FROM u WHERE aid = 2");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.as_ref().as_ref().unwrap().statements[0].reads, ["u"]);
        // One shape, but a literal decides what these do.
        let g = after("EXPLAIN (ANALYZE 0) DELETE FROM orders");
        let h = after("EXPLAIN (ANALYZE 1) DELETE FROM orders");
        assert_eq!((kind_of(&g), kind_of(&h)), (Kind::Read, Kind::Write));
        // A text the quick reading leaves to the scanner is never reused.
        let i = after("SELECT 1 FROM t -- a");
        let j = after("SELECT 1 FROM u -- a");
        assert!(!Arc::ptr_eq(&i, &j));
    }

    #[test]
    fn shape_keeps_statement_boundaries() {
        // The same characters, split into other tokens.
        for (a, b) in [
            ("SELECT 'a;b'", "SELECT 'a';b"),
            (
                "SELECT $q$x$q$; DROP TABLE t",
                "SELECT $q$x; DROP TABLE t$q$",
            ),
            ("SELECT 2 @-1", "SELECT 2 @ -1"),
        ] {
            assert_ne!(shape(a), shape(b), "{a} / {b}");
        }
        assert_eq!(shape("SELECT 'a;b'"), shape("SELECT $q$x; DROP TABLE t$q$"));
        assert_eq!(shape("SELECT 'a' /* c */"), shape("SELECT 'bbb'"));
        assert_eq!(shape("SELECT\t1"), shape("SELECT  22"));
        for edge in ["--x", "/* */", "\u{a0}x", ";", "\u{b}x", "$1"] {
            assert!(shape(edge).is_some(), "{edge:?}");
        }
        for nothing in ["", " \t\r\n\u{b}\u{c}", "/*", "'"] {
            assert!(shape(nothing).is_none(), "{nothing:?}");
        }
        // The scanner splits a trailing sign off an operator, as PostgreSQL does.
        assert_eq!(shape("SELECT a+-1"), shape("SELECT a + -1"));
    }
}
