//! The CPU backend's pages: host memory behind [`PageStorage`].

use crate::cache::{CacheConfig, PageStorage, PagedCache, StepPlan};
use crate::cpu::{attention, Attention, PagedKv};
use crate::error::{Error, Result};
use crate::fp8::{Fp8Element, KvScales};
use crate::variants::AttendOptions;

/// Pages of every layer in host memory, `[num_layers, 2 (K, V), num_blocks, block_size,
/// n_kv_heads, head_dim]`.
///
/// `T` is any plain element: `f32`, `f16`, `bf16`, an integer in tests that track tokens, or a
/// stored fp8 value ([`Fp8E4M3`](crate::fp8::Fp8E4M3), [`Fp8E5M2`](crate::fp8::Fp8E5M2)):
/// fp8 pages take rows through [`write_quantized`](PagedCache::write_quantized) and are read
/// under each layer's [`KvScales`] ([`set_scales`](CpuStorage::set_scales); 1.0 until set).
#[derive(Debug, Clone)]
pub struct CpuStorage<T> {
    config: CacheConfig,
    num_blocks: usize,
    /// Elements of one (layer, K or V) tensor.
    tensor_len: usize,
    /// [num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]
    pages: Vec<T>,
    /// [num_layers]: the scales the stored values are read under (1.0 but for fp8 pages).
    scales: Vec<KvScales>,
}

impl<T: Copy + Default> CpuStorage<T> {
    /// `num_blocks` pages per tensor, zero-filled.
    pub fn new(config: CacheConfig, num_blocks: usize) -> Result<Self> {
        let (tensor_len, total) = config.page_lens(num_blocks, std::mem::size_of::<T>())?;
        Ok(Self {
            config,
            num_blocks,
            tensor_len,
            pages: vec![T::default(); total],
            scales: vec![KvScales::ones(config.shape().n_kv_heads()); config.num_layers()],
        })
    }

    /// The most pages that fit in `budget_bytes`.
    pub fn with_budget(config: CacheConfig, budget_bytes: u64) -> Result<Self> {
        Self::new(config, config.blocks_for_budget(budget_bytes)?)
    }

    /// All pages, `[num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim]`, to fill (a
    /// saved cache restored, say) before a [`PagedCache`] takes the storage.
    pub fn pages_mut(&mut self) -> &mut [T] {
        &mut self.pages
    }

    /// K and V tensors of `layer`, `[num_blocks, block_size, n_kv_heads, head_dim]` each.
    pub fn layer(&self, layer: usize) -> (&[T], &[T]) {
        let (k, v) = self.pages[2 * layer * self.tensor_len..][..2 * self.tensor_len]
            .split_at(self.tensor_len);
        (k, v)
    }

    fn layer_mut(&mut self, layer: usize) -> (&mut [T], &mut [T]) {
        self.pages[2 * layer * self.tensor_len..][..2 * self.tensor_len]
            .split_at_mut(self.tensor_len)
    }

