//! Shared helpers for expo's integration tests (in the spirit of hyperfine's
//! `tests/common.rs` and ripgrep's `TestCommand`):
//!
//! * builders that write small Hugging Face-layout checkpoints with the `safetensors` crate
//!   (single `model.safetensors`, or `model-0000K-of-0000N.safetensors` shards plus
//!   `model.safetensors.index.json`), and their side files;
//! * [`expo`], which runs the binary and checks exit code, stdout and stderr together;
//! * readers that load an output directory back with `SafeTensors::deserialize` *and* parse
//!   the raw layout (8-byte length, header JSON, data order);
//! * an independent reference: inputs are widened to f64 with the `half` crate (exact), the
//!   formula is evaluated in f64, and the result is rounded by a deliberately slow rounding
//!   written here (bisection over the target's bit patterns, exact midpoint comparison, ties
//!   to even). It never looks at expo's output and never uses `half`'s `from_f64`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
pub use safetensors::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

pub mod adapter;

// ---------------------------------------------------------------------------------------
// Deterministic randomness (no dependency on proptest outside the property test)
// ---------------------------------------------------------------------------------------

/// splitmix64: tiny, deterministic, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: i32, hi: i32) -> i32 {
        lo + self.below((hi - lo + 1) as u64) as i32
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// Uniform in [-1, 1), with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

// ---------------------------------------------------------------------------------------
// The reference: exact widening and a slow, obviously-correct rounding
// ---------------------------------------------------------------------------------------

pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

/// Bytes per element (whole-byte dtypes only).
pub fn elem_size(d: Dtype) -> usize {
    assert!(
        d.bitsize().is_multiple_of(8),
        "{d} is not a whole-byte dtype"
    );
    d.bitsize() / 8
}

/// The `--dtype` spelling of a float dtype.
pub fn cli_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bf16",
        Dtype::F16 => "f16",
        Dtype::F32 => "f32",
        Dtype::F64 => "f64",
        other => panic!("{other} is not a float dtype"),
    }
}

/// Explicit mantissa bits.
pub fn mantissa_bits(d: Dtype) -> i32 {
    match d {
        Dtype::BF16 => 7,
        Dtype::F16 => 10,
        Dtype::F32 => 23,
        Dtype::F64 => 52,
        other => panic!("{other} is not a float dtype"),
    }
}

/// Exponent of the smallest normal number.
pub fn min_normal_exp(d: Dtype) -> i32 {
    match d {
        Dtype::BF16 | Dtype::F32 => -126,
        Dtype::F16 => -14,
        Dtype::F64 => -1022,
        other => panic!("{other} is not a float dtype"),
    }
}

pub fn bf16_to_f64(bits: u16) -> f64 {
    half::bf16::from_bits(bits).to_f64()
}

pub fn f16_to_f64(bits: u16) -> f64 {
    half::f16::from_bits(bits).to_f64()
}

