//! Masking rules: which values a subject may not see in clear, and what it
//! sees instead.
//!
//! A value is masked when its source column matches a rule (`columns`),
//! when the result column's name does (`names`), when statement lineage
//! says a masked column may flow into it, or when a content detector finds
//! a sensitive value in it (`detectors`). Free of wire types: the proxy
//! says what type and format a value has, and gets the bytes to send.

pub mod detect;
mod strategy;

use std::sync::Arc;

use globset::GlobMatcher;
use schemars::JsonSchema;
use serde::Deserialize;

pub use detect::{Detector, Finding, Scanner};
pub use strategy::{MaskKey, Strategy, ValueType};

use crate::analysis::lineage::Flow;

/// A `[[mask]]` entry of the policy file.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaskSpec {
    /// Named in audit rows and in the counts of masked values.
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The rule masks for sessions in at least one of these groups. Empty:
    /// everyone.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Sessions in any of these groups see the values in clear (an analyst
    /// group may see what an agent may not).
    #[serde(default)]
    pub except_groups: Vec<String>,
    /// Source columns, `schema.table.column` or `table.column` (any schema),
    /// as the catalog spells them; each part may be a glob. Followed
    /// through aliases, expressions, views, subqueries, COPY and prepared
    /// statements.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Result column names (globs, case-insensitive), e.g. `*ssn*`.
    #[serde(default)]
    pub names: Vec<String>,
    /// Content detectors, run over every value and message text the client
    /// would receive: `card`, `ssn`, `email`, `phone`, `iban`,
    /// `aws-key-id`, `aws-secret`, `jwt`, `pem-private-key`, `api-key`,
    /// `high-entropy`.
    #[serde(default)]
    pub detectors: Vec<Detector>,
    /// What the client sees instead (default `redact`).
    #[serde(default)]
    pub strategy: StrategyName,
    /// For `partial`: how many trailing characters stay (default 4).
    #[serde(default)]
    pub keep_last: Option<usize>,
    /// A masked column of a non-text type requested in binary format:
    /// `null` sends NULL, `deny` ends the statement with an error.
    #[serde(default)]
    pub binary: BinaryAction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyName {
    /// `[redacted]` (text), `"[redacted]"` (JSON), NULL (other types).
    #[default]
    Redact,
    /// `****` and the last `keep_last` characters.
    Partial,
    /// A keyed HMAC-SHA256 of the value, 16 hex digits: the same value
    /// always masks the same way, so joins and GROUP BY still work.
    Hmac,
    /// NULL.
    Null,
    /// Digits stay digits and letters letters (keyed, stable); other
    /// characters and the length are kept.
    FormatPreserving,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BinaryAction {
    #[default]
    Null,
    Deny,
}

/// `schema.table.column` with each part a glob; no schema: any.
#[derive(Debug, Clone)]
struct ColumnPattern {
    schema: Option<GlobMatcher>,
    table: GlobMatcher,
    column: GlobMatcher,
}

impl ColumnPattern {
    fn parse(p: &str) -> Result<ColumnPattern, String> {
        let g = |s: &str| {
            globset::Glob::new(s)
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("bad column pattern {p:?}: {e}"))
        };
        let parts: Vec<&str> = p.split('.').collect();
        match parts.as_slice() {
            [t, c] => Ok(ColumnPattern {
                schema: None,
                table: g(t)?,
                column: g(c)?,
            }),
            [s, t, c] => Ok(ColumnPattern {
                schema: Some(g(s)?),
                table: g(t)?,
                column: g(c)?,
            }),
            _ => Err(format!(
                "column pattern {p:?} is not `table.column` or `schema.table.column`"
            )),
        }
    }

    /// `schema` is `None` when the statement did not qualify the table:
    /// then any schema may be meant, and the pattern matches.
    fn matches(&self, schema: Option<&str>, table: &str, column: &str) -> bool {
        self.table.is_match(table)
            && self.column.is_match(column)
            && match (&self.schema, schema) {
                (Some(s), Some(schema)) => s.is_match(schema),
                _ => true,
            }
    }
}

