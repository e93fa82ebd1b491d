//! The tokenizer, built from the GGUF's vocabulary and merges with the `tokenizers` crate, and
//! the ChatML template.
//!
//! SmolLM2's GGUF names its pre-tokenizer `smollm`. candle's own GGUF tokenizer builder does
//! not know it and falls back to a GPT-2 byte-level pre-tokenizer with a prefix space and no
//! digit split, which gives other ids. llama.cpp (`LLAMA_VOCAB_PRE_TYPE_SMOLLM`) and mistral.rs
//! (`"starcoder" | "smollm"`) split every digit alone, then apply the GPT-2 regex, then map
//! bytes to characters without a prefix space; that is the recipe here.

use candle_core::quantized::gguf_file::Value;
use candle_core::{Error, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::Gguf;

/// GPT-2's pre-tokenizer regex (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_GPT2` second stage).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// ChatML's default system turn, which the GGUF's chat template inserts when the first
/// message is not a system message.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// Text to token ids and back.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// The token that ends a chat turn (`<|im_end|>`, the GGUF's eos).
    pub eos: u32,
}

fn strings(value: &Value, key: &str) -> Result<Vec<String>> {
    value
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_>>()
        .map_err(|e| Error::msg(format!("{key}: {e}")))
}

impl TextCodec {
    /// The tokenizer of `gguf` (a `gpt2` BPE vocabulary with the `smollm` pre-tokenizer).
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let model = gguf.metadata("tokenizer.ggml.model")?.to_string()?;
        let pre = gguf.metadata("tokenizer.ggml.pre")?.to_string()?;
        if model != "gpt2" || !matches!(pre.as_str(), "smollm" | "starcoder") {
            return Err(Error::msg(format!(
                "{}: tokenizer {model:?} with pre-tokenizer {pre:?}; this engine builds \"gpt2\" with \"smollm\" only",
                gguf.path.display()
            )));
        }
        let tokens = strings(gguf.metadata("tokenizer.ggml.tokens")?, "tokens")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = strings(gguf.metadata("tokenizer.ggml.merges")?, "merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(Error::msg(format!("merge {m:?} has no space"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(Error::msg)?;
        let split = |regex: &str| -> Result<Split> {
            Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(Error::msg)
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            split(r"\p{N}")?.into(),
            split(GPT2_REGEX)?.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        // Control tokens (type 3: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ...) are
        // matched whole in the text, before the pre-tokenizer.
        let types = gguf.metadata("tokenizer.ggml.token_type")?.to_vec()?;
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(t, Value::I32(3) | Value::U32(3)))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(Error::msg)?;
        let eos = gguf.metadata("tokenizer.ggml.eos_token_id")?.to_u32()?;
        Ok(Self { tokenizer, eos })
    }

    /// Token ids of `text` (control tokens written in it are matched; no BOS is added, as the
    /// GGUF's `add_bos_token` is false).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(Error::msg)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` (control tokens kept, so a stream shows `<|im_end|>`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(Error::msg)
    }
}

/// `question` as a ChatML prompt, rendered as the GGUF's template renders a single user turn
/// (with the default system turn) followed by the assistant's opening.
pub fn chat_prompt(question: &str) -> String {
    format!(
        "<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
}
