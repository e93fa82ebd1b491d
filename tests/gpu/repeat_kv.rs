//! The repeat_kv kernel against the CPU definition, on the GPU. Skips (printing why) without
//! one; fails instead with PAGED_GQA_REQUIRE_GPU=1. Every `gpu_xxx` test has a twin `sim_xxx`
//! running the same body on the kernel emulator.

use crate::common;
use crate::setup::{differing, same_bits};

use half::{bf16, f16};
use paged_gqa::sim::SimDevice;
use paged_gqa::{cpu, cuda, Element, Error, GqaShape};

use common::{twins, Device};

/// Compares `repeat_kv` of `num_tokens` random rows with the CPU's, bit for bit. The output
/// starts poisoned (NaN bytes, which no copy of the finite input produces), so an element the
/// kernel forgets to write fails the comparison.
fn check<D: Device, T: Element>(dev: &D, test: &str, shape: GqaShape, num_tokens: usize) {
    let mut rng = common::rng(test);
    let x: Vec<T> = common::uniform(&mut rng, num_tokens * shape.kv_row_len())
        .into_iter()
        .map(T::from_f32)
        .collect();
    let expected = cpu::repeat_kv(&x, shape, num_tokens).unwrap();

    let src = dev.upload(&x);
    let mut dst = dev.alloc_poisoned::<T>(expected.len());
    dev.repeat_kv(shape, num_tokens, &src, &mut dst)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let got = dev.download(&dst);

    let wrong = differing(&got, &expected, same_bits);
    assert_eq!(
        wrong,
        0,
        "{test}: {wrong} of {} elements differ from the CPU repeat_kv",
        expected.len()
    );
}

fn llama3_8b<D: Device>(dev: &D, test: &str) {
    check::<D, bf16>(dev, test, GqaShape::new(32, 8, 128).unwrap(), 3 * 77);
}
twins!(
    gpu_repeat_kv_matches_cpu_for_llama3_8b_bf16,
    sim_repeat_kv_matches_cpu_for_llama3_8b_bf16,
    llama3_8b
);

fn odd_groups<D: Device>(dev: &D, test: &str) {
    for (n_heads, n_kv_heads, head_dim) in [
        (28, 4, 128),
        (14, 2, 64),
        (71, 1, 64),
        (40, 10, 96),
        (15, 3, 80),
    ] {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        check::<D, f16>(dev, test, shape, 33);
    }
}
twins!(
    gpu_repeat_kv_matches_cpu_for_odd_groups_f16,
    sim_repeat_kv_matches_cpu_for_odd_groups_f16,
    odd_groups
);

fn mha_and_d256<D: Device>(dev: &D, test: &str) {
    let what = format!("{test} (MHA)");
    check::<D, f32>(dev, &what, GqaShape::new(8, 8, 64).unwrap(), 19);
    let what = format!("{test} (d256)");
    check::<D, f32>(dev, &what, GqaShape::new(16, 8, 256).unwrap(), 41);
}
twins!(
    gpu_repeat_kv_matches_cpu_for_mha_and_d256_f32,
    sim_repeat_kv_matches_cpu_for_mha_and_d256_f32,
    mha_and_d256
);

/// A source one element short of the shape's rows is refused.
fn rejects_wrong_lengths<D: Device>(dev: &D) {
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let short = dev.upload(&vec![bf16::ZERO; 4 * shape.kv_row_len() - 1]);
    let mut dst = dev.upload(&vec![bf16::ZERO; 4 * shape.q_row_len()]);
    let err = dev.repeat_kv(shape, 4, &short, &mut dst).unwrap_err();
    assert!(
        matches!(err, Error::BufferLength { name: "src", .. }),
        "{err}"
    );
}

#[test]
fn gpu_repeat_kv_rejects_wrong_lengths_and_misaligned_views() {
    let test = "gpu_repeat_kv_rejects_wrong_lengths_and_misaligned_views";
    let Some(stream) = common::gpu_stream(test) else {
        return;
    };
    rejects_wrong_lengths(&stream);
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

#[test]
fn sim_repeat_kv_rejects_wrong_lengths_and_misaligned_views() {
    // Emulator buffers have no views, so the misaligned view (the same alignment check on both
    // backends, crate::launch::params) is GPU only; the short source runs here.
    rejects_wrong_lengths(&SimDevice::new());
}
