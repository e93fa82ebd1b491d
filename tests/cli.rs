//! The replay CLI, `paged-gqa attend CASE.safetensors --out OUT.safetensors [--backend cpu|cuda|sim]`,
//! run as a process on case files written here.
//!
//! Valid cases: `out` and `lse` match an f64 computation of the definition written in this file
//! (not the crate's oracle), from the values the case file holds, for f32, f16 and bf16 inputs.
//! Malformed cases: exit code 2, a message on stderr naming the offending tensor (and the numbers),
//! and no output file. `--backend cuda` runs the attention kernel on f16/bf16 cases; what it
//! cannot run (or with no GPU) is exit code 1, a plain message, no output file.
#![cfg(feature = "cli")] // the binary needs the `cli` feature

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Relative L2 error of `out` and max abs error of `lse` against the f64 definition.
const TOLERANCE: f64 = 1e-5;

const CASE: &str = "case.safetensors";
const OUT: &str = "out.safetensors";

// ---------------------------------------------------------------------------------------------
// Scratch directories and running the binary.

/// A fresh directory per test under the system temp dir; removed when the test passes, kept
/// (and its path printed) when it fails.
struct Workdir(PathBuf);

impl Workdir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "paged-gqa-cli-{test}-{}-{unique}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Names of the files in the directory, sorted.
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the files of the failed test in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `paged-gqa attend CASE --out OUT EXTRA..`: the binary cargo built beside this test, or
/// the one `PAGED_GQA_CLI` names (this test binary run on another machine, e.g. staged for a
/// GPU with the CLI, where the build's path does not exist).
fn attend(case: &Path, out: &Path, extra: &[&str]) -> Output {
    let cli =
        std::env::var_os("PAGED_GQA_CLI").unwrap_or_else(|| env!("CARGO_BIN_EXE_paged-gqa").into());
    Command::new(cli)
        .arg("attend")
        .arg(case)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("cannot run the paged-gqa binary")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An error message fit for a person: no panic, no backtrace hint.
fn assert_plain(test: &str, message: &str) {
    assert!(
        !message.contains("panicked") && !message.contains("RUST_BACKTRACE"),
        "{test}: the binary panicked instead of reporting an error:\n{message}"
    );
    assert!(!message.trim().is_empty(), "{test}: empty stderr");
}

// ---------------------------------------------------------------------------------------------
// Building case files.

/// One tensor as it goes into a safetensors file.
#[derive(Clone, Debug)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    /// Float values in `dtype` (f32, f16 or bf16), rounded to nearest.
    fn float(dtype: Dtype, shape: Vec<usize>, values: &[f64]) -> Self {
        let data = values.iter().flat_map(|&v| encode(dtype, v)).collect();
        Self { dtype, shape, data }
    }

    fn i32(shape: Vec<usize>, values: &[i32]) -> Self {
        Self::little_endian(Dtype::I32, shape, values, i32::to_le_bytes)
    }

    fn i64(shape: Vec<usize>, values: &[i64]) -> Self {
        Self::little_endian(Dtype::I64, shape, values, i64::to_le_bytes)
    }

    fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self::little_endian(Dtype::F32, shape, values, f32::to_le_bytes)
    }

    /// `values` stored as `dtype`, each as `bytes` writes it (little-endian, as the file holds it).
    fn little_endian<T: Copy, const N: usize>(
        dtype: Dtype,
        shape: Vec<usize>,
        values: &[T],
        bytes: fn(T) -> [u8; N],
    ) -> Self {
        let data = values.iter().flat_map(|&v| bytes(v)).collect();
        Self { dtype, shape, data }
    }
}

