//! Hostile checkpoints: a property-based fuzz test over expo's whole input path, and the
//! same malformations through the binary.
//!
//! The fuzz test builds valid safetensors checkpoints (single files and sharded ones with
//! an index), breaks them with mutations drawn from a grammar of everything that can be
//! wrong with one (header length past the file or absurdly large, invalid UTF-8 or JSON,
//! offsets out of bounds, overlapping or gapped, byte counts that do not match shape ×
//! dtype, shapes whose product overflows, duplicate names, non-string metadata, unknown
//! dtypes, truncated or padded data, broken indexes) plus random byte flips, and runs the
//! library path in-process: `Checkpoint::open`, `build_plan`, `MappedCheckpoint::map`,
//! `verify_exact_tensors` and `write_outputs`. It asserts:
//!
//! - no panic (a panic fails the case) and no abort (it would kill the test binary);
//! - no huge allocation: a counting global allocator records the largest single request;
//! - a malformation that makes the file invalid is always rejected, and every rejection
//!   names the checkpoint's path;
//! - whatever expo accepts, the reference `safetensors` crate accepts too, with the same
//!   tensors, and expo's output files are valid safetensors again.
//!
//! 256 cases per property by default; set `PROPTEST_CASES` for a longer run. The cargo-fuzz
//! target in `fuzz/` covers the same path with coverage guidance.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{self, mkfifo, Scratch};
use expo::checkpoint::Checkpoint;
use expo::dtype::FloatDtype;
use expo::engine::{self, EngineError, MappedCheckpoint, OutputJob};
use expo::plan::{build_plan, DtypeChoice, PlanOptions};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

// ---------------------------------------------------------------------------------------
// The largest single allocation, to catch sizes taken from untrusted input
// ---------------------------------------------------------------------------------------

struct Tracking;

thread_local! {
    /// Whether this thread's allocations are counted: the thread of a test in this file
    /// while it holds [`serial`], and the library's worker threads ([`pool`]). Tests
    /// elsewhere in the test binary run on other threads at the same time; what they
    /// allocate is theirs, not the library path's under test here.
    static MEASURED: Cell<bool> = const { Cell::new(false) };
}

fn measured() -> bool {
    MEASURED.try_with(Cell::get).unwrap_or(false)
}

