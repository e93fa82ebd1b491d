//! Every check of the candle ops, on CPU tensors: each bad input is a `candle_core::Error`
//! carrying the crate's error message with the numbers, and a refused write leaves the caches
//! as they were. (Device mismatches need a second device: tests/candle_cuda.rs.)

mod candle_common;
mod common;

use candle_common::assert_error;
use candle_core::{DType, Device, IndexOp, Tensor};
use paged_gqa::candle::{paged_attention, write_kv, AttendOptions, PagedMetadata};
use paged_gqa::Error;

const DEV: Device = Device::Cpu;

/// A valid attention call's tensors: 8 query heads over 2 K/V heads of 64, 4 pages of 16,
/// two sequences (20 keys decoding, 5 prefilling).
struct Call {
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    query_lens: Tensor,
    options: AttendOptions,
}

impl Call {
    fn new() -> Self {
        let cache = || Tensor::randn(0f32, 1., (4, 16, 2, 64), &DEV).unwrap();
        Self {
            q: Tensor::randn(0f32, 1., (6, 8, 64), &DEV).unwrap(),
            k_cache: cache(),
            v_cache: cache(),
            block_tables: Tensor::new(&[[3u32, 1], [0, 0]], &DEV).unwrap(),
            context_lens: Tensor::new(&[20u32, 5], &DEV).unwrap(),
            query_lens: Tensor::new(&[1u32, 5], &DEV).unwrap(),
            options: AttendOptions::default(),
        }
    }

    /// Runs the valid call with `change` made to it, expecting `expected`.
    fn refused(change: impl FnOnce(&mut Self), expected: Error) {
        let mut call = Self::new();
        change(&mut call);
        assert_error(call.run(), expected);
    }

    fn run(&self) -> candle_core::Result<(Tensor, Tensor)> {
        paged_attention(
            &self.q,
            &self.k_cache,
            &self.v_cache,
            &self.block_tables,
            &self.context_lens,
            Some(&self.query_lens),
            &self.options,
        )
    }
}

fn shape_error(name: &'static str, expected: &str, actual: &[usize]) -> Error {
    Error::TensorShape {
        name,
        expected: expected.into(),
        actual: actual.to_vec(),
    }
}

fn dtype_error(name: &'static str, expected: &str, actual: &str) -> Error {
    Error::TensorDType {
        name,
        expected: expected.into(),
        actual: actual.into(),
    }
}

#[test]
fn the_valid_call_runs() {
    let (out, lse) = Call::new().run().unwrap();
    assert_eq!(out.dims(), &[6, 8, 64]);
    assert_eq!(lse.dims(), &[6, 8]);
}

#[test]
fn q_of_the_wrong_rank_is_refused() {
    Call::refused(
        |c| c.q = c.q.reshape((6, 512)).unwrap(),
        shape_error("q", "[num_tokens, n_heads, head_dim]", &[6, 512]),
    );
}

#[test]
fn caches_of_the_wrong_rank_are_refused() {
    Call::refused(
        |c| c.k_cache = c.k_cache.reshape((64, 2, 64)).unwrap(),
        shape_error(
            "k_cache",
            "[num_blocks, block_size, n_kv_heads, head_dim]",
            &[64, 2, 64],
        ),
    );
}

#[test]
fn a_v_cache_shaped_unlike_the_k_cache_is_refused() {
    Call::refused(
        |c| c.v_cache = Tensor::zeros((5, 16, 2, 64), DType::F32, &DEV).unwrap(),
        shape_error("v_cache", "[4, 16, 2, 64]", &[5, 16, 2, 64]),
    );
}

#[test]
fn a_q_head_dim_unlike_the_caches_is_refused() {
    Call::refused(
        |c| c.q = Tensor::zeros((6, 8, 128), DType::F32, &DEV).unwrap(),
        shape_error(
            "q",
            "[num_tokens, n_heads, 64] (the head_dim of k_cache)",
            &[6, 8, 128],
        ),
    );
}

#[test]
fn n_heads_not_a_multiple_of_n_kv_heads_is_refused() {
    Call::refused(
        |c| c.q = Tensor::zeros((6, 7, 64), DType::F32, &DEV).unwrap(),
        Error::HeadsNotDivisible {
            n_heads: 7,
            n_kv_heads: 2,
        },
    );
}

#[test]
fn a_head_dim_not_a_multiple_of_8_is_refused() {
    Call::refused(
        |c| {
            c.q = Tensor::zeros((6, 8, 60), DType::F32, &DEV).unwrap();
            c.k_cache = Tensor::zeros((4, 16, 2, 60), DType::F32, &DEV).unwrap();
            c.v_cache = c.k_cache.clone();
        },
        Error::HeadDimNotMultipleOf8 { head_dim: 60 },
    );
}