fn encode(dtype: Dtype, v: f64) -> Vec<u8> {
    match dtype {
        Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
        Dtype::F16 => f16::from_f64(v).to_bits().to_le_bytes().to_vec(),
        Dtype::BF16 => bf16::from_f64(v).to_bits().to_le_bytes().to_vec(),
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// `x` rounded to `dtype`, as the file will hold it, widened back to f64 (exactly).
fn round(dtype: Dtype, x: f32) -> f64 {
    match dtype {
        Dtype::F32 => x as f64,
        Dtype::F16 => f16::from_f32(x).to_f64(),
        Dtype::BF16 => bf16::from_f32(x).to_f64(),
        other => panic!("not a float dtype: {other:?}"),
    }
}

type Tensors = BTreeMap<String, Raw>;

fn write_case(path: &Path, tensors: &Tensors, metadata: Option<HashMap<String, String>>) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(name, raw)| {
            let view = TensorView::new(raw.dtype, raw.shape.clone(), &raw.data)
                .unwrap_or_else(|e| panic!("test bug: tensor {name}: {e}"));
            (name.as_str(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

fn scale_metadata(scale: &str) -> Option<HashMap<String, String>> {
    Some(HashMap::from([("scale".to_string(), scale.to_string())]))
}

/// The geometry of a case; everything else (block tables, cache size, values) follows from it.
#[derive(Clone, Debug)]
struct Geometry {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    context_lens: Vec<i32>,
    query_lens: Vec<i32>,
    /// Block-table columns past the longest sequence's blocks (all -1 padding).
    extra_columns: usize,
    /// Cache blocks no sequence uses.
    spare_blocks: usize,
}

impl Default for Geometry {
    /// 8 query heads over 2 K/V heads (group 4), pages of 16 tokens; a one-token context, a
    /// context of exactly one page, and a partial last page with a 4-token chunk.
    fn default() -> Self {
        Self {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            context_lens: vec![1, 16, 37],
            query_lens: vec![1, 1, 4],
            extra_columns: 0,
            spare_blocks: 3,
        }
    }
}

/// A random case: random values (rounded to `dtype`), pages handed out in a shuffled order,
/// `-1` padding in the block tables past each sequence's pages.
#[derive(Clone)]
struct Case {
    g: Geometry,
    dtype: Dtype,
    num_blocks: usize,
    max_blocks: usize,
    /// [batch, max_blocks]
    block_tables: Vec<i32>,
    /// [num_tokens, n_heads, head_dim], the values the file holds
    q: Vec<f64>,
    /// [num_blocks, block_size, n_kv_heads, head_dim], the values the file holds
    k_cache: Vec<f64>,
    /// [num_blocks, block_size, n_kv_heads, head_dim], the values the file holds
    v_cache: Vec<f64>,
}

impl Case {
    fn random(rng: &mut StdRng, g: Geometry, dtype: Dtype) -> Self {
        // Lengths may be deliberately bad (negative, query longer than context); size by what is
        // there so that only the property under test is wrong.
        let blocks_of = |len: i32| (len.max(0) as usize).div_ceil(g.block_size);
        let needed: Vec<usize> = g.context_lens.iter().map(|&l| blocks_of(l)).collect();
        let max_blocks = needed.iter().copied().max().unwrap_or(0) + g.extra_columns;
        let num_blocks = needed.iter().sum::<usize>() + g.spare_blocks;
        let num_tokens: usize = g.query_lens.iter().map(|&l| l.max(0) as usize).sum();

        let mut free: Vec<i32> = (0..num_blocks as i32).collect();
        free.shuffle(rng);
        let mut block_tables = vec![-1; g.context_lens.len() * max_blocks];
        for (seq, &n) in needed.iter().enumerate() {
            for index in 0..n {
                block_tables[seq * max_blocks + index] = free.pop().unwrap();
            }
        }

        let cache_len = num_blocks * g.block_size * g.n_kv_heads * g.head_dim;
        let mut values = |n: usize| -> Vec<f64> {
            common::uniform(rng, n)
                .into_iter()
                .map(|x| round(dtype, x))
                .collect()
        };
        let q = values(num_tokens * g.n_heads * g.head_dim);
        let k_cache = values(cache_len);
        let v_cache = values(cache_len);
        Self {
            g,
            dtype,
            num_blocks,
            max_blocks,
            block_tables,
            q,
            k_cache,
            v_cache,
        }
    }

    fn batch(&self) -> usize {
        self.g.context_lens.len()
    }

    fn num_tokens(&self) -> usize {
        self.q.len() / (self.g.n_heads * self.g.head_dim)
    }

    fn cache_shape(&self) -> Vec<usize> {
        vec![
            self.num_blocks,
            self.g.block_size,
            self.g.n_kv_heads,
            self.g.head_dim,
        ]
    }

    /// The six tensors of the contract.
    fn tensors(&self) -> Tensors {
        let g = &self.g;
        let batch = self.batch();
        BTreeMap::from([
            (
                "q".into(),
                Raw::float(
                    self.dtype,
                    vec![self.num_tokens(), g.n_heads, g.head_dim],
                    &self.q,
                ),
            ),
            (
                "k_cache".into(),
                Raw::float(self.dtype, self.cache_shape(), &self.k_cache),
            ),
            (
                "v_cache".into(),
                Raw::float(self.dtype, self.cache_shape(), &self.v_cache),
            ),
            (
                "block_tables".into(),
                Raw::i32(vec![batch, self.max_blocks], &self.block_tables),
            ),
            (
                "context_lens".into(),
                Raw::i32(vec![batch], &g.context_lens),
            ),
            ("query_lens".into(), Raw::i32(vec![batch], &g.query_lens)),
        ])
    }

    fn default_scale(&self) -> f64 {
        1.0 / (self.g.head_dim as f64).sqrt()
    }
}

// ---------------------------------------------------------------------------------------------
// The definition, in f64, independent of the crate.

struct Expected {
    /// [num_tokens, n_heads, head_dim]
    out: Vec<f64>,
    /// [num_tokens, n_heads]
    lse: Vec<f64>,
}

/// Causal GQA attention over the paged cache: query row `j` of sequence `s` sits at position
/// `context_len - query_len + j` and sees keys `0..=position`; query head `h` reads K/V head
/// `h / (n_heads / n_kv_heads)`; `lse` is the natural log of the sum of `exp(score)`.
fn reference(case: &Case, scale: f64) -> Expected {
    reference_with(
        case,
        &Variants {
            scale,
            ..Variants::default()
        },
    )
}

/// The attention variants of a case, as the contract defines them.
#[derive(Clone, Debug)]
struct Variants {
    scale: f64,
    causal: bool,
    /// Keys from position - window_left on.
    window_left: Option<usize>,
    /// score = cap * tanh(score / cap).
    softcap: Option<f64>,
    /// [n_heads]: exp(sink) joins each head's denominator.
    sinks: Option<Vec<f64>>,
    /// [n_heads]: score += slope * (key - position).
    slopes: Option<Vec<f64>>,
}

impl Default for Variants {
    fn default() -> Self {
        Self {
            scale: 0.125,
            causal: true,
            window_left: None,
            softcap: None,
            sinks: None,
            slopes: None,
        }
    }
}

/// [`reference`] with the variants: keys `[position - window_left, position]` (or up to the last
/// key when not causal), then scale, soft-cap, ALiBi, and the sink in the denominator.
fn reference_with(case: &Case, variants: &Variants) -> Expected {
    let scale = variants.scale;
    let g = &case.g;
    let (n_heads, n_kv, d, bs) = (g.n_heads, g.n_kv_heads, g.head_dim, g.block_size);
    let group = n_heads / n_kv;
    let mut out = vec![0.0; case.q.len()];
    let mut lse = vec![0.0; case.num_tokens() * n_heads];
    let mut token = 0;
    for seq in 0..case.batch() {
        let context_len = g.context_lens[seq] as usize;
        let query_len = g.query_lens[seq] as usize;
        let row = &case.block_tables[seq * case.max_blocks..][..case.max_blocks];
        // Element offset of (position, kv head) of this sequence in the cache.
        let at = |pos: usize, kv_head: usize| {
            let block = usize::try_from(row[pos / bs]).unwrap();
            ((block * bs + pos % bs) * n_kv + kv_head) * d
        };
        for j in 0..query_len {
            let position = context_len - query_len + j;
            for h in 0..n_heads {
                let kv_head = h / group;
                let q = &case.q[(token * n_heads + h) * d..][..d];
                let last = if variants.causal {
                    position
                } else {
                    context_len - 1
                };
                let first = variants
                    .window_left
                    .map_or(0, |w| position.saturating_sub(w));
                let scores: Vec<f64> = (first..=last)
                    .map(|t| {
                        let k = &case.k_cache[at(t, kv_head)..][..d];
                        let mut s = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>();
                        if let Some(cap) = variants.softcap {
                            s = cap * (s / cap).tanh();
                        }
                        if let Some(slopes) = &variants.slopes {
                            s += slopes[h] * (t as f64 - position as f64);
                        }
                        s
                    })
                    .collect();
                let sink = variants.sinks.as_ref().map_or(f64::NEG_INFINITY, |s| s[h]);
                let max = scores.iter().copied().fold(sink, f64::max);
                let sum: f64 =
                    scores.iter().map(|s| (s - max).exp()).sum::<f64>() + (sink - max).exp();
                let o = &mut out[(token * n_heads + h) * d..][..d];
                for (t, s) in (first..=last).zip(&scores) {
                    let p = (s - max).exp() / sum;
                    let v = &case.v_cache[at(t, kv_head)..][..d];
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += p * v;
                    }
                }
                lse[token * n_heads + h] = max + sum.ln();
            }
            token += 1;
        }
    }
    assert_eq!(token, case.num_tokens());
    Expected { out, lse }
}

// ---------------------------------------------------------------------------------------------
// Reading and comparing the output.

/// `name` from the output file: checks dtype F32 and `shape`, returns the values.
fn read_f32(st: &SafeTensors, name: &str, shape: &[usize]) -> Vec<f64> {
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("output has no `{name}`: {e}"));
    assert_eq!(view.dtype(), Dtype::F32, "dtype of output `{name}`");
    assert_eq!(view.shape(), shape, "shape of output `{name}`");
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .collect()
}

/// Reads OUT; returns (out, lse).
fn read_output(path: &Path, case: &Case) -> (Vec<f64>, Vec<f64>) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("the output is not a safetensors file");
    let (tokens, heads, d) = (case.num_tokens(), case.g.n_heads, case.g.head_dim);
    let out = read_f32(&st, "out", &[tokens, heads, d]);
    let lse = read_f32(&st, "lse", &[tokens, heads]);
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["lse", "out"], "tensors of the output");
    (out, lse)
}

/// Checks `out` and `lse` against the definition with `scale`.
fn assert_matches(test: &str, got: &(Vec<f64>, Vec<f64>), expected: &Expected) {
    assert!(
        got.0.iter().chain(&got.1).all(|x| x.is_finite()),
        "{test}: non-finite output"
    );
    let out_err = common::rel_l2(&got.0, &expected.out);
    let lse_err = common::max_abs(&got.1, &expected.lse);
    eprintln!("{test}: out relative L2 {out_err:.3e}, lse max |diff| {lse_err:.3e}");
    assert!(
        out_err < TOLERANCE,
        "{test}: out relative L2 error {out_err:e} >= {TOLERANCE:e}"
    );
    assert!(
        lse_err < TOLERANCE,
        "{test}: lse max abs error {lse_err:e} >= {TOLERANCE:e}"
    );
}

/// Unit roundoff of a kernel's 16-bit dtype: half the spacing of its significands, 2^-8 for bf16
/// (8 significant bits) and 2^-11 for f16 (11).
fn unit_roundoff(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::BF16 => 2f64.powi(-8),
        Dtype::F16 => 2f64.powi(-11),
        other => panic!("the kernels take f16 or bf16, not {other:?}"),
    }
}