/// The largest single allocation request.
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Bytes currently allocated, and the most seen since the last reset. Signed: a measured
/// thread may free what it allocated before it was measured.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(size: usize) {
    if !measured() {
        return;
    }
    LARGEST.fetch_max(size, Ordering::Relaxed);
    let size = size as isize;
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(size: usize) {
    if measured() {
        LIVE.fetch_sub(size as isize, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: as in `alloc`: the caller's contract is System's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: `ptr` came from this allocator, which got it from System with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        shrank(layout.size());
        grew(new_size);
        // SAFETY: as in `dealloc`, and the caller upholds `realloc`'s size rules.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Tests in this file run one at a time, so that memory measurements are not disturbed,
/// and their thread is measured while they hold this.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Serial {
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Serial {
    fn drop(&mut self) {
        MEASURED.with(|m| m.set(false));
    }
}

fn serial() -> Serial {
    let lock = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    MEASURED.with(|m| m.set(true));
    Serial { _lock: lock }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// The engine owns one 8 MiB chunk buffer per worker; inputs here are a few KiB, so
/// anything near this limit was sized from a hostile header.
const ALLOCATION_LIMIT: usize = 32 << 20;

// ---------------------------------------------------------------------------------------
// Checkpoints as editable drafts
// ---------------------------------------------------------------------------------------

const DTYPES: [(&str, u64); 10] = [
    ("F32", 32),
    ("BF16", 16),
    ("F16", 16),
    ("F64", 64),
    ("I64", 64),
    ("I32", 32),
    ("U8", 8),
    ("BOOL", 8),
    ("F8_E4M3", 8),
    ("I8", 8),
];

/// One header entry, kept as text so that anything (duplicates, bad types) can be written.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    start: u64,
    end: u64,
    /// Replaces the whole entry's JSON value when set.
    raw: Option<String>,
}

impl Entry {
    fn json(&self) -> String {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        format!(
            r#"{{"dtype":{},"shape":{:?},"data_offsets":[{},{}]}}"#,
            serde_json::to_string(&self.dtype).unwrap(),
            self.shape,
            self.start,
            self.end
        )
    }
}

#[derive(Debug, Clone)]
struct Draft {
    /// `__metadata__`'s JSON value, if any.
    metadata: Option<String>,
    entries: Vec<Entry>,
    data: Vec<u8>,
}

impl Draft {
    fn header_text(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = &self.metadata {
            parts.push(format!(r#""__metadata__":{m}"#));
        }
        for e in &self.entries {
            parts.push(format!(
                "{}:{}",
                serde_json::to_string(&e.name).unwrap(),
                e.json()
            ));
        }
        let mut text = format!("{{{}}}", parts.join(","));
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        text
    }

    fn bytes_with_header(&self, header: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(&self.data);
        out
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes_with_header(self.header_text().as_bytes())
    }

    /// Indices of tensors with at least one byte of data.
    fn non_empty(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].end > self.entries[i].start)
            .collect()
    }
}

/// A valid checkpoint file: 1–5 tensors of mixed dtypes and small shapes, random data.
fn draft_strategy() -> impl Strategy<Value = Draft> {
    let tensor = (
        0..DTYPES.len(),
        proptest::collection::vec(0u64..5, 0..4),
        any::<u64>(),
    );
    (
        proptest::collection::vec(tensor, 1..6),
        proptest::option::of(Just(r#"{"format":"pt"}"#.to_string())),
    )
        .prop_map(|(tensors, metadata)| {
            let mut entries = Vec::new();
            let mut data = Vec::new();
            for (i, (d, shape, seed)) in tensors.into_iter().enumerate() {
                let (dtype, bits) = DTYPES[d];
                let len = shape.iter().product::<u64>() * bits / 8;
                let start = data.len() as u64;
                let mut x = seed | 1;
                for _ in 0..len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Keep bools 0/1 and floats finite-ish: only the low bits vary.
                    data.push(if dtype == "BOOL" {
                        (x & 1) as u8
                    } else {
                        (x & 0x3f) as u8
                    });
                }
                entries.push(Entry {
                    name: format!("layers.{i}.weight"),
                    dtype: dtype.to_string(),
                    shape,
                    start,
                    end: data.len() as u64,
                    raw: None,
                });
            }
            Draft {
                metadata,
                entries,
                data,
            }
        })
}

/// One way of breaking a safetensors file. `pick` values select a tensor (modulo count).
#[derive(Debug, Clone)]
enum Mutation {
    None,
    DuplicateName { pick: usize },
    UnknownDtype { pick: usize, dtype: String },
    ByteCountMismatch { pick: usize, delta: i8 },
    ShapeOverflow { pick: usize, dims: Vec<u64> },
    OffsetsPastEnd { pick: usize, by: u64 },
    HugeOffsets { pick: usize },
    ReversedOffsets { pick: usize },
    Overlap { pick: usize },
    Gap { pick: usize, by: u64 },
    NonStringMetadata { value: String },
    BadEntry { pick: usize, raw: String },
    HeaderNotAnObject { text: String },
    TruncatedJson { keep: usize },
    TrailingGarbage { garbage: String },
    InvalidUtf8 { at: usize, byte: u8 },
    HeaderLenPastEnd { extra: u64 },
    HeaderLenHuge { len: u64 },
    HeaderLenSmaller { by: u64 },
    TooShort { len: usize },
    TruncatedData { cut: usize },
    TrailingData { extra: usize },
}

impl Mutation {
    /// True when the mutated file can never be a valid checkpoint.
    fn always_invalid(&self) -> bool {
        !matches!(self, Mutation::None)
    }
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    let pick = any::<usize>();
    prop_oneof![
        Just(Mutation::None),
        pick.prop_map(|pick| Mutation::DuplicateName { pick }),
        (
            pick,
            prop::sample::select(vec!["F128", "Q4_0", "f32", "", "FP8", "I4", "complex"])
        )
            .prop_map(|(pick, d)| Mutation::UnknownDtype {
                pick,
                dtype: d.to_string()
            }),
        (pick, any::<i8>().prop_filter("non-zero", |d| *d != 0))
            .prop_map(|(pick, delta)| Mutation::ByteCountMismatch { pick, delta }),
        (
            pick,
            prop::sample::select(vec![
                vec![1u64 << 32, 1 << 32, 1 << 32],
                vec![u64::MAX, 2],
                vec![1 << 62, 8],
                vec![3, u64::MAX / 2],
                vec![1 << 61],
            ])
        )
            .prop_map(|(pick, dims)| Mutation::ShapeOverflow { pick, dims }),
        (pick, 0u64..1 << 20).prop_map(|(pick, by)| Mutation::OffsetsPastEnd { pick, by }),
        pick.prop_map(|pick| Mutation::HugeOffsets { pick }),
        pick.prop_map(|pick| Mutation::ReversedOffsets { pick }),
        pick.prop_map(|pick| Mutation::Overlap { pick }),
        (pick, 1u64..64).prop_map(|(pick, by)| Mutation::Gap { pick, by }),
        prop::sample::select(vec![
            r#"{"format":1}"#,
            r#"{"format":null}"#,
            r#"{"format":["pt"]}"#,
            r#"{"a":{"b":"c"}}"#,
            r#"["format","pt"]"#,
            r#""pt""#,
            "42",
            "true",
        ])
        .prop_map(|v| Mutation::NonStringMetadata {
            value: v.to_string()
        }),
        (
            pick,
            prop::sample::select(vec![
                r#"{"shape":[1],"data_offsets":[0,4]}"#,
                r#"{"dtype":"F32","data_offsets":[0,4]}"#,
                r#"{"dtype":"F32","shape":[1]}"#,
                r#"{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}"#,
                r#"{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}"#,
                r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}"#,
                r#"{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}"#,
                r#"{"dtype":"F32","shape":"1","data_offsets":[0,4]}"#,
                r#"{"dtype":32,"shape":[1],"data_offsets":[0,4]}"#,
                r#"{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,4]}"#,
                r#"[]"#,
                r#"null"#,
                r#""F32""#,
            ])
        )
            .prop_map(|(pick, raw)| Mutation::BadEntry {
                pick,
                raw: raw.to_string()
            }),
        prop::sample::select(vec!["[]", "null", "42", "\"x\"", "[{}]", "true"]).prop_map(|t| {
            Mutation::HeaderNotAnObject {
                text: t.to_string(),
            }
        }),
        any::<usize>().prop_map(|keep| Mutation::TruncatedJson { keep }),
        prop::sample::select(vec!["}", ",", "{}", "x", "]", ",\"a\":1"]).prop_map(|g| {
            Mutation::TrailingGarbage {
                garbage: g.to_string(),
            }
        }),
        (
            any::<usize>(),
            prop::sample::select(vec![0x80u8, 0xc0, 0xff, 0xfe, 0xed])
        )
            .prop_map(|(at, byte)| Mutation::InvalidUtf8 { at, byte }),
        (1u64..1 << 16).prop_map(|extra| Mutation::HeaderLenPastEnd { extra }),
        prop::sample::select(vec![
            100_000_001u64,
            1 << 31,
            1 << 40,
            u64::MAX,
            u64::MAX - 7,
            i64::MAX as u64,
        ])
        .prop_map(|len| Mutation::HeaderLenHuge { len }),
        (1u64..16).prop_map(|by| Mutation::HeaderLenSmaller { by }),
        (0usize..8).prop_map(|len| Mutation::TooShort { len }),
        any::<usize>().prop_map(|cut| Mutation::TruncatedData { cut }),
        (1usize..64).prop_map(|extra| Mutation::TrailingData { extra }),
    ]
}

/// Applies `m` to `d`; returns the file's bytes.
fn mutate(d: &Draft, m: &Mutation) -> Vec<u8> {
    let mut d = d.clone();
    let n = d.entries.len();
    let at = |pick: usize| pick % n;
    match m {
        Mutation::None => {}
        Mutation::DuplicateName { pick } => {
            // Two consistent entries (own bytes, tiling the data) under one name: only
            // duplicate detection can tell. The safetensors crate would silently keep
            // the last one.
            let i = at(*pick);
            if n >= 2 {
                let name = d.entries[i].name.clone();
                d.entries[(i + 1) % n].name = name;
            } else {
                let mut dup = d.entries[i].clone();
                let bytes = d.data[dup.start as usize..dup.end as usize].to_vec();
                dup.start = d.data.len() as u64;
                d.data.extend_from_slice(&bytes);
                dup.end = d.data.len() as u64;
                d.entries.push(dup);
            }
        }
        Mutation::UnknownDtype { pick, dtype } => d.entries[at(*pick)].dtype = dtype.clone(),
        Mutation::ByteCountMismatch { pick, delta } => {
            let e = &mut d.entries[at(*pick)];
            let end = e.end as i64 + *delta as i64;
            if end < 0 || end as u64 == e.end {
                e.end += 1;
            } else {
                e.end = end as u64;
            }
        }
        Mutation::ShapeOverflow { pick, dims } => d.entries[at(*pick)].shape = dims.clone(),
        Mutation::OffsetsPastEnd { pick, by } => {
            let len = d.data.len() as u64;
            let e = &mut d.entries[at(*pick)];
            let size = e.end - e.start;
            e.start = len + by;
            e.end = len + by + size.max(1);
        }
        Mutation::HugeOffsets { pick } => {
            let e = &mut d.entries[at(*pick)];
            let size = e.end - e.start;
            e.start = u64::MAX - size;
            e.end = u64::MAX;
            if size == 0 {
                e.start = u64::MAX;
            }
        }
        Mutation::ReversedOffsets { pick } => {
            let e = &mut d.entries[at(*pick)];
            if e.end > e.start {
                std::mem::swap(&mut e.start, &mut e.end);
            } else {
                e.start = e.end + 1;
            }
        }
        Mutation::Overlap { pick } => {
            let full = d.non_empty();
            if full.len() >= 2 {
                // Point a later tensor at an earlier one's bytes (same size keeps shape ×
                // dtype consistent only if sizes match, so move the end along).
                let i = full[pick % full.len()];
                let j = full[(pick % full.len() + 1) % full.len()];
                let (a, b) = (i.min(j), i.max(j));
                let size = d.entries[b].end - d.entries[b].start;
                let start = d.entries[a].start;
                d.entries[b].start = start;
                d.entries[b].end = start + size;
            } else {
                // One tensor: claim its bytes twice under another name.
                let i = full.first().copied().unwrap_or(0);
                let mut twin = d.entries[i].clone();
                twin.name.push_str(".twin");
                if twin.end == twin.start {
                    twin.end += 1;
                    twin.shape = vec![1];
                    twin.dtype = "U8".into();
                }
                d.entries.push(twin);
            }
        }
        Mutation::Gap { pick, by } => {
            // Shift one tensor and every later one (entries are laid out in order),
            // leaving a hole; the data section grows by the same amount, so only the gap
            // is wrong.
            let i = at(*pick);
            let from = d.entries[i].start;
            for e in &mut d.entries[i..] {
                e.start += by;
                e.end += by;
            }
            let mut data = d.data[..from as usize].to_vec();
            data.extend(std::iter::repeat_n(0u8, *by as usize));
            data.extend_from_slice(&d.data[from as usize..]);
            d.data = data;
        }
        Mutation::NonStringMetadata { value } => d.metadata = Some(value.clone()),
        Mutation::BadEntry { pick, raw } => d.entries[at(*pick)].raw = Some(raw.clone()),
        Mutation::HeaderNotAnObject { text } => {
            let mut t = text.clone();
            while !t.len().is_multiple_of(8) {
                t.push(' ');
            }
            return d.bytes_with_header(t.as_bytes());
        }
        Mutation::TruncatedJson { keep } => {
            let text = d.header_text();
            let trimmed = text.trim_end();
            // Cut strictly inside the JSON text (so the closing brace is gone).
            let keep = keep % trimmed.len();
            return d.bytes_with_header(&text.as_bytes()[..keep]);
        }
        Mutation::TrailingGarbage { garbage } => {
            let mut text = d.header_text().trim_end().to_string();
            text.push_str(garbage);
            return d.bytes_with_header(text.as_bytes());
        }
        Mutation::InvalidUtf8 { at, byte } => {
            let mut text = d.header_text().into_bytes();
            let i = at % text.len();
            text[i] = *byte;
            return d.bytes_with_header(&text);
        }
        Mutation::HeaderLenPastEnd { extra } => {
            let mut bytes = d.bytes();
            let past = bytes.len() as u64 - 8 + extra;
            bytes[..8].copy_from_slice(&past.to_le_bytes());
            return bytes;
        }
        Mutation::HeaderLenHuge { len } => {
            let mut bytes = d.bytes();
            bytes[..8].copy_from_slice(&len.to_le_bytes());
            return bytes;
        }
        Mutation::HeaderLenSmaller { by } => {
            let mut bytes = d.bytes();
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            bytes[..8].copy_from_slice(&len.saturating_sub(*by).to_le_bytes());
            return bytes;
        }
        Mutation::TooShort { len } => {
            let bytes = d.bytes();
            return bytes[..*len].to_vec();
        }
        Mutation::TruncatedData { cut } => {
            let bytes = d.bytes();
            let keep = cut % bytes.len();
            return bytes[..keep].to_vec();
        }
        Mutation::TrailingData { extra } => {
            let mut bytes = d.bytes();
            bytes.extend(std::iter::repeat_n(0u8, *extra));
            return bytes;
        }
    }
    d.bytes()
}

/// Random byte flips (position taken modulo the file length).
fn flips_strategy() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec((any::<usize>(), 1u8..=255), 1..6),
    ]
}

fn apply_flips(bytes: &mut [u8], flips: &[(usize, u8)]) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    for &(at, x) in flips {
        bytes[at % n] ^= x;
    }
}

