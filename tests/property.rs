//! Random small checkpoints (shapes, dtypes, values, shardings on both sides, α, --dtype,
//! --max-shard-size, --threads): expo's output always equals the f64 reference.

use std::path::Path;

use crate::common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Spec {
    shape: Vec<usize>,
    sft: Dtype,
    aligned: Dtype,
    /// None: an I64 tensor identical on both sides.
    values: Option<(Vec<f64>, Vec<f64>)>,
}

#[derive(Debug, Clone)]
enum Layout {
    /// `model.safetensors`.
    Single,
    /// Shards with an index; tensor i goes to shard `assign[i]` (compacted to 0..k).
    Sharded(Vec<usize>),
}

#[derive(Debug, Clone)]
struct Case {
    tensors: Vec<Spec>,
    alpha: f64,
    dtype: Option<Dtype>,
    sft_layout: Layout,
    aligned_layout: Layout,
    max_shard_size: Option<u64>,
    threads: Option<u8>,
}

fn float_dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![
        Just(Dtype::BF16),
        Just(Dtype::F16),
        Just(Dtype::F32),
        Just(Dtype::F64)
    ]
}

/// Values that stay finite in f16 after extrapolation with |α| ≤ 3, with signed zeros and
/// subnormals of every format.
fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -4.0..4.0f64,
        1 => -1000.0..1000.0f64,
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => -1e-4..1e-4f64,
        1 => -2e-38..2e-38f64,
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(0usize..5, 0..=3),
        float_dtype(),
        float_dtype(),
        prop::bool::weighted(0.1),
    )
        .prop_flat_map(|(shape, sft, aligned, int)| {
            let n = numel(&shape);
            let values = if int {
                Just(None).boxed()
            } else {
                (
                    prop::collection::vec(value(), n),
                    prop::collection::vec(value(), n),
                )
                    .prop_map(Some)
                    .boxed()
            };
            (Just(shape), Just(sft), Just(aligned), values)
        })
        .prop_map(|(shape, sft, aligned, values)| Spec {
            shape,
            sft,
            aligned,
            values,
        })
}

fn layout(n: usize) -> impl Strategy<Value = Layout> {
    prop_oneof![
        1 => Just(Layout::Single),
        3 => prop::collection::vec(0usize..3, n).prop_map(Layout::Sharded),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(spec(), 1..6).prop_flat_map(|tensors| {
        let n = tensors.len();
        (
            Just(tensors),
            prop_oneof![Just(0.0), Just(0.3), Just(2.5), Just(-0.5), -0.99..3.0f64],
            prop_oneof![3 => Just(None), 1 => float_dtype().prop_map(Some)],
            layout(n),
            layout(n),
            prop_oneof![3 => Just(None), 1 => (1u64..400).prop_map(Some)],
            prop_oneof![Just(None), (1u8..4).prop_map(Some)],
        )
            .prop_map(
                |(tensors, alpha, dtype, sft_layout, aligned_layout, max_shard_size, threads)| {
                    Case {
                        tensors,
                        alpha,
                        dtype,
                        sft_layout,
                        aligned_layout,
                        max_shard_size,
                        threads,
                    }
                },
            )
    })
}

/// Writes `tensors` into `dir` in `layout`.
fn write(dir: &Path, tensors: &[Tensor], layout: &Layout) {
    match layout {
        Layout::Single => {
            single(dir, tensors);
        }
        Layout::Sharded(assign) => {
            // Compact the shard numbers so that every shard holds something.
            let mut used: Vec<usize> = assign.clone();
            used.sort();
            used.dedup();
            let mut groups = vec![Vec::new(); used.len()];
            for (t, a) in tensors.iter().zip(assign) {
                groups[used.iter().position(|u| u == a).unwrap()].push(t.clone());
            }
            sharded(dir, &groups);
        }
    }
}

fn run_case(case: &Case) {
    let mut t0s = Vec::new();
    let mut t1s = Vec::new();
    for (i, spec) in case.tensors.iter().enumerate() {
        let name = format!("layers.{i}.weight");
        match &spec.values {
            Some((v0, v1)) => {
                t0s.push(Tensor::float(&name, spec.sft, &spec.shape, v0));
                t1s.push(Tensor::float(&name, spec.aligned, &spec.shape, v1));
            }
            None => {
                let n = numel(&spec.shape);
                let ints: Vec<i64> = (0..n as i64).map(|k| k * 31 - 7).collect();
                let t = Tensor::i64(&name, &spec.shape, &ints);
                t0s.push(t.clone());
                t1s.push(t);
            }
        }
    }
    let s = Scratch::new();
    let (sft, dpo) = (s.path("sft"), s.path("dpo"));
    write(&sft, &t0s, &case.sft_layout);
    write(&dpo, &t1s, &case.aligned_layout);
    let out = s.out("o");

    let mut cmd = expo(&["extrapolate", "--sft"])
        .arg(&sft)
        .arg("--aligned")
        .arg(&dpo)
        .arg(format!("--alpha={}", case.alpha))
        .arg("-o")
        .arg(&out);
    if let Some(d) = case.dtype {
        cmd = cmd.args(&["--dtype", cli_name(d)]);
    }
    if let Some(m) = case.max_shard_size {
        cmd = cmd.args(&["--max-shard-size", &m.to_string()]);
    }
    if let Some(t) = case.threads {
        cmd = cmd.args(&["--threads", &t.to_string()]);
    }
    cmd.assert_ok();

    let got = read_checkpoint(&out);
    let want = reference(&t0s, &t1s, case.alpha, case.dtype);
    assert_tensors_eq(&got.tensors, &want, Some((&t0s, &t1s, case.alpha)));
    let aligned = read_checkpoint(&dpo);
    match case.max_shard_size {
        None => {
            assert_eq!(
                got.data_layout(),
                aligned.data_layout(),
                "output must mirror θ1"
            );
            assert_eq!(got.index.is_some(), aligned.index.is_some());
        }
        Some(_) => assert_eq!(
            got.data_order(),
            aligned.data_order(),
            "re-sharding keeps θ1's order"
        ),
    }
    if let Some(index) = &got.index {
        assert_eq!(*index, expected_index(&got));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        // Failures print the shrunk case; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_checkpoints_match_the_reference(case in case()) {
        run_case(&case);
    }
}
