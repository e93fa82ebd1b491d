//! The paged K/V cache the forward writes and attends through, over the crate's backends:
//! candle tensors ([`CandleStorage`]: the CPU, or CUDA with feature `candle-cuda`), the real
//! CUDA kernels on the emulator ([`SimStorage`]), and host pages of any element
//! ([`CpuStorage`]: f32, f16, bf16, and the fp8 formats, which candle's storage does not hold).

use std::rc::Rc;

use candle_core::{DType as CandleDType, Device, Result, Tensor};
use half::{bf16, f16};
use paged_gqa::cache::{
    Admission, CacheConfig, PageStorage, PagedCache, PrefixStats, SeqId, StepPlan,
};
use paged_gqa::candle::CandleStorage;
use paged_gqa::cpu::CpuStorage;
use paged_gqa::fp8::{head_amax, Fp8E4M3, Fp8E5M2, KvScales};
use paged_gqa::sim::{SimBuffer, SimDevice, SimStorage};
use paged_gqa::{AttendOptions, DType, Element};

/// What the engine asks of a paged cache: the crate's bookkeeping (sequences, forks, plans),
/// and per layer the write of the step's new K/V and the attention of its queries.
pub trait KvCache {
    /// The geometry.
    fn config(&self) -> &CacheConfig;
    /// Pages per (layer, K or V) tensor.
    fn num_blocks(&self) -> usize;
    /// Pages nobody holds (cached ones included).
    fn num_free_blocks(&self) -> usize;
    /// A sequence for `prompt`, holding its longest cached prefix already.
    fn add_sequence_with_prompt(&mut self, prompt: &[u32]) -> paged_gqa::Result<Admission>;
    /// Token ids `seq` will hold next (a sampled token, before the step that computes it).
    fn append_tokens(&mut self, seq: SeqId, tokens: &[u32]) -> paged_gqa::Result<()>;
    /// A sequence sharing every block of `seq` (copy-on-write).
    fn fork(&mut self, seq: SeqId) -> paged_gqa::Result<SeqId>;
    /// Releases `seq`'s blocks.
    fn free(&mut self, seq: SeqId) -> paged_gqa::Result<()>;
    /// Plans a step (`(sequence, new tokens)` each); on `OutOfBlocks` nothing changes.
    fn plan(&mut self, batch: &[(SeqId, usize)]) -> paged_gqa::Result<()>;
    /// Writes `layer`'s new K/V (`[tokens, n_kv_heads, head_dim]` f32) and attends `q`
    /// (`[tokens, n_heads, head_dim]` f32) over the pages: `[tokens, n_heads, head_dim]` f32.
    fn write_and_attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor>;
    /// The prefix cache's counters.
    fn prefix_stats(&self) -> PrefixStats;
    /// Starts recording each (layer, K/V head)'s amax of the K and V written (calibration).
    fn record_amax(&mut self);
    /// The amax recorded, `[num_layers]` of (K `[n_kv_heads]`, V `[n_kv_heads]`).
    fn amax(&self) -> Option<&[(Vec<f32>, Vec<f32>)]>;
}

/// A backend's per-layer write and attention over its own pages.
pub trait Pages: PageStorage + Sized {
    /// Writes `k`, `v` under `plan` into `layer` and attends `q`: see
    /// [`KvCache::write_and_attend`].
    fn write_and_attend(
        cache: &mut PagedCache<Self>,
        plan: &Self::Plan,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor>;
}

/// A [`PagedCache`] and the plan of the step being computed.
pub struct Paged<S: Pages> {
    cache: PagedCache<S>,
    plan: Option<S::Plan>,
    amax: Option<Vec<(Vec<f32>, Vec<f32>)>>,
}

impl<S: Pages> Paged<S> {
    pub fn new(storage: S) -> paged_gqa::Result<Self> {
        Ok(Self {
            cache: PagedCache::new(storage)?,
            plan: None,
            amax: None,
        })
    }

