//! Writing θ2 from an adapter: as an adapter file (B factors scaled by 1+α), or as a full
//! checkpoint laid out like --sft (θ0 + (1+α)·ΔW, streamed in row blocks).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, Layout, TensorLoc};
use crate::dtype::{Dtype, DtypeClass, FloatDtype};
use crate::engine::MappedCheckpoint;
use crate::header::encode_header;
use crate::kernel::{self, KernelSpec};

use super::lora::{decode, decode_into, encode_into, AdapterPlan, Factors, Orientation, Role};

/// Elements per unit of work.
const CHUNK_ELEMENTS: u64 = 1 << 20;
/// Bytes per unit of copy work.
const COPY_CHUNK_BYTES: u64 = 4 << 20;

/// Errors while writing an output.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {op} failed: {cause}")]
    Io {
        path: PathBuf,
        op: &'static str,
        cause: std::io::Error,
    },
    #[error("tensor `{tensor}`: {count} values become infinite or NaN in {dtype} at alpha = {alpha} although the inputs are finite; use a smaller --alpha")]
    Overflow {
        tensor: String,
        count: u64,
        dtype: FloatDtype,
        alpha: f64,
    },
    #[error("adapter tensor `{tensor}` holds {count} infinite or NaN values, so the merged weights would too; the adapter is damaged (check how it was trained and saved)")]
    NonFiniteFactor { tensor: String, count: u64 },
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Input(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Side(#[from] crate::sidefiles::SideFileError),
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> WriteError + 'a {
    move |cause| WriteError::Io {
        path: path.to_path_buf(),
        op,
        cause,
    }
}

/// A checkpoint and its maps.
pub type Mapped<'a> = (&'a Checkpoint, &'a MappedCheckpoint);

fn float(d: Dtype) -> Option<FloatDtype> {
    match d.class() {
        DtypeClass::Float(f) => Some(f),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// --as adapter

/// The α of each adapter tensor: for a LoRA factor, that of the base tensor it moves; for
/// a full tensor, that of its base (or its own name).
pub fn adapter_alphas(
    adapter: &Checkpoint,
    plan: &AdapterPlan,
    alpha_of: &dyn Fn(&str) -> f64,
) -> Vec<f64> {
    adapter
        .tensors()
        .map(|(_, t)| match plan.roles.get(&t.name) {
            Some(Role::Lora { module, part }) => {
                let m = &plan.modules[*module];
                match part {
                    super::names::Part::BBias => {
                        alpha_of(m.base_bias.as_deref().unwrap_or(&m.targets[0]))
                    }
                    _ => alpha_of(&m.targets[0]),
                }
            }
            Some(Role::Full(i)) => {
                let f = &plan.full[*i];
                alpha_of(f.base.as_deref().unwrap_or(&f.name))
            }
            None => 0.0,
        })
        .collect()
}

/// Writes `dir/adapter_model.safetensors`: B factors × (1+α), full tensors extrapolated
/// against the base, everything else byte for byte. `alphas` is parallel to the adapter's
/// tensors in checkpoint order.
pub fn write_adapter(
    dir: &Path,
    plan: &AdapterPlan,
    alphas: &[f64],
    adapter: Mapped,
    base: Mapped,
    cancel: &AtomicBool,
) -> Result<(), WriteError> {
    let (ack, amaps) = adapter;
    let shard = &ack.shards[0];
    let entries: Vec<_> = shard
        .header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.start, t.end))
        .collect();
    let header = encode_header(shard.header.metadata.as_ref(), &entries);
    let path = dir.join(super::config::WEIGHTS_NAME);
    let file = File::create_new(&path).map_err(io(&path, "create"))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header).map_err(io(&path, "write"))?;
    for ((loc, t), &alpha) in ack.tensors().zip(alphas) {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Interrupted);
        }
        let bytes = amaps.tensor(ack, loc);
        let role = plan.roles.get(&t.name).copied();
        match (role, float(t.dtype)) {
            (Some(Role::Lora { part, .. }), Some(d)) if part.scales() && alpha != 0.0 => {
                let c = 1.0 + alpha;
                let mut out = vec![0u8; bytes.len()];
                let mut vals = vec![0.0f64; (CHUNK_ELEMENTS as usize).min(bytes.len() / d.size())];
                let mut nonfinite = 0;
                for (src, dst) in bytes
                    .chunks(vals.len().max(1) * d.size())
                    .zip(out.chunks_mut(vals.len().max(1) * d.size()))
                {
                    let n = src.len() / d.size();
                    decode_into(d, src, &mut vals[..n]);
                    let finite_in = vals[..n].iter().filter(|v| v.is_finite()).count();
                    for v in &mut vals[..n] {
                        *v *= c;
                    }
                    encode_into(d, &vals[..n], dst);
                    let mut back = vec![0.0; n];
                    decode_into(d, dst, &mut back);
                    let finite_out = back.iter().filter(|v| v.is_finite()).count();
                    nonfinite += finite_in.saturating_sub(finite_out) as u64;
                }
                if nonfinite > 0 {
                    return Err(WriteError::Overflow {
                        tensor: t.name.clone(),
                        count: nonfinite,
                        dtype: d,
                        alpha,
                    });
                }
                w.write_all(&out).map_err(io(&path, "write"))?;
            }
            (Some(Role::Full(i)), Some(d1)) => {
                let f = &plan.full[i];
                let base_t = f.base.as_deref().and_then(|n| base.0.get(n));
                match (base_t, alpha != 0.0) {
                    (Some((bloc, bt)), true) => {
                        let Some(d0) = float(bt.dtype) else {
                            w.write_all(bytes).map_err(io(&path, "write"))?;
                            continue;
                        };
                        let spec = KernelSpec {
                            sft: d0,
                            aligned: d1,
                            out: d1,
                        };
                        let t0 = base.1.tensor(base.0, bloc);
                        let out = extrapolate_all(spec, alpha, t0, bytes, &t.name)?;
                        w.write_all(&out).map_err(io(&path, "write"))?;
                    }
                    _ => w.write_all(bytes).map_err(io(&path, "write"))?,
                }
            }
            _ => w.write_all(bytes).map_err(io(&path, "write"))?,
        }
    }
    let file = w.into_inner().map_err(|e| WriteError::Io {
        path: path.clone(),
        op: "write",
        cause: e.into_error(),
    })?;
    file.sync_all().map_err(io(&path, "fsync"))?;
    amaps.check_intact()?;
    base.1.check_intact()?;
    Ok(())
}

