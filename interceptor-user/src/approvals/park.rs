//! The session's side of an approval: a held statement waits here, with
//! the rest of its batch unsent, while the client's connection stays open.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tracing::info;

use super::{ApprovalStore, Outcome, Request, State, binding, event};
use crate::audit::now_us;
use crate::enforce::{Enforcer, Held};
use crate::protocol::frontend::FrontendMessage;
use crate::protocol::{FrameHeader, build, next_frame};
use crate::relay::Injected;
use crate::runtime::{Phase, Shared};

/// Why a parked session ended before a decision reached it.
pub enum Gone {
    Closed,
    Io(std::io::Error),
}

/// A held Parse's batch, up to its Sync or Flush: the parameters its Binds
/// give (with their format, for the binding) and as approvers see them.
type BatchParams = (Vec<Option<Vec<u8>>>, Vec<Option<String>>);

/// `None` while the batch is incomplete.
fn batch_params(buf: &[u8], max: usize, statement: &[u8]) -> Option<BatchParams> {
    let (mut params, mut shown) = (Vec::new(), Vec::new());
    let mut types: Vec<u32> = Vec::new();
    let mut off = 0;
    loop {
        let Ok(Some(FrameHeader { wire_len, .. })) = next_frame(&buf[off..], max) else {
            // Incomplete, or malformed: the relay reports the latter once
            // the batch is released.
            return next_frame(&buf[off..], max)
                .is_err()
                .then_some((params, shown));
        };
        let frame = &buf[off..off + wire_len];
        off += wire_len;
        match FrontendMessage::parse(frame) {
            Ok(FrontendMessage::Parse(p)) if p.name == statement && types.is_empty() => {
                types = p.param_types().collect();
            }
            Ok(FrontendMessage::Bind(b)) if b.statement == statement => {
                let formats: Vec<i16> = b.param_formats().collect();
                for (i, v) in b.params().enumerate() {
                    let format = match formats.len() {
                        0 => 0,
                        1 => formats[0],
                        _ => formats.get(i).copied().unwrap_or(0),
                    };
                    shown.push(v.map(|v| show(format, types.get(i).copied().unwrap_or(0), v)));
                    // The format is part of what is approved: the same
                    // bytes mean different values in text and binary.
                    params.push(v.map(|v| {
                        let mut p = Vec::with_capacity(v.len() + 1);
                        p.push(format as u8);
                        p.extend_from_slice(v);
                        p
                    }));
                }
            }
            Ok(FrontendMessage::Sync | FrontendMessage::Flush) | Err(_) => {
                return Some((params, shown));
            }
            Ok(_) => {}
        }
    }
}

/// A parameter as approvers see it: text as it is, binary values of
/// common types decoded, anything else in hex.
fn show(format: i16, type_oid: u32, v: &[u8]) -> String {
    if format == 0
        && let Ok(text) = std::str::from_utf8(v)
    {
        return text.to_owned();
    }
    let int = |n: usize| -> Option<i64> {
        (v.len() == n).then(|| {
            let mut b = [0u8; 8];
            b[8 - n..].copy_from_slice(v);
            // Sign-extend from n bytes.
            i64::from_be_bytes(b) << (64 - 8 * n) >> (64 - 8 * n)
        })
    };
    let decoded = match type_oid {
        16 => v.first().map(|b| (*b != 0).to_string()),
        21 => int(2).map(|n| n.to_string()),
        23 => int(4).map(|n| n.to_string()),
        20 => int(8).map(|n| n.to_string()),
        700 => v
            .try_into()
            .ok()
            .map(|b: [u8; 4]| f32::from_be_bytes(b).to_string()),
        701 => v
            .try_into()
            .ok()
            .map(|b: [u8; 8]| f64::from_be_bytes(b).to_string()),
        25 | 1043 | 1042 | 19 | 114 => std::str::from_utf8(v).ok().map(str::to_owned),
        3802 => v
            .split_first()
            .filter(|(version, _)| **version == 1)
            .and_then(|(_, j)| std::str::from_utf8(j).ok())
            .map(str::to_owned),
        _ => None,
    };
    decoded.unwrap_or_else(|| format!("\\x{}", crate::audit::cli::hex(v)))
}

