//! The CLIP BPE tokenizer, offline: OpenAI's bundled vocabulary or a Hugging Face tokenizer
//! folder, with the text clean-up of either reference ([`Cleanup`]).

mod cleanup;
mod vocab;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::Mutex;

pub use cleanup::{clean, Cleanup};
pub use vocab::{byte_encoder, tokenizer_dir_of_model, TokenizerConfig, Vocab};

/// Why a tokenizer could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file is missing or malformed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// How rows are padded to the sequence length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// With `!` (id 0): SD2 / OpenCLIP.
    Sd2,
    /// With `<|endoftext|>` (49407): SD1 / OpenAI CLIP.
    Sd1,
}

/// Word pattern of CLIP's tokenizer (OpenAI's, case-insensitive).
const WORD_PATTERN: &str =
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const CACHE_SHARDS: usize = 16;
const CACHE_ENTRIES_PER_SHARD: usize = 1 << 14;

/// A CLIP tokenizer. Cheap to share between threads: words already seen are cached.
///
/// ```
/// use latentflow_models::clip::{ClipTokenizer, Cleanup, Padding, Vocab};
/// let tok = ClipTokenizer::new(Vocab::bundled().unwrap(), Cleanup::OpenAi).unwrap();
/// assert_eq!(tok.encode("a photo of a cat"), vec![320, 1125, 539, 320, 2368]);
/// let (ids, truncated) = tok.input_ids("a photo of a cat", Padding::Sd2, 77);
/// assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
/// assert!(ids[7..].iter().all(|&i| i == 0) && !truncated);
/// ```
pub struct ClipTokenizer {
    cleanup: Cleanup,
    config: TokenizerConfig,
    words: regex::Regex,
    /// Id of each byte as a word-inner symbol, and as a word-final (`</w>`) symbol.
    byte_ids: [[u32; 256]; 2],
    /// `(left id, right id)` → `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    bos: u32,
    eos: u32,
    bang: u32,
    /// Tokens matched in the raw text before clean-up (Hugging Face's "added tokens").
    added: Vec<(String, u32)>,
    cache: Vec<Mutex<HashMap<String, Vec<u32>>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("cleanup", &self.cleanup).field("config", &self.config).finish()
    }
}