    /// The cache, for what the trait does not cover.
    pub fn cache_mut(&mut self) -> &mut PagedCache<S> {
        &mut self.cache
    }
}

/// The values of `t` as a flat f32 vector.
pub fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(CandleDType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl<S: Pages> KvCache for Paged<S> {
    fn config(&self) -> &CacheConfig {
        self.cache.config()
    }
    fn num_blocks(&self) -> usize {
        self.cache.storage().num_blocks()
    }
    fn num_free_blocks(&self) -> usize {
        self.cache.num_free_blocks()
    }
    fn add_sequence_with_prompt(&mut self, prompt: &[u32]) -> paged_gqa::Result<Admission> {
        self.cache.add_sequence_with_prompt(prompt, b"")
    }
    fn append_tokens(&mut self, seq: SeqId, tokens: &[u32]) -> paged_gqa::Result<()> {
        self.cache.append_tokens(seq, tokens)
    }
    fn fork(&mut self, seq: SeqId) -> paged_gqa::Result<SeqId> {
        self.cache.fork(seq)
    }
    fn free(&mut self, seq: SeqId) -> paged_gqa::Result<()> {
        self.cache.free(seq)
    }
    fn plan(&mut self, batch: &[(SeqId, usize)]) -> paged_gqa::Result<()> {
        self.plan = None;
        self.plan = Some(self.cache.plan(batch)?);
        Ok(())
    }
    fn write_and_attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("write_and_attend before plan"))?;
        if let Some(amax) = &mut self.amax {
            let shape = self.cache.config().shape();
            let (h, d) = (shape.n_kv_heads(), shape.head_dim());
            let (ka, va) = (
                head_amax(&host_f32(k)?, h, d)?,
                head_amax(&host_f32(v)?, h, d)?,
            );
            let (k_max, v_max) = &mut amax[layer];
            for i in 0..h {
                k_max[i] = k_max[i].max(ka[i]);
                v_max[i] = v_max[i].max(va[i]);
            }
        }
        S::write_and_attend(&mut self.cache, plan, layer, q, k, v)
    }
    fn prefix_stats(&self) -> PrefixStats {
        self.cache.prefix_stats()
    }
    fn record_amax(&mut self) {
        let config = self.cache.config();
        let h = config.shape().n_kv_heads();
        self.amax = Some(vec![(vec![0.0; h], vec![0.0; h]); config.num_layers()]);
    }
    fn amax(&self) -> Option<&[(Vec<f32>, Vec<f32>)]> {
        self.amax.as_deref()
    }
}

/// The candle dtype of a compute dtype.
fn candle_dtype(dtype: DType) -> Result<CandleDType> {
    Ok(match dtype {
        DType::F32 => CandleDType::F32,
        DType::F16 => CandleDType::F16,
        DType::BF16 => CandleDType::BF16,
        other => candle_core::bail!("no candle compute dtype for {other:?}"),
    })
}

impl Pages for CandleStorage {
    fn write_and_attend(
        cache: &mut PagedCache<Self>,
        plan: &Self::Plan,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let dtype = candle_dtype(cache.config().dtype())?;
        let device = cache.storage().device().clone();
        let to = |t: &Tensor| t.to_device(&device)?.to_dtype(dtype)?.contiguous();
        cache.write(layer, plan, &to(k)?, &to(v)?)?;
        let (out, _lse) = cache.attend(layer, plan, &to(q)?, &AttendOptions::default())?;
        out.to_dtype(CandleDType::F32)?.to_device(q.device())
    }
}

