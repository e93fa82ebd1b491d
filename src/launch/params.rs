//! The C launchers' parameter structs, built in one place for every backend, with the checks
//! that must hold before any of them reaches a kernel.

use crate::batch::SeqLens;
use crate::cache::{BlockTables, CacheConfig, PagedLayout};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ffi;
use crate::plan::{AttendSchedule, Splits};
use crate::shape::GqaShape;
use crate::variants::AttendOptions;

/// Head sizes the attention kernels are built for.
pub const ATTEND_HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// Bytes of 16-byte vector alignment every kernel's tensors need.
pub(crate) const VECTOR_BYTES: u64 = 16;

/// A size the C contract carries as `int32_t`, checked.
pub(crate) fn to_i32(what: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::TooLarge {
        what,
        value: value as u128,
        limit: i32::MAX as u128,
    })
}

/// The kernels' limits on a cache of `num_blocks` pages per tensor under `config`, on every
/// device (a cache made on the CPU works on the GPU): block ids are `int32_t`, and the block
/// copy runs one grid row per (layer, K or V) tensor, whose grid y is at most 65535.
pub(crate) fn check_cache_limits(config: &CacheConfig, num_blocks: usize) -> Result<()> {
    to_i32("num_blocks", num_blocks)?;
    Error::check_at_most("2 * num_layers", 2 * config.num_layers() as u128, 65535)
}

/// Checks that a device address can take 16-byte vector accesses.
pub(crate) fn check_aligned(name: &'static str, address: u64) -> Result<()> {
    if address % VECTOR_BYTES != 0 {
        return Err(Error::Misaligned { name, address });
    }
    Ok(())
}

/// The C enum value of a dtype.
pub(crate) fn dtype(dtype: DType) -> ffi::pgqa_dtype {
    match dtype {
        DType::F32 => ffi::pgqa_dtype::PGQA_DTYPE_F32,
        DType::F16 => ffi::pgqa_dtype::PGQA_DTYPE_F16,
        DType::BF16 => ffi::pgqa_dtype::PGQA_DTYPE_BF16,
        DType::F8E4M3 => ffi::pgqa_dtype::PGQA_DTYPE_F8_E4M3,
        DType::F8E5M2 => ffi::pgqa_dtype::PGQA_DTYPE_F8_E5M2,
    }
}

/// Checks that the attention kernel exists for this shape and element type.
pub(crate) fn check_supported(kernel: &'static str, shape: GqaShape, dtype: DType) -> Result<()> {
    if !ATTEND_HEAD_DIMS.contains(&shape.head_dim()) {
        return Err(Error::UnsupportedHeadDim {
            kernel,
            head_dim: shape.head_dim(),
            supported: "64, 80, 96, 128, 256",
        });
    }
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDType { kernel, dtype });
    }
    Ok(())
}

/// Checks that the attention kernels read pages of `page_dtype` under queries of `dtype`: the
/// same type, or fp8.
pub(crate) fn check_page_dtype(dtype: DType, page_dtype: DType) -> Result<()> {
    if page_dtype != dtype && !page_dtype.is_fp8() {
        return Err(Error::InvalidPageDType { dtype, page_dtype });
    }
    Ok(())
}

/// The checks every caller-managed batch starts with: block tables valid for the layout and
/// lengths, a kernel for this shape and dtype.
/// Returns the leading reclaimed (`-1`) pages of each sequence, `[batch]`.
pub(crate) fn check_tables(
    kernel: &'static str,
    layout: &PagedLayout,
    dtype: DType,
    lens: &SeqLens,
    block_tables: &[i32],
    max_blocks: usize,
) -> Result<Vec<usize>> {
    let tables = BlockTables::new(block_tables, max_blocks, layout, lens)?;
    check_supported(kernel, layout.shape(), dtype)?;
    Ok(tables.reclaimed().to_vec())
}

/// `query_starts` `[batch + 1]` as the kernel reads them.
pub(crate) fn query_starts(lens: &SeqLens) -> Vec<i32> {
    (0..lens.batch())
        .map(|s| lens.query_rows(s).start as i32)
        .chain([lens.num_tokens() as i32])
        .collect()
}

