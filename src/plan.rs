//! Launch planning for the attention kernels, in plain Rust so it is unit-tested on the CPU:
//! which kernel serves each sequence (the tensor-core kernel's narrow layout for few rows, its
//! wide layout for many, CUDA cores where there are no tensor cores), which
//! query rows each thread block serves, how many blocks serve each K/V head, and into how many
//! splits (flash-decoding) the keys are cut when the batch alone cannot fill the GPU.

use crate::batch::SeqLens;
use crate::ffi;
use crate::shape::GqaShape;
use crate::variants::KeyMask;

/// Threads of a CUDA-core attention block (kernels/attend_cuda_cores.cuh).
pub const ATTEND_THREADS: usize = ffi::PGQA_ATTEND_THREADS.0 as usize;
/// 8-element output accumulators per thread.
const ATTEND_ACC_ITEMS: usize = ffi::PGQA_ATTEND_ACC_ITEMS.0 as usize;
/// The most splits a launch takes (grid z).
pub const MAX_SPLITS: usize = ffi::PGQA_ATTEND_MAX_SPLITS.0 as usize;
/// Split boundaries fall on multiples of this many keys (every tile size divides it).
pub const SPLIT_ALIGN: usize = 64;

/// The speed-of-light model the planner cuts the keys with: `src/sim/speed_of_light.rs`'s, for
/// an H200, with what the profiler measured of the tensor-core kernel (the bytes of one 64-key
/// tile of 16-bit K and V in flight per block: one tile of 16-bit pages, or two of fp8 pages in
/// the narrow layout up to head_dim 128; 3 blocks per SM at most, which overstates fp8 pages at
/// head_dim 128, whose staging ring leaves room for 2). A split count `n` costs
/// `(K/V bytes + n x the partials' bytes) / achievable bandwidth`, where the partials are an f32
/// output row and a log-sum-exp per row of every block, written by the split and read back by
/// the merge, and the achievable bandwidth is the datasheet's or what the blocks' bytes in flight
/// sustain over twice the idle DRAM latency (loaded latency is higher; twice Little's law is the
/// margin the kernels aim for), whichever is lower. The planner takes the cheapest `n`: few
/// blocks want many splits (bytes in flight), many blocks want none (the merge's bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitModel {
    /// Multiprocessors of the GPU.
    pub sms: usize,
    /// Thread blocks of the launch before any split (work items x K/V heads x head chunks).
    pub blocks: usize,
    /// Rows of a block (the group's query heads of one query row).
    pub rows: usize,
    pub head_dim: usize,
}

/// Idle DRAM latency of the GPUs the planner models, in seconds: 656 cycles at 1.755 GHz
/// (arXiv:2501.12084v2, Table 3, measured on an H800 PCIe; loaded latency is higher). The
/// profiler's speed-of-light model ([`crate::sim::speed_of_light`]) uses the same figure.
pub const DRAM_LATENCY_S: f64 = 656.0 / 1.755e9;

impl SplitModel {
    /// H200 HBM bandwidth, bytes per second (NVIDIA's datasheet).
    pub const BANDWIDTH: f64 = 4.8e12;
    /// Twice the idle DRAM latency ([`DRAM_LATENCY_S`]).
    pub const LATENCY_S: f64 = 2.0 * DRAM_LATENCY_S;
    /// Resident blocks per SM at most (the narrow layout's theoretical occupancy at head_dim
    /// 128 on 16-bit pages, register-limited; 2 on fp8 pages, shared-memory-limited).
    pub const BLOCKS_PER_SM: f64 = 3.0;