/// Rounds `x` to a 16-bit binary format, slowly and obviously: bisect for the largest
/// non-negative bit pattern whose value is <= |x| (non-negative patterns are ordered like
/// their values), take the next pattern up as the other neighbour, and compare |x| with
/// their midpoint exactly (the midpoint of two adjacent 16-bit floats is exact in f64).
/// Ties go to the even pattern. Above the largest finite value the "next" neighbour is
/// 2^(emax+1), whose pattern is infinity, so overflow follows IEEE round-to-nearest.
fn round_to_16(x: f64, decode: fn(u16) -> f64, inf: u16, nan: u16) -> u16 {
    if x.is_nan() {
        return nan;
    }
    let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
    let a = x.abs();
    if a.is_infinite() {
        return sign | inf;
    }
    let max_finite = inf - 1;
    let (mut lo, mut hi) = (0u16, max_finite);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if decode(mid) <= a {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let down = decode(lo);
    if down == a {
        return sign | lo;
    }
    let up = if lo == max_finite {
        down + (down - decode(lo - 1))
    } else {
        decode(lo + 1)
    };
    assert!(down < a && (a < up || lo == max_finite));
    let mid = (down + up) / 2.0;
    assert_eq!(mid * 2.0, down + up, "midpoint must be exact");
    let bits = if a < mid {
        lo
    } else if a > mid {
        lo + 1
    } else if lo % 2 == 0 {
        lo
    } else {
        lo + 1
    };
    sign | bits
}

/// The reference rounding of an f64 to `d`, as raw bits.
pub fn round_bits(x: f64, d: Dtype) -> u64 {
    match d {
        Dtype::BF16 => round_to_16(x, bf16_to_f64, 0x7f80, 0x7fc0) as u64,
        Dtype::F16 => round_to_16(x, f16_to_f64, 0x7c00, 0x7e00) as u64,
        // Rust's `as f32` rounds to nearest even, keeps subnormals, overflows to inf.
        Dtype::F32 => (x as f32).to_bits() as u64,
        Dtype::F64 => x.to_bits(),
        other => panic!("{other} is not a float dtype"),
    }
}

/// Decodes one element's bits of a float dtype exactly.
pub fn bits_to_f64(bits: u64, d: Dtype) -> f64 {
    match d {
        Dtype::BF16 => bf16_to_f64(bits as u16),
        Dtype::F16 => f16_to_f64(bits as u16),
        Dtype::F32 => f32::from_bits(bits as u32) as f64,
        Dtype::F64 => f64::from_bits(bits),
        other => panic!("{other} is not a float dtype"),
    }
}

/// Little-endian element bits of a float buffer.
pub fn elem_bits(data: &[u8], d: Dtype) -> Vec<u64> {
    let n = elem_size(d);
    data.chunks_exact(n)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

/// Widens a float buffer to f64 (exact).
pub fn decode(d: Dtype, data: &[u8]) -> Vec<f64> {
    elem_bits(data, d)
        .into_iter()
        .map(|b| bits_to_f64(b, d))
        .collect()
}

/// Rounds values into a float buffer with the reference rounding.
pub fn encode(d: Dtype, values: &[f64]) -> Vec<u8> {
    let n = elem_size(d);
    let mut out = Vec::with_capacity(values.len() * n);
    for &v in values {
        out.extend_from_slice(&round_bits(v, d).to_le_bytes()[..n]);
    }
    out
}

/// θ1 + α·(θ1 − θ0) in f64: subtract, multiply, add. α = 0 is θ1 itself, and so is an
/// element where θ0 or θ1 is ±inf or NaN.
pub fn formula(t0: f64, t1: f64, alpha: f64) -> f64 {
    if alpha == 0.0 || !t0.is_finite() || !t1.is_finite() {
        return t1;
    }
    let diff = t1 - t0;
    let step = alpha * diff;
    t1 + step
}

/// A random normal number of dtype `d` with exponent `e` and random sign and mantissa.
pub fn random_normal(rng: &mut Rng, d: Dtype, e: i32) -> f64 {
    let m = mantissa_bits(d).min(52);
    let mant = rng.next_u64() >> (64 - m);
    let v = (1.0 + mant as f64 / 2f64.powi(m)) * 2f64.powi(e);
    if rng.bool() {
        -v
    } else {
        v
    }
}

/// Pairs (θ0, θ1), exactly representable in `sft` and `aligned`, where a shortcut gives a
/// different answer than the single rounding: for a 16-bit output, rounding f64 → f32 →
/// output (double rounding); for an f32 output, doing the arithmetic in f32. Deterministic.
pub fn tricky_pairs(
    sft: Dtype,
    aligned: Dtype,
    out: Dtype,
    alpha: f64,
    want: usize,
    seed: u64,
) -> Vec<(f64, f64)> {
    let mut rng = Rng::new(seed);
    let mut found = Vec::new();
    let max_gap = if sft == Dtype::F16 { 20 } else { 40 };
    for _ in 0..4_000_000 {
        if found.len() >= want {
            break;
        }
        let e1 = rng.range(-6, 6);
        let t1 = random_normal(&mut rng, aligned, e1);
        let e0 = (e1 - rng.range(0, max_gap)).max(min_normal_exp(sft));
        let t0 = random_normal(&mut rng, sft, e0);
        let r = formula(t0, t1, alpha);
        if !r.is_finite() {
            continue;
        }
        let differs = match out {
            Dtype::BF16 | Dtype::F16 => {
                let f = r as f32;
                if f as f64 == r {
                    continue;
                }
                // Cheap pre-filter: f32 landed exactly on a tie of the output format.
                let m = mantissa_bits(out);
                let mask = (1u32 << (23 - m)) - 1;
                if f.to_bits() & mask != 1u32 << (22 - m) {
                    continue;
                }
                round_bits(r, out) != round_bits(f as f64, out)
            }
            Dtype::F32 => {
                let (a, b, c) = (t0 as f32, t1 as f32, alpha as f32);
                let in_f32 = b + c * (b - a);
                in_f32.to_bits() as u64 != round_bits(r, Dtype::F32)
            }
            _ => false,
        };
        if differs {
            found.push((t0, t1));
        }
    }
    found
}

/// Hand-picked (θ0, θ1) pairs: signed zeros, subnormals, the smallest normal, values near
/// 1, negative values. Values are rounded into their dtypes by [`Tensor::float`].
pub fn edge_pairs(aligned: Dtype) -> Vec<(f64, f64)> {
    let m = mantissa_bits(aligned);
    let emin = min_normal_exp(aligned);
    let sub = 2f64.powi(emin - m); // smallest subnormal
    let sub_max = 2f64.powi(emin) - sub;
    let norm = 2f64.powi(emin);
    let ulp1 = 2f64.powi(-m);
    vec![
        (0.0, 0.0),
        (-0.0, -0.0),
        (0.0, -0.0),
        (-0.0, 0.0),
        (1.0, -0.0),
        (-1.0, -0.0),
        (sub, 3.0 * sub),
        (3.0 * sub, sub),
        (-sub, sub),
        (sub, -2.0 * sub),
        (5.0 * sub, 4.0 * sub),
        (sub_max, norm),
        (norm, sub_max),
        (norm, 1.5 * norm),
        (-norm, -2.0 * norm),
        (1.0, 1.0),
        (-1.0, -1.0),
        (1.0, 1.0 + ulp1),
        (1.0 + ulp1, 1.0),
        (1.0 + 3.0 * ulp1, 1.0 + ulp1),
        (0.1, 0.125),
        (-3.75, -3.5),
        (2.0, -2.0),
        (-0.3, 0.2),
        (1000.0, 1024.0),
        (-100.0, -99.0),
        (0.0, sub),
        (sub, 0.0),
    ]
}

/// `n` random pairs with θ1 close to θ0 (as after fine-tuning), magnitudes up to ~8.
pub fn random_pairs(rng: &mut Rng, n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|_| {
            let t0 = rng.unit() * 2f64.powi(rng.range(-12, 3));
            let t1 = t0 + rng.unit() * 2f64.powi(rng.range(-16, -2));
            (t0, t1)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------

/// A named tensor with its raw little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn raw(name: &str, dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Tensor {
        assert_eq!(
            numel(shape) * dtype.bitsize(),
            data.len() * 8,
            "tensor {name}: data does not fit its shape"
        );
        Tensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    /// A float tensor holding `values` rounded into `dtype` with the reference rounding.
    pub fn float(name: &str, dtype: Dtype, shape: &[usize], values: &[f64]) -> Tensor {
        assert_eq!(numel(shape), values.len(), "tensor {name}");
        Tensor::raw(name, dtype, shape, encode(dtype, values))
    }

    pub fn i64(name: &str, shape: &[usize], values: &[i64]) -> Tensor {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::raw(name, Dtype::I64, shape, data)
    }

    pub fn boolean(name: &str, shape: &[usize], values: &[bool]) -> Tensor {
        let data = values.iter().map(|&v| v as u8).collect();
        Tensor::raw(name, Dtype::BOOL, shape, data)
    }

    /// The elements, widened to f64 (float tensors only).
    pub fn values(&self) -> Vec<f64> {
        decode(self.dtype, &self.data)
    }

    /// The same values in another float dtype (reference rounding).
    pub fn cast(&self, dtype: Dtype) -> Tensor {
        Tensor::float(&self.name, dtype, &self.shape, &self.values())
    }

    /// A float tensor of the same name and shape holding other values.
    pub fn with(&self, dtype: Dtype, values: &[f64]) -> Tensor {
        Tensor::float(&self.name, dtype, &self.shape, values)
    }

    /// A tensor of any dtype whose bytes are all `byte` (for header-only tests).
    pub fn filled(name: &str, dtype: Dtype, shape: &[usize], byte: u8) -> Tensor {
        Tensor::raw(
            name,
            dtype,
            shape,
            vec![byte; numel(shape) * dtype.bitsize() / 8],
        )
    }

    pub fn elements(&self) -> usize {
        numel(&self.shape)
    }

    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
}

/// The θ0 and θ1 tensors for (θ0, θ1) value pairs.
pub fn pair_tensors(
    name: &str,
    pairs: &[(f64, f64)],
    sft: Dtype,
    aligned: Dtype,
) -> (Tensor, Tensor) {
    let t0: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let t1: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    (
        Tensor::float(name, sft, &[pairs.len()], &t0),
        Tensor::float(name, aligned, &[pairs.len()], &t1),
    )
}

/// A tiny Llama-like model: embeddings, two layers, final norm and (unless `tied`) an
/// `lm_head`. Returns (θ0, θ1): θ1 is θ0 plus small random deltas.
pub fn tiny_llama(sft: Dtype, aligned: Dtype, tied: bool, seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut rng = Rng::new(seed);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![16, 8])];
    for l in 0..2 {
        for (part, shape) in [
            ("self_attn.q_proj.weight", vec![8, 8]),
            ("self_attn.k_proj.weight", vec![4, 8]),
            ("mlp.up_proj.weight", vec![12, 8]),
            ("mlp.down_proj.weight", vec![8, 12]),
            ("input_layernorm.weight", vec![8]),
        ] {
            shapes.push((format!("model.layers.{l}.{part}"), shape));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![8]));
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![16, 8]));
    }
    let mut t0s = Vec::new();
    let mut t1s = Vec::new();
    for (name, shape) in shapes {
        let pairs = random_pairs(&mut rng, numel(&shape));
        let v0: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let v1: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        t0s.push(Tensor::float(&name, sft, &shape, &v0));
        t1s.push(Tensor::float(&name, aligned, &shape, &v1));
    }
    (t0s, t1s)
}