/// A kernel's output (`--backend cuda` or `sim`) against the definition with `scale`, row by
/// row: every (token, head) row's error within a bound derived from that row's own values and
/// the dtype's rounding, and every lse within 1e-3. A pooled norm over all rows would let a
/// mistake confined to a few rows (a long context's, whose outputs are small) pass.
///
/// The bound. The case's values are exactly representable in the dtype (the definition sees
/// what the kernel reads); the kernel computes in f32 and rounds twice, with u the unit roundoff:
/// - the unnormalised probabilities exp(s_j - m) in (0, 1], rounded to the dtype as the P.V
///   operand: the normalised weights p_j move by at most 2u p_j (u for the rounding, u more if
///   the normaliser sums the rounded values), and in f16 by up to 2^-25 more each (the
///   subnormal range, below 2^-14);
/// - the output, rounded to the dtype: u |o_e|.
///
/// f32 arithmetic adds a relative 2^-24 (2 d scale max_j sum_i |q_i k_ji| + n + 32) to the
/// weights (logits, exp2, the P.V sum of n keys, a split merge): under 1e-4 here. So with
/// a_e = sum_j p_j |v_je| (the definition over |V|), element e of the row is off by at most
///   u |o_e| + (2u + f32) a_e + 2^-25 n max_j |v_je|,
/// and the row's error (L2) by the L2 norm of that. A worst case over rounding signs, so it
/// never fails a correct kernel (the emulated kernels use 5 to 15 per cent of it); a real
/// mistake moves a row by a whole key's or split's share (one key of a 37-key row left out of
/// P.V, in one row of the 48: 3 times the bf16 bound, where a pooled relative L2 was at 1e-2).
fn assert_kernel_rows(test: &str, case: &Case, got: &(Vec<f64>, Vec<f64>), scale: f64) {
    let (out, lse) = got;
    assert!(
        out.iter().chain(lse).all(|x| x.is_finite()),
        "{test}: non-finite output"
    );
    let expected = reference(case, scale);
    let magnitude = reference(
        &Case {
            v_cache: case.v_cache.iter().map(|v| v.abs()).collect(),
            ..case.clone()
        },
        scale,
    );
    let g = &case.g;
    let (n_heads, d) = (g.n_heads, g.head_dim);
    let u = unit_roundoff(case.dtype);
    let subnormal = if case.dtype == Dtype::F16 {
        2f64.powi(-25)
    } else {
        0.0
    };
    let max_v = case.v_cache.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let max_qk = case
        .q
        .chunks(d)
        .map(|q| {
            case.k_cache
                .chunks(d)
                .map(|k| q.iter().zip(k).map(|(a, b)| (a * b).abs()).sum::<f64>())
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max);
    // Keys each query row sees (causal): its position + 1.
    let keys: Vec<usize> = (0..case.batch())
        .flat_map(|seq| {
            let (context, query) = (g.context_lens[seq] as usize, g.query_lens[seq] as usize);
            (context - query + 1..=context).flat_map(|n| std::iter::repeat_n(n, n_heads))
        })
        .collect();
    assert_eq!(keys.len() * d, out.len(), "test bug: rows");
    let (mut worst_ratio, mut worst_rel) = (0.0f64, 0.0f64);
    for (row, &n) in keys.iter().enumerate() {
        let f32_part = 2f64.powi(-24) * (2.0 * d as f64 * scale * max_qk + n as f64 + 32.0);
        let range = row * d..(row + 1) * d;
        let (got, want, a) = (
            &out[range.clone()],
            &expected.out[range.clone()],
            &magnitude.out[range],
        );
        let err = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).powi(2))
            .sum::<f64>()
            .sqrt();
        let bound = want
            .iter()
            .zip(a)
            .map(|(o, a)| {
                (u * o.abs() + (2.0 * u + f32_part) * a + subnormal * n as f64 * max_v).powi(2)
            })
            .sum::<f64>()
            .sqrt();
        let norm = want.iter().map(|o| o * o).sum::<f64>().sqrt();
        let (token, head) = (row / n_heads, row % n_heads);
        assert!(
            err <= bound,
            "{test}: row (token {token}, head {head}, {n} keys): error {err:e} over the \
             rounding bound {bound:e} (relative to the row: {:e} against {:e})",
            err / norm,
            bound / norm
        );
        worst_ratio = worst_ratio.max(err / bound);
        worst_rel = worst_rel.max(err / norm);
    }
    let lse_err = common::max_abs(lse, &expected.lse);
    eprintln!(
        "{test}: worst row: relative error {worst_rel:.3e}, {worst_ratio:.3} of its bound; \
         lse max |diff| {lse_err:.3e}"
    );
    assert!(lse_err < 1e-3, "{test}: lse max |diff| {lse_err:e}");
}

/// Writes `case` (with `metadata`), runs `extra` (the CPU backend unless it names another),
/// checks success and returns OUT.
fn run_valid(
    test: &str,
    dir: &Workdir,
    case: &Case,
    metadata: Option<HashMap<String, String>>,
    extra: &[&str],
) -> (Vec<f64>, Vec<f64>) {
    run_tensors(test, dir, case, &case.tensors(), metadata, extra)
}