    /// The model's time, in seconds, for `splits` of block ranges of `longest` keys (16-bit
    /// pages).
    pub fn time(&self, splits: Splits, longest: usize) -> f64 {
        let kv_row = (2 * self.head_dim * 2) as f64; // K and V, 16-bit
        let blocks = (self.blocks * splits.num_splits) as f64;
        let kv = self.blocks as f64 * longest as f64 * kv_row;
        let partials = if splits.num_splits > 1 {
            blocks * (self.rows * (self.head_dim + 1) * 4 * 2) as f64
        } else {
            0.0
        };
        let in_flight = SPLIT_ALIGN as f64 * kv_row;
        let resident = (blocks / self.sms.max(1) as f64).min(Self::BLOCKS_PER_SM);
        let sustained = in_flight * resident * self.sms as f64 / Self::LATENCY_S;
        (kv + partials) / sustained.min(Self::BANDWIDTH)
    }
}

/// Rows (query row, query head) one CUDA-core attention block computes for `head_dim`.
pub fn max_rows_per_block(head_dim: usize) -> usize {
    ATTEND_ACC_ITEMS * ATTEND_THREADS * 8 / head_dim
}

/// The most rows (query row, query head) of one wide tensor-core block (kernels/attend_tensor_cores.cu):
/// its chunk of a group's heads. The block takes a warp per 16 of its rows.
pub const MMA_ROWS: usize = ffi::PGQA_ATTEND_MMA_ROWS.0 as usize;
/// Rows the plan packs into a wide block: query rows x group up to 64 (4 warps) when the group
/// fits, else one query row with all the group's heads (up to [`MMA_ROWS`]): a group of 71
/// (Falcon-7B) is one block of 5 warps that reads each K/V byte once.
pub const MMA_PACK_ROWS: usize = 64;
/// Rows of one narrow tensor-core block: one m16 fragment, its 4 warps splitting the keys.
pub const NARROW_ROWS: usize = ffi::PGQA_ATTEND_NARROW_ROWS.0 as usize;

/// Which attention kernels a schedule may use.
///
/// [`Auto`](KernelChoice::Auto) sends an item of at most [`NARROW_ROWS`] rows (query rows x
/// group: decode, short speculative items) to the narrow tensor-core layout and longer ones to
/// the wide layout; backends without tensor cores (GPUs older than sm_80) turn it into
/// [`CudaCores`](KernelChoice::CudaCores). The rule comes from the profiler's speed-of-light
/// model (`src/sim/speed_of_light.rs`), per K/V byte read, against an H200 (4.8 TB/s HBM; 67
/// TFLOP/s of f32 FMA and 989 TFLOP/s of dense bf16 MMA, NVIDIA's datasheet for the H100 SXM,
/// the same chip):
/// - the CUDA-core kernel does `rows` FMAs per K or V element, `rows` flops per 16-bit byte:
///   at HBM speed, `0.072 x rows` of the f32 pipe for 16-bit pages and `0.144 x rows` for fp8,
///   before the conversions and the softmax that share its issue slots. It reaches the pipe's
///   limit near 14 rows (7 on fp8 pages) and is never below the tensor-core time;
/// - the narrow layout does 16 padded rows of MMA whatever the group, `0.078` of the MMA pipe
///   (`0.16` on fp8 pages): memory-bound at every row count up to 16, with no idle warp;
/// - the wide layout keeps a warp per 16 rows: from 17 rows on it wastes less MMA than the
///   narrow layout's head chunks, and reads each K/V byte once per block of up to 128 rows.
///
/// Both tensor-core layouts keep a 64-key tile in flight per block (2 x 64 x head_dim x the
/// page's bytes; the narrow layout keeps two of fp8 pages up to head_dim 128, the bytes of one
/// 16-bit tile), so bytes in flight decide nothing between them. No GPU has timed the rule yet:
/// the device check times all three paths on every bench shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// Per sequence: the narrow tensor-core layout up to [`NARROW_ROWS`] rows, the wide one
    /// above (CUDA cores on GPUs without tensor cores).
    #[default]
    Auto,
    /// Every sequence on CUDA cores (GPUs older than sm_80; comparisons).
    CudaCores,
    /// Every sequence on the wide tensor-core layout (sm_80 or newer).
    TensorCores,
    /// Every sequence on the narrow tensor-core layout (sm_80 or newer): blocks of 16 rows, a
    /// group above 16 in chunks of 16 heads (each chunk reads the K/V again).
    NarrowTensorCores,
}

