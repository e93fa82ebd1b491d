//! The crate's one error type. Every bad input is a variant that carries the offending numbers.

/// Everything that can go wrong in paged-gqa.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `n_heads` or `n_kv_heads` is zero.
    #[error("head counts must be positive: n_heads {n_heads}, n_kv_heads {n_kv_heads}")]
    ZeroHeads { n_heads: usize, n_kv_heads: usize },

    /// `head_dim` is zero.
    #[error("head_dim must be positive, got 0")]
    ZeroHeadDim,

    /// `head_dim` is not a multiple of 8 (16-byte rows of 2-byte elements).
    #[error("head_dim {head_dim} is not a multiple of 8")]
    HeadDimNotMultipleOf8 { head_dim: usize },

    /// GQA needs every K/V head to serve the same number of query heads.
    #[error("n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")]
    HeadsNotDivisible { n_heads: usize, n_kv_heads: usize },

    /// A query head index past the last head.
    #[error("query head {q_head} is out of range for n_heads {n_heads}")]
    QueryHeadOutOfRange { q_head: usize, n_heads: usize },

    /// The softmax scale is NaN or infinite.
    #[error("scale {scale} is not a finite number")]
    InvalidScale { scale: f64 },

    /// An attention variant with a value it cannot take.
    #[error("attention option {option} = {value} is invalid: expected {expected}")]
    InvalidOption {
        option: &'static str,
        value: String,
        expected: &'static str,
    },

    /// A sequence's block table has a reclaimed entry (-1) where a query row can see keys.
    #[error(
        "sequence {seq}: keys from {first_visible_key} on are visible, but block table entry \
         {index} (keys from {} on) was reclaimed (-1) by the sliding window; a wider window or a \
         global layer cannot run over a cache that reclaims blocks",
        .index * .block_size
    )]
    ReclaimedBlockVisible {
        seq: usize,
        index: usize,
        block_size: usize,
        first_visible_key: usize,
    },

    /// An observed absolute maximum that gives no fp8 scale: NaN, infinite or negative.
    #[error("amax {amax} is not a finite, non-negative number: it gives no fp8 scale")]
    InvalidAmax { amax: f32 },

    /// An fp8 scale that is zero, negative, NaN or infinite (`name` is `k_scale` or `v_scale`).
    #[error("{name}[{head}] = {value} is not a positive, finite fp8 scale")]
    InvalidKvScale {
        name: &'static str,
        head: usize,
        value: f32,
    },

    /// A compute dtype and page dtype that do not go together: an fp8 compute dtype, or 16-bit
    /// pages of another type than the compute dtype.
    #[error(
        "pages of {page_dtype:?} cannot hold a cache computed in {dtype:?}: the compute dtype \
         is f32, f16 or bf16, and the pages hold it or fp8 (F8E4M3, F8E5M2)"
    )]
    InvalidPageDType {
        dtype: crate::dtype::DType,
        page_dtype: crate::dtype::DType,
    },

    /// fp8 pages read and write 16-byte vectors of 16 values: head_dim must be a multiple of 16.
    #[error(
        "fp8 pages need head_dim a multiple of 16 (16-byte rows of 1-byte values), got {head_dim}"
    )]
    Fp8HeadDim { head_dim: usize },

    /// A page must hold at least one token.
    #[error("block_size must be positive, got 0")]
    ZeroBlockSize,

    /// A buffer does not have the length its shape implies.
    #[error("{name} has {actual} elements, expected {expected}")]
    BufferLength {
        name: &'static str,
        expected: usize,
        actual: usize,
    },

    /// A buffer or batch used on another device or stream than the one it was made on.
    #[error("{what} belongs to another device or stream than the one it is used on")]
    DeviceMismatch { what: &'static str },

    /// Two per-sequence arrays disagree on the batch size.
    #[error("{name} has {actual} entries, expected one per sequence ({expected})")]
    BatchLength {
        name: &'static str,
        expected: usize,
        actual: usize,
    },

    /// A sequence asks for more query rows than it has keys.
    #[error("query_lens[{seq}] = {query_len} exceeds context_lens[{seq}] = {context_len}")]
    QueryLongerThanContext {
        seq: usize,
        query_len: usize,
        context_len: usize,
    },

    /// A sequence's context does not fit in its row of the block table.
    #[error(
        "context_lens[{seq}] = {context_len} needs {needed_blocks} blocks of {block_size} tokens, \
         block_tables has {max_blocks} columns"
    )]
    ContextExceedsBlockTable {
        seq: usize,
        context_len: usize,
        block_size: usize,
        needed_blocks: usize,
        max_blocks: usize,
    },

    /// A block table entry that the sequence uses is not a block of the cache.
    #[error(
        "block_tables[{seq}][{index}] = {block_id} is out of range for num_blocks {num_blocks}"
    )]
    BlockIdOutOfRange {
        seq: usize,
        index: usize,
        block_id: i64,
        num_blocks: usize,
    },

    /// A per-sequence length is negative (lengths arrive as i32 from engines and files).
    #[error("{name}[{seq}] = {value} is negative")]
    NegativeLength {
        name: &'static str,
        seq: usize,
        value: i64,
    },

    /// A size computation does not fit the integer type the kernels use.
    #[error("{what} = {value} is too large (limit {limit})")]
    TooLarge {
        what: &'static str,
        value: u128,
        limit: u128,
    },

    /// A device pointer that must be 16-byte aligned is not.
    #[error("{name} is not 16-byte aligned (address {address:#x})")]
    Misaligned { name: &'static str, address: u64 },

    /// Page sizes are powers of two from 1 to 256 (the kernels use shifts and masks).
    #[error("block_size {block_size} is not a power of two from 1 to 256")]
    InvalidBlockSize { block_size: usize },

    /// A cache needs at least one layer.
    #[error("num_layers must be positive, got 0")]
    ZeroLayers,

    /// A cache needs at least one block.
    #[error("num_blocks must be positive, got 0")]
    ZeroBlocks,

    /// A byte budget too small for a single block of every layer's K and V.
    #[error("a budget of {budget_bytes} bytes holds no block ({block_bytes} bytes per block)")]
    BudgetTooSmall { budget_bytes: u64, block_bytes: u64 },

    /// A layer index past the last layer.
    #[error("layer {layer} is out of range for num_layers {num_layers}")]
    LayerOutOfRange { layer: usize, num_layers: usize },

    /// A sequence id this cache never handed out.
    #[error("sequence {seq} is unknown to this cache")]
    UnknownSequence { seq: u64 },

    /// A sequence id that was freed.
    #[error("sequence {seq} was freed")]
    FreedSequence { seq: u64 },

    /// The same sequence twice in one step's batch.
    #[error("sequence {seq} appears twice in the batch")]
    DuplicateSequence { seq: u64 },

    /// Not enough free blocks for the request; nothing was changed.
    #[error("out of blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },

    /// A plan reaches past the token ids a sequence added with its prompt knows: append the
    /// sampled tokens first, so its blocks can be named for the prefix cache.
    #[error(
        "sequence {seq} would hold {needed} tokens but knows the ids of {known}: append the \
         sampled tokens (append_tokens) before the plan that computes them"
    )]
    UnknownTokens {
        seq: u64,
        needed: usize,
        known: usize,
    },

    /// A plan used after the cache changed (or with another cache).
    #[error(
        "stale plan: made for cache {plan_cache} at generation {plan_generation}, \
         the cache is {cache} at generation {generation}"
    )]
    StalePlan {
        plan_cache: u64,
        plan_generation: u64,
        cache: u64,
        generation: u64,
    },

    /// A storage's page type, or the rows, queries or outputs given to a cache or batch, differ
    /// from the dtype its configuration names.
    #[error("dtype mismatch: configured for {expected:?}, given {actual:?}")]
    DTypeMismatch {
        expected: crate::dtype::DType,
        actual: crate::dtype::DType,
    },

    /// The tensor-core attention kernel was asked for where it cannot run.
    #[error(
        "the tensor-core attention kernel needs an sm_80 or newer GPU and a build for one: this \
         GPU is compute capability {compute_capability}, sm_80 code built: {built}"
    )]
    NoTensorCoreKernel {
        compute_capability: String,
        built: bool,
    },

    /// No kernel is built for this head size.
    #[error("head_dim {head_dim} has no {kernel} kernel (built for {supported})")]
    UnsupportedHeadDim {
        kernel: &'static str,
        head_dim: usize,
        supported: &'static str,
    },

    /// No kernel is built for this element type.
    #[error("the {kernel} kernel takes f16 or bf16, not {dtype:?}")]
    UnsupportedDType {
        kernel: &'static str,
        dtype: crate::dtype::DType,
    },

    /// No CUDA: the crate was built without nvcc, libcuda is missing, or there is no GPU.
    #[error("CUDA is unavailable: {reason}")]
    CudaUnavailable { reason: String },

    /// The CUDA driver reported an error (allocation, copy, context).
    #[error("CUDA driver error: {0}")]
    Driver(String),

    /// A launcher refused its arguments or the CUDA runtime refused the launch.
    #[error("{kernel} launch failed: {detail}")]
    Launch {
        kernel: &'static str,
        detail: String,
    },

    // The tensors of the candle ops (feature `candle`).
    /// A tensor's rank or shape is not what the op needs.
    #[error("{name} has shape {actual:?}, expected {expected}")]
    TensorShape {
        name: &'static str,
        expected: String,
        actual: Vec<usize>,
    },

    /// A tensor's element type is not one the op takes.
    #[error("{name} has dtype {actual}, expected {expected}")]
    TensorDType {
        name: &'static str,
        expected: String,
        actual: String,
    },

    /// A tensor is not stored row-major contiguous (any start offset is fine).
    #[error(
        "{name} is not contiguous (shape {shape:?}, strides {stride:?}); call .contiguous() first"
    )]
    NotContiguous {
        name: &'static str,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },

    /// A tensor on another device than the one the op runs on.
    #[error("{name} is on {actual}, {reference} on {expected}: every tensor of the op must be on one device")]
    TensorDevice {
        name: &'static str,
        reference: &'static str,
        expected: String,
        actual: String,
    },

    /// A slot past the cache's last slot.
    #[error("slot_mapping[{token}] = {slot} is out of range for {num_slots} slots (num_blocks * block_size)")]
    SlotOutOfRange {
        token: usize,
        slot: i64,
        num_slots: usize,
    },

    /// A tensor written in place shares memory with another tensor of the op.
    #[error("{written} shares memory with {other}: a cache written in place must not alias another tensor of the op")]
    Aliased {
        written: &'static str,
        other: &'static str,
    },

    /// candle refused an operation on the pages of a candle-backed cache.
    #[error("candle: {0}")]
    Candle(String),
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}

impl Error {
    /// `Err(BufferLength)` unless buffer `name` has the `expected` length its shape implies.
    /// [`Error::TooLarge`] where `value` passes `limit`.
    pub(crate) fn check_at_most(what: &'static str, value: u128, limit: u128) -> Result<()> {
        if value > limit {
            return Err(Error::TooLarge { what, value, limit });
        }
        Ok(())
    }

    pub(crate) fn check_len(name: &'static str, actual: usize, expected: usize) -> Result<()> {
        if actual != expected {
            return Err(Error::BufferLength {
                name,
                expected,
                actual,
            });
        }
        Ok(())
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