/// Cancels the request if the session goes away while it waits (the
/// client disconnects, or the daemon ends the session).
struct Waiting<'a> {
    store: &'a ApprovalStore,
    shared: &'a Shared,
    id: String,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // A daemon that is stopping ends its sessions: the request is then
        // lost with them, as after a crash, rather than withdrawn.
        let (state, what, why) = if *self.shared.phase.borrow() == Phase::Serving {
            (
                State::Cancelled,
                "cancelled",
                "the session ended before a decision",
            )
        } else {
            (
                State::SessionLost,
                "session_lost",
                "the daemon stopped while the statement was held; its session ended",
            )
        };
        if let Some((r, None)) = self.store.close(&self.id, state, why)
            && let Some(a) = &self.shared.audit
        {
            a.record_now(event(&r, what, "interceptor", why));
        }
    }
}

/// Files the request for `held` (at the front of `buf`), tells the client,
/// and waits for the outcome. Reads the client meanwhile, only to notice
/// a disconnect. Returns the held text and the outcome.
#[allow(clippy::too_many_arguments)]
pub async fn park<R: AsyncRead + Unpin>(
    held: Held,
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    shared: &Shared,
    enforcer: &Enforcer,
    notify: &mpsc::Sender<Injected>,
    touch: &(dyn Fn() + Sync),
) -> Result<(String, Outcome), Gone> {
    let (Some(store), Some(ctx)) = (shared.approvals.as_ref(), enforcer.hold_context()) else {
        let outcome = Outcome::Denied {
            id: String::new(),
            by: "interceptor".into(),
            reason: "approvals are not configured".into(),
        };
        return Ok((held.sql, outcome));
    };
    // A Parse is approved with the parameters its batch binds.
    let (mut params, mut shown) = (Vec::new(), Vec::new());
    if let Some(name) = &held.statement {
        loop {
            if let Some(p) = batch_params(buf, max, name) {
                (params, shown) = p;
                break;
            }
            if buf.len() >= max {
                break;
            }
            match rd.read_buf(buf).await {
                Ok(0) => return Err(Gone::Closed),
                Ok(_) => touch(),
                Err(e) => return Err(Gone::Io(e)),
            }
        }
    }
    let runtime = shared.runtime.load();
    let config = runtime
        .config
        .approvals
        .as_ref()
        .map(|a| a.get_ref().clone());
    let timeout = config
        .as_ref()
        .map_or(Duration::from_secs(300), |c| c.timeout);
    let url = config.as_ref().map_or_else(String::new, |c| c.base_url());
    let p = enforcer.principal();
    let principal_key = p.limit_key();
    let mut requester = vec![principal_key.clone(), p.user.clone()];
    if let Some(t) = &p.token {
        requester.push(t.subject.clone());
        if let Some(actor) = t.claims.get("actor") {
            requester.extend(actor.iter().cloned());
        }
    }
    requester.extend(p.job.iter().cloned());
    requester.retain(|n| !n.is_empty());
    requester.dedup();
    let created = now_us();
    let request = Request {
        id: String::new(),
        state: State::Pending,
        created_us: created,
        deadline_us: created + timeout.as_micros() as i64,
        session: ctx.session,
        principal: p.display_name(),
        principal_key: principal_key.clone(),
        requester,
        groups: enforcer.group_names().to_vec(),
        workload: workload(p),
        job: p.job.clone().unwrap_or_default(),
        target: ctx.target.clone(),
        database: ctx.database.clone(),
        user: ctx.user.clone(),
        binding: binding(
            &principal_key,
            &ctx.target,
            &ctx.database,
            &held.sql,
            &params,
        ),
        statement: held.sql.clone(),
        params: shown,
        fingerprint: held.fingerprint,
        rule: held.rule.clone(),
        reason: held.reason.clone(),
        approver_groups: held.needs.groups.clone(),
        approvals_needed: held.needs.count.max(1),
        votes: Vec::new(),
        decided_us: None,
        decided_by: Vec::new(),
        decision_reason: String::new(),
        estimate: None,
        grant_minutes: None,
    };
    let (request, waiting) = store.submit(request);
    let id = request.id.clone();
    if let Some(a) = &shared.audit {
        a.record(event(&request, "requested", "interceptor", &request.reason))
            .await;
    }
    let mut rx = match waiting {
        Ok(rx) => rx,
        Err(granted) => {
            info!(approval = %id, "held statement approved by an earlier grant");
            if let Some(a) = &shared.audit {
                a.record(event(
                    &request,
                    "approved",
                    &request.decided_by.join(", "),
                    &request.decision_reason,
                ))
                .await;
            }
            return Ok((held.sql, granted));
        }
    };
    let mut guard = Waiting {
        store,
        shared,
        id: id.clone(),
        armed: true,
    };
    info!(approval = %id, principal = %request.principal, "statement held for approval");
    super::webhook::notify(&runtime, &request, "requested");
    estimate(shared, store, &runtime, &request, &held, &params);
    let mut notice = BytesMut::new();
    build::notice_with(
        &format!(
            "interceptor: statement held for approval {id}: {}",
            held.reason
        ),
        Some(&format!(
            "Approve or deny it at {url}/approvals/{id} or with `interceptor approvals approve {id}`; this connection waits."
        )),
        Some(&format!(
            "It runs once approved, and is refused if no one decides within {}.",
            humantime::format_duration(timeout)
        )),
        &mut notice,
    );
    let _ = notify.send(Injected::Notice(notice)).await;

    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            r = &mut rx => break r.ok(),
            _ = tokio::time::sleep_until(deadline) => {
                guard.armed = false;
                let why = format!("no decision within {}", humantime::format_duration(timeout));
                match store.close(&id, State::TimedOut, &why) {
                    Some((_, Some(decided))) => break Some(decided),
                    Some((r, None)) => {
                        if let Some(a) = &shared.audit {
                            a.record(event(&r, "timed_out", "interceptor", &why)).await;
                        }
                        super::webhook::notify(&runtime, &r, "timed_out");
                        break Some(Outcome::TimedOut { id: id.clone(), after: timeout });
                    }
                    None => break None,
                }
            }
            r = rd.read_buf(buf), if buf.len() < max => match r {
                // The guard cancels the request.
                Ok(0) => return Err(Gone::Closed),
                Ok(_) => touch(),
                Err(e) => return Err(Gone::Io(e)),
            },
            _ = tick.tick() => touch(),
        }
    };
    guard.armed = false;
    let outcome = outcome.unwrap_or_else(|| Outcome::Denied {
        id: id.clone(),
        by: "interceptor".into(),
        reason: "the request was withdrawn".into(),
    });
    info!(approval = %id, ?outcome, "held statement decided");
    Ok((held.sql, outcome))
}

