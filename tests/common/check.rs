//! The attention checks every kernel test shares: a case run through `AttendBatch` with each
//! kernel choice (automatic, CUDA cores only, tensor cores only), every output compared with
//! the f64 oracle computed with the same attention variants.

use paged_gqa::fp8::{Fp8Element, KvScales};
use paged_gqa::plan::KernelChoice;
use paged_gqa::{AttendOptions, Element};

use super::{kept_rows, rel_l2, Device, Fp8Typed, PagedCase, Typed};

/// (relative L2 bound of `out`, max-abs bound of `lse`) for a dtype. The lse is f32 arithmetic on the same 16-bit inputs as the oracle's: on the emulator its
/// error is under 1e-6 on the quick cases; 1e-4 leaves room for long contexts and the GPU's
/// exp2f, and still sees one key lost at a split boundary (about 1e-3).
pub fn tolerance<T: Element>() -> (f64, f64) {
    if T::DTYPE == paged_gqa::DType::BF16 {
        (1e-2, 1e-4)
    } else {
        (2e-3, 1e-4)
    }
}

/// Runs one case through AttendBatch with each kernel choice (automatic, CUDA cores only,
/// tensor cores only) and compares every output with the oracle; returns each choice's split
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
    [
        KernelChoice::Auto,
        KernelChoice::CudaCores,
        KernelChoice::TensorCores,
    ]
    .into_iter()
    .map(|choice| {
        let what = format!("{what} ({choice:?})");
        run_and_compare(dev, &what, case, &typed, keep, choice, options)
    })
    .collect()
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
    [
        KernelChoice::Auto,
        KernelChoice::CudaCores,
        KernelChoice::TensorCores,
    ]
    .into_iter()
    .map(|choice| {
        let what = format!("{what} ({:?} pages, {choice:?})", F::FORMAT);
        run_fp8_and_compare(dev, &what, case, &typed, keep, choice, options)
    })
    .collect()
}

/// One kernel choice of an fp8 case against the oracle; returns the launch's split count.
fn run_fp8_and_compare<D: Device, T: Element, F: Fp8Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    typed: &Fp8Typed<T, F>,
    keep: &[bool],
    choice: KernelChoice,
    options: &AttendOptions,
) -> usize {
    let shape = case.layout.shape();
    let batch = dev
        .attend_batch(
            case.layout,
            T::DTYPE,
            &case.lens,
            &case.tables,
            case.max_blocks,
            choice,
        )
        .unwrap();
    let rows = case.lens.num_tokens() * shape.n_heads();
    let (k_dev, v_dev, q_dev) = (
        dev.upload(&typed.k_cache),
        dev.upload(&typed.v_cache),
        dev.upload(&typed.q),
    );
    let mut out = dev.alloc_poisoned::<T>(rows * shape.head_dim());
    let mut lse = dev.alloc_poisoned::<f32>(rows);
    dev.run_attend_fp8(
        &batch,
        &k_dev,
        &v_dev,
        &typed.scales,
        &q_dev,
        &mut out,
        &mut lse,
        options,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    compare::<T>(
        what,
        shape,
        &dev.download_f64(&out),
        &dev.download_f64(&lse),
        &typed.oracle,
        keep,
    );
    D::schedule(&batch)
        .splits(&case.lens, options.mask())
        .num_splits
}

/// A kernel's `out` and `lse` (downloaded, f64) against the oracle at the rows `keep`: every
/// element written and finite, relative L2 and max-abs of `out` and max-abs of `lse` within
/// [`tolerance`].
pub fn compare<T: Element>(
    what: &str,
    shape: paged_gqa::GqaShape,
    out: &[f64],
    lse: &[f64],
    oracle: &paged_gqa::cpu::Attention,
    keep: &[bool],
) {
    let (out_bound, lse_bound) = tolerance::<T>();
    assert!(
        out.iter().all(|x| x.is_finite()),
        "{what}: unwritten or non-finite output"
    );
    // Every row of these cases sees at least one key: a finite lse everywhere.
    assert!(
        lse.iter().all(|x| x.is_finite()),
        "{what}: unwritten or non-finite lse"
    );
    let row_len = shape.n_heads() * shape.head_dim();
    let (out, want) = (
        kept_rows(out, keep, row_len),
        kept_rows(&oracle.out, keep, row_len),
    );
    let rel = rel_l2(&out, &want);
    assert!(
        rel < out_bound,
        "{what}: relative L2 {rel:e} (bound {out_bound:e})"
    );
    let max_abs = out
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(max_abs < 0.05, "{what}: max |error| {max_abs:e}");
    let lse_err = kept_rows(lse, keep, shape.n_heads())
        .iter()
        .zip(kept_rows(&oracle.lse, keep, shape.n_heads()))
        .map(|(&g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(lse_err < lse_bound, "{what}: lse error {lse_err:e}");
}

/// One kernel choice of a case against the oracle; returns the launch's split count.
fn run_and_compare<D: Device, T: Element>(
    dev: &D,
    what: &str,
    case: &PagedCase,
    typed: &Typed<T>,
    keep: &[bool],
    choice: KernelChoice,
    options: &AttendOptions,
) -> usize {
    let shape = case.layout.shape();
    let Typed {
        q,
        k_cache: k,
        v_cache: v,
        oracle,
    } = typed;

    let batch = dev
        .attend_batch(
            case.layout,
            T::DTYPE,
            &case.lens,
            &case.tables,
            case.max_blocks,
            choice,
        )
        .unwrap();
    let rows = case.lens.num_tokens() * shape.n_heads();
    let (k_dev, v_dev, q_dev) = (dev.upload(k), dev.upload(v), dev.upload(q));
    let mut out = dev.alloc_poisoned::<T>(rows * shape.head_dim());
    let mut lse = dev.alloc_poisoned::<f32>(rows);
    dev.run_attend(&batch, &k_dev, &v_dev, &q_dev, &mut out, &mut lse, options)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let out = dev.download_f64(&out);
    let lse = dev.download_f64(&lse);
    compare::<T>(what, shape, &out, &lse, oracle, keep);
    D::schedule(&batch)
        .splits(&case.lens, options.mask())
        .num_splits
}