/// θ1 + α(θ1 − θ0) over whole tensors, chunk by chunk, refusing new non-finite values.
fn extrapolate_all(
    spec: KernelSpec,
    alpha: f64,
    t0: &[u8],
    t1: &[u8],
    name: &str,
) -> Result<Vec<u8>, WriteError> {
    let n = t1.len() / spec.aligned.size();
    let mut out = vec![0u8; n * spec.out.size()];
    let step = CHUNK_ELEMENTS as usize;
    let mut s = 0;
    let mut count = 0;
    while s < n {
        let e = (s + step).min(n);
        let a = &t0[s * spec.sft.size()..e * spec.sft.size()];
        let b = &t1[s * spec.aligned.size()..e * spec.aligned.size()];
        let o = &mut out[s * spec.out.size()..e * spec.out.size()];
        if kernel::extrapolate(spec, alpha, a, b, o).nonfinite_out > 0 {
            count += kernel::count_new_nonfinite(spec, a, b, o);
        }
        s = e;
    }
    if count > 0 {
        return Err(WriteError::Overflow {
            tensor: name.to_string(),
            count,
            dtype: spec.out,
            alpha,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// --as model

/// Where one output tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// θ0's bytes.
    Copy(TensorLoc),
    /// θ0 + (1+α)·ΔW of module `module` (or DoRA's (1+α)·W1 − α·W0).
    Weight { module: usize, base: TensorLoc },
    /// θ0 + (1+α)·s·lora_B.bias.
    Bias { module: usize, base: TensorLoc },
    /// θ1 + α(θ1 − θ0) for a full tensor of the adapter, in θ0's dtype.
    Full { full: usize, base: TensorLoc },
    /// A full tensor of the adapter with no θ0 (matched by --skip), copied.
    Extra { full: usize },
}

/// One tensor of the output checkpoint.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub len: u64,
    pub source: Source,
}

/// One output file.
#[derive(Debug, Clone)]
pub struct OutShard {
    pub file_name: String,
    pub tensors: Vec<usize>,
    pub offsets: Vec<u64>,
    pub header: Vec<u8>,
    pub data_len: u64,
}

/// The output checkpoint's layout: --sft's files, tensors and dtypes.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    pub tensors: Vec<OutTensor>,
    pub shards: Vec<OutShard>,
    pub index: Option<(String, Vec<u8>)>,
}

impl ModelLayout {
    /// Mirrors `base`; adapter tensors with no θ0 go at the end of the last file.
    pub fn new(base: &Checkpoint, adapter: &Checkpoint, plan: &AdapterPlan) -> ModelLayout {
        let mut role: HashMap<&str, Source> = HashMap::new();
        for (i, m) in plan.modules.iter().enumerate() {
            for t in &m.targets {
                if let Some((loc, _)) = base.get(t) {
                    role.insert(
                        t,
                        Source::Weight {
                            module: i,
                            base: loc,
                        },
                    );
                }
            }
            if let Some((loc, _)) = m.base_bias.as_deref().and_then(|b| base.get(b)) {
                role.insert(
                    m.base_bias.as_deref().unwrap_or_default(),
                    Source::Bias {
                        module: i,
                        base: loc,
                    },
                );
            }
        }
        for (i, f) in plan.full.iter().enumerate() {
            // A full tensor over a non-float base tensor keeps θ0's bytes.
            let float_base = |b: &&str| base.get(b).is_some_and(|(_, t)| float(t.dtype).is_some());
            if let Some((loc, _)) = f
                .base
                .as_deref()
                .filter(float_base)
                .and_then(|b| base.get(b))
            {
                role.insert(
                    f.base.as_deref().unwrap_or_default(),
                    Source::Full { full: i, base: loc },
                );
            }
        }
        let mut tensors = Vec::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for shard in &base.shards {
            let mut g = Vec::new();
            for (idx, t) in shard.header.tensors.iter().enumerate() {
                let loc = base.get(&t.name).map(|(l, _)| l).unwrap_or(TensorLoc {
                    shard: 0,
                    index: idx,
                });
                g.push(tensors.len());
                tensors.push(OutTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    len: t.len(),
                    source: role
                        .get(t.name.as_str())
                        .copied()
                        .unwrap_or(Source::Copy(loc)),
                });
            }
            groups.push(g);
        }
        for (i, f) in plan.full.iter().enumerate() {
            if f.base.is_none() {
                let t = &adapter.shards[f.loc.shard].header.tensors[f.loc.index];
                if let Some(g) = groups.last_mut() {
                    g.push(tensors.len());
                }
                tensors.push(OutTensor {
                    name: f.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    len: t.len(),
                    source: Source::Extra { full: i },
                });
            }
        }
        let shards: Vec<OutShard> = base
            .shards
            .iter()
            .zip(groups)
            .map(|(s, g)| {
                let mut offsets = Vec::with_capacity(g.len());
                let mut entries = Vec::with_capacity(g.len());
                let mut cursor = 0;
                for &i in &g {
                    let t = &tensors[i];
                    offsets.push(cursor);
                    entries.push((
                        t.name.as_str(),
                        t.dtype,
                        t.shape.as_slice(),
                        cursor,
                        cursor + t.len,
                    ));
                    cursor += t.len;
                }
                OutShard {
                    file_name: s.name.clone(),
                    header: encode_header(s.header.metadata.as_ref(), &entries),
                    tensors: g,
                    offsets,
                    data_len: cursor,
                }
            })
            .collect();
        let index = match &base.layout {
            Layout::Indexed {
                index_name,
                metadata,
            } => {
                let mut metadata = metadata.clone();
                let total: u64 = shards.iter().map(|s| s.data_len).sum();
                metadata.insert("total_size".into(), total.into());
                let mut weight_map = serde_json::Map::new();
                for s in &shards {
                    for &i in &s.tensors {
                        weight_map.insert(tensors[i].name.clone(), s.file_name.clone().into());
                    }
                }
                let mut doc = serde_json::Map::new();
                doc.insert("metadata".into(), metadata.into());
                doc.insert("weight_map".into(), weight_map.into());
                let mut bytes =
                    serde_json::to_vec_pretty(&doc).expect("JSON values always serialize");
                bytes.push(b'\n');
                Some((index_name.clone(), bytes))
            }
            Layout::Single => None,
        };
        ModelLayout {
            tensors,
            shards,
            index,
        }
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_len).sum()
    }

    /// Counts: (changed by the adapter, copied from --sft, added from the adapter).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for t in &self.tensors {
            match t.source {
                Source::Copy(_) => c.1 += 1,
                Source::Extra { .. } => c.2 += 1,
                _ => c.0 += 1,
            }
        }
        c
    }
}

