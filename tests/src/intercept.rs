//! Interception in tests: a unique tagged cgroup, pin directory and runtime
//! directory per test, so tests can run side by side without sharing kernel
//! state, and `interceptor uninstall` on drop.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::free_port;
use crate::proxy::binary;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Kernel tests need root (cgroup moves, loading eBPF). Outside CI they
/// say why they skip; under CI (`CI` set, as `.ci/run` does) a missing
/// privilege fails the test instead, so it is never counted as a pass.
pub fn kernel_tests_possible(test: &str) -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: kernel tests must run as root under CI");
    }
    eprintln!(
        "SKIPPED {test}: needs root to load eBPF programs and move processes between cgroups"
    );
    false
}

pub struct Interception {
    /// The port redirected connections arrive on.
    pub port: u16,
    /// The tagged parent cgroup, relative to the cgroup v2 mount.
    pub cgroup: String,
    pub pin_dir: PathBuf,
    pub runtime_dir: tempfile::TempDir,
}

impl Interception {
    pub fn new() -> Interception {
        Self::named("interceptor-test")
    }

    /// Names the cgroup and pin directory `<prefix>-<pid>-<n>`.
    pub fn named(prefix: &str) -> Interception {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{prefix}-{}-{n}", std::process::id());
        Interception {
            port: free_port(),
            cgroup: id.clone(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            runtime_dir: tempfile::Builder::new()
                .prefix("interceptor-run-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    /// The `[intercept]` table for the daemon's config.
    pub fn config_section(&self) -> String {
        format!(
            "[intercept]\nport = {}\ncgroup = \"{}\"\npin_dir = \"{}\"\nruntime_dir = \"{}\"\n",
            self.port,
            self.cgroup,
            self.pin_dir.display(),
            self.runtime_dir.path().display()
        )
    }

    fn location(&self, cmd: &mut Command) {
        cmd.arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--runtime-dir")
            .arg(self.runtime_dir.path());
    }

    /// `interceptor run --job JOB -- program`; add the program's arguments.
    pub fn run(&self, job: &str, program: &str) -> Command {
        self.run_with(job, &[], program)
    }

    /// As [`run`](Self::run), with more `interceptor run` options.
    pub fn run_with(&self, job: &str, options: &[&str], program: &str) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg("run").arg("--job").arg(job).args(options);
        self.location(&mut cmd);
        cmd.arg("--").arg(program);
        cmd
    }

    /// `interceptor tag|untag CGROUP`.
    pub fn tag_command(&self, verb: &str, cgroup: &str) -> Command {
        let mut cmd = Command::new(binary());
        cmd.arg(verb).arg(cgroup);
        self.location(&mut cmd);
        cmd
    }

    pub fn uninstall(&self) -> std::process::Output {
        let mut cmd = Command::new(binary());
        cmd.arg("uninstall");
        self.location(&mut cmd);
        cmd.output().expect("run interceptor uninstall")
    }
}

impl Default for Interception {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Interception {
    fn drop(&mut self) {
        let _ = self.uninstall();
    }
}

/// The cgroup v2 mount, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .expect("a cgroup v2 mount")
}
