//! A counter of write-family system calls per (process, fd): a BPF
//! program on the `sys_enter` raw tracepoint and a hash map it updates.
//!
//! Used where fsnotify is blind: the descriptor `memfd_create()` returns
//! is a pseudo file that raises no fsnotify event (Linux 6.14+), so a
//! `pwrite()` into a memfd through it leaves no trace but the mtime, which
//! page faults move too. pagescope puts the (PID, fd) pairs that refer to
//! a watched memfd in the map; the program adds one to a pair's counter
//! whenever that process enters `write`, `pwrite64`, `writev`, `pwritev`,
//! `pwritev2`, `fallocate` or `sendfile` on that fd, or `copy_file_range`
//! or `splice` with it as the destination. Pairs not in the map cost a
//! comparison chain on the syscall number and, for the write family, one
//! hash lookup.
//!
//! The program reads the fd from the saved registers (`pt_regs`, x86_64
//! layout) with `bpf_probe_read_kernel`, hence its license string; it is
//! 40 instructions written out below, loaded with the raw `bpf(2)` calls
//! (no libbpf). Needs CAP_BPF and CAP_PERFMON (or root); x86_64 only.
//! 32-bit compat system calls and io_uring submissions are not counted.
//!
//! # References
//! - `bpf(2)`, <https://docs.kernel.org/bpf/instruction-set.html>,
//!   `BPF_RAW_TRACEPOINT_OPEN`, `bpf_probe_read_kernel`

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rustix::io::Errno;

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_int = 17;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_CURRENT_PID_TGID: i32 = 14;
const HELPER_PROBE_READ_KERNEL: i32 = 113;

/// `struct pt_regs` offsets on x86_64.
const PT_REGS_DI: i32 = 112;
const PT_REGS_DX: i32 = 96;

/// x86_64 system calls counted, with the fd in `rdi`.
const FD_IN_DI: [i32; 7] = [
    1,   // write
    18,  // pwrite64
    20,  // writev
    296, // pwritev
    328, // pwritev2
    285, // fallocate
    40,  // sendfile (out_fd)
];
/// x86_64 system calls counted, with the destination fd in `rdx`.
const FD_IN_DX: [i32; 2] = [
    326, // copy_file_range (fd_out)
    275, // splice (fd_out)
];

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const _: () = assert!(std::mem::size_of::<BpfInsn>() == 8);

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

// Opcodes (BPF_CLASS | BPF_OP | BPF_SRC / BPF_SIZE | BPF_MODE).
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const MOV32_X: u8 = 0xbc;
const ADD64_K: u8 = 0x07;
const ADD64_X: u8 = 0x0f;
const OR64_X: u8 = 0x4f;
const LSH64_K: u8 = 0x67;
const RSH64_K: u8 = 0x77;
const LDX_DW: u8 = 0x79;
const STX_DW: u8 = 0x7b;
const LD_IMM64: u8 = 0x18;
const ATOMIC_DW: u8 = 0xdb;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const ATOMIC_ADD: i32 = 0x00;

/// The program, for the map `map_fd`.
fn program(map_fd: i32) -> Vec<BpfInsn> {
    let (r0, r1, r2, r3, r6, r7, r8, r9, r10) = (0, 1, 2, 3, 6, 7, 8, 9, 10);
    let mut p = vec![
        insn(MOV64_X, r6, r1, 0, 0), // r6 = ctx
        insn(LDX_DW, r7, r6, 8, 0),  // r7 = args[1]: syscall nr
        insn(MOV64_K, r8, 0, 0, PT_REGS_DI),
    ];
    // Jumps are patched once the labels' positions are known.
    let n_dx = FD_IN_DX.len();
    let n_di = FD_IN_DI.len();
    let first_jump = p.len();
    for nr in FD_IN_DX {
        p.push(insn(JEQ_K, r7, 0, 0, nr)); // -> dx
    }
    for nr in FD_IN_DI {
        p.push(insn(JEQ_K, r7, 0, 0, nr)); // -> ok
    }
    let goto_exit = p.len();
    p.push(insn(JA, 0, 0, 0, 0)); // -> exit
    let dx = p.len();
    p.push(insn(MOV64_K, r8, 0, 0, PT_REGS_DX));
    let ok = p.len();
    p.extend([
        insn(CALL, 0, 0, 0, HELPER_GET_CURRENT_PID_TGID),
        insn(MOV64_X, r7, r0, 0, 0),
        insn(RSH64_K, r7, 0, 0, 32), // r7 = tgid
        insn(LDX_DW, r3, r6, 0, 0),  // r3 = args[0]: pt_regs *
        insn(ADD64_X, r3, r8, 0, 0), // r3 = &regs->di or &regs->dx
        insn(MOV64_X, r1, r10, 0, 0),
        insn(ADD64_K, r1, 0, 0, -8), // r1 = fp - 8
        insn(MOV64_K, r2, 0, 0, 8),
        insn(CALL, 0, 0, 0, HELPER_PROBE_READ_KERNEL),
    ]);
    let check_read = p.len();
    p.extend([
        insn(JNE_K, r0, 0, 0, 0),     // -> exit
        insn(LDX_DW, r9, r10, -8, 0), // r9 = fd
        insn(MOV32_X, r9, r9, 0, 0),  // zero-extend the low 32 bits
        insn(LSH64_K, r7, 0, 0, 32),
        insn(OR64_X, r7, r9, 0, 0),    // r7 = tgid << 32 | fd
        insn(STX_DW, r10, r7, -16, 0), // key at fp - 16
        insn(LD_IMM64, r1, PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_X, r2, r10, 0, 0),
        insn(ADD64_K, r2, 0, 0, -16),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
    ]);
    let check_found = p.len();
    p.extend([
        insn(JEQ_K, r0, 0, 0, 0), // -> exit
        insn(MOV64_K, r1, 0, 0, 1),
        insn(ATOMIC_DW, r0, r1, 0, ATOMIC_ADD), // lock *(u64 *)r0 += 1
    ]);
    let exit = p.len();
    p.extend([insn(MOV64_K, r0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)]);
    let rel = |from: usize, to: usize| {
        i16::try_from(to.cast_signed() - from.cast_signed() - 1).unwrap_or(0)
    };
    for (i, ins) in p.iter_mut().enumerate().skip(first_jump).take(n_dx + n_di) {
        ins.off = rel(i, if i < first_jump + n_dx { dx } else { ok });
    }
    p[goto_exit].off = rel(goto_exit, exit);
    p[check_read].off = rel(check_read, exit);
    p[check_found].off = rel(check_found, exit);
    p
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> Result<i64, Errno> {
    // SAFETY: `attr` is a live, fully initialised `bpf_attr` prefix of
    // `size_of::<T>()` bytes for `cmd`; the kernel reads (and for lookups
    // writes through the pointers inside) nothing beyond what it names.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(super::last_errno())
    } else {
        Ok(rc)
    }
}

