//! Forward-error bounds of an f32 attention kernel against the f64 oracle, computed from the
//! case's own data: what a test may allow each output element and each lse of a kernel that
//! reads the same 16-bit (or fp8) values as the oracle, and no more.
//!
//! A kernel differs from the oracle only by rounding, so its error follows from the numerics of
//! the row (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3-4), first order in
//! the unit roundoff `u = 2^-24` of f32 and `u_o` of the output type (`2^-8` bf16, `2^-11` f16):
//!
//! - **Logits.** The dot product `q . k_t` of `d` products is off by at most
//!   `2 (d + 2) u sum_i |q_i k_ti|` (times the scale): `d` operations, a factor 2 for the
//!   truncating accumulation of tensor cores (Fasi, Higham, Mikaitis, Pranesh, "Numerical
//!   behavior of NVIDIA tensor cores", PeerJ CS 2021), two more roundings for the scale and
//!   `log2 e` folded into q. The soft-cap passes that error on times its slope
//!   `1 - tanh^2`, taken at the end of the error interval nearest 0, so huge logits that
//!   saturate pass on nothing; then `u (4 cap + 4 |s_t| + 4 |bias_t| + 2 |s_t - lse| + 8)` for
//!   the cap's `tanhf` and multiply, the ALiBi product and add, the subtraction of the running
//!   max and `exp2f`. Call the whole relative error of key `t`'s weight `rho_t`.
//! - **Softmax.** To first order a weight error moves the output by
//!   `sum_t P_t rho_t (v_t - o)`, bounded by `sum_t P_t rho_t |v_t| + |o| sum_t P_t rho_t`, and
//!   the lse by `sum_t P_t rho_t` (`P_t = exp(s_t - lse)`, the sink a key with no value).
//! - **Long sums.** The denominator `l`, the P.V sums and the split merge are sums of `n` terms
//!   with at most `2 n + 64` roundings, each below `u` times the partial sum. Their errors are
//!   bounded with the probabilistic model of Higham and Mary ("A new approach to probabilistic
//!   rounding error analysis", SIAM J. Sci. Comput. 2019): independent, mean-zero rounding errors
//!   sum to at most `lambda sqrt(m) u` relative (`m` roundings), except with probability
//!   `2 exp(-lambda^2 / 2)` (Hoeffding); `lambda = 8` makes that 2.5e-14 per element. The
//!   worst-case `m u` would be 180 times looser at 32k keys and hide a lost key. Tensor cores
//!   truncate, so their errors are not mean-zero: P.V on tensor cores gets the deterministic
//!   `2 u (n / 8 + 32)` instead (n / 16 MMA accumulations, each off by up to `2 u`, with room).
//! - **P rounded before P.V.** The tensor-core kernel rounds each `P_t` to the MMA type: the
//!   output moves by `sum_t P_t eps_t v_t` with `|eps_t| <= u_p`, at most
//!   `lambda u_p sqrt(sum_t P_t^2 v_t^2)` under the same model (and `u_p |o|` for a common bias).
//! - **Output.** Rounding to the output type adds `u_o |o|`, and `u_o` times the smallest normal
//!   of the type where the output is subnormal (f16).
//!
//! Everything the bounds need from the data is gathered in one pass of the oracle
//! ([`attention_with_conditioning`](crate::cpu::attention_with_conditioning)) as a
//! [`Conditioning`]; a [`RoundingModel`] turns it into bounds for one kernel.

use crate::dtype::DType;

/// f32's unit roundoff.
const U32: f64 = 1.0 / 16_777_216.0; // 2^-24
/// Roundings a long sum of `n` terms may take: its additions, the rescale of each tile, the
/// split merge's terms (64 of room).
fn roundings(keys: f64) -> f64 {
    2.0 * keys + 64.0
}

/// How a row's inputs condition its attention: what [`RoundingModel::bounds`] needs from the
/// data, gathered by the oracle in the same pass as the attention. Rows the oracle left out
/// hold NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    /// `sum_t P_t |v_t[e]|`, `[num_tokens, n_heads, head_dim]`.
    pub weighted_abs_v: Vec<f64>,
    /// `sum_t P_t rho_t |v_t[e]|` (`rho_t`: the relative error of key `t`'s weight; see the
    /// module docs), same shape.
    pub weighted_rho_abs_v: Vec<f64>,
    /// `sqrt(sum_t P_t^2 v_t[e]^2)`, same shape.
    pub weight_norm_v: Vec<f64>,
    /// `sum_t P_t rho_t` over the keys and the sink, `[num_tokens, n_heads]`.
    pub weighted_rho: Vec<f64>,
    /// Keys the row sees, `[num_tokens, n_heads]` (as f64).
    pub keys: Vec<f64>,
}

