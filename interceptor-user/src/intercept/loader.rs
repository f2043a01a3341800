//! Loading, pinning and attaching the kernel programs.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/interceptor`):
//! `maps/<MAP>`, `progs/<program>`, and `links/<cgroup id>-<program>`, one
//! link per program per tagged cgroup. Pinned links keep the programs
//! attached while no daemon runs, which is what makes interception fail
//! closed: redirected connects then hit a closed port.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, Program, SockOps};
use aya::{Ebpf, EbpfLoader};
use aya_obj::generated::{bpf_attr, bpf_cmd};
use common::{
    DestPrefix, DestValue, OriginKey, OriginRecord, RUNTIME_DEBUG_LOG, RuntimeConfig, map_names,
    program_names,
};
use tracing::{info, warn};

use super::cgroup;

/// The eBPF object, built by build.rs with the pinned nightly and bpf-linker.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor.bpf.o"));

/// Paths of everything pinned under one pin directory.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Pins { root: root.into() }
    }

    fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    fn prog(&self, name: &str) -> PathBuf {
        self.root.join("progs").join(name)
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    fn link(&self, cgroup_id: u64, prog: &str) -> PathBuf {
        self.links().join(format!("{cgroup_id}-{prog}"))
    }

    /// `(cgroup id, program)` of every pinned link.
    pub fn pinned_links(&self) -> Vec<(u64, String, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (id, prog) = name.split_once('-')?;
                Some((id.parse().ok()?, prog.to_owned(), e.path()))
            })
            .collect()
    }

    pub fn is_installed(&self) -> bool {
        program_names::ALL.iter().all(|p| self.prog(p).exists())
    }
}

/// What the daemon holds while it runs.
pub struct Installed {
    /// The tagged parent cgroup directory.
    pub parent: PathBuf,
    pub cgroup_mount: PathBuf,
    /// Kept for the aya-log logger and the program fds.
    pub ebpf: Ebpf,
}

/// What to install.
pub struct InstallSpec<'a> {
    pub pins: Pins,
    pub cgroup: &'a str,
    pub runtime: RuntimeConfig,
    /// `(addr/bits or any host, port)` of every protected destination.
    pub protected: Vec<(u32, DestPrefix)>,
    pub debug_log: bool,
}

/// Loads and verifies every program, then attaches them to the tagged
/// parent, replacing the programs of links a previous daemon pinned (and of
/// cgroups tagged with `interceptor tag`) in place, so that no connect
/// between the old and the new daemon goes direct.
pub fn install(spec: InstallSpec<'_>) -> anyhow::Result<Installed> {
    ensure_bpffs(&spec.pins.root)?;
    for sub in ["maps", "progs", "links"] {
        fs::create_dir_all(spec.pins.root.join(sub))
            .with_context(|| format!("cannot create {}", spec.pins.root.join(sub).display()))?;
    }
    let cgroup_mount = cgroup::cgroup2_mount()?;
    let parent = cgroup_mount.join(spec.cgroup);
    fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create the tagged cgroup {}", parent.display()))?;

    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&str, PathBuf)> = map_names::ALL
        .iter()
        .map(|n| (*n, spec.pins.map(n)))
        .collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).with_context(|| {
        format!(
            "cannot load the eBPF object (maps pinned by another interceptor version under {}? \
             `interceptor uninstall` removes them)",
            spec.pins.root.display()
        )
    })?;

    // Verify everything before anything is attached: a verifier failure
    // must not leave half the programs in place.
    for (name, prog) in ebpf.programs_mut() {
        let loaded = match prog {
            Program::CgroupSockAddr(p) => p.load(),
            Program::SockOps(p) => p.load(),
            other => bail!("unexpected program {name} of type {:?}", other.prog_type()),
        };
        loaded.with_context(|| format!("the kernel refused program {name}"))?;
    }

    write_runtime(&mut ebpf, spec.runtime, spec.debug_log)?;
    sync_protected(&mut ebpf, &spec.protected)?;
    // Records left by connects that were refused while no daemon ran would
    // otherwise wait for a client that reuses the same port.
    let mut origins: HashMap<&mut MapData, OriginKey, OriginRecord> = HashMap::try_from(
        ebpf.map_mut(map_names::ORIGINS)
            .context("ORIGINS map missing")?,
    )?;
    clear(&mut origins);
    let mut pending: HashMap<&mut MapData, u64, OriginRecord> = HashMap::try_from(
        ebpf.map_mut(map_names::PENDING)
            .context("PENDING map missing")?,
    )?;
    clear(&mut pending);

    let parent_id = cgroup::id_of(&parent)?;
    let parent_fd = File::open(&parent)?;
    // sockops first: a connect that gets redirected must find the hand-off
    // program already in place.
    for name in [
        program_names::SOCKOPS,
        program_names::CONNECT4,
        program_names::CONNECT6,
    ] {
        let prog = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?;
        let prog_pin = spec.pins.prog(name);
        let _ = fs::remove_file(&prog_pin);
        prog.pin(&prog_pin)
            .with_context(|| format!("cannot pin {}", prog_pin.display()))?;
        let prog_fd = program_fd(prog)?;

        // Cgroups tagged earlier (the parent by a previous daemon, others by
        // `interceptor tag`): swap the program inside the pinned link.
        let mut parent_linked = false;
        for (cg_id, pname, path) in spec.pins.pinned_links() {
            if pname != name {
                continue;
            }
            link_update(&path, prog_fd.as_fd())
                .with_context(|| format!("cannot update the pinned link {}", path.display()))?;
            parent_linked |= cg_id == parent_id;
        }
        if !parent_linked {
            attach_and_pin(prog, &parent_fd, &spec.pins.link(parent_id, name))?;
        }
    }
    info!(
        cgroup = %parent.display(),
        pins = %spec.pins.root.display(),
        destinations = spec.protected.len(),
        "interception installed"
    );
    Ok(Installed {
        parent,
        cgroup_mount,
        ebpf,
    })
}

