//! Reads and validates a replay case (the `attend` contract).

use std::collections::HashMap;
use std::path::Path;

use paged_gqa::fp8::{self, KvScales};
use paged_gqa::{AttendOptions, DType, GqaShape, PagedLayout, SeqLens};
use safetensors::{Dtype, SafeTensors};

/// A validated case, floats widened to f64 exactly.
pub struct Case {
    pub layout: PagedLayout,
    pub lens: SeqLens,
    /// [num_tokens, n_heads, head_dim]
    pub q: Vec<f64>,
    /// [num_blocks, block_size, n_kv_heads, head_dim]: the values (fp8 caches: stored value
    /// times its head's scale, exactly)
    pub k_cache: Vec<f64>,
    /// [num_blocks, block_size, n_kv_heads, head_dim]: as `k_cache`
    pub v_cache: Vec<f64>,
    /// [batch, max_blocks]
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    /// The attention variants: `scale`, `window_left`, `logit_softcap` and `causal` from the
    /// metadata, `sinks` and `alibi_slopes` from F32 tensors.
    pub options: AttendOptions,
    /// The element type of `q`, `k_cache` and `v_cache` when they share one; with fp8 caches,
    /// `q`'s.
    pub dtype: Option<DType>,
    /// fp8 caches (`F8_E4M3` or `F8_E5M2`): their stored bits and scales.
    pub fp8: Option<Fp8Cache>,
}

/// The K and V caches of an fp8 case as the file stores them.
pub struct Fp8Cache {
    /// `DType::F8E4M3` or `DType::F8E5M2`
    pub dtype: DType,
    /// [num_blocks, block_size, n_kv_heads, head_dim]
    pub k_bits: Vec<u8>,
    /// [num_blocks, block_size, n_kv_heads, head_dim]
    pub v_bits: Vec<u8>,
    /// `k_scale`, `v_scale`: F32 [n_kv_heads] each
    pub scales: KvScales,
}

fn tensor<'a>(
    st: &'a SafeTensors<'a>,
    name: &str,
) -> Result<safetensors::tensor::TensorView<'a>, String> {
    st.tensor(name)
        .map_err(|_| format!("tensor `{name}` is missing"))
}

fn check_rank(name: &str, shape: &[usize], rank: usize, layout: &str) -> Result<(), String> {
    if shape.len() != rank {
        return Err(format!(
            "tensor `{name}` has rank {} (shape {shape:?}), expected {rank}: {layout}",
            shape.len()
        ));
    }
    Ok(())
}

fn check_dim(
    name: &str,
    axis: usize,
    actual: usize,
    expected: usize,
    why: &str,
) -> Result<(), String> {
    if actual != expected {
        return Err(format!(
            "tensor `{name}` dimension {axis} is {actual}, expected {expected} ({why})"
        ));
    }
    Ok(())
}

/// A float tensor (f32, f16 or bf16) of the given rank, widened to f64.
fn floats(
    st: &SafeTensors,
    name: &str,
    rank: usize,
    layout: &str,
) -> Result<(Vec<usize>, Vec<f64>), String> {
    let view = tensor(st, name)?;
    check_rank(name, view.shape(), rank, layout)?;
    let bytes = view.data();
    let values = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
        other => {
            return Err(format!(
                "tensor `{name}` has dtype {other:?}, expected F32, F16 or BF16"
            ))
        }
    };
    Ok((view.shape().to_vec(), values))
}

/// The page dtype of an fp8 safetensors dtype.
fn fp8_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F8_E4M3 => Some(DType::F8E4M3),
        Dtype::F8_E5M2 => Some(DType::F8E5M2),
        _ => None,
    }
}

/// A cache tensor stored in fp8, of the given rank: its bytes.
fn fp8_bits(st: &SafeTensors, name: &str, rank: usize, layout: &str) -> Result<Vec<u8>, String> {
    let view = tensor(st, name)?;
    check_rank(name, view.shape(), rank, layout)?;
    Ok(view.data().to_vec())
}

