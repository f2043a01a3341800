//! Statement analysis on arbitrary bytes: it never panics, and whatever it
//! cannot analyse is refused by the session policy (fail closed).

#![no_main]

use libfuzzer_sys::fuzz_target;
use policies::{Check, Policy, Principal, SessionPolicy};

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

fuzz_target!(|data: &[u8]| {
    let result = match std::str::from_utf8(data) {
        Ok(sql) => policies::analyze(sql),
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
