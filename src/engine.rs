//! Extrapolating two checkpoints: the errors of reading inputs and writing outputs
//! ([`EngineError`], shared by every front-end), the check of the tensors that must be
//! identical on both sides, and the chunk source of a paired plan (copy, cast or
//! extrapolate each chunk of θ1 against θ0's, for every output) that [`crate::writer`]
//! writes in one pass. The maps of the inputs are [`crate::maps`]'s.
//!
//! Float tensors are cut into chunks of about a million elements, the others into 4 MiB
//! of bytes; the memory expo owns is one chunk buffer per worker, and input pages are
//! dropped from the process's mappings as soon as their chunk is done, so resident
//! memory does not grow with the model.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::checkpoint::Checkpoint;
use crate::checkpoint::TensorLoc;
use crate::kernel::{self, KernelSpec};
use crate::plan::{OutTensor, OutputPlan, Recipe, Treatment};
use crate::writer::{self, Chunk, ChunkSource, Run, Target, Task};

pub use crate::maps::{MappedCheckpoint, RELEASE_MARGIN};
pub use crate::writer::{check_open_files, CHUNK_ELEMENTS, COPY_CHUNK_BYTES};

pub use crate::error::EngineError;

/// Checks that the tensors that must be byte-identical in both checkpoints are (integer and
/// bool tensors whose α is not 0, see [`OutTensor::must_be_identical`]) in the output of
/// `plan` whose tensors' α are `alphas`.
pub fn verify_exact_tensors(
    plan: &OutputPlan,
    alphas: &[f64],
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
) -> Result<(), EngineError> {
    for (p, &alpha) in plan.tensors.iter().zip(alphas) {
        if !p.must_be_identical(alpha) {
            continue;
        }
        let (l0, l1) = locs(p);
        let a = sft.1.tensor(sft.0, l0);
        let b = aligned.1.tensor(aligned.0, l1);
        if let Some(offset) = a.iter().zip(b).position(|(x, y)| x != y) {
            // A difference read from a damaged map means nothing.
            sft.1.check_intact()?;
            aligned.1.check_intact()?;
            return Err(EngineError::ExactTensorDiffers {
                tensor: p.name.clone(),
                dtype: p.dtype,
                offset: offset as u64,
            });
        }
    }
    sft.1.check_intact()?;
    aligned.1.check_intact()
}

/// Where a paired tensor lives in θ0 and θ1.
fn locs(p: &OutTensor) -> (TensorLoc, TensorLoc) {
    match p.recipe {
        Recipe::Pair { sft, aligned, .. } => (sft, aligned),
        _ => unreachable!("the tensors of two paired checkpoints are pairs"),
    }
}

/// A paired tensor's kernel formats, when it is a float tensor.
fn spec_of(p: &OutTensor) -> Option<KernelSpec> {
    match p.recipe {
        Recipe::Pair { spec, .. } => spec,
        _ => None,
    }
}

/// What a finished output reports.
#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    /// Tensors whose inputs already held non-finite values, with the count of non-finite
    /// output values in each.
    pub inherited_nonfinite: Vec<(String, u64)>,
}

/// One output of a run: each tensor's α and the directory its files go to. All outputs of
/// a run share one plan (same files, tensors, dtypes and offsets); only α differs.
#[derive(Debug, Clone, Copy)]
pub struct OutputJob<'a> {
    pub alphas: &'a [f64],
    pub dir: &'a Path,
}

/// The result of [`write_outputs`].
#[derive(Debug)]
pub struct RunReport {
    /// One result per output, in the order given.
    pub outputs: Vec<Result<WriteStats, EngineError>>,
    /// Σ(θ1 − θ0)² over the float tensors that some output extrapolates.
    pub delta_sq: f64,
    /// Σθ0² over the same tensors.
    pub base_sq: f64,
}

