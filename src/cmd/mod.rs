//! One module per subcommand, each with a `run`.
pub mod completions;
pub mod diff;
pub mod extrapolate;
pub mod inspect;
pub mod man;
pub mod search;

/// The worker threads of a command: `--threads N`, or one per core.
pub(crate) fn worker_pool(threads: Option<u16>) -> anyhow::Result<rayon::ThreadPool> {
    use anyhow::Context;
    let threads = threads
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("expo-worker-{i}"))
        .build()
        .context("starting worker threads")
}