/// One compiled `[[mask]]`.
#[derive(Debug)]
pub struct MaskRule {
    pub id: Arc<str>,
    pub(crate) groups: Vec<usize>,
    pub(crate) except: Vec<usize>,
    columns: Vec<ColumnPattern>,
    names: Vec<GlobMatcher>,
    pub detectors: Vec<Detector>,
    pub strategy: Strategy,
    pub binary: BinaryAction,
}

/// The most mask rules a policy may have (rule sets are 64-bit masks).
pub const MAX_RULES: usize = 64;

impl MaskRule {
    /// `group_index` finds a group by name.
    pub(crate) fn compile(
        spec: &MaskSpec,
        group_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<MaskRule, String> {
        let resolve = |names: &[String]| -> Result<Vec<usize>, String> {
            names
                .iter()
                .map(|n| group_index(n).ok_or_else(|| format!("unknown group {n:?}")))
                .collect()
        };
        if spec.columns.is_empty() && spec.names.is_empty() && spec.detectors.is_empty() {
            return Err("a mask needs `columns`, `names` or `detectors`".into());
        }
        let strategy = match spec.strategy {
            StrategyName::Redact => Strategy::Redact,
            StrategyName::Partial => Strategy::Partial {
                keep_last: spec.keep_last.unwrap_or(4),
            },
            StrategyName::Hmac => Strategy::Hmac,
            StrategyName::Null => Strategy::Null,
            StrategyName::FormatPreserving => Strategy::FormatPreserving,
        };
        if spec.keep_last.is_some() && spec.strategy != StrategyName::Partial {
            return Err("`keep_last` is only for strategy = \"partial\"".into());
        }
        Ok(MaskRule {
            id: spec.id.as_str().into(),
            groups: resolve(&spec.groups)?,
            except: resolve(&spec.except_groups)?,
            columns: spec
                .columns
                .iter()
                .map(|c| ColumnPattern::parse(c))
                .collect::<Result<_, _>>()?,
            names: spec
                .names
                .iter()
                .map(|n| {
                    globset::GlobBuilder::new(n)
                        .case_insensitive(true)
                        .build()
                        .map(|g| g.compile_matcher())
                        .map_err(|e| format!("bad name pattern {n:?}: {e}"))
                })
                .collect::<Result<_, _>>()?,
            detectors: spec.detectors.clone(),
            strategy,
            binary: spec.binary,
        })
    }

    pub(crate) fn applies_to(&self, groups: &[usize]) -> bool {
        (self.groups.is_empty() || self.groups.iter().any(|g| groups.contains(g)))
            && !self.except.iter().any(|g| groups.contains(g))
    }
}

/// A set of mask rules, by their index in [`Masks`].
pub type RuleSet = u64;

/// What may reach one result column (or a message) of masked data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taint {
    /// Column rules whose columns may flow in.
    pub rules: RuleSet,
    /// Lineage cannot see what flows in (query text that is not a
    /// literal, an unknown cursor or prepared statement): fail closed.
    pub unknown: bool,
    /// Code lineage cannot see into (a user function): content detectors
    /// decide.
    pub opaque: bool,
}

impl Taint {
    /// Lineage cannot tell: fail closed.
    pub const UNKNOWN: Taint = Taint {
        rules: 0,
        unknown: true,
        opaque: false,
    };

    pub fn union(self, o: Taint) -> Taint {
        Taint {
            rules: self.rules | o.rules,
            unknown: self.unknown || o.unknown,
            opaque: self.opaque || o.opaque,
        }
    }

    pub fn is_clean(&self) -> bool {
        self.rules == 0 && !self.unknown
    }
}

/// What the catalog knows of a relation named in a statement: a view's
/// output columns with what may flow into each. Tables are `None`.
pub trait Relations {
    fn view_columns(&self, relation: &str) -> Option<Vec<(String, Taint)>>;

