//! The few system calls std has no safe wrapper for.

/// `CLOCK_MONOTONIC` in nanoseconds: the clock the datapath reads, so auth
/// expiries written from user space compare correctly in the kernel. The
/// datapath reads it at tick resolution (from jiffies, tied to this clock
/// when the programs are loaded, see `Config::jiffy_ns`: the precise
/// `bpf_ktime_get_ns` cost about 40 ns per packet on this machine's VMs, a
/// quarter of the per-packet budget, and even the coarse clock's helper
/// call 10 ns), so it may be up to [`kernel_clock_lag_ns`] behind (more only
/// while the tick stalls); the auth map is written that much earlier (see
/// `PinnedAuthMap`).
pub fn monotonic_ns() -> u64 {
    let ns = clock_ns(libc::clock_gettime, libc::CLOCK_MONOTONIC);
    ns.expect("clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux")
}

/// How far behind `CLOCK_MONOTONIC` the datapath's clock may be: the
/// resolution of `CLOCK_MONOTONIC_COARSE`, the tick (4 ms at HZ=250), which
/// is also how long a jiffy is. 10 ms, the longest tick Linux has, if the
/// kernel does not say. Asked once: it never changes.
pub fn kernel_clock_lag_ns() -> u64 {
    static LAG: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LAG.get_or_init(|| clock_ns(libc::clock_getres, libc::CLOCK_MONOTONIC_COARSE).unwrap_or(10_000_000))
}

/// `call` (`clock_gettime` or `clock_getres`) on `clock`, in nanoseconds.
fn clock_ns(
    call: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
    clock: libc::clockid_t,
) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    #[allow(
        unsafe_code,
        reason = "clock_gettime and clock_getres have no std equivalent that exposes nanoseconds"
    )]
    let rc = unsafe { call(clock, &mut ts) };
    (rc == 0).then(|| (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Returns once every BPF program run that began before the call has
/// finished. Programs run inside RCU read-side sections, so an RCU grace
/// period is that, and membarrier(MEMBARRIER_CMD_GLOBAL) waits for one.
/// Where the kernel refuses it (nohz_full), a grace period (milliseconds) is
/// waited out with margin.
pub fn wait_for_program_runs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: a plain syscall with integer arguments.
    #[allow(unsafe_code, reason = "membarrier(2) has no std equivalent")]
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Detaches the BPF link pinned at `path` from its hook now
/// (`BPF_LINK_DETACH`). Removing the pin alone drops the last reference,
/// and the kernel frees the link later, from a work queue: an interface
/// detached and attached again straight after would still hold the old
/// link, the new attach would be refused (a program is attached once per
/// hook), and then the old link would go, leaving nothing attached. The
/// pin stays for the caller to remove.
pub fn detach_pinned_link(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let get = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // The path is a NUL-terminated string alive for the call.
    let fd = bpf(BPF_OBJ_GET, &get)?;
    #[allow(unsafe_code, reason = "taking ownership of the descriptor bpf(2) returned")]
    // SAFETY: BPF_OBJ_GET returns a new descriptor, owned from here on.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    bpf(
        BPF_LINK_DETACH,
        &LinkDetach {
            link_fd: link.as_raw_fd() as u32,
        },
    )?;
    Ok(())
}

/// bpf(2) with `cmd` and `attr`, the leading fields of its `union
/// bpf_attr` (the kernel takes the rest as zero).
fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    #[allow(unsafe_code, reason = "bpf(2) has no std equivalent")]
    // SAFETY: the kernel reads `size_of::<T>()` bytes of `attr`, alive for
    // the call; pointers inside it are the caller's to keep valid.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Whether the running kernel is PREEMPT_RT (`/sys/kernel/realtime` reads 1).
pub fn is_realtime() -> bool {
    std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|s| s.trim() == "1")
}

/// The index of a network interface in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    #[allow(unsafe_code, reason = "if_nametoindex has no std equivalent")]
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// The name of interface `ifindex` in the calling thread's network namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    #[allow(unsafe_code, reason = "if_indextoname has no std equivalent")]
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    #[allow(unsafe_code, reason = "reading the C string if_indextoname wrote")]
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// True when `path` is on a BPF filesystem (where maps and links can be pinned).
pub fn is_bpffs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is a valid initial value.
    #[allow(unsafe_code, reason = "statfs has no std equivalent")]
    let (rc, magic) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        let rc = libc::statfs(c.as_ptr(), &mut st);
        (rc, st.f_type)
    };
    rc == 0 && magic == BPF_FS_MAGIC
}

/// Mounts a BPF filesystem at `path` (as Cilium's agent does when the node
/// has none at /sys/fs/bpf).
pub fn mount_bpffs(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    #[allow(unsafe_code, reason = "mount(2) has no std equivalent")]
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs `f` holding an exclusive `flock` on `path` (created if missing), so
/// that agents and tests starting at once do not each mount a BPF
/// filesystem over the other's.
pub fn with_file_lock<T>(path: &std::path::Path, f: impl FnOnce() -> T) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;

    use keyway_identity::lock::Recover;
    static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = IN_PROCESS.locked();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: a valid open descriptor; the lock is released when it closes.
    #[allow(unsafe_code, reason = "flock(2) has no std equivalent")]
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let out = f();
    drop(file);
    Ok(out)
}
