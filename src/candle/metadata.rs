//! One engine step's batch description (vLLM's attention metadata): lengths and block tables,
//! read to the host and checked once, shared by every layer's write and attention.

use std::sync::{Arc, Mutex};

use candle_core::{DType as CandleDType, Tensor};

use crate::batch::SeqLens;
use crate::cache::{BlockTables, PagedLayout};
use crate::error::{Error, Result};

use super::validate;

/// The batch of one engine step: per sequence its keys (`context_lens`, new tokens included),
/// its new query rows (`query_lens`, 1 for decode) and its pages (`block_tables`).
///
/// Build it once per step, then hand it to every layer's [`write_kv`](PagedMetadata::write_kv)
/// and [`attention`](PagedMetadata::attention): the tables are read and checked once (against
/// each cache geometry they meet), and on CUDA uploaded once, so a layer only launches.
///
/// The new tokens of sequence `s` are its last `query_lens[s]` positions: token `j` of it sits
/// at position `p = context_lens[s] - query_lens[s] + j`, in slot `block_tables[s][p /
/// block_size] * block_size + p % block_size` (the slot mapping is derived, never passed, so
/// the write and the attention cannot disagree). Its query row sees keys `0..=p` (causal,
/// bottom-right).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use paged_gqa::candle::PagedMetadata;
///
/// let dev = Device::Cpu;
/// // Two sequences: one decoding (20 keys), one prefilling 5 tokens; pages of 16.
/// let block_tables = Tensor::new(&[[3u32, 1], [0, 0]], &dev)?; // [batch, max_blocks]
/// let context_lens = Tensor::new(&[20u32, 5], &dev)?; // [batch]
/// let query_lens = Tensor::new(&[1u32, 5], &dev)?; // [batch]
/// let meta = PagedMetadata::new(&block_tables, &context_lens, Some(&query_lens))?;
/// assert_eq!(meta.num_tokens(), 6);
/// assert_eq!(meta.slot_mapping(4, 16)?, vec![1 * 16 + 3, 0, 1, 2, 3, 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct PagedMetadata {
    lens: SeqLens,
    /// [batch, max_blocks], the engine's values (u32 or i32), widened.
    block_tables: Vec<i64>,
    max_blocks: usize,
    /// The tables checked against each cache geometry met so far (one, for most models).
    checked: Mutex<Vec<Arc<CheckedTables>>>,
    /// The tables uploaded to each CUDA device and geometry met so far.
    #[cfg(feature = "candle-cuda")]
    pub(crate) device: super::cuda::DeviceTables,
}

/// The block tables checked against one cache geometry, and the slots derived from them.
pub(crate) struct CheckedTables {
    pub num_blocks: usize,
    pub block_size: usize,
    /// [batch, max_blocks] i32: every entry a sequence uses is a block of the cache; the others
    /// are -1 where the engine's value does not fit an i32.
    pub block_tables: Vec<i32>,
    /// [num_tokens]: the slot of every new token.
    pub slot_mapping: Vec<i64>,
    /// [batch]: leading pages of each sequence a sliding window reclaimed (-1 entries); the
    /// CUDA path checks attention against them (the CPU path's PagedKv does it itself).
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub reclaimed: Vec<usize>,
}

impl PagedMetadata {
    /// From candle tensors, on one device (read to the host: free on the CPU, one
    /// device-to-host copy each on CUDA): `block_tables` `[batch, max_blocks]` u32 or i32,
    /// `context_lens` `[batch]` and `query_lens` `[batch]` u32, i32 or i64 (`None`: a decode
    /// step, one row per sequence). Entries of a table row past the pages its sequence uses are
    /// never read (pad them with anything).
    pub fn new(
        block_tables: &Tensor,
        context_lens: &Tensor,
        query_lens: Option<&Tensor>,
    ) -> candle_core::Result<Self> {
        const LENS: [CandleDType; 3] = [CandleDType::U32, CandleDType::I32, CandleDType::I64];
        validate::same_device(context_lens, "context_lens", block_tables, "block_tables")?;
        if let Some(query_lens) = query_lens {
            validate::same_device(query_lens, "query_lens", block_tables, "block_tables")?;
        }
        let [batch, max_blocks] =
            validate::dims(block_tables, "block_tables", "[batch, max_blocks]")?;
        let tables = validate::host_ints(
            block_tables,
            "block_tables",
            "[batch, max_blocks]",
            2,
            &[CandleDType::U32, CandleDType::I32],
        )?;
        let context = validate::host_ints(context_lens, "context_lens", "[batch]", 1, &LENS)?;
        let query = match query_lens {
            Some(t) => validate::host_ints(t, "query_lens", "[batch]", 1, &LENS)?,
            None => vec![1; context.len()],
        };
        if context.len() != batch {
            Err(Error::BatchLength {
                name: "context_lens",
                expected: batch,
                actual: context.len(),
            })?;
        }
        let lens = SeqLens::new(
            &lengths("context_lens", &context)?,
            &lengths("query_lens", &query)?,
        )?;
        Ok(Self::build(lens, tables, max_blocks))
    }