    /// (schema, name) of the tables `relation` inherits from or is a
    /// partition of: a column rule on a parent covers its children.
    fn ancestors(&self, _relation: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// No catalog: every relation is taken as a table.
pub struct NoViews;

impl Relations for NoViews {
    fn view_columns(&self, _: &str) -> Option<Vec<(String, Taint)>> {
        None
    }
}

/// The mask rules that apply to one session, ready for the data path.
#[derive(Debug)]
pub struct Masks {
    rules: Vec<Arc<MaskRule>>,
    scanner: Option<Scanner>,
    /// For each detector the scanner runs, the first rule that lists it.
    by_detector: Vec<(Detector, usize)>,
    key: MaskKey,
    /// Some rule masks by source column (lineage is then needed).
    pub by_column: bool,
    /// Some rule masks by result column name.
    pub by_name: bool,
}

impl Masks {
    pub(crate) fn new(rules: Vec<Arc<MaskRule>>, key: MaskKey) -> Masks {
        let mut by_detector: Vec<(Detector, usize)> = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            for d in &r.detectors {
                if !by_detector.iter().any(|(x, _)| x == d) {
                    by_detector.push((*d, i));
                }
            }
        }
        let detectors: Vec<Detector> = by_detector.iter().map(|(d, _)| *d).collect();
        Masks {
            scanner: Scanner::new(&detectors),
            by_column: rules.iter().any(|r| !r.columns.is_empty()),
            by_name: rules.iter().any(|r| !r.names.is_empty()),
            by_detector,
            rules,
            key,
        }
    }

    /// Masks built from explicit rules (tests and benchmarks).
    pub fn from_specs(specs: &[MaskSpec], key: MaskKey) -> Result<Masks, String> {
        let rules = specs
            .iter()
            .map(|s| MaskRule::compile(s, |_| None).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Masks::new(rules, key))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rule(&self, i: usize) -> &MaskRule {
        &self.rules[i]
    }

    pub fn scanner(&self) -> Option<&Scanner> {
        self.scanner.as_ref()
    }

    /// The column rules matching a source column.
    pub fn column_rules(&self, schema: Option<&str>, table: &str, column: &str) -> RuleSet {
        let mut set = 0;
        for (i, r) in self.rules.iter().enumerate() {
            if r.columns.iter().any(|p| p.matches(schema, table, column)) {
                set |= 1 << i;
            }
        }
        set
    }

    /// Whether any column rule names a column of `table`.
    fn table_rules(&self, schema: Option<&str>, table: &str) -> RuleSet {
        let mut set = 0;
        for (i, r) in self.rules.iter().enumerate() {
            if r.columns.iter().any(|p| {
                p.table.is_match(table)
                    && match (&p.schema, schema) {
                        (Some(s), Some(schema)) => s.is_match(schema),
                        _ => true,
                    }
            }) {
                set |= 1 << i;
            }
        }
        set
    }

    /// The first rule matching a result column's name.
    pub fn name_rule(&self, name: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.names.iter().any(|g| g.is_match(name)))
    }

    /// The rule that masks a tainted value: the first in file order among
    /// those that may flow in; when lineage cannot tell, the first column
    /// rule of all.
    pub fn rule_for(&self, taint: &Taint) -> Option<usize> {
        if taint.rules != 0 {
            return Some(taint.rules.trailing_zeros() as usize);
        }
        if taint.unknown {
            return self.rules.iter().position(|r| !r.columns.is_empty());
        }
        None
    }

    /// The rule whose strategy masks what `detector` found.
    pub fn detector_rule(&self, detector: Detector) -> usize {
        self.by_detector
            .iter()
            .find(|(d, _)| *d == detector)
            .map_or(0, |(_, i)| *i)
    }

    /// What may flow into `flow`, a value built from `relations` (the
    /// relations its statement reads: an unqualified column may belong to
    /// any of them).
    pub fn taint(&self, flow: &Flow, relations: &[String], views: &dyn Relations) -> Taint {
        let mut t = Taint {
            rules: 0,
            unknown: flow.unknown,
            opaque: flow.opaque,
        };
        if !self.by_column {
            return t;
        }
        let split = |rel: &str| -> (Option<String>, String) {
            match rel.rsplit_once('.') {
                Some((s, n)) => (Some(s.to_owned()), n.to_owned()),
                None => (None, rel.to_owned()),
            }
        };
        // Planner statistics hold sample values of every column: what
        // flows from them may be any masked value.
        let statistics = |rel: &str| {
            let bare = rel.strip_prefix("pg_catalog.").unwrap_or(rel);
            bare.starts_with("pg_statistic") || bare.starts_with("pg_stats")
        };
        if flow
            .whole
            .iter()
            .chain(flow.columns.iter().filter_map(|(r, _)| r.as_ref()))
            .chain(relations.iter())
            .any(|r| statistics(r))
        {
            t.unknown = true;
        }
        for rel in &flow.whole {
            match views.view_columns(rel) {
                Some(cols) => {
                    for (_, c) in cols {
                        t = t.union(c);
                    }
                }
                None => {
                    let (s, n) = split(rel);
                    t.rules |= self.table_rules(s.as_deref(), &n);
                    for (s, n) in views.ancestors(rel) {
                        t.rules |= self.table_rules(Some(&s), &n);
                    }
                }
            }
        }
        for (rel, column) in &flow.columns {
            let candidates: &[String] = match rel {
                Some(r) => std::slice::from_ref(r),
                None => relations,
            };
            for rel in candidates {
                match views.view_columns(rel) {
                    Some(cols) => {
                        // An unnamed column stands for every column.
                        for (name, c) in cols {
                            if name == *column || name.is_empty() {
                                t = t.union(c);
                            }
                        }
                    }
                    None => {
                        let (s, n) = split(rel);
                        t.rules |= self.column_rules(s.as_deref(), &n, column);
                        for (s, n) in views.ancestors(rel) {
                            t.rules |= self.column_rules(Some(&s), &n, column);
                        }
                    }
                }
            }
        }
        t
    }

    /// The value to send in place of `value` under `rule`; `None`: NULL.
    pub fn mask(&self, rule: usize, ty: ValueType, binary: bool, value: &[u8]) -> Option<Vec<u8>> {
        self.rules[rule]
            .strategy
            .apply(&self.key, ty, binary, value)
    }

    /// The value to send under `rule` when it does not depend on the value
    /// (`Some(None)`: NULL).
    pub fn constant(
        &self,
        rule: usize,
        ty: ValueType,
        binary: bool,
    ) -> Option<Option<&'static [u8]>> {
        self.rules[rule].strategy.constant(ty, binary)
    }