/// A unit of work: rows [start, end) of a weight, elements of a full tensor or bias, bytes
/// of a copy.
#[derive(Debug, Clone, Copy)]
struct Task {
    shard: usize,
    tensor: usize,
    start: u64,
    end: u64,
    /// Absolute offset of the task's output in the file.
    out_offset: u64,
}

fn make_tasks(layout: &ModelLayout, plan: &AdapterPlan) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (s, shard) in layout.shards.iter().enumerate() {
        let data_start = shard.header.len() as u64;
        for (&i, &offset) in shard.tensors.iter().zip(&shard.offsets) {
            let t = &layout.tensors[i];
            let elem = t.dtype.bits() / 8;
            let (total, step, unit) = match t.source {
                Source::Weight { module, .. } => {
                    let cols = plan.modules[module].cols.max(1);
                    let rows = plan.modules[module].rows;
                    // Whole register blocks of rows per task (see rows.rs).
                    let step = (CHUNK_ELEMENTS / cols).max(1);
                    let step = if step >= 8 { step / 8 * 8 } else { step };
                    (rows, step, cols * elem)
                }
                Source::Full { .. } | Source::Bias { .. } => {
                    (t.shape.iter().product(), CHUNK_ELEMENTS, elem)
                }
                Source::Copy(_) | Source::Extra { .. } => (t.len, COPY_CHUNK_BYTES, 1),
            };
            let mut start = 0;
            while start < total {
                let end = (start + step).min(total);
                tasks.push(Task {
                    shard: s,
                    tensor: i,
                    start,
                    end,
                    out_offset: data_start + offset + start * unit,
                });
                start = end;
            }
        }
    }
    tasks
}

