//! Loading a CLIP BPE vocabulary: the OpenAI merges file (bundled) or a Hugging Face tokenizer
//! folder (`vocab.json` + `merges.txt` + `tokenizer_config.json`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::TokenizerError;

/// OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, see `assets/LICENSE-CLIP-BPE.txt`).
const BUNDLED_BPE: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// Merges OpenAI's vocabulary uses from its file: 49152 tokens minus 256 bytes minus 2 specials.
const OPENAI_MERGES: usize = 49152 - 256 - 2;

/// A BPE vocabulary: token ids and ranked merges, plus the special tokens.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// Token string → id.
    pub ids: HashMap<String, u32>,
    /// Merge pairs in rank order.
    pub merges: Vec<(String, String)>,
    /// Settings from `tokenizer_config.json` (defaults for the bundled file).
    pub config: TokenizerConfig,
}

/// The parts of `tokenizer_config.json` the tokenizer honours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// Start token (`<|startoftext|>`).
    pub bos_token: String,
    /// End token (`<|endoftext|>`).
    pub eos_token: String,
    /// Padding token, when the folder names one (`!` for SD2, `<|endoftext|>` for SD1).
    pub pad_token: Option<String>,
    /// Lowercase the text (always true for CLIP).
    pub do_lower_case: bool,
    /// Sequence length (77).
    pub model_max_length: usize,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            bos_token: "<|startoftext|>".into(),
            eos_token: "<|endoftext|>".into(),
            pad_token: None,
            do_lower_case: true,
            model_max_length: 77,
        }
    }
}

fn printable(b: u32) -> bool {
    (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
}

/// The byte → printable character table of GPT-2 style byte-level BPE (`bytes_to_unicode`).
pub fn byte_encoder() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

/// The byte characters in the order `bytes_to_unicode()` lists them (printable bytes first),
/// which is the order of the first 256 ids of OpenAI's vocabulary.
fn byte_chars_in_vocab_order() -> Vec<char> {
    let table = byte_encoder();
    let (printable, rest): (Vec<u32>, Vec<u32>) = (0..256).partition(|&b| printable(b));
    printable.into_iter().chain(rest).map(|b| table[b as usize]).collect()
}

impl Vocab {
    /// The bundled OpenAI vocabulary (the one SD1's and SD2's tokenizers were built from).
    pub fn bundled() -> Result<Vocab, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BUNDLED_BPE).read_to_string(&mut text).map_err(|e| TokenizerError::File {
            path: "<bundled bpe_simple_vocab_16e6.txt.gz>".into(),
            message: e.to_string(),
        })?;
        let merges: Vec<(String, String)> = text.lines().skip(1).take(OPENAI_MERGES).filter_map(split_merge).collect();
        // Ids in OpenAI's order: bytes, bytes + "</w>", merges, then the two special tokens.
        let bytes: Vec<String> = byte_chars_in_vocab_order().iter().map(|c| c.to_string()).collect();
        let tokens = bytes
            .iter()
            .cloned()
            .chain(bytes.iter().map(|b| format!("{b}</w>")))
            .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
            .chain(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
        let ids = tokens.enumerate().map(|(i, t)| (t, i as u32)).collect();
        Ok(Vocab { ids, merges, config: TokenizerConfig::default() })
    }

    /// A Hugging Face tokenizer folder: `vocab.json`, `merges.txt` and, if present,
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_folder(dir: &Path) -> Result<Vocab, TokenizerError> {
        let read = |name: &str| -> Result<String, TokenizerError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| TokenizerError::File { path, message: e.to_string() })
        };
        let vocab_path = dir.join("vocab.json");
        let ids: HashMap<String, u32> = serde_json::from_str(&read("vocab.json")?)
            .map_err(|e| TokenizerError::File { path: vocab_path, message: format!("not a token → id map: {e}") })?;
        let merges =
            read("merges.txt")?.lines().filter(|l| !l.starts_with("#version")).filter_map(split_merge).collect();
        let mut config = TokenizerConfig::default();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let json: serde_json::Value = serde_json::from_str(&read(name)?)
                .map_err(|e| TokenizerError::File { path: path.clone(), message: e.to_string() })?;
            apply_config(&mut config, &json);
        }
        let vocab = Vocab { ids, merges, config };
        for token in
            [&vocab.config.bos_token, &vocab.config.eos_token].into_iter().chain(vocab.config.pad_token.as_ref())
        {
            if !vocab.ids.contains_key(token) {
                return Err(TokenizerError::File {
                    path: dir.join("vocab.json"),
                    message: format!("special token `{token}` is not in the vocabulary"),
                });
            }
        }
        Ok(vocab)
    }
}

/// Reads the special tokens and settings; tokens may be strings or `{"content": ...}` objects.
fn apply_config(config: &mut TokenizerConfig, json: &serde_json::Value) {
    let token = |key: &str| -> Option<String> {
        match json.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => other.get("content")?.as_str().map(str::to_string),
        }
    };
    if let Some(t) = token("bos_token") {
        config.bos_token = t;
    }
    if let Some(t) = token("eos_token") {
        config.eos_token = t;
    }
    if let Some(t) = token("pad_token") {
        config.pad_token = Some(t);
    }
    if let Some(b) = json.get("do_lower_case").and_then(|v| v.as_bool()) {
        config.do_lower_case = b;
    }
    // Some folders carry a huge sentinel here; CLIP's context length is what matters.
    if let Some(n) = json.get("model_max_length").and_then(|v| v.as_u64()).filter(|n| (2..=4096).contains(n)) {
        config.model_max_length = n as usize;
    }
}

fn split_merge(line: &str) -> Option<(String, String)> {
    let (a, b) = line.split_once(' ')?;
    Some((a.to_string(), b.trim_end().to_string()))
}

/// Where a diffusers pipeline folder keeps its tokenizer.
pub fn tokenizer_dir_of_model(model: &Path) -> PathBuf {
    model.join("tokenizer")
}
