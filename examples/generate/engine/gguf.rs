//! Opening a GGUF file: the checks that turn a wrong file into an error naming the file and
//! the value (a missing file, a wrong magic, a truncated file, a missing tensor, an
//! architecture other than llama) before any tensor is read, and the hyperparameters.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Error, Result};

/// A GGUF file whose header, metadata and tensor table were read and checked.
pub struct Gguf {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

/// The Llama hyperparameters the forward needs, from the GGUF's `llama.*` metadata.
#[derive(Debug, Clone, Copy)]
pub struct LlamaConfig {
    pub num_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The residual stream's width (`n_heads * head_dim`).
    pub hidden: usize,
    pub rope_base: f32,
    pub rms_eps: f64,
}

/// The tensors of one transformer block, by their GGUF names.
pub const BLOCK_TENSORS: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

impl Gguf {
    /// Opens `path` and checks that it is a whole GGUF file: its magic, its header, and every
    /// tensor's bytes inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| {
            Error::msg(format!(
                "cannot open the GGUF file {shown}: {e} (run scripts/fetch-model, or pass --model PATH)"
            ))
        })?;
        let file_len = file.metadata().map_err(Error::wrap)?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(Error::msg(format!(
                "{shown} is not a GGUF file: its first bytes are {magic:02x?} ({:?}), a GGUF file starts with \"GGUF\"",
                String::from_utf8_lossy(&magic)
            )));
        }
        reader.seek(SeekFrom::Start(0)).map_err(Error::wrap)?;
        let content = Content::read(&mut reader).map_err(|e| {
            Error::msg(format!(
                "{shown} ({file_len} bytes): its GGUF header cannot be read: {e}"
            ))
        })?;
        // Every tensor's bytes must lie inside the file (a truncated download fails here, not
        // half-way through loading).
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = elems / block * info.ggml_dtype.type_size();
            let tensor_end = content.tensor_data_offset + info.offset + bytes as u64;
            if tensor_end > file_len {
                return Err(Error::msg(format!(
                    "{shown} is truncated: {file_len} bytes, but tensor {name} ends at byte {tensor_end}"
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// A metadata value, or an error naming the key and the file.
    pub fn metadata(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::msg(format!("{} has no metadata key {key}", self.path.display())))
    }

    /// The Llama hyperparameters; an error for an architecture other than `llama` or a
    /// missing tensor of any block.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.metadata("general.architecture")?.to_string()?;
        if arch != "llama" {
            return Err(Error::msg(format!(
                "{} is a {arch:?} model (general.architecture); this engine serves \"llama\" only",
                self.path.display()
            )));
        }
        let u = |key: &str| -> Result<usize> { Ok(self.metadata(key)?.to_u32()? as usize) };
        let (num_layers, hidden) = (u("llama.block_count")?, u("llama.embedding_length")?);
        let (n_heads, n_kv_heads) = (
            u("llama.attention.head_count")?,
            u("llama.attention.head_count_kv")?,
        );
        let rope_base = match self.content.metadata.get("llama.rope.freq_base") {
            Some(v) => v.to_f32()?,
            None => 10000.0,
        };
        let rms_eps = self
            .metadata("llama.attention.layer_norm_rms_epsilon")?
            .to_f32()? as f64;
        let mut names = vec![
            "token_embd.weight".to_string(),
            "output_norm.weight".to_string(),
        ];
        for layer in 0..num_layers {
            for t in BLOCK_TENSORS {
                names.push(format!("blk.{layer}.{t}.weight"));
            }
        }
        for name in names {
            if !self.content.tensor_infos.contains_key(&name) {
                return Err(Error::msg(format!(
                    "{} has no tensor {name} (a llama model of {num_layers} blocks needs it)",
                    self.path.display()
                )));
            }
        }
        Ok(LlamaConfig {
            num_layers,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            hidden,
            rope_base,
            rms_eps,
        })
    }

    /// Reads tensor `name` onto `device` (quantized as stored).
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| Error::msg(format!("{}: tensor {name}: {e}", self.path.display())))
    }

    /// Tensor `name` if the file has it.
    pub fn optional_tensor(&mut self, name: &str, device: &Device) -> Result<Option<QTensor>> {
        if self.content.tensor_infos.contains_key(name) {
            self.tensor(name, device).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The reader and header, for candle-transformers' loader (the reference of
    /// `tests/real_model.rs`; the example does not use it).
    #[allow(dead_code)]
    pub fn into_parts(self) -> (Content, BufReader<File>) {
        (self.content, self.reader)
    }
}

/// The model file: `--model`, else `$PAGED_GQA_MODEL`, else where `scripts/fetch-model` puts it.
pub fn default_model_path() -> PathBuf {
    match std::env::var_os("PAGED_GQA_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    }
}