/// Per-module f64 data shared by the workers.
struct Prepared {
    /// lora_B.bias in f64, per module that has one.
    bias: Vec<Option<Vec<f64>>>,
    /// DoRA: m / ‖W0 + ΔW‖ per output feature, per module that has a magnitude.
    dora: Vec<Option<Vec<f64>>>,
}

fn prepare(
    plan: &AdapterPlan,
    adapter: Mapped,
    base: Mapped,
    pool: &rayon::ThreadPool,
) -> Prepared {
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
            .map(|m| {
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
                for row in 0..rows {
                    f.row(row, &mut acc);
                    let bytes = &w0[row * cols * d0.size()..(row + 1) * cols * d0.size()];
                    decode_into(d0, bytes, &mut w);
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
                Some(mag.iter().zip(&sq).map(|(m, s)| m / s.sqrt()).collect())
            })
            .collect()
    });
    Prepared { bias, dora }
}

/// Each module's factors in f64, decoded by the first task that needs them and dropped
/// after its last task, so that memory holds the factors of the modules in progress (tasks
/// are handed out in file order), not the whole adapter's.
struct FactorCache {
    slots: Vec<Mutex<Option<Arc<Factors>>>>,
    /// Tasks left per module.
    left: Vec<AtomicUsize>,
}

