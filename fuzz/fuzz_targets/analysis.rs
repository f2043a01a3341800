//! Statement analysis on arbitrary bytes: it never panics, whatever it
//! cannot analyse is refused by the session policy (fail closed), and the
//! analysis cache (shared across runs, so texts of one token shape meet)
//! and a session's memory of its last analysis answer exactly as a fresh
//! analysis.

#![no_main]

use libfuzzer_sys::fuzz_target;
use policies::{Analyzer, Check, LastAnalysis, Policy, Principal, SessionPolicy};

fn policy() -> &'static Policy {
    static P: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        Policy::parse(
            include_str!("../../policies/examples/agent.toml"),
            "agent.toml",
        )
        .expect("reference policy")
    })
}

fn analyzer() -> &'static Analyzer {
    static A: std::sync::OnceLock<Analyzer> = std::sync::OnceLock::new();
    A.get_or_init(|| Analyzer::new(4096))
}

fn last() -> std::sync::MutexGuard<'static, LastAnalysis> {
    static L: std::sync::Mutex<LastAnalysis> = std::sync::Mutex::new(LastAnalysis::NONE);
    L.lock().unwrap_or_else(|p| p.into_inner())
}

fuzz_target!(|data: &[u8]| {
    let result = match std::str::from_utf8(data) {
        Ok(sql) => {
            assert!(policies::analysis::quick_shape_agrees(sql), "{sql:?}");
            let fresh = policies::analyze(sql);
            let cached = analyzer().analyze(sql);
            assert_eq!(format!("{cached:?}"), format!("{fresh:?}"));
            let after = analyzer().analyze_after(sql, &mut last()).clone();
            assert_eq!(format!("{after:?}"), format!("{fresh:?}"));
            fresh
        }
        Err(_) => Err(policies::AnalysisError::NotUtf8),
    };
    let p = policy();
    let subject = p.subject(&Principal::default(), "main", "app");
    let mut session = SessionPolicy::new(subject);
    let failed = result.is_err();
    match session.check(p, &result) {
        Check::Refused(_) => {}
        Check::Allowed(rules) => {
            assert!(!failed, "an unanalysable statement was allowed");
            let n = result.as_ref().map_or(0, |a| a.statements.len());
            assert_eq!(rules.len(), n);
        }
    }
});
