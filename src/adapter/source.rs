//! The chunk source of an adapter run: the bytes of each output's chunk from the recipes
//! of [`super::layout`], for every α at once. A block of a LoRA weight's rows gets its
//! rank-r products once, then one epilogue per α ([`super::rows::weight_rows_multi`]), so
//! a sweep reads its inputs and computes its products once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::dtype::{Dtype, DtypeClass, FloatDtype};
use crate::engine::{EngineError, MappedCheckpoint};
use crate::kernel::{self, KernelSpec};
use crate::writer::{Chunk, ChunkSource, Task};

use super::lora::{decode, decode_into, encode_into, AdapterPlan, Factors, Orientation};
use super::rows::{self, Rows};
use crate::plan::{Input, OutTensor, OutputPlan, Recipe};

/// A checkpoint and its maps.
pub type Mapped<'a> = (&'a Checkpoint, &'a MappedCheckpoint);

fn float(d: Dtype) -> Option<FloatDtype> {
    match d.class() {
        DtypeClass::Float(f) => Some(f),
        _ => None,
    }
}

/// Everything the workers read: the layout, the adapter's plan, the inputs, the α of every
/// output's tensors, and the f64 data shared by all α.
pub struct LoraSource<'a> {
    layout: &'a OutputPlan,
    plan: &'a AdapterPlan,
    /// Per output, per tensor of the layout.
    alphas: Vec<Vec<f64>>,
    base: Mapped<'a>,
    adapter: Mapped<'a>,
    data: F64Data,
    factors: FactorCache,
    /// Both inputs' maps, to check for damage.
    maps: [&'a MappedCheckpoint; 2],
}

/// What one worker reuses.
#[derive(Default)]
pub struct Scratch {
    /// One output buffer per α of a task.
    outs: Vec<Vec<u8>>,
    counts: Vec<u64>,
    alphas: Vec<f64>,
    rows: rows::Scratch,
    vals: Vec<f64>,
    scaled: Vec<f64>,
    back: Vec<f64>,
}