    /// `layer`'s scales (1.0 but for fp8 pages whose scales were set).
    pub fn scales(&self, layer: usize) -> Result<&KvScales> {
        let num_layers = self.config.num_layers();
        self.scales
            .get(layer)
            .ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// Writes rows `[num_new_tokens, n_kv_heads, head_dim]` of K and V into their slots.
    fn write_rows(&mut self, layer: usize, slot_mapping: &[i64], k_new: &[T], v_new: &[T]) {
        let row = self.config.shape().kv_row_len();
        let (k, v) = self.layer_mut(layer);
        write_rows(k, v, row, slot_mapping, k_new, v_new);
    }
}

/// Writes token `t`'s rows of `k_new`, `v_new` (`[num_tokens, row]`) into slot
/// `slot_mapping[t]` of `k_cache`, `v_cache` (`[num_slots, row]`). A slot outside
/// `0..num_slots` is skipped, as the write kernel skips it (callers validate slots first; a
/// negative slot is padding).
pub(crate) fn write_rows<T: Copy>(
    k_cache: &mut [T],
    v_cache: &mut [T],
    row: usize,
    slot_mapping: &[i64],
    k_new: &[T],
    v_new: &[T],
) {
    let rows = k_new.chunks_exact(row).zip(v_new.chunks_exact(row));
    for (&slot, (k_row, v_row)) in slot_mapping.iter().zip(rows) {
        let Ok(slot) = usize::try_from(slot) else {
            continue;
        };
        let at = slot.saturating_mul(row)..slot.saturating_mul(row).saturating_add(row);
        if let (Some(k), Some(v)) = (k_cache.get_mut(at.clone()), v_cache.get_mut(at)) {
            k.copy_from_slice(k_row);
            v.copy_from_slice(v_row);
        }
    }
}

/// Copies whole blocks `(src, dst)` of `block_len` elements within every tensor of `pages`
/// (`[num_tensors, tensor_len]`), the copy-on-write step. Pairs outside the tensor are skipped,
/// as the copy kernel skips them.
pub(crate) fn copy_blocks<T: Copy>(
    pages: &mut [T],
    tensor_len: usize,
    block_len: usize,
    block_copies: &[[i32; 2]],
) {
    let num_blocks = tensor_len / block_len.max(1);
    for tensor in pages.chunks_exact_mut(tensor_len.max(1)) {
        for &[src, dst] in block_copies {
            let (Ok(src), Ok(dst)) = (usize::try_from(src), usize::try_from(dst)) else {
                continue;
            };
            if src < num_blocks && dst < num_blocks {
                tensor.copy_within(src * block_len..(src + 1) * block_len, dst * block_len);
            }
        }
    }
}

impl<F: Fp8Element + Default> CpuStorage<F> {
    /// Sets `layer`'s fp8 scales (`[n_kv_heads]` for K and for V): what
    /// [`write_quantized`](PagedCache::write_quantized) divides by and attention multiplies
    /// by. Set them before the layer's first write. Errors: a layer out of range, scales for
    /// another number of K/V heads.
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        scales.check_heads(self.config.shape().n_kv_heads())?;
        let num_layers = self.config.num_layers();
        let slot = self
            .scales
            .get_mut(layer)
            .ok_or(Error::LayerOutOfRange { layer, num_layers })?;
        *slot = scales.clone();
        Ok(())
    }
}

impl<T: Copy + Default> PageStorage for CpuStorage<T> {
    type Plan = StepPlan;

    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn kv_scales(&self, layer: usize) -> Option<KvScales> {
        self.scales.get(layer).cloned()
    }

    fn prepare(&mut self, plan: StepPlan) -> Result<StepPlan> {
        let block_len = self.config.block_size() * self.config.shape().kv_row_len();
        copy_blocks(
            &mut self.pages,
            self.tensor_len,
            block_len,
            plan.block_copies(),
        );
        Ok(plan)
    }
}

