//! GqaShape, SeqLens, PagedLayout and BlockTables: valid inputs give the documented numbers,
//! every bad input is an error that carries the offending values.

use paged_gqa::{BlockTables, Error, GqaShape, KeyMask, PagedLayout, SeqLens};

#[test]
fn group_and_kv_head_follow_repeat_kv_not_modulo() {
    let shape = GqaShape::new(32, 8, 128).unwrap();
    assert_eq!(shape.group(), 4);
    let kv_heads: Vec<usize> = (0..32).map(|h| shape.kv_head(h).unwrap()).collect();
    let expected: Vec<usize> = (0..8).flat_map(|kv| [kv; 4]).collect(); // 0,0,0,0,1,1,1,1,...
    assert_eq!(kv_heads, expected);
    let modulo: Vec<usize> = (0..32).map(|h| h % shape.n_kv_heads()).collect();
    assert_ne!(
        kv_heads, modulo,
        "h % n_kv_heads would be the wrong mapping"
    );
}

#[test]
fn odd_group_sizes_map_consecutive_heads() {
    let qwen2_7b = GqaShape::new(28, 4, 128).unwrap();
    assert_eq!(qwen2_7b.group(), 7);
    assert_eq!(qwen2_7b.kv_head(6).unwrap(), 0);
    assert_eq!(qwen2_7b.kv_head(7).unwrap(), 1);
    let falcon_7b = GqaShape::new(71, 1, 64).unwrap();
    assert!((0..71).all(|h| falcon_7b.kv_head(h).unwrap() == 0));
    let mha = GqaShape::new(16, 16, 64).unwrap();
    assert!((0..16).all(|h| mha.kv_head(h).unwrap() == h));
}

#[test]
fn row_lengths_and_default_scale() {
    let shape = GqaShape::new(64, 8, 128).unwrap();
    assert_eq!(shape.q_row_len(), 64 * 128);
    assert_eq!(shape.kv_row_len(), 8 * 128);
    assert_eq!(shape.repeated().kv_row_len(), 64 * 128);
    assert_eq!(shape.repeated().group(), 1);
    assert!((shape.default_scale() - 1.0 / 128f64.sqrt()).abs() < 1e-15);
}

#[test]
fn zero_query_heads_is_an_error() {
    assert_eq!(
        GqaShape::new(0, 8, 128),
        Err(Error::ZeroHeads {
            n_heads: 0,
            n_kv_heads: 8
        })
    );
}

#[test]
fn zero_kv_heads_is_an_error() {
    assert_eq!(
        GqaShape::new(32, 0, 128),
        Err(Error::ZeroHeads {
            n_heads: 32,
            n_kv_heads: 0
        })
    );
}

#[test]
fn zero_head_dim_is_an_error() {
    assert_eq!(GqaShape::new(32, 8, 0), Err(Error::ZeroHeadDim));
}

#[test]
fn head_dim_not_a_multiple_of_8_is_an_error() {
    for head_dim in [1, 12, 100, 65] {
        let err = GqaShape::new(32, 8, head_dim).unwrap_err();
        assert_eq!(err, Error::HeadDimNotMultipleOf8 { head_dim });
        assert!(err.to_string().contains(&head_dim.to_string()), "{err}");
    }
}

#[test]
fn non_divisible_heads_name_both_counts() {
    let err = GqaShape::new(30, 8, 128).unwrap_err();
    assert_eq!(
        err,
        Error::HeadsNotDivisible {
            n_heads: 30,
            n_kv_heads: 8
        }
    );
    assert_eq!(
        err.to_string(),
        "n_heads 30 is not a multiple of n_kv_heads 8"
    );
    // More K/V heads than query heads is the same error.
    assert!(matches!(
        GqaShape::new(4, 8, 64),
        Err(Error::HeadsNotDivisible { .. })
    ));
}

#[test]
fn query_head_past_the_last_is_an_error() {
    let shape = GqaShape::new(32, 8, 128).unwrap();
    assert_eq!(
        shape.kv_head(32),
        Err(Error::QueryHeadOutOfRange {
            q_head: 32,
            n_heads: 32
        })
    );
}

#[test]
fn seq_lens_place_query_rows_bottom_right() {
    let lens = SeqLens::new(&[10, 3, 7], &[1, 3, 2]).unwrap();
    assert_eq!(lens.num_tokens(), 6);
    assert_eq!(lens.total_keys(), 20);
    assert_eq!(
        (lens.query_rows(0), lens.query_rows(1), lens.query_rows(2)),
        (0..1, 1..4, 4..6)
    );
    assert_eq!(lens.position(0, 0), 9);
    assert_eq!((lens.position(1, 0), lens.position(1, 2)), (0, 2));
    assert_eq!((lens.position(2, 0), lens.position(2, 1)), (5, 6));
}

#[test]
fn query_longer_than_context_is_an_error() {
    assert_eq!(
        SeqLens::new(&[4, 2], &[1, 3]),
        Err(Error::QueryLongerThanContext {
            seq: 1,
            query_len: 3,
            context_len: 2
        })
    );
}

#[test]
fn lengths_past_the_kernels_32_bit_counts_are_errors() {
    use paged_gqa::batch::{MAX_CONTEXT_LEN, MAX_TOKENS};
    assert!(SeqLens::new(&[MAX_CONTEXT_LEN], &[1]).is_ok());
    assert_eq!(
        SeqLens::new(&[5, MAX_CONTEXT_LEN + 1], &[1, 1]),
        Err(Error::TooLarge {
            what: "context_len",
            value: MAX_CONTEXT_LEN as u128 + 1,
            limit: MAX_CONTEXT_LEN as u128
        })
    );
    let half = MAX_CONTEXT_LEN / 2 + 200;
    assert_eq!(
        SeqLens::new(&[half, half], &[half, half]),
        Err(Error::TooLarge {
            what: "num_tokens",
            value: 2 * half as u128,
            limit: MAX_TOKENS as u128
        })
    );
}