/// Writes every output in one pass over the inputs: each chunk of θ0 and θ1 is read once
/// and turned into that chunk of every output (see [`crate::writer`]). An error in one
/// output (e.g. overflow at a large α) stops that output only.
///
/// `on_progress` is called with the number of output bytes each finished chunk wrote.
/// Setting `cancel` makes the workers stop at the next chunk; every output then reports
/// [`EngineError::Interrupted`].
pub fn write_outputs(
    plan: &OutputPlan,
    jobs: &[OutputJob<'_>],
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
    pool: &rayon::ThreadPool,
    cancel: &AtomicBool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> RunReport {
    if jobs.is_empty() {
        return RunReport {
            outputs: Vec::new(),
            delta_sq: 0.0,
            base_sq: 0.0,
        };
    }
    let tasks = plan.tasks(jobs.len());
    let source = PairSource::new(plan, jobs, sft, aligned, tasks.len());
    let targets: Vec<Target> = jobs
        .iter()
        .map(|j| Target {
            shards: &plan.shards,
            dir: j.dir,
        })
        .collect();
    let run = Run {
        pool,
        cancel,
        on_progress,
    };
    let results = writer::write_all(&targets, &tasks, &source, &run);
    source.report(results)
}

/// One output's chunk: its bytes, the non-finite values it inherited from the inputs, and
/// its Σ(θ1 − θ0)² and Σθ0² when it extrapolates.
type Computed<'b> = (&'b [u8], u64, Option<(f64, f64)>);

/// The chunk source of two paired checkpoints: copy, cast or extrapolate, per output.
struct PairSource<'a> {
    plan: &'a OutputPlan,
    /// Per output, each tensor's α.
    alphas: Vec<&'a [f64]>,
    sft: (&'a Checkpoint, &'a MappedCheckpoint),
    aligned: (&'a Checkpoint, &'a MappedCheckpoint),
    /// Which pairs some output extrapolates: only those need θ0, and they make the Δ stats.
    extrapolated: Vec<Option<KernelSpec>>,
    /// Per output and pair: non-finite output values whose inputs were non-finite.
    inherited: Vec<Vec<AtomicU64>>,
    /// Per task: Σ(θ1 − θ0)² and Σθ0², as f64 bits.
    partials: Vec<(AtomicU64, AtomicU64)>,
    /// Both inputs' maps, to check for damage.
    maps: [&'a MappedCheckpoint; 2],
}

impl<'a> PairSource<'a> {
    fn new(
        plan: &'a OutputPlan,
        jobs: &[OutputJob<'a>],
        sft: (&'a Checkpoint, &'a MappedCheckpoint),
        aligned: (&'a Checkpoint, &'a MappedCheckpoint),
        tasks: usize,
    ) -> PairSource<'a> {
        let pairs = plan.tensors.len();
        PairSource {
            plan,
            alphas: jobs.iter().map(|j| j.alphas).collect(),
            sft,
            aligned,
            extrapolated: (0..pairs)
                .map(|i| {
                    jobs.iter()
                        .find_map(|j| match plan.tensors[i].recipe.treatment(j.alphas[i]) {
                            Treatment::Extrapolate(spec) => Some(spec),
                            _ => None,
                        })
                })
                .collect(),
            inherited: jobs
                .iter()
                .map(|_| (0..pairs).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            partials: (0..tasks)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            maps: [sft.1, aligned.1],
        }
    }

    /// θ1's chunk of `task` (elements of a float tensor, bytes of the others).
    fn aligned_chunk(&self, task: &Task) -> &'a [u8] {
        let p = &self.plan.tensors[task.tensor];
        let unit = spec_of(p).map_or(1, |s| s.aligned.size());
        let t1 = self.aligned.1.tensor(self.aligned.0, locs(p).1);
        &t1[task.start as usize * unit..task.end as usize * unit]
    }

    /// θ0's chunk of `task`, when some output extrapolates its tensor.
    fn sft_chunk(&self, task: &Task) -> Option<&'a [u8]> {
        self.extrapolated[task.tensor].map(|spec| {
            let t0 = self
                .sft
                .1
                .tensor(self.sft.0, locs(&self.plan.tensors[task.tensor]).0);
            &t0[task.start as usize * spec.sft.size()..task.end as usize * spec.sft.size()]
        })
    }

    /// Output `j`'s chunk of `task` in `buf` (or θ1's bytes, for a copy), with the
    /// non-finite values it inherited and its Δ sums.
    fn compute<'b>(
        &self,
        j: usize,
        task: &Task,
        (a, b): (Option<&[u8]>, &'b [u8]),
        buf: &'b mut Vec<u8>,
    ) -> Result<Computed<'b>, EngineError> {
        let p = &self.plan.tensors[task.tensor];
        let alpha = self.alphas[j][task.tensor];
        let treatment = p.recipe.treatment(alpha);
        let n = (task.end - task.start) as usize;
        let max_chunk = (CHUNK_ELEMENTS * 8) as usize;
        if !matches!(treatment, Treatment::Copy) && buf.len() < max_chunk {
            buf.resize(max_chunk, 0);
        }
        match treatment {
            Treatment::Copy => Ok((b, 0, None)),
            Treatment::Cast(spec) => {
                let out = &mut buf[..n * spec.out.size()];
                let stats = kernel::cast(spec, b, out);
                if stats.nonfinite_out > 0
                    && kernel::count_new_nonfinite(as_cast(spec), b, b, out) > 0
                {
                    return Err(overflow_error(
                        p,
                        as_cast(spec),
                        None,
                        self.sft,
                        self.aligned,
                    ));
                }
                Ok((&*out, stats.nonfinite_in, None))
            }
            Treatment::Extrapolate(spec) => {
                // θ0's chunk, read here if the caller did not (it always does).
                let a = a.unwrap_or_else(|| {
                    &self.sft.1.tensor(self.sft.0, locs(p).0)
                        [task.start as usize * spec.sft.size()..task.end as usize * spec.sft.size()]
                });
                let out = &mut buf[..n * spec.out.size()];
                let stats = kernel::extrapolate(spec, alpha, a, b, out);
                if stats.nonfinite_out > 0 && kernel::count_new_nonfinite(spec, a, b, out) > 0 {
                    let e = overflow_error(p, spec, Some(alpha), self.sft, self.aligned);
                    return Err(e);
                }
                let sums = Some((stats.delta_sq, stats.base_sq));
                Ok((&*out, stats.nonfinite_in, sums))
            }
        }
    }

    /// The run's report: each output's result with the non-finite values it inherited, and
    /// the Δ sums, added in task order so that they do not depend on the number of threads.
    fn report(self, results: Vec<Result<(), EngineError>>) -> RunReport {
        let outputs = results
            .into_iter()
            .zip(&self.inherited)
            .map(|(r, inherited)| {
                r.map(|()| WriteStats {
                    inherited_nonfinite: self
                        .plan
                        .tensors
                        .iter()
                        .zip(inherited)
                        .filter_map(|(p, n)| {
                            let n = n.load(Ordering::Relaxed);
                            (n > 0).then(|| (p.name.clone(), n))
                        })
                        .collect(),
                })
            })
            .collect();
        let (mut delta_sq, mut base_sq) = (0.0, 0.0);
        for (dd, bb) in &self.partials {
            delta_sq += f64::from_bits(dd.load(Ordering::Relaxed));
            base_sq += f64::from_bits(bb.load(Ordering::Relaxed));
        }
        RunReport {
            outputs,
            delta_sq,
            base_sq,
        }
    }
}

