//! The candle ops on candle's CUDA tensors (feature `candle-cuda`): the same parity as the CPU
//! tests (plain candle attention in f64, on the CPU, as the reference), the CUDA write bit for
//! bit against the CPU write, the cache through an engine loop, the CUDA-only checks, and
//! candle's two kinds of CUDA device (the per-thread stream of `Device::new_cuda`, a stream of
//! its own with `new_cuda_with_stream`). Every test skips with a printed reason without a
//! GPU, and fails instead with PAGED_GQA_REQUIRE_GPU=1.

mod candle_common;
mod common;

use candle_common::{assert_error, check, cuda_model, Case, PAGES, RATIOS};
use candle_core::{DType, Device, IndexOp, Tensor};
use paged_gqa::cache::{CacheConfig, PagedCache};
use paged_gqa::candle::{paged_attention, write_kv, AttendOptions, CandleStorage, PagedMetadata};
use paged_gqa::{Error, GqaShape};
use rand::Rng;

/// candle's CUDA device 0 (`Device::new_cuda`, or `new_cuda_with_stream` with `own_stream`),
/// or `None` after printing why the test skips.
fn cuda_or_skip(test: &str, own_stream: bool) -> Option<Device> {
    common::gpu_or_skip(test)?;
    let device = if own_stream {
        Device::new_cuda_with_stream(0)
    } else {
        Device::new_cuda(0)
    };
    Some(
        device.unwrap_or_else(|e| {
            panic!("{test}: the driver has a GPU but candle cannot open it: {e}")
        }),
    )
}

