//! Attention variants: which keys a query row sees (causal or not, a sliding window) and how its
//! scores are shaped (scale, soft-cap, ALiBi, sinks), with FlashInfer's and FlashAttention's
//! conventions.
//!
//! Query row `j` of a sequence with `L` keys and `n` query rows sits at position
//! `p = L - n + j` (bottom-right) and sees key `k` when
//! - `k <= p` ([`causal`](AttendOptions::with_causal), the default), or any `k < L` when not
//!   causal (the prefix pass of a shared-prefix batch);
//! - and `k >= p - window_left` when [`window_left`](AttendOptions::with_window_left) `>= 0`:
//!   a sliding window of `window_left + 1` keys, the query's own included.
//!
//! Its score for a visible key, in this order:
//! 1. `s = scale * q . k` (`scale` defaults to `head_dim^-0.5`);
//! 2. `s = cap * tanh(s / cap)` with a [soft-cap](AttendOptions::with_logit_softcap) `cap > 0`
//!    (tanh saturates: no NaN however large `s` is);
//! 3. `s += slope[h] * (k - p)` with [ALiBi slopes](AttendOptions::with_alibi_slopes) (by global
//!    query head `h`).
//!
//! Softmax over the visible keys, where each [sink](AttendOptions::with_sinks) adds `exp(sink[h])`
//! to the denominator and no value (natural-log units, neither scaled nor capped), exactly once
//! per row however the keys are split. The returned LSE (natural log) includes the sink; a row
//! that sees no key gives output 0 and LSE `sink[h]` (`-inf` without sinks).

use std::ops::Range;

use crate::error::{Error, Result};
use crate::shape::GqaShape;

/// Which keys each query row sees: causal or not, and an optional sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyMask {
    /// Keys up to the row's position only (else every key of the sequence).
    pub causal: bool,
    /// Keys from `position - window_left` on; `None`: no window.
    pub window_left: Option<usize>,
}

impl KeyMask {
    /// Causal attention over every earlier key: the default.
    pub const CAUSAL: KeyMask = KeyMask {
        causal: true,
        window_left: None,
    };

    /// The keys query row `j` of a sequence with `context_len` keys and `query_len` query rows
    /// sees (`j < query_len <= context_len`).
    ///
    /// ```
    /// use paged_gqa::variants::KeyMask;
    /// let window = KeyMask { causal: true, window_left: Some(2) };
    /// assert_eq!(window.visible_keys(10, 1, 0), 7..10);       // decode at position 9: 3 keys
    /// assert_eq!(KeyMask::CAUSAL.visible_keys(10, 4, 0), 0..7); // row 0 of 4 sits at 6
    /// # let prefix = KeyMask { causal: false, window_left: None };
    /// assert_eq!(prefix.visible_keys(10, 4, 0), 0..10);
    /// ```
    pub fn visible_keys(self, context_len: usize, query_len: usize, j: usize) -> Range<usize> {
        let position = context_len - query_len + j;
        let end = if self.causal {
            position + 1
        } else {
            context_len
        };
        let start = self
            .window_left
            .map_or(0, |window| position.saturating_sub(window));
        start..end
    }

    /// The first key any query row of a sequence can see (its first row's window start).
    pub fn first_visible_key(self, context_len: usize, query_len: usize) -> usize {
        if query_len == 0 {
            return context_len;
        }
        self.visible_keys(context_len, query_len, 0).start
    }
}

impl Default for KeyMask {
    fn default() -> Self {
        Self::CAUSAL
    }
}

/// `window_left` for a model config's `sliding_window = W` (Hugging Face, vLLM, the reference
/// implementations): `W` keys *including the query's own*, so `window_left = W - 1`. `W = 0` is
/// an error.
///
/// ```
/// // Mistral-7B-v0.1: sliding_window 4096 -> keys p - 4095 ..= p.
/// assert_eq!(paged_gqa::variants::window_left_from_sliding_window(4096)?, 4095);
/// # Ok::<(), paged_gqa::Error>(())
/// ```
pub fn window_left_from_sliding_window(sliding_window: usize) -> Result<i32> {
    if sliding_window == 0 {
        return Err(Error::InvalidOption {
            option: "sliding_window",
            value: "0".into(),
            expected: "at least 1 (the window counts the query's own key)",
        });
    }
    i32::try_from(sliding_window - 1).map_err(|_| Error::InvalidOption {
        option: "sliding_window",
        value: sliding_window.to_string(),
        expected: "at most 2^31",
    })
}

