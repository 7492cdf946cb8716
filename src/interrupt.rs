//! Signals. Ctrl-C and SIGTERM: the first signal asks the run to stop and clean up; a second
//! one removes the temporary output directory at once and exits. SIGXFSZ is ignored, so a
//! file-size limit is an ordinary write error. SIGBUS from an input truncated under its
//! memory map is recovered from and reported as an error.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Set when the user asked expo to stop.
static CANCEL: AtomicBool = AtomicBool::new(false);

/// Exit code after an interrupt (128 + SIGINT, the shell convention).
pub const EXIT_INTERRUPTED: u8 = 130;

/// The run was interrupted by a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; the output was not written")]
pub struct Interrupted;

/// What a second signal runs before expo exits at once: each module that owns something
/// that must not outlive expo (a staging directory, an evaluator's process group) registers
/// its clean-up here, so that this module calls nothing above it.
static ON_FORCED_EXIT: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());

/// A registered clean-up: its name (registered once) and what it runs.
type Cleanup = (&'static str, fn());

/// Registers `cleanup` (once per `name`) to run when a second signal makes expo exit at
/// once. Clean-ups run in the order they were first registered.
pub fn on_forced_exit(name: &'static str, cleanup: fn()) {
    let mut list = ON_FORCED_EXIT.lock().unwrap_or_else(|p| p.into_inner());
    if !list.iter().any(|(n, _)| *n == name) {
        list.push((name, cleanup));
    }
}

/// Runs every registered clean-up (the second signal).
fn run_forced_exit_cleanups() {
    let list = ON_FORCED_EXIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (_, cleanup) in list {
        cleanup();
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP, and ignores SIGXFSZ so that a
/// file-size limit (`ulimit -f`) makes writes fail with `EFBIG`, which expo reports and
/// cleans up after, instead of killing the process. Safe to call more than once.
pub fn install() {
    // A second installation fails harmlessly (in tests, or if a caller already has one).
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            run_forced_exit_cleanups();
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
    });
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Installs the SIGBUS handler that turns an input truncated under expo's memory map into
/// an ordinary error. Safe to call more than once.
///
/// Reading a page of a mapped file that another process truncated raises SIGBUS, which
/// would otherwise kill expo with no explanation and leave its temporary directory behind.
/// Input maps register their address range with [`guard_map`]; when the faulting address
/// lies in one, the handler replaces the rest of that mapping with zero pages (so the read
/// completes), marks the map as damaged and returns. The engine checks the mark after every
/// chunk and at the end of the run, stops, and fails with an error that names the file, and
/// the temporary directory is removed as after any other error. A SIGBUS anywhere else
/// (an unguarded map) prints a fixed message and exits with status 1; a temporary
/// directory is then removed by the next run.
pub fn install_sigbus_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        PAGE.store(crate::sys::page_size(), Ordering::Relaxed);
        // SAFETY: the sigaction struct is zero-initialised (a valid value), its mask
        // emptied, and with SA_SIGINFO the handler has the three-argument signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: atomics, mmap(2), write(2), _exit(2).
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; si_addr is
    // the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed).max(1);
    for slot in &SLOTS {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= end {
            continue;
        }
        let from = addr & !(page - 1);
        // SAFETY: [from, end) lies inside one of our read-only input maps (the kernel
        // rounds `end` up to the page the map already covers); replacing it with private
        // zero pages only changes what later reads of that map see, and those reads are
        // discarded because the map is marked damaged. The range is still mapped: a slot
        // is cleared (MapGuard::drop) only after every worker reading that map has joined,
        // on the thread that then unmaps it, so no fault can race with the unmapping and
        // land here for memory that has been reused. errno is saved and restored.
        let replaced = unsafe {
            let errno = *libc::__errno_location();
            let p = libc::mmap(
                from as *mut libc::c_void,
                end - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            *libc::__errno_location() = errno;
            p != libc::MAP_FAILED
        };
        if replaced {
            slot.damaged.store(true, Ordering::Release);
            return;
        }
        break;
    }
    const MSG: &[u8] = b"expo: error: an input file was truncated by another process while expo was reading it (SIGBUS); stopped without writing any output\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(1);
    }
}

/// One registered input map: its address range and whether a SIGBUS hit it.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    damaged: AtomicBool,
}

/// How many input maps can be guarded at once (a 405B model has under 200 shards per
/// side); maps beyond that fall back to the exit-on-SIGBUS behaviour.
const SLOT_COUNT: usize = 1024;

static SLOTS: [Slot; SLOT_COUNT] = [const {
    Slot {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        damaged: AtomicBool::new(false),
    }
}; SLOT_COUNT];

static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// A registered input map (see [`install_sigbus_handler`]); unregistered on drop, which
/// must happen before the memory is unmapped.
#[derive(Debug)]
pub struct MapGuard {
    slot: usize,
}

impl MapGuard {
    /// True once a read of the map hit a truncated part of the file.
    pub fn damaged(&self) -> bool {
        SLOTS[self.slot].damaged.load(Ordering::Acquire)
    }
}

impl Drop for MapGuard {
    fn drop(&mut self) {
        let slot = &SLOTS[self.slot];
        slot.end.store(0, Ordering::Release);
        slot.damaged.store(false, Ordering::Release);
        slot.start.store(0, Ordering::Release);
    }
}

/// Registers the mapped range `[ptr, ptr + len)` so that a SIGBUS inside it is recovered
/// from (installing the handler if needed). `None` when the range is empty or every slot
/// is taken.
pub fn guard_map(ptr: *const u8, len: usize) -> Option<MapGuard> {
    install_sigbus_handler();
    let start = ptr as usize;
    if start == 0 || len == 0 {
        return None;
    }
    let slot = SLOTS.iter().position(|s| {
        s.start
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })?;
    SLOTS[slot].damaged.store(false, Ordering::Release);
    SLOTS[slot].end.store(start + len, Ordering::Release);
    Some(MapGuard { slot })
}

/// The flag workers poll.
pub fn flag() -> &'static AtomicBool {
    &CANCEL
}

/// Fails with [`Interrupted`] once a signal arrived.
pub fn check() -> Result<(), Interrupted> {
    if CANCEL.load(Ordering::Relaxed) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}
