//! Session threads: one single-threaded tokio runtime per thread, each
//! session pinned to one of them.
//!
//! A session is two sockets served by one task. On a work-stealing runtime
//! every wakeup may hop threads (futex wakes, cache misses) and the
//! scheduler times every poll; measured under pgbench that cost ~35% more
//! CPU per transaction than pgbouncer's single event loop. Pinning keeps a
//! session's whole life on one thread, as pgbouncer does, while several
//! threads still use several cores.
//!
//! With one thread per CPU (the default), each thread is also bound to its
//! CPU, and a new session goes to the thread on the CPU its client's
//! packets arrived on (SO_INCOMING_CPU). The client, its session and (by
//! the kernel's wake-affine placement) its server backend then tend to
//! share a CPU, so a round trip wakes tasks locally instead of
//! interrupting the other CPU. On 2 CPUs, in `cargo xtask bench proxy`
//! (median rounds), the worst interceptor/pgbouncer ratio went from 0.79
//! unbound to 0.90; the cost is a higher p99, as a bound thread cannot
//! leave a busy CPU.
//!
//! Session threads run as SCHED_BATCH by default ([`Sched::Batch`]): a
//! thread woken by a reply then waits for the backend or client that sent
//! it to block (they do, at once, in their next read) instead of
//! preempting it, which would cost a second switch back. With 2 CPUs
//! shared by pgbench, Postgres and the proxy, that measured 1.07x the
//! throughput of SCHED_OTHER at simple c10 and 1.20x at simple c50 (median
//! of 8-10 rounds), and the same within noise at c1 and prepared; in
//! `cargo xtask bench proxy` the worst interceptor/pgbouncer ratio went
//! from 0.90 to 0.96. The cost: on CPUs saturated by other work, a woken
//! session waits up to a scheduler slice (a few ms) for its turn;
//! `Sched::Normal` keeps wakeup preemption.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use tokio::runtime::Handle;
use tracing::warn;

pub struct SessionThreads {
    handles: Vec<Handle>,
    /// Sessions running on each thread.
    load: Arc<[AtomicUsize]>,
    next: AtomicUsize,
    /// By CPU number: the thread bound to that CPU. Empty when threads are
    /// not bound.
    by_cpu: Vec<Option<usize>>,
}

/// The CPUs the calling thread may run on, in order (at start-up: the
/// process's).
fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|c| set.is_set(*c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// How session threads are scheduled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Sched {
    /// SCHED_BATCH: a woken session thread does not preempt the task
    /// running on its CPU.
    #[default]
    Batch,
    /// SCHED_OTHER: the kernel's default, with wakeup preemption.
    Normal,
}

