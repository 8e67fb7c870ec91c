//! Surviving files that shrink under a mapping: SIGBUS becomes an error naming the file.
//!
//! A read through a file mapping past the file's current end raises SIGBUS, which kills the
//! process. pma maps checkpoints that a trainer may truncate and rewrite in place (a rollback
//! that calls `save_pretrained` again opens the file with `O_TRUNC`), so without this module a
//! merge or a watcher would die with no message.
//!
//! Every mapping is registered here ([`register`]). A process-wide `SIGBUS` handler
//! (`sigaction` with `SA_SIGINFO`, installed once) looks the fault address up in the registry:
//! - inside a registered mapping, it maps an anonymous zero page over the faulting page
//!   (`mmap(MAP_FIXED)`), records the fault in that mapping's slot and returns, so the
//!   interrupted read finishes with zeros instead of killing the process;
//! - anywhere else, it hands the signal to the handler that was installed before (Rust's own
//!   stack-overflow handler, or the default action, which ends the process as before).
//!
//! Readers then ask whether a fault happened ([`Registration::faulted`], surfaced as
//! [`crate::SafetensorsFile::check_faults`] and [`crate::Checkpoint::check_faults`]) after each
//! read and fail with [`crate::Error::FileChangedWhileMapped`], so the zeros never reach an
//! output. The registry is a fixed array of atomics: the handler takes no lock and allocates
//! nothing (async-signal-safe). When every slot is taken, a mapping is simply not protected.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Mappings that can be protected at once.
const SLOTS: usize = 8192;

struct Slot {
    /// Start address; 0 when the slot is free. Written last on register, first on release.
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];
/// Faults handled since the process started (all mappings).
static FAULTS: AtomicUsize = AtomicUsize::new(0);

/// A registered mapping; dropping it unregisters (drop it before unmapping).
#[derive(Debug)]
pub struct Registration {
    slot: Option<usize>,
}

impl Registration {
    /// Whether a read of this mapping faulted (the file shrank under it).
    pub fn faulted(&self) -> bool {
        self.slot
            .is_some_and(|i| REGISTRY[i].faulted.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            REGISTRY[i].start.store(0, Ordering::Release);
        }
    }
}

/// Registers the mapping `[start, start + len)` for SIGBUS recovery.
pub fn register(start: *const u8, len: usize) -> Registration {
    install_handler();
    if len == 0 {
        return Registration { slot: None };
    }
    for (i, slot) in REGISTRY.iter().enumerate() {
        // Claim a free slot with a placeholder start of 1 (no mapping starts there), fill it,
        // then publish the real start.
        if slot
            .start
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            slot.len.store(len, Ordering::Release);
            slot.faulted.store(false, Ordering::Release);
            slot.start.store(start as usize, Ordering::Release);
            return Registration { slot: Some(i) };
        }
    }
    Registration { slot: None }
}

/// SIGBUS faults recovered from since the process started.
pub fn fault_count() -> usize {
    FAULTS.load(Ordering::Acquire)
}

static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::zeroed();

fn install_handler() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a plain sigaction call; PREVIOUS is written here once, before the handler
        // that reads it is installed, and never again.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            libc::sigaction(libc::SIGBUS, &action, previous);
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &REGISTRY {
        let start = slot.start.load(Ordering::Acquire);
        if start <= 1 || addr < start || addr >= start + slot.len.load(Ordering::Acquire) {
            continue;
        }
        // SAFETY: sysconf and mmap are async-signal-safe. The page lies inside a mapping we
        // own (registered, not yet unregistered); replacing it with a private zero page only
        // changes what our own reads of it return.
        let mapped = unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.faulted.store(true, Ordering::Release);
            FAULTS.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not ours: behave as if this handler were not there.
    // SAFETY: PREVIOUS was filled before this handler was installed. Calling the previous
    // handler (or restoring the default action and returning, so the faulting instruction runs
    // again and the default action ends the process) is what the signal would have done.
    unsafe {
        let previous = &*std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>();
        let handler = previous.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            libc::signal(sig, libc::SIG_DFL);
        } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(sig);
        }
    }
}
