//! The worker threads of a command.

/// The most worker threads a run starts: more than a few per core only costs start-up
/// time and memory (`-j 10000` took minutes on a tiny model).
pub fn max_threads(cores: usize) -> usize {
    (4 * cores).max(16)
}

/// The worker threads of a command: `--threads N` (capped at [`max_threads`], with a
/// warning), or one per core.
///
/// A Ctrl-C or SIGTERM while the threads start (once [`crate::interrupt::install`] ran)
/// stops the start-up and returns [`crate::interrupt::Interrupted`].
pub fn worker_pool(
    threads: Option<u16>,
    reporter: &dyn crate::reporter::Reporter,
) -> anyhow::Result<rayon::ThreadPool> {
    use anyhow::Context;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = max_threads(cores);
    let threads = match threads.map(usize::from) {
        Some(n) if n > max => {
            reporter.warn(format!(
                "--threads {n} is more than {max} (4 per core, at least 16; this machine has {cores} core{}): using {max} threads",
                if cores == 1 { "" } else { "s" }
            ));
            max
        }
        Some(n) => n,
        None => cores,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("expo-worker-{i}"))
        .spawn_handler(|thread| {
            if thread.index() == 0 {
                crate::failpoint::pause("pool-start");
            }
            // A signal during start-up: stop starting threads (build() then fails).
            if crate::interrupt::check().is_err() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "interrupted",
                ));
            }
            let mut builder = std::thread::Builder::new();
            if let Some(name) = thread.name() {
                builder = builder.name(name.to_owned());
            }
            if let Some(size) = thread.stack_size() {
                builder = builder.stack_size(size);
            }
            builder.spawn(|| thread.run())?;
            Ok(())
        })
        .build();
    crate::interrupt::check()?;
    pool.context("starting worker threads")
}