    /// From host values: `lens` and `block_tables` `[lens.batch(), max_blocks]` (no tensor, no
    /// copy: what an engine that keeps its tables on the host uses).
    pub fn from_host(lens: SeqLens, block_tables: &[i32], max_blocks: usize) -> Result<Self> {
        Error::check_len(
            "block_tables",
            block_tables.len(),
            lens.batch() * max_blocks,
        )?;
        let tables = block_tables.iter().map(|&b| i64::from(b)).collect();
        Ok(Self::build(lens, tables, max_blocks))
    }

    fn build(lens: SeqLens, block_tables: Vec<i64>, max_blocks: usize) -> Self {
        Self {
            lens,
            block_tables,
            max_blocks,
            checked: Mutex::new(Vec::new()),
            #[cfg(feature = "candle-cuda")]
            device: Default::default(),
        }
    }

    /// Keys and query rows per sequence.
    pub fn lens(&self) -> &SeqLens {
        &self.lens
    }

    /// Query rows of the step (rows of `q`, `k`, `v`): the sum of `query_lens`.
    pub fn num_tokens(&self) -> usize {
        self.lens.num_tokens()
    }

    /// Columns of the block tables.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// The slot of every new token, `[num_tokens]`, in a cache of `num_blocks` pages of
    /// `block_size` tokens (the tables checked against it first).
    pub fn slot_mapping(&self, num_blocks: usize, block_size: usize) -> Result<Vec<i64>> {
        let shape = crate::GqaShape::new(1, 1, 8)?; // the heads play no part in the tables
        let layout = PagedLayout::new(shape, num_blocks, block_size)?;
        Ok(self.checked(&layout)?.slot_mapping.clone())
    }

    /// The tables checked against `layout` (cached: once per geometry).
    pub(crate) fn checked(&self, layout: &PagedLayout) -> Result<Arc<CheckedTables>> {
        let (num_blocks, block_size) = (layout.num_blocks(), layout.block_size());
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = checked
            .iter()
            .find(|c| (c.num_blocks, c.block_size) == (num_blocks, block_size))
        {
            return Ok(found.clone());
        }
        let tables = Arc::new(self.check(layout)?);
        checked.push(tables.clone());
        Ok(tables)
    }

    fn check(&self, layout: &PagedLayout) -> Result<CheckedTables> {
        let (num_blocks, block_size) = (layout.num_blocks(), layout.block_size());
        let lens = &self.lens;
        // Entries a sequence uses must fit an i32 (the kernels' block ids); report the
        // engine's own value when one does not. The rest of the checks are BlockTables'.
        let mut block_tables = Vec::with_capacity(self.block_tables.len());
        for (i, &block_id) in self.block_tables.iter().enumerate() {
            let (seq, index) = (i / self.max_blocks, i % self.max_blocks);
            let used = index < lens.context_len(seq).div_ceil(block_size);
            block_tables.push(match i32::try_from(block_id) {
                Ok(b) => b,
                Err(_) if used => {
                    return Err(Error::BlockIdOutOfRange {
                        seq,
                        index,
                        block_id,
                        num_blocks,
                    })
                }
                Err(_) => -1,
            });
        }
        let tables = BlockTables::new(&block_tables, self.max_blocks, layout, lens)?;
        let mut slot_mapping = Vec::with_capacity(lens.num_tokens());
        for seq in 0..lens.batch() {
            for j in 0..lens.query_len(seq) {
                let position = lens.position(seq, j);
                // A new token's page holds it: it cannot be one a window gave back.
                let index = position / block_size;
                if index < tables.reclaimed()[seq] {
                    return Err(Error::ReclaimedBlockVisible {
                        seq,
                        index,
                        block_size,
                        first_visible_key: position,
                    });
                }
                let block = tables.block(seq, index);
                slot_mapping.push((block * block_size + position % block_size) as i64);
            }
        }
        Ok(CheckedTables {
            num_blocks,
            block_size,
            reclaimed: tables.reclaimed().to_vec(),
            block_tables,
            slot_mapping,
        })
    }
}

/// Per-sequence lengths as `usize`; a negative one is `NegativeLength`.
fn lengths(name: &'static str, values: &[i64]) -> Result<Vec<usize>> {
    values
        .iter()
        .enumerate()
        .map(|(seq, &value)| {
            usize::try_from(value).map_err(|_| Error::NegativeLength { name, seq, value })
        })
        .collect()
}

impl std::fmt::Debug for PagedMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedMetadata")
            .field("lens", &self.lens)
            .field("max_blocks", &self.max_blocks)
            .finish_non_exhaustive()
    }
}