/// A launch's tables, already validated: the schedule and the device addresses of the tables
/// and the split workspace.
pub(crate) struct AttendTables<'a> {
    pub layout: PagedLayout,
    pub lens: &'a SeqLens,
    /// [batch]: leading reclaimed (-1) pages of each sequence's table row
    pub reclaimed: &'a [usize],
    pub max_blocks: usize,
    pub schedule: &'a AttendSchedule,
    /// [batch, max_blocks] i32
    pub block_tables: u64,
    /// [batch] i32
    pub context_lens: u64,
    /// [batch + 1] i32
    pub query_starts: u64,
    /// [num_work, 2] i32: the CUDA-core kernel's work items
    pub work: u64,
    /// [num_mma_work, 2] i32: the tensor-core kernel's work items (wide layout)
    pub mma_work: u64,
    /// [num_narrow_work, 2] i32: the tensor-core kernel's work items (narrow layout)
    pub narrow_work: u64,
    /// [num_tokens, n_heads, num_splits, head_dim] f32 then [num_tokens, n_heads, num_splits] f32
    pub split_workspace: u64,
}

/// The engine's tensors of one attention call: device addresses and element counts.
pub(crate) struct AttendTensors {
    /// one layer's [num_blocks, block_size, n_kv_heads, head_dim] of `kv_dtype`
    pub k_cache: u64,
    pub v_cache: u64,
    /// The caches' element type: the query dtype, or fp8.
    pub kv_dtype: DType,
    /// [n_kv_heads] f32 each for fp8 caches (0 otherwise)
    pub k_scale: u64,
    pub v_scale: u64,
    /// [num_tokens, n_heads, head_dim]: address, elements
    pub q: (u64, usize),
    pub out: (u64, usize),
    /// [num_tokens, n_heads]
    pub lse: (u64, usize),
}

/// The attention variants of one launch as the kernels take them: validated options, the
/// splits for their key mask, and the device addresses of the sinks and slopes (0: none).
pub(crate) struct LaunchVariants {
    pub scale: f32,
    pub causal: bool,
    pub window_left: i32,
    pub logit_softcap: f32,
    /// [n_heads] f32, or 0
    pub sinks: u64,
    /// [n_heads] f32, or 0
    pub alibi_slopes: u64,
    pub splits: Splits,
}

impl LaunchVariants {
    /// `options` (validated against `shape` by the caller) with the sinks and slopes at the
    /// given device addresses (0 where the options have none).
    pub fn new(
        options: &AttendOptions,
        shape: GqaShape,
        splits: Splits,
        sinks: u64,
        alibi_slopes: u64,
    ) -> Result<Self> {
        let scale = options.scale_for(shape) as f32;
        if !scale.is_finite() {
            return Err(Error::InvalidScale {
                scale: options.scale_for(shape),
            });
        }
        Ok(Self {
            scale,
            causal: options.causal(),
            window_left: options.window_left(),
            logit_softcap: options.logit_softcap(),
            sinks,
            alibi_slopes,
            splits,
        })
    }
}

