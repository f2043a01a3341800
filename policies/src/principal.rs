//! Who a session is: the workload the kernel saw and what the client said.

use std::collections::BTreeMap;

use serde::Serialize;

/// The identity a session's statements are decided for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// The PostgreSQL user name the client logged in as.
    pub user: String,
    /// Whether the kernel redirected the connection (so the fields below
    /// come from the kernel, not from the client).
    pub intercepted: bool,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
    /// The `interceptor run --job` name.
    pub job: Option<String>,
    /// CI variables captured by `interceptor run`.
    pub ci: BTreeMap<String, String>,
    /// The OIDC token the session presented, once its signature, issuer,
    /// audience and validity were checked. `None`: no verified token.
    pub token: Option<TokenIdentity>,
}

/// What a verified OIDC token says about its bearer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TokenIdentity {
    pub issuer: String,
    pub subject: String,
    /// Every top-level claim as strings: a string claim is one value, an
    /// array claim (such as `groups`) is several, numbers and booleans are
    /// written out. Objects are left out.
    pub claims: BTreeMap<String, Vec<String>>,
}

impl TokenIdentity {
    /// Flattens a token's JSON claims.
    pub fn from_claims(
        issuer: String,
        subject: String,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        fn scalar(v: &serde_json::Value) -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                _ => None,
            }
        }
        let claims = claims
            .iter()
            .filter_map(|(k, v)| {
                let values: Vec<String> = match v {
                    serde_json::Value::Array(a) => a.iter().filter_map(scalar).collect(),
                    v => vec![scalar(v)?],
                };
                Some((k.clone(), values))
            })
            .collect();
        TokenIdentity {
            issuer,
            subject,
            claims,
        }
    }

    /// The key rate limits are shared under: one bucket per token subject.
    pub fn key(&self) -> String {
        format!("{} {}", self.issuer, self.subject)
    }
}

impl Principal {
    /// A short stable name: the job when there is one, else user and uid.
    /// Used as the upstream `application_name`, so it is kept under
    /// PostgreSQL's 63-byte limit.
    pub fn display_name(&self) -> String {
        let mut s = match (&self.job, self.uid) {
            (Some(job), _) => format!("interceptor:job={job}"),
            (None, _) if self.token.is_some() => format!(
                "interceptor:sub={}",
                self.token.as_ref().map_or("", |t| t.subject.as_str())
            ),
            (None, Some(uid)) => format!("interceptor:user={} uid={uid}", self.user),
            (None, None) => format!("interceptor:user={}", self.user),
        };
        if s.len() > 63 {
            let mut end = 63;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    }
}

impl Principal {
    /// Sessions with the same key share per-identity rate limits: the
    /// verified token subject, else the job, else the user and uid.
    pub fn limit_key(&self) -> String {
        match (&self.token, &self.job, self.uid) {
            (Some(t), _, _) => format!("token {}", t.key()),
            (None, Some(j), _) => format!("job {j}"),
            (None, None, Some(uid)) => format!("user {} uid {uid}", self.user),
            (None, None, None) => format!("user {}", self.user),
        }
    }
}
