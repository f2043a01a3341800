//! Approval of held statements.
//!
//! A session whose statement a hold rule caught parks it and files a
//! [`Request`] here; approvers decide it through the daemon's API (the CLI
//! and the web console both use it). The store is the one place requests
//! change state, under one lock, so an approval racing a timeout or a
//! client disconnect has exactly one outcome. Every request is written to
//! `state_dir/approvals/ID.json` as it changes, and survives a restart: a
//! request still pending when the daemon stopped is marked `session_lost`,
//! as the session that held it died with the daemon.

pub mod api;
pub mod client;
pub mod park;
pub mod sso;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing::warn;
use uuid::Uuid;

use crate::audit::{Event, now_us};

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    TimedOut,
    /// The client went away before a decision.
    Cancelled,
    /// The daemon stopped while the request was pending.
    SessionLost,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::TimedOut => "timed_out",
            State::Cancelled => "cancelled",
            State::SessionLost => "session_lost",
        }
    }
}

/// One approver's approval of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub by: String,
    pub reason: String,
    pub ts_us: i64,
}

/// A held statement awaiting (or past) a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub state: State,
    pub created_us: i64,
    /// When it times out if still pending.
    pub deadline_us: i64,
    pub session: Uuid,
    /// The session's principal, as the audit trail names it.
    pub principal: String,
    /// The key grants and rate limits use for the principal.
    pub principal_key: String,
    /// Names the requester goes by (database user, token subject, actor
    /// claim, job): an approver known by any of them cannot approve.
    pub requester: Vec<String>,
    /// The principal's policy groups.
    pub groups: Vec<String>,
    /// The workload the kernel saw, and the CI job.
    pub workload: String,
    pub job: String,
    pub target: String,
    pub database: String,
    pub user: String,
    pub statement: String,
    /// Bind parameters in the held batch, as text (binary ones as hex).
    pub params: Vec<Option<String>>,
    pub fingerprint: u64,
    /// SHA-256 over principal, target, database, statement and parameters:
    /// what the approval covers, exactly.
    pub binding: String,
    /// The hold rule and its reason.
    pub rule: String,
    pub reason: String,
    /// Approver groups that qualify (empty: any approver), and how many
    /// distinct approvers must approve.
    pub approver_groups: Vec<String>,
    pub approvals_needed: u32,
    pub votes: Vec<Vote>,
    pub decided_us: Option<i64>,
    pub decided_by: Vec<String>,
    pub decision_reason: String,
    /// The planner's estimate of rows affected, from EXPLAIN on the
    /// proxy's own connection (nothing is executed).
    pub estimate: Option<String>,
    /// Minutes the approver granted this fingerprint to this principal.
    pub grant_minutes: Option<u32>,
}

impl Request {
    pub fn is_pending(&self) -> bool {
        self.state == State::Pending
    }

    /// "2 approval(s) from dba or sre", for people.
    pub fn needs(&self) -> String {
        let from = if self.approver_groups.is_empty() {
            String::new()
        } else {
            format!(" from {}", self.approver_groups.join(" or "))
        };
        format!("{} approval(s){from}", self.approvals_needed)
    }

    /// `$1 = ..., $2 = ...`, for people.
    pub fn shown_params(&self) -> String {
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| format!("${} = {}", i + 1, p.as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a parked session learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved {
        id: String,
        by: Vec<String>,
    },
    Denied {
        id: String,
        by: String,
        reason: String,
    },
    TimedOut {
        id: String,
        after: std::time::Duration,
    },
}

impl Outcome {
    pub fn id(&self) -> &str {
        match self {
            Outcome::Approved { id, .. }
            | Outcome::Denied { id, .. }
            | Outcome::TimedOut { id, .. } => id,
        }
    }

    /// The error a held statement gets when it does not run.
    pub fn refusal(&self, rule: Option<std::sync::Arc<str>>) -> policies::Refusal {
        let (message, hint) = match self {
            Outcome::Denied { id, by, reason } => (
                format!("interceptor: statement denied by approver {by}: {reason} (approval {id})"),
                None,
            ),
            Outcome::TimedOut { id, after } => (
                format!(
                    "interceptor: statement refused: approval {id} timed out after {} with no decision",
                    humantime::format_duration(*after)
                ),
                Some(
                    "Ask an approver to watch for the request, then run the statement again."
                        .into(),
                ),
            ),
            Outcome::Approved { id, .. } => (
                format!("interceptor: statement refused although approval {id} approved it"),
                None,
            ),
        };
        policies::Refusal {
            sqlstate: "42501",
            message,
            hint,
            rule,
            held: false,
        }
    }
}

/// A `this fingerprint, for this principal, on this target, until` grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub fingerprint: u64,
    pub principal_key: String,
    pub target: String,
    pub until_us: i64,
    pub by: String,
    /// The request it was granted on.
    pub request: String,
}

/// Who is calling the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub name: String,
    pub groups: Vec<String>,
    /// Other names this approver goes by as a requester.
    pub identities: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("no approval request {0}")]
    NotFound(String),
    #[error("request {id} is already {state}")]
    Decided { id: String, state: &'static str },
    #[error("{approver} cannot approve request {id}: it is their own statement")]
    OwnRequest { id: String, approver: String },
    #[error("{approver} is not in an approver group this request needs ({groups})")]
    NotQualified { approver: String, groups: String },
    #[error("{approver} has already approved request {id}; it needs another approver")]
    AlreadyVoted { id: String, approver: String },
    #[error("a denial needs a reason")]
    NoReason,
}