// ---------------------------------------------------------------------------------------
// Running the library path
// ---------------------------------------------------------------------------------------

/// Scratch space on tmpfs when there is one (the engine fsyncs every shard).
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("expo-fuzz-");
        b
    };
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return dir;
        }
    }
    builder.tempdir().unwrap()
}

fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .start_handler(|_| MEASURED.with(|m| m.set(true)))
            .build()
            .unwrap()
    })
}

/// What happened to one hostile checkpoint.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Rejected,
    Accepted,
}

/// Opens `input` (a file or directory in `dir`) as both θ0 and θ1 and, if it is accepted,
/// plans, maps, verifies and writes it into `dir/out`. Returns whether it was accepted;
/// fails the case on a panic (propagated), an error that does not name the input, a huge
/// allocation, or output files that are not valid safetensors.
fn run_library_path(
    dir: &Path,
    input: &Path,
    alpha: f64,
    dtype: DtypeChoice,
) -> Result<Verdict, TestCaseError> {
    let ck = match Checkpoint::open(input) {
        Ok(ck) => ck,
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(
                msg.contains(&*dir.to_string_lossy()),
                "the error does not name the checkpoint: {msg}"
            );
            check_allocations()?;
            return Ok(Verdict::Rejected);
        }
    };
    let opts = PlanOptions {
        alpha,
        dtype,
        max_shard_size: None,
        rules: Vec::new(),
    };
    let plan = match build_plan(&ck, &ck, &opts) {
        Ok(plan) => plan,
        // Pairing a checkpoint with itself only fails for dtypes refused at α ≠ 0.
        Err(e) => {
            prop_assert!(alpha != 0.0, "pairing failed at alpha 0: {e}");
            return Ok(Verdict::Accepted);
        }
    };
    let maps = MappedCheckpoint::map(&ck)
        .map_err(|e| TestCaseError::fail(format!("mapping a validated checkpoint failed: {e}")))?;
    let alphas = plan.alphas(&|name| opts.alpha_for(name).0);
    engine::verify_exact_tensors(&plan, &alphas, (&ck, &maps), (&ck, &maps))
        .map_err(|e| TestCaseError::fail(format!("a checkpoint differs from itself: {e}")))?;
    let out = dir.join("out");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).unwrap();
    for shard in &plan.shards {
        if let Some(parent) = Path::new(&shard.file_name).parent() {
            fs::create_dir_all(out.join(parent)).unwrap();
        }
    }
    let cancel = AtomicBool::new(false);
    let report = engine::write_outputs(
        &plan,
        &[OutputJob {
            alphas: &alphas,
            dir: &out,
        }],
        (&ck, &maps),
        (&ck, &maps),
        pool(),
        &cancel,
        &|_| {},
    );
    for r in report.outputs {
        match r {
            Ok(_) | Err(EngineError::Overflow { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("writing failed: {e}"))),
        }
    }
    for shard in &plan.shards {
        let path = out.join(&shard.file_name);
        expo::header::read_header(&path).map_err(|e| {
            TestCaseError::fail(format!("output {} is invalid: {e}", path.display()))
        })?;
    }
    check_allocations()?;
    Ok(Verdict::Accepted)
}