/// One kernel's share of a launch: the grid's x dimension and how its blocks cover the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelWork {
    /// Blocks per K/V head: `ceil(group / rows per block)`.
    pub head_chunks: usize,
    /// Query rows of one sequence per block (each with all the group's heads of the chunk),
    /// capped at the longest query this kernel serves.
    pub tokens_per_work: usize,
    /// (sequence, first query row of the sequence) per block row, the blocks whose last row
    /// sees the most keys first.
    pub work: Vec<[i32; 2]>,
    /// The most query rows of one of its sequences.
    longest_query: usize,
}

impl KernelWork {
    /// Blocks serve chunks of `chunk_rows` of a group's heads, and pack up to `pack_rows` rows
    /// (query rows x heads) when the group fits.
    fn new(chunk_rows: usize, pack_rows: usize, group: usize) -> Self {
        Self {
            head_chunks: group.div_ceil(chunk_rows),
            tokens_per_work: (pack_rows / group.min(pack_rows)).max(1),
            work: Vec::new(),
            longest_query: 0,
        }
    }

    /// Caps the query rows per block at the longest query (a decode batch's blocks then size
    /// their shared memory for one query row, not for a prompt's worth), then orders the
    /// items by the keys their last row sees, most first: the GPU starts blocks roughly in
    /// grid order, so the longest ones (late rows of causal prompts, long contexts) no longer
    /// run alone at the end of the launch.
    fn finish(mut self, lens: &SeqLens) -> Self {
        self.tokens_per_work = self.tokens_per_work.min(self.longest_query.max(1));
        let tokens = self.tokens_per_work;
        self.work.sort_by_key(|&[seq, j0]| {
            let (seq, j0) = (seq as usize, j0 as usize);
            let last_row = (j0 + tokens).min(lens.query_len(seq)) - 1;
            std::cmp::Reverse(lens.position(seq, last_row))
        });
        self
    }

    /// Adds the work items of a sequence's `query_len` rows.
    fn push(&mut self, seq: usize, query_len: usize) {
        self.longest_query = self.longest_query.max(query_len);
        for j0 in (0..query_len).step_by(self.tokens_per_work) {
            self.work.push([seq as i32, j0 as i32]);
        }
    }

    fn blocks(&self, n_kv_heads: usize) -> usize {
        self.work.len() * n_kv_heads * self.head_chunks
    }

    /// The most keys one of its blocks reads under `mask`: from its first row's window start to
    /// its last row's limit.
    fn longest_range(&self, lens: &SeqLens, mask: KeyMask) -> usize {
        self.work
            .iter()
            .map(|&[seq, j0]| {
                let (seq, j0) = (seq as usize, j0 as usize);
                let (context_len, query_len) = (lens.context_len(seq), lens.query_len(seq));
                let last = (j0 + self.tokens_per_work).min(query_len) - 1;
                let first = mask.visible_keys(context_len, query_len, j0).start;
                mask.visible_keys(context_len, query_len, last).end - first
            })
            .max()
            .unwrap_or(0)
    }
}

/// How a launch cuts each block's key range (flash-decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splits {
    /// Splits per block range (1: no split, no merge).
    pub num_splits: usize,
    /// Keys per split: split `s` covers keys `[lo + s * keys_per_split, lo + (s + 1) *
    /// keys_per_split)` of a block's range `[lo, hi)`.
    pub keys_per_split: usize,
}

impl Splits {
    /// `num_splits` of ranges of up to `longest` keys, aligned to [`SPLIT_ALIGN`] (fewer when
    /// rounding leaves trailing splits empty).
    fn new(num_splits: usize, longest: usize) -> Self {
        let keys_per_split = longest
            .div_ceil(num_splits.clamp(1, MAX_SPLITS))
            .next_multiple_of(SPLIT_ALIGN)
            .max(SPLIT_ALIGN);
        Self {
            num_splits: longest.div_ceil(keys_per_split).max(1),
            keys_per_split,
        }
    }