#[test]
fn a_page_size_the_kernels_lack_is_refused() {
    for block_size in [12, 512] {
        Call::refused(
            |c| {
                c.k_cache = Tensor::zeros((4, block_size, 2, 64), DType::F32, &DEV).unwrap();
                c.v_cache = c.k_cache.clone();
            },
            Error::InvalidBlockSize { block_size },
        );
    }
}

#[test]
fn a_cache_without_blocks_is_refused() {
    Call::refused(
        |c| {
            c.k_cache = Tensor::zeros((0, 16, 2, 64), DType::F32, &DEV).unwrap();
            c.v_cache = c.k_cache.clone();
        },
        Error::ZeroBlocks,
    );
}

#[test]
fn float_dtypes_other_than_f32_f16_bf16_are_refused() {
    Call::refused(
        |c| c.q = c.q.to_dtype(DType::F64).unwrap(),
        dtype_error("q", "f32, f16 or bf16", "f64"),
    );
}

#[test]
fn caches_of_another_dtype_than_q_are_refused() {
    Call::refused(
        |c| {
            c.k_cache = c.k_cache.to_dtype(DType::BF16).unwrap();
            c.v_cache = c.v_cache.to_dtype(DType::BF16).unwrap();
        },
        dtype_error("k_cache", "f32 (the dtype of q)", "bf16"),
    );
    Call::refused(
        |c| c.v_cache = c.v_cache.to_dtype(DType::F16).unwrap(),
        dtype_error("v_cache", "f32 (the dtype of k_cache)", "f16"),
    );
}

#[test]
fn table_and_length_dtypes_are_checked() {
    Call::refused(
        |c| c.block_tables = c.block_tables.to_dtype(DType::I64).unwrap(),
        dtype_error("block_tables", "u32 or i32", "i64"),
    );
    Call::refused(
        |c| c.context_lens = c.context_lens.to_dtype(DType::F32).unwrap(),
        dtype_error("context_lens", "u32 or i32 or i64", "f32"),
    );
    Call::refused(
        |c| c.query_lens = c.query_lens.to_dtype(DType::U8).unwrap(),
        dtype_error("query_lens", "u32 or i32 or i64", "u8"),
    );
}

#[test]
fn table_and_length_ranks_are_checked() {
    Call::refused(
        |c| c.block_tables = c.block_tables.flatten_all().unwrap(),
        shape_error("block_tables", "[batch, max_blocks]", &[4]),
    );
    Call::refused(
        |c| c.context_lens = c.context_lens.reshape((2, 1)).unwrap(),
        shape_error("context_lens", "[batch]", &[2, 1]),
    );
}

#[test]
fn strided_tensors_are_refused_not_guessed() {
    Call::refused(
        |c| {
            c.q = Tensor::zeros((8, 6, 64), DType::F32, &DEV)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
        },
        Error::NotContiguous {
            name: "q",
            shape: vec![6, 8, 64],
            stride: vec![64, 384, 1],
        },
    );
    Call::refused(
        |c| {
            // Every other K/V head of a 4-head cache: strided in the head dimension.
            c.k_cache = Tensor::zeros((4, 16, 4, 64), DType::F32, &DEV)
                .unwrap()
                .narrow(2, 0, 2)
                .unwrap();
        },
        Error::NotContiguous {
            name: "k_cache",
            shape: vec![4, 16, 2, 64],
            stride: vec![4096, 256, 64, 1],
        },
    );
}

#[test]
fn block_ids_outside_the_cache_are_refused() {
    for (tables, seq, index, block_id) in [
        (Tensor::new(&[[3u32, 4], [0, 0]], &DEV).unwrap(), 0, 1, 4i64),
        (
            Tensor::new(&[[3u32, 1], [u32::MAX, 0]], &DEV).unwrap(),
            1,
            0,
            u32::MAX as i64,
        ),
        (Tensor::new(&[[3i32, 1], [-1, 0]], &DEV).unwrap(), 1, 0, -1),
    ] {
        Call::refused(
            |c| c.block_tables = tables,
            Error::BlockIdOutOfRange {
                seq,
                index,
                block_id,
                num_blocks: 4,
            },
        );
    }
    // Entries past a sequence's pages are never read: any value is fine there.
    let mut call = Call::new();
    call.block_tables = Tensor::new(&[[3u32, 1], [0, u32::MAX]], &DEV).unwrap();
    call.run().unwrap();
}

#[test]
fn a_context_longer_than_its_table_row_is_refused() {
    Call::refused(
        |c| c.context_lens = Tensor::new(&[33u32, 5], &DEV).unwrap(),
        Error::ContextExceedsBlockTable {
            seq: 0,
            context_len: 33,
            block_size: 16,
            needed_blocks: 3,
            max_blocks: 2,
        },
    );
}

