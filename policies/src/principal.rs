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
}

impl Principal {
    /// A short stable name: the job when there is one, else user and uid.
    /// Used as the upstream `application_name`, so it is kept under
    /// PostgreSQL's 63-byte limit.
    pub fn display_name(&self) -> String {
        let mut s = match (&self.job, self.uid) {
            (Some(job), _) => format!("interceptor:job={job}"),
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