fn check_allocations() -> Result<(), TestCaseError> {
    let largest = LARGEST.load(Ordering::Relaxed);
    prop_assert!(
        largest <= ALLOCATION_LIMIT,
        "an allocation of {largest} bytes was made for a tiny input"
    );
    Ok(())
}

/// The reference loader must accept whatever expo accepts, with the same tensors.
fn agrees_with_reference(bytes: &[u8], ck: &Checkpoint) -> Result<(), TestCaseError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        TestCaseError::fail(format!("expo accepted a file the reference rejects: {e}"))
    })?;
    let mut theirs: Vec<(String, Vec<u64>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().iter().map(|&d| d as u64).collect()))
        .collect();
    theirs.sort();
    let mut ours: Vec<(String, Vec<u64>)> = ck
        .tensors()
        .map(|(_, t)| (t.name.clone(), t.shape.clone()))
        .collect();
    ours.sort();
    prop_assert_eq!(ours, theirs);
    Ok(())
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn alpha_strategy() -> impl Strategy<Value = (f64, DtypeChoice)> {
    (
        prop::sample::select(vec![0.0, 0.5, -0.5, 3.0]),
        prop::sample::select(vec![
            DtypeChoice::Auto,
            DtypeChoice::Fixed(FloatDtype::F32),
            DtypeChoice::Fixed(FloatDtype::BF16),
            DtypeChoice::Fixed(FloatDtype::F16),
        ]),
    )
}