pub fn by_name(tensors: &[Tensor]) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Writing checkpoints
// ---------------------------------------------------------------------------------------

/// `{"format": "pt"}`, what transformers writes.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes a safetensors file with the `safetensors` crate (which orders tensors by dtype
/// alignment, then name).
pub fn write_st(path: &Path, tensors: &[Tensor], metadata: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, metadata).unwrap();
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap();
}

/// Writes a safetensors file by hand with the tensors' data in exactly the given order
/// (the crate would sort them), so that order-preservation can be observed.
pub fn write_st_ordered(
    path: &Path,
    tensors: &[Tensor],
    metadata: Option<HashMap<String, String>>,
) {
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        let meta: serde_json::Map<String, Value> = meta
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype.to_string(),
                "shape": t.shape,
                "data_offsets": [offset, offset + t.data.len()],
            }),
        );
        offset += t.data.len();
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    for t in tensors {
        bytes.extend_from_slice(&t.data);
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap();
}

/// `model.safetensors` (with `{"format":"pt"}` metadata) in `dir`; returns `dir`.
pub fn single(dir: &Path, tensors: &[Tensor]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    write_st(&dir.join("model.safetensors"), tensors, Some(pt_metadata()));
    dir.to_path_buf()
}

/// The Hugging Face shard name `model-0000K-of-0000N.safetensors` (K from 1).
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Splits tensors into `n` contiguous, non-empty groups.
pub fn split(tensors: &[Tensor], n: usize) -> Vec<Vec<Tensor>> {
    assert!(n >= 1 && n <= tensors.len());
    let mut groups = vec![Vec::new(); n];
    for (i, t) in tensors.iter().enumerate() {
        groups[i * n / tensors.len()].push(t.clone());
    }
    groups
}

