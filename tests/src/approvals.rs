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

/// An HTTPS client that trusts the PEM CAs given and follows no redirects
/// (the tests look at each hop).
fn https_client(ca_files: &[&Path]) -> Result<reqwest::blocking::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in ca_files {
        for cert in rustls_pemfile_certs(&std::fs::read(ca)?)? {
            roots.add(cert)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The `name=value` part of a response's Set-Cookie for `name`.
fn set_cookie(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|kv| kv.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn location(resp: &reqwest::blocking::Response) -> Result<String> {
    Ok(resp
        .headers()
        .get("location")
        .context("no Location in a redirect")?
        .to_str()?
        .to_owned())
}

/// One console sign-in through the test issuer, hop by hop, as a browser
/// makes it: the console's redirect to the issuer, the issuer's form
/// posted as `email`, and the redirect back.
pub struct OidcSignIn {
    http: reqwest::blocking::Client,
    base: String,
    /// The `interceptor_sso=STATE` cookie the console set.
    pub state_cookie: String,
    /// The issuer's redirect back to the console, with code and state.
    pub callback: String,
}

impl OidcSignIn {
    /// Signs in at the issuer as `email` (`cancel`: presses Cancel).
    pub fn start(
        base: &str,
        ca_file: &Path,
        issuer_ca: &Path,
        email: &str,
        cancel: bool,
    ) -> Result<OidcSignIn> {
        let http = https_client(&[ca_file, issuer_ca])?;
        let begin = http.get(format!("{base}/login/oidc")).send()?;
        if !begin.status().is_redirection() {
            bail!("/login/oidc answered {}: {}", begin.status(), begin.text()?);
        }
        let state_cookie = set_cookie(&begin, "interceptor_sso").context("no state cookie")?;
        let authorize = reqwest::Url::parse(&location(&begin)?)?;
        let form_page = http.get(authorize.clone()).send()?;
        if !form_page.status().is_success() {
            bail!(
                "the issuer answered {}: {}",
                form_page.status(),
                form_page.text()?
            );
        }
        let q: std::collections::HashMap<String, String> =
            authorize.query_pairs().into_owned().collect();
        let mut form: Vec<(&str, &str)> = ["redirect_uri", "state", "nonce", "code_challenge"]
            .iter()
            .map(|k| (*k, q.get(*k).map(String::as_str).unwrap_or_default()))
            .collect();
        form.push(("email", email));
        if cancel {
            form.push(("deny", "1"));
        }
        let mut post = authorize.clone();
        post.set_query(None);
        let back = http.post(post).form(&form).send()?;
        if !back.status().is_redirection() {
            bail!(
                "the issuer's form answered {}: {}",
                back.status(),
                back.text()?
            );
        }
        Ok(OidcSignIn {
            callback: location(&back)?,
            http,
            base: base.to_owned(),
            state_cookie,
        })
    }

    /// Follows the redirect back with `cookie` as the browser's state
    /// cookie: the console's status and page, and its login cookie.
    pub fn finish_with(&self, cookie: &str) -> Result<(u16, String, Option<String>)> {
        let resp = self
            .http
            .get(&self.callback)
            .header("cookie", cookie)
            .send()?;
        let status = resp.status().as_u16();
        let login = set_cookie(&resp, "interceptor_console").filter(|c| c.len() > 21);
        Ok((status, resp.text()?, login))
    }

    /// Follows the redirect back as the same browser, into a console
    /// session.
    pub fn finish(&self) -> Result<Console> {
        let (status, page, login) = self.finish_with(&self.state_cookie)?;
        let cookie = login.with_context(|| format!("sign-in answered {status}: {page}"))?;
        Ok(Console {
            http: self.http.clone(),
            base: self.base.clone(),
            cookie,
        })
    }
}

impl Console {
    pub fn login(base: &str, ca_file: &Path, token: &str) -> Result<Console> {
        let http = https_client(&[ca_file])?;
        let resp = http
            .post(format!("{base}/login"))
            .form(&[("token", token)])
            .send()?;
        let cookie =
            set_cookie(&resp, "interceptor_console").context("the console set no login cookie")?;
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
