//! Set-up the kernel families' tests share: a device cache mirrored by a CPU cache (the cache
//! tests of 16-bit and fp8 pages), and the emulator's count of the bytes a launch fetches (the
//! traffic tests).

use paged_gqa::cache::{CacheConfig, PagedCache, SeqId, StepPlan};
use paged_gqa::cpu::CpuStorage;
use paged_gqa::sim::{SimBuffer, SimDevice};
use paged_gqa::{DeviceValue, PageElement};

use crate::common::Device;

/// A cache on the backend under test and a CPU cache with the same configuration, fed the same
/// operations: sequence ids, plans and pages must stay the same on both.
pub struct CachePair<D: Device, P: PageElement + Default> {
    pub dev: D,
    pub device: PagedCache<D::Storage<P>>,
    pub cpu: PagedCache<CpuStorage<P>>,
}

impl<D: Device, P: PageElement + Default> CachePair<D, P> {
    /// Both caches over `blocks` pages per tensor, every page element set to `pages(len)` (the
    /// same random values on both, not zeros: a block copy that misses part of a block, an
    /// unused slot included, then leaves the two caches different).
    pub fn new(
        dev: &D,
        config: CacheConfig,
        blocks: usize,
        pages: impl FnOnce(usize) -> Vec<P>,
    ) -> Self {
        let mut device_storage = dev.storage::<P>(config, blocks).unwrap();
        let mut cpu_storage = CpuStorage::<P>::new(config, blocks).unwrap();
        let pages = pages(cpu_storage.pages_mut().len());
        dev.fill_pages(&mut device_storage, &pages);
        cpu_storage.pages_mut().copy_from_slice(&pages);
        Self {
            dev: dev.clone(),
            device: PagedCache::new(device_storage).unwrap(),
            cpu: PagedCache::new(cpu_storage).unwrap(),
        }
    }

    pub fn add(&mut self) -> SeqId {
        let id = self.device.add_sequence();
        assert_eq!(self.cpu.add_sequence(), id);
        id
    }

    pub fn fork(&mut self, parent: SeqId) -> SeqId {
        let id = self.device.fork(parent).unwrap();
        assert_eq!(self.cpu.fork(parent).unwrap(), id);
        id
    }

    pub fn free(&mut self, seq: SeqId) {
        self.device.free(seq).unwrap();
        self.cpu.free(seq).unwrap();
    }

    /// Plans `batch` on both; the slot mappings, block tables and block copies must agree.
    pub fn plan(&mut self, batch: &[(SeqId, usize)]) -> (D::Plan, StepPlan) {
        let device_plan = self.device.plan(batch).unwrap();
        let cpu_plan = self.cpu.plan(batch).unwrap();
        let (g, c): (&StepPlan, &StepPlan) = (device_plan.as_ref(), &cpu_plan);
        assert_eq!(
            (g.slot_mapping(), g.block_tables(), g.block_copies()),
            (c.slot_mapping(), c.block_tables(), c.block_copies())
        );
        (device_plan, cpu_plan)
    }

    /// How many page elements of the device cache are not `same` as the CPU cache's (every
    /// layer, K and V).
    pub fn differing_pages(&self, same: impl Fn(&P, &P) -> bool) -> usize {
        let device_pages: Vec<P> = self.dev.download(D::pages(self.device.storage()));
        let cpu_pages: Vec<P> = (0..self.cpu.config().num_layers())
            .flat_map(|l| {
                let (k, v) = self.cpu.storage().layer(l);
                k.iter().chain(v).copied().collect::<Vec<_>>()
            })
            .collect();
        differing(&device_pages, &cpu_pages, same)
    }
}

/// How many elements of `got` are not `same` as `want`'s (of the same length).
pub fn differing<T>(got: &[T], want: &[T], same: impl Fn(&T, &T) -> bool) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(g, w)| !same(g, w)).count()
}

/// Whether `a` and `b` have the same bits (NaNs included).
pub fn same_bits<T: bytemuck::Pod>(a: &T, b: &T) -> bool {
    bytemuck::bytes_of(a) == bytemuck::bytes_of(b)
}

/// A buffer's (address, length in bytes), for [`fetched`].
pub fn span<T: DeviceValue>(buffer: &SimBuffer<T>) -> (u64, usize) {
    (buffer.address(), std::mem::size_of_val(buffer.as_slice()))
}

/// The bytes of the `watched` spans that `launch` fetches on the emulated `device`.
pub fn fetched(device: &SimDevice, watched: &[(u64, usize)], launch: impl FnOnce()) -> usize {
    device.unwatch_all();
    for &(address, bytes) in watched {
        device.watch(address, bytes);
    }
    launch();
    let fetched = device.watched_bytes() as usize;
    device.unwatch_all();
    fetched
}