impl ClipTokenizer {
    /// A tokenizer over `vocab` following `cleanup`'s reference.
    pub fn new(vocab: Vocab, cleanup: Cleanup) -> Result<Self, TokenizerError> {
        let missing = |token: &str| TokenizerError::File {
            path: "vocab".into(),
            message: format!("token `{token}` is not in the vocabulary"),
        };
        let id = |token: &str| vocab.ids.get(token).copied().ok_or_else(|| missing(token));
        let encoder = byte_encoder();
        let mut byte_ids = [[0u32; 256]; 2];
        for b in 0..256 {
            byte_ids[0][b] = id(&encoder[b].to_string())?;
            byte_ids[1][b] = id(&format!("{}</w>", encoder[b]))?;
        }
        let mut merges = HashMap::with_capacity(vocab.merges.len());
        for (rank, (a, b)) in vocab.merges.iter().enumerate() {
            if let (Some(&l), Some(&r), Some(&m)) =
                (vocab.ids.get(a), vocab.ids.get(b), vocab.ids.get(&format!("{a}{b}")))
            {
                merges.entry((l, r)).or_insert((rank as u32, m));
            }
        }
        if !vocab.config.do_lower_case {
            return Err(TokenizerError::File {
                path: "tokenizer_config.json".into(),
                message: "do_lower_case = false is not a CLIP tokenizer setting latentflow supports".into(),
            });
        }
        let (bos, eos, bang) = (id(&vocab.config.bos_token)?, id(&vocab.config.eos_token)?, id("!")?);
        let mut added = vec![(vocab.config.bos_token.clone(), bos), (vocab.config.eos_token.clone(), eos)];
        if cleanup == Cleanup::HuggingFace {
            // Hugging Face treats the pad token as special wherever it appears in the text, so
            // with pad `!` (SD2) every `!` in a caption becomes id 0 (diffusers issue #4153).
            if let Some(pad) = vocab.config.pad_token.as_ref().filter(|p| !added.iter().any(|(t, _)| t == *p)) {
                added.push((pad.clone(), id(pad)?));
            }
        }
        Ok(ClipTokenizer {
            cleanup,
            words: regex::Regex::new(WORD_PATTERN).expect("valid pattern"),
            byte_ids,
            merges,
            bos,
            eos,
            bang,
            added,
            config: vocab.config,
            cache: (0..CACHE_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        })
    }

    /// The settings read from the tokenizer folder.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The token ids of `text`, without start and end tokens and untruncated.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        if self.cleanup == Cleanup::HuggingFace {
            self.split_added(text, &mut ids);
        } else {
            self.encode_segment(text, &mut ids);
        }
        ids
    }

    /// 77 (or `max_length`) ids: start token, at most `max_length - 2` text tokens, end token,
    /// then padding. Also says whether the text was truncated.
    pub fn input_ids(&self, text: &str, padding: Padding, max_length: usize) -> (Vec<i64>, bool) {
        let ids = self.encode(text);
        let keep = max_length.saturating_sub(2);
        let truncated = ids.len() > keep;
        let pad = match padding {
            Padding::Sd2 => self.bang,
            Padding::Sd1 => self.eos,
        };
        let mut out = Vec::with_capacity(max_length);
        out.push(i64::from(self.bos));
        out.extend(ids.iter().take(keep).map(|&i| i64::from(i)));
        out.push(i64::from(self.eos));
        out.resize(max_length, i64::from(pad));
        (out, truncated)
    }

    /// Splits out added tokens found in the raw text, encoding the text between them.
    fn split_added(&self, mut text: &str, ids: &mut Vec<u32>) {
        while !text.is_empty() {
            let next = self.added.iter().filter_map(|(t, id)| text.find(t.as_str()).map(|at| (at, t.len(), *id))).min();
            match next {
                Some((at, len, id)) => {
                    self.encode_segment(&text[..at], ids);
                    ids.push(id);
                    text = &text[at + len..];
                }
                None => {
                    self.encode_segment(text, ids);
                    return;
                }
            }
        }
    }

    fn encode_segment(&self, text: &str, ids: &mut Vec<u32>) {
        let cleaned = clean(text, self.cleanup);
        for word in self.words.find_iter(&cleaned) {
            match word.as_str() {
                "<|startoftext|>" => ids.push(self.bos),
                "<|endoftext|>" => ids.push(self.eos),
                w => self.encode_word(w, ids),
            }
        }
    }

    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        let shard = &self.cache[self.hasher.hash_one(word) as usize % CACHE_SHARDS];
        if let Some(cached) = shard.lock().expect("cache lock").get(word) {
            ids.extend_from_slice(cached);
            return;
        }
        let merged = self.bpe(word.as_bytes());
        ids.extend_from_slice(&merged);
        let mut shard = shard.lock().expect("cache lock");
        if shard.len() >= CACHE_ENTRIES_PER_SHARD {
            shard.clear();
        }
        shard.insert(word.to_string(), merged);
    }

    /// Byte-level BPE of one word: start from bytes (the last marked `</w>`) and repeatedly
    /// merge every occurrence of the best-ranked adjacent pair.
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let last = bytes.len().saturating_sub(1);
        let mut symbols: Vec<u32> =
            bytes.iter().enumerate().map(|(i, &b)| self.byte_ids[usize::from(i == last)][usize::from(b)]).collect();
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| {
                    self.merges.get(&(pair[0], pair[1])).map(|&(rank, merged)| (rank, pair[0], pair[1], merged))
                })
                .min();
            let Some((_, left, right, merged)) = best else { break };
            let mut out = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
                    out.push(merged);
                    i += 2;
                } else {
                    out.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = out;
        }
        symbols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_encoder_matches_gpt2() {
        let table = byte_encoder();
        assert_eq!(table[b'!' as usize], '!');
        assert_eq!(table[0], '\u{100}');
        assert_eq!(table[b' ' as usize], '\u{120}');
        assert_eq!(table[255], 'ÿ');
    }

    #[test]
    fn long_captions_keep_the_end_token() {
        let tok = ClipTokenizer::new(Vocab::bundled().unwrap(), Cleanup::OpenAi).unwrap();
        let (ids, truncated) = tok.input_ids(&"cat ".repeat(100), Padding::Sd1, 77);
        assert!(truncated);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], 49407);
        assert!(ids[1..76].iter().all(|&i| i == ids[1]));
    }
}
