//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::sync::Arc;

use paged_gqa::cuda::CudaContext;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fresh random generator; its seed is printed so a failure can be replayed with
/// `PAGED_GQA_SEED=<seed>`.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("PAGED_GQA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed {seed} (replay with PAGED_GQA_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [-1, 1), never all zero.
pub fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The GPU for a GPU test, or `None` after printing why the test skips. With
/// `PAGED_GQA_REQUIRE_GPU=1` a missing GPU fails the test instead of skipping it.
pub fn gpu_or_skip(test: &str) -> Option<Arc<CudaContext>> {
    match paged_gqa::cuda::context(0) {
        Ok(ctx) => Some(ctx),
        Err(why) => {
            if std::env::var("PAGED_GQA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: PAGED_GQA_REQUIRE_GPU=1 but no GPU: {why}");
            }
            // Straight to stderr, past the test harness's capture, so the skip is visible.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no GPU ({why}); set PAGED_GQA_REQUIRE_GPU=1 to fail instead"
            );
            None
        }
    }
}

/// Whether a test that needs nvcc at build time must fail (not skip) when it is missing.
pub fn require_nvcc() -> bool {
    std::env::var("PAGED_GQA_REQUIRE_NVCC").is_ok_and(|v| v == "1")
}