    /// The splits of ranges of up to `longest` keys the model finds fastest (the fewest of
    /// equal cost), at most `most`.
    fn modelled(model: &SplitModel, longest: usize, most: usize) -> Self {
        let candidates = longest
            .div_ceil(SPLIT_ALIGN)
            .clamp(1, most.clamp(1, MAX_SPLITS));
        let mut best = Self::new(1, longest);
        let mut best_time = model.time(best, longest);
        for n in 2..=candidates {
            let splits = Self::new(n, longest);
            let time = model.time(splits, longest);
            if time < best_time {
                (best, best_time) = (splits, time);
            }
        }
        best
    }
}

/// How one attention launch is cut into thread blocks.
///
/// ```
/// use paged_gqa::{plan::AttendSchedule, GqaShape, SeqLens};
/// let llama3_8b = GqaShape::new(32, 8, 128)?;
/// // One long request decoding on a 132-SM GPU: 8 blocks cannot fill it, so the keys are split.
/// let one = AttendSchedule::new(132, &SeqLens::decode(&[32_768])?, llama3_8b);
/// assert!(one.num_splits > 1);
/// // 128 requests of 8k: 1024 blocks fill it already; splitting would only add the merge.
/// assert_eq!(AttendSchedule::new(132, &SeqLens::decode(&[8192; 128])?, llama3_8b).num_splits, 1);
/// // A 100-token prompt goes to the tensor cores: 16 query rows (x 4 heads = 64 rows) per block.
/// let prompt = AttendSchedule::new(132, &SeqLens::new(&[100], &[100])?, llama3_8b);
/// assert_eq!((prompt.tensor_cores.tokens_per_work, prompt.tensor_cores.work.len()), (16, 7));
/// assert!(prompt.cuda_cores.work.is_empty());
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttendSchedule {
    /// Work of the CUDA-core kernel (kernels/attend_cuda_cores.cuh): every item on GPUs without tensor
    /// cores, or on request.
    pub cuda_cores: KernelWork,
    /// Work of the tensor-core kernel's wide layout (kernels/attend_tensor_cores.cu): many rows per item.
    pub tensor_cores: KernelWork,
    /// Work of the tensor-core kernel's narrow layout (kernels/attend_tensor_cores.cu): up to 16 rows.
    pub narrow_tensor_cores: KernelWork,
    /// Splits of the keys (1: no split, no merge) for plain causal attention; both kernels use
    /// the same. Other key masks (a sliding window, non-causal) take
    /// [`splits`](AttendSchedule::splits).
    pub num_splits: usize,
    /// Keys per split: split `s` covers keys `[s * keys_per_split, (s + 1) * keys_per_split)`
    /// of each block's range.
    pub keys_per_split: usize,
    /// The model the splits were chosen with.
    model: SplitModel,
}

impl AttendSchedule {
    /// Plans attention for the batch `lens` on a GPU with `sm_count` multiprocessors, with
    /// [`KernelChoice::Auto`].
    pub fn new(sm_count: usize, lens: &SeqLens, shape: GqaShape) -> Self {
        Self::with_kernels(sm_count, lens, shape, KernelChoice::Auto)
    }