/// `pgqa_attend`'s parameters, after checking the tensors against the tables; `None` when the
/// schedule has no work.
pub(crate) fn attend_params(
    tables: &AttendTables<'_>,
    tensors: &AttendTensors,
    dtype: DType,
    variants: &LaunchVariants,
) -> Result<Option<ffi::pgqa_attend_params>> {
    let shape = tables.layout.shape();
    let num_tokens = tables.lens.num_tokens();
    let rows = num_tokens * shape.n_heads();
    Error::check_len("q", tensors.q.1, rows * shape.head_dim())?;
    Error::check_len("out", tensors.out.1, rows * shape.head_dim())?;
    Error::check_len("lse", tensors.lse.1, rows)?;
    let schedule = tables.schedule;
    let splits = variants.splits;
    check_page_dtype(dtype, tensors.kv_dtype)?;
    if tensors.kv_dtype.is_fp8() && (tensors.k_scale == 0 || tensors.v_scale == 0) {
        return Err(Error::BufferLength {
            name: "k_scale and v_scale (fp8 pages need both)",
            expected: shape.n_kv_heads(),
            actual: 0,
        });
    }
    if schedule.is_empty() {
        return Ok(None);
    }
    for (name, ptr) in [
        ("q", tensors.q.0),
        ("out", tensors.out.0),
        ("k_cache", tensors.k_cache),
        ("v_cache", tensors.v_cache),
    ] {
        check_aligned(name, ptr)?;
    }
    let partial_lse =
        tables.split_workspace + (rows * splits.num_splits * shape.head_dim() * 4) as u64;
    Ok(Some(ffi::pgqa_attend_params {
        q: tensors.q.0 as *const _,
        k_cache: tensors.k_cache as *const _,
        v_cache: tensors.v_cache as *const _,
        block_tables: tables.block_tables as *const i32,
        context_lens: tables.context_lens as *const i32,
        query_starts: tables.query_starts as *const i32,
        work: tables.work as *const i32,
        mma_work: tables.mma_work as *const i32,
        out: tensors.out.0 as *mut _,
        lse: tensors.lse.0 as *mut f32,
        partial_out: tables.split_workspace as *mut f32,
        partial_lse: partial_lse as *mut f32,
        num_work: to_i32("work items", schedule.cuda_cores.work.len())?,
        num_mma_work: to_i32("tensor-core work items", schedule.tensor_cores.work.len())?,
        num_tokens: to_i32("num_tokens", num_tokens)?,
        n_heads: to_i32("n_heads", shape.n_heads())?,
        n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
        head_dim: to_i32("head_dim", shape.head_dim())?,
        block_size: to_i32("block_size", tables.layout.block_size())?,
        max_blocks: to_i32("max_blocks", tables.max_blocks)?,
        num_blocks: to_i32("num_blocks", tables.layout.num_blocks())?,
        tokens_per_work: to_i32("tokens_per_work", schedule.cuda_cores.tokens_per_work)?,
        mma_tokens_per_work: to_i32("mma_tokens_per_work", schedule.tensor_cores.tokens_per_work)?,
        num_splits: to_i32("num_splits", splits.num_splits)?,
        keys_per_split: to_i32("keys_per_split", splits.keys_per_split)?,
        scale: variants.scale,
        dtype: self::dtype(dtype),
        sinks: variants.sinks as *const f32,
        alibi_slopes: variants.alibi_slopes as *const f32,
        causal: variants.causal.into(),
        window_left: variants.window_left,
        logit_softcap: variants.logit_softcap,
        kv_dtype: self::dtype(tensors.kv_dtype),
        k_scale: tensors.k_scale as *const f32,
        v_scale: tensors.v_scale as *const f32,
        narrow_work: tables.narrow_work as *const i32,
        num_narrow_work: to_i32(
            "narrow tensor-core work items",
            schedule.narrow_tensor_cores.work.len(),
        )?,
        narrow_tokens_per_work: to_i32(
            "narrow_tokens_per_work",
            schedule.narrow_tensor_cores.tokens_per_work,
        )?,
    }))
}

/// `pgqa_write_kv`'s parameters for one layer: `k_new`, `v_new` `(address, elements)`
/// `[num_tokens, n_kv_heads, head_dim]` of the compute dtype, the layer's K and V tensors at
/// `k_cache`, `v_cache` (of the page dtype), and for fp8 pages the layer's scales
/// (`[n_kv_heads]` f32 each at `scales.0`, `scales.1`); `None` for no tokens.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_kv_params(
    config: &CacheConfig,
    num_blocks: usize,
    num_tokens: usize,
    k_new: (u64, usize),
    v_new: (u64, usize),
    k_cache: u64,
    v_cache: u64,
    slot_mapping: u64,
    scales: (u64, u64),
) -> Result<Option<ffi::pgqa_write_kv_params>> {
    let shape = config.shape();
    Error::check_len("k_new", k_new.1, num_tokens * shape.kv_row_len())?;
    Error::check_len("v_new", v_new.1, num_tokens * shape.kv_row_len())?;
    if num_tokens == 0 {
        return Ok(None);
    }
    check_aligned("k_new", k_new.0)?;
    check_aligned("v_new", v_new.0)?;
    Ok(Some(ffi::pgqa_write_kv_params {
        k_new: k_new.0 as *const _,
        v_new: v_new.0 as *const _,
        k_cache: k_cache as *mut _,
        v_cache: v_cache as *mut _,
        slot_mapping: slot_mapping as *const i64,
        num_tokens: num_tokens as i64,
        num_slots: (num_blocks * config.block_size()) as i64,
        n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
        head_dim: to_i32("head_dim", shape.head_dim())?,
        dtype: dtype(config.dtype()),
        cache_dtype: dtype(config.page_dtype()),
        k_scale: scales.0 as *const f32,
        v_scale: scales.1 as *const f32,
    }))
}

