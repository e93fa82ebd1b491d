//! One test body for two backends: the GPU (a CUDA stream) and the kernel emulator (a
//! [`SimDevice`], the same `kernels/*.cu` compiled for the CPU). The GPU tests are written
//! against [`Device`]; each `gpu_xxx` test runs its body on a CUDA stream (skipping without a
//! GPU) and its twin `sim_xxx` runs the same body on a fresh emulated device.

use paged_gqa::{AttendOptions, AttentionState};
use std::rc::Rc;
use std::sync::Arc;

use paged_gqa::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use paged_gqa::cuda::{self, CudaStorage, CudaStream};
use paged_gqa::fp8::{Fp8Element, KvScales};
use paged_gqa::plan::{AttendSchedule, KernelChoice};
use paged_gqa::sim::{self, SimDevice, SimStorage};
use paged_gqa::{DType, DeviceValue, Element, GqaShape, PageElement, PagedLayout, Result, SeqLens};

/// What the GPU tests need of a backend: its memory, the attention batch, the paged cache's
/// storage, the naive baseline and repeat_kv. Host copies panic on failure (test helpers);
/// launches return the backend's `Result` so tests can check what it refuses.
pub trait Device: Clone {
    /// A device buffer of `T`.
    type Buf<T: DeviceValue>;
    /// How this backend's tensor cores accumulate: truncating on a GPU, rounded to nearest on
    /// the emulator (its MMA is f32 arithmetic). Sets the error bound of the tensor-core kernel.
    const MMA_ACCUMULATION: paged_gqa::cpu::Accumulation;
    /// Whether this is the kernel emulator, which runs a kernel about 10^4 times slower than a
    /// GPU: the longest cases of a test body are shortened on it (each body says to what, and
    /// why that still tests what the GPU's size does).
    const EMULATED: bool;
    /// An attention batch over caller-managed pages (`cuda::AttendBatch`, `sim::AttendBatch`).
    type Attend;
    /// The step plan of this backend's cache storage.
    type Plan: AsRef<StepPlan>;
    /// The pages of a [`PagedCache`] on this backend (of the compute dtype, or fp8).
    type Storage<P: PageElement>: PageStorage<Plan = Self::Plan>;
    /// The naive path (gather, repeat_kv, per-head attention).
    type Naive<T: Element>;

    /// A device copy of `values`.
    fn upload<T: DeviceValue>(&self, values: &[T]) -> Self::Buf<T>;
    /// `len` elements whose bytes are all 0xff (NaN in f32, f16 and bf16), so an element a
    /// kernel does not write fails the checks.
    fn alloc_poisoned<T: DeviceValue>(&self, len: usize) -> Self::Buf<T>;
    /// A host copy of `buffer` (after the work queued before it).
    fn download<T: DeviceValue>(&self, buffer: &Self::Buf<T>) -> Vec<T>;
    /// [`download`](Self::download), widened to f64.
    fn download_f64<T: Element>(&self, buffer: &Self::Buf<T>) -> Vec<f64> {
        self.download(buffer).into_iter().map(Into::into).collect()
    }

    /// `AttendBatch::with_kernels`.
    fn attend_batch(
        &self,
        layout: PagedLayout,
        dtype: DType,
        lens: &SeqLens,
        tables: &[i32],
        max_blocks: usize,
        choice: KernelChoice,
    ) -> Result<Self::Attend>;
    /// The batch's launch plan.
    fn schedule(batch: &Self::Attend) -> &AttendSchedule;
    /// `AttendBatch::run` with `options`.
    #[allow(clippy::too_many_arguments)]
    fn run_attend<T: Element>(
        &self,
        batch: &Self::Attend,
        k_cache: &Self::Buf<T>,
        v_cache: &Self::Buf<T>,
        q: &Self::Buf<T>,
        out: &mut Self::Buf<T>,
        lse: &mut Self::Buf<f32>,
        options: &AttendOptions,
    ) -> Result<()>;
    /// `AttendBatch::run_fp8` with `options`.
    #[allow(clippy::too_many_arguments)]
    fn run_attend_fp8<T: Element, F: Fp8Element>(
        &self,
        batch: &Self::Attend,
        k_cache: &Self::Buf<F>,
        v_cache: &Self::Buf<F>,
        scales: &KvScales,
        q: &Self::Buf<T>,
        out: &mut Self::Buf<T>,
        lse: &mut Self::Buf<f32>,
        options: &AttendOptions,
    ) -> Result<()>;

