//! Caption clean-up before BPE, in the two flavours SD pipelines use.
//!
//! - [`Cleanup::OpenAi`]: OpenAI's `SimpleTokenizer` (and open_clip's): `ftfy.fix_text`, HTML
//!   entities unescaped twice, whitespace collapsed, lowercased. Of ftfy's fixes, the ones that
//!   change captions are implemented: curly quotes straightened, Latin ligatures (ﬁ → fi) and
//!   full-width forms (Ｆ → F) replaced, control characters dropped, NFC. ftfy's repair of
//!   mojibake (text decoded with the wrong codec) is not.
//! - [`Cleanup::HuggingFace`]: the `transformers` / `tokenizers` CLIP tokenizer: NFC, whitespace
//!   collapsed, lowercased; no ftfy and no HTML unescaping.

use unicode_normalization::UnicodeNormalization;

/// Which reference's text clean-up to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// OpenAI CLIP / open_clip (`ftfy` + `html.unescape`).
    OpenAi,
    /// Hugging Face `CLIPTokenizer`.
    HuggingFace,
}

/// Cleans `text` the way the chosen reference does (lowercased, as CLIP's tokenizers do),
/// ready for the word regex.
///
/// ```
/// use latentflow_models::clip::{clean, Cleanup};
/// assert_eq!(clean("  A ﬁne  “Cat” &amp; dog ", Cleanup::OpenAi), "a fine \"cat\" & dog");
/// assert_eq!(clean("  A ﬁne  “Cat” &amp; dog ", Cleanup::HuggingFace), "a ﬁne “cat” &amp; dog");
/// ```
pub fn clean(text: &str, cleanup: Cleanup) -> String {
    let text: String = match cleanup {
        Cleanup::OpenAi => {
            let fixed = fix_text(text);
            let once = html_escape::decode_html_entities(&fixed).into_owned();
            html_escape::decode_html_entities(&once).into_owned()
        }
        Cleanup::HuggingFace => text.nfc().collect(),
    };
    collapse_whitespace(&text).to_lowercase()
}

/// The subset of `ftfy.fix_text` that matters for captions (see the module docs).
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201a}' | '\u{201b}' => out.push('\''),
            '\u{201c}' | '\u{201d}' | '\u{201e}' | '\u{201f}' => out.push('"'),
            '\u{ff01}'..='\u{ff5e}' => out.push(char::from_u32(c as u32 - 0xfee0).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            '\u{ff61}'..='\u{ffee}' => out.extend(std::iter::once(c).nfkc()),
            _ => match ligature(c) {
                Some(s) => out.push_str(s),
                None if is_removable_control(c) => {}
                None => out.push(c),
            },
        }
    }
    out.nfc().collect()
}

/// Latin ligatures ftfy spells out.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{0132}' => "IJ",
        '\u{0133}' => "ij",
        '\u{013f}' => "L·",
        '\u{0140}' => "l·",
        '\u{0149}' => "ʼn",
        '\u{01c4}' => "DŽ",
        '\u{01c5}' => "Dž",
        '\u{01c6}' => "dž",
        '\u{01c7}' => "LJ",
        '\u{01c8}' => "Lj",
        '\u{01c9}' => "lj",
        '\u{01ca}' => "NJ",
        '\u{01cb}' => "Nj",
        '\u{01cc}' => "nj",
        '\u{01f1}' => "DZ",
        '\u{01f2}' => "Dz",
        '\u{01f3}' => "dz",
        '\u{fb00}' => "ff",
        '\u{fb01}' => "fi",
        '\u{fb02}' => "fl",
        '\u{fb03}' => "ffi",
        '\u{fb04}' => "ffl",
        '\u{fb05}' => "ſt",
        '\u{fb06}' => "st",
        _ => return None,
    })
}

/// Control characters ftfy removes (C0 and C1 except tab, line feed, form feed, carriage
/// return), plus the byte-order mark.
fn is_removable_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{feff}')
}

/// Python's `re.sub(r"\s+", " ", text).strip()`.
fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(is_python_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Python's `str.isspace`: Unicode White_Space plus the four ASCII separators.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_collapses_like_python() {
        assert_eq!(clean("tab\tand\u{a0}nbsp\u{2003}emspace ", Cleanup::HuggingFace), "tab and nbsp emspace");
        assert_eq!(clean(" \n ", Cleanup::OpenAi), "");
    }

    #[test]
    fn openai_cleanup_fixes_width_and_entities_twice() {
        assert_eq!(clean("Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ", Cleanup::OpenAi), "fullwidth abc");
        assert_eq!(clean("&amp;lt;b&amp;gt;", Cleanup::OpenAi), "<b>");
    }
}
