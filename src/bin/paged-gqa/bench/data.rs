//! Random paged decode batches for the benchmarks: pages handed out in shuffled order, values
//! uniform in [-1, 1) (never zeros).

use paged_gqa::fp8::{self, Fp8Element, KvScales};
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

/// Random K and V pages of `layout` stored in fp8 (`F`): values uniform in [-1, 1) quantized
/// under per-head scales from their own maxima, and those scales.
pub fn fp8_kv<F: Fp8Element>(
    rng: &mut StdRng,
    layout: &PagedLayout,
) -> paged_gqa::Result<(Vec<F>, Vec<F>, KvScales)> {
    let shape = layout.shape();
    let (n_kv, d) = (shape.n_kv_heads(), shape.head_dim());
    let values = |rng: &mut StdRng| -> Vec<f32> {
        (0..layout.cache_len())
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect()
    };
    let (k, v) = (values(rng), values(rng));
    let scales = KvScales::from_amax(
        F::FORMAT,
        &fp8::head_amax(&k, n_kv, d)?,
        &fp8::head_amax(&v, n_kv, d)?,
    )?;
    let quantize = |x: &[f32], s: &[f32]| -> Vec<F> {
        x.iter()
            .enumerate()
            .map(|(i, &x)| F::quantize(x, s[(i / d) % n_kv]))
            .collect()
    };
    Ok((quantize(&k, scales.k()), quantize(&v, scales.v()), scales))
}
