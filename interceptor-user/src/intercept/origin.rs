//! Who is on the other end of an intercepted connection: what the kernel
//! recorded at connect time, completed from /proc and the job record at
//! accept time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use common::{OriginKey, OriginRecord};

use super::cgroup;
use super::job::JobRecord;

/// The origin records the kernel leaves for the proxy, keyed by the
/// client's address. Owned by the accept loop, so no lock.
pub struct OriginMap {
    map: HashMap<MapData, OriginKey, OriginRecord>,
}

impl OriginMap {
    pub fn new(map: HashMap<MapData, OriginKey, OriginRecord>) -> Self {
        OriginMap { map }
    }

    /// Takes the record of the connection whose client is `peer`. Each
    /// record is used once: a later connection from the same port must
    /// carry its own.
    pub fn take(&mut self, peer: SocketAddr) -> Option<OriginRecord> {
        let key = OriginKey::for_peer(peer);
        let rec = self.map.get(&key, 0).ok()?;
        let _ = self.map.remove(&key);
        Some(rec)
    }
}

/// The verified workload identity of one intercepted connection.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The address the client asked for before the kernel redirected it.
    pub destination: SocketAddr,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub argv0: Option<String>,
    /// Relative to the cgroup v2 mount, like `/interceptor/job-x-123`.
    pub cgroup: Option<String>,
    pub job: Option<JobRecord>,
}

impl Origin {
    /// Completes a kernel record. /proc may already be gone for a process
    /// that connected and exited; those fields are then `None`, while the
    /// kernel's own fields are always there.
    pub fn resolve(rec: &OriginRecord, cgroup_mount: &Path, runtime_dir: &Path) -> Origin {
        let tgid = rec.tgid.to_string();
        let proc = Path::new("/proc").join(&tgid);
        let exe = std::fs::read_link(proc.join("exe")).ok();
        let argv0 = std::fs::read(proc.join("cmdline")).ok().and_then(|b| {
            let first = b.split(|&c| c == 0).next()?;
            (!first.is_empty()).then(|| String::from_utf8_lossy(first).into_owned())
        });
        // /proc says where the process is now; trust it only if that is the
        // cgroup the kernel saw at connect time.
        let cgroup_dir = cgroup::of_process(&tgid)
            .ok()
            .map(|p| cgroup_mount.join(p.trim_start_matches('/')))
            .filter(|d| cgroup::id_of(d).ok() == Some(rec.cgroup_id))
            .or_else(|| cgroup::find_by_id(cgroup_mount, rec.cgroup_id));
        let job = cgroup_dir
            .as_deref()
            .and_then(|d| job_of(d, cgroup_mount, runtime_dir));
        Origin {
            destination: rec.destination(),
            pid: rec.pid,
            tgid: rec.tgid,
            uid: rec.uid,
            gid: rec.gid,
            cgroup_id: rec.cgroup_id,
            comm: rec.comm(),
            exe,
            argv0,
            cgroup: cgroup_dir.map(|d| {
                format!(
                    "/{}",
                    d.strip_prefix(cgroup_mount).unwrap_or(&d).to_string_lossy()
                )
            }),
            job,
        }
    }
}

/// The job record of the nearest enclosing job cgroup: a job may nest
/// cgroups of its own (a container runtime, systemd-run).
fn job_of(dir: &Path, mount: &Path, runtime_dir: &Path) -> Option<JobRecord> {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if !d.starts_with(mount) || d == mount {
            return None;
        }
        if let Some(job) = cgroup::id_of(d)
            .ok()
            .and_then(|id| JobRecord::read(runtime_dir, id))
        {
            return Some(job);
        }
        cur = d.parent();
    }
    None
}