#[test]
fn mismatched_batch_lengths_are_an_error() {
    assert_eq!(
        SeqLens::new(&[4, 2, 9], &[1, 1]),
        Err(Error::BatchLength {
            name: "query_lens",
            expected: 3,
            actual: 2
        })
    );
}

#[test]
fn negative_lengths_are_an_error() {
    assert_eq!(
        SeqLens::from_i32(&[4, -2], &[1, 1]),
        Err(Error::NegativeLength {
            name: "context_lens",
            seq: 1,
            value: -2
        })
    );
    assert_eq!(
        SeqLens::from_i32(&[4, 2], &[-1, 1]),
        Err(Error::NegativeLength {
            name: "query_lens",
            seq: 0,
            value: -1
        })
    );
}

#[test]
fn zero_block_size_is_an_error() {
    let shape = GqaShape::new(8, 2, 64).unwrap();
    assert_eq!(PagedLayout::new(shape, 10, 0), Err(Error::ZeroBlockSize));
}

#[test]
fn a_cache_too_large_to_index_is_an_error() {
    let shape = GqaShape::new(64, 8, 128).unwrap();
    let err = PagedLayout::new(shape, usize::MAX / 4, 256).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "cache elements",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn layout_offsets_are_row_major_and_exceed_i32_without_wrapping() {
    // A 40 GiB bf16 cache of Llama-3-70B K/V: element offsets pass 2^31.
    let shape = GqaShape::new(64, 8, 128).unwrap();
    let layout = PagedLayout::new(shape, 655_360, 16).unwrap();
    assert_eq!(layout.cache_len(), 655_360 * 16 * 8 * 128);
    let last = layout.offset(655_359, 15, 7);
    assert_eq!(last, layout.cache_len() - 128);
    assert!(last > i32::MAX as usize);
}

fn layout_4x16() -> PagedLayout {
    PagedLayout::new(GqaShape::new(8, 2, 64).unwrap(), 4, 16).unwrap()
}

#[test]
fn block_table_entries_past_the_context_are_padding() {
    let lens = SeqLens::decode(&[17, 16]).unwrap();
    let tables = BlockTables::new(&[3, 0, 1, -1], 2, &layout_4x16(), &lens).unwrap();
    assert_eq!(
        (tables.block(0, 0), tables.block(0, 1), tables.block(1, 0)),
        (3, 0, 1)
    );
}

#[test]
fn block_id_out_of_range_is_an_error() {
    let lens = SeqLens::decode(&[17, 16]).unwrap();
    assert_eq!(
        BlockTables::new(&[3, 4, 1, -1], 2, &layout_4x16(), &lens).unwrap_err(),
        Error::BlockIdOutOfRange {
            seq: 0,
            index: 1,
            block_id: 4,
            num_blocks: 4
        }
    );
}

#[test]
fn negative_block_id_in_use_is_an_error() {
    let lens = SeqLens::decode(&[17, 16]).unwrap();
    assert_eq!(
        BlockTables::new(&[3, 0, -1, -1], 2, &layout_4x16(), &lens).unwrap_err(),
        Error::BlockIdOutOfRange {
            seq: 1,
            index: 0,
            block_id: -1,
            num_blocks: 4
        }
    );
}

#[test]
fn leading_reclaimed_pages_are_accepted_and_counted_but_never_seen() {
    let lens = SeqLens::decode(&[40, 16]).unwrap();
    // Sequence 0's first two pages were reclaimed by a sliding window; its last one is held.
    let tables = BlockTables::new(&[-1, -1, 3, 0, -1, -1], 3, &layout_4x16(), &lens).unwrap();
    assert_eq!(tables.reclaimed(), &[2, 0]);
    let window = |w| KeyMask {
        causal: true,
        window_left: Some(w),
    };
    // The decode row at 39 with window_left 7 sees keys 32..=39: page 2 only.
    tables.check_visible(&lens, window(7)).unwrap();
    // With window_left 8 it would see key 31, in reclaimed page 1.
    assert_eq!(
        tables.check_visible(&lens, window(8)).unwrap_err(),
        Error::ReclaimedBlockVisible {
            seq: 0,
            index: 1,
            block_size: 16,
            first_visible_key: 31
        }
    );
    // A hole after a held page is not a reclaimed page.
    assert!(BlockTables::new(&[3, -1, 2, 0, -1, -1], 3, &layout_4x16(), &lens).is_err());
}

#[test]
fn context_longer_than_its_block_table_is_an_error() {
    let lens = SeqLens::decode(&[33, 1]).unwrap();
    let err = BlockTables::new(&[0, 1, 2, -1], 2, &layout_4x16(), &lens).unwrap_err();
    assert_eq!(
        err,
        Error::ContextExceedsBlockTable {
            seq: 0,
            context_len: 33,
            block_size: 16,
            needed_blocks: 3,
            max_blocks: 2
        }
    );
}

#[test]
fn block_table_of_the_wrong_length_is_an_error() {
    let lens = SeqLens::decode(&[3, 1]).unwrap();
    assert_eq!(
        BlockTables::new(&[0, 1, 2], 2, &layout_4x16(), &lens).unwrap_err(),
        Error::BufferLength {
            name: "block_tables",
            expected: 4,
            actual: 3
        }
    );
}
