//! CPU runtime configuration for training on a few cores.
//!
//! Two settings decide much of a CPU training step's time (see
//! docs/performance.md):
//!
//! * candle 0.11 runs large elementwise ops on its own "barrier pool"
//!   (threads `candle-bp-*`) whose workers spin for a while after every op
//!   and whose caller spins until all workers are done. On a machine with as
//!   many busy threads as cores (rayon's GEMM threads, our kernels, other
//!   processes) the spinning thread steals the core the others need: a toy
//!   training step took 4–5× longer under load. With `CANDLE_NUM_THREADS=1`
//!   the pool has no workers and those ops run on the calling thread; the
//!   heavy work (GEMM, im2col, the fused norm/softmax/GEGLU kernels) runs on
//!   rayon's pool, whose idle threads sleep.
//! * mimalloc (the binary's allocator) returns freed memory to the OS after
//!   10 ms; a training step frees and re-allocates hundreds of MB of
//!   activations, and the kernel zeroes every page again on the next touch
//!   (a quarter of the CPU time of a toy step). Purging is turned off.
//! * candle's CPU matmul asks `candle_core::utils::get_num_threads()` for its
//!   thread count on every call; without `RAYON_NUM_THREADS` that counts the
//!   physical cores by reading `/proc/cpuinfo` (about 460 reads per toy
//!   training step). The variable is set to rayon's own default, so GEMM and
//!   rayon's pool agree and nothing is read per call.
//! * Every parallel op started from a thread outside rayon's pool injects a
//!   job, wakes a worker and puts the caller to sleep on a futex until the
//!   workers are done: two context switches per op, thousands of times a
//!   step (a quarter of the CPU time when sampling with the tiny model).
//!   [`run_in_pool`] runs the whole command on a pool thread instead, so the
//!   caller takes part in the work and only the other workers are woken.

use std::os::raw::{c_int, c_long};

/// Threads our CPU kernels (and candle's matmul) use: rayon's global pool.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

// mimalloc's option setter (linked through the `mimalloc` crate).
unsafe extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
}

/// Stack size of rayon's worker threads: the command runs on one of them
/// ([`run_in_pool`]), and candle's backward pass walks the graph recursively.
const WORKER_STACK_BYTES: usize = 64 << 20;

/// Runs `f` (a whole command) on a thread of rayon's global pool, built here
/// with [`WORKER_STACK_BYTES`] stacks, and returns its result. If the global
/// pool already exists (a library user built it), `f` still runs on it.
pub fn run_in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    // An error only means the pool was already built; it is used as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .build_global();
    // `scope` called from outside the pool runs its body on a pool thread.
    rayon::scope(|_| f())
}

/// `mi_option_purge_delay` (same index in mimalloc v2 and v3).
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// Applies the settings above; call first thing in `main`, before any thread
/// starts. An environment variable the user set wins (`CANDLE_NUM_THREADS`,
/// `RAYON_NUM_THREADS`; `DREAMBOOTH_MI_PURGE=1` keeps mimalloc's purging).
pub fn configure() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called at the start of main, before other threads exist.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // rayon's default (logical CPUs available to the process).
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: as above.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("DREAMBOOTH_MI_PURGE").is_none() {
        // Make sure the mimalloc crate (and its C library) is linked.
        let _ = &mimalloc::MiMalloc;
        // SAFETY: mimalloc's options are plain integers it reads on each purge.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Keeps rayon's other workers awake while it lives: a busy stretch of many
/// short parallel ops (a training step, a sampling loop) otherwise puts them
/// to sleep between ops (after a few dozen yields), and every next op pays a
/// futex wake-up and two context switches before the work is shared.
///
/// Created on a pool thread, it spawns one job per other worker; each job
/// runs rayon's pending work as it appears ([`rayon::yield_now`]) and spins
/// while there is none, until the guard is dropped. Created anywhere else
/// (a test thread, one-thread pool) it does nothing. The price is CPU time:
/// the other cores spin through the caller's serial stretches, as an OpenMP
/// runtime's threads do; a spinning worker gives its core to any other
/// process that wants it (`sched_yield`) every 64 idle rounds.
pub struct KeepWarm {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KeepWarm {
    pub fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        if std::env::var_os("DREAMBOOTH_NO_KEEP_WARM").is_some() {
            done.store(true, Ordering::Relaxed);
            return Self { done };
        }
        if let Some(owner) = rayon::current_thread_index() {
            for _ in 1..num_threads() {
                let done = done.clone();
                rayon::spawn(move || {
                    // The owner popping its own job (waiting in a join) must
                    // not spin: what would end the spinning is further up
                    // its own stack.
                    if rayon::current_thread_index() == Some(owner) {
                        return;
                    }
                    SPINNING.fetch_add(1, Ordering::Relaxed);
                    let mut idle = 0u32;
                    while !done.load(Ordering::Relaxed) {
                        if let Some(rayon::Yield::Idle) = rayon::yield_now() {
                            idle += 1;
                            if idle.is_multiple_of(64) {
                                // Lets other processes on this core run
                                // (returns at once when none is waiting).
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        } else {
                            idle = 0;
                        }
                    }
                    SPINNING.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
        Self { done }
    }
}

/// Threads spinning for a [`KeepWarm`] right now (for tests).
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for KeepWarm {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn keep_warm_shares_work_and_stops() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let warm = KeepWarm::start();
            // The other worker picks up the spinning job.
            let t0 = std::time::Instant::now();
            while SPINNING.load(Ordering::Relaxed) == 0 {
                assert!(t0.elapsed().as_secs() < 10, "no worker started spinning");
                std::thread::yield_now();
            }
            // Parallel work (nested too) still runs, on both threads.
            for n in [10usize, 1000, 100_000] {
                let s: usize = (0..n).into_par_iter().map(|i| i % 7).sum();
                assert_eq!(s, (0..n).map(|i| i % 7).sum::<usize>());
                let (a, b) = rayon::join(
                    || (0..n).into_par_iter().sum::<usize>(),
                    || (0..n).into_par_iter().count(),
                );
                assert_eq!((a, b), (n * (n - 1) / 2, n));
            }
            drop(warm);
        });
        let t0 = std::time::Instant::now();
        while SPINNING.load(Ordering::Relaxed) != 0 {
            assert!(t0.elapsed().as_secs() < 10, "a worker kept spinning");
            std::thread::yield_now();
        }
        // Outside a pool the guard does nothing.
        drop(KeepWarm::start());
        assert_eq!(SPINNING.load(Ordering::Relaxed), 0);
    }
}
