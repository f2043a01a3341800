//! Reading the public SQL corpus (`bypass-public.json`). Shared by the
//! harness (`interceptor_tests::corpus`), the policies crate's corpus tests
//! (included by path: that crate cannot depend on the harness) and
//! `cargo xtask fuzz`'s seeds.

use std::path::Path;

/// Every case, in file order.
pub fn cases(workspace_root: &Path) -> Vec<serde_json::Value> {
    let path = workspace_root.join("tests/corpus/bypass-public.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
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