impl ChunkSource for PairSource<'_> {
    type Scratch = Vec<u8>;

    fn run(
        &self,
        index: usize,
        task: &Task,
        live: &[bool],
        buf: &mut Vec<u8>,
        sink: &mut dyn FnMut(usize, Chunk<'_>) -> bool,
    ) {
        let (a, b) = (self.sft_chunk(task), self.aligned_chunk(task));
        // The sums of squares come from the first output that extrapolates the chunk.
        let mut summed = false;
        for j in (0..self.alphas.len()).filter(|&j| live[j]) {
            let (inherited, sums) = match self.compute(j, task, (a, b), buf) {
                Ok((out, inherited, sums)) => match sink(j, Ok(out)) {
                    true => (inherited, sums),
                    false => continue,
                },
                Err(e) => {
                    sink(j, Err(e));
                    continue;
                }
            };
            if inherited > 0 {
                self.inherited[j][task.tensor].fetch_add(inherited, Ordering::Relaxed);
            }
            if let (Some((dd, bb)), false) = (sums, summed) {
                self.partials[index]
                    .0
                    .store(dd.to_bits(), Ordering::Relaxed);
                self.partials[index]
                    .1
                    .store(bb.to_bits(), Ordering::Relaxed);
                summed = true;
            }
        }
    }

    fn release(&self, task: &Task) {
        self.aligned.1.release(self.aligned_chunk(task));
        if let Some(a) = self.sft_chunk(task) {
            self.sft.1.release(a);
        }
    }

    fn inputs(&self) -> &[&MappedCheckpoint] {
        &self.maps
    }
}