/// Writes `groups` as HF shards plus `model.safetensors.index.json`; returns `dir`.
pub fn sharded(dir: &Path, groups: &[Vec<Tensor>]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let n = groups.len();
    let mut files = Vec::new();
    for (k, group) in groups.iter().enumerate() {
        let name = shard_name(k + 1, n);
        write_st(&dir.join(&name), group, Some(pt_metadata()));
        files.push((name, group.clone()));
    }
    write_index(dir, &files);
    dir.to_path_buf()
}

/// `tensors` split into `n` HF shards (see [`split`]) plus the index; returns `dir`.
pub fn sharded_n(dir: &Path, tensors: &[Tensor], n: usize) -> PathBuf {
    sharded(dir, &split(tensors, n))
}

/// Tensor name → the shard file [`sharded`] writes it to.
pub fn shard_of(groups: &[Vec<Tensor>]) -> BTreeMap<String, String> {
    let n = groups.len();
    groups
        .iter()
        .enumerate()
        .flat_map(|(k, g)| {
            g.iter()
                .map(move |t| (t.name.clone(), shard_name(k + 1, n)))
        })
        .collect()
}

/// Like [`sharded`], but each shard is written by hand with its tensors' data in exactly
/// the given order (the crate would sort them by dtype and name).
pub fn sharded_ordered(dir: &Path, groups: &[Vec<Tensor>]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let n = groups.len();
    let mut files = Vec::new();
    for (k, group) in groups.iter().enumerate() {
        let name = shard_name(k + 1, n);
        write_st_ordered(&dir.join(&name), group, Some(pt_metadata()));
        files.push((name, group.clone()));
    }
    write_index(dir, &files);
    dir.to_path_buf()
}

/// The HF index document for (file, tensors) pairs.
pub fn index_json(files: &[(String, Vec<Tensor>)]) -> Value {
    let total: usize = files
        .iter()
        .flat_map(|(_, ts)| ts.iter().map(Tensor::nbytes))
        .sum();
    let mut weight_map = serde_json::Map::new();
    for (file, tensors) in files {
        for t in tensors {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
        }
    }
    serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map})
}

/// Writes `model.safetensors.index.json` for (file, tensors) pairs.
pub fn write_index(dir: &Path, files: &[(String, Vec<Tensor>)]) {
    let text = serde_json::to_string_pretty(&index_json(files)).unwrap();
    fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
}

/// Side files a Hugging Face checkpoint carries; `flavor` makes their bytes unique to it.
pub fn side_files(dir: &Path, flavor: &str) {
    let files = [
        ("config.json", format!("{{\"architectures\": [\"LlamaForCausalLM\"], \"_name_or_path\": \"{flavor}\", \"tie_word_embeddings\": false}}\n")),
        ("generation_config.json", format!("{{\"do_sample\": true, \"temperature\": 0.7, \"source\": \"{flavor}\"}}\n")),
        ("tokenizer.json", format!("{{\"version\": \"1.0\", \"model\": {{\"type\": \"BPE\"}}, \"source\": \"{flavor}\"}}\n")),
        ("README.md", format!("---\nlicense: apache-2.0\n---\n\n# The {flavor} model card\n")),
    ];
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Hugging Face cache layouts
// ---------------------------------------------------------------------------------------

/// A stand-in for a blob name (the Hub uses the git/LFS hash of the content).
pub fn blob_name(content: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in content {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:024x}", content.len())
}

/// The `models--org--name` directory of `repo_id` in the cache at `cache`.
pub fn hub_repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// Adds `files` (path in the snapshot, content) as snapshot `commit` of `repo_id` in the
/// cache at `cache`, each file a relative symlink into blobs/, the way huggingface_hub
/// stores them; points each of `refs` at it. Returns the snapshot directory.
pub fn add_snapshot<S: AsRef<str>>(
    cache: &Path,
    repo_id: &str,
    commit: &str,
    refs: &[&str],
    files: &[(S, Vec<u8>)],
) -> PathBuf {
    let repo = hub_repo_dir(cache, repo_id);
    let snapshot = repo.join("snapshots").join(commit);
    fs::create_dir_all(repo.join("blobs")).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    for (name, content) in files {
        let name = name.as_ref();
        let blob = blob_name(content);
        fs::write(repo.join("blobs").join(&blob), content).unwrap();
        let link = snapshot.join(name);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = Path::new(name).components().count() + 1;
        let target = format!("{}blobs/{blob}", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(fs::metadata(&link).is_ok(), "dangling {}", link.display());
    }
    for r in refs {
        let path = repo.join("refs").join(r);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, commit).unwrap(); // no trailing newline, as huggingface_hub writes it
    }
    snapshot
}

/// The regular files directly in `dir` as (name, content), sorted by name: a checkpoint
/// built with the writers above, ready for [`add_snapshot`].
pub fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    list_dir(dir)
        .into_iter()
        .filter(|n| dir.join(n).is_file())
        .map(|n| {
            let content = fs::read(dir.join(&n)).unwrap();
            (n, content)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading checkpoints back
// ---------------------------------------------------------------------------------------

/// One safetensors file, parsed raw and with the `safetensors` crate.
#[derive(Debug, Clone)]
pub struct ShardFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// The 8-byte little-endian header length.
    pub header_len: u64,
    /// The header JSON (no test reads it; it shows in `{:?}` when an assertion fails).
    #[allow(dead_code)]
    pub header: Value,
    /// `__metadata__`.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Tensor names in data order.
    pub order: Vec<String>,
}

/// A checkpoint directory read back.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// Every top-level `*.safetensors` file, sorted by name.
    pub shards: Vec<ShardFile>,
    /// `model.safetensors.index.json`, if present.
    pub index: Option<Value>,
    pub tensors: BTreeMap<String, Tensor>,
    /// Tensor → file holding it.
    pub file_of: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }

    /// Tensor names in checkpoint order: shards by name, then data order.
    pub fn order(&self) -> Vec<String> {
        self.shards.iter().flat_map(|s| s.order.clone()).collect()
    }

    /// Like [`Checkpoint::order`] without zero-byte tensors, whose place in the data
    /// section is undefined (they all sit at one offset).
    pub fn data_order(&self) -> Vec<String> {
        self.order()
            .into_iter()
            .filter(|n| self.tensors[n].nbytes() > 0)
            .collect()
    }

    /// Like [`Checkpoint::layout`], with zero-byte tensors listed apart, by name, per file.
    pub fn data_layout(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        self.shards
            .iter()
            .map(|s| {
                let (data, mut empty): (Vec<String>, Vec<String>) = s
                    .order
                    .iter()
                    .cloned()
                    .partition(|n| self.tensors[n].nbytes() > 0);
                empty.sort();
                (s.name.clone(), data, empty)
            })
            .collect()
    }

    /// (file, names in data order) for each shard.
    pub fn layout(&self) -> Vec<(String, Vec<String>)> {
        self.shards
            .iter()
            .map(|s| (s.name.clone(), s.order.clone()))
            .collect()
    }

    pub fn shard(&self, name: &str) -> &ShardFile {
        self.shards
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no shard {name} in {}", self.dir.display()))
    }
}

