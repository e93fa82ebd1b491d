//! `write_kv` (vLLM's `reshape_and_cache`): a step's new K/V rows into their slots of the
//! caches, as an in-place candle op, so candle's storage locks order it with every other use
//! of the caches.
//!
//! Both caches are written under write locks: when they are views of one storage (one
//! `[2, num_blocks, ...]` tensor, or a [`CandleStorage`](super::CandleStorage) layer), one
//! in-place op on it; otherwise an in-place op on `k_cache` whose body runs one on `v_cache`,
//! so the CUDA path's single launch (which writes both) runs with both storages locked.

use std::cell::Cell;

use candle_core::{CpuStorage, InplaceOp1, InplaceOp3, Layout, Tensor};

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::metadata::PagedMetadata;
use super::validate::{self, Geometry, Memory};
use super::CandleElement;

/// Writes new K/V rows into their slots: `k`, `v` `[num_tokens, n_kv_heads, head_dim]` into
/// `k_cache`, `v_cache` `[num_blocks, block_size, n_kv_heads, head_dim]` at
/// `slot_mapping` `[num_tokens]` (i64, i32 or u32; slot = block * block_size + offset; a
/// negative slot is padding, skipped, as in vLLM).
///
/// Checked before anything is written: one device, one dtype (f32, f16, bf16; f16 or bf16 on
/// CUDA), contiguous tensors (any start offset), matching shapes, every slot below
/// `num_blocks * block_size`, and no cache sharing memory with `k`, `v` or the other cache.
/// On CUDA this reads `slot_mapping` to the host (one copy, waiting for the device) and
/// uploads it again: for the layers of one step use [`PagedMetadata::write_kv`], which does
/// neither per layer.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use paged_gqa::candle::write_kv;
///
/// let dev = Device::Cpu;
/// let k_cache = Tensor::zeros((4, 16, 2, 64), DType::F32, &dev)?; // [num_blocks, block_size, n_kv_heads, head_dim]
/// let v_cache = Tensor::zeros((4, 16, 2, 64), DType::F32, &dev)?;
/// let k = Tensor::ones((2, 2, 64), DType::F32, &dev)?; // two new tokens
/// let v = Tensor::ones((2, 2, 64), DType::F32, &dev)?;
/// let slot_mapping = Tensor::new(&[35i64, -1], &dev)?; // block 2, offset 3; padding
/// write_kv(&k, &v, &k_cache, &v_cache, &slot_mapping)?;
/// assert_eq!(k_cache.reshape((64, 128))?.sum(1)?.to_vec1::<f32>()?[35], 128.0); // slot 35: its row
/// assert_eq!(k_cache.sum_all()?.to_scalar::<f32>()?, 128.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn write_kv(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slot_mapping: &Tensor,
) -> candle_core::Result<()> {
    validate::same_device(slot_mapping, "slot_mapping", k_cache, "k_cache")?;
    let slots = validate::host_ints(
        slot_mapping,
        "slot_mapping",
        "[num_tokens]",
        1,
        &[
            candle_core::DType::I64,
            candle_core::DType::I32,
            candle_core::DType::U32,
        ],
    )?;
    write(k, v, k_cache, v_cache, Slots::Given(&slots))
}

/// vLLM's name for [`write_kv`], same arguments in the same order.
pub fn reshape_and_cache(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slot_mapping: &Tensor,
) -> candle_core::Result<()> {
    write_kv(k, v, k_cache, v_cache, slot_mapping)
}

impl PagedMetadata {
    /// Writes this step's new K/V rows at one layer: `k`, `v` `[num_tokens, n_kv_heads,
    /// head_dim]` into `k_cache`, `v_cache` `[num_blocks, block_size, n_kv_heads, head_dim]`,
    /// token `j` of sequence `s` at its position `context_lens[s] - query_lens[s] + j` (the
    /// slots derived from the block tables). Same checks as [`write_kv`]; on CUDA one launch,
    /// no host synchronisation.
    pub fn write_kv(
        &self,
        k: &Tensor,
        v: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> candle_core::Result<()> {
        write(k, v, k_cache, v_cache, Slots::Metadata(self))
    }
}

/// Where a write's slots come from.
#[derive(Clone, Copy)]
enum Slots<'a> {
    /// The caller's slot mapping, read to the host.
    Given(&'a [i64]),
    /// Derived from a step's block tables.
    Metadata(&'a PagedMetadata),
}

/// A write, checked: the geometry, the host slots (validated) and where the device slots
/// come from.
struct Write<'a> {
    pub geometry: Geometry,
    pub num_tokens: usize,
    /// [num_tokens], each < num_slots (negative: skipped)
    pub slots: &'a [i64],
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub source: Slots<'a>,
    /// Element offset of `v_cache` in the storage of `k_cache` when they share one.
    pub v_offset_in_k: Option<usize>,
}

#[cfg(feature = "candle-cuda")]
impl Write<'_> {
    /// What the CUDA launch takes of this write: the metadata's slots go up once per step (its
    /// uploads), given slots with every call.
    fn cuda_args(&self) -> Result<super::cuda::WriteArgs<'_>> {
        Ok(super::cuda::WriteArgs {
            config: self.geometry.config()?,
            layout: self.geometry.layout,
            num_tokens: self.num_tokens,
            slots: self.slots,
            uploads: match self.source {
                Slots::Metadata(metadata) => Some(&metadata.device),
                Slots::Given(_) => None,
            },
        })
    }
}

