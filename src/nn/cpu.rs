//! CPU thread configuration.

/// Threads our CPU kernels (and candle's matmul) use: rayon's global pool.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}