/// The tensors of one safetensors file, by name.
pub fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    read_shard(path)
        .1
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

/// The tensors of every `*.safetensors` file directly in `dir`, by name.
pub fn read_dir_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            for t in read_shard(&p).1 {
                out.insert(t.name.clone(), t);
            }
        }
    }
    out
}

/// Parses one safetensors file raw (length prefix, header JSON, tiling of the data section)
/// and with `SafeTensors::deserialize`, checking that both agree.
pub fn read_shard(path: &Path) -> (ShardFile, Vec<Tensor>) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let ctx = path.display().to_string();
    assert!(bytes.len() >= 8, "{ctx}: too short");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let data_start = 8 + header_len as usize;
    assert!(data_start <= bytes.len(), "{ctx}: header past the end");
    let header: Value = serde_json::from_slice(&bytes[8..data_start])
        .unwrap_or_else(|e| panic!("{ctx}: header is not JSON: {e}"));
    let obj = header.as_object().expect("header is an object");
    let metadata = obj.get("__metadata__").map(|m| {
        m.as_object()
            .expect("__metadata__ is an object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string metadata").to_string()))
            .collect()
    });
    let mut entries: Vec<(u64, u64, String)> = obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let off = v["data_offsets"].as_array().expect("data_offsets");
            (
                off[0].as_u64().unwrap(),
                off[1].as_u64().unwrap(),
                k.clone(),
            )
        })
        .collect();
    entries.sort();
    let mut cursor = 0;
    for (start, end, name) in &entries {
        assert_eq!(
            *start, cursor,
            "{ctx}: `{name}` does not follow the previous tensor"
        );
        cursor = *end;
    }
    assert_eq!(
        cursor as usize,
        bytes.len() - data_start,
        "{ctx}: tensors do not tile the data section"
    );

    let st = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{ctx}: safetensors refuses it: {e:?}"));
    let mut tensors = Vec::new();
    for (_, _, name) in &entries {
        let view = st.tensor(name).unwrap();
        let raw = &obj[name];
        assert_eq!(
            raw["dtype"].as_str().unwrap(),
            view.dtype().to_string(),
            "{ctx}: {name}"
        );
        let raw_shape: Vec<usize> = raw["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(raw_shape, view.shape(), "{ctx}: {name}");
        tensors.push(Tensor::raw(
            name,
            view.dtype(),
            view.shape(),
            view.data().to_vec(),
        ));
    }
    let (_, st_meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let crate_meta: Option<BTreeMap<String, String>> = st_meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    assert_eq!(crate_meta, metadata, "{ctx}: metadata");

    let shard = ShardFile {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        header_len,
        header,
        metadata,
        order: entries.into_iter().map(|e| e.2).collect(),
        bytes,
    };
    (shard, tensors)
}

/// Reads every top-level `*.safetensors` file of `dir` and the index.
pub fn read_checkpoint(dir: &Path) -> Checkpoint {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    let mut shards = Vec::new();
    let mut tensors = BTreeMap::new();
    let mut file_of = BTreeMap::new();
    for name in names {
        let (shard, ts) = read_shard(&dir.join(&name));
        for t in ts {
            assert!(
                file_of.insert(t.name.clone(), name.clone()).is_none(),
                "tensor {} in two files",
                t.name
            );
            tensors.insert(t.name.clone(), t);
        }
        shards.push(shard);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let index = index_path
        .exists()
        .then(|| serde_json::from_slice(&fs::read(&index_path).unwrap()).expect("index is JSON"));
    Checkpoint {
        dir: dir.to_path_buf(),
        shards,
        index,
        tensors,
        file_of,
    }
}

/// The index a checkpoint should have, in HF form, from its actual files.
pub fn expected_index(ck: &Checkpoint) -> Value {
    let files: Vec<(String, Vec<Tensor>)> = ck
        .shards
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.order.iter().map(|n| ck.tensors[n].clone()).collect(),
            )
        })
        .collect();
    index_json(&files)
}