fn program_fd(prog: &Program) -> anyhow::Result<OwnedFd> {
    Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
}

fn attach_and_pin(prog: &mut Program, cgroup: &File, pin: &Path) -> anyhow::Result<()> {
    let link: FdLink = match prog {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into()?
        }
        _ => bail!("not a cgroup program"),
    };
    link.pin(pin)
        .with_context(|| format!("cannot pin {}", pin.display()))?;
    Ok(())
}

fn write_runtime(ebpf: &mut Ebpf, mut cfg: RuntimeConfig, debug_log: bool) -> anyhow::Result<()> {
    if debug_log {
        cfg.flags |= RUNTIME_DEBUG_LOG;
    }
    let mut runtime: Array<&mut MapData, RuntimeConfig> = Array::try_from(
        ebpf.map_mut(map_names::RUNTIME)
            .context("RUNTIME map missing")?,
    )?;
    runtime.set(0, cfg, 0)?;
    Ok(())
}

/// Re-syncs the protected destinations after a config reload.
pub fn update_protected(ebpf: &mut Ebpf, wanted: &[(u32, DestPrefix)]) -> anyhow::Result<()> {
    sync_protected(ebpf, wanted)
}

/// Makes the trie hold exactly `wanted`: new entries first, stale ones
/// after, so a destination kept across a restart is never unprotected.
fn sync_protected(ebpf: &mut Ebpf, wanted: &[(u32, DestPrefix)]) -> anyhow::Result<()> {
    let mut trie: LpmTrie<&mut MapData, DestPrefix, DestValue> = LpmTrie::try_from(
        ebpf.map_mut(map_names::PROTECTED)
            .context("PROTECTED map missing")?,
    )?;
    for (bits, data) in wanted {
        trie.insert(&Key::new(*bits, *data), DestValue { protected: 1 }, 0)
            .context("cannot write a protected destination")?;
    }
    let existing: Vec<Key<DestPrefix>> = trie.keys().flatten().collect();
    for key in existing {
        let (bits, data) = (key.prefix_len(), key.data());
        if !wanted.iter().any(|(b, d)| *b == bits && *d == data) {
            let _ = trie.remove(&key);
        }
    }
    Ok(())
}

