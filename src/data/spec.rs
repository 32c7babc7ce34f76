//! The tokenizer a run asks for, parsed once: `auto`, `gpt2`, `byte`, `bpe:N` or a path to a
//! tokenizer.json. Written as the same string on the wire and in files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// GPT-2's vocabulary (the hub's `openai-community/gpt2` tokenizer).
pub const GPT2_VOCAB: usize = 50_257;
/// 256 bytes and `<|endoftext|>`.
pub const BYTE_VOCAB: usize = 257;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TokenizerSpec {
    /// `gpt2` for WikiText, `bpe:8192` elsewhere (`resolved`).
    Auto,
    Gpt2,
    Byte,
    /// Byte-level BPE of this many tokens, trained on the training split.
    Bpe(usize),
    /// A tokenizer.json file.
    File(String),
}

impl TokenizerSpec {
    /// `auto` made concrete for `dataset`.
    pub fn resolved(&self, dataset: &str) -> TokenizerSpec {
        match self {
            TokenizerSpec::Auto if dataset == "wikitext" => TokenizerSpec::Gpt2,
            TokenizerSpec::Auto => TokenizerSpec::Bpe(8192),
            other => other.clone(),
        }
    }

    /// The vocabulary size when it is known before the tokenizer loads (a trained BPE may
    /// stop short of N, and a file says only when read).
    pub fn known_vocab_size(&self) -> Option<usize> {
        match self {
            TokenizerSpec::Gpt2 => Some(GPT2_VOCAB),
            TokenizerSpec::Byte => Some(BYTE_VOCAB),
            _ => None,
        }
    }
}

impl fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerSpec::Auto => f.write_str("auto"),
            TokenizerSpec::Gpt2 => f.write_str("gpt2"),
            TokenizerSpec::Byte => f.write_str("byte"),
            TokenizerSpec::Bpe(n) => write!(f, "bpe:{n}"),
            TokenizerSpec::File(p) => f.write_str(p),
        }
    }
}

impl FromStr for TokenizerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => TokenizerSpec::Auto,
            "gpt2" => TokenizerSpec::Gpt2,
            "byte" => TokenizerSpec::Byte,
            "" => return Err("an empty tokenizer; use gpt2, byte, bpe:N or a tokenizer.json path".into()),
            _ => match s.strip_prefix("bpe:") {
                Some(n) => match n.parse::<usize>() {
                    Ok(n) if (257..=65_536 * 16).contains(&n) => TokenizerSpec::Bpe(n),
                    _ => return Err("bpe:N needs a vocabulary size N above 256".into()),
                },
                None => TokenizerSpec::File(s.into()),
            },
        })
    }
}

impl TryFrom<String> for TokenizerSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<TokenizerSpec> for String {
    fn from(t: TokenizerSpec) -> String {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_as_their_strings() {
        for s in ["auto", "gpt2", "byte", "bpe:2048", "my/tokenizer.json"] {
            let t: TokenizerSpec = s.parse().unwrap();
            assert_eq!(t.to_string(), s);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{s}\""));
        }
        assert!("bpe:12".parse::<TokenizerSpec>().is_err());
        assert_eq!(TokenizerSpec::Auto.resolved("wikitext"), TokenizerSpec::Gpt2);
        assert_eq!(TokenizerSpec::Auto.resolved("builtin"), TokenizerSpec::Bpe(8192));
    }
}