/// How a row of [`Conditioning`] is accumulated by the oracle, key by key.
#[derive(Debug, Clone)]
pub(crate) struct RowConditioning {
    pub weighted_abs_v: Vec<f64>,
    pub weighted_rho_abs_v: Vec<f64>,
    pub weight_sq_v: Vec<f64>,
    pub weighted_rho: f64,
}

impl RowConditioning {
    pub fn new(head_dim: usize) -> Self {
        Self {
            weighted_abs_v: vec![0.0; head_dim],
            weighted_rho_abs_v: vec![0.0; head_dim],
            weight_sq_v: vec![0.0; head_dim],
            weighted_rho: 0.0,
        }
    }

    /// Adds one key of weight `p` (`exp(s - lse)`), relative weight error `rho`, values `v`.
    pub fn add_key(&mut self, p: f64, rho: f64, v: impl Iterator<Item = f64>) {
        self.weighted_rho += p * rho;
        let (p_rho, p_sq) = (p * rho, p * p);
        let sums = self
            .weighted_abs_v
            .iter_mut()
            .zip(self.weighted_rho_abs_v.iter_mut())
            .zip(self.weight_sq_v.iter_mut());
        for (((abs_v, rho_abs_v), sq_v), v) in sums.zip(v) {
            *abs_v += p * v.abs();
            *rho_abs_v += p_rho * v.abs();
            *sq_v += p_sq * v * v;
        }
    }

    /// Adds the sink: a denominator term of weight `p` and relative error `rho`, no value.
    pub fn add_sink(&mut self, p: f64, rho: f64) {
        self.weighted_rho += p * rho;
    }
}

/// The relative error bound `rho_t` of one key's weight (module docs, "Logits"): `z` the scaled
/// dot product before the soft-cap, `abs_dot` the scaled `sum_i |q_i k_ti|`, `cap` the soft-cap
/// (0 off), `bias` the ALiBi term, `s` the final logit and `lse` the row's.
pub(crate) fn key_weight_error(
    head_dim: usize,
    z: f64,
    abs_dot: f64,
    cap: f64,
    bias: f64,
    s: f64,
    lse: f64,
) -> f64 {
    let dz = 2.0 * (head_dim as f64 + 2.0) * U32 * abs_dot + 2.0 * U32 * z.abs();
    let slope = if cap > 0.0 {
        let t = ((z.abs() - dz).max(0.0) / cap).tanh();
        1.0 - t * t
    } else {
        1.0
    };
    slope * dz + U32 * (4.0 * cap + 4.0 * s.abs() + 4.0 * bias.abs() + 2.0 * (s - lse).abs() + 8.0)
}

/// The sink's relative weight error: its log2 conversion, the subtraction of the max, `exp2f`.
pub(crate) fn sink_weight_error(sink: f64, lse: f64) -> f64 {
    U32 * (2.0 * (sink - lse).abs() + 8.0)
}

/// How the long sums of a kernel round (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// f32 additions rounded to nearest (CUDA cores, the CPU, the emulator's MMA).
    RoundToNearest,
    /// Tensor-core MMA accumulation on a GPU: truncating, so biased (P.V bounded worst-case).
    TensorCores,
}

/// How one attention path rounds: turns a [`Conditioning`] into per-element bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundingModel {
    /// Unit roundoff of the output type (`2^-8` bf16, `2^-11` f16, `2^-24` f32).
    pub out_unit: f64,
    /// The output type's smallest normal magnitude (its subnormals' spacing is `2 out_unit`
    /// times it).
    pub out_min_normal: f64,
    /// Unit roundoff of the weights `P` as they enter P.V: the MMA type's for the tensor-core
    /// kernel, f32's for the CUDA-core kernel and the CPU.
    pub p_unit: f64,
    /// How P.V accumulates.
    pub accumulation: Accumulation,
    /// The probabilistic terms' multiplier (8: each holds but with probability 2.5e-14).
    pub lambda: f64,
    /// Unit roundoff of partial outputs stored between passes and merged (`merge_states` of
    /// two attention passes written in a 16-bit type); 0 when the outputs are not merged.
    pub partial_unit: f64,
}

/// (unit roundoff, smallest normal) of an output type.
fn rounding_of(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (2f64.powi(-8), f64::from(f32::MIN_POSITIVE)),
        DType::F16 => (2f64.powi(-11), 2f64.powi(-14)),
        // f32, and fp8 (never an output type) read as f32.
        _ => (U32, f64::from(f32::MIN_POSITIVE)),
    }
}