#[test]
fn more_query_rows_than_keys_are_refused() {
    Call::refused(
        |c| {
            c.query_lens = Tensor::new(&[1u32, 6], &DEV).unwrap();
            c.q = Tensor::zeros((7, 8, 64), DType::F32, &DEV).unwrap();
        },
        Error::QueryLongerThanContext {
            seq: 1,
            query_len: 6,
            context_len: 5,
        },
    );
}

#[test]
fn negative_lengths_are_refused() {
    Call::refused(
        |c| c.context_lens = Tensor::new(&[20i32, -5], &DEV).unwrap(),
        Error::NegativeLength {
            name: "context_lens",
            seq: 1,
            value: -5,
        },
    );
}

#[test]
fn lengths_for_another_batch_are_refused() {
    Call::refused(
        |c| c.context_lens = Tensor::new(&[20u32, 5, 1], &DEV).unwrap(),
        Error::BatchLength {
            name: "context_lens",
            expected: 2,
            actual: 3,
        },
    );
    Call::refused(
        |c| c.query_lens = Tensor::new(&[1u32], &DEV).unwrap(),
        Error::BatchLength {
            name: "query_lens",
            expected: 2,
            actual: 1,
        },
    );
}

#[test]
fn q_rows_unlike_the_query_lens_are_refused() {
    Call::refused(
        |c| c.q = Tensor::zeros((5, 8, 64), DType::F32, &DEV).unwrap(),
        shape_error(
            "q",
            "[6, n_heads, head_dim] (num_tokens = the sum of query_lens)",
            &[5, 8, 64],
        ),
    );
}

#[test]
fn a_scale_that_is_not_finite_is_refused() {
    Call::refused(
        |c| c.options = AttendOptions::new().with_scale(f64::NAN),
        Error::InvalidScale { scale: f64::NAN },
    );
}

/// A valid write's tensors: 3 rows of 2 K/V heads of 64 into 4 pages of 16.
struct WriteCall {
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
}

impl WriteCall {
    fn new() -> Self {
        Self {
            k: Tensor::randn(0f32, 1., (3, 2, 64), &DEV).unwrap(),
            v: Tensor::randn(0f32, 1., (3, 2, 64), &DEV).unwrap(),
            k_cache: Tensor::randn(0f32, 1., (4, 16, 2, 64), &DEV).unwrap(),
            v_cache: Tensor::randn(0f32, 1., (4, 16, 2, 64), &DEV).unwrap(),
            slot_mapping: Tensor::new(&[5i64, 63, -1], &DEV).unwrap(),
        }
    }

    fn snapshot(&self) -> (Vec<f32>, Vec<f32>) {
        let host = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (host(&self.k_cache), host(&self.v_cache))
    }

    /// Runs the valid write with `change` made to it, expecting `expected`, and checks that
    /// neither cache changed.
    fn refused(change: impl FnOnce(&mut Self), expected: Error) {
        let mut call = Self::new();
        change(&mut call);
        let before = call.snapshot();
        assert_error(call.run(), expected);
        assert!(before == call.snapshot(), "a refused write changed a cache");
    }

    fn run(&self) -> candle_core::Result<()> {
        write_kv(
            &self.k,
            &self.v,
            &self.k_cache,
            &self.v_cache,
            &self.slot_mapping,
        )
    }
}

#[test]
fn the_valid_write_runs() {
    WriteCall::new().run().unwrap();
}

#[test]
fn a_slot_past_the_cache_is_refused_and_nothing_is_written() {
    WriteCall::refused(
        |c| c.slot_mapping = Tensor::new(&[5i64, 64, 2], &DEV).unwrap(),
        Error::SlotOutOfRange {
            token: 1,
            slot: 64,
            num_slots: 64,
        },
    );
}

#[test]
fn a_slot_mapping_for_another_row_count_is_refused() {
    WriteCall::refused(
        |c| c.slot_mapping = Tensor::new(&[5i64, 6], &DEV).unwrap(),
        shape_error("slot_mapping", "[3] (one slot per row of k)", &[2]),
    );
    WriteCall::refused(
        |c| c.slot_mapping = Tensor::new(&[5.0f32, 6.0, 7.0], &DEV).unwrap(),
        dtype_error("slot_mapping", "i64 or i32 or u32", "f32"),
    );
}