/// `k_scale` or `v_scale`: F32 `[n_kv_heads]` (required with fp8 caches).
fn scale_tensor(st: &SafeTensors, name: &str, n_kv_heads: usize) -> Result<Vec<f32>, String> {
    let view = st.tensor(name).map_err(|_| {
        format!(
            "tensor `{name}` is missing: fp8 caches need k_scale and v_scale, F32 [n_kv_heads] \
             ({n_kv_heads} here)"
        )
    })?;
    check_rank(name, view.shape(), 1, "[n_kv_heads]")?;
    check_dim(
        name,
        0,
        view.shape()[0],
        n_kv_heads,
        "n_kv_heads, from k_cache",
    )?;
    if view.dtype() != Dtype::F32 {
        return Err(format!(
            "tensor `{name}` has dtype {:?}, expected F32",
            view.dtype()
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect())
}

/// The values `bits` stand for under `scales` (`[n_kv_heads]`; rows of `head_dim` cycle over
/// the heads): stored value times scale, exact in f64.
fn dequantized(format: fp8::Fp8Format, bits: &[u8], scales: &[f32], head_dim: usize) -> Vec<f64> {
    bits.iter()
        .enumerate()
        .map(|(i, &b)| {
            f64::from(fp8::decode(format, b)) * f64::from(scales[(i / head_dim) % scales.len()])
        })
        .collect()
}

/// An i32 tensor of the given rank.
fn ints(
    st: &SafeTensors,
    name: &str,
    rank: usize,
    layout: &str,
) -> Result<(Vec<usize>, Vec<i32>), String> {
    let view = tensor(st, name)?;
    check_rank(name, view.shape(), rank, layout)?;
    if view.dtype() != Dtype::I32 {
        return Err(format!(
            "tensor `{name}` has dtype {:?}, expected I32",
            view.dtype()
        ));
    }
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Ok((view.shape().to_vec(), values))
}

/// The value of metadata key `key`, parsed by `parse`; `what` says what it must be.
fn meta<T>(
    metadata: Option<&HashMap<String, String>>,
    key: &str,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    let Some(text) = metadata.and_then(|m| m.get(key)) else {
        return Ok(None);
    };
    parse(text.trim())
        .map(Some)
        .ok_or_else(|| format!("metadata `{key}` = {text:?} is not {what}"))
}

/// The variants of the metadata: `scale`, `window_left`, `logit_softcap`, `causal`.
fn metadata_options(metadata: Option<&HashMap<String, String>>) -> Result<AttendOptions, String> {
    let scale = meta(metadata, "scale", "a finite number", |t| {
        t.parse::<f64>().ok().filter(|x| x.is_finite())
    })?;
    let window_left = meta(
        metadata,
        "window_left",
        "an integer >= -1 (-1: no window)",
        |t| t.parse::<i32>().ok().filter(|&w| w >= -1),
    )?;
    let softcap = meta(
        metadata,
        "logit_softcap",
        "a finite number >= 0 (0: off)",
        |t| t.parse::<f32>().ok().filter(|c| c.is_finite() && *c >= 0.0),
    )?;
    let causal = meta(metadata, "causal", "`true` or `false`", |t| match t {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    })?;
    Ok(AttendOptions::new()
        .with_scale_opt(scale)
        .with_window_left(window_left.unwrap_or(-1))
        .with_logit_softcap(softcap.unwrap_or(0.0))
        .with_causal(causal.unwrap_or(true)))
}

/// An optional F32 tensor `[n_heads]` (sinks, ALiBi slopes) of finite values (`-inf` allowed
/// where `allow_neg_inf`).
fn head_values(
    st: &SafeTensors,
    name: &str,
    n_heads: usize,
    allow_neg_inf: bool,
) -> Result<Option<Vec<f32>>, String> {
    let Ok(view) = st.tensor(name) else {
        return Ok(None);
    };
    check_rank(name, view.shape(), 1, "[n_heads]")?;
    check_dim(name, 0, view.shape()[0], n_heads, "n_heads, from q")?;
    if view.dtype() != Dtype::F32 {
        return Err(format!(
            "tensor `{name}` has dtype {:?}, expected F32",
            view.dtype()
        ));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    if let Some((head, x)) = values
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() || (allow_neg_inf && **x == f32::NEG_INFINITY)))
    {
        return Err(format!(
            "tensor `{name}` has {x} at head {head}: not allowed"
        ));
    }
    Ok(Some(values))
}

/// Parses and validates the bytes of a case file.
pub fn parse(bytes: &[u8]) -> Result<Case, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let (_, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut options = metadata_options(metadata.metadata().as_ref())?;

    let float_dtypes: Vec<Dtype> = ["q", "k_cache", "v_cache"]
        .iter()
        .filter_map(|name| st.tensor(name).ok().map(|t| t.dtype()))
        .collect();
    let mut dtype = match float_dtypes[..] {
        [Dtype::F32, Dtype::F32, Dtype::F32] => Some(DType::F32),
        [Dtype::F16, Dtype::F16, Dtype::F16] => Some(DType::F16),
        [Dtype::BF16, Dtype::BF16, Dtype::BF16] => Some(DType::BF16),
        _ => None,
    };
    let (q_shape, q) = floats(&st, "q", 3, "[num_tokens, n_heads, head_dim]")?;
    let cache_layout = "[num_blocks, block_size, n_kv_heads, head_dim]";
    // fp8 caches: both of one fp8 type, read as bits here, dequantized once the scales are in.
    let k_dtype = tensor(&st, "k_cache")?.dtype();
    let v_dtype = tensor(&st, "v_cache")?.dtype();
    let page_dtype = fp8_dtype(k_dtype).or(fp8_dtype(v_dtype));
    if page_dtype.is_some() && k_dtype != v_dtype {
        let (odd, other) = if fp8_dtype(k_dtype).is_some() {
            ("v_cache", "k_cache")
        } else {
            ("k_cache", "v_cache")
        };
        let (odd_dtype, other_dtype) = if odd == "v_cache" {
            (v_dtype, k_dtype)
        } else {
            (k_dtype, v_dtype)
        };
        return Err(format!(
            "tensor `{odd}` has dtype {odd_dtype:?}, `{other}` has {other_dtype:?}: fp8 caches \
             must both be F8_E4M3 or both F8_E5M2"
        ));
    }
    let (k_shape, mut k_cache, v_shape, mut v_cache, bits) = if page_dtype.is_some() {
        let k_bits = fp8_bits(&st, "k_cache", 4, cache_layout)?;
        let v_bits = fp8_bits(&st, "v_cache", 4, cache_layout)?;
        let shape = |name| tensor(&st, name).map(|t| t.shape().to_vec());
        (
            shape("k_cache")?,
            Vec::new(),
            shape("v_cache")?,
            Vec::new(),
            Some((k_bits, v_bits)),
        )
    } else {
        let (k_shape, k_cache) = floats(&st, "k_cache", 4, cache_layout)?;
        let (v_shape, v_cache) = floats(&st, "v_cache", 4, cache_layout)?;
        (k_shape, k_cache, v_shape, v_cache, None)
    };
    let (bt_shape, block_tables) = ints(&st, "block_tables", 2, "[batch, max_blocks]")?;
    let (cl_shape, context_lens) = ints(&st, "context_lens", 1, "[batch]")?;
    let (ql_shape, query_lens) = ints(&st, "query_lens", 1, "[batch]")?;

    if v_shape != k_shape {
        return Err(format!(
            "tensor `v_cache` has shape {v_shape:?}, `k_cache` has {k_shape:?}: they must match"
        ));
    }
    let [num_blocks, block_size, n_kv_heads, head_dim] = k_shape[..] else {
        unreachable!()
    };
    check_dim("q", 2, q_shape[2], head_dim, "head_dim of k_cache")?;
    let shape = GqaShape::new(q_shape[1], n_kv_heads, head_dim)
        .map_err(|e| {
        format!("tensor `q` {q_shape:?} [num_tokens, n_heads, head_dim] with `k_cache` {k_shape:?}: {e}")
    })?;
    let layout =
        PagedLayout::new(shape, num_blocks, block_size).map_err(|e| format!("k_cache: {e}"))?;
    let fp8 = match (page_dtype, bits) {
        (Some(page_dtype), Some((k_bits, v_bits))) => {
            let format = paged_gqa::fp8::Fp8Format::of(page_dtype).expect("an fp8 page dtype");
            let k = scale_tensor(&st, "k_scale", n_kv_heads)?;
            let v = scale_tensor(&st, "v_scale", n_kv_heads)?;
            let scales = KvScales::new(k, v).map_err(|e| {
                let name = if e.to_string().starts_with("k_scale") {
                    "k_scale"
                } else {
                    "v_scale"
                };
                format!("tensor `{name}`: {e}")
            })?;
            k_cache = dequantized(format, &k_bits, scales.k(), head_dim);
            v_cache = dequantized(format, &v_bits, scales.v(), head_dim);
            // The kernels take q's type over fp8 pages.
            dtype = match q_dtype(&st)? {
                Dtype::F32 => Some(DType::F32),
                Dtype::F16 => Some(DType::F16),
                Dtype::BF16 => Some(DType::BF16),
                _ => None,
            };
            Some(Fp8Cache {
                dtype: page_dtype,
                k_bits,
                v_bits,
                scales,
            })
        }
        _ => {
            for name in ["k_scale", "v_scale"] {
                if st.tensor(name).is_ok() {
                    return Err(format!(
                        "tensor `{name}` is given, but the caches are {k_dtype:?}: k_scale and \
                         v_scale go with F8_E4M3 or F8_E5M2 caches only"
                    ));
                }
            }
            None
        }
    };

    let batch = bt_shape[0];
    check_dim(
        "context_lens",
        0,
        cl_shape[0],
        batch,
        "batch, from block_tables",
    )?;
    check_dim(
        "query_lens",
        0,
        ql_shape[0],
        batch,
        "batch, from block_tables",
    )?;
    let lens = SeqLens::from_i32(&context_lens, &query_lens).map_err(|e| e.to_string())?;
    check_dim(
        "q",
        0,
        q_shape[0],
        lens.num_tokens(),
        "num_tokens = sum of query_lens",
    )?;
    let max_blocks = bt_shape[1];
    // Validates the block tables against the cache and the lengths.
    let tables = paged_gqa::BlockTables::new(&block_tables, max_blocks, &layout, &lens)
        .map_err(|e| e.to_string())?;
    if let Some(sinks) = head_values(&st, "sinks", shape.n_heads(), true)? {
        options = options.with_sinks(sinks);
    }
    if let Some(slopes) = head_values(&st, "alibi_slopes", shape.n_heads(), false)? {
        options = options.with_alibi_slopes(slopes);
    }
    options.validate(shape).map_err(|e| e.to_string())?;
    tables
        .check_visible(&lens, options.mask())
        .map_err(|e| format!("block_tables: {e}"))?;

    Ok(Case {
        dtype,
        fp8,
        layout,
        lens,
        q,
        k_cache,
        v_cache,
        block_tables,
        max_blocks,
        options,
    })
}

/// The dtype of `q`.
fn q_dtype(st: &SafeTensors) -> Result<Dtype, String> {
    Ok(tensor(st, "q")?.dtype())
}

/// Reads and validates a case file.
pub fn load(path: &Path) -> Result<Case, crate::Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| crate::Failure::input(format!("cannot read case {}: {e}", path.display())))?;
    parse(&bytes).map_err(|e| crate::Failure::input(format!("{}: {e}", path.display())))
}