    /// Plans attention, sending each sequence to the kernel `choice` picks.
    pub fn with_kernels(
        sm_count: usize,
        lens: &SeqLens,
        shape: GqaShape,
        choice: KernelChoice,
    ) -> Self {
        let group = shape.group();
        let cuda_rows = max_rows_per_block(shape.head_dim());
        let mut cuda_cores = KernelWork::new(cuda_rows, cuda_rows, group);
        let mut tensor_cores = KernelWork::new(MMA_ROWS, MMA_PACK_ROWS, group);
        let mut narrow_tensor_cores = KernelWork::new(NARROW_ROWS, NARROW_ROWS, group);
        let mut max_context_len = 0;
        for seq in 0..lens.batch() {
            let query_len = lens.query_len(seq);
            if query_len == 0 {
                continue;
            }
            max_context_len = max_context_len.max(lens.context_len(seq));
            let kernel = match choice {
                KernelChoice::Auto if query_len * group <= NARROW_ROWS => &mut narrow_tensor_cores,
                KernelChoice::Auto | KernelChoice::TensorCores => &mut tensor_cores,
                KernelChoice::CudaCores => &mut cuda_cores,
                KernelChoice::NarrowTensorCores => &mut narrow_tensor_cores,
            };
            kernel.push(seq, query_len);
        }
        let cuda_cores = cuda_cores.finish(lens);
        let tensor_cores = tensor_cores.finish(lens);
        let narrow_tensor_cores = narrow_tensor_cores.finish(lens);
        let blocks = [&cuda_cores, &tensor_cores, &narrow_tensor_cores]
            .iter()
            .map(|kernel| kernel.blocks(shape.n_kv_heads()))
            .sum::<usize>();
        let model = SplitModel {
            sms: sm_count.max(1),
            blocks,
            rows: group,
            head_dim: shape.head_dim(),
        };
        let Splits {
            num_splits,
            keys_per_split,
        } = Splits::modelled(&model, max_context_len, MAX_SPLITS);
        // No block range is longer than the longest context, whatever the mask: the workspace
        // holds these splits, and a mask's (over shorter ranges) are capped at them.
        Self {
            cuda_cores,
            tensor_cores,
            narrow_tensor_cores,
            num_splits,
            keys_per_split,
            model,
        }
    }

    /// The splits for attention under `mask` (`lens` the batch this schedule was made for),
    /// sized from the keys the blocks actually read: with a sliding window, a decode token's
    /// range is the window, not the context. At most the workspace's splits.
    ///
    /// ```
    /// use paged_gqa::{plan::AttendSchedule, GqaShape, KeyMask, SeqLens};
    /// let gpt_oss = GqaShape::new(64, 8, 64)?;
    /// let lens = SeqLens::decode(&[32_768])?;
    /// let schedule = AttendSchedule::new(132, &lens, gpt_oss);
    /// let window = KeyMask { causal: true, window_left: Some(127) };
    /// let splits = schedule.splits(&lens, window);
    /// assert_eq!((splits.num_splits, splits.keys_per_split), (2, 64)); // the window: 2 splits
    /// assert!(schedule.splits(&lens, KeyMask::CAUSAL).num_splits > 2);
    /// # Ok::<(), paged_gqa::Error>(())
    /// ```
    pub fn splits(&self, lens: &SeqLens, mask: KeyMask) -> Splits {
        let longest = [
            &self.cuda_cores,
            &self.tensor_cores,
            &self.narrow_tensor_cores,
        ]
        .iter()
        .map(|kernel| kernel.longest_range(lens, mask))
        .max()
        .unwrap_or(0);
        Splits::modelled(&self.model, longest, self.num_splits)
    }

    /// True when no block has anything to do (no query rows).
    pub fn is_empty(&self) -> bool {
        self.cuda_cores.work.is_empty()
            && self.tensor_cores.work.is_empty()
            && self.narrow_tensor_cores.work.is_empty()
    }

    /// The most splits any key mask gets ([`splits`](AttendSchedule::splits)); the workspace
    /// is sized for it.
    pub fn max_splits(&self) -> usize {
        self.num_splits
    }

    /// f32 elements of the split workspace: partial outputs `[num_tokens, n_heads, num_splits,
    /// head_dim]` then partial log-sum-exps `[num_tokens, n_heads, num_splits]`; 0 without splits.
    /// Sized for the most splits any key mask gets ([`splits`](AttendSchedule::splits)).
    pub fn workspace_floats(&self, num_tokens: usize, shape: GqaShape) -> usize {
        if self.num_splits == 1 {
            return 0;
        }
        num_tokens * shape.n_heads() * self.num_splits * (shape.head_dim() + 1)
    }
}
