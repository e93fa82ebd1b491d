//! The attention geometry and variants of real models, layer by layer: heads, the softmax
//! scale, and which layers attend through a sliding window, with a soft-cap, sinks or ALiBi.
//! Values are the models' published configurations (Hugging Face `config.json` and the reference
//! implementations); a model's `sliding_window = W` counts W keys including the query's own.
//!
//! ```
//! use paged_gqa::models;
//! let gemma = models::find("Gemma-2-9B").unwrap();
//! assert!(gemma.is_sliding(0) && !gemma.is_sliding(1)); // even layers slide, odd are global
//! let layer0 = gemma.options(0, None)?;
//! assert_eq!((layer0.window_left(), layer0.logit_softcap()), (4095, 50.0));
//! assert_eq!(gemma.options(1, None)?.window_left(), -1);
//! let gemma3 = models::find("Gemma-3-12B").unwrap();
//! assert_eq!((0..12).filter(|&l| !gemma3.is_sliding(l)).collect::<Vec<_>>(), [5, 11]);
//! # Ok::<(), paged_gqa::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::shape::GqaShape;
use crate::variants::{alibi_slopes, window_left_from_sliding_window, AttendOptions};

/// Which of a model's layers attend through its sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPattern {
    /// None: every layer is global.
    Global,
    /// Every layer (Mistral-7B-v0.1).
    AllSliding,
    /// Even layers 0, 2, ... slide, odd ones are global (Gemma-2, gpt-oss).
    EvenSliding,
    /// `local` sliding layers then one global, repeated: layer `l` is global when
    /// `(l + 1) % (local + 1) == 0` (Gemma-3: 5 local : 1 global).
    LocalThenGlobal { local: usize },
}

/// One model's attention, as this crate's kernels run it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    /// The name the sweep and the CLI know it by.
    pub name: &'static str,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub num_layers: usize,
    /// `sliding_window` of the config: keys a sliding layer's query sees, its own included.
    pub sliding_window: Option<usize>,
    /// Which layers slide.
    pub layers: LayerPattern,
    /// `attn_logit_softcapping` (Gemma-2: 50).
    pub logit_softcap: Option<f32>,
    /// The softmax scale when it is not `head_dim^-0.5` (Gemma: `query_pre_attn_scalar^-0.5`).
    pub scale: Option<f64>,
    /// Learned per-head sinks on every layer (gpt-oss); the values are the checkpoint's.
    pub sinks: bool,
    /// ALiBi with Press et al.'s slopes instead of rotary positions (MPT, BLOOM).
    pub alibi: bool,
}

impl Model {
    const fn plain(
        name: &'static str,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        num_layers: usize,
    ) -> Self {
        Self {
            name,
            n_heads,
            n_kv_heads,
            head_dim,
            num_layers,
            sliding_window: None,
            layers: LayerPattern::Global,
            logit_softcap: None,
            scale: None,
            sinks: false,
            alibi: false,
        }
    }

    /// The heads.
    pub fn shape(&self) -> Result<GqaShape> {
        GqaShape::new(self.n_heads, self.n_kv_heads, self.head_dim)
    }

    /// Whether `layer` attends through the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some()
            && match self.layers {
                LayerPattern::Global => false,
                LayerPattern::AllSliding => true,
                LayerPattern::EvenSliding => layer % 2 == 0,
                LayerPattern::LocalThenGlobal { local } => (layer + 1) % (local + 1) != 0,
            }
    }

    /// Whether every layer slides: a cache may then reclaim pages behind the window
    /// ([`CacheConfig::with_reclaim_window`](crate::cache::CacheConfig::with_reclaim_window)).
    pub fn all_layers_slide(&self) -> bool {
        (0..self.num_layers).all(|layer| self.is_sliding(layer))
    }

    /// The attention options of `layer`: window, soft-cap, scale and ALiBi slopes from the
    /// configuration; `sinks` (`[n_heads]`, the checkpoint's values for this layer) when the
    /// model has them, which is then required.
    pub fn options(&self, layer: usize, sinks: Option<Vec<f32>>) -> Result<AttendOptions> {
        if layer >= self.num_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                num_layers: self.num_layers,
            });
        }
        let mut options = AttendOptions::new().with_scale_opt(self.scale);
        if let (true, Some(window)) = (self.is_sliding(layer), self.sliding_window) {
            options = options.with_window_left(window_left_from_sliding_window(window)?);
        }
        if let Some(cap) = self.logit_softcap {
            options = options.with_logit_softcap(cap);
        }
        if self.alibi {
            options = options.with_alibi_slopes(alibi_slopes(self.n_heads));
        }
        match (self.sinks, sinks) {
            (true, Some(sinks)) => options = options.with_sinks(sinks),
            (false, None) => {}
            (true, None) => {
                return Err(Error::InvalidOption {
                    option: "sinks",
                    value: "none".into(),
                    expected: "the layer's sinks: this model has them",
                })
            }
            (false, Some(_)) => {
                return Err(Error::InvalidOption {
                    option: "sinks",
                    value: "given".into(),
                    expected: "none: this model has no sinks",
                })
            }
        }
        options.validate(self.shape()?)?;
        Ok(options)
    }
}

/// The models the benchmarks and the CLI know.
pub const MODELS: [Model; 13] = [
    Model::plain("Llama-3-8B", 32, 8, 128, 32),
    Model::plain("Llama-3-70B", 64, 8, 128, 80),
    Model::plain("Qwen2-7B", 28, 4, 128, 28),
    Model::plain("Qwen2.5-0.5B", 14, 2, 64, 24),
    // v0.2 and v0.3 ship no sliding window.
    Model::plain("Mistral-7B", 32, 8, 128, 32),
    Model {
        sliding_window: Some(4096),
        layers: LayerPattern::EvenSliding,
        logit_softcap: Some(50.0),
        scale: Some(0.0625), // query_pre_attn_scalar 256
        ..Model::plain("Gemma-2-9B", 16, 8, 256, 42)
    },
    Model::plain("Falcon-7B", 71, 1, 64, 32),
    Model::plain("Phi-3-medium", 40, 10, 128, 40),
    Model {
        sliding_window: Some(1024),
        layers: LayerPattern::LocalThenGlobal { local: 5 },
        scale: Some(0.0625), // query_pre_attn_scalar 256
        ..Model::plain("Gemma-3-12B", 16, 8, 256, 48)
    },
    Model {
        sliding_window: Some(4096),
        layers: LayerPattern::AllSliding,
        ..Model::plain("Mistral-7B-v0.1", 32, 8, 128, 32)
    },
    Model {
        sliding_window: Some(128),
        layers: LayerPattern::EvenSliding,
        sinks: true,
        ..Model::plain("gpt-oss-20b", 64, 8, 64, 24)
    },
    Model {
        alibi: true,
        ..Model::plain("MPT-7B", 32, 32, 128, 32)
    },
    Model {
        alibi: true,
        ..Model::plain("BLOOM-7B1", 32, 32, 128, 30)
    },
];

/// The model named `name` (as in [`MODELS`]), if known.
pub fn find(name: &str) -> Option<&'static Model> {
    MODELS.iter().find(|m| m.name == name)
}