/// `pgqa_copy_blocks`' parameters: `num_copies` (src, dst) pairs at `block_copies` over every
/// (layer, K or V) tensor of `pages`.
pub(crate) fn copy_blocks_params(
    config: &CacheConfig,
    num_blocks: usize,
    pages: u64,
    block_copies: u64,
    num_copies: usize,
) -> ffi::pgqa_copy_blocks_params {
    ffi::pgqa_copy_blocks_params {
        pages: pages as *mut _,
        block_copies: block_copies as *const i32,
        num_copies: num_copies as i64,
        block_len: (config.block_size() * config.shape().kv_row_len()) as i64,
        num_tensors: (2 * config.num_layers()) as i32,
        num_blocks: num_blocks as i32,
        dtype: dtype(config.page_dtype()),
    }
}

/// `pgqa_merge_states`' parameters: rows of `head_dim` outputs `out_a`, `out_b`, `out` and
/// their lse `lse_a`, `lse_b`, `lse`, each `(address, elements)`; `None` for no rows.
pub(crate) fn merge_states_params(
    head_dim: usize,
    dtype: DType,
    a: ((u64, usize), (u64, usize)),
    b: ((u64, usize), (u64, usize)),
    merged: ((u64, usize), (u64, usize)),
) -> Result<Option<ffi::pgqa_merge_states_params>> {
    let rows = a.1 .1;
    for (name, len, expected) in [
        ("out_a", a.0 .1, rows * head_dim),
        ("out_b", b.0 .1, rows * head_dim),
        ("lse_b", b.1 .1, rows),
        ("out", merged.0 .1, rows * head_dim),
        ("lse", merged.1 .1, rows),
    ] {
        Error::check_len(name, len, expected)?;
    }
    if rows == 0 {
        return Ok(None);
    }
    if head_dim == 0 {
        return Err(Error::BufferLength {
            name: "head_dim",
            expected: 1,
            actual: 0,
        });
    }
    Ok(Some(ffi::pgqa_merge_states_params {
        out_a: a.0 .0 as *const _,
        lse_a: a.1 .0 as *const f32,
        out_b: b.0 .0 as *const _,
        lse_b: b.1 .0 as *const f32,
        out: merged.0 .0 as *mut _,
        lse: merged.1 .0 as *mut f32,
        num_rows: i64::from(to_i32("merge rows", rows)?),
        head_dim: to_i32("head_dim", head_dim)?,
        dtype: self::dtype(dtype),
    }))
}

/// `pgqa_repeat_kv`'s parameters: `src` `[num_tokens, n_kv_heads, head_dim]`, `dst`
/// `[num_tokens, n_heads, head_dim]`, each `(address, elements)`; `None` for no tokens.
pub(crate) fn repeat_kv_params(
    shape: GqaShape,
    dtype: DType,
    num_tokens: usize,
    src: (u64, usize),
    dst: (u64, usize),
) -> Result<Option<ffi::pgqa_repeat_kv_params>> {
    Error::check_len("src", src.1, num_tokens * shape.kv_row_len())?;
    Error::check_len("dst", dst.1, num_tokens * shape.q_row_len())?;
    if num_tokens == 0 {
        return Ok(None);
    }
    check_aligned("src", src.0)?;
    check_aligned("dst", dst.0)?;
    Ok(Some(ffi::pgqa_repeat_kv_params {
        src: src.0 as *const _,
        dst: dst.0 as *mut _,
        num_tokens: num_tokens as i64,
        n_kv_heads: to_i32("n_kv_heads", shape.n_kv_heads())?,
        n_rep: to_i32("group", shape.group())?,
        head_dim: to_i32("head_dim", shape.head_dim())?,
        dtype: self::dtype(dtype),
    }))
}