fn write(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    source: Slots<'_>,
) -> candle_core::Result<()> {
    let (geometry, num_tokens) = validate::write(k, v, k_cache, v_cache)?;
    let layout = geometry.layout;
    let tables;
    let slots: &[i64] = match source {
        Slots::Given(slots) => slots,
        Slots::Metadata(metadata) => {
            tables = metadata.checked(&layout)?;
            &tables.slot_mapping
        }
    };
    if slots.len() != num_tokens {
        Err(Error::TensorShape {
            name: "slot_mapping",
            expected: format!("[{num_tokens}] (one slot per row of k)"),
            actual: vec![slots.len()],
        })?;
    }
    let num_slots = layout.num_blocks() * layout.block_size();
    if let Some((token, &slot)) = slots
        .iter()
        .enumerate()
        .find(|(_, &s)| s >= num_slots as i64)
    {
        Err(Error::SlotOutOfRange {
            token,
            slot,
            num_slots,
        })?;
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let shared = check_aliasing(k, v, k_cache, v_cache)?;
    let write = Write {
        geometry,
        num_tokens,
        slots,
        source,
        v_offset_in_k: shared.then(|| v_cache.layout().start_offset()),
    };
    if shared {
        k_cache.inplace_op3(k, v, &WriteShared { write: &write })
    } else {
        k_cache.inplace_op3(
            k,
            v,
            &WriteK {
                write: &write,
                v_cache,
            },
        )
    }
}

/// `Err(Aliased)` when a cache shares storage with `k` or `v`, or overlaps the other cache.
/// Returns whether the caches are disjoint views of one storage.
fn check_aliasing(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> candle_core::Result<bool> {
    let (k_mem, v_mem) = (Memory::of(k)?, Memory::of(v)?);
    let (kc_mem, vc_mem) = (Memory::of(k_cache)?, Memory::of(v_cache)?);
    for (written, cache) in [("k_cache", &kc_mem), ("v_cache", &vc_mem)] {
        for (other, input) in [("k", &k_mem), ("v", &v_mem)] {
            if cache.same_storage(input) {
                Err(Error::Aliased { written, other })?;
            }
        }
    }
    if kc_mem.overlaps(&vc_mem) {
        Err(Error::Aliased {
            written: "k_cache",
            other: "v_cache",
        })?;
    }
    Ok(kc_mem.same_storage(&vc_mem))
}

/// The write when both caches live in the storage locked for `k_cache`.
struct WriteShared<'a> {
    write: &'a Write<'a>,
}

impl InplaceOp3 for WriteShared<'_> {
    fn name(&self) -> &'static str {
        "paged-gqa-write-kv"
    }

    fn cpu_fwd(
        &self,
        caches: &mut CpuStorage,
        k_cache: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        let v_offset = self.write.v_offset_in_k.unwrap_or_default();
        Ok(cpu_write(
            self.write,
            CpuCaches::Shared(caches, k_cache.start_offset(), v_offset),
            (k, k_layout),
            (v, v_layout),
        )?)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        caches: &mut candle_core::CudaStorage,
        k_cache: &Layout,
        k: &candle_core::CudaStorage,
        k_layout: &Layout,
        v: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        let v_offset = self.write.v_offset_in_k.unwrap_or_default();
        super::cuda::write(
            &self.write.cuda_args()?,
            super::cuda::Caches::Shared(caches, k_cache.start_offset(), v_offset),
            (k, k_layout),
            (v, v_layout),
        )
    }
}

/// The outer op of a write to two storages: `k_cache` locked, it runs [`WriteV`] on `v_cache`.
struct WriteK<'a> {
    write: &'a Write<'a>,
    v_cache: &'a Tensor,
}

/// The inner op: `v_cache` locked, with the outer op's `k_cache`, `k` and `v`.
struct WriteV<'a, S> {
    write: &'a Write<'a>,
    k_cache: Cell<Option<&'a mut S>>,
    k_offset: usize,
    k: (&'a S, &'a Layout),
    v: (&'a S, &'a Layout),
}

impl InplaceOp3 for WriteK<'_> {
    fn name(&self) -> &'static str {
        "paged-gqa-write-kv"
    }

    fn cpu_fwd(
        &self,
        k_cache: &mut CpuStorage,
        k_cache_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        self.v_cache.inplace_op1(&WriteV {
            write: self.write,
            k_cache: Cell::new(Some(k_cache)),
            k_offset: k_cache_layout.start_offset(),
            k: (k, k_layout),
            v: (v, v_layout),
        })
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        k_cache: &mut candle_core::CudaStorage,
        k_cache_layout: &Layout,
        k: &candle_core::CudaStorage,
        k_layout: &Layout,
        v: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        self.v_cache.inplace_op1(&WriteV {
            write: self.write,
            k_cache: Cell::new(Some(k_cache)),
            k_offset: k_cache_layout.start_offset(),
            k: (k, k_layout),
            v: (v, v_layout),
        })
    }
}

