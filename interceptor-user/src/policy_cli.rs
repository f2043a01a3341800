//! `interceptor policy check | explain | schema`.

use std::fmt::Write;

use policies::analysis::Analysis;
use policies::{Check, Policy, Principal, SessionPolicy};

use crate::cli::PolicyCommand;

pub fn run(cmd: PolicyCommand) -> Result<String, String> {
    match cmd {
        PolicyCommand::Check { file } => {
            let p = Policy::load(&file).map_err(|e| e.to_string())?;
            Ok(format!("{}: ok\n", p.source))
        }
        PolicyCommand::Schema => Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&policies::policy::schema()).expect("JSON")
        )),
        PolicyCommand::Explain {
            policy,
            sql,
            identity,
            target,
            database,
        } => {
            let policy = Policy::load(&policy).map_err(|e| e.to_string())?;
            let who = parse_identity(&identity)?;
            Ok(explain(&policy, &who, &target, &database, &sql))
        }
    }
}

fn parse_identity(pairs: &[String]) -> Result<Principal, String> {
    let mut p = Principal::default();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("--identity {pair:?}: expected KEY=VALUE"))?;
        let v = v.to_owned();
        match k {
            "user" => p.user = v,
            "uid" => {
                p.uid = Some(
                    v.parse()
                        .map_err(|_| format!("uid {v:?} is not a number"))?,
                )
            }
            "comm" => p.comm = Some(v),
            "exe" => p.exe = Some(v),
            "cgroup" => p.cgroup = Some(v),
            "job" => p.job = Some(v),
            "intercepted" => {
                p.intercepted = v
                    .parse()
                    .map_err(|_| format!("intercepted {v:?}: expected true or false"))?
            }
            k if k.starts_with("ci.") => {
                p.ci.insert(k[3..].to_owned(), v);
            }
            // As if the session had presented a verified token with these
            // claims; a repeated claim is an array claim.
            k if k.starts_with("claim.") => {
                let t = p.token.get_or_insert_with(Default::default);
                let name = &k[6..];
                match name {
                    "iss" => t.issuer = v.clone(),
                    "sub" => t.subject = v.clone(),
                    _ => {}
                }
                t.claims.entry(name.to_owned()).or_default().push(v);
            }
            k => {
                return Err(format!(
                    "--identity: unknown key {k:?} (user, uid, comm, exe, cgroup, job, intercepted, ci.NAME, claim.NAME)"
                ));
            }
        }
    }
    Ok(p)
}

/// The explanation `policy explain` prints: per statement, what it does
/// and which rule decides.
pub fn explain(
    policy: &Policy,
    who: &Principal,
    target: &str,
    database: &str,
    sql: &str,
) -> String {
    let mut out = String::new();
    let subject = policy.subject(who, target, database);
    let _ = writeln!(
        out,
        "identity: {} (groups: {})",
        who.display_name(),
        if subject.group_names.is_empty() {
            "none".to_owned()
        } else {
            subject.group_names.join(", ")
        }
    );
    if policy.require_token() && who.token.is_none() {
        let _ = writeln!(
            out,
            "session: refused (28000): the policy requires a verified OIDC token (give claim.sub=... and other claims)"
        );
        return out;
    }
    let limits = policy.limits_for(&subject);
    if !limits.is_none() {
        let mut parts = Vec::new();
        if let Some((rate, burst)) = limits.rate {
            parts.push(format!("{rate} statements/s (burst {burst})"));
        }
        if let Some(r) = limits.max_rows {
            parts.push(format!("{r} rows per statement"));
        }
        if let Some(b) = limits.max_bytes {
            parts.push(format!("{b} bytes per statement"));
        }
        let _ = writeln!(out, "limits: {}", parts.join(", "));
    }
    let analysis = match policies::analyze(sql) {
        Ok(a) => a,
        Err(e) => {
            let r = policies::Refusal::unparseable(&e);
            let _ = writeln!(out, "decision: deny ({}) {}", r.sqlstate, r.message);
            return out;
        }
    };
    let mut session = SessionPolicy::new(subject);
    let n = analysis.statements.len();
    for (i, st) in analysis.statements.iter().enumerate() {
        let kind = policy.effective_kind(st);
        let _ = writeln!(out, "statement {} of {n}: {} ({kind})", i + 1, st.command);
        let _ = writeln!(out, "  does: {}", policies::policy::describe(st, kind));
        for (label, list) in [
            ("reads", &st.reads),
            ("changes", &st.writes),
            ("ddl", &st.ddl),
        ] {
            if !list.is_empty() {
                let _ = writeln!(out, "  {label}: {}", list.join(", "));
            }
        }
        if !st.functions.is_empty() {
            let f: Vec<String> = st
                .functions
                .iter()
                .map(|(n, c)| {
                    format!(
                        "{n} ({})",
                        serde_json::to_value(c)
                            .unwrap_or_default()
                            .as_str()
                            .unwrap_or("?")
                    )
                })
                .collect();
            let _ = writeln!(out, "  functions: {}", f.join(", "));
        }
        if !st.settings.is_empty() {
            let _ = writeln!(out, "  settings: {}", st.settings.join(", "));
        }
        let one = Ok(Analysis {
            statements: vec![st.clone()],
            fingerprint: 0,
        });
        match session.check(policy, &one) {
            Check::Allowed(rules) => {
                let rule = rules.iter().flatten().next().cloned().unwrap_or_default();
                let _ = writeln!(out, "  decision: allow by rule {rule}");
                let pins = session.take_pins();
                if !pins.is_empty() {
                    let _ = writeln!(
                        out,
                        "  sent as: {} (the session's temporary tables, named so that the server refuses the statement if one is gone)",
                        pins.iter()
                            .map(|p| format!("pg_temp.{p}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Check::Refused(r) => {
                let _ = writeln!(
                    out,
                    "  decision: deny by {} ({}): {}",
                    r.rule
                        .map_or("the default deny".to_owned(), |r| format!("rule {r}")),
                    r.sqlstate,
                    r.message
                );
                if let Some(h) = r.hint {
                    let _ = writeln!(out, "  hint: {h}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_says_what_is_sent_pinned_to_pg_temp() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let policy = Policy::load(&root.join("policies/examples/agent.toml")).unwrap();
        let out = explain(
            &policy,
            &Principal::default(),
            "main",
            "app",
            "CREATE TEMP TABLE s (a int); DELETE FROM s; DROP TABLE users",
        );
        assert_eq!(out.matches("sent as: pg_temp.s ").count(), 1, "{out}");
        assert!(
            out.contains("decision: deny by rule no-schema-changes"),
            "{out}"
        );
    }
}
