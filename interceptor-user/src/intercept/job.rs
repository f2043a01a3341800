//! `interceptor run`: a CI step in its own job cgroup under the tagged
//! parent, with the job's identity recorded for the daemon.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::cgroup;

/// CI variables recorded with a job: GitHub Actions, then GitLab CI.
pub const CI_VARIABLES: &[&str] = &[
    "GITHUB_REPOSITORY",
    "GITHUB_RUN_ID",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_WORKFLOW",
    "GITHUB_JOB",
    "GITHUB_ACTOR",
    "GITHUB_SHA",
    "GITHUB_REF",
    "GITHUB_EVENT_NAME",
    "CI_PROJECT_PATH",
    "CI_JOB_ID",
    "CI_JOB_NAME",
    "CI_PIPELINE_ID",
    "CI_COMMIT_SHA",
    "CI_COMMIT_REF_NAME",
    "GITLAB_USER_LOGIN",
    "CI_SERVER_HOST",
];

/// What `interceptor run` knows about a job, written as
/// `<runtime_dir>/jobs/<cgroup id>.json` (mode 0600) for the daemon.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobRecord {
    pub job: String,
    /// The user CMD runs as.
    pub uid: u32,
    pub user: String,
    /// The job cgroup, relative to the cgroup v2 mount.
    pub cgroup: String,
    pub run_pid: u32,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    /// The CI variables that were set.
    pub ci: BTreeMap<String, String>,
    /// The OIDC token as given; verifying it is the policy layer's job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for JobRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRecord")
            .field("job", &self.job)
            .field("uid", &self.uid)
            .field("user", &self.user)
            .field("cgroup", &self.cgroup)
            .field("ci", &self.ci)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

pub fn record_path(runtime_dir: &Path, cgroup_id: u64) -> PathBuf {
    runtime_dir.join("jobs").join(format!("{cgroup_id}.json"))
}

impl JobRecord {
    pub fn read(runtime_dir: &Path, cgroup_id: u64) -> Option<JobRecord> {
        let text = fs::read_to_string(record_path(runtime_dir, cgroup_id)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

pub enum TokenSource {
    None,
    Env(String),
    File(PathBuf),
    /// The GitHub Actions runner's ID-token endpoint, for this audience.
    GitHubActions {
        audience: String,
    },
}

/// Asks the GitHub Actions runner for an OIDC ID token, as
/// `core.getIDToken()` does: GET the request URL with `audience`, with the
/// request token as bearer; the JWT is in `value`.
fn github_actions_token(audience: &str) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        value: String,
    }
    let var = |name: &str| {
        std::env::var(name).with_context(|| {
            format!("--token-github: {name} is not set (is `permissions: id-token: write` in the workflow?)")
        })
    };
    let url = var("ACTIONS_ID_TOKEN_REQUEST_URL")?;
    let bearer = var("ACTIONS_ID_TOKEN_REQUEST_TOKEN")?;
    let mut url = reqwest::Url::parse(&url)
        .with_context(|| "--token-github: ACTIONS_ID_TOKEN_REQUEST_URL is not a URL")?;
    url.query_pairs_mut().append_pair("audience", audience);
    let tls = crate::tls::https_client_config(None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(10))
            .build()?;
        let resp = client
            .get(url.clone())
            .bearer_auth(bearer)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "--token-github: GET {url}: {}",
                    crate::oidc::error_chain(&e)
                )
            })?;
        if !resp.status().is_success() {
            bail!("--token-github: the runner answered HTTP {}", resp.status());
        }
        let answer: Answer = resp
            .json()
            .await
            .context("--token-github: the runner's answer has no `value`")?;
        Ok(answer.value)
    })
}