impl FactorCache {
    fn new(plan: &AdapterPlan, tasks: &[Task], layout: &ModelLayout) -> FactorCache {
        let left: Vec<AtomicUsize> = plan.modules.iter().map(|_| AtomicUsize::new(0)).collect();
        for t in tasks {
            if let Source::Weight { module, .. } = layout.tensors[t.tensor].source {
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

/// Writes the output checkpoint's weight files (and index) into `dir`. `alphas` is
/// parallel to `layout.tensors`. Returns the number of output bytes written.
#[allow(clippy::too_many_arguments)]
pub fn write_model(
    dir: &Path,
    layout: &ModelLayout,
    plan: &AdapterPlan,
    alphas: &[f64],
    adapter: Mapped,
    base: Mapped,
    pool: &rayon::ThreadPool,
    cancel: &AtomicBool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<(), WriteError> {
    let mut files = Vec::with_capacity(layout.shards.len());
    for shard in &layout.shards {
        let path = dir.join(&shard.file_name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent, "create directory"))?;
        }
        let file = create_sized(&path, shard.header.len() as u64 + shard.data_len)?;
        file.write_all_at(&shard.header, 0)
            .map_err(io(&path, "write"))?;
        files.push((path, file));
    }
    let prepared = prepare(plan, adapter, base, pool);
    let tasks = make_tasks(layout, plan);
    let factors = FactorCache::new(plan, &tasks, layout);
    // Writes one task's output at its place, and counts it.
    let write = |task: &Task, bytes: &[u8]| -> Result<(), WriteError> {
        let (path, file) = &files[task.shard];
        crate::sys::write_out(file, bytes, task.out_offset).map_err(io(path, "write"))?;
        on_progress(bytes.len() as u64);
        Ok(())
    };
    let run = |task: &Task, buf: &mut Bufs| -> Result<(), WriteError> {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Interrupted);
        }
        let t = &layout.tensors[task.tensor];
        let alpha = alphas[task.tensor];
        let out: &[u8] = match t.source {
            Source::Copy(loc) => {
                // From the map, as `extrapolate` copies: measured cheaper here than
                // copy_file_range, which goes through a pipe on file systems without
                // reflinks (two copies of every byte).
                let chunk = stored_chunk(base, loc, task);
                write(task, chunk)?;
                base.1.release(chunk);
                return Ok(());
            }
            Source::Extra { full } => {
                return write(task, stored_chunk(adapter, plan.full[full].loc, task));
            }
            Source::Full { full, base: loc } => {
                let f = &plan.full[full];
                let d0 = float(t.dtype);
                let d1 = float(adapter.0.shards[f.loc.shard].header.tensors[f.loc.index].dtype);
                let (Some(d0), Some(d1)) = (d0, d1) else {
                    // Non-float: θ0's bytes (a full tensor that is not float is not trained).
                    return write(task, stored_chunk(base, loc, task));
                };
                let spec = KernelSpec {
                    sft: d0,
                    aligned: d1,
                    out: d0,
                };
                let (s, e) = (task.start as usize, task.end as usize);
                let a = &base.1.tensor(base.0, loc)[s * d0.size()..e * d0.size()];
                let b = &adapter.1.tensor(adapter.0, f.loc)[s * d1.size()..e * d1.size()];
                buf.bytes.resize((e - s) * d0.size(), 0);
                let o = &mut buf.bytes[..];
                if kernel::extrapolate(spec, alpha, a, b, o).nonfinite_out > 0 {
                    let count = kernel::count_new_nonfinite(spec, a, b, o);
                    if count > 0 {
                        return Err(WriteError::Overflow {
                            tensor: t.name.clone(),
                            count,
                            dtype: d0,
                            alpha,
                        });
                    }
                }
                &buf.bytes[..]
            }
            Source::Bias { module, base: loc } => {
                let Some(d0) = float(t.dtype) else {
                    unreachable!("planning checked that the base bias is float")
                };
                let (s, e) = (task.start as usize, task.end as usize);
                let src = &base.1.tensor(base.0, loc)[s * d0.size()..e * d0.size()];
                let lb = prepared.bias[module].as_deref().unwrap_or(&[]);
                let sc = plan.modules[module].scaling;
                buf.bytes.resize(src.len(), 0);
                let count = super::rows::add_scaled(d0, alpha, sc, src, &lb[s..e], &mut buf.bytes);
                if count > 0 {
                    // Non-finite bias values, not α, are the cause: say so.
                    let bad = lb[s..e].iter().filter(|v| !v.is_finite()).count() as u64;
                    if let (true, Some(bias)) = (bad > 0, &plan.modules[module].bias) {
                        return Err(WriteError::NonFiniteFactor {
                            tensor: bias.key.clone(),
                            count: bad,
                        });
                    }
                    return Err(WriteError::Overflow {
                        tensor: t.name.clone(),
                        count,
                        dtype: d0,
                        alpha,
                    });
                }
                &buf.bytes[..]
            }
            Source::Weight { module, base: loc } => {
                let Some(d0) = float(t.dtype) else {
                    unreachable!("planning checked that the base weight is float")
                };
                let f = factors.get(module, plan, adapter);
                let f = &*f;
                let m = &plan.modules[module];
                let cols = f.cols;
                let (r0, r1) = (task.start as usize, task.end as usize);
                let src_all = base.1.tensor(base.0, loc);
                let src = &src_all[r0 * cols * d0.size()..r1 * cols * d0.size()];
                buf.bytes.resize(src.len(), 0);
                let job = super::rows::Rows {
                    factors: f,
                    w0: src,
                    dtype: d0,
                    first: r0,
                    alpha,
                    dora: prepared.dora[module].as_deref().map(|g| (g, m.orientation)),
                };
                let count = super::rows::weight_rows(&job, &mut buf.bytes, &mut buf.rows);
                factors.done(module);
                if count > 0 {
                    // Non-finite factors, not α, are the cause: say so.
                    let bad = |x: &[f64]| x.iter().filter(|v| !v.is_finite()).count() as u64;
                    let (in_a, in_b) = match m.orientation {
                        Orientation::Linear => (bad(&f.right), bad(&f.left)),
                        _ => (bad(&f.left), bad(&f.right)),
                    };
                    if in_a + in_b > 0 {
                        let (factor, n) = if in_a > 0 { (&m.a, in_a) } else { (&m.b, in_b) };
                        return Err(WriteError::NonFiniteFactor {
                            tensor: factor.key.clone(),
                            count: n,
                        });
                    }
                    return Err(WriteError::Overflow {
                        tensor: t.name.clone(),
                        count,
                        dtype: d0,
                        alpha,
                    });
                }
                base.1.release(src);
                &buf.bytes[..]
            }
        };
        write(task, out)
    };
    // Tasks are handed out in file order from one counter; each worker keeps its buffers.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let failure: Mutex<Option<WriteError>> = Mutex::new(None);
    pool.broadcast(|_| {
        let mut buf = Bufs::default();
        while !failed.load(Ordering::Relaxed) {
            let Some(task) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            if let Err(e) = run(task, &mut buf) {
                let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
                failed.store(true, Ordering::Relaxed);
            }
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for (path, file) in &files {
        file.sync_all().map_err(io(path, "fsync"))?;
    }
    if let Some((name, bytes)) = &layout.index {
        crate::sidefiles::write_file(dir, name, bytes)?;
    }
    adapter.1.check_intact()?;
    base.1.check_intact()?;
    Ok(())
}

/// Bytes [start, end) of a stored tensor: a task that copies them.
fn stored_chunk<'m>((ck, maps): Mapped<'m>, loc: TensorLoc, task: &Task) -> &'m [u8] {
    &maps.tensor(ck, loc)[task.start as usize..task.end as usize]
}

#[derive(Default)]
struct Bufs {
    bytes: Vec<u8>,
    rows: super::rows::Scratch,
}

/// Creates a file at its final size, reserving its blocks when the filesystem can (so
/// that positioned writes do not allocate, and a full disk fails early).
fn create_sized(path: &Path, len: u64) -> Result<File, WriteError> {
    use std::os::fd::AsRawFd;
    let file = File::create_new(path).map_err(io(path, "create"))?;
    if len > 0 {
        // SAFETY: the descriptor is open for writing for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            file.set_len(len).map_err(io(path, "resize"))?;
        }
    }
    Ok(file)
}

/// Per output tensor α for `--as model`: rules match the base tensor names.
pub fn model_alphas(layout: &ModelLayout, alpha_of: &dyn Fn(&str) -> f64) -> Vec<f64> {
    layout.tensors.iter().map(|t| alpha_of(&t.name)).collect()
}

/// The adapter files whose names mark them as tokenizer or chat-template files.
pub fn is_tokenizer_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("tokenizer")
        || lower.starts_with("chat_template")
        || lower.ends_with(".jinja")
        || matches!(
            lower.as_str(),
            "special_tokens_map.json"
                | "added_tokens.json"
                | "vocab.json"
                | "vocab.txt"
                | "merges.txt"
                | "spiece.model"
                | "sentencepiece.bpe.model"
        )
}

/// Groups paths by their top-level name (for the override of side files).
pub fn top_names(paths: &[PathBuf]) -> BTreeMap<String, PathBuf> {
    paths
        .iter()
        .map(|p| (p.to_string_lossy().into_owned(), p.clone()))
        .collect()
}