/// An element of host pages: how the step's f32 K/V rows are stored into them.
pub trait HostPage: Copy + Default + Into<f32> + Sync {
    /// Writes `k`, `v` (`[tokens, n_kv_heads, head_dim]` f32) under `plan` into `layer`.
    fn write(
        cache: &mut PagedCache<CpuStorage<Self>>,
        plan: &StepPlan,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> paged_gqa::Result<()>;
}

/// `impl HostPage for $t`, its write being `$body` over `cache`, `plan`, `layer`, `k`, `v`.
macro_rules! host_page {
    ($t:ty, |$cache:ident, $plan:ident, $layer:ident, $k:ident, $v:ident| $body:expr) => {
        impl HostPage for $t {
            fn write(
                $cache: &mut PagedCache<CpuStorage<Self>>,
                $plan: &StepPlan,
                $layer: usize,
                $k: &[f32],
                $v: &[f32],
            ) -> paged_gqa::Result<()> {
                $body
            }
        }
    };
}
// Plain elements: rows converted, stored as they are.
host_page! { f32, |cache, plan, layer, k, v| cache.write(layer, plan, k, v) }
host_page! { bf16, |cache, plan, layer, k, v| {
    cache.write(layer, plan, &converted(k, bf16::from_f32), &converted(v, bf16::from_f32))
} }
host_page! { f16, |cache, plan, layer, k, v| {
    cache.write(layer, plan, &converted(k, f16::from_f32), &converted(v, f16::from_f32))
} }
// fp8 elements: rows quantized under the layer's scales ([`PagedCache::write_quantized`]).
host_page! { Fp8E4M3, |cache, plan, layer, k, v| cache.write_quantized(layer, plan, k, v) }
host_page! { Fp8E5M2, |cache, plan, layer, k, v| cache.write_quantized(layer, plan, k, v) }

/// `rows` converted element by element.
fn converted<T>(rows: &[f32], from: fn(f32) -> T) -> Vec<T> {
    rows.iter().copied().map(from).collect()
}

/// Host pages: rows stored as [`HostPage`] says, then the crate's f32 CPU attention.
impl<T: HostPage> Pages for CpuStorage<T> {
    fn write_and_attend(
        cache: &mut PagedCache<Self>,
        plan: &Self::Plan,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        T::write(cache, plan, layer, &host_f32(k)?, &host_f32(v)?)?;
        let dims = q.dims().to_vec(); // [tokens, n_heads, head_dim]
        let q_host = host_f32(q)?;
        let mut out = vec![0f32; q_host.len()];
        let mut lse = vec![0f32; dims[0] * dims[1]];
        cache.attend(
            layer,
            plan,
            &q_host,
            &mut out,
            &mut lse,
            &AttendOptions::default(),
        )?;
        Tensor::from_vec(out, dims, q.device())
    }
}

/// The emulator: the real write and attention kernels, q/k/v/out in the compute dtype `T`.
impl<T: Element + Into<f32>> Pages for SimStorage<T> {
    fn write_and_attend(
        cache: &mut PagedCache<Self>,
        plan: &Self::Plan,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let device = cache.storage().device().clone();
        let upload = |t: &Tensor| -> Result<SimBuffer<T>> {
            let rows: Vec<T> = host_f32(t)?.into_iter().map(T::from_f32).collect();
            Ok(device.upload(&rows)?)
        };
        cache.write(layer, plan, &upload(k)?, &upload(v)?)?;
        let dims = q.dims().to_vec(); // [tokens, n_heads, head_dim]
        let q_dev = upload(q)?;
        let mut out = device.alloc::<T>(q_dev.len())?;
        let mut lse = device.alloc::<f32>(dims[0] * dims[1])?;
        cache.attend(
            layer,
            plan,
            &q_dev,
            &mut out,
            &mut lse,
            &AttendOptions::default(),
        )?;
        let out: Vec<f32> = out.to_vec().into_iter().map(Into::into).collect();
        Tensor::from_vec(out, dims, q.device())
    }
}

/// Where attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// candle's CPU tensors and the crate's CPU attention.
    Cpu,
    /// The real kernels on the emulator (the rest of the model on candle's CPU).
    Sim,
    /// The crate's CUDA kernels on candle's CUDA tensors (feature `candle-cuda`).
    Cuda,
}

impl Backend {
    /// Parses a `--backend` value.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "cpu" => Self::Cpu,
            "sim" => Self::Sim,
            "cuda" => Self::Cuda,
            other => {
                return Err(format!(
                    "unknown --backend {other:?} (expected cpu, sim or cuda)"
                ))
            }
        })
    }
}

/// The page element types the engine can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    BF16,
    Fp8E4M3,
    Fp8E5M2,
}

impl KvDtype {
    /// Parses a `--kv-dtype` value.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "fp8-e4m3" => Self::Fp8E4M3,
            "fp8-e5m2" => Self::Fp8E5M2,
            other => {
                return Err(format!(
                    "unknown --kv-dtype {other:?} (expected bf16, f16, f32, fp8-e4m3 or fp8-e5m2)"
                ))
            }
        })
    }

    /// The crate's page dtype.
    pub fn page_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::Fp8E4M3 => DType::F8E4M3,
            Self::Fp8E5M2 => DType::F8E5M2,
        }
    }
}

