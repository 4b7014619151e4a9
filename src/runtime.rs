//! Process-wide runtime set-up: the allocator and the thread the work runs on.
//!
//! The allocator is mimalloc, tuned for training loops that free and reallocate the same large
//! activation and gradient buffers every step. By default mimalloc hands freed memory back to the OS after 10 ms; the next step then faults
//! the pages back in and the kernel zeroes them, which measured at a third of all cycles of a
//! training step. `keep_freed_memory` turns that purging off, so a step reuses the previous
//! step's pages. Peak resident memory is unchanged; memory is returned when the process exits.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the same index in v2 and v3; the
/// libmimalloc-sys bindings do not name it).
const MI_OPTION_PURGE_DELAY: i32 = 15;

extern "C" {
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

/// Never purge freed memory back to the OS (see the module docs). Call once at start-up.
/// `SANI_PURGE_MS=N` purges memory unused for N ms instead, for memory experiments (measured on
/// the real-model default sanitize: 1000 ms lowers the peak by 3% for 25% more time).
pub fn keep_freed_memory() {
    let ms = std::env::var("SANI_PURGE_MS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    // SAFETY: mi_option_set only stores an option value; 15 is a valid option index.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms as std::ffi::c_long) }
}

/// Runs `work` on a thread of rayon's global pool (sized by `RAYON_NUM_THREADS`, so set that
/// first). Called from outside the pool, every parallel kernel would hand its work to the pool
/// and sleep until it is done: a thread wake-up per op, which measured at a quarter of the time
/// of token-by-token decoding. From inside, a kernel's tasks start on the calling thread.
pub fn on_worker_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
/// With `SANI_TRACE_RSS` set, prints the seconds since the first trace and the resident, peak,
/// anonymous and file-backed memory after `what` to stderr (for memory work: where in a run the
/// peak is reached, and whether mapped files count in it).
pub fn trace_rss(what: &str) {
    if std::env::var_os("SANI_TRACE_RSS").is_none() {
        return;
    }
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let t = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64();
    // Minor page faults so far: field 10 of /proc/self/stat, counted after the command name.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let faults = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7))
        .unwrap_or("?")
        .to_string();
    eprintln!(
        "[rss {t:7.2} s] {what}: {:.0} MB (peak {:.0}; anonymous {:.0}, file-backed {:.0}; \
         {faults} page faults)",
        get("VmRSS:"),
        get("VmHWM:"),
        get("RssAnon:"),
        get("RssFile:")
    );
}
