//! The sweep on the kernel emulator: the real kernels, run on the CPU. Its times are the
//! emulator's wall clock, not a GPU's; what it measures is traffic: the bytes the attention
//! kernels bring from the K/V pages (`kv_bytes_fetched`, counted by the emulator at every
//! cp.async) against the bytes the batch must read (`kv_bytes_needed`), and with `--profile`
//! the profiler's headline figures of each launch (see `paged-gqa profile`).

use std::rc::Rc;

use half::{bf16, f16};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element};
use paged_gqa::sim::profile::Profile;
use paged_gqa::sim::{AttendBatch, NaiveAttention, SimBuffer, SimDevice, Tracing};
use paged_gqa::{DType, Element};

use super::cpu::time_ms;
use super::report::Record;
use super::{data, Case};
use crate::Failure;

pub fn run(cases: &[Case], iters: usize, profile: bool) -> Result<Vec<Record>, Failure> {
    let device = SimDevice::new();
    // One schedule per launch: the race check would run (and count) everything twice.
    device.set_race_check(false);
    let name = "kernel emulator (emulated H200, on the CPU)";
    eprintln!("bench: {name}; times are emulation, not GPU time");
    let timing = format!(
        "EMULATION: wall clock of the CPU kernel emulator, median of {iters} after 1 warm-up; not a GPU time"
    );
    let mut records = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        eprintln!("bench [{}/{}] {case}", i + 1, cases.len());
        let mut step = prepare(&device, case)?;
        let fetched = fetched_bytes(&device, step.as_mut())?;
        let fused_ms = time_ms(iters, || step.fused())?;
        let naive_ms = match step.has_naive() {
            true => Some(time_ms(iters, || step.naive())?),
            false => None,
        };
        // The emulator's "bandwidth" would be meaningless: report against a nominal 1 GB/s.
        let mut record = Record::new(case, "sim", name, (fused_ms, naive_ms, None), 1.0, &timing);
        record.kv_bytes_fetched = Some(fetched);
        if profile {
            let launches = profile_case(case)?.launches;
            record.profile = Some(launches.iter().map(crate::profile::headline).collect());
        }
        records.push(record);
    }
    Ok(records)
}

/// The profile of one fused attention call of `case` (a fresh device tracing it, no race
/// check), and the K/V bytes it fetched.
pub fn profile_case(case: &Case) -> Result<Profile, Failure> {
    let device = SimDevice::with_tracing(Tracing {
        profile: true,
        sanitize: false,
    });
    device.set_race_check(false);
    let mut step = prepare(&device, case)?;
    fetched_bytes(&device, step.as_mut())?;
    device.take_profile().map_err(Failure::runtime)
}

/// The K/V bytes one fused call fetches (the pages watched for it alone).
fn fetched_bytes(device: &Rc<SimDevice>, step: &mut dyn Step) -> Result<u64, Failure> {
    device.unwatch_all();
    for (address, bytes) in step.kv_pages() {
        device.watch(address, bytes);
    }
    step.fused().map_err(Failure::runtime)?;
    let fetched = device.watched_bytes();
    device.unwatch_all();
    Ok(fetched)
}

/// One layer's attention of a case, its data on the device: the fused kernels and, over pages
/// of the compute dtype, the naive repeat_kv path.
trait Step {
    fn fused(&mut self) -> paged_gqa::Result<()>;
    fn has_naive(&self) -> bool;
    fn naive(&mut self) -> paged_gqa::Result<()>;
    /// (address, bytes) of the K and V pages.
    fn kv_pages(&self) -> [(u64, usize); 2];
}

fn prepare(device: &Rc<SimDevice>, case: &Case) -> Result<Box<dyn Step>, Failure> {
    Ok(match (case.dtype, case.kv_dtype) {
        (DType::F16, DType::F8E4M3) => Box::new(Fp8Step::<f16, Fp8E4M3>::new(device, case)?),
        (DType::F16, DType::F8E5M2) => Box::new(Fp8Step::<f16, Fp8E5M2>::new(device, case)?),
        (_, DType::F8E4M3) => Box::new(Fp8Step::<bf16, Fp8E4M3>::new(device, case)?),
        (_, DType::F8E5M2) => Box::new(Fp8Step::<bf16, Fp8E5M2>::new(device, case)?),
        (DType::F16, _) => Box::new(PlainStep::<f16>::new(device, case)?),
        _ => Box::new(PlainStep::<bf16>::new(device, case)?),
    })
}

/// Pages of the compute dtype `T`.
struct PlainStep<T: Element> {
    device: Rc<SimDevice>,
    case: Case,
    k: SimBuffer<T>,
    v: SimBuffer<T>,
    q: SimBuffer<T>,
    out: SimBuffer<T>,
    lse: SimBuffer<f32>,
    fused: AttendBatch,
    naive: NaiveAttention<T>,
}

