//! The attention checks every kernel test shares: a case run through `AttendBatch` with each
//! kernel choice (automatic, CUDA cores only, each tensor-core layout only), every output compared with
//! the f64 oracle computed with the same attention variants.

use paged_gqa::cpu::{Attention, Conditioning, RoundingModel};
use paged_gqa::fp8::{Fp8Element, KvScales};
use paged_gqa::plan::KernelChoice;
use paged_gqa::{AttendOptions, Element};

use super::{Device, PagedCase};

/// The rounding model of one kernel choice on backend `D` writing `T`: the tensor-core kernel
/// rounds P to `T` before P.V (and, on a GPU, accumulates truncating), the CUDA-core kernel
/// keeps P in f32; `Auto` may take either, per item.
pub fn model<D: Device, T: Element>(choice: KernelChoice) -> RoundingModel {
    let cuda_cores = RoundingModel::f32_weights(T::DTYPE);
    let tensor_cores = RoundingModel::mma_weights(T::DTYPE, D::MMA_ACCUMULATION);
    match choice {
        KernelChoice::CudaCores => cuda_cores,
        KernelChoice::TensorCores | KernelChoice::NarrowTensorCores => tensor_cores,
        KernelChoice::Auto => cuda_cores.either(tensor_cores),
    }
}

/// Runs one case through AttendBatch with each kernel choice (automatic, CUDA cores only,
/// each tensor-core layout only) and compares every output with the oracle; returns each choice's split
/// count.
pub fn check_case<D: Device, T: Element>(dev: &D, what: &str, case: &PagedCase) -> Vec<usize> {
    check_variant::<D, T>(dev, what, case, &AttendOptions::default())
}

/// [`check_case`] with the attention variants of `options` (the oracle computed with them).
pub fn check_variant<D: Device, T: Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    options: &AttendOptions,
) -> Vec<usize> {
    let keep = vec![true; case.lens.num_tokens()];
    check_case_with::<D, T>(dev, what, case, &keep, options)
}

/// [`check_case`] with the oracle computed at the query rows `keep` only (long cases); every
/// output element must still be written and finite.
pub fn check_case_at<D: Device, T: Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    keep: &[bool],
) -> Vec<usize> {
    check_case_with::<D, T>(dev, what, case, keep, &AttendOptions::default())
}

/// [`check_case_at`] with the attention variants of `options`.
pub fn check_case_with<D: Device, T: Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    keep: &[bool],
    options: &AttendOptions,
) -> Vec<usize> {
    let typed = case.typed_with::<T>(keep, options);
    let label = |choice| format!("{what} ({choice:?})");
    let want = (&typed.oracle, &typed.cond);
    case.each_choice(dev, label, want, keep, options, |batch, out, lse| {
        let (k, v) = (dev.upload(&typed.k_cache), dev.upload(&typed.v_cache));
        dev.run_attend(batch, &k, &v, &dev.upload(&typed.q), out, lse, options)
    })
}

/// [`check_case_with`] over fp8 pages: the case's K/V quantized to `F` under `scales`, q in
/// `T`, each kernel choice against the oracle over the dequantized K/V (same bounds as 16-bit
/// pages: the oracle sees exactly the values the kernels read). Returns each choice's splits.
pub fn check_fp8<D: Device, T: Element, F: Fp8Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    scales: &KvScales,
    keep: &[bool],
    options: &AttendOptions,
) -> Vec<usize> {
    let typed = case.fp8_typed::<T, F>(scales, keep, options);
    let label = |choice| format!("{what} ({:?} pages, {choice:?})", F::FORMAT);
    let want = (&typed.oracle, &typed.cond);
    case.each_choice(dev, label, want, keep, options, |batch, out, lse| {
        let (k, v) = (dev.upload(&typed.k_cache), dev.upload(&typed.v_cache));
        let q = dev.upload(&typed.q);
        dev.run_attend_fp8(batch, &k, &v, &typed.scales, &q, out, lse, options)
    })
}

impl PagedCase {
    /// Runs the case with each kernel choice (automatic, CUDA cores only, each tensor-core
    /// layout only): the choice's batch over the case's block tables, handed to `run` (which
    /// uploads q and the pages and launches with `options`) with poisoned outputs, then every
    /// output element and lse compared with `oracle` at the rows `keep` (`label`: a choice's
    /// name in messages). Returns each choice's split count.
    fn each_choice<D: Device, T: Element>(
        &self,
        dev: &D,
        label: impl Fn(KernelChoice) -> String,
        (oracle, cond): (&Attention, &Conditioning),
        keep: &[bool],
        options: &AttendOptions,
        run: impl Fn(&D::Attend, &mut D::Buf<T>, &mut D::Buf<f32>) -> paged_gqa::Result<()>,
    ) -> Vec<usize> {
        let shape = self.layout.shape();
        let rows = self.lens.num_tokens() * shape.n_heads();
        [
            KernelChoice::Auto,
            KernelChoice::CudaCores,
            KernelChoice::TensorCores,
            KernelChoice::NarrowTensorCores,
        ]
        .into_iter()
        .map(|choice| {
            let what = label(choice);
            let batch = dev
                .attend_batch(
                    self.layout,
                    T::DTYPE,
                    &self.lens,
                    &self.tables,
                    self.max_blocks,
                    choice,
                )
                .unwrap();
            let mut out = dev.alloc_poisoned::<T>(rows * shape.head_dim());
            let mut lse = dev.alloc_poisoned::<f32>(rows);
            run(&batch, &mut out, &mut lse).unwrap_or_else(|e| panic!("{what}: {e}"));
            compare(
                &what,
                shape,
                &dev.download_f64(&out),
                &dev.download_f64(&lse),
                oracle,
                cond,
                keep,
                model::<D, T>(choice),
            );
            D::schedule(&batch)
                .splits(&self.lens, options.mask())
                .num_splits
        })
        .collect()
    }
}