fn workload(p: &policies::Principal) -> String {
    let mut parts = Vec::new();
    if let Some(pid) = p.pid {
        parts.push(format!("pid {pid}"));
    }
    if let Some(uid) = p.uid {
        parts.push(format!("uid {uid}"));
    }
    if let Some(exe) = &p.exe {
        parts.push(exe.clone());
    }
    if let Some(cg) = &p.cgroup {
        parts.push(format!("cgroup {cg}"));
    }
    if !p.intercepted {
        parts.push("(not intercepted: as the client said)".into());
    }
    parts.join(", ")
}

/// Asks the planner, on the proxy's own connection, how many rows the
/// statement would touch; the request shows it once known.
fn estimate(
    shared: &Shared,
    store: &Arc<ApprovalStore>,
    runtime: &crate::runtime::Runtime,
    request: &Request,
    held: &Held,
    params: &[Option<Vec<u8>>],
) {
    let Some(target) = runtime.targets.get(&request.target) else {
        return;
    };
    let catalog = shared.catalogs.get(
        target,
        &request.database,
        runtime.config.limits.connect_timeout,
        runtime.upstream_mark,
    );
    let (sql, params, id) = (held.sql.clone(), params.to_vec(), request.id.clone());
    let store = store.clone();
    tokio::spawn(async move {
        let text = match catalog.explain(&sql, &params).await {
            Ok(e) => e,
            Err(e) => format!("no estimate: {e}"),
        };
        store.set_estimate(&id, text);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_parameters_are_shown_by_type() {
        assert_eq!(show(1, 21, &[0x07, 0xd0]), "2000");
        assert_eq!(show(1, 23, &(-5i32).to_be_bytes()), "-5");
        assert_eq!(show(1, 20, &7i64.to_be_bytes()), "7");
        assert_eq!(show(1, 16, &[1]), "true");
        assert_eq!(show(1, 3802, b"\x01{\"a\":1}"), "{\"a\":1}");
        assert_eq!(show(0, 0, b"plain"), "plain");
        assert_eq!(show(1, 17, &[0xde, 0xad]), "\\xdead");
    }
}