// ---------------------------------------------------------------------------------------
// The expected output
// ---------------------------------------------------------------------------------------

/// What expo must produce for each tensor: non-float tensors are θ1's bytes; float tensors
/// are `formula` rounded once to θ1's dtype (or `out`); α = 0 in θ1's dtype is θ1's bytes.
pub fn reference(
    sft: &[Tensor],
    aligned: &[Tensor],
    alpha: f64,
    out: Option<Dtype>,
) -> BTreeMap<String, Tensor> {
    let sft = by_name(sft);
    aligned
        .iter()
        .map(|t1| {
            let t0 = &sft[&t1.name];
            assert_eq!(t0.shape, t1.shape);
            let expected =
                if !is_float(t1.dtype) || alpha == 0.0 && out.is_none_or(|d| d == t1.dtype) {
                    t1.clone()
                } else {
                    let d = out.unwrap_or(t1.dtype);
                    let values: Vec<f64> = t0
                        .values()
                        .into_iter()
                        .zip(t1.values())
                        .map(|(a, b)| formula(a, b, alpha))
                        .collect();
                    Tensor::float(&t1.name, d, &t1.shape, &values)
                };
            (t1.name.clone(), expected)
        })
        .collect()
}

/// Asserts that `got` holds exactly the tensors of `want`, bit for bit (any NaN matches any
/// NaN), reporting the first differing element with its inputs.
pub fn assert_tensors_eq(
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
    inputs: Option<(&[Tensor], &[Tensor], f64)>,
) {
    let got_names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(got_names, want_names, "tensor names differ");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dtype, w.dtype, "dtype of `{name}`");
        assert_eq!(g.shape, w.shape, "shape of `{name}`");
        assert_eq!(g.data.len(), w.data.len(), "byte length of `{name}`");
        if g.data == w.data {
            continue;
        }
        assert!(is_float(w.dtype), "non-float tensor `{name}` differs");
        let gb = elem_bits(&g.data, g.dtype);
        let wb = elem_bits(&w.data, w.dtype);
        for (i, (&a, &b)) in gb.iter().zip(&wb).enumerate() {
            let (av, bv) = (bits_to_f64(a, g.dtype), bits_to_f64(b, w.dtype));
            if a == b || av.is_nan() && bv.is_nan() {
                continue;
            }
            let detail = inputs
                .map(|(s, al, alpha)| {
                    let t0 = s.iter().find(|t| t.name == *name).unwrap().values()[i];
                    let t1 = al.iter().find(|t| t.name == *name).unwrap().values()[i];
                    format!(
                        " (θ0 = {t0:e}, θ1 = {t1:e}, α = {alpha}, exact f64 = {:e})",
                        formula(t0, t1, alpha)
                    )
                })
                .unwrap_or_default();
            panic!(
                "`{name}`[{i}] ({}): expo wrote {a:#x} = {av:e}, reference {b:#x} = {bv:e}{detail}",
                w.dtype
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running expo
// ---------------------------------------------------------------------------------------

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// stdout parsed, when `--json` was given.
    pub json: Option<Value>,
}

/// A pending `expo` invocation.
#[derive(Debug)]
pub struct Expo {
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    /// Environment changes: `Some(value)` sets the variable, `None` removes it.
    env: Vec<(OsString, Option<OsString>)>,
    /// Arguments of a shell `ulimit` run before expo (e.g. `-n 64`).
    ulimit: Option<String>,
}

/// `expo ARGS…`; finish with [`Expo::assert_ok`] or [`Expo::assert_fails`].
pub fn expo<S: AsRef<OsStr>>(args: &[S]) -> Expo {
    Expo {
        args: args.iter().map(|a| a.as_ref().to_os_string()).collect(),
        cwd: None,
        env: Vec::new(),
        ulimit: None,
    }
}

/// `expo extrapolate --sft SFT --aligned ALIGNED --alpha ALPHA --output OUT`.
pub fn extrapolate(sft: &Path, aligned: &Path, alpha: &str, out: &Path) -> Expo {
    expo(&[
        OsStr::new("extrapolate"),
        OsStr::new("--sft"),
        sft.as_os_str(),
        OsStr::new("--aligned"),
        aligned.as_os_str(),
        OsStr::new("--alpha"),
        OsStr::new(alpha),
        OsStr::new("--output"),
        out.as_os_str(),
    ])
}

impl Expo {
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Expo {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Expo {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Expo {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Expo {
        self.env.push((
            key.as_ref().to_os_string(),
            Some(value.as_ref().to_os_string()),
        ));
        self
    }

    /// Runs expo under `sh -c 'ulimit LIMITS && exec expo …'` (e.g. `"-n 64"`).
    pub fn ulimit(mut self, limits: &str) -> Expo {
        self.ulimit = Some(limits.to_owned());
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Expo {
        self.env.push((key.as_ref().to_os_string(), None));
        self
    }

    fn has(&self, flags: &[&str]) -> bool {
        self.args.iter().any(|a| flags.iter().any(|f| a == *f))
    }

    fn describe(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        format!("expo {}", args.join(" "))
    }

    /// Runs the command (stdin closed, so stderr is not a terminal).
    pub fn run(&self) -> Outcome {
        let mut cmd = match &self.ulimit {
            None => assert_cmd::Command::new(env!("CARGO_BIN_EXE_expo")),
            Some(limits) => {
                let mut sh = assert_cmd::Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit {limits} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_expo"));
                sh
            }
        };
        cmd.args(&self.args).env_remove("RUST_BACKTRACE");
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        for (key, value) in &self.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        let output = cmd.output().expect("running expo");
        Outcome {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
            json: None,
        }
    }

    /// Asserts success: exit 0, no error on stderr; with `--json` stdout is exactly one JSON
    /// object (returned parsed). A command that writes files (`extrapolate` without
    /// `--dry-run`, `man --dir`) prints nothing else on stdout and says `expo: wrote …` on
    /// stderr unless `--quiet`; every other command (`diff`, `inspect`, `completions`, `man`,
    /// `--dry-run`, `--help`, `--version`) prints its result on stdout.
    pub fn assert_ok(self) -> Outcome {
        let mut out = self.run();
        let what = self.describe();
        let dump = format!(
            "{what}\n--- exit {}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.code, out.stdout, out.stderr
        );
        assert_eq!(out.code, 0, "expected success\n{dump}");
        assert!(!out.stderr.contains("error"), "error on stderr\n{dump}");
        let info = self.has(&["--help", "-h", "--version", "-V", "help"]);
        let dry_run = self.has(&["--dry-run", "-n"]);
        let quiet = self.has(&["--quiet", "-q"]);
        let writes_files = !info
            && !dry_run
            && (self.args.first().is_some_and(|a| a == "extrapolate") || self.has(&["--dir"]));
        if self.has(&["--json"]) {
            out.json = Some(single_json_object(&out.stdout, &dump));
        } else if writes_files {
            assert_eq!(out.stdout, "", "stdout must be empty\n{dump}");
        } else {
            assert!(
                !out.stdout.trim().is_empty(),
                "expected output on stdout\n{dump}"
            );
        }
        if writes_files && !quiet {
            assert!(
                out.stderr.contains("expo: wrote "),
                "expected the summary on stderr\n{dump}"
            );
        }
        if quiet {
            for line in out.stderr.lines() {
                assert!(
                    line.starts_with("warning: "),
                    "--quiet printed `{line}`\n{dump}"
                );
            }
        }
        out
    }

    /// Asserts failure with `code`: nothing on stdout (with `--json`, exactly one JSON
    /// object, returned parsed, whose `ok` is false), and stderr holds the error (clap's
    /// `error:` for usage errors, `expo: error:` otherwise) and every string of `needles`.
    pub fn assert_fails(self, code: i32, needles: &[&str]) -> Outcome {
        let mut out = self.run();
        let what = self.describe();
        let dump = format!(
            "{what}\n--- exit {}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.code, out.stdout, out.stderr
        );
        assert_eq!(out.code, code, "unexpected exit code\n{dump}");
        if self.has(&["--json"]) {
            let json = single_json_object(&out.stdout, &dump);
            let failed = |v: &Value| v.get("ok") == Some(&Value::Bool(false));
            let some_output_failed = json["outputs"]
                .as_array()
                .is_some_and(|o| o.iter().any(failed));
            assert!(
                failed(&json) || some_output_failed,
                "`ok` must be false\n{dump}"
            );
            out.json = Some(json);
        } else {
            assert_eq!(out.stdout, "", "stdout must be empty on failure\n{dump}");
        }
        if code == 2 {
            assert!(out.stderr.contains("error:"), "no error message\n{dump}");
        } else {
            assert!(
                out.stderr.starts_with("expo: error: ")
                    || out.stderr.lines().any(|l| l.starts_with("expo: error: ")),
                "no `expo: error:` line\n{dump}"
            );
        }
        for needle in needles {
            assert!(
                out.stderr.contains(needle),
                "stderr lacks `{needle}`\n{dump}"
            );
        }
        out
    }
}

/// Parses `text` as exactly one JSON object (and nothing else but whitespace).
pub fn single_json_object(text: &str, ctx: &str) -> Value {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let first = values
        .next()
        .unwrap_or_else(|| panic!("no JSON on stdout\n{ctx}"))
        .unwrap_or_else(|e| panic!("stdout is not JSON: {e}\n{ctx}"));
    assert!(
        values.next().is_none(),
        "more than one JSON value on stdout\n{ctx}"
    );
    assert!(first.is_object(), "stdout JSON is not an object\n{ctx}");
    first
}

// ---------------------------------------------------------------------------------------
// Scratch directories and file-system assertions
// ---------------------------------------------------------------------------------------

/// A temporary directory with room for inputs and a dedicated, initially empty parent for
/// outputs (so that "nothing was written" can be checked exactly).
pub struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let tmp = tempfile::Builder::new()
            .prefix("expo-test-")
            .tempdir()
            .unwrap();
        fs::create_dir(tmp.path().join("outputs")).unwrap();
        Scratch { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// `root/name` (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The parent directory of outputs.
    pub fn outputs(&self) -> PathBuf {
        self.tmp.path().join("outputs")
    }

    /// `outputs/name` (not created).
    pub fn out(&self, name: &str) -> PathBuf {
        self.outputs().join(name)
    }

    /// Asserts that a failed run left nothing behind: the outputs directory is as empty as
    /// before, with no `.expo-tmp-*` staging directory, and no staging directory anywhere
    /// in the scratch root.
    pub fn assert_no_output(&self) {
        assert_eq!(
            list_dir(&self.outputs()),
            Vec::<String>::new(),
            "a failed run left files behind"
        );
        assert_no_staging(self.root());
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// Sorted entry names of a directory (hidden ones included).
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every file under `dir` (which must exist), relative and sorted, with its bytes.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    list_tree(dir)
        .into_iter()
        .map(|rel| {
            let bytes = fs::read(dir.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

/// A bf16 pair of `tiny_llama(seed)` in single files at `sft` and `aligned` in `s`, with a
/// `config.json` side file on the aligned side.
pub fn small_pair(s: &Scratch, seed: u64) {
    let (t0, t1) = tiny_llama(Dtype::BF16, Dtype::BF16, false, seed);
    single(&s.path("sft"), &t0);
    single(&s.path("aligned"), &t1);
    fs::write(s.path("aligned").join("config.json"), "{}\n").unwrap();
}

/// Makes a FIFO (named pipe) at `path`.
pub fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Every file under `dir`, relative, sorted (directories are descended, not listed).
pub fn list_tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(root.join(rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                walk(root, &rel, out);
            } else {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out);
    out.sort();
    out
}

/// No `.expo-tmp-*` entry in `dir`.
pub fn assert_no_staging(dir: &Path) {
    let staging: Vec<String> = list_dir(dir)
        .into_iter()
        .filter(|n| n.starts_with(".expo-tmp-"))
        .collect();
    assert!(
        staging.is_empty(),
        "staging left in {}: {staging:?}",
        dir.display()
    );
}

/// The weight files and index of a directory, by name.
pub fn weight_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    list_dir(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json"))
        .map(|n| {
            let bytes = fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

/// Parses `alpha` exactly as the command line will.
pub fn alpha_value(alpha: &str) -> f64 {
    alpha.parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Runs paused at a failpoint: the one handshake of the race tests (src/failpoint.rs)
// ---------------------------------------------------------------------------------------

/// An expo run paused at the failpoint `name`: started with `EXPO_FAILPOINT` and
/// `EXPO_FAILPOINT_DIR` set, and waited for until it created `DIR/NAME.reached`. The test
/// then acts (swaps a path, sends a signal) and either lets expo go on ([`Paused::finish`])
/// or waits for a signal to end it ([`Paused::wait`]). stdout and stderr are read on their
/// own threads, so a chatty run cannot block on a full pipe.
pub struct Paused {
    child: std::process::Child,
    dir: PathBuf,
    name: String,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

/// Reads a child's pipe to the end on another thread.
fn read_pipe(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

impl Paused {
    /// Starts `expo ARGS` and waits until it reaches the failpoint `name`; fails the test
    /// if expo exits first (the racy step was never reached) or takes over a minute.
    pub fn start<S: AsRef<OsStr>>(args: &[S], name: &str, dir: &Path) -> Paused {
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};
        fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_expo"))
            .args(args)
            .env("EXPO_FAILPOINT", name)
            .env("EXPO_FAILPOINT_DIR", dir)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = read_pipe(child.stdout.take());
        let stderr = read_pipe(child.stderr.take());
        let reached = dir.join(format!("{name}.reached"));
        let started = Instant::now();
        while !reached.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                let err = stderr.join().unwrap_or_default();
                panic!("expo exited ({status}) without reaching the failpoint `{name}`:\n{err}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "expo did not reach the failpoint `{name}`"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Paused {
            child,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            stdout,
            stderr,
        }
    }

    /// Sends `signal` to the paused expo.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }

    /// Lets expo go on and waits for it: (exit code, stderr).
    pub fn finish(self) -> (i32, String) {
        fs::write(self.dir.join(format!("{}.continue", self.name)), b"").unwrap();
        self.wait()
    }

    /// Waits for expo to end without letting it go on: the pause point returns by itself
    /// once a signal was registered (the handler runs on another thread, so letting expo go
    /// on right after the signal would race it). A run still going after two minutes is
    /// blocked (e.g. on a FIFO): killed and reported. stdout must be empty.
    pub fn wait(mut self) -> (i32, String) {
        use std::time::{Duration, Instant};
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "expo did not finish after the failpoint `{}` (blocked?)",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = self.stdout.join().unwrap_or_default();
        let err = self.stderr.join().unwrap_or_default();
        assert_eq!(out, "", "stdout must be empty; stderr:\n{err}");
        (status.code().unwrap_or(-1), err)
    }
}