/// Counts, over the whole tensor, the values that overflow although θ1's are finite:
/// `alpha` for an extrapolation, `None` for a conversion (`spec` from [`as_cast`]).
fn overflow_error(
    p: &OutTensor,
    spec: KernelSpec,
    alpha: Option<f64>,
    sft: (&Checkpoint, &MappedCheckpoint),
    aligned: (&Checkpoint, &MappedCheckpoint),
) -> EngineError {
    let (l0, l1) = locs(p);
    let t0 = sft.1.tensor(sft.0, l0);
    let t1 = aligned.1.tensor(aligned.0, l1);
    let n = p.elements() as usize;
    let step = CHUNK_ELEMENTS as usize;
    let mut out = vec![0u8; step.min(n) * spec.out.size()];
    let mut count = 0;
    let mut s = 0;
    while s < n {
        let e = (s + step).min(n);
        let b = &t1[s * spec.aligned.size()..e * spec.aligned.size()];
        let o = &mut out[..(e - s) * spec.out.size()];
        count += match alpha {
            None => match kernel::cast(spec, b, o).nonfinite_out {
                0 => 0,
                _ => kernel::count_new_nonfinite(spec, b, b, o),
            },
            Some(alpha) => {
                let a = &t0[s * spec.sft.size()..e * spec.sft.size()];
                match kernel::extrapolate(spec, alpha, a, b, o).nonfinite_out {
                    0 => 0,
                    _ => kernel::count_new_nonfinite(spec, a, b, o),
                }
            }
        };
        s = e;
    }
    match alpha {
        None => EngineError::CastOverflow {
            tensor: p.name.clone(),
            count,
            elements: n as u64,
            dtype: spec.out,
        },
        Some(alpha) => EngineError::Overflow {
            tensor: p.name.clone(),
            count,
            elements: n as u64,
            dtype: spec.out,
            alpha,
            wider_dtype: true,
        },
    }
}

/// A conversion seen as an extrapolation whose θ0 is θ1 (for counting non-finite values).
fn as_cast(spec: KernelSpec) -> KernelSpec {
    KernelSpec {
        sft: spec.aligned,
        ..spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::FloatDtype;
    use std::path::PathBuf;

    #[test]
    fn io_errors_print_their_cause_once() {
        let e = EngineError::Io {
            path: PathBuf::from("out/model.safetensors"),
            op: "write",
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let cause = std::io::Error::from_raw_os_error(libc::EIO).to_string();
        let text = format!("{:#}", anyhow::Error::new(e).context("writing out"));
        assert_eq!(text.matches(&cause).count(), 1, "{text}");
        assert!(
            text.contains("out/model.safetensors: write failed"),
            "{text}"
        );
    }

    #[test]
    fn numbers_in_messages_are_short() {
        use crate::text::short_number;
        assert_eq!(short_number(0.3), "0.3");
        assert_eq!(short_number(-2.5), "-2.5");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(1e300), "1e300");
        assert_eq!(short_number(-3e-300), "-3e-300");
        assert_eq!(short_number(f64::INFINITY), "inf");
        let e = EngineError::Overflow {
            tensor: "w".into(),
            count: 3,
            elements: 4,
            dtype: FloatDtype::F16,
            alpha: 1e300,
            wider_dtype: true,
        };
        let text = e.to_string();
        assert!(text.contains("alpha = 1e300 "), "{text}");
        assert!(text.len() < 250, "{text}");
        let e = EngineError::NoSpace {
            path: PathBuf::from("o"),
            reason: String::new(),
        };
        assert_eq!(e.to_string(), "o: ");
    }
}