impl RoundingModel {
    /// A path that keeps P in f32 and sums rounding to nearest (the CUDA-core kernel, the CPU
    /// fallback), writing `out_dtype`.
    pub fn f32_weights(out_dtype: DType) -> Self {
        let (out_unit, out_min_normal) = rounding_of(out_dtype);
        Self {
            out_unit,
            out_min_normal,
            p_unit: U32,
            accumulation: Accumulation::RoundToNearest,
            lambda: 8.0,
            partial_unit: 0.0,
        }
    }

    /// This model for the output of [`merge_states`](crate::cpu::merge_states) over passes
    /// whose outputs were stored with unit roundoff `unit`: each part `p` carries `unit |o_p|`
    /// and its lse's rounding into its weight `w_p`, and `sum_p w_p |o_p| <= sum_t P_t |v_t|`.
    pub fn with_rounded_partials(self, unit: f64) -> Self {
        Self {
            partial_unit: unit,
            ..self
        }
    }

    /// A path that rounds P to `dtype` (its MMA type, also the output type) before P.V and
    /// accumulates as `accumulation` (the tensor-core kernel: [`Accumulation::TensorCores`] on
    /// a GPU, [`Accumulation::RoundToNearest`] on the emulator).
    pub fn mma_weights(dtype: DType, accumulation: Accumulation) -> Self {
        let (out_unit, _) = rounding_of(dtype);
        Self {
            p_unit: out_unit,
            accumulation,
            ..Self::f32_weights(dtype)
        }
    }

    /// The larger of two models' bounds, term by term: for a launch that may take either path
    /// (`KernelChoice::Auto`).
    pub fn either(self, other: Self) -> Self {
        Self {
            out_unit: self.out_unit.max(other.out_unit),
            out_min_normal: self.out_min_normal.max(other.out_min_normal),
            p_unit: self.p_unit.max(other.p_unit),
            accumulation: if self.accumulation == Accumulation::TensorCores {
                self.accumulation
            } else {
                other.accumulation
            },
            lambda: self.lambda.max(other.lambda),
            partial_unit: self.partial_unit.max(other.partial_unit),
        }
    }

    /// The bound of `|lse - lse_oracle|` of one row (natural log): `lse` the oracle's,
    /// `weighted_rho` and `keys` from its [`Conditioning`].
    pub fn lse_bound(&self, lse: f64, weighted_rho: f64, keys: f64) -> f64 {
        weighted_rho + self.lambda * U32 * roundings(keys).sqrt() + U32 * (4.0 * lse.abs() + 8.0)
    }

    /// The bound of `|out[e] - out_oracle[e]|` of one element: `o` the oracle's output, the rest
    /// its row's and element's [`Conditioning`].
    pub fn out_bound(
        &self,
        o: f64,
        weighted_abs_v: f64,
        weighted_rho_abs_v: f64,
        weight_norm_v: f64,
        weighted_rho: f64,
        keys: f64,
    ) -> f64 {
        let sums = self.lambda * U32 * roundings(keys).sqrt();
        let pv = match self.accumulation {
            Accumulation::RoundToNearest => sums,
            Accumulation::TensorCores => 2.0 * U32 * (keys / 8.0 + 32.0),
        };
        let before_output = weighted_rho_abs_v
            + o.abs() * (weighted_rho + sums + 8.0 * U32)
            + self.lambda * self.p_unit * weight_norm_v
            + self.p_unit * o.abs()
            + pv * weighted_abs_v;
        let partials = if self.partial_unit > 0.0 {
            (self.partial_unit + sums) * weighted_abs_v
        } else {
            0.0
        };
        let before_output = before_output + partials;
        before_output * (1.0 + 2.0 * self.out_unit)
            + self.out_unit * o.abs()
            + self.out_unit * self.out_min_normal
    }

    /// Every bound of an attention: `(out [num_tokens, n_heads, head_dim], lse [num_tokens,
    /// n_heads])`, NaN in rows the oracle left out.
    pub fn bounds(&self, att: &crate::cpu::Attention, cond: &Conditioning) -> (Vec<f64>, Vec<f64>) {
        let rows = cond.keys.len();
        let d = att.out.len().checked_div(rows).unwrap_or(0);
        let lse = (0..rows)
            .map(|r| self.lse_bound(att.lse[r], cond.weighted_rho[r], cond.keys[r]))
            .collect();
        let out = (0..att.out.len())
            .map(|i| {
                let r = i / d;
                self.out_bound(
                    att.out[i],
                    cond.weighted_abs_v[i],
                    cond.weighted_rho_abs_v[i],
                    cond.weight_norm_v[i],
                    cond.weighted_rho[r],
                    cond.keys[r],
                )
            })
            .collect();
        (out, lse)
    }
}