/// Writes `tensors` (with `metadata`) as the case file in `dir`, runs `extra`, checks success
/// and returns OUT, shaped as `case`'s output.
fn run_tensors(
    test: &str,
    dir: &Workdir,
    case: &Case,
    tensors: &Tensors,
    metadata: Option<HashMap<String, String>>,
    extra: &[&str],
) -> (Vec<f64>, Vec<f64>) {
    let (case_path, out_path) = (dir.path(CASE), dir.path(OUT));
    write_case(&case_path, tensors, metadata);
    let output = attend(&case_path, &out_path, extra);
    assert!(
        output.status.success(),
        "{test}: exit {:?}, stderr:\n{}",
        output.status.code(),
        stderr(&output)
    );
    read_output(&out_path, case)
}

fn check_valid(test: &str, dtype: Dtype) {
    let mut rng = common::rng(test);
    let case = Case::random(&mut rng, Geometry::default(), dtype);
    assert!(
        case.block_tables.contains(&-1),
        "test bug: the default case should have -1 padding"
    );
    let dir = Workdir::new(test);
    let got = run_valid(test, &dir, &case, None, &[]);
    assert_matches(test, &got, &reference(&case, case.default_scale()));
    assert_eq!(
        dir.files(),
        [CASE, OUT],
        "{test}: files left in the output directory"
    );
}

// ---------------------------------------------------------------------------------------------
// Valid cases.

#[test]
fn f32_case_matches_the_definition() {
    check_valid("f32_case_matches_the_definition", Dtype::F32);
}

#[test]
fn f16_case_matches_the_definition() {
    check_valid("f16_case_matches_the_definition", Dtype::F16);
}

#[test]
fn bf16_case_matches_the_definition() {
    check_valid("bf16_case_matches_the_definition", Dtype::BF16);
}

#[test]
fn explicit_cpu_backend_matches_the_definition() {
    let test = "explicit_cpu_backend_matches_the_definition";
    let mut rng = common::rng(test);
    let case = Case::random(&mut rng, Geometry::default(), Dtype::BF16);
    let dir = Workdir::new(test);
    let got = run_valid(test, &dir, &case, None, &["--backend", "cpu"]);
    assert_matches(test, &got, &reference(&case, case.default_scale()));
}

#[test]
fn metadata_scale_is_applied() {
    let test = "metadata_scale_is_applied";
    let mut rng = common::rng(test);
    let case = Case::random(&mut rng, Geometry::default(), Dtype::F32);
    let scale = 0.3; // the default is 1/sqrt(64) = 0.125
    let with_scale = run_valid(
        test,
        &Workdir::new(test),
        &case,
        scale_metadata(&scale.to_string()),
        &[],
    );
    let without = run_valid(test, &Workdir::new(test), &case, None, &[]);

    let custom = reference(&case, scale);
    let default = reference(&case, case.default_scale());
    assert_matches(test, &with_scale, &custom);
    assert_matches(test, &without, &default);
    // The scale changes the result far beyond the tolerance, so the match above means it was used.
    let apart = common::rel_l2(&with_scale.0, &default.out);
    assert!(
        apart > 1e3 * TOLERANCE,
        "{test}: scale {scale} barely changes out ({apart:e} from the default)"
    );
    assert!(
        common::max_abs(&with_scale.1, &default.lse) > 1e3 * TOLERANCE,
        "{test}: scale did not change lse"
    );
}

