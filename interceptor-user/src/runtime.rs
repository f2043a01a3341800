//! Everything derived from one configuration file, swapped as a whole on
//! reload so that a session sees either the old or the new settings, never a
//! mix.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::auth::ScramVerifier;
use crate::cancel::CancelRegistry;
use crate::config::{ClientAuthMethod, Config, Destination, Secret, Target};
use crate::tls::{self, UpstreamConnector};

pub struct TargetRuntime {
    pub config: Target,
    pub client_scram: Option<ScramVerifier>,
    pub client_password: Option<Secret>,
    pub upstream_tls: Option<UpstreamConnector>,
}

#[derive(Clone)]
pub struct Runtime {
    pub config: Config,
    pub client_tls: Option<TlsAcceptor>,
    pub targets: HashMap<String, Arc<TargetRuntime>>,
    /// With `[intercept]`: every redirected destination and its target.
    pub protected: Vec<(Destination, Arc<TargetRuntime>)>,
    /// SO_MARK for upstream sockets (0: none).
    pub upstream_mark: u32,
    /// The statement policy; `None` relays every statement unchecked.
    pub policy: Option<Arc<policies::Policy>>,
    /// Token verification, with `[oidc]`.
    pub oidc: Option<Arc<crate::oidc::Verifier>>,
}

impl Runtime {
    pub fn build(config: Config) -> anyhow::Result<Runtime> {
        let client_tls = tls::client_acceptor(&config.client_tls, &config.state_dir)?;
        let mut targets = HashMap::new();
        for t in &config.targets {
            let t = t.get_ref().clone();
            let secret = match t.client_auth.method {
                ClientAuthMethod::Trust | ClientAuthMethod::Oidc => None,
                _ => Some(t.client_auth.secret().load().map_err(anyhow::Error::msg)?),
            };
            let client_scram = match t.client_auth.method {
                ClientAuthMethod::ScramSha256 => secret
                    .as_ref()
                    .map(|s| ScramVerifier::from_password(s.expose())),
                _ => None,
            };
            let client_password = match t.client_auth.method {
                ClientAuthMethod::Password => secret,
                _ => None,
            };
            let upstream_tls = tls::upstream_connector(&t.upstream_tls, &t.upstream.host)?;
            targets.insert(
                t.name.clone(),
                Arc::new(TargetRuntime {
                    config: t,
                    client_scram,
                    client_password,
                    upstream_tls,
                }),
            );
        }
        let protected = match &config.intercept {
            Some(_) => crate::intercept::protected_destinations(&config)
                .into_iter()
                .filter_map(|(name, d)| Some((d, targets.get(&name)?.clone())))
                .collect(),
            None => Vec::new(),
        };
        let upstream_mark = config.intercept.as_ref().map_or(0, |i| i.get_ref().mark);
        let policy = match &config.policy {
            Some(p) => Some(Arc::new(policies::Policy::load(&p.file)?)),
            None => None,
        };
        let oidc = match &config.oidc {
            Some(o) => Some(Arc::new(crate::oidc::Verifier::new(o.get_ref())?)),
            None => None,
        };
        Ok(Runtime {
            policy,
            oidc,
            config,
            client_tls,
            targets,
            protected,
            upstream_mark,
        })
    }

    /// The kernel trie entries for every protected destination.
    pub fn trie_entries(&self) -> Vec<(u32, common::DestPrefix)> {
        self.protected
            .iter()
            .map(|(d, _)| crate::intercept::trie_entry(d))
            .collect()
    }

    /// The target an intercepted connection was headed for, by the
    /// destination the kernel recorded. Most specific match wins (an exact
    /// address over a network over any host).
    pub fn target_for_origin(
        &self,
        destination: std::net::SocketAddr,
    ) -> Option<Arc<TargetRuntime>> {
        self.protected
            .iter()
            .filter(|(d, _)| d.matches(destination))
            .max_by_key(|(d, _)| d.specificity())
            .map(|(_, t)| t.clone())
    }

    pub fn target_for(
        &self,
        original_destination: std::net::SocketAddr,
    ) -> Option<Arc<TargetRuntime>> {
        let t = self.config.target_for(original_destination)?;
        self.targets.get(&t.name).cloned()
    }
}

/// The daemon's lifecycle as sessions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// SIGTERM: no new connections; sessions may finish.
    Draining,
    /// The grace period is over: sessions end now.
    Closing,
}

/// State shared by every session.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    /// Statement analyses by text; they do not depend on the policy, so
    /// they outlive reloads.
    pub analyzer: policies::Analyzer,
    /// Statement-rate buckets by identity; they outlive reloads.
    pub rate_limiter: crate::limits::RateLimiter,
    pub cancels: CancelRegistry,
    /// The audit trail's spool writer; `None` when audit is off.
    pub audit: Option<crate::audit::Auditor>,
    /// Output-column lineages by statement text, for masking.
    pub lineages: Arc<policies::analysis::lineage::LineageCache>,
    /// Catalog lookups for masking, per target and database.
    pub catalogs: crate::masking::catalog::Catalogs,
    /// The key of keyed masking strategies.
    pub mask_key: policies::masking::MaskKey,
    /// Approval requests, with `[approvals]`.
    pub approvals: Option<Arc<crate::approvals::ApprovalStore>>,
    pub phase: watch::Receiver<Phase>,
    active: AtomicUsize,
    idle: Notify,
}

impl Shared {
    pub fn new(
        runtime: Runtime,
        phase: watch::Receiver<Phase>,
        audit: Option<crate::audit::Auditor>,
        mask_key: policies::masking::MaskKey,
    ) -> Self {
        let cache = runtime
            .config
            .policy
            .as_ref()
            .map_or(1, |p| p.analysis_cache);
        Shared {
            analyzer: policies::Analyzer::new(cache),
            lineages: Arc::new(policies::analysis::lineage::LineageCache::new(cache)),
            catalogs: Default::default(),
            mask_key,
            approvals: None,
            rate_limiter: Default::default(),
            runtime: ArcSwap::from_pointee(runtime),
            cancels: CancelRegistry::default(),
            audit,
            phase,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Counts a session in; `None` when the limit is reached.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<SessionSlot> {
        let mut current = self.active.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match self.active.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(SessionSlot(self.clone())),
                Err(now) => current = now,
            }
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until no session is active.
    pub async fn all_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One admitted session; releases its place when dropped.
pub struct SessionSlot(Arc<Shared>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves once the daemon has reached `phase` or a later one.
pub async fn reached(rx: &mut watch::Receiver<Phase>, phase: Phase) {
    let later = |p: &Phase| match phase {
        Phase::Serving => true,
        Phase::Draining => *p != Phase::Serving,
        Phase::Closing => *p == Phase::Closing,
    };
    // The guard wait_for returns must not live across an await (it is !Send).
    if rx.wait_for(later).await.is_err() {
        std::future::pending::<()>().await;
    }
}
