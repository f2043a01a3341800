//! Kernel side of interceptor.
//!
//! `connect4`/`connect6` run in tagged cgroups when a socket connects. A TCP
//! connect to a protected destination is rewritten to the proxy's listener,
//! and what the kernel knows about the caller is stored under the socket
//! cookie. `sockops` runs once the source port is chosen and moves that
//! record to a key the proxy can compute from `accept()`'s peer address.
//!
//! Everything the verifier reads from a context is read first, with volatile
//! loads: both rustc and clang otherwise merge adjacent u32 context fields
//! into one u64 load, which the verifier refuses.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use common::{
    DestPrefix, DestValue, ORIGIN_CAPACITY, OriginKey, OriginRecord, PORT_PREFIX_BITS,
    PROTECTED_CAPACITY, RUNTIME_ARMED, RUNTIME_DEBUG_LOG, RuntimeConfig, v4_mapped,
};

/// Return values of cgroup/connect programs.
const ALLOW: i32 = 1;
/// The connect fails with EPERM: the fail-closed answer.
const REFUSE: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[map]
static PROTECTED: LpmTrie<DestPrefix, DestValue> = LpmTrie::with_max_entries(PROTECTED_CAPACITY, 0);

#[map]
static RUNTIME: Array<RuntimeConfig> = Array::with_max_entries(1, 0);

/// Origin records by socket cookie, between connect and sockops.
#[map]
static PENDING: LruHashMap<u64, OriginRecord> = LruHashMap::with_max_entries(ORIGIN_CAPACITY, 0);

/// Origin records by the client's local address, until the proxy accepts.
#[map]
static ORIGINS: LruHashMap<OriginKey, OriginRecord> =
    LruHashMap::with_max_entries(ORIGIN_CAPACITY, 0);

#[cgroup_sock_addr(connect4)]
pub fn intercept_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's life.
    let (ip4, port, ty, proto, mark) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).protocol)),
            socket_mark(sa),
        )
    };
    let dst = v4_mapped(ip4.to_ne_bytes());
    let port = (port as u16).to_ne_bytes();
    match decide(&ctx, &dst, port, ty, proto, mark) {
        Decision::Pass => ALLOW,
        Decision::Refuse => REFUSE,
        Decision::Redirect(cfg) => {
            // SAFETY: user_ip4/user_port are writable in connect4.
            unsafe {
                write_volatile(
                    addr_of_mut!((*sa).user_ip4),
                    u32::from_ne_bytes(cfg.proxy_ip4),
                );
                write_volatile(
                    addr_of_mut!((*sa).user_port),
                    u32::from(u16::from_ne_bytes(cfg.proxy_port)),
                );
            }
            record(&ctx, dst, port, AF_INET as u16)
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn intercept_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4.
    let (w0, w1, w2, w3, port, ty, proto, mark) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).protocol)),
            socket_mark(sa),
        )
    };
    let mut dst = [0u8; 16];
    for (i, w) in [w0, w1, w2, w3].iter().enumerate() {
        let b = w.to_ne_bytes();
        dst[i * 4] = b[0];
        dst[i * 4 + 1] = b[1];
        dst[i * 4 + 2] = b[2];
        dst[i * 4 + 3] = b[3];
    }
    let port = (port as u16).to_ne_bytes();
    match decide(&ctx, &dst, port, ty, proto, mark) {
        Decision::Pass => ALLOW,
        Decision::Refuse => REFUSE,
        Decision::Redirect(cfg) => {
            // A v4-mapped destination goes to the IPv4 listener, still
            // v4-mapped: the socket may be dual-stack only.
            let target = if is_v4_mapped(&dst) {
                v4_mapped(cfg.proxy_ip4)
            } else {
                cfg.proxy_ip6
            };
            // SAFETY: user_ip6/user_port are writable in connect6.
            unsafe {
                for i in 0..4 {
                    let w = u32::from_ne_bytes([
                        target[i * 4],
                        target[i * 4 + 1],
                        target[i * 4 + 2],
                        target[i * 4 + 3],
                    ]);
                    write_volatile(addr_of_mut!((*sa).user_ip6[i]), w);
                }
                write_volatile(
                    addr_of_mut!((*sa).user_port),
                    u32::from(u16::from_ne_bytes(cfg.proxy_port)),
                );
            }
            record(&ctx, dst, port, AF_INET6 as u16)
        }
    }
}

