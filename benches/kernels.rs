//! Kernel micro-benchmarks, in two parts.
//!
//! 1. divan: every exact kernel (each format, each instruction set this CPU has) on all
//!    cores, beside the streaming ceiling (XOR of the two inputs into the output: the same
//!    bytes moved, no arithmetic) and a memcpy of one input, as time and GB/s. Bytes are
//!    2 inputs + 1 output, so the kernels and the ceiling are directly comparable.
//! 2. "% of ceiling": the machine's bandwidth drifts between runs, so comparing medians
//!    taken seconds apart is noisy. Each round times the ceiling and the kernel back to
//!    back, in alternating order; the table gives the median over rounds of ceiling time /
//!    kernel time.
//!
//! `cargo bench --bench kernels` (divan's options after `--`, e.g. `-- bf16` to filter the
//! first part; `EXPO_BENCH_ROUNDS` sets the rounds of the second, default 15).

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Instant;

use divan::counter::BytesCount;
use divan::Bencher;
use expo::dtype::FloatDtype;
use expo::kernel::{self, Isa, KernelSpec, Level};
use rayon::prelude::*;

/// Elements per buffer: far beyond the last-level cache, so memory bandwidth is the limit.
const ELEMENTS: usize = 32 << 20;

/// Elements per parallel piece (the engine's chunk size).
const PIECE: usize = 1 << 20;

const FORMATS: [FloatDtype; 4] = [
    FloatDtype::BF16,
    FloatDtype::F16,
    FloatDtype::F32,
    FloatDtype::F64,
];

fn main() {
    divan::main();
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) divan only checks
    // that each benchmark runs once, and so does the table: not at all.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        ceiling_table();
    }
}

/// θ0 and θ1 for one format: ELEMENTS values of a few hundredths, as in real checkpoints.
struct Inputs {
    sft: Vec<u8>,
    aligned: Vec<u8>,
}

fn inputs(d: FloatDtype) -> &'static Inputs {
    static INPUTS: [OnceLock<Inputs>; 4] = [const { OnceLock::new() }; 4];
    let slot = FORMATS
        .iter()
        .position(|&f| f == d)
        .expect("a known format");
    INPUTS[slot].get_or_init(|| Inputs {
        sft: fill(d, 1),
        aligned: fill(d, 2),
    })
}

fn fill(d: FloatDtype, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut buf = vec![0u8; ELEMENTS * d.size()];
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
    buf
}

/// An output buffer with its pages already faulted in.
fn output(d: FloatDtype) -> Vec<u8> {
    vec![1u8; ELEMENTS * d.size()]
}

/// Bytes one pass moves: two inputs read, one output written.
fn pass_bytes(d: FloatDtype) -> usize {
    3 * ELEMENTS * d.size()
}

fn xor_pass(d: FloatDtype, out: &mut [u8]) {
    let (piece, x) = (PIECE * d.size(), inputs(d));
    out.par_chunks_mut(piece)
        .zip(x.sft.par_chunks(piece).zip(x.aligned.par_chunks(piece)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a ^ b;
            }
        });
    black_box(out);
}

fn kernel_pass(d: FloatDtype, level: Level, out: &mut [u8]) {
    let (piece, x) = (PIECE * d.size(), inputs(d));
    out.par_chunks_mut(piece)
        .zip(x.sft.par_chunks(piece).zip(x.aligned.par_chunks(piece)))
        .for_each(|(o, (a, b))| {
            kernel::extrapolate_with(level, KernelSpec::same(d), 0.3, a, b, o);
        });
    black_box(out);
}

/// One format on one instruction set (divan's argument).
#[derive(Clone, Copy)]
struct Case {
    format: FloatDtype,
    level: Level,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.format, self.level.name())
    }
}

fn same_code_as_level_below(format: FloatDtype, level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    return format != FloatDtype::BF16 && level.isa() == Isa::Avx512Bf16;
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Every format on every level this CPU has, except the levels that run the same code as
/// the one below them (AVX512_BF16 only changes the bf16 kernel).
fn cases() -> Vec<Case> {
    FORMATS
        .iter()
        .flat_map(|&format| {
            Level::available()
                .into_iter()
                .filter(move |&level| !same_code_as_level_below(format, level))
                .map(move |level| Case { format, level })
        })
        .collect()
}

#[divan::bench(args = FORMATS, sample_count = 20, sample_size = 1)]
fn xor_ceiling(bencher: Bencher, d: FloatDtype) {
    inputs(d); // generated before the timing starts
    let mut out = output(d);
    bencher
        .counter(BytesCount::new(pass_bytes(d)))
        .bench_local(|| xor_pass(d, &mut out));
}

#[divan::bench(args = FORMATS, sample_count = 20, sample_size = 1)]
fn memcpy_one_input(bencher: Bencher, d: FloatDtype) {
    let (piece, x) = (PIECE * d.size(), inputs(d));
    let mut out = output(d);
    bencher
        .counter(BytesCount::new(2 * ELEMENTS * d.size()))
        .bench_local(|| {
            out.par_chunks_mut(piece)
                .zip(x.aligned.par_chunks(piece))
                .for_each(|(o, b)| o.copy_from_slice(b));
            black_box(&out);
        });
}

#[divan::bench(args = cases(), sample_count = 20, sample_size = 1)]
fn extrapolate(bencher: Bencher, case: Case) {
    inputs(case.format); // generated before the timing starts
    let mut out = output(case.format);
    bencher
        .counter(BytesCount::new(pass_bytes(case.format)))
        .bench_local(|| kernel_pass(case.format, case.level, &mut out));
}

fn seconds(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Part 2: each kernel against the ceiling timed in the same round.
fn ceiling_table() {
    let rounds: usize = std::env::var("EXPO_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
        .max(1);
    println!(
        "\n% of ceiling: {ELEMENTS} elements, {} threads, median over {rounds} rounds of \
         (XOR ceiling time / kernel time), timed back to back",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>12} {:>14} {:>11}",
        "kernel", "kernel GB/s", "ceiling GB/s", "% ceiling"
    );
    for case in cases() {
        let d = case.format;
        let mut out = output(d);
        xor_pass(d, &mut out);
        kernel_pass(d, case.level, &mut out);
        let (mut ceiling, mut kernel, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which goes first, so neither always runs on a warmer machine.
            let (c, k) = if round % 2 == 0 {
                let c = seconds(|| xor_pass(d, &mut out));
                (c, seconds(|| kernel_pass(d, case.level, &mut out)))
            } else {
                let k = seconds(|| kernel_pass(d, case.level, &mut out));
                (seconds(|| xor_pass(d, &mut out)), k)
            };
            ceiling.push(c);
            kernel.push(k);
            ratio.push(c / k);
        }
        let gbs = |secs: f64| pass_bytes(d) as f64 / secs / 1e9;
        println!(
            "{:<22} {:>12.2} {:>14.2} {:>10.0}%",
            case.to_string(),
            gbs(median(kernel)),
            gbs(median(ceiling)),
            100.0 * median(ratio)
        );
    }
}