/// `(name, value)` pairs as safetensors metadata.
fn metadata(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn metadata_and_tensor_variants_are_applied() {
    let test = "metadata_and_tensor_variants_are_applied";
    let mut rng = common::rng(test);
    let case = Case::random(&mut rng, Geometry::default(), Dtype::F32);
    let heads = |values: Vec<f64>| (Raw::float(Dtype::F32, vec![8], &values), values);
    let (sinks, sink_values) = heads((0..8).map(|h| h as f64 * 0.5 - 1.0).collect());
    let (slopes, slope_values) = heads((0..8).map(|h| 0.5f64.powi(h + 1)).collect());
    let plain = reference(&case, case.default_scale());
    let v = Variants {
        scale: case.default_scale(),
        ..Variants::default()
    };
    // (what, metadata, extra tensors, the variants they mean)
    type VariantCase<'a> = (
        &'a str,
        Option<HashMap<String, String>>,
        Vec<(&'a str, Raw)>,
        Variants,
    );
    let cases: Vec<VariantCase> = vec![
        (
            "window_left 3",
            metadata(&[("window_left", "3")]),
            vec![],
            Variants {
                window_left: Some(3),
                ..v.clone()
            },
        ),
        (
            "soft-cap 0.05",
            metadata(&[("logit_softcap", "0.05")]),
            vec![],
            Variants {
                softcap: Some(0.05),
                ..v.clone()
            },
        ),
        (
            "not causal",
            metadata(&[("causal", "false")]),
            vec![],
            Variants {
                causal: false,
                ..v.clone()
            },
        ),
        (
            "sinks",
            None,
            vec![("sinks", sinks.clone())],
            Variants {
                sinks: Some(sink_values.clone()),
                ..v.clone()
            },
        ),
        (
            "ALiBi",
            None,
            vec![("alibi_slopes", slopes.clone())],
            Variants {
                slopes: Some(slope_values.clone()),
                ..v.clone()
            },
        ),
        (
            "all at once, scale 0.3",
            metadata(&[
                ("scale", "0.3"),
                ("window_left", "20"),
                ("logit_softcap", "2"),
                ("causal", "true"),
            ]),
            vec![("sinks", sinks), ("alibi_slopes", slopes)],
            Variants {
                scale: 0.3,
                window_left: Some(20),
                softcap: Some(2.0),
                sinks: Some(sink_values),
                slopes: Some(slope_values),
                ..v.clone()
            },
        ),
    ];
    for (what, meta, extra, variants) in cases {
        let what = format!("{test}: {what}");
        let mut tensors = case.tensors();
        tensors.extend(extra.into_iter().map(|(name, raw)| (name.to_string(), raw)));
        let got = run_tensors(&what, &Workdir::new(test), &case, &tensors, meta, &[]);
        assert_matches(&what, &got, &reference_with(&case, &variants));
        // Each variant moves the result far beyond the tolerance: the match means it was used.
        let apart = common::rel_l2(&got.0, &plain.out).max(common::max_abs(&got.1, &plain.lse));
        assert!(
            apart > 1e3 * TOLERANCE,
            "{what}: barely changes the result ({apart:e})"
        );
    }
}

#[test]
fn malformed_variants_are_rejected_naming_the_key() {
    let test = "malformed_variants_are_rejected_naming_the_key";
    let case = default_case(test);
    for (key, value) in [
        ("window_left", "-2"),
        ("window_left", "4.5"),
        ("logit_softcap", "-1"),
        ("logit_softcap", "inf"),
        ("causal", "yes"),
        ("scale", "nan"),
    ] {
        let needle = format!("`{key}`");
        assert_rejected(
            test,
            &case.tensors(),
            metadata(&[(key, value)]),
            &[&needle, value],
        );
    }
    for (name, raw, needle) in [
        (
            "sinks",
            Raw::float(Dtype::F32, vec![7], &[0.0; 7]),
            "expected 8",
        ),
        (
            "sinks",
            Raw::float(Dtype::F16, vec![8], &[0.0; 8]),
            "expected F32",
        ),
        (
            "sinks",
            Raw::float(Dtype::F32, vec![8, 1], &[0.0; 8]),
            "rank 2",
        ),
        (
            "sinks",
            Raw::float(Dtype::F32, vec![8], &[f64::NAN; 8]),
            "NaN",
        ),
        (
            "alibi_slopes",
            Raw::float(Dtype::F32, vec![40], &[0.5; 40]),
            "expected 8",
        ),
        (
            "alibi_slopes",
            Raw::float(Dtype::F32, vec![8], &[f64::NEG_INFINITY; 8]),
            "-inf",
        ),
    ] {
        let mut tensors = case.tensors();
        tensors.insert(name.to_string(), raw);
        let quoted = format!("`{name}`");
        assert_rejected(test, &tensors, None, &[&quoted, needle]);
    }
}

#[test]
fn minus_one_padding_past_the_used_blocks_is_accepted() {
    let test = "minus_one_padding_past_the_used_blocks_is_accepted";
    let mut rng = common::rng(test);
    let g = Geometry {
        extra_columns: 3,
        ..Geometry::default()
    };
    let case = Case::random(&mut rng, g, Dtype::F16);
    // Every row ends in -1 padding, the longest sequence's included.
    for seq in 0..case.batch() {
        let row = &case.block_tables[seq * case.max_blocks..][..case.max_blocks];
        assert_eq!(row.last(), Some(&-1), "test bug: row {seq} = {row:?}");
    }
    let dir = Workdir::new(test);
    let got = run_valid(test, &dir, &case, None, &[]);
    assert_matches(test, &got, &reference(&case, case.default_scale()));
}

// ---------------------------------------------------------------------------------------------
// --backend cuda.

/// Runs `case` with `--backend BACKEND` (cuda or sim) where the CLI must refuse it: exit 1,
/// every needle on stderr, no output file.
fn assert_backend_refuses(test: &str, case: &Case, backend: &str, needles: &[&str]) {
    let dir = Workdir::new(test);
    let (case_path, out_path) = (dir.path(CASE), dir.path(OUT));
    write_case(&case_path, &case.tensors(), None);
    let output = attend(&case_path, &out_path, &["--backend", backend]);
    assert_refused(test, &output, 1, needles, &out_path);
    assert_eq!(
        dir.files(),
        [CASE],
        "{test}: files left in the output directory"
    );
}

/// The run refused: exit code `code`, a plain stderr naming every one of `needles`, and no
/// file at `out_path`.
fn assert_refused(test: &str, output: &Output, code: i32, needles: &[&str], out_path: &Path) {
    let message = stderr(output);
    eprintln!("{test}: stderr: {message}");
    assert_eq!(
        output.status.code(),
        Some(code),
        "{test}: exit code; stderr:\n{message}"
    );
    assert_plain(test, &message);
    for needle in needles {
        assert!(
            message.contains(needle),
            "{test}: stderr does not mention {needle:?}:\n{message}"
        );
    }
    assert!(
        !out_path.exists(),
        "{test}: {} was written",
        out_path.display()
    );
}

fn decode_geometry() -> Geometry {
    Geometry {
        query_lens: vec![1, 1, 1],
        ..Geometry::default()
    }
}

#[test]
fn cuda_backend_refuses_f32_cases() {
    let test = "cuda_backend_refuses_f32_cases";
    let case = Case::random(&mut common::rng(test), decode_geometry(), Dtype::F32);
    assert_backend_refuses(test, &case, "cuda", &["F16 or all BF16", "F32"]);
}

/// With a GPU, the CUDA attention of a bf16 case (decode rows and a 4-token chunk) matches the
/// definition row by row ([`assert_kernel_rows`]); without one, the CLI says CUDA is unavailable
/// and writes nothing, and the test prints that its GPU half skipped (with
/// `PAGED_GQA_REQUIRE_GPU=1` it fails instead). The same check runs on every machine through
/// the emulator (`sim_backend_replays_a_case_through_the_kernels`).
#[test]
fn cuda_backend_attends_on_a_gpu_or_says_cuda_is_unavailable() {
    let test = "cuda_backend_attends_on_a_gpu_or_says_cuda_is_unavailable";
    let case = Case::random(&mut common::rng(test), Geometry::default(), Dtype::BF16);
    match common::gpu_or_skip(test) {
        None => assert_backend_refuses(test, &case, "cuda", &["CUDA is unavailable"]),
        Some(_) => {
            let dir = Workdir::new(test);
            let got = run_valid(test, &dir, &case, None, &["--backend", "cuda"]);
            assert_kernel_rows(test, &case, &got, case.default_scale());
            assert_eq!(dir.files(), [CASE, OUT], "{test}: files left");
        }
    }
}

/// The exact kernel code on the emulator, as an engine author replays a dumped case without a
/// GPU: bf16 and f16 cases (decode rows and a 4-token chunk) match the definition.
#[test]
fn sim_backend_replays_a_case_through_the_kernels() {
    let test = "sim_backend_replays_a_case_through_the_kernels";
    for dtype in [Dtype::BF16, Dtype::F16] {
        let case = Case::random(&mut common::rng(test), Geometry::default(), dtype);
        let dir = Workdir::new(test);
        let got = run_valid(test, &dir, &case, None, &["--backend", "sim"]);
        assert_kernel_rows(
            &format!("{test} {dtype:?}"),
            &case,
            &got,
            case.default_scale(),
        );
        assert_eq!(dir.files(), [CASE, OUT], "{test}: files left");
    }
}

/// The emulator takes the same cases as the GPU: f32 is refused with the same words.
#[test]
fn sim_backend_refuses_f32_cases() {
    let test = "sim_backend_refuses_f32_cases";
    let case = Case::random(&mut common::rng(test), decode_geometry(), Dtype::F32);
    assert_backend_refuses(test, &case, "sim", &["F16 or all BF16"]);
}

// ---------------------------------------------------------------------------------------------
// Malformed cases: exit 2, the offending tensor and numbers on stderr, no output.

/// Runs `case_path` (already written, or absent) and checks the rejection: exit code 2, every
/// one of `needles` in stderr, no output file (nor a partial one) in the directory.
fn assert_rejected_file(test: &str, dir: &Workdir, case_path: &Path, needles: &[&str]) {
    let out_path = dir.path(OUT);
    let before = dir.files();
    let output = attend(case_path, &out_path, &[]);
    assert_refused(test, &output, 2, needles, &out_path);
    assert_eq!(
        dir.files(),
        before,
        "{test}: the rejected run left files behind"
    );
}

/// Writes `tensors` and `metadata` as a case and checks it is rejected, naming `needles`.
fn assert_rejected(
    test: &str,
    tensors: &Tensors,
    metadata: Option<HashMap<String, String>>,
    needles: &[&str],
) {
    let dir = Workdir::new(test);
    let case_path = dir.path(CASE);
    write_case(&case_path, tensors, metadata);
    assert_rejected_file(test, &dir, &case_path, needles);
}

/// A random case built from `geometry` must be rejected, naming every needle.
fn assert_geometry_rejected(test: &str, geometry: Geometry, needles: &[&str]) {
    let case = case_of(test, geometry);
    assert_rejected(test, &case.tensors(), None, needles);
}

/// A valid random case of `g` in f32, for breaking.
fn case_of(test: &str, g: Geometry) -> Case {
    Case::random(&mut common::rng(test), g, Dtype::F32)
}

fn default_case(test: &str) -> Case {
    case_of(test, Geometry::default())
}

/// The tensors of the default case of `test`, broken by `breaks` (what it returns, a removed or
/// replaced tensor, is dropped), must be rejected, naming every needle.
fn assert_broken_rejected<R>(
    test: &str,
    breaks: impl FnOnce(&Case, &mut Tensors) -> R,
    needles: &[&str],
) {
    let case = default_case(test);
    let mut tensors = case.tensors();
    breaks(&case, &mut tensors);
    assert_rejected(test, &tensors, None, needles);
}

/// The default case of `test` with the metadata `scale` must be rejected, naming every needle.
fn assert_scale_rejected(test: &str, scale: &str, needles: &[&str]) {
    assert_rejected(
        test,
        &default_case(test).tensors(),
        scale_metadata(scale),
        needles,
    );
}

#[test]
fn missing_q_is_rejected() {
    let test = "missing_q_is_rejected";
    assert_broken_rejected(test, |_, t| t.remove("q"), &["`q`", "missing"]);
}

#[test]
fn missing_block_tables_is_rejected() {
    let test = "missing_block_tables_is_rejected";
    assert_broken_rejected(
        test,
        |_, t| t.remove("block_tables"),
        &["`block_tables`", "missing"],
    );
}

#[test]
fn q_of_rank_2_is_rejected() {
    let test = "q_of_rank_2_is_rejected";
    assert_broken_rejected(
        test,
        |case, t| {
            t.get_mut("q").unwrap().shape =
                vec![case.num_tokens(), case.g.n_heads * case.g.head_dim]
        },
        &["`q`", "rank 2", "[6, 512]"],
    );
}

#[test]
fn k_cache_of_rank_3_is_rejected() {
    let test = "k_cache_of_rank_3_is_rejected";
    assert_broken_rejected(
        test,
        |case, t| {
            let g = &case.g;
            t.get_mut("k_cache").unwrap().shape =
                vec![case.num_blocks * g.block_size, g.n_kv_heads, g.head_dim];
        },
        &["`k_cache`", "rank 3"],
    );
}

#[test]
fn v_cache_shape_differing_from_k_cache_is_rejected() {
    let test = "v_cache_shape_differing_from_k_cache_is_rejected";
    let case = default_case(test);
    let mut tensors = case.tensors();
    // The same elements in [num_blocks, n_kv_heads, block_size, head_dim]: a layout mix-up.
    let g = &case.g;
    let swapped = vec![case.num_blocks, g.n_kv_heads, g.block_size, g.head_dim];
    tensors.get_mut("v_cache").unwrap().shape = swapped.clone();
    let (v, k) = (format!("{swapped:?}"), format!("{:?}", case.cache_shape()));
    assert_rejected(test, &tensors, None, &["`v_cache`", "`k_cache`", &v, &k]);
}

#[test]
fn q_head_dim_differing_from_the_cache_is_rejected() {
    let test = "q_head_dim_differing_from_the_cache_is_rejected";
    assert_broken_rejected(
        test,
        |case, t| {
            // The same elements as [num_tokens, 2 * n_heads, head_dim / 2].
            t.get_mut("q").unwrap().shape = vec![case.num_tokens(), 16, 32];
        },
        &["`q`", "dimension 2", "32", "64"],
    );
}

#[test]
fn n_heads_not_a_multiple_of_n_kv_heads_is_rejected() {
    let test = "n_heads_not_a_multiple_of_n_kv_heads_is_rejected";
    assert_geometry_rejected(
        test,
        Geometry {
            n_heads: 6,
            n_kv_heads: 4,
            ..Geometry::default()
        },
        &["q", "k_cache", "n_heads 6", "n_kv_heads 4"],
    );
}

#[test]
fn head_dim_not_a_multiple_of_8_is_rejected() {
    let test = "head_dim_not_a_multiple_of_8_is_rejected";
    assert_geometry_rejected(
        test,
        Geometry {
            head_dim: 12,
            ..Geometry::default()
        },
        &["head_dim 12", "multiple of 8"],
    );
}

#[test]
fn block_tables_of_dtype_f32_is_rejected() {
    let test = "block_tables_of_dtype_f32_is_rejected";
    assert_broken_rejected(
        test,
        |case, t| {
            let values: Vec<f32> = case.block_tables.iter().map(|&b| b as f32).collect();
            t.insert(
                "block_tables".into(),
                Raw::f32(vec![case.batch(), case.max_blocks], &values),
            )
        },
        &["`block_tables`", "F32", "I32"],
    );
}

#[test]
fn block_tables_of_dtype_i64_is_rejected() {
    let test = "block_tables_of_dtype_i64_is_rejected";
    assert_broken_rejected(
        test,
        |case, t| {
            let values: Vec<i64> = case.block_tables.iter().map(|&b| b.into()).collect();
            t.insert(
                "block_tables".into(),
                Raw::i64(vec![case.batch(), case.max_blocks], &values),
            )
        },
        &["`block_tables`", "I64", "I32"],
    );
}

#[test]
fn q_of_an_int_dtype_is_rejected() {
    let test = "q_of_an_int_dtype_is_rejected";
    // I32: the same byte count as the f32 values.
    assert_broken_rejected(
        test,
        |_, t| t.get_mut("q").unwrap().dtype = Dtype::I32,
        &["`q`", "I32"],
    );
}

#[test]
fn context_lens_length_differing_from_the_batch_is_rejected() {
    let test = "context_lens_length_differing_from_the_batch_is_rejected";
    assert_broken_rejected(
        test,
        |case, t| {
            t.insert(
                "context_lens".into(),
                Raw::i32(vec![2], &case.g.context_lens[..2]),
            )
        },
        &["`context_lens`", "is 2", "expected 3"],
    );
}

#[test]
fn query_lens_length_differing_from_the_batch_is_rejected() {
    let test = "query_lens_length_differing_from_the_batch_is_rejected";
    assert_broken_rejected(
        test,
        |_, t| t.insert("query_lens".into(), Raw::i32(vec![4], &[1, 1, 4, 0])),
        &["`query_lens`", "is 4", "expected 3"],
    );
}

#[test]
fn negative_context_len_is_rejected() {
    let test = "negative_context_len_is_rejected";
    assert_geometry_rejected(
        test,
        Geometry {
            context_lens: vec![1, -16, 37],
            query_lens: vec![1, 0, 4],
            ..Default::default()
        },
        &["context_lens[1]", "-16", "negative"],
    );
}

#[test]
fn negative_query_len_is_rejected() {
    let test = "negative_query_len_is_rejected";
    assert_geometry_rejected(
        test,
        Geometry {
            query_lens: vec![1, -1, 4],
            ..Default::default()
        },
        &["query_lens[1]", "-1", "negative"],
    );
}

#[test]
fn query_len_greater_than_context_len_is_rejected() {
    let test = "query_len_greater_than_context_len_is_rejected";
    // q has 1 + 1 + 4 + 1 rows to match: only query_len > context_len is wrong.
    assert_geometry_rejected(
        test,
        Geometry {
            query_lens: vec![2, 1, 4],
            ..Default::default()
        },
        &["query_lens[0] = 2", "context_lens[0] = 1"],
    );
}

#[test]
fn sum_of_query_lens_differing_from_q_tokens_is_rejected() {
    let test = "sum_of_query_lens_differing_from_q_tokens_is_rejected";
    assert_broken_rejected(
        test,
        // q has 6 rows
        |_, t| t.insert("query_lens".into(), Raw::i32(vec![3], &[1, 1, 3])),
        &["`q`", "dimension 0", "is 6", "expected 5", "query_lens"],
    );
}

#[test]
fn block_id_out_of_range_is_rejected() {
    let test = "block_id_out_of_range_is_rejected";
    let mut case = default_case(test);
    let num_blocks = case.num_blocks as i32;
    case.block_tables[case.max_blocks] = num_blocks; // sequence 1, its only page
    let id = format!("= {num_blocks}");
    let limit = format!("num_blocks {num_blocks}");
    assert_rejected(
        test,
        &case.tensors(),
        None,
        &["block_tables[1][0]", &id, &limit],
    );
}

#[test]
fn negative_block_id_in_the_used_part_is_rejected() {
    let test = "negative_block_id_in_the_used_part_is_rejected";
    let mut case = default_case(test);
    case.block_tables[2 * case.max_blocks + 1] = -1; // sequence 2 (37 tokens) uses 3 pages
    assert_rejected(test, &case.tensors(), None, &["block_tables[2][1]", "-1"]);
}

#[test]
fn context_longer_than_its_block_table_is_rejected() {
    let test = "context_longer_than_its_block_table_is_rejected";
    // context_lens [1, 16, 37]: 3 pages of 16 for the last.
    assert_broken_rejected(
        test,
        |case, t| {
            let two_columns: Vec<i32> = case
                .block_tables
                .chunks(case.max_blocks)
                .flat_map(|row| row[..2].to_vec())
                .collect();
            t.insert(
                "block_tables".into(),
                Raw::i32(vec![case.batch(), 2], &two_columns),
            )
        },
        &[
            "block_tables",
            "context_lens[2] = 37",
            "3 blocks",
            "2 columns",
        ],
    );
}

#[test]
fn non_numeric_scale_is_rejected() {
    assert_scale_rejected(
        "non_numeric_scale_is_rejected",
        "abc",
        &["`scale`", "\"abc\""],
    );
}

#[test]
fn infinite_scale_is_rejected() {
    assert_scale_rejected(
        "infinite_scale_is_rejected",
        "inf",
        &["`scale`", "\"inf\"", "finite"],
    );
}

#[test]
fn nan_scale_is_rejected() {
    assert_scale_rejected(
        "nan_scale_is_rejected",
        "NaN",
        &["`scale`", "\"NaN\"", "finite"],
    );
}

#[test]
fn a_file_that_is_not_safetensors_is_rejected() {
    use rand::RngCore;
    let test = "a_file_that_is_not_safetensors_is_rejected";
    let mut bytes = vec![0u8; 4096];
    common::rng(test).fill_bytes(&mut bytes);
    let dir = Workdir::new(test);
    let case_path = dir.path(CASE);
    std::fs::write(&case_path, &bytes).unwrap();
    assert_rejected_file(test, &dir, &case_path, &["not a safetensors file"]);
}

#[test]
fn a_nonexistent_case_path_is_rejected() {
    let test = "a_nonexistent_case_path_is_rejected";
    let dir = Workdir::new(test);
    let case_path = dir.path("no-such-case.safetensors");
    assert_rejected_file(
        test,
        &dir,
        &case_path,
        &["cannot read case", "no-such-case.safetensors"],
    );
}

// ---------------------------------------------------------------------------------------------
// fp8 caches: k_cache and v_cache in F8_E4M3 or F8_E5M2, with F32 k_scale and v_scale
// [n_kv_heads].

/// A case's K/V as an fp8 file stores them: bits from the float8 crate (CUDA's saturating
/// conversion) of `value / scale`, and the scales.
struct Fp8 {
    dtype: Dtype,
    k_bits: Vec<u8>,
    v_bits: Vec<u8>,
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
}

/// `x` in `dtype`'s fp8 format (float8's saturating conversion), and the value the bits hold.
fn fp8_encode(dtype: Dtype, x: f32) -> (u8, f64) {
    match dtype {
        Dtype::F8_E4M3 => {
            let v = float8::F8E4M3::from_f32(x);
            (v.to_bits(), v.to_f32() as f64)
        }
        Dtype::F8_E5M2 => {
            let v = float8::F8E5M2::from_f32(x);
            (v.to_bits(), v.to_f32() as f64)
        }
        other => panic!("not an fp8 dtype: {other:?}"),
    }
}

/// A random case whose K/V are stored in `fp8` under per-head scales (K/V head `h`:
/// `(h + 1) / 448` for K, `(h + 2) / 896` for V): the case's k_cache and v_cache become the
/// values the bits stand for (stored value times scale, in f64), what the definition reads.
fn fp8_case(test: &str, q_dtype: Dtype, fp8: Dtype) -> (Case, Fp8) {
    let mut case = Case::random(&mut common::rng(test), Geometry::default(), q_dtype);
    let (n_kv, d) = (case.g.n_kv_heads, case.g.head_dim);
    let k_scale: Vec<f32> = (0..n_kv).map(|h| (h + 1) as f32 / 448.0).collect();
    let v_scale: Vec<f32> = (0..n_kv).map(|h| (h + 2) as f32 / 896.0).collect();
    let quantize = |values: &mut Vec<f64>, scales: &[f32]| -> Vec<u8> {
        values
            .iter_mut()
            .enumerate()
            .map(|(i, x)| {
                let scale = scales[(i / d) % n_kv];
                let (bits, stored) = fp8_encode(fp8, *x as f32 / scale);
                *x = stored * scale as f64;
                bits
            })
            .collect()
    };
    let k_bits = quantize(&mut case.k_cache, &k_scale);
    let v_bits = quantize(&mut case.v_cache, &v_scale);
    let fp8 = Fp8 {
        dtype: fp8,
        k_bits,
        v_bits,
        k_scale,
        v_scale,
    };
    (case, fp8)
}

/// The contract's tensors of an fp8 case: the caches as bits, and the two scale tensors.
fn fp8_tensors(case: &Case, fp8: &Fp8) -> Tensors {
    let mut tensors = case.tensors();
    for (name, bits) in [("k_cache", &fp8.k_bits), ("v_cache", &fp8.v_bits)] {
        tensors.insert(
            name.into(),
            Raw {
                dtype: fp8.dtype,
                shape: case.cache_shape(),
                data: bits.clone(),
            },
        );
    }
    let n_kv = case.g.n_kv_heads;
    tensors.insert("k_scale".into(), Raw::f32(vec![n_kv], &fp8.k_scale));
    tensors.insert("v_scale".into(), Raw::f32(vec![n_kv], &fp8.v_scale));
    tensors
}

/// Writes an fp8 case, runs `extra`, checks success; returns OUT.
fn run_fp8(
    test: &str,
    dir: &Workdir,
    case: &Case,
    fp8: &Fp8,
    extra: &[&str],
) -> (Vec<f64>, Vec<f64>) {
    run_tensors(test, dir, case, &fp8_tensors(case, fp8), None, extra)
}

/// f32, f16 and bf16 queries over e4m3 and e5m2 caches: the CPU backend matches the definition
/// over the dequantized values.
#[test]
fn fp8_cases_match_the_definition_over_the_dequantized_values() {
    let test = "fp8_cases_match_the_definition_over_the_dequantized_values";
    for fp8 in [Dtype::F8_E4M3, Dtype::F8_E5M2] {
        for q_dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let (case, stored) = fp8_case(test, q_dtype, fp8);
            let dir = Workdir::new(test);
            let got = run_fp8(test, &dir, &case, &stored, &[]);
            assert_matches(
                &format!("{test} {q_dtype:?} over {fp8:?}"),
                &got,
                &reference(&case, case.default_scale()),
            );
        }
    }
}