#[test]
fn rows_shaped_unlike_the_caches_are_refused() {
    WriteCall::refused(
        |c| c.k = Tensor::zeros((3, 4, 64), DType::F32, &DEV).unwrap(),
        shape_error(
            "k",
            "[num_tokens, 2, 64] (n_kv_heads, head_dim of k_cache)",
            &[3, 4, 64],
        ),
    );
    WriteCall::refused(
        |c| c.v = Tensor::zeros((2, 2, 64), DType::F32, &DEV).unwrap(),
        shape_error("v", "[3, 2, 64]", &[2, 2, 64]),
    );
}

#[test]
fn rows_of_another_dtype_than_the_caches_are_refused() {
    WriteCall::refused(
        |c| c.v = c.v.to_dtype(DType::BF16).unwrap(),
        dtype_error("v", "f32 (the dtype of k_cache)", "bf16"),
    );
}

#[test]
fn a_cache_aliasing_an_input_is_refused_and_nothing_is_written() {
    // k is a view of k_cache's storage.
    WriteCall::refused(
        |c| c.k = c.k_cache.i(0).unwrap().narrow(0, 0, 3).unwrap(),
        Error::Aliased {
            written: "k_cache",
            other: "k",
        },
    );
    // v is a view of v_cache.
    WriteCall::refused(
        |c| c.v = c.v_cache.i(2).unwrap().narrow(0, 4, 3).unwrap(),
        Error::Aliased {
            written: "v_cache",
            other: "v",
        },
    );
    // v is a view of k_cache.
    WriteCall::refused(
        |c| c.v = c.k_cache.i(3).unwrap().narrow(0, 0, 3).unwrap(),
        Error::Aliased {
            written: "k_cache",
            other: "v",
        },
    );
    // The same tensor as both caches.
    WriteCall::refused(
        |c| c.v_cache = c.k_cache.clone(),
        Error::Aliased {
            written: "k_cache",
            other: "v_cache",
        },
    );
    // Overlapping views of one storage.
    let pages = Tensor::randn(0f32, 1., (5, 16, 2, 64), &DEV).unwrap();
    WriteCall::refused(
        |c| {
            c.k_cache = pages.narrow(0, 0, 4).unwrap();
            c.v_cache = pages.narrow(0, 1, 4).unwrap();
        },
        Error::Aliased {
            written: "k_cache",
            other: "v_cache",
        },
    );
}

#[test]
fn disjoint_views_of_one_storage_are_two_caches() {
    let pages = Tensor::randn(0f32, 1., (2, 4, 16, 2, 64), &DEV).unwrap();
    let call = WriteCall::new();
    let (k_cache, v_cache) = (pages.i(0).unwrap(), pages.i(1).unwrap());
    write_kv(&call.k, &call.v, &k_cache, &v_cache, &call.slot_mapping).unwrap();
    let row = |t: &Tensor, slot: usize| {
        t.reshape((64, 128))
            .unwrap()
            .i(slot)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let input = |t: &Tensor, token: usize| {
        t.i(token)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(row(&k_cache, 5), input(&call.k, 0));
    assert_eq!(row(&v_cache, 63), input(&call.v, 1));
}

#[test]
fn cache_plans_are_checked_against_the_cache() {
    let mut cache = candle_common::small_cache(2, paged_gqa::DType::F32);
    let seq = cache.add_sequence();
    let plan = cache.plan(&[(seq, 3)]).unwrap();
    let rows = Tensor::zeros((3, 2, 64), DType::F32, &DEV).unwrap();
    assert_error(
        cache.write(2, &plan, &rows, &rows),
        Error::LayerOutOfRange {
            layer: 2,
            num_layers: 2,
        },
    );
    let bf16 = rows.to_dtype(DType::BF16).unwrap();
    assert_error(
        cache.write(0, &plan, &bf16, &bf16),
        dtype_error("k", "f32 (the dtype of k_cache)", "bf16"),
    );
    let too_many = Tensor::zeros((4, 2, 64), DType::F32, &DEV).unwrap();
    assert_error(
        cache.write(0, &plan, &too_many, &too_many),
        shape_error("slot_mapping", "[4] (one slot per row of k)", &[3]),
    );
    cache.write(0, &plan, &rows, &rows).unwrap();
    let _next = cache.plan(&[(seq, 1)]).unwrap();
    let q = Tensor::zeros((3, 8, 64), DType::F32, &DEV).unwrap();
    let stale = cache.attend(0, &plan, &q, &AttendOptions::default());
    let text = stale.unwrap_err().to_string();
    assert!(text.contains("stale plan"), "{text}");
}

#[test]
fn metadata_from_host_checks_its_table_length() {
    let lens = paged_gqa::SeqLens::decode(&[3, 4]).unwrap();
    let result = PagedMetadata::from_host(lens, &[0, 1, 2], 2);
    assert_eq!(
        result.unwrap_err(),
        Error::BufferLength {
            name: "block_tables",
            expected: 4,
            actual: 3,
        }
    );
}