#[sock_ops]
pub fn intercept_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // SAFETY: valid bpf_sock_ops for the program's life.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: as above; cookie helper takes the context pointer.
    let (cookie, family, ip4, l0, l1, l2, l3, lport) = unsafe {
        (
            bpf_get_socket_cookie(ops.cast()),
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).local_ip6[0])),
            read_volatile(addr_of!((*ops).local_ip6[1])),
            read_volatile(addr_of!((*ops).local_ip6[2])),
            read_volatile(addr_of!((*ops).local_ip6[3])),
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    // SAFETY: the value is copied out before the map is touched again.
    let Some(rec) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return 1;
    };
    let mut key = OriginKey {
        addr: [0; 16],
        port: lport as u16,
        _pad: [0; 6],
    };
    if family == AF_INET {
        key.addr = v4_mapped(ip4.to_ne_bytes());
    } else {
        for (i, w) in [l0, l1, l2, l3].iter().enumerate() {
            let b = w.to_ne_bytes();
            key.addr[i * 4] = b[0];
            key.addr[i * 4 + 1] = b[1];
            key.addr[i * 4 + 2] = b[2];
            key.addr[i * 4 + 3] = b[3];
        }
    }
    let _ = ORIGINS.insert(&key, &rec, 0);
    let _ = PENDING.remove(&cookie);
    1
}

enum Decision {
    Pass,
    Refuse,
    Redirect(RuntimeConfig),
}

fn decide(
    ctx: &SockAddrContext,
    dst: &[u8; 16],
    port: [u8; 2],
    ty: u32,
    proto: u32,
    mark: u32,
) -> Decision {
    if ty != SOCK_STREAM || proto != IPPROTO_TCP {
        return Decision::Pass;
    }
    let key = Key::new(PORT_PREFIX_BITS + 128, DestPrefix { port, addr: *dst });
    if PROTECTED.get(&key).is_none() {
        return Decision::Pass;
    }
    // Protected from here on: anything unexpected refuses the connect.
    let Some(cfg) = RUNTIME.get(0).copied() else {
        return Decision::Refuse;
    };
    if cfg.flags & RUNTIME_ARMED == 0 {
        return Decision::Refuse;
    }
    if cfg.mark != 0 && mark == cfg.mark {
        return Decision::Pass;
    }
    if cfg.flags & RUNTIME_DEBUG_LOG != 0 {
        debug!(ctx, "redirect port {}", u16::from_be_bytes(port));
    }
    Decision::Redirect(cfg)
}

fn record(ctx: &SockAddrContext, dst_addr: [u8; 16], port: [u8; 2], family: u16) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let rec = OriginRecord {
        dst_addr,
        dst_port: u16::from_be_bytes(port),
        family,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad: 0,
        // SAFETY: plain helper calls with no pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // SAFETY: the helper takes the context pointer the kernel gave us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Without a record the proxy would refuse the connection anyway; refuse
    // here so the client sees it at connect time.
    match PENDING.insert(&cookie, &rec, 0) {
        Ok(()) => ALLOW,
        Err(_) => REFUSE,
    }
}

fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff
}

/// # Safety
/// `sa` must be the context pointer of a cgroup/connect program.
unsafe fn socket_mark(sa: *mut bpf_sock_addr) -> u32 {
    unsafe {
        let sk: *mut bpf_sock = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk));
        read_volatile(addr_of!((*sk).mark))
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
