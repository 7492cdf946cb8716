//! Evaluator process groups, so that a second Ctrl-C (which exits at once) kills them too.

use std::sync::atomic::{AtomicI32, Ordering};

use super::launch::local;
use crate::interrupt;

const GROUP_SLOTS: usize = 256;
static GROUPS: [AtomicI32; GROUP_SLOTS] = [const { AtomicI32::new(0) }; GROUP_SLOTS];

pub(crate) fn register_group(pgid: i32) {
    interrupt::on_forced_exit("evaluator process groups", kill_all_groups);
    for g in &GROUPS {
        if g.compare_exchange(0, pgid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

pub(crate) fn unregister_group(pgid: i32) {
    for g in &GROUPS {
        let _ = g.compare_exchange(pgid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// SIGKILLs every evaluator process group still running (the second interrupt).
pub fn kill_all_groups() {
    for g in &GROUPS {
        let pgid = g.swap(0, Ordering::AcqRel);
        local::signal_group(pgid, libc::SIGKILL);
    }
}