struct Entry {
    request: Request,
    /// The parked session, while it waits.
    waiter: Option<oneshot::Sender<Outcome>>,
}

/// Every request and grant, persisted under `dir`.
pub struct ApprovalStore {
    dir: PathBuf,
    keep: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    grants: Vec<Grant>,
}

/// The binding hash of a held statement.
pub fn binding(
    principal_key: &str,
    target: &str,
    database: &str,
    statement: &str,
    params: &[Option<Vec<u8>>],
) -> String {
    let mut h = Sha256::new();
    for part in [principal_key, target, database, statement] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update((params.len() as u64).to_be_bytes());
    for p in params {
        match p {
            None => h.update(u64::MAX.to_be_bytes()),
            Some(v) => {
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
        }
    }
    crate::audit::cli::hex(&h.finalize())
}

/// A timestamp for approvers, to the second.
pub fn when(us: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + micros(us)).to_string()
}

fn new_id() -> String {
    let n: u64 = rand::random();
    // 12 hex digits: short enough to type, and checked for uniqueness.
    format!("{:012x}", n >> 16)
}

impl ApprovalStore {
    /// Opens (creating) `dir` and loads what an earlier run left. Returns
    /// the store and the requests found pending, now `session_lost`.
    pub fn open(dir: &Path, keep: usize) -> std::io::Result<(ApprovalStore, Vec<Request>)> {
        std::fs::create_dir_all(dir)?;
        let mut inner = Inner::default();
        let mut lost = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                Err(e) => {
                    warn!(path = %path.display(), "approval state unreadable: {e}");
                    continue;
                }
            };
            if path.file_name().is_some_and(|n| n == "grants.json") {
                match serde_json::from_slice(&text) {
                    Ok(g) => inner.grants = g,
                    Err(e) => warn!(path = %path.display(), "grants unreadable, ignored: {e}"),
                }
                continue;
            }
            let mut request: Request = match serde_json::from_slice(&text) {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), "approval request unreadable, ignored: {e}");
                    continue;
                }
            };
            if request.is_pending() {
                request.state = State::SessionLost;
                request.decided_us = Some(now_us());
                request.decision_reason =
                    "the daemon stopped while the statement was held; its session ended".into();
                lost.push(request.clone());
            }
            inner.entries.insert(
                request.id.clone(),
                Entry {
                    request,
                    waiter: None,
                },
            );
        }
        let now = now_us();
        inner.grants.retain(|g| g.until_us > now);
        let store = ApprovalStore {
            dir: dir.to_owned(),
            keep: keep.max(1),
            inner: Mutex::new(inner),
        };
        for r in &lost {
            store.persist(r);
        }
        store.prune();
        Ok((store, lost))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a request atomically (a crash leaves the old or the new file).
    fn persist(&self, r: &Request) {
        let path = self.dir.join(format!("{}.json", r.id));
        if let Err(e) = write_atomic(&path, &serde_json::to_vec_pretty(r).unwrap_or_default()) {
            warn!(path = %path.display(), "cannot save approval request: {e}");
        }
    }

    fn persist_grants(&self, grants: &[Grant]) {
        let path = self.dir.join("grants.json");
        if let Err(e) = write_atomic(
            &path,
            &serde_json::to_vec_pretty(grants).unwrap_or_default(),
        ) {
            warn!(path = %path.display(), "cannot save approval grants: {e}");
        }
    }

    /// Drops the oldest decided requests beyond `keep`.
    fn prune(&self) {
        let mut inner = self.lock();
        let decided: Vec<(i64, String)> = inner
            .entries
            .values()
            .filter(|e| !e.request.is_pending())
            .map(|e| (e.request.created_us, e.request.id.clone()))
            .collect();
        if decided.len() <= self.keep {
            return;
        }
        let mut decided = decided;
        decided.sort();
        for (_, id) in &decided[..decided.len() - self.keep] {
            inner.entries.remove(id);
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        }
    }

    /// Files a request. A live grant for its fingerprint, principal and
    /// target approves it at once (`Err` carries that approval).
    pub fn submit(
        &self,
        mut request: Request,
    ) -> (Request, Result<oneshot::Receiver<Outcome>, Outcome>) {
        let mut inner = self.lock();
        while inner.entries.contains_key(&request.id) || request.id.is_empty() {
            request.id = new_id();
        }
        let now = now_us();
        let grant = inner
            .grants
            .iter()
            .find(|g| {
                g.fingerprint == request.fingerprint
                    && g.principal_key == request.principal_key
                    && g.target == request.target
                    && g.until_us > now
            })
            .cloned();
        if let Some(g) = grant {
            request.state = State::Approved;
            request.decided_us = Some(now);
            request.decided_by = vec![g.by.clone()];
            request.decision_reason = format!(
                "granted by {} on request {} until {}",
                g.by,
                g.request,
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + micros(g.until_us))
            );
            inner.entries.insert(
                request.id.clone(),
                Entry {
                    request: request.clone(),
                    waiter: None,
                },
            );
            drop(inner);
            self.persist(&request);
            let outcome = Outcome::Approved {
                id: request.id.clone(),
                by: request.decided_by.clone(),
            };
            return (request, Err(outcome));
        }
        let (tx, rx) = oneshot::channel();
        inner.entries.insert(
            request.id.clone(),
            Entry {
                request: request.clone(),
                waiter: Some(tx),
            },
        );
        drop(inner);
        self.persist(&request);
        self.prune();
        (request, Ok(rx))
    }

    pub fn get(&self, id: &str) -> Option<Request> {
        self.lock().entries.get(id).map(|e| e.request.clone())
    }

    /// Requests, newest first; only pending ones unless `all`.
    pub fn list(&self, all: bool) -> Vec<Request> {
        let mut v: Vec<Request> = self
            .lock()
            .entries
            .values()
            .filter(|e| all || e.request.is_pending())
            .map(|e| e.request.clone())
            .collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.created_us));
        v
    }

    pub fn grants(&self) -> Vec<Grant> {
        let now = now_us();
        self.lock()
            .grants
            .iter()
            .filter(|g| g.until_us > now)
            .cloned()
            .collect()
    }

    /// The request `id`, if it is still pending.
    fn pending<'a>(inner: &'a mut Inner, id: &str) -> Result<&'a mut Entry, ApprovalError> {
        let entry = inner
            .entries
            .get_mut(id)
            .ok_or_else(|| ApprovalError::NotFound(id.into()))?;
        if !entry.request.is_pending() {
            return Err(ApprovalError::Decided {
                id: id.into(),
                state: entry.request.state.as_str(),
            });
        }
        Ok(entry)
    }

    fn check_approver(r: &Request, who: &Approver) -> Result<(), ApprovalError> {
        let names = std::iter::once(&who.name).chain(&who.identities);
        if names
            .into_iter()
            .any(|n| r.requester.iter().any(|q| q == n))
        {
            return Err(ApprovalError::OwnRequest {
                id: r.id.clone(),
                approver: who.name.clone(),
            });
        }
        if !r.approver_groups.is_empty()
            && !who.groups.iter().any(|g| r.approver_groups.contains(g))
        {
            return Err(ApprovalError::NotQualified {
                approver: who.name.clone(),
                groups: r.approver_groups.join(", "),
            });
        }
        Ok(())
    }

    /// One approver approves. The request is approved (and its session
    /// released) once it has as many approvals as it needs; the returned
    /// request says which.
    pub fn approve(
        &self,
        id: &str,
        who: &Approver,
        reason: &str,
        grant_minutes: Option<u32>,
    ) -> Result<Request, ApprovalError> {
        let mut inner = self.lock();
        let entry = Self::pending(&mut inner, id)?;
        let r = &mut entry.request;
        Self::check_approver(r, who)?;
        if r.votes.iter().any(|v| v.by == who.name) {
            return Err(ApprovalError::AlreadyVoted {
                id: id.into(),
                approver: who.name.clone(),
            });
        }
        let now = now_us();
        r.votes.push(Vote {
            by: who.name.clone(),
            reason: reason.into(),
            ts_us: now,
        });
        if grant_minutes.is_some() {
            r.grant_minutes = grant_minutes;
        }
        let mut new_grant = None;
        if r.votes.len() as u32 >= r.approvals_needed {
            r.state = State::Approved;
            r.decided_us = Some(now);
            r.decided_by = r.votes.iter().map(|v| v.by.clone()).collect();
            r.decision_reason = reason.into();
            if let Some(minutes) = r.grant_minutes.filter(|m| *m > 0) {
                new_grant = Some(Grant {
                    fingerprint: r.fingerprint,
                    principal_key: r.principal_key.clone(),
                    target: r.target.clone(),
                    until_us: now + i64::from(minutes) * 60_000_000,
                    by: r.decided_by.join(", "),
                    request: r.id.clone(),
                });
            }
            if let Some(tx) = entry.waiter.take() {
                let _ = tx.send(Outcome::Approved {
                    id: id.into(),
                    by: entry.request.decided_by.clone(),
                });
            }
        }
        let request = entry.request.clone();
        let grants = new_grant.map(|g| {
            inner.grants.retain(|x| x.until_us > now);
            inner.grants.push(g);
            inner.grants.clone()
        });
        drop(inner);
        self.persist(&request);
        if let Some(g) = grants {
            self.persist_grants(&g);
        }
        Ok(request)
    }

    /// One qualified approver denies: the request is denied at once.
    pub fn deny(&self, id: &str, who: &Approver, reason: &str) -> Result<Request, ApprovalError> {
        if reason.trim().is_empty() {
            return Err(ApprovalError::NoReason);
        }
        let mut inner = self.lock();
        let entry = Self::pending(&mut inner, id)?;
        let r = &mut entry.request;
        // Anyone qualified may refuse, the requester included: a refusal
        // never lets anything run.
        if !r.approver_groups.is_empty()
            && !who.groups.iter().any(|g| r.approver_groups.contains(g))
        {
            return Err(ApprovalError::NotQualified {
                approver: who.name.clone(),
                groups: r.approver_groups.join(", "),
            });
        }
        r.state = State::Denied;
        r.decided_us = Some(now_us());
        r.decided_by = vec![who.name.clone()];
        r.decision_reason = reason.into();
        if let Some(tx) = entry.waiter.take() {
            let _ = tx.send(Outcome::Denied {
                id: id.into(),
                by: who.name.clone(),
                reason: reason.into(),
            });
        }
        let request = entry.request.clone();
        drop(inner);
        self.persist(&request);
        Ok(request)
    }

    /// Ends a pending request from the session's side (`TimedOut` or
    /// `Cancelled`). If an approver decided it first, that decision
    /// stands and is returned.
    pub fn close(&self, id: &str, state: State, why: &str) -> Option<(Request, Option<Outcome>)> {
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id)?;
        if !entry.request.is_pending() {
            let r = &entry.request;
            let outcome = match r.state {
                State::Approved => Some(Outcome::Approved {
                    id: id.into(),
                    by: r.decided_by.clone(),
                }),
                State::Denied => Some(Outcome::Denied {
                    id: id.into(),
                    by: r.decided_by.join(", "),
                    reason: r.decision_reason.clone(),
                }),
                _ => None,
            };
            return Some((r.clone(), outcome));
        }
        entry.waiter = None;
        let r = &mut entry.request;
        r.state = state;
        r.decided_us = Some(now_us());
        r.decision_reason = why.into();
        let request = r.clone();
        drop(inner);
        self.persist(&request);
        Some((request, None))
    }

    /// Adds the planner's estimate once it is known.
    pub fn set_estimate(&self, id: &str, estimate: String) {
        let request = {
            let mut inner = self.lock();
            let Some(e) = inner.entries.get_mut(id) else {
                return;
            };
            e.request.estimate = Some(estimate);
            e.request.clone()
        };
        self.persist(&request);
    }
}