    /// `num_blocks` zero-filled pages per tensor.
    fn storage<P: PageElement>(
        &self,
        config: CacheConfig,
        num_blocks: usize,
    ) -> Result<Self::Storage<P>>;
    /// All pages, `[num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]`.
    fn pages<P: PageElement>(storage: &Self::Storage<P>) -> &Self::Buf<P>;
    /// Overwrites every page element with `values`.
    fn fill_pages<P: PageElement>(&self, storage: &mut Self::Storage<P>, values: &[P]);
    /// `PagedCache::set_scales` (fp8 pages).
    fn set_scales<P: PageElement>(
        cache: &mut PagedCache<Self::Storage<P>>,
        layer: usize,
        scales: &KvScales,
    ) -> Result<()>;
    /// `PagedCache::write` (rows of the compute dtype `T`).
    fn write_kv<P: PageElement, T: Element>(
        cache: &mut PagedCache<Self::Storage<P>>,
        layer: usize,
        plan: &Self::Plan,
        k_new: &Self::Buf<T>,
        v_new: &Self::Buf<T>,
    ) -> Result<()>;
    /// `PagedCache::attend` with `options`.
    fn attend_cache<P: PageElement, T: Element>(
        cache: &PagedCache<Self::Storage<P>>,
        layer: usize,
        plan: &Self::Plan,
        q: &Self::Buf<T>,
        out: &mut Self::Buf<T>,
        lse: &mut Self::Buf<f32>,
        options: &AttendOptions,
    ) -> Result<()>;