fn owned(fd: i64) -> Result<OwnedFd, Errno> {
    let raw = i32::try_from(fd).map_err(|_| Errno::BADF)?;
    // SAFETY: the kernel just returned this new fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The loaded and attached counter.
#[derive(Debug)]
pub struct WriteCounter {
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// Map entries: (PID, fd) pairs watched at once.
const MAX_PAIRS: u32 = 16 * 1024;

impl WriteCounter {
    /// Creates the map, loads the program and attaches it to
    /// `sys_enter`. Detached when dropped.
    pub fn new() -> Result<Self, Errno> {
        if !cfg!(target_arch = "x86_64") {
            return Err(Errno::NOSYS);
        }
        let mut mc = MapCreate {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 8,
            value_size: 8,
            max_entries: MAX_PAIRS,
            map_flags: 0,
        };
        let map = owned(bpf(BPF_MAP_CREATE, &mut mc)?)?;
        let insns = program(map.as_raw_fd());
        let license = c"Dual MIT/GPL";
        let mut pl = ProgLoad {
            prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
            insn_cnt: u32::try_from(insns.len()).map_err(|_| Errno::INVAL)?,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..ProgLoad::default()
        };
        let prog = owned(bpf(BPF_PROG_LOAD, &mut pl)?)?;
        let name = c"sys_enter";
        let mut open = RawTracepointOpen {
            name: name.as_ptr() as u64,
            prog_fd: u32::try_from(prog.as_raw_fd()).map_err(|_| Errno::BADF)?,
            _pad: 0,
        };
        let link = owned(bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open)?)?;
        Ok(Self {
            map,
            _prog: prog,
            _link: link,
        })
    }

    fn key(pid: u32, fd: u32) -> u64 {
        (u64::from(pid) << 32) | u64::from(fd)
    }

    fn elem(&self, key: &u64, value: &mut u64, flags: u64) -> MapElem {
        MapElem {
            map_fd: u32::try_from(self.map.as_raw_fd()).unwrap_or(u32::MAX),
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_mut(value) as u64,
            flags,
        }
    }

    /// Starts counting (`pid`, `fd`), keeping its count if it is already
    /// counted.
    pub fn watch(&self, pid: u32, fd: u32) -> Result<(), Errno> {
        const BPF_NOEXIST: u64 = 1;
        let key = Self::key(pid, fd);
        let mut zero = 0u64;
        let mut attr = self.elem(&key, &mut zero, BPF_NOEXIST);
        match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(_) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops counting (`pid`, `fd`).
    pub fn unwatch(&self, pid: u32, fd: u32) {
        let key = Self::key(pid, fd);
        let mut unused = 0u64;
        let mut attr = self.elem(&key, &mut unused, 0);
        attr.value = 0;
        let _ = bpf(BPF_MAP_DELETE_ELEM, &mut attr);
    }

    /// The count of (`pid`, `fd`), if it is counted.
    pub fn count(&self, pid: u32, fd: u32) -> Option<u64> {
        let key = Self::key(pid, fd);
        let mut value = 0u64;
        let mut attr = self.elem(&key, &mut value, 0);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).ok()?;
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts this process's writes on one fd, and only those (root only).
    #[test]
    fn counts_writes_per_fd() {
        let Ok(c) = WriteCounter::new() else {
            assert!(
                !rustix::process::geteuid().is_root(),
                "root must load the counter"
            );
            return;
        };
        let dir = std::env::temp_dir();
        let (pf, pg) = (
            dir.join(format!("pagescope-bpf-{}", std::process::id())),
            dir.join(format!("pagescope-bpf2-{}", std::process::id())),
        );
        let f = std::fs::File::create(&pf).unwrap();
        let g = std::fs::File::create(&pg).unwrap();
        let _ = (std::fs::remove_file(&pf), std::fs::remove_file(&pg));
        let (fd, other) = (f.as_raw_fd().cast_unsigned(), g.as_raw_fd().cast_unsigned());
        c.watch(std::process::id(), fd).unwrap();
        assert_eq!(c.count(std::process::id(), fd), Some(0));
        use std::os::unix::fs::FileExt;
        f.write_at(b"x", 10).unwrap();
        f.write_at(b"y", 20).unwrap();
        g.write_at(b"z", 0).unwrap();
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 4096).unwrap();
        assert_eq!(c.count(std::process::id(), fd), Some(3));
        assert_eq!(c.count(std::process::id(), other), None);
        c.unwatch(std::process::id(), fd);
        assert_eq!(c.count(std::process::id(), fd), None);
    }
}
