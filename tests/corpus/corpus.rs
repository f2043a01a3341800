//! Reading the SQL corpus: the public `bypass-public.json` and our own
//! `bypass-extra.json`. Shared by the harness (`interceptor_tests::corpus`),
//! the policies crate's corpus tests (included by path: that crate cannot
//! depend on the harness) and `cargo xtask fuzz`'s seeds.

use std::path::Path;

/// Every case, in file order: the public corpus, then ours
/// (`bypass-extra.json`: the same format, with `"source": "extra"`, and an
/// optional `setup` that an admin runs in the fresh database first).
pub fn cases(workspace_root: &Path) -> Vec<serde_json::Value> {
    ["bypass-public.json", "bypass-extra.json"]
        .iter()
        .flat_map(|file| {
            let path = workspace_root.join("tests/corpus").join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let cases: Vec<serde_json::Value> =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cases
        })
        .collect()
}

/// The query strings a case sends, in order: its `sequence`, or its `sql`.
pub fn messages(case: &serde_json::Value) -> Vec<String> {
    match case.get("sequence").and_then(|s| s.as_array()) {
        Some(seq) => seq
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        None => case["sql"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect(),
    }
}