pub struct RunOptions {
    pub job: Option<String>,
    pub token: TokenSource,
    pub cgroup: String,
    pub runtime_dir: PathBuf,
    pub command: Vec<String>,
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Runs the command in a fresh job cgroup and returns its exit code
/// (128 + N when it died of signal N, as shells report it).
pub fn run(opts: RunOptions) -> anyhow::Result<i32> {
    let Some((program, args)) = opts.command.split_first() else {
        bail!("give the command to run after `--`");
    };
    let token = match &opts.token {
        TokenSource::None => None,
        TokenSource::Env(var) => Some(
            std::env::var(var)
                .with_context(|| format!("--token-env: environment variable {var} is not set"))?,
        ),
        TokenSource::File(p) => Some(
            fs::read_to_string(p)
                .with_context(|| format!("--token-file: cannot read {}", p.display()))?
                .trim()
                .to_owned(),
        ),
        TokenSource::GitHubActions { audience } => Some(github_actions_token(audience)?),
    };
    let mount = cgroup::cgroup2_mount()?;
    let parent = mount.join(&opts.cgroup);
    if !parent.join("cgroup.procs").exists() {
        bail!(
            "the tagged cgroup {} does not exist: start `interceptor daemon` with an [intercept] section first \
             (running the command untagged would let it reach the database directly)",
            parent.display()
        );
    }
    let job = sanitize(
        opts.job
            .clone()
            .or_else(|| std::env::var("GITHUB_JOB").ok())
            .or_else(|| std::env::var("CI_JOB_NAME").ok())
            .unwrap_or_else(|| "job".into()),
    );
    let pid = std::process::id();
    let dir = parent.join(format!("job-{job}-{pid}"));
    fs::create_dir(&dir).with_context(|| format!("cannot create job cgroup {}", dir.display()))?;
    let original = cgroup::of_process("self").unwrap_or_else(|_| "/".into());
    let result = run_in(&opts, &mount, &dir, job, token, pid, program, args);
    // Leave the job cgroup so it can be removed; the original cgroup may be
    // gone, the root never is.
    if cgroup::move_process(&mount.join(original.trim_start_matches('/')), pid).is_err() {
        let _ = cgroup::move_process(&mount, pid);
    }
    if let Ok(id) = cgroup::id_of(&dir) {
        let _ = fs::remove_file(record_path(&opts.runtime_dir, id));
    }
    cgroup::remove_job(&dir)?;
    result
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    opts: &RunOptions,
    mount: &Path,
    dir: &Path,
    job: String,
    token: Option<String>,
    pid: u32,
    program: &str,
    args: &[String],
) -> anyhow::Result<i32> {
    let cgroup_id = cgroup::id_of(dir)?;
    let (uid, gid) = target_user();
    let record = JobRecord {
        job,
        uid,
        user: user_name(uid),
        cgroup: format!(
            "/{}",
            dir.strip_prefix(mount).unwrap_or(dir).to_string_lossy()
        ),
        run_pid: pid,
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        ci: CI_VARIABLES
            .iter()
            .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
            .collect(),
        token,
    };
    write_record(&opts.runtime_dir, cgroup_id, &record)?;
    cgroup::move_process(dir, pid)?;

    let mut cmd = Command::new(program);
    // So a job can nest cgroups of its own below its job cgroup.
    cmd.args(args).env("INTERCEPTOR_JOB_CGROUP", dir);
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 && uid != 0 {
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    CHILD.store(child.id() as i32, Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: `forward` only calls async-signal-safe functions.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let status = child.wait()?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn write_record(runtime_dir: &Path, cgroup_id: u64, record: &JobRecord) -> anyhow::Result<()> {
    let jobs = runtime_dir.join("jobs");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&jobs)
        .with_context(|| format!("cannot create {}", jobs.display()))?;
    let path = record_path(runtime_dir, cgroup_id);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(&serde_json::to_vec(record)?)?;
    Ok(())
}

/// Under sudo, CMD runs as the user who called sudo: the agent should not
/// run as root just because tagging needed it.
fn target_user() -> (u32, u32) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    match (env("SUDO_UID"), env("SUDO_GID")) {
        (Some(u), Some(g)) => (u, g),
        // SAFETY: no preconditions.
        _ => unsafe { (libc::getuid(), libc::getgid()) },
    }
}

pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn sanitize(name: String) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("job{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_safe_directory_names() {
        assert_eq!(sanitize("build / test".into()), "build___test");
        assert_eq!(sanitize("..".into()), "job..");
        assert_eq!(sanitize(String::new()), "job");
        assert_eq!(sanitize("x".repeat(100)).len(), 64);
    }

    #[test]
    fn debug_hides_the_token() {
        let r = JobRecord {
            job: "j".into(),
            uid: 0,
            user: "root".into(),
            cgroup: "/interceptor/job-j-1".into(),
            run_pid: 1,
            started_at: 0,
            ci: BTreeMap::new(),
            token: Some("eyJsecret".into()),
        };
        assert!(!format!("{r:?}").contains("eyJsecret"));
    }
}