fn clear<K: aya::Pod>(map: &mut HashMap<&mut MapData, K, OriginRecord>) {
    let keys: Vec<K> = map.keys().flatten().collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// Mounts bpffs at /sys/fs/bpf when the pin directory needs it and nothing
/// is mounted there (systemd mounts it; minimal VMs and containers don't).
fn ensure_bpffs(pin_root: &Path) -> anyhow::Result<()> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let on_bpffs = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "bpf").then(|| left.split_whitespace().nth(4))?
        })
        .any(|m| pin_root.starts_with(m));
    if on_bpffs {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(default) {
        bail!(
            "{} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a pin_dir under /sys/fs/bpf",
            pin_root.display()
        );
    }
    fs::create_dir_all(default)?;
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("cannot mount bpffs at /sys/fs/bpf")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Attaches the pinned programs to another cgroup (`interceptor tag`).
pub fn tag(pins: &Pins, dir: &Path) -> anyhow::Result<u64> {
    if !pins.is_installed() {
        bail!(
            "no programs are pinned under {}; start `interceptor daemon` with an [intercept] section first",
            pins.root.display()
        );
    }
    let id = cgroup::id_of(dir)?;
    if program_names::ALL.iter().any(|p| pins.link(id, p).exists()) {
        bail!("{} is already tagged", dir.display());
    }
    let cg = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let mut sockops = Program::SockOps(SockOps::from_pin(pins.prog(program_names::SOCKOPS))?);
    attach_and_pin(&mut sockops, &cg, &pins.link(id, program_names::SOCKOPS))?;
    for (name, ty) in [
        (
            program_names::CONNECT4,
            aya::programs::CgroupSockAddrAttachType::Connect4,
        ),
        (
            program_names::CONNECT6,
            aya::programs::CgroupSockAddrAttachType::Connect6,
        ),
    ] {
        let mut p = Program::CgroupSockAddr(CgroupSockAddr::from_pin(pins.prog(name), ty)?);
        attach_and_pin(&mut p, &cg, &pins.link(id, name))?;
    }
    Ok(id)
}

/// Detaches the programs from a cgroup (`interceptor untag`). Returns how
/// many links were removed.
pub fn untag(pins: &Pins, cgroup_id: u64) -> anyhow::Result<usize> {
    let mut n = 0;
    // connect programs first, so the cgroup never redirects without the
    // hand-off program.
    for name in [
        program_names::CONNECT4,
        program_names::CONNECT6,
        program_names::SOCKOPS,
    ] {
        let path = pins.link(cgroup_id, name);
        if path.exists() {
            unpin_link(&path)?;
            n += 1;
        }
    }
    Ok(n)
}

fn unpin_link(path: &Path) -> anyhow::Result<()> {
    let link = PinnedLink::from_pin(path)
        .with_context(|| format!("cannot open pinned link {}", path.display()))?;
    // Dropping the last fd of an unpinned link detaches it.
    drop(link.unpin()?);
    Ok(())
}

/// Detaches everything and removes every pin (`interceptor uninstall`).
pub fn uninstall(pins: &Pins) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let links = pins.pinned_links();
    for (id, _, path) in links.iter().filter(|(_, p, _)| p != program_names::SOCKOPS) {
        unpin_link(path)?;
        done.push(format!("detached {} from cgroup {id}", path.display()));
    }
    for (id, _, path) in links.iter().filter(|(_, p, _)| p == program_names::SOCKOPS) {
        unpin_link(path)?;
        done.push(format!("detached {} from cgroup {id}", path.display()));
    }
    for name in program_names::ALL {
        if fs::remove_file(pins.prog(name)).is_ok() {
            done.push(format!("unpinned program {name}"));
        }
    }
    for name in map_names::ALL {
        if fs::remove_file(pins.map(name)).is_ok() {
            done.push(format!("unpinned map {name}"));
        }
    }
    for sub in ["links", "progs", "maps", ""] {
        let _ = fs::remove_dir(pins.root.join(sub));
    }
    if pins.root.exists() {
        warn!("{} still has entries; left in place", pins.root.display());
    }
    Ok(done)
}

// aya 0.14 has no public BPF_LINK_UPDATE, which is what swaps a program
// inside a pinned link atomically. Two raw bpf(2) calls fill that gap,
// with the kernel's own attr layout from aya-obj's generated bindings.
fn bpf(cmd: bpf_cmd, attr: &bpf_attr) -> io::Result<i64> {
    // SAFETY: attr is a fully initialised bpf_attr of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *const bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn link_update(pin: &Path, new_prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    // SAFETY: bpf_attr is plain data; all-zero is its documented default.
    let mut get: bpf_attr = unsafe { std::mem::zeroed() };
    get.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &get)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: as above.
    let mut update: bpf_attr = unsafe { std::mem::zeroed() };
    update.link_update.link_fd = link.as_raw_fd() as u32;
    update.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_UPDATE, &update)?;
    Ok(())
}