impl<'a> LoraSource<'a> {
    /// `alphas`: per output, each tensor's α ([`OutputPlan::alphas`]).
    pub fn new(
        layout: &'a OutputPlan,
        plan: &'a AdapterPlan,
        alphas: Vec<Vec<f64>>,
        (base, adapter): (Mapped<'a>, Mapped<'a>),
        tasks: &[Task],
        pool: &rayon::ThreadPool,
    ) -> LoraSource<'a> {
        LoraSource {
            layout,
            plan,
            alphas,
            base,
            adapter,
            data: F64Data::new(plan, adapter, base, pool),
            factors: FactorCache::new(plan, tasks, layout),
            maps: [adapter.1, base.1],
        }
    }

    /// The stored bytes `[start, end)` of a tensor of one input.
    fn stored(&self, from: Input, loc: TensorLoc, task: &Task) -> &'a [u8] {
        let (ck, maps) = match from {
            Input::Sft => self.base,
            Input::Aligned => self.adapter,
        };
        &maps.tensor(ck, loc)[task.start as usize..task.end as usize]
    }

    /// θ0's bytes of a task of a float tensor (rows of `cols` elements for a weight).
    fn base_part(&self, loc: TensorLoc, d: FloatDtype, task: &Task, cols: usize) -> &'a [u8] {
        let unit = cols * d.size();
        &self.base.1.tensor(self.base.0, loc)[task.start as usize * unit..task.end as usize * unit]
    }

    /// Computes the chunk `[task.start, task.end)` of tensor `t` for each α of
    /// `s.alphas` into `s.outs`, setting `s.counts` to the values that became non-finite.
    fn compute(&self, t: &OutTensor, task: &Task, s: &mut Scratch) {
        let bytes = match t.recipe {
            Recipe::LoraRows { module, .. } => {
                let cols = self.plan.modules[module].cols as usize;
                (task.end - task.start) as usize * cols * (t.dtype.bits() / 8) as usize
            }
            _ => (task.end - task.start) as usize * (t.dtype.bits() / 8) as usize,
        };
        s.outs.resize_with(s.alphas.len(), Vec::new);
        for o in &mut s.outs {
            o.resize(bytes, 0);
        }
        s.counts.clear();
        s.counts.resize(s.alphas.len(), 0);
        match t.recipe {
            Recipe::Copy { .. } => unreachable!("copies need no computing"),
            Recipe::Pair { .. } => unreachable!("an adapter run pairs no checkpoints"),
            Recipe::LoraRows { module, base, .. } => self.lora_rows(t, module, base, task, s),
            Recipe::LoraBias { module, base } => self.lora_bias(t, module, base, task, s),
            Recipe::AdapterFull {
                full,
                base,
                zero_copies,
            } => self.adapter_full(t, (full, base, zero_copies), task, s),
            Recipe::ScaledB { loc } => self.scaled_b(t, loc, task, s),
        }
    }

    fn lora_rows(
        &self,
        t: &OutTensor,
        module: usize,
        base: TensorLoc,
        task: &Task,
        s: &mut Scratch,
    ) {
        let Some(d0) = float(t.dtype) else {
            unreachable!("planning checked that the base weight is float")
        };
        let f = self.factors.get(module, self.plan, self.adapter);
        let m = &self.plan.modules[module];
        let job = Rows {
            factors: &f,
            w0: self.base_part(base, d0, task, f.cols),
            dtype: d0,
            first: task.start as usize,
            alpha: 0.0,
            dora: self.data.dora[module]
                .as_deref()
                .map(|g| (g, m.orientation)),
        };
        let mut outs: Vec<&mut [u8]> = s.outs.iter_mut().map(|o| &mut o[..]).collect();
        rows::weight_rows_multi(&job, &s.alphas, &mut outs, &mut s.counts, &mut s.rows);
    }

    fn lora_bias(
        &self,
        t: &OutTensor,
        module: usize,
        base: TensorLoc,
        task: &Task,
        s: &mut Scratch,
    ) {
        let Some(d0) = float(t.dtype) else {
            unreachable!("planning checked that the base bias is float")
        };
        let src = self.base_part(base, d0, task, 1);
        let lb = self.data.bias[module].as_deref().unwrap_or(&[]);
        let lb = &lb[task.start as usize..task.end as usize];
        let sc = self.plan.modules[module].scaling;
        for ((out, count), &alpha) in s.outs.iter_mut().zip(&mut s.counts).zip(&s.alphas) {
            *count = rows::add_scaled(d0, alpha, sc, src, lb, out);
        }
    }

    fn adapter_full(
        &self,
        t: &OutTensor,
        (full, base, zero_copies): (usize, TensorLoc, bool),
        task: &Task,
        s: &mut Scratch,
    ) {
        let f = &self.plan.full[full];
        let d1 = self.adapter.0.shards[f.loc.shard].header.tensors[f.loc.index].dtype;
        let d0 = self.base.0.shards[base.shard].header.tensors[base.index].dtype;
        let (Some(d0), Some(d1), Some(out)) = (float(d0), float(d1), float(t.dtype)) else {
            unreachable!("planning checked that both tensors are float")
        };
        let spec = KernelSpec {
            sft: d0,
            aligned: d1,
            out,
        };
        let (st, e) = (task.start as usize, task.end as usize);
        let a = &self.base.1.tensor(self.base.0, base)[st * d0.size()..e * d0.size()];
        let b = &self.adapter.1.tensor(self.adapter.0, f.loc)[st * d1.size()..e * d1.size()];
        for ((o, count), &alpha) in s.outs.iter_mut().zip(&mut s.counts).zip(&s.alphas) {
            if zero_copies && alpha == 0.0 {
                o.copy_from_slice(b);
            } else if kernel::extrapolate(spec, alpha, a, b, o).nonfinite_out > 0 {
                *count = kernel::count_new_nonfinite(spec, a, b, o);
            }
        }
    }

    fn scaled_b(&self, t: &OutTensor, loc: TensorLoc, task: &Task, s: &mut Scratch) {
        let Some(d) = float(t.dtype) else {
            unreachable!("planning checked that the factor is float")
        };
        let (st, e) = (task.start as usize, task.end as usize);
        let src = &self.adapter.1.tensor(self.adapter.0, loc)[st * d.size()..e * d.size()];
        let n = e - st;
        s.vals.resize(n, 0.0);
        decode_into(d, src, &mut s.vals);
        let finite_in = s.vals.iter().filter(|v| v.is_finite()).count();
        for ((o, count), &alpha) in s.outs.iter_mut().zip(&mut s.counts).zip(&s.alphas) {
            if alpha == 0.0 {
                o.copy_from_slice(src);
                continue;
            }
            let c = 1.0 + alpha;
            s.scaled.clear();
            s.scaled.extend(s.vals.iter().map(|v| v * c));
            encode_into(d, &s.scaled, o);
            s.back.resize(n, 0.0);
            decode_into(d, o, &mut s.back);
            let finite_out = s.back.iter().filter(|v| v.is_finite()).count();
            *count = finite_in.saturating_sub(finite_out) as u64;
        }
    }

    /// Why output tensor `tensor` cannot be written at `alpha`: a non-finite factor, or
    /// the values that overflow over the whole tensor.
    fn failure(&self, tensor: usize, alpha: f64) -> EngineError {
        let t = &self.layout.tensors[tensor];
        if let Some(e) = self.nonfinite_factor(t) {
            return e;
        }
        let mut s = Scratch {
            alphas: vec![alpha],
            ..Scratch::default()
        };
        let mut count = 0;
        for task in self.layout.tasks(1).iter().filter(|k| k.tensor == tensor) {
            self.compute(t, task, &mut s);
            count += s.counts[0];
        }
        EngineError::Overflow {
            tensor: t.name.clone(),
            count,
            elements: t.shape.iter().product(),
            dtype: float(t.dtype).unwrap_or(FloatDtype::F32),
            alpha,
            wider_dtype: false,
        }
    }

    /// Non-finite factors, not α, are the cause: say so.
    fn nonfinite_factor(&self, t: &OutTensor) -> Option<EngineError> {
        let bad = |x: &[f64]| x.iter().filter(|v| !v.is_finite()).count() as u64;
        let (key, count) = match t.recipe {
            Recipe::LoraRows { module, .. } => {
                let m = &self.plan.modules[module];
                let f = self.factors.get(module, self.plan, self.adapter);
                let (in_a, in_b) = match m.orientation {
                    Orientation::Linear => (bad(&f.right), bad(&f.left)),
                    _ => (bad(&f.left), bad(&f.right)),
                };
                match (in_a, in_b) {
                    (0, 0) => return None,
                    (0, n) => (&m.b.key, n),
                    (n, _) => (&m.a.key, n),
                }
            }
            Recipe::LoraBias { module, .. } => {
                let lb = self.data.bias[module].as_deref().unwrap_or(&[]);
                let bias = self.plan.modules[module].bias.as_ref()?;
                match bad(lb) {
                    0 => return None,
                    n => (&bias.key, n),
                }
            }
            _ => return None,
        };
        Some(EngineError::NonFiniteFactor {
            tensor: key.clone(),
            count,
        })
    }
}

