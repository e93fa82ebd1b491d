//! Shared-prefix (cascade) attention on the CPU: a system prompt's K/V stored once, in pages
//! every request of a batch reads, and each request's own keys in its own pages.
//!
//! 1. One non-causal pass over the prefix's pages: every query row of every request sees all of
//!    the prefix (it precedes them all).
//! 2. One causal pass over each request's own pages.
//! 3. `merge_states` combines the two (LSE in natural log), which must equal causal attention
//!    over prefix + own keys: asserted against the f64 oracle over the concatenated tables.
//!
//! `cargo run --example shared_prefix`

use paged_gqa::cpu::{self, PagedKv};
use paged_gqa::{AttendOptions, AttentionState, GqaShape, PagedLayout, SeqLens};

fn main() -> Result<(), paged_gqa::Error> {
    let shape = GqaShape::new(32, 8, 128)?; // Llama-3-8B heads
    let block_size = 16;
    let prefix_pages = 4; // a 64-token system prompt, stored once
    let prefix = prefix_pages * block_size;
    // Three requests: own keys (their new query rows included) and query rows this step.
    let own = [20usize, 7, 33];
    let queries = [20usize, 1, 3]; // a prompt, a decode token, speculation
    let own_pages: Vec<usize> = own.iter().map(|n| n.div_ceil(block_size)).collect();
    let num_blocks = prefix_pages + own_pages.iter().sum::<usize>();
    let layout = PagedLayout::new(shape, num_blocks, block_size)?;

    // Deterministic pseudo-random values (a small LCG; no dependency).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let k_cache = values(layout.cache_len()); // [num_blocks, block_size, n_kv_heads, head_dim]
    let v_cache = values(layout.cache_len());
    let num_tokens: usize = queries.iter().sum();
    let q = values(num_tokens * shape.q_row_len()); // [num_tokens, n_heads, head_dim]

    // Pages 0..4 hold the prefix; each request's own pages follow, in order.
    let mut next = prefix_pages;
    let own_tables: Vec<Vec<i32>> = own_pages
        .iter()
        .map(|&n| {
            let pages = (next..next + n).map(|p| p as i32).collect();
            next += n;
            pages
        })
        .collect();
    let table = |rows: &[Vec<i32>]| -> (Vec<i32>, usize) {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let flat = rows
            .iter()
            .flat_map(|r| r.iter().copied().chain(std::iter::repeat(-1)).take(width))
            .collect();
        (flat, width)
    };
    let prefix_row: Vec<i32> = (0..prefix_pages as i32).collect();

    // 1. The prefix pass: every request's rows over the same prefix pages, not causal.
    let (prefix_tables, prefix_width) = table(&vec![prefix_row.clone(); own.len()]);
    let prefix_lens = SeqLens::new(&[prefix; 3], &queries)?;
    let kv = PagedKv::new(
        layout,
        &prefix_lens,
        &prefix_tables,
        prefix_width,
        &k_cache,
        &v_cache,
    )?;
    let rows = num_tokens * shape.n_heads();
    let (mut prefix_out, mut prefix_lse) = (vec![0.0; rows * shape.head_dim()], vec![0.0; rows]);
    let not_causal = AttendOptions::new().with_causal(false);
    cpu::attend(&q, &kv, &not_causal, &mut prefix_out, &mut prefix_lse)?;

    // 2. Each request's own pages, causal.
    let (own_table, own_width) = table(&own_tables);
    let own_lens = SeqLens::new(&own, &queries)?;
    let kv = PagedKv::new(layout, &own_lens, &own_table, own_width, &k_cache, &v_cache)?;
    let (mut own_out, mut own_lse) = (vec![0.0; rows * shape.head_dim()], vec![0.0; rows]);
    cpu::attend(&q, &kv, &AttendOptions::new(), &mut own_out, &mut own_lse)?;

    // 3. Merge: attention over prefix + own keys.
    let (mut out, mut lse) = (vec![0.0; rows * shape.head_dim()], vec![0.0; rows]);
    cpu::merge_states(
        shape.head_dim(),
        AttentionState::new(&prefix_out[..], &prefix_lse[..]),
        AttentionState::new(&own_out[..], &own_lse[..]),
        AttentionState::new(&mut out[..], &mut lse[..]),
    )?;

    // The oracle: causal attention over the concatenated tables, in f64.
    let full_rows: Vec<Vec<i32>> = own_tables
        .iter()
        .map(|own| prefix_row.iter().chain(own).copied().collect())
        .collect();
    let (full_table, full_width) = table(&full_rows);
    let full_lens = SeqLens::new(&own.map(|n| prefix + n), &queries)?;
    let kv = PagedKv::new(
        layout,
        &full_lens,
        &full_table,
        full_width,
        &k_cache,
        &v_cache,
    )?;
    let oracle = cpu::attention(&q, &kv, &AttendOptions::new())?;
    let out_err = out
        .iter()
        .zip(&oracle.out)
        .map(|(&a, b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    let lse_err = lse
        .iter()
        .zip(&oracle.lse)
        .map(|(&a, b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    println!(
        "shared prefix of {prefix} keys read once for {} requests ({num_tokens} query rows): \
         merged against full attention, max |out error| {out_err:.2e}, max |lse error| {lse_err:.2e}",
        own.len()
    );
    assert!(
        out_err < 1e-5 && lse_err < 1e-5,
        "the merge must equal full attention"
    );
    Ok(())
}