/// The ALiBi slopes of Press et al. for `n_heads` heads, by global head index: with
/// `n = 2^floor(log2 n_heads)`, heads `0..n` get `2^(-8 (i + 1) / n)`, and the heads past `n` (a
/// head count that is not a power of two) the odd powers `2^(-4 (2 i + 1) / n)`, `i = 0, 1, ...`,
/// of the next power of two's sequence. Under tensor parallelism each rank takes its heads'
/// slice of the whole model's slopes.
///
/// ```
/// let slopes = paged_gqa::variants::alibi_slopes(8);
/// assert_eq!(slopes[0], 0.5);
/// assert_eq!(slopes[7], 1.0 / 256.0);
/// assert_eq!(paged_gqa::variants::alibi_slopes(40).len(), 40);
/// ```
pub fn alibi_slopes(n_heads: usize) -> Vec<f32> {
    if n_heads == 0 {
        return Vec::new();
    }
    let n = 1usize << n_heads.ilog2();
    let power = |exponent: f64| 2f64.powf(exponent) as f32;
    let mut slopes: Vec<f32> = (1..=n).map(|i| power(-8.0 * i as f64 / n as f64)).collect();
    // The rest: every other slope of the 2n-head sequence, 2^(-8 (2 i + 1) / (2 n)).
    slopes.extend((0..n_heads - n).map(|i| power(-8.0 * (2 * i + 1) as f64 / (2 * n) as f64)));
    slopes
}

/// The attention variants of one call. The default is plain causal attention with
/// `scale = head_dim^-0.5`; every builder method turns one variant on. Validated against the
/// shape by every attention path before anything runs ([`validate`](AttendOptions::validate)).
///
/// ```
/// use paged_gqa::{variants::window_left_from_sliding_window, AttendOptions, GqaShape};
/// // A Gemma-2-9B sliding layer: window 4096, soft-cap 50, scale 256^-0.5.
/// let options = AttendOptions::new()
///     .with_window_left(window_left_from_sliding_window(4096)?)
///     .with_logit_softcap(50.0)
///     .with_scale(1.0 / 16.0);
/// options.validate(GqaShape::new(16, 8, 256)?)?;
/// // gpt-oss: one sink per query head.
/// let sinks = AttendOptions::new().with_sinks(vec![0.5; 64]);
/// assert!(sinks.validate(GqaShape::new(32, 8, 64)?).is_err()); // 64 sinks for 32 heads
/// # Ok::<(), paged_gqa::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttendOptions {
    scale: Option<f64>,
    causal: bool,
    window_left: i32,
    logit_softcap: f32,
    sinks: Option<Vec<f32>>,
    alibi_slopes: Option<Vec<f32>>,
}

impl Default for AttendOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl AttendOptions {
    /// Plain causal attention, `scale = head_dim^-0.5`.
    pub fn new() -> Self {
        Self {
            scale: None,
            causal: true,
            window_left: -1,
            logit_softcap: 0.0,
            sinks: None,
            alibi_slopes: None,
        }
    }

    /// The softmax scale (Gemma-2-27B: `144^-0.5`, not `head_dim^-0.5`).
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// The scale when `Some`, else the default `head_dim^-0.5`.
    pub fn with_scale_opt(mut self, scale: Option<f64>) -> Self {
        self.scale = scale;
        self
    }

    /// `false`: every query row sees every key of its sequence (a shared prefix's pass).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Keys `k >= position - window_left` only; `-1` turns the window off. A model config's
    /// `sliding_window = W` is `window_left = W - 1`: see [`window_left_from_sliding_window`].
    pub fn with_window_left(mut self, window_left: i32) -> Self {
        self.window_left = window_left;
        self
    }

