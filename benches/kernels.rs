//! Kernel micro-benchmark: each exact kernel on all cores against a streaming ceiling
//! measured in the same run (XOR of the two inputs into the output, same byte counts), and
//! a memcpy baseline. "% ceiling" is the median over rounds of ceiling time / kernel time,
//! each round timing both back to back, so drifting machine bandwidth cancels out.
//!
//! `cargo bench --bench kernels [-- --elements N --runs R --threads T]`

use std::hint::black_box;
use std::time::Instant;

use expo::dtype::FloatDtype;
use expo::kernel::{self, Isa, KernelSpec};
use rayon::prelude::*;

/// Elements per parallel piece (matches the engine's chunk size).
const PIECE: usize = 1 << 20;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fill(buf: &mut [u8], d: FloatDtype, seed: u64) {
    let mut s = seed | 1;
    for e in buf.chunks_exact_mut(d.size()) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let x = ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.1;
        match d {
            FloatDtype::BF16 => e.copy_from_slice(&kernel::convert::f64_to_bf16(x).to_le_bytes()),
            FloatDtype::F16 => e.copy_from_slice(&kernel::convert::f64_to_f16(x).to_le_bytes()),
            FloatDtype::F32 => e.copy_from_slice(&(x as f32).to_le_bytes()),
            FloatDtype::F64 => e.copy_from_slice(&x.to_le_bytes()),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `runs` calls of `f`.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, caches
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let n = arg("--elements", 32 << 20);
    let runs = arg("--runs", 7);
    let threads = arg(
        "--threads",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    println!(
        "kernels: {n} elements, {threads} threads, median of {runs} runs; bytes = 2 inputs + 1 output; isa = {}",
        Isa::best().name()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>12} {:>12}",
        "kernel", "ms", "GB/s", "ceiling GB/s", "% ceiling"
    );
    for d in [
        FloatDtype::BF16,
        FloatDtype::F16,
        FloatDtype::F32,
        FloatDtype::F64,
    ] {
        let size = d.size();
        let mut a = vec![0u8; n * size];
        let mut b = vec![0u8; n * size];
        let mut out = vec![0u8; n * size];
        fill(&mut a, d, 1);
        fill(&mut b, d, 2);
        let bytes = (3 * n * size) as f64;
        let ceiling_once = |out: &mut [u8]| {
            out.par_chunks_mut(PIECE * size)
                .zip(a.par_chunks(PIECE * size).zip(b.par_chunks(PIECE * size)))
                .for_each(|(o, (x, y))| {
                    for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                        *o = x ^ y;
                    }
                });
            black_box(&*out);
        };
        let ceiling = time(runs, || ceiling_once(&mut out));
        let memcpy = time(runs, || {
            out.par_chunks_mut(PIECE * size)
                .zip(b.par_chunks(PIECE * size))
                .for_each(|(o, y)| o.copy_from_slice(y));
            black_box(&out);
        });
        let spec = KernelSpec {
            sft: d,
            aligned: d,
            out: d,
        };
        for isa in Isa::available() {
            // The machine's bandwidth drifts: time the ceiling and the kernel back to back
            // in every round and report the median of the per-round ratios.
            let mut kernel_times = Vec::new();
            let mut ratios = Vec::new();
            for _ in 0..runs {
                let c = time(1, || ceiling_once(&mut out));
                let k = time(1, || {
                    out.par_chunks_mut(PIECE * size)
                        .zip(a.par_chunks(PIECE * size).zip(b.par_chunks(PIECE * size)))
                        .for_each(|(o, (x, y))| {
                            kernel::extrapolate_with(isa, spec, 0.3, x, y, o);
                        });
                    black_box(&out);
                });
                kernel_times.push(k);
                ratios.push(c / k);
            }
            let secs = median(kernel_times);
            println!(
                "{:<22} {:>10.1} {:>10.2} {:>12.2} {:>11.0}%",
                format!("{d} {}", isa.name()),
                secs * 1e3,
                bytes / secs / 1e9,
                bytes / ceiling / 1e9,
                100.0 * median(ratios)
            );
        }
        println!(
            "{:<22} {:>10.1} {:>10.2}   (memcpy of one input: {:.2} GB/s)",
            format!("{d} xor ceiling"),
            ceiling * 1e3,
            bytes / ceiling / 1e9,
            (2 * n * size) as f64 / memcpy / 1e9
        );
    }
}