const CUDA_DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// Every shape, page size and CUDA dtype, decode rows mixed with chunks and prompts, on the
/// GPU against the f64 reference computed on the CPU.
fn parity_on(test: &str, own_stream: bool) {
    let Some(gpu) = cuda_or_skip(test, own_stream) else {
        return;
    };
    let mut rng = common::rng(test);
    let cpu = Device::Cpu;
    let mut failures = Vec::new();
    let mut cases = 0;
    for (n_heads, n_kv_heads, head_dim) in RATIOS {
        let shape = GqaShape::new(n_heads, n_kv_heads, head_dim).unwrap();
        for block_size in PAGES {
            for dtype in CUDA_DTYPES {
                let long = rng.random_range(block_size + 1..=block_size + 300);
                let context_lens = [1, long, 40, rng.random_range(1..=600)];
                let query_lens = [1, rng.random_range(1..=16), 40, 1];
                let case = Case::random(
                    &mut rng,
                    shape,
                    block_size,
                    &context_lens,
                    &query_lens,
                    dtype,
                    &cpu,
                )
                .unwrap();
                let to_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
                let (out, lse) = paged_attention(
                    &to_gpu(&case.q),
                    &to_gpu(&case.k_cache),
                    &to_gpu(&case.v_cache),
                    &to_gpu(&case.block_tables(&cpu).unwrap()),
                    &to_gpu(&case.context_lens(&cpu).unwrap()),
                    Some(&to_gpu(&case.query_lens(&cpu).unwrap())),
                    &AttendOptions::default(),
                )
                .unwrap();
                assert!(out.device().same_device(&gpu) && lse.device().same_device(&gpu));
                let got = (out.to_device(&cpu).unwrap(), lse.to_device(&cpu).unwrap());
                let want = case.reference(None).unwrap();
                let what = format!(
                    "GPU: {n_heads}/{n_kv_heads} heads of {head_dim}, pages of {block_size}, \
                     {dtype:?}, context_lens {context_lens:?}, query_lens {query_lens:?}"
                );
                if let Err(e) = check(&what, dtype, (&got.0, &got.1), &want, cuda_model(dtype)) {
                    failures.push(e);
                }
                cases += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn gpu_attention_matches_plain_candle_attention() {
    parity_on("gpu_attention_matches_plain_candle_attention", false);
}

#[test]
fn gpu_attention_on_a_stream_of_its_own_matches_plain_candle_attention() {
    parity_on(
        "gpu_attention_on_a_stream_of_its_own_matches_plain_candle_attention",
        true,
    );
}

#[test]
fn gpu_write_is_the_cpu_write_bit_for_bit() {
    let Some(gpu) = cuda_or_skip("gpu_write_is_the_cpu_write_bit_for_bit", false) else {
        return;
    };
    let mut rng = common::rng("gpu_write_is_the_cpu_write_bit_for_bit");
    let cpu = Device::Cpu;
    let (num_blocks, block_size, n_kv, d, tokens) = (6, 16, 4, 128, 33);
    for dtype in CUDA_DTYPES {
        for shared in [false, true] {
            let random = |rng: &mut rand::rngs::StdRng, dims: &[usize]| {
                let n = dims.iter().product();
                Tensor::from_vec(candle_common::uniform(rng, n), dims, &cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let pair = random(&mut rng, &[2, num_blocks, block_size, n_kv, d]);
            let (k_new, v_new) = (
                random(&mut rng, &[tokens, n_kv, d]),
                random(&mut rng, &[tokens, n_kv, d]),
            );
            let mut slots: Vec<i64> = (0..(num_blocks * block_size) as i64).collect();
            rand::seq::SliceRandom::shuffle(&mut slots[..], &mut rng);
            slots.truncate(tokens);
            slots[3] = -1;
            let slot_mapping = Tensor::new(slots, &cpu).unwrap();
            let run = |dev: &Device| -> Tensor {
                let pair = pair.to_device(dev).unwrap().copy().unwrap();
                let (k_cache, v_cache) = if shared {
                    (pair.i(0).unwrap(), pair.i(1).unwrap())
                } else {
                    (
                        pair.i(0).unwrap().copy().unwrap(),
                        pair.i(1).unwrap().copy().unwrap(),
                    )
                };
                let on = |t: &Tensor| t.to_device(dev).unwrap();
                write_kv(
                    &on(&k_new),
                    &on(&v_new),
                    &k_cache,
                    &v_cache,
                    &on(&slot_mapping),
                )
                .unwrap();
                Tensor::stack(&[&k_cache, &v_cache], 0)
                    .unwrap()
                    .to_device(&cpu)
                    .unwrap()
            };
            let (on_cpu, on_gpu) = (run(&cpu), run(&gpu));
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(
                bits(&on_gpu),
                bits(&on_cpu),
                "{dtype:?}, shared storage {shared}"
            );
        }
    }
}

#[test]
fn gpu_cache_engine_loop_matches_the_cpu_cache() {
    // The same steps on a CPU and a GPU cache (fork included): every layer's output agrees
    // within the dtype's bound, and the GPU's pages equal the CPU's after every step.
    let Some(gpu) = cuda_or_skip("gpu_cache_engine_loop_matches_the_cpu_cache", false) else {
        return;
    };
    let mut rng = common::rng("gpu_cache_engine_loop_matches_the_cpu_cache");
    let cpu = Device::Cpu;
    let shape = GqaShape::new(32, 8, 128).unwrap();
    let config = CacheConfig::new(shape, 2, 16, paged_gqa::DType::BF16).unwrap();
    let mut caches = [
        PagedCache::new(CandleStorage::new(config, 32, &cpu).unwrap()).unwrap(),
        PagedCache::new(CandleStorage::new(config, 32, &gpu).unwrap()).unwrap(),
    ];
    let ids = |c: &mut PagedCache<CandleStorage>| (c.add_sequence(), c.add_sequence());
    let (a, b) = ids(&mut caches[0]);
    assert_eq!(ids(&mut caches[1]), (a, b));
    let mut steps: Vec<Vec<(paged_gqa::cache::SeqId, usize)>> = vec![vec![(a, 30), (b, 7)]];
    steps.extend((0..4).map(|_| vec![(a, 1), (b, 1)]));
    for (i, batch) in steps.iter().enumerate() {
        if i == 3 {
            let c0 = caches[0].fork(b).unwrap();
            assert_eq!(caches[1].fork(b).unwrap(), c0);
        }
        let plans: Vec<_> = caches.iter_mut().map(|c| c.plan(batch).unwrap()).collect();
        let tokens = plans[0].as_ref().num_new_tokens();
        for layer in 0..2 {
            let random = |rng: &mut rand::rngs::StdRng, heads: usize| {
                Tensor::from_vec(
                    candle_common::uniform(rng, tokens * heads * 128),
                    (tokens, heads, 128),
                    &cpu,
                )
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
            };
            let (k, v, q) = (
                random(&mut rng, 8),
                random(&mut rng, 8),
                random(&mut rng, 32),
            );
            let mut results = Vec::new();
            for (cache, plan) in caches.iter_mut().zip(&plans) {
                let dev = cache.storage().device().clone();
                let on = |t: &Tensor| t.to_device(&dev).unwrap();
                cache.write(layer, plan, &on(&k), &on(&v)).unwrap();
                let (out, lse) = cache
                    .attend(layer, plan, &on(&q), &AttendOptions::default())
                    .unwrap();
                results.push((out.to_device(&cpu).unwrap(), lse.to_device(&cpu).unwrap()));
            }
            let (cpu_out, gpu_out) = (&results[0], &results[1]);
            candle_common::check_against(
                &format!("step {i}, layer {layer}"),
                (&gpu_out.0, &gpu_out.1),
                (&cpu_out.0, &cpu_out.1),
                cuda_model(DType::BF16),
            )
            .unwrap();
        }
        let pages = |c: &PagedCache<CandleStorage>| {
            c.storage()
                .pages()
                .to_device(&cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(pages(&caches[1]), pages(&caches[0]), "pages after step {i}");
    }
}

#[test]
fn gpu_checks_refuse_what_the_kernels_lack() {
    let Some(gpu) = cuda_or_skip("gpu_checks_refuse_what_the_kernels_lack", false) else {
        return;
    };
    let tables = Tensor::new(&[[0u32]], &gpu).unwrap();
    let lens = Tensor::new(&[1u32], &gpu).unwrap();
    let options = AttendOptions::default();
    // head_dim 32 has no kernel.
    let q = Tensor::zeros((1, 4, 32), DType::BF16, &gpu).unwrap();
    let cache = Tensor::zeros((2, 16, 2, 32), DType::BF16, &gpu).unwrap();
    assert_error(
        paged_attention(&q, &cache, &cache, &tables, &lens, None, &options),
        Error::UnsupportedHeadDim {
            kernel: "attention",
            head_dim: 32,
            supported: "64, 80, 96, 128, 256",
        },
    );
    // f32 has no kernel.
    let q = Tensor::zeros((1, 4, 64), DType::F32, &gpu).unwrap();
    let cache = Tensor::zeros((2, 16, 2, 64), DType::F32, &gpu).unwrap();
    assert_error(
        paged_attention(&q, &cache, &cache, &tables, &lens, None, &options),
        Error::UnsupportedDType {
            kernel: "attention",
            dtype: paged_gqa::DType::F32,
        },
    );
}

#[test]
fn gpu_tensors_on_another_device_are_refused() {
    let Some(gpu) = cuda_or_skip("gpu_tensors_on_another_device_are_refused", false) else {
        return;
    };
    let cpu = Device::Cpu;
    let q = Tensor::zeros((1, 4, 64), DType::BF16, &gpu).unwrap();
    let cache = Tensor::zeros((2, 16, 2, 64), DType::BF16, &gpu).unwrap();
    let cpu_cache = cache.to_device(&cpu).unwrap();
    let tables = Tensor::new(&[[0u32]], &gpu).unwrap();
    let lens = Tensor::new(&[1u32], &gpu).unwrap();
    let options = AttendOptions::default();
    let device_error = |name, reference, expected: &Device, actual: &Device| Error::TensorDevice {
        name,
        reference,
        expected: format!("{:?}", expected.location()),
        actual: format!("{:?}", actual.location()),
    };
    assert_error(
        paged_attention(&q, &cpu_cache, &cache, &tables, &lens, None, &options),
        device_error("k_cache", "q", &gpu, &cpu),
    );
    assert_error(
        paged_attention(
            &q,
            &cache,
            &cache,
            &tables.to_device(&cpu).unwrap(),
            &lens,
            None,
            &options,
        ),
        device_error("block_tables", "q", &gpu, &cpu),
    );
    // Another candle Device of the same GPU has its own stream: refused, with a reason.
    let other = Device::new_cuda_with_stream(0).unwrap();
    let result = paged_attention(
        &q,
        &cache.to_device(&other).unwrap(),
        &cache,
        &tables,
        &lens,
        None,
        &options,
    );
    let text = result.unwrap_err().to_string();
    assert!(
        text.contains("another candle Device of the same GPU"),
        "{text}"
    );
    // A write of CPU rows into GPU caches.
    let rows = Tensor::zeros((1, 2, 64), DType::BF16, &cpu).unwrap();
    let slots = Tensor::new(&[0i64], &gpu).unwrap();
    assert_error(
        write_kv(&rows, &rows, &cache, &cache.copy().unwrap(), &slots),
        device_error("k", "k_cache", &gpu, &cpu),
    );
}

#[test]
fn gpu_metadata_uploads_once_and_serves_every_layer() {
    let Some(gpu) = cuda_or_skip("gpu_metadata_uploads_once_and_serves_every_layer", false) else {
        return;
    };
    let mut rng = common::rng("gpu_metadata_uploads_once_and_serves_every_layer");
    let cpu = Device::Cpu;
    let shape = GqaShape::new(64, 8, 128).unwrap();
    let case = Case::random(
        &mut rng,
        shape,
        16,
        &[300, 17, 1],
        &[1, 17, 1],
        DType::BF16,
        &cpu,
    )
    .unwrap();
    let meta = PagedMetadata::new(
        &case.block_tables(&cpu).unwrap(),
        &case.context_lens(&cpu).unwrap(),
        Some(&case.query_lens(&cpu).unwrap()),
    )
    .unwrap();
    let to_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
    for layer in 0..4 {
        let scale = 1.0 + layer as f64;
        let k_cache = (&case.k_cache * scale).unwrap();
        let v_cache = (&case.v_cache - scale).unwrap();
        let (out, lse) = meta
            .attention(
                &to_gpu(&case.q),
                &to_gpu(&k_cache),
                &to_gpu(&v_cache),
                &AttendOptions::default(),
            )
            .unwrap();
        let want = candle_common::reference_paged(
            &case.q,
            &k_cache,
            &v_cache,
            &case.tables,
            &case.lens,
            None,
        )
        .unwrap();
        let got = (out.to_device(&cpu).unwrap(), lse.to_device(&cpu).unwrap());
        check(
            &format!("layer {layer}"),
            DType::BF16,
            (&got.0, &got.1),
            &want,
            cuda_model(DType::BF16),
        )
        .unwrap();
    }
}