    /// `text` with every detected value masked, or `None` when nothing was
    /// found. `found` gets each finding's rule and detector.
    pub fn scan_text(&self, text: &[u8], found: &mut Vec<(usize, Detector)>) -> Option<Vec<u8>> {
        let scanner = self.scanner.as_ref()?;
        let mut findings = Vec::new();
        scanner.scan(text, &mut findings);
        if findings.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            let rule = self.detector_rule(f.detector);
            out.extend_from_slice(&text[at..f.start]);
            out.extend_from_slice(&self.rules[rule].strategy.apply_span(
                &self.key,
                f.detector,
                &text[f.start..f.end],
            ));
            at = f.end;
            found.push((rule, f.detector));
        }
        out.extend_from_slice(&text[at..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::lineage::lineage;

    fn masks(toml: &str) -> Masks {
        #[derive(Deserialize)]
        struct F {
            mask: Vec<MaskSpec>,
        }
        let f: F = toml::from_str(toml).unwrap();
        Masks::from_specs(&f.mask, MaskKey::from_bytes(b"test key")).unwrap()
    }

    fn reference() -> Masks {
        masks(
            r#"
[[mask]]
id = "keys"
columns = ["secrets.api_key"]
[[mask]]
id = "emails"
columns = ["public.users.email"]
strategy = "partial"
keep_last = 4
[[mask]]
id = "detect"
detectors = ["email", "api-key", "card"]
"#,
        )
    }

    /// The taint of each output column of `sql`'s one statement.
    fn outputs(m: &Masks, sql: &str) -> Vec<Taint> {
        let l = lineage(sql).unwrap();
        let st = &l.statements[0];
        st.outputs
            .as_ref()
            .expect("outputs known")
            .iter()
            .map(|f| m.taint(f, &st.relations, &NoViews))
            .collect()
    }

    fn rules(ts: &[Taint]) -> Vec<RuleSet> {
        ts.iter().map(|t| t.rules).collect()
    }

    #[test]
    fn columns_flow_through_aliases_expressions_and_subqueries() {
        let m = reference();
        assert_eq!(
            rules(&outputs(&m, "SELECT id, api_key AS k FROM secrets")),
            [0, 1]
        );
        assert_eq!(
            rules(&outputs(
                &m,
                "SELECT encode(convert_to(s.api_key, 'UTF8'), 'base64') FROM secrets s"
            )),
            [1]
        );
        assert_eq!(
            rules(&outputs(&m, "SELECT row_to_json(s) FROM secrets s")),
            [1]
        );
        assert_eq!(
            rules(&outputs(
                &m,
                "SELECT string_agg(email, ',') FROM users UNION ALL SELECT 'x'"
            )),
            [2]
        );
        assert_eq!(
            rules(&outputs(
                &m,
                "SELECT upper(x), n FROM (SELECT api_key AS x, id AS n FROM secrets) t"
            )),
            [1, 0]
        );
        assert_eq!(
            rules(&outputs(
                &m,
                "WITH c AS (SELECT email AS e FROM users) SELECT substr(e, 1, 1) FROM c"
            )),
            [2]
        );
        assert_eq!(
            rules(&outputs(
                &m,
                "SELECT (SELECT api_key FROM secrets LIMIT 1), count(*) FROM users"
            )),
            [1, 0]
        );
        assert_eq!(rules(&outputs(&m, "SELECT id, name FROM users")), [0, 0]);
        // The table is not one with masked columns.
        assert_eq!(rules(&outputs(&m, "SELECT email FROM contacts")), [0]);
        assert_eq!(rules(&outputs(&m, "SELECT count(*) FROM users")), [0]);
    }

    #[test]
    fn query_text_is_followed_or_fails_closed() {
        let m = reference();
        let t = outputs(
            &m,
            "SELECT query_to_xml('SELECT api_key FROM secrets', true, true, '')",
        );
        assert_eq!(t[0].rules, 1);
        let t = outputs(
            &m,
            "SELECT query_to_xml(current_setting('x'), true, true, '')",
        );
        assert!(t[0].unknown);
        let t = outputs(&m, "SELECT table_to_xml('secrets', true, true, '')");
        assert_eq!(t[0].rules, 1);
        let t = outputs(&m, "SELECT schema_to_xml('public', true, true, '')");
        assert!(t[0].unknown);
        let t = outputs(&m, "SELECT pg_catalog.database_to_xml(true, true, '')");
        assert!(t[0].unknown);
        let t = outputs(&m, "SELECT my_function(1)");
        assert!(t[0].opaque && t[0].rules == 0);
    }

    #[test]
    fn planner_statistics_may_hold_any_masked_value() {
        let m = reference();
        let t = outputs(
            &m,
            "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'secrets'",
        );
        assert!(t[0].unknown);
        let t = outputs(&m, "SELECT stavalues1 FROM pg_catalog.pg_statistic");
        assert!(t[0].unknown);
    }

    #[test]
    fn groups_choose_rules() {
        let m = reference();
        assert_eq!(
            m.rule_for(&Taint {
                rules: 0b110,
                ..Default::default()
            }),
            Some(1)
        );
        assert_eq!(
            m.rule_for(&Taint {
                unknown: true,
                ..Default::default()
            }),
            Some(0)
        );
    }

    #[test]
    fn detectors_rewrite_spans_with_their_rules_strategy() {
        let m = reference();
        let mut found = Vec::new();
        let out = m
            .scan_text(
                b"key sk_live_0123456789abcdef for bob@example.com",
                &mut found,
            )
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, "key [redacted:api-key] for [redacted:email]");
        assert_eq!(found.len(), 2);
        assert!(m.scan_text(b"nothing here", &mut found).is_none());
    }
}