/// Builds a cache of `num_blocks` pages of `block_size` tokens for a model of `shape` over
/// `backend`. fp8 pages need `scales` (one per layer); they are host pages ([`CpuStorage`],
/// f32 compute) on the CPU backend, and emulated pages read by the real kernels on `sim`.
#[allow(clippy::too_many_arguments)]
pub fn build(
    backend: Backend,
    kv_dtype: KvDtype,
    shape: paged_gqa::GqaShape,
    num_layers: usize,
    block_size: usize,
    num_blocks: usize,
    scales: Option<&[KvScales]>,
    cuda: Option<&Device>,
) -> Result<Box<dyn KvCache>> {
    let compute = match kv_dtype {
        KvDtype::F32 => DType::F32,
        KvDtype::F16 => DType::F16,
        _ => DType::BF16,
    };
    let config = CacheConfig::new(shape, num_layers, block_size, compute)?;
    Ok(match (backend, kv_dtype) {
        (Backend::Cpu, KvDtype::Fp8E4M3 | KvDtype::Fp8E5M2) => {
            // Host fp8 pages read by the crate's f32 CPU attention (f32 compute).
            host_pages(kv_dtype, shape, num_layers, block_size, num_blocks, scales)?
        }
        (Backend::Cpu, _) => Box::new(Paged::new(CandleStorage::new(
            config,
            num_blocks,
            &Device::Cpu,
        )?)?),
        (Backend::Cuda, KvDtype::F16 | KvDtype::BF16) => {
            let device = cuda.ok_or_else(|| candle_core::Error::msg("no CUDA device"))?;
            Box::new(Paged::new(CandleStorage::new(config, num_blocks, device)?)?)
        }
        (Backend::Cuda, other) => candle_core::bail!(
            "--backend cuda serves --kv-dtype bf16 or f16 (the candle CUDA storage), not {other:?}"
        ),
        (Backend::Sim, KvDtype::BF16) => {
            let device = SimDevice::new();
            Box::new(Paged::new(SimStorage::<bf16>::new(
                Rc::clone(&device),
                config,
                num_blocks,
            )?)?)
        }
        (Backend::Sim, KvDtype::F16) => {
            let device = SimDevice::new();
            Box::new(Paged::new(SimStorage::<f16>::new(device, config, num_blocks)?)?)
        }
        (Backend::Sim, other) => candle_core::bail!(
            "--backend sim serves --kv-dtype bf16 or f16 (the kernels' compute dtypes), not {other:?}"
        ),
    })
}

/// Host pages of `kv_dtype` read by the crate's f32 CPU attention, queries and outputs f32
/// whatever the pages hold: only the stored K/V differ between dtypes (the fp8 table).
pub fn host_pages(
    kv_dtype: KvDtype,
    shape: paged_gqa::GqaShape,
    num_layers: usize,
    block_size: usize,
    num_blocks: usize,
    scales: Option<&[KvScales]>,
) -> Result<Box<dyn KvCache>> {
    let config = |dtype: DType| -> Result<CacheConfig> {
        let f32_compute = CacheConfig::new(shape, num_layers, block_size, DType::F32)?;
        Ok(match dtype {
            DType::F8E4M3 | DType::F8E5M2 => f32_compute.with_page_dtype(dtype)?,
            other => CacheConfig::new(shape, num_layers, block_size, other)?,
        })
    };
    let config = config(kv_dtype.page_dtype())?;
    let scales = || -> Result<&[KvScales]> {
        scales.ok_or_else(|| candle_core::Error::msg("fp8 pages need calibrated scales"))
    };
    Ok(match kv_dtype {
        KvDtype::F32 => Box::new(Paged::new(CpuStorage::<f32>::new(config, num_blocks)?)?),
        KvDtype::BF16 => Box::new(Paged::new(CpuStorage::<bf16>::new(config, num_blocks)?)?),
        KvDtype::F16 => Box::new(Paged::new(CpuStorage::<f16>::new(config, num_blocks)?)?),
        KvDtype::Fp8E4M3 => {
            let mut kv = Paged::new(CpuStorage::<Fp8E4M3>::new(config, num_blocks)?)?;
            for (layer, s) in scales()?.iter().enumerate() {
                kv.cache_mut().set_scales(layer, s)?;
            }
            Box::new(kv)
        }
        KvDtype::Fp8E5M2 => {
            let mut kv = Paged::new(CpuStorage::<Fp8E5M2>::new(config, num_blocks)?)?;
            for (layer, s) in scales()?.iter().enumerate() {
                kv.cache_mut().set_scales(layer, s)?;
            }
            Box::new(kv)
        }
    })
}

/// Per-layer fp8 scales from recorded amax (`[num_layers]` of K and V `[n_kv_heads]`).
pub fn scales_from_amax(
    format: paged_gqa::fp8::Fp8Format,
    amax: &[(Vec<f32>, Vec<f32>)],
) -> Result<Vec<KvScales>> {
    amax.iter()
        .map(|(k, v)| Ok(KvScales::from_amax(format, k, v)?))
        .collect()
}