fn micros(us: i64) -> std::time::Duration {
    std::time::Duration::from_micros(us.max(0) as u64)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// The audit event for something that happened to a request.
pub fn event(r: &Request, what: &str, actor: &str, reason: &str) -> Event {
    Event::Approval(Box::new(crate::audit::ApprovalRow {
        session: r.session,
        ts_us: now_us(),
        approval: r.id.clone(),
        event: what.into(),
        actor: actor.into(),
        reason: reason.into(),
        principal: r.principal.clone(),
        target: r.target.clone(),
        database: r.database.clone(),
        statement: r.statement.clone(),
        binding: r.binding.clone(),
        rule: r.rule.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(needed: u32, groups: &[&str], key: &str) -> Request {
        Request {
            id: String::new(),
            state: State::Pending,
            created_us: now_us(),
            deadline_us: now_us() + 60_000_000,
            session: Uuid::nil(),
            principal: "interceptor:job=deploy".into(),
            principal_key: key.into(),
            requester: vec!["job deploy".into(), "agent".into()],
            groups: vec![],
            workload: String::new(),
            job: "deploy".into(),
            target: "main".into(),
            database: "app".into(),
            user: "agent".into(),
            statement: "UPDATE t SET x = 1".into(),
            params: vec![],
            fingerprint: 42,
            binding: binding("job deploy", "main", "app", "UPDATE t SET x = 1", &[]),
            rule: "hold-writes".into(),
            reason: "writes need approval".into(),
            approver_groups: groups.iter().map(|g| g.to_string()).collect(),
            approvals_needed: needed,
            votes: vec![],
            decided_us: None,
            decided_by: vec![],
            decision_reason: String::new(),
            estimate: None,
            grant_minutes: None,
        }
    }

    fn approver(name: &str, groups: &[&str]) -> Approver {
        Approver {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            identities: vec![],
        }
    }

    #[test]
    fn two_approvals_from_qualified_others_release_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = ApprovalStore::open(dir.path(), 10).unwrap();
        let (r, rx) = store.submit(request(2, &["dba"], "job deploy"));
        let mut rx = rx.unwrap();
        let e = store.approve(&r.id, &approver("mallory", &["dev"]), "", None);
        assert!(
            matches!(e, Err(ApprovalError::NotQualified { .. })),
            "{e:?}"
        );
        let mut agent = approver("bob", &["dba"]);
        agent.identities = vec!["agent".into()];
        let e = store.approve(&r.id, &agent, "", None);
        assert!(matches!(e, Err(ApprovalError::OwnRequest { .. })), "{e:?}");
        let one = store
            .approve(&r.id, &approver("alice", &["dba"]), "ok", None)
            .unwrap();
        assert_eq!(one.state, State::Pending);
        assert!(rx.try_recv().is_err());
        let e = store.approve(&r.id, &approver("alice", &["dba"]), "again", None);
        assert!(
            matches!(e, Err(ApprovalError::AlreadyVoted { .. })),
            "{e:?}"
        );
        let two = store
            .approve(&r.id, &approver("carol", &["dba"]), "fine", None)
            .unwrap();
        assert_eq!(two.state, State::Approved);
        assert_eq!(two.decided_by, vec!["alice", "carol"]);
        assert!(matches!(rx.try_recv(), Ok(Outcome::Approved { .. })));
        // Decided is final: a late timeout reports the approval.
        let (_, late) = store.close(&r.id, State::TimedOut, "late").unwrap();
        assert!(matches!(late, Some(Outcome::Approved { .. })));
    }

    #[test]
    fn pending_requests_are_lost_sessions_after_a_restart_and_grants_persist() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = ApprovalStore::open(dir.path(), 10).unwrap();
        let (held, _rx) = store.submit(request(1, &[], "job deploy"));
        let (granted, rx) = store.submit(request(1, &[], "job deploy"));
        drop(rx);
        store
            .approve(&granted.id, &approver("alice", &[]), "ok", Some(30))
            .unwrap();
        drop(store);
        let (store, lost) = ApprovalStore::open(dir.path(), 10).unwrap();
        assert_eq!(lost.len(), 1);
        assert_eq!(store.get(&held.id).unwrap().state, State::SessionLost);
        // The grant approves the same fingerprint for the same principal
        // at once, and only for it.
        let (r, now) = store.submit(request(1, &[], "job deploy"));
        assert!(matches!(now, Err(Outcome::Approved { .. })), "{r:?}");
        let (_, other) = store.submit(request(1, &[], "job other"));
        assert!(other.is_ok());
    }

    #[test]
    fn binding_covers_every_part() {
        let base = binding("p", "t", "d", "UPDATE x", &[Some(b"1".to_vec())]);
        assert_ne!(
            base,
            binding("p", "t", "d", "UPDATE x", &[Some(b"2".to_vec())])
        );
        assert_ne!(base, binding("p", "t", "d", "UPDATE x", &[None]));
        assert_ne!(
            base,
            binding("q", "t", "d", "UPDATE x", &[Some(b"1".to_vec())])
        );
        assert_ne!(
            base,
            binding("p", "t2", "d", "UPDATE x", &[Some(b"1".to_vec())])
        );
        assert_eq!(
            base,
            binding("p", "t", "d", "UPDATE x", &[Some(b"1".to_vec())])
        );
    }
}
