//! cgroup v2: where it is mounted, the tagged parent, and job cgroups.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The cgroup v2 mount point, from `/proc/self/mountinfo`. Hybrid hosts
/// mount it at `/sys/fs/cgroup/unified`, pure-v2 hosts at `/sys/fs/cgroup`.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    mount_of_type(&info, "cgroup2")
        .context("no cgroup v2 filesystem is mounted; interception needs one (cgroup_no_v1 or systemd's unified hierarchy)")
}

/// The mount point of the first filesystem of type `fstype` in a mountinfo
/// text. Fields: id parent major:minor root mountpoint options... - fstype source.
pub fn mount_of_type(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let ty = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (ty == fstype).then(|| PathBuf::from(unescape_mount(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let oct = rest.get(i + 1..i + 4);
        match oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Resolves a cgroup given by the user: absolute inside the mount
/// (`/sys/fs/cgroup/unified/x`), or relative to it (`system.slice/x`, `/x`).
pub fn resolve(mount: &Path, given: &str) -> anyhow::Result<PathBuf> {
    let given_path = Path::new(given);
    let path = if given_path.starts_with(mount) {
        given_path.to_owned()
    } else {
        mount.join(given.trim_start_matches('/'))
    };
    if !path.join("cgroup.procs").exists() {
        bail!(
            "{} is not a cgroup v2 directory (the cgroup v2 mount is {})",
            path.display(),
            mount.display()
        );
    }
    Ok(path)
}

/// The cgroup id the kernel reports for a cgroup directory.
pub fn id_of(dir: &Path) -> io::Result<u64> {
    Ok(fs::metadata(dir)?.ino())
}

/// Finds the directory of cgroup `id` below `root`, depth first. Job
/// cgroups are few and shallow, so a walk is cheap next to a session.
pub fn find_by_id(root: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if id_of(&dir).ok() == Some(id) {
            return Some(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    None
}

/// The cgroup v2 path of a process relative to the mount, from
/// `/proc/PID/cgroup` (the `0::` line).
pub fn of_process(pid: &str) -> io::Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other("no cgroup v2 entry in /proc/PID/cgroup"))
}

/// Moves process `pid` into cgroup directory `dir`.
pub fn move_process(dir: &Path, pid: u32) -> anyhow::Result<()> {
    fs::write(dir.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("cannot move process {pid} into {}", dir.display()))
}

/// Removes a job cgroup and any cgroups the job made inside it. Processes
/// the job left behind are killed first: a tagged process that outlives its
/// job would keep the job's identity.
pub fn remove_job(dir: &Path) -> anyhow::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        let children: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        if !children.is_empty() {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        for child in children {
            remove_job(&child)?;
        }
    }
    for attempt in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if attempt == 0 {
                    // cgroup.kill exists since Linux 5.14.
                    let _ = fs::write(dir.join("cgroup.kill"), "1");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", dir.display())),
        }
    }
    bail!("{} still has processes after cgroup.kill", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        let hybrid = "25 1 0:22 / /sys rw - sysfs sysfs rw\n\
            30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
            41 30 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_of_type(hybrid, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            mount_of_type(pure, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(mount_of_type(pure, "bpf"), None);
        let spaced = "1 2 0:1 / /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(
            mount_of_type(spaced, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