#[test]
fn hostile_single_files_never_crash_and_are_rejected_by_name() {
    let _serial = serial();
    let scratch = scratch_dir();
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                draft_strategy(),
                mutation_strategy(),
                flips_strategy(),
                alpha_strategy(),
                any::<bool>(),
            ),
            |(draft, mutation, flips, (alpha, dtype), as_file)| {
                let dir = scratch.path().join("ck");
                let _ = fs::remove_dir_all(&dir);
                fs::create_dir_all(&dir).unwrap();
                let mut bytes = mutate(&draft, &mutation);
                apply_flips(&mut bytes, &flips);
                let file = dir.join("model.safetensors");
                fs::write(&file, &bytes).unwrap();
                let input = if as_file { file.clone() } else { dir.clone() };
                let verdict = run_library_path(&dir, &input, alpha, dtype)?;
                if flips.is_empty() {
                    let expected = if mutation.always_invalid() {
                        Verdict::Rejected
                    } else {
                        Verdict::Accepted
                    };
                    prop_assert_eq!(&verdict, &expected, "after {:?}", mutation);
                }
                if verdict == Verdict::Accepted {
                    agrees_with_reference(&bytes, &Checkpoint::open(&input).unwrap())?;
                }
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Broken indexes
// ---------------------------------------------------------------------------------------

/// One way of breaking a sharded checkpoint.
#[derive(Debug, Clone)]
enum IndexMutation {
    None,
    MissingShard { pick: usize },
    TensorNotInShard,
    TensorNotInIndex { pick: usize },
    DuplicateIndexEntry { pick: usize },
    TensorInTwoShardFiles { pick: usize },
    ParentPath,
    AbsolutePath,
    NestedEscape,
    ShardIsADirectory,
    IndexIsTheShard,
    MalformedJson { keep: usize },
    BadIndexShape { text: String },
    BrokenShard { mutation: Mutation },
}

impl IndexMutation {
    fn always_invalid(&self) -> bool {
        match self {
            IndexMutation::None => false,
            IndexMutation::BrokenShard { mutation } => mutation.always_invalid(),
            _ => true,
        }
    }
}

fn index_mutation_strategy() -> impl Strategy<Value = IndexMutation> {
    let pick = any::<usize>();
    prop_oneof![
        Just(IndexMutation::None),
        pick.prop_map(|pick| IndexMutation::MissingShard { pick }),
        Just(IndexMutation::TensorNotInShard),
        pick.prop_map(|pick| IndexMutation::TensorNotInIndex { pick }),
        pick.prop_map(|pick| IndexMutation::DuplicateIndexEntry { pick }),
        pick.prop_map(|pick| IndexMutation::TensorInTwoShardFiles { pick }),
        Just(IndexMutation::ParentPath),
        Just(IndexMutation::AbsolutePath),
        Just(IndexMutation::NestedEscape),
        Just(IndexMutation::ShardIsADirectory),
        Just(IndexMutation::IndexIsTheShard),
        any::<usize>().prop_map(|keep| IndexMutation::MalformedJson { keep }),
        prop::sample::select(vec![
            r#"{"metadata":{}}"#,
            r#"{"weight_map":[]}"#,
            r#"{"weight_map":{"a":1}}"#,
            r#"{"weight_map":{"a":null}}"#,
            r#"{"weight_map":"model.safetensors"}"#,
            r#"[]"#,
            r#""#,
        ])
        .prop_map(|t| IndexMutation::BadIndexShape {
            text: t.to_string()
        }),
        mutation_strategy().prop_map(|mutation| IndexMutation::BrokenShard { mutation }),
    ]
}

/// Writes `draft`'s tensors as two shards plus an index into `dir`, broken by `m`.
fn write_sharded(dir: &Path, draft: &Draft, m: &IndexMutation) {
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    // Split the tensors in two drafts with their own data sections.
    let cut = draft.entries.len().div_ceil(2);
    let mut shards = [
        Draft {
            metadata: draft.metadata.clone(),
            entries: Vec::new(),
            data: Vec::new(),
        },
        Draft {
            metadata: draft.metadata.clone(),
            entries: Vec::new(),
            data: Vec::new(),
        },
    ];
    for (i, e) in draft.entries.iter().enumerate() {
        let s = &mut shards[usize::from(i >= cut)];
        let bytes = &draft.data[e.start as usize..e.end as usize];
        let start = s.data.len() as u64;
        s.data.extend_from_slice(bytes);
        s.entries.push(Entry {
            start,
            end: s.data.len() as u64,
            ..e.clone()
        });
    }
    let mut map: Vec<(String, String)> = Vec::new();
    for (k, s) in shards.iter().enumerate() {
        for e in &s.entries {
            map.push((e.name.clone(), names[k].to_string()));
        }
    }
    let outside = dir.parent().unwrap().join("outside.safetensors");
    match m {
        IndexMutation::TensorNotInShard => map.push(("ghost.weight".into(), names[0].into())),
        IndexMutation::TensorNotInIndex { pick } => {
            // A shard holds one more tensor than the index lists.
            let s = &mut shards[pick % 2];
            let start = s.data.len() as u64;
            s.data.extend_from_slice(&[1, 2]);
            s.entries.push(Entry {
                name: "unlisted.weight".into(),
                dtype: "U8".into(),
                shape: vec![2],
                start,
                end: start + 2,
                raw: None,
            });
        }
        IndexMutation::DuplicateIndexEntry { pick } => {
            let (t, s) = map[pick % map.len()].clone();
            let other = if s == names[0] { names[1] } else { names[0] };
            map.push((t, other.to_string()));
        }
        IndexMutation::TensorInTwoShardFiles { pick } => {
            // The second file also holds a tensor of the first (the index names it once).
            let from = &shards[0].entries[pick % shards[0].entries.len()].clone();
            let bytes = shards[0].data[from.start as usize..from.end as usize].to_vec();
            let s = &mut shards[1];
            let start = s.data.len() as u64;
            s.data.extend_from_slice(&bytes);
            s.entries.push(Entry {
                start,
                end: s.data.len() as u64,
                ..from.clone()
            });
        }
        IndexMutation::ParentPath => {
            // A valid shard that exists, but outside the checkpoint directory.
            fs::write(&outside, shards[0].bytes()).unwrap();
            for entry in map.iter_mut().filter(|(_, s)| s == names[0]) {
                entry.1 = "../outside.safetensors".into();
            }
        }
        IndexMutation::AbsolutePath => {
            fs::write(&outside, shards[0].bytes()).unwrap();
            for entry in map.iter_mut().filter(|(_, s)| s == names[0]) {
                entry.1 = outside.to_string_lossy().into_owned();
            }
        }
        IndexMutation::NestedEscape => {
            fs::write(&outside, shards[0].bytes()).unwrap();
            fs::create_dir_all(dir.join("sub")).unwrap();
            for entry in map.iter_mut().filter(|(_, s)| s == names[0]) {
                entry.1 = "sub/../../outside.safetensors".into();
            }
        }
        _ => {}
    }
    let shard_bytes: Vec<Vec<u8>> = shards
        .iter()
        .enumerate()
        .map(|(k, s)| match m {
            IndexMutation::BrokenShard { mutation } if k == 1 => mutate(s, mutation),
            _ => s.bytes(),
        })
        .collect();
    for (k, bytes) in shard_bytes.iter().enumerate() {
        fs::write(dir.join(names[k]), bytes).unwrap();
    }
    match m {
        IndexMutation::MissingShard { pick } => fs::remove_file(dir.join(names[pick % 2])).unwrap(),
        IndexMutation::ShardIsADirectory => {
            fs::remove_file(dir.join(names[1])).unwrap();
            fs::create_dir(dir.join(names[1])).unwrap();
        }
        _ => {}
    }
    let entries: Vec<String> = map
        .iter()
        .map(|(t, s)| {
            format!(
                "{}:{}",
                serde_json::to_string(t).unwrap(),
                serde_json::to_string(s).unwrap()
            )
        })
        .collect();
    let index = format!(
        r#"{{"metadata":{{"total_size":{}}},"weight_map":{{{}}}}}"#,
        draft.data.len(),
        entries.join(",")
    );
    let index = match m {
        IndexMutation::MalformedJson { keep } => index[..keep % index.len()].to_string(),
        IndexMutation::BadIndexShape { text } => text.clone(),
        IndexMutation::IndexIsTheShard => {
            // An index whose weight_map names the index itself.
            let name = "model.safetensors.index.json";
            format!(r#"{{"weight_map":{{"layers.0.weight":"{name}"}}}}"#)
        }
        _ => index,
    };
    fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
}

#[test]
fn broken_indexes_never_crash_and_are_rejected_by_name() {
    let _serial = serial();
    let scratch = scratch_dir();
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                draft_strategy().prop_filter("two shards", |d| d.entries.len() >= 2),
                index_mutation_strategy(),
                alpha_strategy(),
            ),
            |(draft, m, (alpha, dtype))| {
                let case = scratch.path().join("case");
                let _ = fs::remove_dir_all(&case);
                let dir = case.join("ck");
                fs::create_dir_all(&dir).unwrap();
                write_sharded(&dir, &draft, &m);
                let verdict = run_library_path(&dir, &dir, alpha, dtype)?;
                if m.always_invalid() {
                    prop_assert_eq!(verdict, Verdict::Rejected, "{:?} was accepted", m);
                } else if matches!(m, IndexMutation::None) {
                    prop_assert_eq!(verdict, Verdict::Accepted);
                }
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// The same through the binary: exit 1, the file named, nothing written
// ---------------------------------------------------------------------------------------

/// A fixed, valid draft: two f32 tensors and an i64 one.
fn fixed_draft() -> Draft {
    let mut runner = TestRunner::deterministic();
    loop {
        let d = draft_strategy().new_tree(&mut runner).unwrap().current();
        if d.entries.len() >= 3 && d.non_empty().len() >= 2 {
            return d;
        }
    }
}

/// Runs `expo extrapolate` with `sft` and `aligned`, expecting exit 1 with `needles` in
/// stderr and nothing written.
fn expect_refusal(s: &Scratch, sft: &Path, aligned: &Path, needles: &[&str]) {
    let out = s.out("result");
    common::extrapolate(sft, aligned, "0.5", &out).assert_fails(1, needles);
    s.assert_no_output();
}

#[test]
fn the_binary_refuses_each_malformed_file_naming_it() {
    let _serial = serial();
    let draft = fixed_draft();
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("dup", Mutation::DuplicateName { pick: 0 }, "appears twice"),
        (
            "dtype",
            Mutation::UnknownDtype {
                pick: 0,
                dtype: "F128".into(),
            },
            "unknown dtype `F128`",
        ),
        (
            "count",
            Mutation::ByteCountMismatch { pick: 0, delta: 3 },
            "needs",
        ),
        (
            "overflow",
            Mutation::ShapeOverflow {
                pick: 0,
                dims: vec![1 << 32, 1 << 32, 1 << 32],
            },
            "too many elements",
        ),
        (
            "past-end",
            Mutation::OffsetsPastEnd { pick: 0, by: 100 },
            "",
        ),
        ("overlap", Mutation::Overlap { pick: 0 }, "overlaps"),
        ("gap", Mutation::Gap { pick: 1, by: 8 }, "gap of 8 bytes"),
        (
            "meta",
            Mutation::NonStringMetadata {
                value: r#"{"format":1}"#.into(),
            },
            "__metadata__",
        ),
        (
            "utf8",
            Mutation::InvalidUtf8 { at: 3, byte: 0xff },
            "not valid UTF-8",
        ),
        (
            "json",
            Mutation::TruncatedJson { keep: 20 },
            "not valid JSON",
        ),
        (
            "len-past",
            Mutation::HeaderLenPastEnd { extra: 1 },
            "runs past the end",
        ),
        (
            "len-huge",
            Mutation::HeaderLenHuge { len: u64::MAX },
            "exceeds the limit",
        ),
        ("short", Mutation::TooShort { len: 5 }, "too short"),
        ("truncated", Mutation::TruncatedData { cut: usize::MAX }, ""),
        (
            "padded",
            Mutation::TrailingData { extra: 3 },
            "data section",
        ),
    ];
    let s = Scratch::new();
    let good = s.path("good");
    fs::create_dir_all(&good).unwrap();
    fs::write(good.join("model.safetensors"), draft.bytes()).unwrap();
    for (name, mutation, needle) in cases {
        let dir = s.path(name);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        fs::write(&file, mutate(&draft, &mutation)).unwrap();
        let file_str = file.to_string_lossy().into_owned();
        // As --aligned (a directory) and as --sft (the file itself).
        expect_refusal(&s, &good, &dir, &[&file_str, needle]);
        expect_refusal(&s, &file, &good, &[&file_str, needle]);
    }
}

#[test]
fn the_binary_refuses_each_broken_index_naming_it() {
    let _serial = serial();
    let draft = fixed_draft();
    let cases: Vec<(&str, IndexMutation, &str)> = vec![
        (
            "missing",
            IndexMutation::MissingShard { pick: 1 },
            "does not exist",
        ),
        (
            "not-in-shard",
            IndexMutation::TensorNotInShard,
            "has no such tensor",
        ),
        (
            "not-in-index",
            IndexMutation::TensorNotInIndex { pick: 0 },
            "does not list",
        ),
        (
            "two-entries",
            IndexMutation::DuplicateIndexEntry { pick: 0 },
            "to both",
        ),
        (
            "two-files",
            IndexMutation::TensorInTwoShardFiles { pick: 0 },
            "",
        ),
        (
            "parent",
            IndexMutation::ParentPath,
            "not a plain relative file name",
        ),
        (
            "absolute",
            IndexMutation::AbsolutePath,
            "not a plain relative file name",
        ),
        (
            "nested",
            IndexMutation::NestedEscape,
            "not a plain relative file name",
        ),
        ("directory", IndexMutation::ShardIsADirectory, ""),
        (
            "malformed",
            IndexMutation::MalformedJson { keep: 30 },
            "invalid index",
        ),
        (
            "shape",
            IndexMutation::BadIndexShape {
                text: r#"{"weight_map":{"a":1}}"#.into(),
            },
            "invalid index",
        ),
    ];
    let s = Scratch::new();
    let good = s.path("good");
    fs::create_dir_all(&good).unwrap();
    fs::write(good.join("model.safetensors"), draft.bytes()).unwrap();
    for (name, m, needle) in cases {
        let dir = s.path(name).join("ck");
        fs::create_dir_all(&dir).unwrap();
        write_sharded(&dir, &draft, &m);
        let dir_str = dir.to_string_lossy().into_owned();
        expect_refusal(&s, &good, &dir, &[&dir_str, needle]);
    }
}

// ---------------------------------------------------------------------------------------
// Special files: a FIFO or device must not make expo hang
// ---------------------------------------------------------------------------------------

/// Runs expo with a deadline; a run that blocks is killed and reported.
fn run_with_deadline(args: &[&std::ffi::OsStr], deadline: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_expo"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("expo {args:?} did not finish within {deadline:?} (blocked on a FIFO?)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fifos_named_as_weights_or_side_files_do_not_block() {
    let _serial = serial();
    let draft = fixed_draft();
    let s = Scratch::new();
    let good = s.path("good");
    fs::create_dir_all(&good).unwrap();
    fs::write(good.join("model.safetensors"), draft.bytes()).unwrap();

    // An index naming a FIFO as its shard.
    let indexed = s.path("indexed");
    fs::create_dir_all(&indexed).unwrap();
    write_sharded(&indexed, &draft, &IndexMutation::None);
    let shard = indexed.join("model-00002-of-00002.safetensors");
    fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let out = s.out("a");
    let (code, err) = run_with_deadline(
        &[
            "extrapolate".as_ref(),
            "--sft".as_ref(),
            good.as_os_str(),
            "--aligned".as_ref(),
            indexed.as_os_str(),
            "--alpha".as_ref(),
            "0.5".as_ref(),
            "--output".as_ref(),
            out.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&*shard.to_string_lossy()) && err.contains("not a regular file"),
        "{err}"
    );

    // A FIFO given as the checkpoint file.
    let fifo = s.path("weights.safetensors");
    mkfifo(&fifo);
    let (code, err) = run_with_deadline(
        &[
            "extrapolate".as_ref(),
            "--sft".as_ref(),
            good.as_os_str(),
            "--aligned".as_ref(),
            fifo.as_os_str(),
            "--alpha".as_ref(),
            "0.5".as_ref(),
            "--output".as_ref(),
            out.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&*fifo.to_string_lossy()), "{err}");
    s.assert_no_output();

    // A FIFO among θ1's side files is refused by name, without being read (reading it
    // would block forever).
    let aligned = s.path("aligned");
    fs::create_dir_all(&aligned).unwrap();
    fs::write(aligned.join("model.safetensors"), draft.bytes()).unwrap();
    fs::write(aligned.join("config.json"), "{}\n").unwrap();
    mkfifo(&aligned.join("tokenizer.pipe"));
    // θ1's model card is read for its license: a FIFO there must not block either.
    mkfifo(&aligned.join("README.md"));
    let (code, err) = run_with_deadline(
        &[
            "extrapolate".as_ref(),
            "--sft".as_ref(),
            good.as_os_str(),
            "--aligned".as_ref(),
            aligned.as_os_str(),
            "--alpha".as_ref(),
            "0.5".as_ref(),
            "--output".as_ref(),
            out.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tokenizer.pipe is a FIFO (named pipe), not a regular file"),
        "{err}"
    );
    s.assert_no_output();
}

// ---------------------------------------------------------------------------------------
// Memory for a large header
// ---------------------------------------------------------------------------------------

#[test]
fn a_large_header_costs_a_small_multiple_of_its_size() {
    let _serial = serial();
    // 40k zero-size tensors with realistic names: a 3.6 MB header, no data.
    let mut header = String::from("{");
    for i in 0..40_000 {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""model.layers.{i}.self_attn.q_proj.weight":{{"dtype":"BF16","shape":[4096,0],"data_offsets":[0,0]}}"#
        ));
    }
    header.push('}');
    let dir = scratch_dir();
    let path = dir.path().join("model.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    fs::write(&path, &bytes).unwrap();
    drop(bytes);

    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let ck = Checkpoint::open(&path).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert_eq!(ck.len(), 40_000);
    let ratio = peak as f64 / header.len() as f64;
    // The header's bytes (1×) plus the safetensors crate's parse, which buffers every entry
    // (serde's `flatten`) and peaks at about 8.4× the header; expo's own bookkeeping comes
    // after that peak. 12× leaves room for allocator rounding, and still catches anything
    // that grows with the header faster than that.
    assert!(
        ratio < 12.0,
        "opening a {}-byte header took {peak} bytes at peak ({ratio:.1}× its size)",
        header.len()
    );
}
