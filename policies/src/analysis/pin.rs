//! Pinning a session's temporary tables to its temporary schema.
//!
//! A statement allowed because it only changes the session's temporary
//! tables names them as the client wrote them, unqualified. What the
//! session remembers of its temporary tables can be wrong: the CREATE
//! failed, was rolled back, or was `ON COMMIT DROP`; the table went with a
//! `DROP ... CASCADE` of another. The unqualified name then means the
//! permanent table of that name. So the text sent on names them as
//! `pg_temp.name`, and PostgreSQL itself refuses the statement when the
//! session has no such temporary table.

use pg_query::protobuf::{self, node::Node as N};
use serde_json::Value;

use super::{AnalysisError, analyze, on_parse_stack, syntax};

/// Why a text could not be pinned: the statement is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("{0}")]
    Analysis(#[from] AnalysisError),
    #[error("a WITH query is named {0}, like a temporary table the statement changes")]
    CteName(String),
    #[error("it names temporary table {0} in a way interceptor cannot qualify")]
    Unqualified(String),
}

/// `sql` with every unqualified name of a relation in `names` written as
/// `pg_temp.name`: in RangeVars (written, read, altered, locked...) by
/// inserting the schema before the name as the client spelled it, and in
/// DROP TABLE / DROP VIEW by writing the statement anew. Relations the
/// statement itself creates as temporary are left as they are.
///
/// Checked afterwards: analysed again, the text changes no relation of
/// `names` unqualified; otherwise it is refused rather than sent as is.
pub fn pin_temp(sql: &str, names: &[String]) -> Result<String, PinError> {
    let edits = on_parse_stack(|| {
        let parsed = pg_query::parse(sql, pg_query::ParserOptions::default()).map_err(syntax)?;
        let mut edits = Vec::new();
        for raw in &parsed.protobuf.stmts {
            let start = usize::try_from(raw.stmt_location).unwrap_or(0);
            let len = usize::try_from(raw.stmt_len).unwrap_or(0);
            let end = if len == 0 { sql.len() } else { start + len };
            let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
                continue;
            };
            if let N::DropStmt(d) = node
                && let Some(text) = drop_pinned(d, names)
            {
                edits.push(Edit::Replace(start, end, text));
                continue;
            }
            let tree =
                serde_json::to_value(node).map_err(|e| AnalysisError::Resources(e.to_string()))?;
            if let Err(e) = range_var_edits(&tree, names, &mut edits) {
                return Ok(Err(e));
            }
        }
        Ok(Ok(edits))
    })??;
    let pinned = apply(sql, edits);
    verify(&pinned, names)?;
    Ok(pinned)
}

enum Edit {
    /// `pg_temp.` before the byte at this offset.
    Qualify(usize),
    /// The bytes in start..end replaced.
    Replace(usize, usize, String),
}