impl<T: Element> PlainStep<T> {
    fn new(device: &Rc<SimDevice>, case: &Case) -> Result<Self, Failure> {
        let mut rng = data::rng();
        let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
        let fail = Failure::runtime;
        let upload =
            |n: usize, rng: &mut _| device.upload(&data::random::<T>(rng, n)).map_err(fail);
        let k = upload(t.layout.cache_len(), &mut rng)?;
        let v = upload(t.layout.cache_len(), &mut rng)?;
        let q = upload(t.lens.num_tokens() * case.shape.q_row_len(), &mut rng)?;
        let out = device.alloc::<T>(q.len()).map_err(fail)?;
        let lse = device
            .alloc::<f32>(t.lens.num_tokens() * case.shape.n_heads())
            .map_err(fail)?;
        let fused = AttendBatch::with_kernels(
            device,
            t.layout,
            T::DTYPE,
            &t.lens,
            &t.block_tables,
            t.max_blocks,
            case.kernels.choice(),
        )
        .map_err(fail)?;
        let naive =
            NaiveAttention::<T>::new(device, t.layout, &t.lens, &t.block_tables, t.max_blocks)
                .map_err(fail)?;
        Ok(Self {
            device: device.clone(),
            case: case.clone(),
            k,
            v,
            q,
            out,
            lse,
            fused,
            naive,
        })
    }
}

impl<T: Element> Step for PlainStep<T> {
    fn fused(&mut self) -> paged_gqa::Result<()> {
        let s = self;
        s.fused.run(
            &s.device,
            &s.k,
            &s.v,
            &s.q,
            &mut s.out,
            &mut s.lse,
            &s.case.options,
        )
    }
    fn has_naive(&self) -> bool {
        true
    }
    fn naive(&mut self) -> paged_gqa::Result<()> {
        let s = self;
        s.naive
            .run(&s.device, &s.k, &s.v, &s.q, &mut s.out, &s.case.options)
    }
    fn kv_pages(&self) -> [(u64, usize); 2] {
        let bytes = self.k.len() * std::mem::size_of::<T>();
        [(self.k.address(), bytes), (self.v.address(), bytes)]
    }
}

/// fp8 pages of `F` under a compute dtype `T` (no naive path: it has no fp8 pages).
struct Fp8Step<T: Element, F: Fp8Element> {
    device: Rc<SimDevice>,
    case: Case,
    k: SimBuffer<F>,
    v: SimBuffer<F>,
    scales: paged_gqa::sim::DeviceKvScales,
    q: SimBuffer<T>,
    out: SimBuffer<T>,
    lse: SimBuffer<f32>,
    fused: AttendBatch,
}

impl<T: Element, F: Fp8Element> Fp8Step<T, F> {
    fn new(device: &Rc<SimDevice>, case: &Case) -> Result<Self, Failure> {
        let mut rng = data::rng();
        let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
        let fail = Failure::runtime;
        let (k, v, scales) = data::fp8_kv::<F>(&mut rng, &t.layout).map_err(fail)?;
        let scales = paged_gqa::sim::DeviceKvScales::new(device, &scales).map_err(fail)?;
        let (k, v) = (
            device.upload(&k).map_err(fail)?,
            device.upload(&v).map_err(fail)?,
        );
        let q = data::random::<T>(&mut rng, t.lens.num_tokens() * case.shape.q_row_len());
        let q = device.upload(&q).map_err(fail)?;
        let out = device.alloc::<T>(q.len()).map_err(fail)?;
        let lse = device
            .alloc::<f32>(t.lens.num_tokens() * case.shape.n_heads())
            .map_err(fail)?;
        let fused = AttendBatch::with_kernels(
            device,
            t.layout,
            T::DTYPE,
            &t.lens,
            &t.block_tables,
            t.max_blocks,
            case.kernels.choice(),
        )
        .map_err(fail)?;
        Ok(Self {
            device: device.clone(),
            case: case.clone(),
            k,
            v,
            scales,
            q,
            out,
            lse,
            fused,
        })
    }
}

impl<T: Element, F: Fp8Element> Step for Fp8Step<T, F> {
    fn fused(&mut self) -> paged_gqa::Result<()> {
        let s = self;
        s.fused.run_fp8(
            &s.device,
            &s.k,
            &s.v,
            &s.scales,
            &s.q,
            &mut s.out,
            &mut s.lse,
            &s.case.options,
        )
    }
    fn has_naive(&self) -> bool {
        false
    }
    fn naive(&mut self) -> paged_gqa::Result<()> {
        Ok(())
    }
    fn kv_pages(&self) -> [(u64, usize); 2] {
        let bytes = self.k.len() * std::mem::size_of::<F>();
        [(self.k.address(), bytes), (self.v.address(), bytes)]
    }
}
