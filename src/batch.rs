//! Per-sequence lengths of a batch: how many keys each sequence has and how many query rows
//! it brings this step.

use std::ops::Range;

use crate::error::{Error, Result};

/// The most keys one sequence may have: the kernels count keys in 32 bits, with room for a
/// tile's worth past the end (`pgqa_attend_params::context_lens`). 2^31 keys are far past any
/// real cache (256 GiB of one layer's K and V at Llama-3-8B's heads).
pub const MAX_CONTEXT_LEN: usize = i32::MAX as usize - 256;

/// The most query rows of one batch (the kernels index rows in 32 bits).
pub const MAX_TOKENS: usize = i32::MAX as usize;

/// Lengths of a batch of sequences, validated.
///
/// `context_len` counts a sequence's keys, its new tokens included; `query_len` counts its
/// query rows this step (1 for decode). Query rows are concatenated in batch order, so
/// sequence `s` owns rows [`query_rows(s)`](SeqLens::query_rows) of `q`. Causal,
/// bottom-right: query row `j` of a sequence sits at position `context_len - query_len + j` and
/// sees keys `0..=` that position.
///
/// ```
/// use paged_gqa::SeqLens;
/// let lens = SeqLens::new(&[5, 17], &[1, 3])?;
/// assert_eq!(lens.num_tokens(), 4);
/// assert_eq!(lens.query_rows(1), 1..4);
/// assert_eq!(lens.position(1, 0), 14);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLens {
    context_lens: Vec<usize>,
    query_lens: Vec<usize>,
    /// query_starts[s] = sum of query_lens[..s]; one extra entry at the end (num_tokens).
    query_starts: Vec<usize>,
}

impl SeqLens {
    /// Validates: one query length per context length, `query_len <= context_len`,
    /// `context_len <= MAX_CONTEXT_LEN` and at most `MAX_TOKENS` query rows in all.
    pub fn new(context_lens: &[usize], query_lens: &[usize]) -> Result<Self> {
        if query_lens.len() != context_lens.len() {
            return Err(Error::BatchLength {
                name: "query_lens",
                expected: context_lens.len(),
                actual: query_lens.len(),
            });
        }
        let mut query_starts = Vec::with_capacity(context_lens.len() + 1);
        let mut total = 0usize;
        for (seq, (&context_len, &query_len)) in context_lens.iter().zip(query_lens).enumerate() {
            if query_len > context_len {
                return Err(Error::QueryLongerThanContext {
                    seq,
                    query_len,
                    context_len,
                });
            }
            Error::check_at_most("context_len", context_len as u128, MAX_CONTEXT_LEN as u128)?;
            query_starts.push(total);
            total += query_len;
        }
        Error::check_at_most("num_tokens", total as u128, MAX_TOKENS as u128)?;
        query_starts.push(total);
        Ok(Self {
            context_lens: context_lens.to_vec(),
            query_lens: query_lens.to_vec(),
            query_starts,
        })
    }

    /// A decode batch: one query row per sequence.
    pub fn decode(context_lens: &[usize]) -> Result<Self> {
        Self::new(context_lens, &vec![1; context_lens.len()])
    }

    /// From the i32 arrays engines and case files carry; negative entries are errors.
    pub fn from_i32(context_lens: &[i32], query_lens: &[i32]) -> Result<Self> {
        let convert = |name: &'static str, values: &[i32]| -> Result<Vec<usize>> {
            values
                .iter()
                .enumerate()
                .map(|(seq, &v)| {
                    usize::try_from(v).map_err(|_| Error::NegativeLength {
                        name,
                        seq,
                        value: v.into(),
                    })
                })
                .collect()
        };
        Self::new(
            &convert("context_lens", context_lens)?,
            &convert("query_lens", query_lens)?,
        )
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.context_lens.len()
    }

    /// Total query rows of the batch.
    pub fn num_tokens(&self) -> usize {
        *self.query_starts.last().unwrap_or(&0)
    }

    /// Keys of sequence `seq`.
    pub fn context_len(&self, seq: usize) -> usize {
        self.context_lens[seq]
    }

    /// Query rows of sequence `seq`.
    pub fn query_len(&self, seq: usize) -> usize {
        self.query_lens[seq]
    }

    /// Rows of `q` (and of the output) that belong to sequence `seq`.
    pub fn query_rows(&self, seq: usize) -> Range<usize> {
        self.query_starts[seq]..self.query_starts[seq + 1]
    }

    /// Position in its sequence of query row `j` of `seq`: `context_len - query_len + j`.
    pub fn position(&self, seq: usize, j: usize) -> usize {
        self.context_lens[seq] - self.query_lens[seq] + j
    }

    /// All context lengths.
    pub fn context_lens(&self) -> &[usize] {
        &self.context_lens
    }

    /// Keys per sequence as the kernels read them (`[batch]` i32; they fit, see
    /// [`MAX_CONTEXT_LEN`]).
    pub fn context_lens_i32(&self) -> Vec<i32> {
        self.context_lens.iter().map(|&l| l as i32).collect()
    }

    /// Total keys of the batch (the row count of contiguous K/V).
    pub fn total_keys(&self) -> usize {
        self.context_lens.iter().sum()
    }
}