    /// `s = cap * tanh(s / cap)` after the scale; `0` turns it off (Gemma-2: 50).
    pub fn with_logit_softcap(mut self, cap: f32) -> Self {
        self.logit_softcap = cap;
        self
    }

    /// One sink logit per query head (`[n_heads]`, natural log, not scaled or capped): each adds
    /// `exp(sink)` to its head's softmax denominator. `-inf` is no sink for that head.
    pub fn with_sinks(mut self, sinks: Vec<f32>) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// One ALiBi slope per query head (`[n_heads]`, by global head index): `s += slope * (k - p)`
    /// after the soft-cap. [`alibi_slopes`] gives Press et al.'s.
    pub fn with_alibi_slopes(mut self, slopes: Vec<f32>) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// The explicit scale, if any.
    pub fn scale(&self) -> Option<f64> {
        self.scale
    }

    /// The scale this call uses for `shape`.
    pub fn scale_for(&self, shape: GqaShape) -> f64 {
        self.scale.unwrap_or_else(|| shape.default_scale())
    }

    /// Whether attention is causal.
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// `window_left` as given (`-1`: no window).
    pub fn window_left(&self) -> i32 {
        self.window_left
    }

    /// The soft-cap (`0`: off).
    pub fn logit_softcap(&self) -> f32 {
        self.logit_softcap
    }

    /// The sinks, `[n_heads]`.
    pub fn sinks(&self) -> Option<&[f32]> {
        self.sinks.as_deref()
    }

    /// The ALiBi slopes, `[n_heads]`.
    pub fn alibi_slopes(&self) -> Option<&[f32]> {
        self.alibi_slopes.as_deref()
    }

    /// Which keys each row sees (after [`validate`](AttendOptions::validate): a window below
    /// `-1` reads as none here).
    pub fn mask(&self) -> KeyMask {
        KeyMask {
            causal: self.causal,
            window_left: usize::try_from(self.window_left).ok(),
        }
    }

    /// Checks every variant against `shape`: a finite scale, `window_left >= -1`, a finite
    /// soft-cap `>= 0`, and `n_heads` sinks (no NaN or `+inf`) and `n_heads` finite slopes.
    pub fn validate(&self, shape: GqaShape) -> Result<()> {
        let scale = self.scale_for(shape);
        if !scale.is_finite() {
            return Err(Error::InvalidScale { scale });
        }
        if self.window_left < -1 {
            return Err(Error::InvalidOption {
                option: "window_left",
                value: self.window_left.to_string(),
                expected: "-1 (no window) or a key count >= 0",
            });
        }
        if !(self.logit_softcap >= 0.0 && self.logit_softcap.is_finite()) {
            return Err(Error::InvalidOption {
                option: "logit_softcap",
                value: self.logit_softcap.to_string(),
                expected: "0 (off) or a finite cap > 0",
            });
        }
        if let Some(sinks) = &self.sinks {
            Error::check_len("sinks (one per query head)", sinks.len(), shape.n_heads())?;
            if let Some((head, &sink)) = sinks
                .iter()
                .enumerate()
                .find(|(_, s)| s.is_nan() || **s == f32::INFINITY)
            {
                return Err(Error::InvalidOption {
                    option: "sinks",
                    value: format!("{sink} (head {head})"),
                    expected: "a finite logit or -inf",
                });
            }
        }
        if let Some(slopes) = &self.alibi_slopes {
            Error::check_len(
                "alibi_slopes (one per query head)",
                slopes.len(),
                shape.n_heads(),
            )?;
            if let Some((head, &slope)) = slopes.iter().enumerate().find(|(_, s)| !s.is_finite()) {
                return Err(Error::InvalidOption {
                    option: "alibi_slopes",
                    value: format!("{slope} (head {head})"),
                    expected: "finite slopes",
                });
            }
        }
        Ok(())
    }
}