/// What reaches the inner op's body when it runs on another backend than its outer op (never:
/// both ops' tensors are checked to be on one device).
fn backend_changed() -> candle_core::Error {
    candle_core::Error::msg("paged-gqa-write-kv: k_cache and v_cache on different backends")
}

impl InplaceOp1 for WriteV<'_, CpuStorage> {
    fn name(&self) -> &'static str {
        "paged-gqa-write-kv"
    }

    fn cpu_fwd(
        &self,
        v_cache: &mut CpuStorage,
        v_cache_layout: &Layout,
    ) -> candle_core::Result<()> {
        let k_cache = self.k_cache.take().ok_or_else(backend_changed)?;
        Ok(cpu_write(
            self.write,
            CpuCaches::Split(
                (k_cache, self.k_offset),
                (v_cache, v_cache_layout.start_offset()),
            ),
            self.k,
            self.v,
        )?)
    }
}

#[cfg(feature = "candle-cuda")]
impl InplaceOp1 for WriteV<'_, candle_core::CudaStorage> {
    fn name(&self) -> &'static str {
        "paged-gqa-write-kv"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        Err(backend_changed())
    }

    fn cuda_fwd(
        &self,
        v_cache: &mut candle_core::CudaStorage,
        v_cache_layout: &Layout,
    ) -> candle_core::Result<()> {
        let k_cache = self.k_cache.take().ok_or_else(backend_changed)?;
        super::cuda::write(
            &self.write.cuda_args()?,
            super::cuda::Caches::Split(
                (k_cache, self.k_offset),
                (v_cache, v_cache_layout.start_offset()),
            ),
            self.k,
            self.v,
        )
    }
}

/// The caches of a CPU write, locked: one storage holding both (with the element offsets of
/// K and V in it) or two (each with its offset).
enum CpuCaches<'a> {
    Shared(&'a mut CpuStorage, usize, usize),
    Split((&'a mut CpuStorage, usize), (&'a mut CpuStorage, usize)),
}

fn cpu_write(
    write: &Write<'_>,
    caches: CpuCaches<'_>,
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<()> {
    match write.geometry.dtype {
        DType::F32 => cpu_write_as::<f32>(write, caches, k, v),
        DType::F16 => cpu_write_as::<half::f16>(write, caches, k, v),
        DType::BF16 => cpu_write_as::<half::bf16>(write, caches, k, v),
        dtype @ (DType::F8E4M3 | DType::F8E5M2) => Err(crate::Error::UnsupportedDType {
            kernel: "candle write_kv",
            dtype,
        }),
    }
}

fn cpu_write_as<T: CandleElement>(
    write: &Write<'_>,
    caches: CpuCaches<'_>,
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<()> {
    let row = write.geometry.shape.kv_row_len();
    let len = write.geometry.layout.cache_len();
    let k_new = T::slice(k.0, k.1, "k", write.num_tokens * row)?;
    let v_new = T::slice(v.0, v.1, "v", write.num_tokens * row)?;
    let range = |name, storage_len: usize, offset: usize| {
        if offset + len > storage_len {
            return Err(Error::BufferLength {
                name,
                expected: offset + len,
                actual: storage_len,
            });
        }
        Ok(offset..offset + len)
    };
    match caches {
        CpuCaches::Shared(storage, k_offset, v_offset) => {
            let pages = T::vec_mut(storage, "k_cache")?;
            let (k_range, v_range) = (
                range("k_cache", pages.len(), k_offset)?,
                range("v_cache", pages.len(), v_offset)?,
            );
            // Disjoint (checked before the op): split the storage between them.
            let (k_cache, v_cache) = if k_range.start < v_range.start {
                let (low, high) = pages.split_at_mut(v_range.start);
                (&mut low[k_range], &mut high[..len])
            } else {
                let (low, high) = pages.split_at_mut(k_range.start);
                (&mut high[..len], &mut low[v_range])
            };
            crate::cpu::write_rows(k_cache, v_cache, row, write.slots, k_new, v_new);
        }
        CpuCaches::Split((k_storage, k_offset), (v_storage, v_offset)) => {
            let k_pages = T::vec_mut(k_storage, "k_cache")?;
            let k_range = range("k_cache", k_pages.len(), k_offset)?;
            let v_pages = T::vec_mut(v_storage, "v_cache")?;
            let v_range = range("v_cache", v_pages.len(), v_offset)?;
            crate::cpu::write_rows(
                &mut k_pages[k_range],
                &mut v_pages[v_range],
                row,
                write.slots,
                k_new,
                v_new,
            );
        }
    }
    Ok(())
}
