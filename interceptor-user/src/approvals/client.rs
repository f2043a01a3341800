//! `interceptor approvals`: the approvers' command line, a client of the
//! daemon's approvals API.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::{Request, when};
use crate::cli::{ApprovalsApi, ApprovalsCommand};
use crate::config::Config;

struct Client {
    http: reqwest::blocking::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(api: &ApprovalsApi) -> anyhow::Result<Client> {
        let config = api.config.as_deref().map(Config::load).transpose()?;
        let approvals = config
            .as_ref()
            .and_then(|c| c.approvals.as_ref().map(|a| a.get_ref().clone()));
        let base = match (&api.url, &approvals) {
            (Some(u), _) => u.trim_end_matches('/').to_owned(),
            (None, Some(a)) => {
                // The daemon listens on all addresses: reach it on loopback.
                let mut a = a.clone();
                if a.listen.ip().is_unspecified() {
                    a.listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                a.base_url()
            }
            (None, None) => bail!(
                "give --url, or --config with an [approvals] section (INTERCEPTOR_CONFIG works too)"
            ),
        };
        let ca = api.ca.clone().or_else(|| {
            config
                .as_ref()
                .map(|c| crate::tls::GeneratedPaths::under(&c.state_dir).ca_cert)
                .filter(|p| p.exists())
        });
        let token = match (&api.token, &api.token_file) {
            (Some(t), _) => t.trim().to_owned(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?
                .trim()
                .to_owned(),
            (None, None) => {
                bail!("give the approver's token: --token-file FILE, or INTERCEPTOR_APPROVER_TOKEN")
            }
        };
        let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
        if base.starts_with("https://") {
            builder =
                builder.use_preconfigured_tls(crate::tls::https_client_config(ca.as_deref())?);
        }
        Ok(Client {
            http: builder.build()?,
            base,
            token,
        })
    }

    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", crate::oidc::error_chain(&e)))?;
        let status = resp.status();
        let value: serde_json::Value = resp
            .json()
            .with_context(|| format!("{url} answered {status} without JSON"))?;
        if !status.is_success() {
            bail!(
                "{}",
                value["error"]
                    .as_str()
                    .unwrap_or(&format!("{url} answered {status}"))
            );
        }
        Ok(value)
    }
}

fn one_line(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > n {
        format!("{}...", flat.chars().take(n).collect::<String>())
    } else {
        flat
    }
}

/// A request for people.
pub fn describe(r: &Request) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "request    {}  ({})", r.id, r.state.as_str());
    let _ = writeln!(out, "statement  {}", r.statement);
    if !r.params.is_empty() {
        let _ = writeln!(out, "parameters {}", r.shown_params());
    }
    let _ = writeln!(
        out,
        "estimate   {}",
        r.estimate.as_deref().unwrap_or("(not known yet)")
    );
    let _ = writeln!(
        out,
        "principal  {} (groups: {})",
        r.principal,
        r.groups.join(", ")
    );
    if !r.job.is_empty() {
        let _ = writeln!(out, "job        {}", r.job);
    }
    if !r.workload.is_empty() {
        let _ = writeln!(out, "workload   {}", r.workload);
    }
    let _ = writeln!(
        out,
        "target     {} / database {} as {}",
        r.target, r.database, r.user
    );
    let _ = writeln!(out, "rule       {}: {}", r.rule, r.reason);
    let _ = writeln!(out, "needs      {}", r.needs());
    let _ = writeln!(
        out,
        "requested  {}, times out {}",
        when(r.created_us),
        when(r.deadline_us)
    );
    for v in &r.votes {
        let _ = writeln!(
            out,
            "approved   by {} at {} {}",
            v.by,
            when(v.ts_us),
            v.reason
        );
    }
    if let Some(d) = r.decided_us {
        let _ = writeln!(
            out,
            "decided    {} at {}: {}",
            if r.decided_by.is_empty() {
                "interceptor".to_owned()
            } else {
                r.decided_by.join(", ")
            },
            when(d),
            r.decision_reason
        );
    }
    let _ = write!(out, "binding    {}", r.binding);
    out
}

pub fn run(command: ApprovalsCommand) -> anyhow::Result<String> {
    use reqwest::Method;
    match command {
        ApprovalsCommand::NewToken { name, groups } => {
            let (token, hash) = super::api::new_token();
            Ok(format!(
                "token (give it to {name}; it is shown once): {token}\n\n\
                 [[approvals.approver]]\nname = {}\ngroups = {}\ntoken_sha256 = \"{hash}\"",
                json!(name),
                json!(groups)
            ))
        }
        ApprovalsCommand::List { api, all, json } => {
            let client = Client::new(&api)?;
            let list: Vec<Request> = serde_json::from_value(client.call(
                Method::GET,
                &format!("/api/approvals{}", if all { "?all=true" } else { "" }),
                None,
            )?)?;
            if json {
                return Ok(list
                    .iter()
                    .map(|r| serde_json::to_string(r).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n"));
            }
            if list.is_empty() {
                return Ok(if all {
                    "no approval requests".into()
                } else {
                    "nothing is waiting for approval".into()
                });
            }
            let mut out = format!(
                "{:<12}  {:<12}  {:<20}  {:<28}  statement",
                "id", "state", "requested", "principal"
            );
            for r in &list {
                let _ = write!(
                    out,
                    "\n{:<12}  {:<12}  {:<20}  {:<28}  {}",
                    r.id,
                    r.state.as_str(),
                    when(r.created_us),
                    one_line(&r.principal, 28),
                    one_line(&r.statement, 60)
                );
            }
            Ok(out)
        }
        ApprovalsCommand::Show { api, id, json } => {
            let client = Client::new(&api)?;
            let value = client.call(Method::GET, &format!("/api/approvals/{id}"), None)?;
            if json {
                return Ok(value.to_string());
            }
            Ok(describe(&serde_json::from_value(value)?))
        }
        ApprovalsCommand::Approve {
            api,
            id,
            reason,
            grant_minutes,
        } => {
            let client = Client::new(&api)?;
            let r: Request = serde_json::from_value(client.call(
                Method::POST,
                &format!("/api/approvals/{id}/approve"),
                Some(json!({"reason": reason, "grant_minutes": grant_minutes})),
            )?)?;
            Ok(match r.state {
                super::State::Approved => format!(
                    "approved {id}: the statement runs now (approved by {})",
                    r.decided_by.join(", ")
                ),
                _ => format!(
                    "recorded your approval of {id}: {} of {} approvals",
                    r.votes.len(),
                    r.approvals_needed
                ),
            })
        }
        ApprovalsCommand::Deny { api, id, reason } => {
            let client = Client::new(&api)?;
            client.call(
                Method::POST,
                &format!("/api/approvals/{id}/deny"),
                Some(json!({"reason": reason})),
            )?;
            Ok(format!(
                "denied {id}: the client gets SQLSTATE 42501 with your reason"
            ))
        }
    }
}
