//! Approvers for tests and the demo: tokens from `interceptor approvals
//! new-token`, and the web console driven the way a browser's forms are.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::proxy::binary;

/// A token and its `[[approvals.approver]]` entry, from the CLI; the
/// approver also goes by `identities` as a requester.
pub fn new_token(name: &str, groups: &[&str], identities: &[&str]) -> Result<(String, String)> {
    let mut cmd = Command::new(binary());
    cmd.args(["approvals", "new-token", "--name", name]);
    for g in groups {
        cmd.args(["--group", g]);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("new-token: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let token = text
        .lines()
        .find_map(|l| l.split_once("it is shown once): ").map(|(_, t)| t.trim()))
        .context("no token in new-token's output")?
        .to_owned();
    let entry = text
        .split_once("\n\n")
        .context("no config entry in new-token's output")?
        .1
        .to_owned();
    if !entry.contains("token_sha256 = \"") || entry.contains(&token) {
        bail!("the config entry must hold the token's hash only: {entry}");
    }
    let identities: Vec<String> = identities.iter().map(|i| format!("\"{i}\"")).collect();
    Ok((
        token,
        format!("{entry}\nidentities = [{}]\n", identities.join(", ")),
    ))
}

/// A signed-in console session, posting the console's own forms over
/// HTTPS verified against the daemon's CA.
pub struct Console {
    http: reqwest::blocking::Client,
    base: String,
    cookie: String,
}

impl Console {
    pub fn login(base: &str, ca_file: &Path, token: &str) -> Result<Console> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(ca_file)?;
        for cert in rustls_pemfile_certs(&pem)? {
            roots.add(cert)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::blocking::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let resp = http
            .post(format!("{base}/login"))
            .form(&[("token", token)])
            .send()?;
        let cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("the console set no login cookie")?
            .to_owned();
        Ok(Console {
            http,
            base: base.to_owned(),
            cookie,
        })
    }

    pub fn page(&self, path: &str) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()?
            .text()?)
    }

    /// The ids of the pending requests, as the console lists them.
    pub fn pending(&self) -> Result<Vec<String>> {
        Ok(self
            .page("/approvals")?
            .split("data-id=\"")
            .skip(1)
            .filter_map(|s| s.split_once('"').map(|(id, _)| id.to_owned()))
            .collect())
    }

    /// Presses Approve or Deny on a request's page, with a reason.
    pub fn decide(&self, id: &str, action: &str, reason: &str) -> Result<()> {
        let page = self.page(&format!("/approvals/{id}"))?;
        let csrf = page
            .split_once("name=\"csrf\" value=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(v, _)| v.to_owned())
            .context("no decision form on the request's page (already decided?)")?;
        let resp = self
            .http
            .post(format!("{}/approvals/{id}/decide", self.base))
            .header("cookie", &self.cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("action", action),
                ("reason", reason),
            ])
            .send()?;
        if !resp.status().is_redirection() {
            bail!("the console answered {}: {}", resp.status(), resp.text()?);
        }
        Ok(())
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?)
}
