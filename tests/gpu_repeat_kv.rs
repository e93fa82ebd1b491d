//! The repeat_kv kernel against the CPU definition, on the GPU. Skips (printing why) without
//! one; fails instead with PAGED_GQA_REQUIRE_GPU=1.

mod common;

use half::{bf16, f16};
use paged_gqa::{cpu, cuda, Element, Error, GqaShape};

/// A bit pattern no copy of the input produces (the inputs are finite), written to the output
/// before the kernel runs so an element it forgets to write fails the comparison.
fn poison<T: Element>() -> T {
    bytemuck::pod_read_unaligned(&[0xffu8; 16][..std::mem::size_of::<T>()]) // a NaN in every dtype
}

fn check<T: Element + PartialEq + std::fmt::Debug>(test: &str, shape: GqaShape, num_tokens: usize) {
    let Some(ctx) = common::gpu_or_skip(test) else {
        return;
    };
    let mut rng = common::rng(test);
    let stream = ctx.new_stream().unwrap();
    let x: Vec<T> = common::uniform(&mut rng, num_tokens * shape.kv_row_len())
        .into_iter()
        .map(T::from_f32)
        .collect();
    let expected = cpu::repeat_kv(&x, shape, num_tokens).unwrap();

    let src = stream.clone_htod(&x).unwrap();
    let mut dst = stream
        .clone_htod(&vec![poison::<T>(); expected.len()])
        .unwrap();
    cuda::repeat_kv(&stream, shape, num_tokens, &src, &mut dst).unwrap();
    let got = stream.clone_dtoh(&dst).unwrap();

    let wrong = got
        .iter()
        .zip(&expected)
        .filter(|(g, e)| bytemuck::bytes_of(*g) != bytemuck::bytes_of(*e))
        .count();
    assert_eq!(
        wrong,
        0,
        "{test}: {wrong} of {} elements differ from the CPU repeat_kv",
        expected.len()
    );
}

#[test]
fn gpu_repeat_kv_matches_cpu_for_llama3_8b_bf16() {
    check::<bf16>(
        "gpu_repeat_kv_matches_cpu_for_llama3_8b_bf16",
        GqaShape::new(32, 8, 128).unwrap(),
        3 * 77,
    );
}

#[test]
fn gpu_repeat_kv_matches_cpu_for_odd_groups_f16() {
    for (n_heads, n_kv_heads, head_dim) in [
        (28, 4, 128),
        (14, 2, 64),
        (71, 1, 64),
        (40, 10, 96),
        (15, 3, 80),
    ] {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        check::<f16>("gpu_repeat_kv_matches_cpu_for_odd_groups_f16", shape, 33);
    }
}

#[test]
fn gpu_repeat_kv_matches_cpu_for_mha_and_d256_f32() {
    check::<f32>(
        "gpu_repeat_kv_mha_f32",
        GqaShape::new(8, 8, 64).unwrap(),
        19,
    );
    check::<f32>(
        "gpu_repeat_kv_d256_f32",
        GqaShape::new(16, 8, 256).unwrap(),
        41,
    );
}

#[test]
fn gpu_repeat_kv_rejects_wrong_lengths_and_misaligned_views() {
    let test = "gpu_repeat_kv_rejects_wrong_lengths_and_misaligned_views";
    let Some(ctx) = common::gpu_or_skip(test) else {
        return;
    };
    let stream = ctx.new_stream().unwrap();
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let src = stream
        .alloc_zeros::<bf16>(4 * shape.kv_row_len() + 8)
        .unwrap();
    let mut dst = stream.alloc_zeros::<bf16>(4 * shape.q_row_len()).unwrap();

    let short = src.slice(..4 * shape.kv_row_len() - 1);
    let err = cuda::repeat_kv(&stream, shape, 4, &short, &mut dst).unwrap_err();
    assert!(
        matches!(err, Error::BufferLength { name: "src", .. }),
        "{err}"
    );

    // A view starting one element (2 bytes) in is not 16-byte aligned.
    let shifted = src.slice(1..1 + 4 * shape.kv_row_len());
    let err = cuda::repeat_kv(&stream, shape, 4, &shifted, &mut dst).unwrap_err();
    assert!(
        matches!(err, Error::Misaligned { name: "src", .. }),
        "{err}"
    );
}
