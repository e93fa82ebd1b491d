//! The GPU test suite, one test binary (`cargo test --test gpu`): one module per kernel family.
//! Every `gpu_xxx` test skips (printing why) without a GPU, or fails with
//! `PAGED_GQA_REQUIRE_GPU=1`; its twin `sim_xxx` (`sim_full_xxx`: the slow ones) runs the same
//! body on the kernel emulator, so `cargo test --test gpu sim_ -- --skip sim_full_` is the quick
//! emulated subset.
//!
//! One binary, not six: each test binary links its own copy of the static kernel library (5 to
//! 7 MB), and the device check stages every GPU test binary for a machine whose carry is 64 MiB.

#[path = "../common/mod.rs"]
mod common;

mod attend;
mod baseline;
mod cache;
mod fp8;
mod prefix;
mod repeat_kv;
mod setup;
mod variants;