/// Puts the calling thread under SCHED_BATCH.
fn batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration, and
    // pid 0 is the calling thread. SCHED_BATCH at priority 0 needs no
    // privilege.
    match unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Makes the calling thread background work (the audit spool writer, the
/// ClickHouse shipper): SCHED_BATCH, so that its wakeups never preempt a
/// session or the server and client processes it is talking to. It runs
/// as soon as they block, which under load is within microseconds.
pub fn background(what: &str) {
    if let Err(e) = batch() {
        warn!("{what} runs as SCHED_OTHER: cannot set SCHED_BATCH: {e}");
    }
}

/// Binds the calling thread to `cpu`.
fn bind_to(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

impl SessionThreads {
    /// Starts `n` threads (at least one), each running its own runtime
    /// until the process exits. When `n` is the number of CPUs the process
    /// may use, thread i is bound to the i-th of them.
    pub fn start(n: usize, sched: Sched) -> std::io::Result<SessionThreads> {
        let n = n.max(1);
        let cpus = allowed_cpus();
        let bind = cpus.len() == n && n > 1;
        let mut by_cpu = Vec::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let cpu = cpus.get(i).copied().filter(|_| bind);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("interceptor-s{i}"))
                .spawn(move || {
                    crate::audit::use_lane(i);
                    if let Some(c) = cpu
                        && let Err(e) = bind_to(c)
                    {
                        warn!("session thread {i} runs unbound: cannot bind it to CPU {c}: {e}");
                    }
                    if sched == Sched::Batch
                        && let Err(e) = batch()
                    {
                        warn!(
                            "session thread {i} runs as SCHED_OTHER: cannot set SCHED_BATCH: {e}"
                        );
                    }
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                })?;
            handles.push(rx.recv().map_err(std::io::Error::other)??);
            if let Some(c) = cpu {
                if by_cpu.len() <= c {
                    by_cpu.resize(c + 1, None);
                }
                by_cpu[c] = Some(i);
            }
        }
        Ok(SessionThreads {
            load: (0..handles.len()).map(|_| AtomicUsize::new(0)).collect(),
            handles,
            next: AtomicUsize::new(0),
            by_cpu,
        })
    }

    /// Runs a session on the thread bound to `cpu` (where its client's
    /// packets arrive) unless that thread already has well over its share
    /// of sessions (clients that all connected from one CPU must not crowd
    /// onto one thread); else on the least loaded thread, or round robin
    /// among equals.
    pub fn spawn<F>(&self, cpu: Option<usize>, session: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.pick(cpu);
        let load = self.load.clone();
        load[i].fetch_add(1, Ordering::Relaxed);
        let ended = Ended(load, i);
        self.handles[i].spawn(async move {
            let _ended = ended;
            session.await
        });
    }

    fn pick(&self, cpu: Option<usize>) -> usize {
        let n = self.handles.len();
        let load = |i: usize| self.load[i].load(Ordering::Relaxed);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let least = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|i| load(*i))
            .unwrap_or(0);
        match cpu.and_then(|c| self.by_cpu.get(c).copied().flatten()) {
            Some(i) if load(i) <= load(least) + 2 + load(least) / 4 => i,
            _ => least,
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether threads are bound to CPUs.
    pub fn bound(&self) -> bool {
        !self.by_cpu.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// Counts a session out of its thread's load when it ends (or panics).
struct Ended(Arc<[AtomicUsize]>, usize);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_runs_on_the_thread_bound_to_its_cpu() {
        let cpus = allowed_cpus();
        let threads = SessionThreads::start(cpus.len(), Sched::Batch).unwrap();
        assert_eq!(threads.bound(), cpus.len() > 1);
        for (i, cpu) in cpus.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            threads.spawn(Some(*cpu), async move {
                let name = std::thread::current().name().map(str::to_owned);
                // SAFETY: no arguments; 0 is the calling thread.
                let policy = unsafe { libc::sched_getscheduler(0) };
                // The calling thread's own mask.
                let _ = tx.send((name, allowed_cpus(), policy));
            });
            let (name, on, policy) = rx.recv().unwrap();
            assert_eq!(policy, libc::SCHED_BATCH);
            if threads.bound() {
                assert_eq!(name.as_deref(), Some(format!("interceptor-s{i}").as_str()));
                assert_eq!(on, vec![*cpu]);
            }
        }
    }

    #[test]
    fn clients_from_one_cpu_spill_over_to_the_other_threads() {
        let cpus = allowed_cpus();
        if cpus.len() < 2 {
            eprintln!("skipped: needs 2 CPUs to bind threads, this machine allows {cpus:?}");
            return;
        }
        let threads = SessionThreads::start(cpus.len(), Sched::Batch).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (_hold, wait) = tokio::sync::watch::channel(());
        for _ in 0..40 {
            let tx = tx.clone();
            let mut wait = wait.clone();
            // Sessions that stay open until the test ends.
            threads.spawn(Some(cpus[0]), async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
                let _ = wait.changed().await;
            });
        }
        let mut on_first = 0;
        for _ in 0..40 {
            if rx.recv().unwrap().as_deref() == Some("interceptor-s0") {
                on_first += 1;
            }
        }
        // Locality while the loads stay close, then the others take over.
        assert!(
            on_first > 40 / cpus.len(),
            "{on_first} of 40 on the client's CPU"
        );
        assert!(
            on_first < 40 * 3 / 4,
            "{on_first} of 40 on the client's CPU"
        );
        let total: usize = threads.load.iter().map(|l| l.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 40);
    }

    #[test]
    fn more_threads_than_cpus_are_not_bound() {
        let n = allowed_cpus().len() + 1;
        let threads = SessionThreads::start(n, Sched::Normal).unwrap();
        assert!(!threads.bound());
        assert_eq!(threads.len(), n);
        // An unknown CPU falls back to round robin.
        let (tx, rx) = std::sync::mpsc::channel();
        threads.spawn(Some(10_000), async move {
            // SAFETY: no arguments; 0 is the calling thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            let _ = tx.send((std::thread::current().name().map(str::to_owned), policy));
        });
        let (name, policy) = rx.recv().unwrap();
        assert!(name.unwrap().starts_with("interceptor-s"));
        assert_eq!(policy, libc::SCHED_OTHER);
    }
}