    /// `merge_states`: `a`, `b` (outputs `[rows, head_dim]`, lse `[rows]`) into `out`, `lse`.
    fn merge_states<T: Element>(
        &self,
        head_dim: usize,
        a: (&Self::Buf<T>, &Self::Buf<f32>),
        b: (&Self::Buf<T>, &Self::Buf<f32>),
        out: &mut Self::Buf<T>,
        lse: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// `NaiveAttention::new`.
    fn naive<T: Element>(
        &self,
        layout: PagedLayout,
        lens: &SeqLens,
        tables: &[i32],
        max_blocks: usize,
    ) -> Result<Self::Naive<T>>;
    /// `NaiveAttention::run` with `options`.
    fn run_naive<T: Element>(
        &self,
        naive: &mut Self::Naive<T>,
        k_cache: &Self::Buf<T>,
        v_cache: &Self::Buf<T>,
        q: &Self::Buf<T>,
        out: &mut Self::Buf<T>,
        options: &AttendOptions,
    ) -> Result<()>;

    /// `repeat_kv`: `src` `[num_tokens, n_kv_heads, head_dim]` to `dst` `[num_tokens,
    /// n_heads, head_dim]`.
    fn repeat_kv<T: Element>(
        &self,
        shape: GqaShape,
        num_tokens: usize,
        src: &Self::Buf<T>,
        dst: &mut Self::Buf<T>,
    ) -> Result<()>;
}

/// `len` elements with every byte 0xff.
fn poisoned<T: DeviceValue>(len: usize) -> Vec<T> {
    let mut values = vec![T::zeroed(); len];
    bytemuck::cast_slice_mut::<T, u8>(&mut values).fill(0xff);
    values
}

/// A stream on the GPU for the test `test`, or `None` after [`gpu_or_skip`](super::gpu_or_skip)
/// printed why it skips.
pub fn gpu_stream(test: &str) -> Option<Arc<CudaStream>> {
    super::gpu_or_skip(test).map(|ctx| ctx.new_stream().unwrap())
}

/// `impl Device` for a backend whose module (`cuda`, `sim`) has the same API: every method
/// delegates to it, except the host copies and the page fill (`$own`), which each backend
/// writes itself.
macro_rules! device_impl {
    ($device:ty, $backend:ident, $buf:ident, $plan:ident, $storage:ident, $accumulation:ident, $emulated:literal, { $($own:item)* }) => {
        impl Device for $device {
            const MMA_ACCUMULATION: paged_gqa::cpu::Accumulation =
                paged_gqa::cpu::Accumulation::$accumulation;
            const EMULATED: bool = $emulated;
            type Buf<T: DeviceValue> = $backend::$buf<T>;
            type Attend = $backend::AttendBatch;
            type Plan = $backend::$plan;
            type Storage<P: PageElement> = $storage<P>;
            type Naive<T: Element> = $backend::NaiveAttention<T>;

            $($own)*

            fn attend_batch(
                &self,
                layout: PagedLayout,
                dtype: DType,
                lens: &SeqLens,
                tables: &[i32],
                max_blocks: usize,
                choice: KernelChoice,
            ) -> Result<Self::Attend> {
                $backend::AttendBatch::with_kernels(self, layout, dtype, lens, tables, max_blocks, choice)
            }
            fn schedule(batch: &Self::Attend) -> &AttendSchedule {
                batch.schedule()
            }
            fn run_attend<T: Element>(
                &self,
                batch: &Self::Attend,
                k_cache: &Self::Buf<T>,
                v_cache: &Self::Buf<T>,
                q: &Self::Buf<T>,
                out: &mut Self::Buf<T>,
                lse: &mut Self::Buf<f32>,
                options: &AttendOptions,
            ) -> Result<()> {
                batch.run(self, k_cache, v_cache, q, out, lse, options)
            }
            fn run_attend_fp8<T: Element, F: Fp8Element>(
                &self,
                batch: &Self::Attend,
                k_cache: &Self::Buf<F>,
                v_cache: &Self::Buf<F>,
                scales: &KvScales,
                q: &Self::Buf<T>,
                out: &mut Self::Buf<T>,
                lse: &mut Self::Buf<f32>,
                options: &AttendOptions,
            ) -> Result<()> {
                let scales = $backend::DeviceKvScales::new(self, scales)?;
                batch.run_fp8(self, k_cache, v_cache, &scales, q, out, lse, options)
            }

            fn storage<P: PageElement>(
                &self,
                config: CacheConfig,
                num_blocks: usize,
            ) -> Result<Self::Storage<P>> {
                $storage::new(self.clone(), config, num_blocks)
            }
            fn pages<P: PageElement>(storage: &Self::Storage<P>) -> &Self::Buf<P> {
                storage.pages()
            }
            fn set_scales<P: PageElement>(
                cache: &mut PagedCache<Self::Storage<P>>,
                layer: usize,
                scales: &KvScales,
            ) -> Result<()> {
                cache.set_scales(layer, scales)
            }
            fn write_kv<P: PageElement, T: Element>(
                cache: &mut PagedCache<Self::Storage<P>>,
                layer: usize,
                plan: &Self::Plan,
                k_new: &Self::Buf<T>,
                v_new: &Self::Buf<T>,
            ) -> Result<()> {
                cache.write(layer, plan, k_new, v_new)
            }
            fn attend_cache<P: PageElement, T: Element>(
                cache: &PagedCache<Self::Storage<P>>,
                layer: usize,
                plan: &Self::Plan,
                q: &Self::Buf<T>,
                out: &mut Self::Buf<T>,
                lse: &mut Self::Buf<f32>,
                options: &AttendOptions,
            ) -> Result<()> {
                cache.attend(layer, plan, q, out, lse, options)
            }
            fn merge_states<T: Element>(
                &self,
                head_dim: usize,
                a: (&Self::Buf<T>, &Self::Buf<f32>),
                b: (&Self::Buf<T>, &Self::Buf<f32>),
                out: &mut Self::Buf<T>,
                lse: &mut Self::Buf<f32>,
            ) -> Result<()> {
                $backend::merge_states(
                    self,
                    head_dim,
                    AttentionState::new(a.0, a.1),
                    AttentionState::new(b.0, b.1),
                    AttentionState::new(out, lse),
                )
            }

            fn naive<T: Element>(
                &self,
                layout: PagedLayout,
                lens: &SeqLens,
                tables: &[i32],
                max_blocks: usize,
            ) -> Result<Self::Naive<T>> {
                $backend::NaiveAttention::new(self, layout, lens, tables, max_blocks)
            }
            fn run_naive<T: Element>(
                &self,
                naive: &mut Self::Naive<T>,
                k_cache: &Self::Buf<T>,
                v_cache: &Self::Buf<T>,
                q: &Self::Buf<T>,
                out: &mut Self::Buf<T>,
                options: &AttendOptions,
            ) -> Result<()> {
                naive.run(self, k_cache, v_cache, q, out, options)
            }

            fn repeat_kv<T: Element>(
                &self,
                shape: GqaShape,
                num_tokens: usize,
                src: &Self::Buf<T>,
                dst: &mut Self::Buf<T>,
            ) -> Result<()> {
                $backend::repeat_kv(self, shape, num_tokens, src, dst)
            }
        }
    };
}

device_impl!(
    Arc<CudaStream>,
    cuda,
    CudaSlice,
    CudaStepPlan,
    CudaStorage,
    TensorCores,
    false,
    {
        fn upload<T: DeviceValue>(&self, values: &[T]) -> Self::Buf<T> {
            self.clone_htod(values).unwrap()
        }
        fn alloc_poisoned<T: DeviceValue>(&self, len: usize) -> Self::Buf<T> {
            self.upload(&poisoned::<T>(len))
        }
        fn download<T: DeviceValue>(&self, buffer: &Self::Buf<T>) -> Vec<T> {
            self.clone_dtoh(buffer).unwrap()
        }
        fn fill_pages<P: PageElement>(&self, storage: &mut Self::Storage<P>, values: &[P]) {
            self.memcpy_htod(values, storage.pages_mut()).unwrap();
        }
    }
);

device_impl!(
    Rc<SimDevice>,
    sim,
    SimBuffer,
    SimStepPlan,
    SimStorage,
    RoundToNearest,
    true,
    {
        fn upload<T: DeviceValue>(&self, values: &[T]) -> Self::Buf<T> {
            SimDevice::upload(self, values).unwrap()
        }
        fn alloc_poisoned<T: DeviceValue>(&self, len: usize) -> Self::Buf<T> {
            self.alloc(len).unwrap() // the emulator poisons every allocation
        }
        fn download<T: DeviceValue>(&self, buffer: &Self::Buf<T>) -> Vec<T> {
            buffer.to_vec() // launches complete before they return
        }
        fn fill_pages<P: PageElement>(&self, storage: &mut Self::Storage<P>, values: &[P]) {
            storage.pages_mut().copy_from(values).unwrap();
        }
    }
);