/// A kernel's `out` and `lse` (downloaded, f64) against the oracle at the rows `keep`: every
/// element written and finite, and each output element and lse within its own forward-error
/// bound under `model` (see [`check_bounds`]).
#[allow(clippy::too_many_arguments)]
pub fn compare(
    what: &str,
    shape: paged_gqa::GqaShape,
    out: &[f64],
    lse: &[f64],
    oracle: &Attention,
    cond: &Conditioning,
    keep: &[bool],
    model: RoundingModel,
) {
    assert!(
        out.iter().all(|x| x.is_finite()),
        "{what}: unwritten or non-finite output"
    );
    // Every row of these cases sees at least one key: a finite lse everywhere.
    assert!(
        lse.iter().all(|x| x.is_finite()),
        "{what}: unwritten or non-finite lse"
    );
    check_bounds(what, shape, out, Some(lse), oracle, cond, keep, model);
}

/// Each output element of the rows `keep` (`out`: `[num_tokens, n_heads, head_dim]`) and each
/// lse (`[num_tokens, n_heads]`, natural log; `None`: not checked) within the forward-error
/// bound that `model` gives it from the case's own [`Conditioning`]: no pooled norm, so a
/// mistake confined to one long row (whose outputs are small) or to the V side (which the lse
/// cannot see) fails as surely as one in a short row. Reports the worst element and how many
/// exceed their bound. `PAGED_GQA_BOUND_REPORT=1` prints each check's worst error as a share of
/// its bound (how much room the bounds leave).
#[allow(clippy::too_many_arguments)]
pub fn check_bounds(
    what: &str,
    shape: paged_gqa::GqaShape,
    out: &[f64],
    lse: Option<&[f64]>,
    oracle: &Attention,
    cond: &Conditioning,
    keep: &[bool],
    model: RoundingModel,
) {
    let (n_heads, d) = (shape.n_heads(), shape.head_dim());
    assert_eq!(out.len(), keep.len() * n_heads * d, "{what}: out length");
    let (out_bound, lse_bound) = model.bounds(oracle, cond);
    // (error / bound, index) of the worst element, and how many exceed their bound.
    let worst = |got: &[f64], want: &[f64], bound: &[f64], row_len: usize| {
        let mut worst = (0.0f64, 0usize);
        let mut over = 0usize;
        for (token, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
            for i in token * row_len..(token + 1) * row_len {
                // NaN (unwritten, or a NaN bound) counts as over, and as the worst.
                let ratio = (got[i] - want[i]).abs() / bound[i];
                let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
                if ratio > 1.0 {
                    over += 1;
                }
                if ratio > worst.0 {
                    worst = (ratio, i);
                }
            }
        }
        (worst, over)
    };
    let ((ratio, i), over) = worst(out, &oracle.out, &out_bound, n_heads * d);
    let report = std::env::var_os("PAGED_GQA_BOUND_REPORT").is_some();
    if report {
        let (err, bound) = ((out[i] - oracle.out[i]).abs(), out_bound[i]);
        eprintln!(
            "bound report: {what}: out: worst error {ratio:.3e} of its bound ({err:.3e} of {bound:.3e})"
        );
    }
    assert!(
        over == 0,
        "{what}: out[token {}, head {}, element {}] = {:e}, oracle {:e}: error {:e} is {ratio:.3e} \
         times its bound {:e} ({over} elements over their bound)",
        i / (n_heads * d),
        i / d % n_heads,
        i % d,
        out[i],
        oracle.out[i],
        (out[i] - oracle.out[i]).abs(),
        out_bound[i],
    );
    if let Some(lse) = lse {
        assert_eq!(lse.len(), keep.len() * n_heads, "{what}: lse length");
        let ((ratio, r), over) = worst(lse, &oracle.lse, &lse_bound, n_heads);
        if report {
            let (err, bound) = ((lse[r] - oracle.lse[r]).abs(), lse_bound[r]);
            // And the largest absolute error, beside its own bound.
            let big = (0..lse.len())
                .filter(|&i| keep[i / n_heads])
                .max_by(|&a, &b| {
                    let e = |i: usize| (lse[i] - oracle.lse[i]).abs();
                    e(a).total_cmp(&e(b))
                })
                .unwrap_or(0);
            eprintln!(
                "bound report: {what}: lse: worst error {ratio:.3e} of its bound ({err:.3e} of \
                 {bound:.3e}); largest error {:.3e} (bound {:.3e})",
                (lse[big] - oracle.lse[big]).abs(),
                lse_bound[big]
            );
        }
        assert!(
            over == 0,
            "{what}: lse[token {}, head {}] = {:e}, oracle {:e}: error {:e} is {ratio:.3e} times \
             its bound {:e} ({over} rows over their bound)",
            r / n_heads,
            r % n_heads,
            lse[r],
            oracle.lse[r],
            (lse[r] - oracle.lse[r]).abs(),
            lse_bound[r],
        );
    }
}