impl<T: Copy + Default> PagedCache<CpuStorage<T>> {
    /// Writes the plan's new tokens of `layer`: `k_new`, `v_new` are
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]`, rows in batch order, stored as they are
    /// (for fp8 pages: stored bits, already quantized; see
    /// [`write_quantized`](PagedCache::write_quantized)).
    pub fn write(&mut self, layer: usize, plan: &StepPlan, k_new: &[T], v_new: &[T]) -> Result<()> {
        self.check(layer, plan)?;
        let expected = plan.num_new_tokens() * self.config().shape().kv_row_len();
        Error::check_len("k_new", k_new.len(), expected)?;
        Error::check_len("v_new", v_new.len(), expected)?;
        self.storage_mut()
            .write_rows(layer, plan.slot_mapping(), k_new, v_new);
        self.layer_written(layer, plan);
        Ok(())
    }

    /// The paged K/V of `layer` as the plan's batch sees it (for attention and read-back),
    /// read under the layer's scales.
    pub fn paged_kv<'a>(&'a self, layer: usize, plan: &'a StepPlan) -> Result<PagedKv<'a, T>> {
        self.check(layer, plan)?;
        let (k, v) = self.storage().layer(layer);
        PagedKv::new(
            self.storage().layout(),
            plan.lens(),
            plan.block_tables(),
            plan.max_blocks(),
            k,
            v,
        )?
        .with_scales(self.storage().scales(layer)?)
    }
}

impl<F: Fp8Element + Default> PagedCache<CpuStorage<F>> {
    /// Sets `layer`'s fp8 scales (see [`CpuStorage::set_scales`]). Blocks cached under other
    /// scales are not found while these hold.
    pub fn set_scales(&mut self, layer: usize, scales: &KvScales) -> Result<()> {
        self.storage_mut().set_scales(layer, scales)?;
        self.scales_changed();
        Ok(())
    }

    /// Writes the plan's new tokens of `layer` into fp8 pages: `k_new`, `v_new`
    /// `[plan.num_new_tokens(), n_kv_heads, head_dim]` (f32, f16 or bf16), rows in batch order,
    /// each value of K/V head `h` stored as [`quantize`](crate::fp8::quantize)`(x, k_scale[h])`
    /// (`v_scale[h]` for V), bit for bit what the device's write kernel stores.
    pub fn write_quantized<X: Copy + Into<f32>>(
        &mut self,
        layer: usize,
        plan: &StepPlan,
        k_new: &[X],
        v_new: &[X],
    ) -> Result<()> {
        self.check(layer, plan)?;
        let shape = self.config().shape();
        let expected = plan.num_new_tokens() * shape.kv_row_len();
        Error::check_len("k_new", k_new.len(), expected)?;
        Error::check_len("v_new", v_new.len(), expected)?;
        let scales = self.storage().scales(layer)?.clone();
        let d = shape.head_dim();
        let quantize = |rows: &[X], scale: &[f32]| -> Vec<F> {
            rows.iter()
                .enumerate()
                .map(|(i, &x)| F::quantize(x.into(), scale[(i / d) % shape.n_kv_heads()]))
                .collect()
        };
        let (k, v) = (quantize(k_new, scales.k()), quantize(v_new, scales.v()));
        self.storage_mut()
            .write_rows(layer, plan.slot_mapping(), &k, &v);
        self.layer_written(layer, plan);
        Ok(())
    }
}

impl<T: Copy + Default + Into<f32> + Sync> PagedCache<CpuStorage<T>> {
    /// Fused GQA attention of `layer` for the plan's batch, any mix of decode tokens and prompt
    /// chunks (the f32 fallback; see [`crate::cpu::attend`]): `q` (f32, f16 or bf16), `out`
    /// `[plan.num_new_tokens(), n_heads, head_dim]`, `lse` `[plan.num_new_tokens(), n_heads]`;
    /// fp8 pages are read under the layer's scales.
    pub fn attend<Q: Copy + Into<f32> + Sync>(
        &self,
        layer: usize,
        plan: &StepPlan,
        q: &[Q],
        out: &mut [f32],
        lse: &mut [f32],
        options: &AttendOptions,
    ) -> Result<()> {
        crate::cpu::attend(q, &self.paged_kv(layer, plan)?, options, out, lse)
    }
}

impl<T: Copy + Default + Into<f64> + Sync> PagedCache<CpuStorage<T>> {
    /// The f64 reference attention of the plan's new tokens over `layer`'s pages (the oracle,
    /// for tests; fp8 pages read under the layer's scales): `q` is
    /// `[plan.num_new_tokens(), n_heads, head_dim]`.
    pub fn reference<Q: Copy + Into<f64> + Sync>(
        &self,
        layer: usize,
        plan: &StepPlan,
        q: &[Q],
        options: &AttendOptions,
    ) -> Result<Attention> {
        attention(q, &self.paged_kv(layer, plan)?, options)
    }
}
