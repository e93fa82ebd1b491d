//! Without a usable GPU (no kernels built, no libcuda, or no device) every CUDA entry point
//! answers `Error::CudaUnavailable` with a reason, and nothing panics. scripts/test also runs
//! this file against a build made with PAGED_GQA_NO_CUDA=1.

use paged_gqa::{cuda, Error};

#[test]
fn context_is_an_error_not_a_panic_without_a_gpu() {
    match cuda::context(0) {
        Ok(ctx) => eprintln!("a GPU is present ({:?}): nothing to check here", ctx.name()),
        Err(Error::CudaUnavailable { reason }) => {
            assert!(!reason.is_empty());
            eprintln!("CudaUnavailable: {reason}");
        }
        Err(other) => panic!("expected CudaUnavailable, got {other}"),
    }
}

#[test]
fn a_build_without_nvcc_says_so() {
    if cuda::KERNELS_BUILT {
        eprintln!(
            "kernels were built: the no-nvcc message is checked by the PAGED_GQA_NO_CUDA=1 run"
        );
        return;
    }
    let Err(Error::CudaUnavailable { reason }) = cuda::context(0) else {
        panic!("a build without kernels must not hand out a CUDA context");
    };
    assert!(reason.contains("without nvcc"), "{reason}");
}

#[test]
fn a_device_ordinal_past_the_last_device_is_unavailable() {
    let err = cuda::context(1 << 20).unwrap_err();
    assert!(matches!(err, Error::CudaUnavailable { .. }), "{err}");
}