impl ChunkSource for LoraSource<'_> {
    type Scratch = Scratch;

    fn run(
        &self,
        _index: usize,
        task: &Task,
        live: &[bool],
        s: &mut Scratch,
        sink: &mut dyn FnMut(usize, Chunk<'_>) -> bool,
    ) {
        let t = &self.layout.tensors[task.tensor];
        let outputs: Vec<usize> = (0..live.len()).filter(|&j| live[j]).collect();
        if let Recipe::Copy { from, loc } = t.recipe {
            let chunk = self.stored(from, loc, task);
            for j in outputs {
                sink(j, Ok(chunk));
            }
            return;
        }
        if outputs.is_empty() {
            return;
        }
        s.alphas.clear();
        s.alphas
            .extend(outputs.iter().map(|&j| self.alphas[j][task.tensor]));
        self.compute(t, task, s);
        for (k, &j) in outputs.iter().enumerate() {
            if s.counts[k] > 0 {
                sink(j, Err(self.failure(task.tensor, s.alphas[k])));
            } else {
                sink(j, Ok(&s.outs[k]));
            }
        }
    }

    fn release(&self, task: &Task) {
        // Every input page a task read is dropped from this process once it is written:
        // resident memory does not grow with the inputs.
        let t = &self.layout.tensors[task.tensor];
        let (st, e) = (task.start as usize, task.end as usize);
        match t.recipe {
            // From the map, as `extrapolate` copies: measured cheaper here than
            // copy_file_range, which goes through a pipe on file systems without reflinks
            // (two copies of every byte).
            Recipe::Copy { from, loc } => {
                let maps = match from {
                    Input::Sft => self.base.1,
                    Input::Aligned => self.adapter.1,
                };
                maps.release(self.stored(from, loc, task));
            }
            Recipe::Pair { .. } => unreachable!("an adapter run pairs no checkpoints"),
            Recipe::LoraRows { module, base, .. } => {
                if let Some(d0) = float(t.dtype) {
                    let cols = self.plan.modules[module].cols as usize;
                    self.base.1.release(self.base_part(base, d0, task, cols));
                }
                self.factors.done(module);
            }
            Recipe::LoraBias { base, .. } => {
                if let Some(d0) = float(t.dtype) {
                    self.base.1.release(self.base_part(base, d0, task, 1));
                }
            }
            Recipe::AdapterFull { full, base, .. } => {
                let loc = self.plan.full[full].loc;
                let (ack, amaps) = self.adapter;
                let d1 = ack.shards[loc.shard].header.tensors[loc.index].dtype;
                let d0 = self.base.0.shards[base.shard].header.tensors[base.index].dtype;
                if let (Some(d0), Some(d1)) = (float(d0), float(d1)) {
                    self.base.1.release(self.base_part(base, d0, task, 1));
                    amaps.release(&amaps.tensor(ack, loc)[st * d1.size()..e * d1.size()]);
                }
            }
            Recipe::ScaledB { loc } => {
                if let Some(d) = float(t.dtype) {
                    let (ack, amaps) = self.adapter;
                    amaps.release(&amaps.tensor(ack, loc)[st * d.size()..e * d.size()]);
                }
            }
        }
    }

    fn inputs(&self) -> &[&MappedCheckpoint] {
        &self.maps
    }
}