/// Every RangeVar in `tree` naming one of `names` unqualified. Fields typed
/// RangeVar (a statement's `relation`) serialize without the node's name,
/// so RangeVars are known by their fields.
fn range_var_edits(tree: &Value, names: &[String], edits: &mut Vec<Edit>) -> Result<(), PinError> {
    let mut stack = vec![tree];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(name) = m.get("ctename").and_then(Value::as_str)
                    && names.iter().any(|n| n == name)
                {
                    // Refused rather than guessed: a reference to the name
                    // may mean the WITH query or the table.
                    return Err(PinError::CteName(name.to_owned()));
                }
                if m.contains_key("relpersistence")
                    && let Some(relname) = m.get("relname").and_then(Value::as_str)
                {
                    let text = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default();
                    if text("schemaname").is_empty()
                        && text("catalogname").is_empty()
                        && text("relpersistence") != "t"
                        && names.iter().any(|n| n == relname)
                    {
                        let at = m
                            .get("location")
                            .and_then(Value::as_i64)
                            .and_then(|l| usize::try_from(l).ok())
                            .ok_or_else(|| PinError::Unqualified(relname.to_owned()))?;
                        edits.push(Edit::Qualify(at));
                    }
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    Ok(())
}

/// DROP TABLE / DROP VIEW naming one of `names` unqualified, written anew
/// with those names qualified.
fn drop_pinned(d: &protobuf::DropStmt, names: &[String]) -> Option<String> {
    use protobuf::ObjectType as O;
    let what = match O::try_from(d.remove_type) {
        Ok(O::ObjectTable) => "TABLE",
        Ok(O::ObjectView) => "VIEW",
        _ => return None,
    };
    let mut any = false;
    let mut objects = Vec::with_capacity(d.objects.len());
    for o in &d.objects {
        let Some(N::List(l)) = &o.node else {
            return None;
        };
        let parts: Vec<&str> = l
            .items
            .iter()
            .filter_map(|i| match &i.node {
                Some(N::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        if parts.len() != l.items.len() {
            return None;
        }
        let mut quoted: Vec<String> = parts.iter().map(|p| quote_ident(p)).collect();
        if let [only] = parts.as_slice()
            && names.iter().any(|n| n == only)
        {
            any = true;
            quoted.insert(0, "pg_temp".into());
        }
        objects.push(quoted.join("."));
    }
    if !any {
        return None;
    }
    let behavior = match protobuf::DropBehavior::try_from(d.behavior) {
        Ok(protobuf::DropBehavior::DropCascade) => " CASCADE",
        _ => "",
    };
    Some(format!(
        "DROP {what} {}{}{behavior}",
        if d.missing_ok { "IF EXISTS " } else { "" },
        objects.join(", ")
    ))
}

/// An identifier as PostgreSQL reads it back: always quoted, so that
/// keywords and case survive.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn apply(sql: &str, mut edits: Vec<Edit>) -> String {
    let key = |e: &Edit| match e {
        Edit::Qualify(at) => *at,
        Edit::Replace(start, _, _) => *start,
    };
    // From the end, so that earlier offsets stay right.
    edits.sort_by_key(|e| std::cmp::Reverse(key(e)));
    let mut out = sql.to_owned();
    for e in edits {
        match e {
            Edit::Qualify(at) if out.is_char_boundary(at) => out.insert_str(at, "pg_temp."),
            Edit::Replace(start, end, text)
                if end <= out.len() && out.is_char_boundary(start) && out.is_char_boundary(end) =>
            {
                out.replace_range(start..end, &text)
            }
            _ => {}
        }
    }
    out
}

fn verify(pinned: &str, names: &[String]) -> Result<(), PinError> {
    let analysis = analyze(pinned)?;
    for st in &analysis.statements {
        if let Some(t) = st.changed_tables().find(|t| {
            names.iter().any(|n| n == *t)
                && !st.creates_temp.contains(t)
                && !st.creates_temp_views.contains(t)
        }) {
            return Err(PinError::Unqualified(t.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(sql: &str, names: &[&str]) -> Result<String, PinError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        pin_temp(sql, &names)
    }

    #[test]
    fn writes_and_ddl_name_the_temporary_schema() {
        assert_eq!(
            pin("DELETE FROM orders WHERE id = 1", &["orders"]).unwrap(),
            "DELETE FROM pg_temp.orders WHERE id = 1"
        );
        assert_eq!(
            pin("update ONLY \"Orders\" set a = 1", &["Orders"]).unwrap(),
            "update ONLY pg_temp.\"Orders\" set a = 1"
        );
        assert_eq!(
            pin("INSERT INTO t SELECT * FROM t, public.t", &["t"]).unwrap(),
            "INSERT INTO pg_temp.t SELECT * FROM pg_temp.t, public.t"
        );
        assert_eq!(
            pin("TRUNCATE t, u; ALTER TABLE t ADD b int", &["t"]).unwrap(),
            "TRUNCATE pg_temp.t, u; ALTER TABLE pg_temp.t ADD b int"
        );
        assert_eq!(
            pin("/* x */ drop table if exists t, public.u cascade", &["t"]).unwrap(),
            "/* x */ DROP TABLE IF EXISTS pg_temp.\"t\", \"public\".\"u\" CASCADE"
        );
        assert_eq!(
            pin("SELECT 1; DROP VIEW v; SELECT 2", &["v"]).unwrap(),
            "SELECT 1; DROP VIEW pg_temp.\"v\"; SELECT 2"
        );
        assert_eq!(
            pin(
                "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
                &["t"]
            )
            .unwrap(),
            "WITH d AS (DELETE FROM pg_temp.t RETURNING *) SELECT * FROM d"
        );
        assert_eq!(
            pin("PREPARE p AS DELETE FROM t", &["t"]).unwrap(),
            "PREPARE p AS DELETE FROM pg_temp.t"
        );
        assert_eq!(
            pin("COPY t FROM STDIN", &["t"]).unwrap(),
            "COPY pg_temp.t FROM STDIN"
        );
        // Unicode escapes and multi-byte text before the name.
        assert_eq!(
            pin("SELECT 'é'; DELETE FROM U&\"\\0074\"", &["t"]).unwrap(),
            "SELECT 'é'; DELETE FROM pg_temp.U&\"\\0074\""
        );
    }

    #[test]
    fn what_the_statement_creates_is_left_alone() {
        assert_eq!(
            pin(
                "CREATE TEMP TABLE t (a int); INSERT INTO t VALUES (1)",
                &["t"]
            )
            .unwrap(),
            "CREATE TEMP TABLE t (a int); INSERT INTO pg_temp.t VALUES (1)"
        );
        assert_eq!(
            pin("SELECT * INTO TEMP t FROM orders", &["t"]).unwrap(),
            "SELECT * INTO TEMP t FROM orders"
        );
    }

    #[test]
    fn a_with_query_of_the_same_name_is_refused() {
        assert_eq!(
            pin("WITH t AS (SELECT 1) DELETE FROM t", &["t"]),
            Err(PinError::CteName("t".into()))
        );
    }

    #[test]
    fn a_text_still_changing_an_unqualified_name_is_refused() {
        let names = ["t".to_string()];
        assert_eq!(
            verify("SELECT 1; DELETE FROM t", &names),
            Err(PinError::Unqualified("t".into()))
        );
        assert_eq!(verify("DELETE FROM pg_temp.t", &names), Ok(()));
        assert_eq!(verify("CREATE TEMP TABLE t (a int)", &names), Ok(()));
        assert_eq!(verify("CREATE TEMP VIEW t AS SELECT 1", &names), Ok(()));
    }
}
