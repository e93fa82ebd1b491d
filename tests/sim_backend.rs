//! The emulator backend's own API: poisoned allocations, host access, and the refusals that
//! keep a kernel from reading another device's memory or tables.

mod common;

use half::bf16;
use paged_gqa::sim::{AttendBatch, SimDevice};
use paged_gqa::AttendOptions;
use paged_gqa::{DType, Error, GqaShape};

#[test]
fn allocations_start_poisoned_and_uploads_read_back() {
    let device = SimDevice::new();
    let fresh = device.alloc::<f32>(1000).unwrap();
    assert!(fresh.as_slice().iter().all(|x| x.to_bits() == u32::MAX));
    let values: Vec<i32> = (0..77).collect();
    let mut buffer = device.upload(&values).unwrap();
    assert_eq!(buffer.to_vec(), values);
    assert_eq!(buffer.address() % 16, 0, "buffers are 16-byte aligned");
    let err = buffer.copy_from(&values[..5]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BufferLength {
                expected: 77,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn an_allocation_whose_size_overflows_is_an_error() {
    let err = SimDevice::new().alloc::<u64>(usize::MAX / 2).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[test]
fn batches_and_buffers_of_another_device_are_refused() {
    let mut rng = common::rng("batches_and_buffers_of_another_device_are_refused");
    let shape = GqaShape::new(8, 2, 64).unwrap();
    let case = common::PagedCase::random(&mut rng, shape, 16, &[20, 5], &[1, 1]);
    let typed = case.typed::<bf16>();
    let (a, b) = (SimDevice::new(), SimDevice::new());
    let batch = AttendBatch::new(
        &a,
        case.layout,
        DType::BF16,
        &case.lens,
        &case.tables,
        case.max_blocks,
    )
    .unwrap();
    let upload = |d: &std::rc::Rc<SimDevice>, x: &[bf16]| d.upload(x).unwrap();
    let (k, v, q) = (
        upload(&a, &typed.k_cache),
        upload(&a, &typed.v_cache),
        upload(&a, &typed.q),
    );
    let rows = case.lens.num_tokens() * shape.n_heads();
    let mut out = a.alloc::<bf16>(rows * 64).unwrap();
    let mut lse = a.alloc::<f32>(rows).unwrap();
    let options = AttendOptions::default();
    // The batch's tables and the buffers live on `a`: running on `b` would read `a`'s memory.
    let err = batch
        .run(&b, &k, &v, &q, &mut out, &mut lse, &options)
        .unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { .. }), "{err}");
    let foreign_q = upload(&b, &typed.q);
    let err = batch
        .run(&a, &k, &v, &foreign_q, &mut out, &mut lse, &options)
        .unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { what: "q" }), "{err}");
    assert!(
        out.as_slice().iter().all(|x| x.to_bits() == u16::MAX),
        "nothing ran"
    );
    batch
        .run(&a, &k, &v, &q, &mut out, &mut lse, &options)
        .unwrap();
    let got: Vec<f64> = out.as_slice().iter().map(|x| x.to_f64()).collect();
    let lse: Vec<f64> = lse.as_slice().iter().map(|&x| f64::from(x)).collect();
    // Auto may take either kernel: the looser of their bounds (the emulator's MMA rounds to nearest).
    use paged_gqa::cpu::{Accumulation, RoundingModel};
    let model = RoundingModel::f32_weights(paged_gqa::DType::BF16).either(
        RoundingModel::mma_weights(paged_gqa::DType::BF16, Accumulation::RoundToNearest),
    );
    common::check::compare(
        "sim backend",
        case.layout.shape(),
        &got,
        &lse,
        &typed.oracle,
        &typed.cond,
        &vec![true; case.lens.num_tokens()],
        model,
    );
}