/// Per-module f64 data shared by the workers and every α.
struct F64Data {
    /// lora_B.bias in f64, per module that has one.
    bias: Vec<Option<Vec<f64>>>,
    /// DoRA: m / ‖W0 + ΔW‖ per output feature, per module that has a magnitude.
    dora: Vec<Option<Vec<f64>>>,
}

impl F64Data {
    fn new(plan: &AdapterPlan, adapter: Mapped, base: Mapped, pool: &rayon::ThreadPool) -> F64Data {
        let (ack, amaps) = adapter;
        let bias = plan
            .modules
            .iter()
            .map(|m| {
                m.bias
                    .as_ref()
                    .map(|b| decode(b.dtype, amaps.tensor(ack, b.loc)))
            })
            .collect();
        let dora = pool.install(|| {
            plan.modules
                .par_iter()
                .map(|m| dora_factors(m, adapter, base))
                .collect()
        });
        F64Data { bias, dora }
    }
}

/// DoRA: m / ‖W0 + s·ΔW‖ per output feature of module `m`, when it has a magnitude.
fn dora_factors(m: &super::lora::Module, adapter: Mapped, base: Mapped) -> Option<Vec<f64>> {
    let (ack, amaps) = adapter;
    let mag = m.magnitude.as_ref()?;
    let mag = decode(mag.dtype, amaps.tensor(ack, mag.loc));
    let (loc, t0) = base.0.get(&m.targets[0])?;
    let d0 = float(t0.dtype)?;
    let w0 = base.1.tensor(base.0, loc);
    let f = Factors::new(m, amaps.tensor(ack, m.a.loc), amaps.tensor(ack, m.b.loc));
    let (rows, cols) = (f.rows, f.cols);
    let mut sq = vec![0.0f64; mag.len()];
    let mut acc = vec![0.0; cols];
    let mut w = vec![0.0; cols];
    let row_bytes = cols * d0.size();
    for row in 0..rows {
        f.row(row, &mut acc);
        let bytes = &w0[row * row_bytes..(row + 1) * row_bytes];
        decode_into(d0, bytes, &mut w);
        // θ0's pages are dropped as the rows move on (every few MiB), so resident memory
        // does not grow with the tensor, as in the writer's tasks.
        if (row + 1) % RELEASE_ROWS == 0 || row + 1 == rows {
            let from = (row + 1).saturating_sub(RELEASE_ROWS) * row_bytes;
            base.1.release(&w0[from..(row + 1) * row_bytes]);
        }
        match m.orientation {
            Orientation::Linear => {
                sq[row] = w
                    .iter()
                    .zip(&acc)
                    .map(|(x, d)| {
                        let v = x + f.scaling * d;
                        v * v
                    })
                    .sum();
            }
            _ => {
                for ((s, x), d) in sq.iter_mut().zip(&w).zip(&acc) {
                    let v = x + f.scaling * d;
                    *s += v * v;
                }
            }
        }
    }
    for factor in [&m.a, &m.b] {
        amaps.release(amaps.tensor(ack, factor.loc));
    }
    Some(mag.iter().zip(&sq).map(|(m, s)| m / s.sqrt()).collect())
}

