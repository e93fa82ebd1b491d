//! The sweep on the kernel emulator: the real kernels, run on the CPU. Its times are the
//! emulator's wall clock, not a GPU's; what it measures is traffic: the bytes the attention
//! kernels bring from the K/V pages (`kv_bytes_fetched`, counted by the emulator at every
//! cp.async) against the bytes the batch must read (`kv_bytes_needed`), and with `--profile`
//! the profiler's headline figures of each launch (see `paged-gqa profile`).

use std::rc::Rc;

use half::{bf16, f16};
use paged_gqa::fp8::{Fp8E4M3, Fp8E5M2, Fp8Element};
use paged_gqa::sim::profile::Profile;
use paged_gqa::sim::{AttendBatch, DeviceKvScales, NaiveAttention, SimBuffer, SimDevice, Tracing};
use paged_gqa::{DType, Element, PageElement};

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

/// The fused path's data of one case on the device: K and V pages of `P`, queries and
/// outputs of the compute dtype `T`, and the batch (tables uploaded once).
struct Fused<T: Element, P: PageElement> {
    device: Rc<SimDevice>,
    case: Case,
    /// [num_blocks, page_size, n_kv_heads, head_dim] each
    k: SimBuffer<P>,
    v: SimBuffer<P>,
    /// [num_tokens, n_heads, head_dim]
    q: SimBuffer<T>,
    /// [num_tokens, n_heads, head_dim]
    out: SimBuffer<T>,
    /// [num_tokens, n_heads]
    lse: SimBuffer<f32>,
    batch: AttendBatch,
}

impl<T: Element, P: PageElement> Fused<T, P> {
    /// Uploads the pages `k`, `v` and the queries `q` of `t`'s batch.
    fn new(
        device: &Rc<SimDevice>,
        case: &Case,
        t: &data::Tables,
        (k, v): (&[P], &[P]),
        q: &[T],
    ) -> Result<Self, Failure> {
        let fail = Failure::runtime;
        let batch = AttendBatch::with_kernels(
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
            k: device.upload(k).map_err(fail)?,
            v: device.upload(v).map_err(fail)?,
            q: device.upload(q).map_err(fail)?,
            out: device.alloc::<T>(q.len()).map_err(fail)?,
            lse: device
                .alloc::<f32>(t.lens.num_tokens() * case.shape.n_heads())
                .map_err(fail)?,
            batch,
        })
    }

    /// (address, bytes) of the K and V pages.
    fn kv_pages(&self) -> [(u64, usize); 2] {
        let bytes = self.k.len() * std::mem::size_of::<P>();
        [(self.k.address(), bytes), (self.v.address(), bytes)]
    }
}

/// Pages of the compute dtype `T`, with the naive path over the same pages.
struct PlainStep<T: Element> {
    fused: Fused<T, T>,
    naive: NaiveAttention<T>,
}

impl<T: Element> PlainStep<T> {
    fn new(device: &Rc<SimDevice>, case: &Case) -> Result<Self, Failure> {
        let mut rng = data::rng();
        let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
        let k = data::random::<T>(&mut rng, t.layout.cache_len());
        let v = data::random::<T>(&mut rng, t.layout.cache_len());
        let q = data::random::<T>(&mut rng, t.lens.num_tokens() * case.shape.q_row_len());
        let naive =
            NaiveAttention::<T>::new(device, t.layout, &t.lens, &t.block_tables, t.max_blocks)
                .map_err(Failure::runtime)?;
        Ok(Self {
            fused: Fused::new(device, case, &t, (&k, &v), &q)?,
            naive,
        })
    }
}

impl<T: Element> Step for PlainStep<T> {
    fn fused(&mut self) -> paged_gqa::Result<()> {
        let s = &mut self.fused;
        s.batch.run(
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
        let s = &mut self.fused;
        self.naive
            .run(&s.device, &s.k, &s.v, &s.q, &mut s.out, &s.case.options)
    }
    fn kv_pages(&self) -> [(u64, usize); 2] {
        self.fused.kv_pages()
    }
}

/// fp8 pages of `F` under a compute dtype `T` (no naive path: it has no fp8 pages).
struct Fp8Step<T: Element, F: Fp8Element> {
    fused: Fused<T, F>,
    scales: DeviceKvScales,
}

impl<T: Element, F: Fp8Element> Fp8Step<T, F> {
    fn new(device: &Rc<SimDevice>, case: &Case) -> Result<Self, Failure> {
        let mut rng = data::rng();
        let t = data::tables(case, &mut rng).map_err(Failure::runtime)?;
        let (k, v, scales) = data::fp8_kv::<F>(&mut rng, &t.layout).map_err(Failure::runtime)?;
        let q = data::random::<T>(&mut rng, t.lens.num_tokens() * case.shape.q_row_len());
        Ok(Self {
            fused: Fused::new(device, case, &t, (&k, &v), &q)?,
            scales: DeviceKvScales::new(device, &scales).map_err(Failure::runtime)?,
        })
    }
}

impl<T: Element, F: Fp8Element> Step for Fp8Step<T, F> {
    fn fused(&mut self) -> paged_gqa::Result<()> {
        let s = &mut self.fused;
        s.batch.run_fp8(
            &s.device,
            &s.k,
            &s.v,
            &self.scales,
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
        self.fused.kv_pages()
    }
}
