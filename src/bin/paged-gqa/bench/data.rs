//! Random paged decode batches for the benchmarks: pages handed out in shuffled order, values
//! uniform in [-1, 1) (never zeros).

use paged_gqa::{Element, PagedLayout, SeqLens};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::Case;

/// The bookkeeping of a case: every sequence `context` keys long, with `case.query_len()` query
/// rows each (1 for decode, all of them for prefill).
pub struct Tables {
    pub layout: PagedLayout,
    pub lens: SeqLens,
    /// [batch, max_blocks]
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
}

pub fn rng() -> StdRng {
    StdRng::seed_from_u64(rand::rng().random())
}

pub fn tables(case: &Case, rng: &mut StdRng) -> paged_gqa::Result<Tables> {
    let max_blocks = case.context.div_ceil(case.page_size);
    let num_blocks = case.batch * max_blocks;
    let layout = PagedLayout::new(case.shape, num_blocks, case.page_size)?;
    let lens = SeqLens::new(
        &vec![case.context; case.batch],
        &vec![case.query_len(); case.batch],
    )?;
    let mut block_tables: Vec<i32> = (0..num_blocks as i32).collect();
    block_tables.shuffle(rng);
    Ok(Tables {
        layout,
        lens,
        block_tables,
        max_blocks,
    })
}

/// `n` random elements.
pub fn random<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect()
}