/// Rows of a DoRA base weight read between two releases of its pages.
const RELEASE_ROWS: usize = 256;

/// Each module's factors in f64, decoded by the first task that needs them and dropped
/// after its last task, so that memory holds the factors of the modules in progress (tasks
/// are handed out in file order), not the whole adapter's.
struct FactorCache {
    slots: Vec<Mutex<Option<Arc<Factors>>>>,
    /// Tasks left per module.
    left: Vec<AtomicUsize>,
}

impl FactorCache {
    fn new(plan: &AdapterPlan, tasks: &[Task], layout: &OutputPlan) -> FactorCache {
        let left: Vec<AtomicUsize> = plan.modules.iter().map(|_| AtomicUsize::new(0)).collect();
        for t in tasks {
            if let Recipe::LoraRows { module, .. } = layout.tensors[t.tensor].recipe {
                left[module].fetch_add(1, Ordering::Relaxed);
            }
        }
        FactorCache {
            slots: plan.modules.iter().map(|_| Mutex::new(None)).collect(),
            left,
        }
    }

    /// The factors of `module`, decoded from the adapter on first use.
    fn get(&self, module: usize, plan: &AdapterPlan, adapter: Mapped) -> Arc<Factors> {
        let mut slot = self.slots[module].lock().unwrap_or_else(|p| p.into_inner());
        let f = slot.get_or_insert_with(|| {
            let m = &plan.modules[module];
            let (ack, amaps) = adapter;
            let (a, b) = (amaps.tensor(ack, m.a.loc), amaps.tensor(ack, m.b.loc));
            let f = Factors::new(m, a, b);
            // Decoded: the mapped pages need not stay in this process's memory.
            amaps.release(a);
            amaps.release(b);
            Arc::new(f)
        });
        Arc::clone(f)
    }

    /// Called after each task of `module`: the last one drops the factors.
    fn done(&self, module: usize) {
        if self.left[module].fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.slots[module].lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}