/// The emulated kernels replay fp8 cases (bf16 queries over e4m3, f16 over e5m2).
#[test]
fn sim_backend_replays_fp8_cases_through_the_kernels() {
    let test = "sim_backend_replays_fp8_cases_through_the_kernels";
    for (q_dtype, fp8) in [(Dtype::BF16, Dtype::F8_E4M3), (Dtype::F16, Dtype::F8_E5M2)] {
        let (case, stored) = fp8_case(test, q_dtype, fp8);
        let dir = Workdir::new(test);
        let got = run_fp8(test, &dir, &case, &stored, &["--backend", "sim"]);
        assert_kernel_rows(
            &format!("{test} {q_dtype:?} over {fp8:?}"),
            &case,
            &got,
            case.default_scale(),
        );
    }
}

/// Malformed fp8 combinations: exit 2 naming the tensor.
#[test]
fn malformed_fp8_cases_are_rejected_naming_the_tensor() {
    let test = "malformed_fp8_cases_are_rejected_naming_the_tensor";
    let (case, fp8) = fp8_case(test, Dtype::BF16, Dtype::F8_E4M3);
    let good = fp8_tensors(&case, &fp8);
    type Break = fn(&mut Tensors);
    let cases: [(&str, Break, &[&str]); 10] = [
        (
            "no k_scale",
            |t| {
                t.remove("k_scale");
            },
            &["`k_scale`", "missing", "[n_kv_heads]"],
        ),
        (
            "no v_scale",
            |t| {
                t.remove("v_scale");
            },
            &["`v_scale`", "missing"],
        ),
        (
            "k_scale of 3 heads",
            |t| {
                *t.get_mut("k_scale").unwrap() = Raw::f32(vec![3], &[0.1, 0.1, 0.1]);
            },
            &["`k_scale`", "dimension 0 is 3, expected 2"],
        ),
        (
            "k_scale of rank 2",
            |t| {
                *t.get_mut("k_scale").unwrap() = Raw::f32(vec![1, 2], &[0.1, 0.1]);
            },
            &["`k_scale`", "rank 2"],
        ),
        (
            "v_scale in F16",
            |t| {
                *t.get_mut("v_scale").unwrap() = Raw::float(Dtype::F16, vec![2], &[0.1, 0.1]);
            },
            &["`v_scale`", "F16", "expected F32"],
        ),
        (
            "a zero v_scale",
            |t| {
                *t.get_mut("v_scale").unwrap() = Raw::f32(vec![2], &[0.1, 0.0]);
            },
            &["`v_scale`", "v_scale[1] = 0"],
        ),
        (
            "a NaN k_scale",
            |t| {
                *t.get_mut("k_scale").unwrap() = Raw::f32(vec![2], &[f32::NAN, 0.1]);
            },
            &["`k_scale`", "k_scale[0] = NaN"],
        ),
        (
            "e4m3 K, e5m2 V",
            |t| {
                t.get_mut("v_cache").unwrap().dtype = Dtype::F8_E5M2;
            },
            &["`v_cache`", "F8_E5M2", "`k_cache` has F8_E4M3"],
        ),
        (
            "bf16 K, e4m3 V",
            |t| {
                let v = t["v_cache"].clone();
                let k = t.get_mut("k_cache").unwrap();
                *k = Raw::float(Dtype::BF16, v.shape.clone(), &vec![0.5; v.data.len()]);
            },
            &["`k_cache`", "BF16", "`v_cache` has F8_E4M3"],
        ),
        (
            "q in fp8",
            |t| {
                let q = t.get_mut("q").unwrap();
                q.dtype = Dtype::F8_E4M3;
                q.data.truncate(q.data.len() / 2);
            },
            &["`q`", "F8_E4M3", "expected F32, F16 or BF16"],
        ),
    ];
    for (what, breaks, needles) in cases {
        let mut tensors = good.clone();
        breaks(&mut tensors);
        assert_rejected(&format!("{test}: {what}"), &tensors, None, needles);
    }
    // Scales beside 16-bit caches are a mistake too.
    let mut tensors = case.tensors();
    tensors.insert("k_scale".into(), Raw::f32(vec![2], &[0.1, 0.1]));
    assert_rejected(
        test,
        &tensors,
        None,
        &["`k_scale`", "F8_E4M3 or F8_E5M2 caches only"],
    );
}
