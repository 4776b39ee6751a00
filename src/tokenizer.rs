//! CLIP's byte-level BPE tokenizer, giving the ids of transformers' `CLIPTokenizer`.
//!
//! transformers 5 builds `CLIPTokenizer` on the `tokenizers` library; we build the
//! same pipeline with the same library:
//!
//! * normalizer: NFC, every run of whitespace (`\s+`) replaced by one space, lowercase;
//! * pre-tokenizer: CLIP's split regex (special tokens, contractions, letter runs,
//!   single digits, punctuation runs; whitespace dropped), then GPT-2 byte-level;
//! * model: BPE with end-of-word suffix `</w>` and `<|endoftext|>` as the unknown token;
//! * post-processor: `<|startoftext|> … <|endoftext|>`;
//! * decoder: byte-level, then `</w>` becomes a space and the ends are trimmed.
//!
//! Special tokens are added the way transformers adds them when it loads a folder,
//! because their flags change ids: a special token marked `normalized` also matches
//! after lowercasing (`<|ENDOFTEXT|>`), and Stable Diffusion 2's pad token `!` is a
//! special token, so a `!` in a prompt encodes as id 0 there (and as `!</w>`, 256,
//! with Stable Diffusion 1).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// CLIP's text context length: Stable Diffusion prompts are padded or cut to this.
pub const MAX_LEN: usize = 77;
/// Beginning-of-sequence token.
pub const BOS: &str = "<|startoftext|>";
/// End-of-sequence token; also the unknown token, and Stable Diffusion 1's pad token.
pub const EOS: &str = "<|endoftext|>";

const END_OF_WORD: &str = "</w>";
const SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The named special tokens, in the order transformers adds them (the last
/// declaration of a token decides its flags).
const NAMED_SPECIALS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// BPE merges in rank order: each pair of symbols joins into one.
pub type Merges = Vec<(String, String)>;

/// CLIP's BPE tokenizer. See the module documentation.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    /// The BPE vocabulary and merges it was built from (for writing it out).
    bpe: std::sync::Arc<(HashMap<String, u32>, Merges)>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    model_max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads a diffusers / transformers `tokenizer/` folder: `vocab.json` and
    /// `merges.txt` (or, failing those, the vocabulary and merges of
    /// `tokenizer.json`), with the special tokens, pad token and
    /// `model_max_length` of `tokenizer_config.json`, `special_tokens_map.json`
    /// and `added_tokens.json` where present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
            });
        }
        // Like transformers, prefer tokenizer.json's vocabulary and merges.
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let tokenizer_json = dir.join("tokenizer.json");
        let (vocab, merges, mut json_added, source) = if tokenizer_json.exists() {
            let (vocab, merges, added) = read_tokenizer_json(&tokenizer_json)?;
            (vocab, merges, added, tokenizer_json)
        } else {
            let vocab = parse_vocab_json(&read_text(&vocab_path)?, &vocab_path)?;
            let merges = parse_merges_txt(&read_text(&merges_path)?, &merges_path)?;
            (vocab, merges, Vec::new(), vocab_path)
        };

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let config = match config {
            None => serde_json::Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(Error::config(&config_path, "expected a JSON object")),
        };

        // Named special tokens: CLIPTokenizer's defaults, then tokenizer_config.json.
        let mut named: HashMap<&str, Spec> = HashMap::new();
        named.insert("bos_token", Spec::Str(BOS.into()));
        named.insert("eos_token", Spec::Str(EOS.into()));
        named.insert("unk_token", Spec::Str(EOS.into()));
        named.insert("pad_token", Spec::Str(EOS.into()));
        for key in NAMED_SPECIALS {
            match config.get(key) {
                None => {}
                Some(Value::Null) => {
                    named.remove(key);
                }
                Some(v) => {
                    named.insert(key, Spec::from_json(v, false, &config_path, key)?);
                }
            }
        }
        let mut extras = Vec::new();
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Value::Array(items)) = config.get(key) {
                for item in items {
                    extras.push(Spec::from_json(item, false, &config_path, key)?);
                }
            }
        }

        // Added tokens: `added_tokens_decoder` (transformers >= 4.34) or, for older
        // folders, special_tokens_map.json and added_tokens.json; tokenizer.json's
        // own list comes last.
        let mut added: Vec<(u32, TokenSpec)> = Vec::new();
        if let Some(entries) = config.get("added_tokens_decoder") {
            let Value::Object(entries) = entries else {
                return Err(Error::config(
                    &config_path,
                    "`added_tokens_decoder` must be an object",
                ));
            };
            for (id, v) in entries {
                let id: u32 = id.parse().map_err(|_| {
                    Error::config(
                        &config_path,
                        format!("`added_tokens_decoder` key `{id}` is not a token id"),
                    )
                })?;
                let key = "added_tokens_decoder";
                added.push((id, TokenSpec::from_object(v, false, &config_path, key)?));
            }
        } else {
            let map_path = dir.join("special_tokens_map.json");
            if let Some(map) = read_json_if_exists(&map_path)? {
                let Value::Object(map) = map else {
                    return Err(Error::config(&map_path, "expected a JSON object"));
                };
                for (key, v) in &map {
                    if let Some(name) = NAMED_SPECIALS.iter().find(|n| **n == key.as_str()) {
                        if !v.is_null() {
                            named.insert(name, Spec::from_json(v, true, &map_path, key)?);
                        }
                    } else if (key == "additional_special_tokens" || key == "extra_special_tokens")
                        && let Value::Array(items) = v
                    {
                        for item in items {
                            let spec = Spec::from_json(item, true, &map_path, key)?;
                            if !extras.contains(&spec) {
                                extras.push(spec);
                            }
                        }
                    }
                }
            }
            let added_path = dir.join("added_tokens.json");
            if let Some(tokens) = read_json_if_exists(&added_path)? {
                let Value::Object(tokens) = tokens else {
                    return Err(Error::config(&added_path, "expected a JSON object"));
                };
                let specials: Vec<String> = named
                    .values()
                    .chain(&extras)
                    .map(|s| s.content().to_string())
                    .collect();
                for (content, id) in tokens {
                    let id = id.as_u64().and_then(|id| u32::try_from(id).ok());
                    let id = id.ok_or_else(|| {
                        Error::config(&added_path, format!("`{content}`: id is not a u32"))
                    })?;
                    let special = specials.contains(&content);
                    added.push((id, TokenSpec::new(content, special, Some(!special))));
                }
            }
            added.append(&mut json_added);
        }
        added.sort_by_key(|(id, _)| *id);

        // In transformers a named special token given as a string takes the flags
        // of the `added_tokens_decoder` entry with the same content.
        for spec in named.values_mut() {
            if let Some((_, tok)) = added.iter().find(|(_, t)| t.content == spec.content()) {
                *spec = Spec::Token(tok.clone());
            }
        }
        let named: Vec<(&str, Spec)> = NAMED_SPECIALS
            .iter()
            .filter_map(|k| named.remove(k).map(|s| (*k, s)))
            .collect();

        let model_max_length = match config.get("model_max_length") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().map(|f| f as u64))
                .map(|n| n.min(usize::MAX as u64) as usize)
                .unwrap_or(MAX_LEN),
            _ => MAX_LEN,
        };

        Self::build(
            vocab,
            merges,
            &named,
            &extras,
            &added,
            model_max_length,
            &source,
        )
    }

    /// Builds the standard CLIP vocabulary (49408 tokens) from OpenAI's / open_clip's
    /// `bpe_simple_vocab_16e6.txt.gz`, exactly as CLIP's `simple_tokenizer` does,
    /// with transformers' defaults: pads with `<|endoftext|>` (Stable Diffusion 1),
    /// `model_max_length` 77. See [`ClipTokenizer::with_pad_token`] for Stable
    /// Diffusion 2.
    pub fn from_bpe_gz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (vocab, merges) = read_bpe_gz(path)?;
        let vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::with_defaults(vocab, merges, path)
    }

    /// Builds a tokenizer from a vocabulary (token → id) and merges (in rank
    /// order), with transformers' defaults for a folder holding only `vocab.json`
    /// and `merges.txt`: BOS `<|startoftext|>`, EOS, UNK and PAD `<|endoftext|>`
    /// (all of which must be in the vocabulary), `model_max_length` 77.
    pub fn from_vocab_merges(vocab: HashMap<String, u32>, merges: Merges) -> Result<Self> {
        Self::with_defaults(vocab, merges, Path::new("<vocab>"))
    }

    /// [`ClipTokenizer::from_vocab_merges`] from the text of a `vocab.json` and a
    /// `merges.txt`, e.g. files bundled with `include_str!`.
    pub fn from_vocab_merges_text(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let vocab = parse_vocab_json(vocab_json, Path::new("vocab.json"))?;
        let merges = parse_merges_txt(merges_txt, Path::new("merges.txt"))?;
        Self::from_vocab_merges(vocab, merges)
    }

    fn with_defaults(vocab: HashMap<String, u32>, merges: Merges, path: &Path) -> Result<Self> {
        let named = [
            ("bos_token", Spec::Str(BOS.into())),
            ("eos_token", Spec::Str(EOS.into())),
            ("unk_token", Spec::Str(EOS.into())),
            ("pad_token", Spec::Str(EOS.into())),
        ];
        Self::build(vocab, merges, &named, &[], &[], MAX_LEN, path)
    }

    /// Pads with `token` instead, adding it as a special token the way
    /// transformers does for a `pad_token` given as a string: with `!`, this is
    /// Stable Diffusion 2's tokenizer (pad id 0; a `!` in a prompt also becomes 0).
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        let spec = Spec::Str(token.to_string()).added_token();
        self.tokenizer
            .add_special_tokens([spec])
            .map_err(|e| Error::msg(format!("adding pad token `{token}`: {e}")))?;
        self.pad_id = self
            .tokenizer
            .token_to_id(token)
            .ok_or_else(|| Error::msg(format!("pad token `{token}` has no id")))?;
        Ok(self)
    }

    fn build(
        vocab: HashMap<String, u32>,
        merges: Merges,
        named: &[(&str, Spec)],
        extras: &[Spec],
        added: &[(u32, TokenSpec)],
        model_max_length: usize,
        path: &Path,
    ) -> Result<Self> {
        let content = |key: &str| {
            named
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| s.content().to_string())
        };
        let bos = content("bos_token").ok_or_else(|| Error::config(path, "no bos_token"))?;
        let eos = content("eos_token").ok_or_else(|| Error::config(path, "no eos_token"))?;
        let unk = content("unk_token").ok_or_else(|| Error::config(path, "no unk_token"))?;
        let pad = content("pad_token").ok_or_else(|| Error::config(path, "no pad_token"))?;
        if !vocab.contains_key(&unk) {
            return Err(Error::config(
                path,
                format!("the unknown token `{unk}` is not in the vocabulary"),
            ));
        }
        let files = std::sync::Arc::new((vocab.clone(), merges.clone()));
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .unk_token(unk)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD.to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| Error::config(path, format!("invalid BPE vocabulary/merges: {e}")))?;

        let lib = |e: tokenizers::Error| Error::msg(format!("building the CLIP tokenizer: {e}"));
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(lib)?
            .into(),
            Lowercase.into(),
        ]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(lib)?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT_REGEX.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(lib)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));

        // transformers' TokenizersBackend.__init__: the added_tokens_decoder in id
        // order, then the special tokens it lacks, every named one marked special.
        let mut first: Vec<AddedToken> = added.iter().map(|(_, t)| t.added_token()).collect();
        let in_decoder = |c: &str| added.iter().any(|(_, t)| t.content == c);
        for spec in named.iter().map(|(_, s)| s).chain(extras) {
            if !in_decoder(spec.content()) {
                first.push(spec.clone().into_special().added_token());
            }
        }
        tokenizer.add_tokens(first).map_err(lib)?;
        for (id, tok) in added {
            let got = tokenizer.token_to_id(&tok.content);
            if got != Some(*id) {
                return Err(Error::config(
                    path,
                    format!(
                        "added token `{}` is declared with id {id} but gets id {got:?}",
                        tok.content
                    ),
                ));
            }
        }
        // Then _post_init: all named special tokens again, with their own flags.
        let second: Vec<AddedToken> = named
            .iter()
            .map(|(_, s)| s)
            .chain(extras)
            .map(|s| s.clone().into_special().added_token())
            .collect();
        tokenizer.add_tokens(second).map_err(lib)?;

        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| Error::config(path, format!("token `{t}` has no id")))
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos, eos_id), (bos, bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        Ok(Self {
            tokenizer,
            bpe: files,
            bos_id,
            eos_id,
            pad_id,
            model_max_length,
        })
    }

    /// Token ids of `text`: BOS, the text's tokens, EOS; no padding, no truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        // Byte-level BPE has a token for every byte and the unknown token is
        // checked at construction: encoding cannot fail.
        self.tokenizer
            .encode_fast(text, true)
            .expect("CLIP tokenization does not fail")
            .get_ids()
            .to_vec()
    }

    /// Ids of `text` cut or padded to exactly `max_len` (use [`MAX_LEN`]), as
    /// transformers' `tokenizer(text, padding="max_length", max_length=max_len,
    /// truncation=True)`: a long text keeps BOS, its first `max_len - 2` tokens and
    /// EOS. The second value is the text that was cut off (decoded as diffusers'
    /// pipelines report it), or `None` when everything fit.
    ///
    /// # Panics
    /// If `max_len < 2`.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> (Vec<u32>, Option<String>) {
        assert!(
            max_len >= 2,
            "max_len {max_len} leaves no room for BOS and EOS"
        );
        let mut ids = self.encode(text);
        let mut truncated = None;
        if ids.len() > max_len {
            truncated = Some(self.decode(&ids[max_len - 1..ids.len() - 1], false));
            ids.truncate(max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(max_len, self.pad_id);
        (ids, truncated)
    }

    /// Text of `ids`, as transformers' `tokenizer.decode(ids, skip_special_tokens)`:
    /// `</w>` ends a word with a space; the ends are trimmed.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        // Unknown ids are skipped; the byte-level decoder itself does not fail.
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .unwrap_or_default();
        // Python's str.strip(): Unicode whitespace plus the information separators.
        text.replace(END_OF_WORD, " ")
            .trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
            .to_string()
    }

    /// The text of a `vocab.json` and a `merges.txt` holding this tokenizer's
    /// BPE vocabulary and merges (what [`Self::from_vocab_merges_text`] reads).
    pub fn vocab_merges_text(&self) -> (String, String) {
        let (vocab, merges) = &*self.bpe;
        let map: serde_json::Map<String, Value> = vocab
            .iter()
            .map(|(t, id)| (t.clone(), Value::from(*id)))
            .collect();
        let mut text = String::from("#version: 0.2\n");
        for (a, b) in merges {
            text.push_str(a);
            text.push(' ');
            text.push_str(b);
            text.push('\n');
        }
        (Value::Object(map).to_string(), text)
    }

    /// Id of a token (a vocabulary entry such as `dog</w>`, or an added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The token with id `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Number of tokens, added tokens included (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `model_max_length` of tokenizer_config.json; 77 where it does not say.
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }
}

/// Vocabulary (in id order) and merges (in rank order) built from CLIP's
/// `bpe_simple_vocab_16e6.txt.gz` as OpenAI CLIP's `simple_tokenizer` builds them:
/// merges are lines `1..=48894` of the file; the vocabulary is the 256 byte
/// characters, the same with `</w>`, one token per merge, then `<|startoftext|>`
/// and `<|endoftext|>`.
pub fn read_bpe_gz(path: impl AsRef<Path>) -> Result<(Vec<String>, Merges)> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::reading(path, e))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| Error::reading(path, e))?;
    const N_MERGES: usize = 49152 - 256 - 2;
    let lines: Vec<&str> = text.split('\n').skip(1).take(N_MERGES).collect();
    if lines.len() != N_MERGES {
        return Err(Error::config(
            path,
            format!("expected {N_MERGES} merges, found {}", lines.len()),
        ));
    }
    let mut merges = Vec::with_capacity(N_MERGES);
    for (i, line) in lines.iter().enumerate() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::config(
                    path,
                    format!("line {}: expected two symbols, found {line:?}", i + 2),
                ));
            }
        }
    }
    let bytes: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
    let mut vocab = bytes.clone();
    vocab.extend(bytes.iter().map(|b| format!("{b}{END_OF_WORD}")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(BOS.to_string());
    vocab.push(EOS.to_string());
    Ok((vocab, merges))
}

/// GPT-2's reversible map from bytes to printable characters, in CLIP's order
/// (printable Latin-1 first, then the rest shifted to U+0100 and up).
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut order: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let mut chars: Vec<u32> = order.clone();
    let mut n = 0;
    for b in 0..256 {
        if !printable(b) {
            order.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

/// A special or added token as transformers declares it: a plain string (a
/// special token, not normalized) or an `AddedToken` object.
#[derive(Clone, Debug, PartialEq)]
enum Spec {
    Str(String),
    Token(TokenSpec),
}

impl Spec {
    /// `special` is what a JSON object without a `special` field means.
    fn from_json(v: &Value, special: bool, path: &Path, key: &str) -> Result<Self> {
        match v {
            Value::String(s) => Ok(Spec::Str(s.clone())),
            Value::Object(_) => Ok(Spec::Token(TokenSpec::from_object(v, special, path, key)?)),
            _ => Err(Error::config(
                path,
                format!("`{key}` must be a string or an AddedToken object"),
            )),
        }
    }

    fn content(&self) -> &str {
        match self {
            Spec::Str(s) => s,
            Spec::Token(t) => &t.content,
        }
    }

    fn into_special(self) -> TokenSpec {
        match self {
            Spec::Str(s) => TokenSpec::new(s, true, None),
            Spec::Token(mut t) => {
                t.special = true;
                t
            }
        }
    }

    fn added_token(self) -> AddedToken {
        self.into_special().added_token()
    }
}

/// The fields of a `tokenizers.AddedToken`. As in Python, `normalized` left
/// unset means "not special".
#[derive(Clone, Debug, PartialEq)]
struct TokenSpec {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: Option<bool>,
    special: bool,
}

impl TokenSpec {
    fn new(content: String, special: bool, normalized: Option<bool>) -> Self {
        Self {
            content,
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized,
            special,
        }
    }

    fn from_object(v: &Value, special: bool, path: &Path, key: &str) -> Result<Self> {
        let content = v.get("content").and_then(Value::as_str).ok_or_else(|| {
            Error::config(
                path,
                format!("`{key}`: AddedToken without a string `content`"),
            )
        })?;
        let flag = |name: &str| v.get(name).and_then(Value::as_bool);
        Ok(Self {
            content: content.to_string(),
            single_word: flag("single_word").unwrap_or(false),
            lstrip: flag("lstrip").unwrap_or(false),
            rstrip: flag("rstrip").unwrap_or(false),
            normalized: flag("normalized"),
            special: flag("special").unwrap_or(special),
        })
    }

    fn added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized.unwrap_or(!self.special))
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::reading(path, e))
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

/// `vocab.json`: an object from token to id (entries whose value is not a number
/// are skipped, as `tokenizers` does).
fn parse_vocab_json(text: &str, path: &Path) -> Result<HashMap<String, u32>> {
    let json: Value = serde_json::from_str(text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let Value::Object(map) = json else {
        return Err(Error::config(path, "expected an object from token to id"));
    };
    let mut vocab = HashMap::with_capacity(map.len());
    for (token, id) in map {
        if let Value::Number(n) = id {
            let id = n.as_u64().and_then(|n| u32::try_from(n).ok());
            let id = id.ok_or_else(|| Error::config(path, format!("`{token}`: bad id {n}")))?;
            vocab.insert(token, id);
        }
    }
    if vocab.is_empty() {
        return Err(Error::config(path, "empty vocabulary"));
    }
    Ok(vocab)
}

/// `merges.txt`: one merge `a b` per line in rank order, after an optional
/// `#version` line (the rules of `tokenizers`' `BPE::read_file`).
fn parse_merges_txt(text: &str, path: &Path) -> Result<Merges> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::config(
                    path,
                    format!("line {}: expected `a b`, found {line:?}", i + 1),
                ));
            }
        }
    }
    Ok(merges)
}

/// Vocabulary, merges and added tokens of a `tokenizer.json`.
type TokenizerJson = (HashMap<String, u32>, Merges, Vec<(u32, TokenSpec)>);

fn read_tokenizer_json(path: &Path) -> Result<TokenizerJson> {
    let json = read_json_if_exists(path)?.ok_or_else(|| Error::NotFound {
        path: path.to_path_buf(),
    })?;
    let model = json
        .get("model")
        .ok_or_else(|| Error::config(path, "no `model`"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(Error::config(path, "`model.type` is not BPE"));
    }
    let vocab = model
        .get("vocab")
        .ok_or_else(|| Error::config(path, "no `model.vocab`"))?;
    let vocab = parse_vocab_json(&vocab.to_string(), path)?;
    let mut merges = Vec::new();
    for m in model
        .get("merges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let pair = match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| Error::config(path, format!("bad merge {m}")))?);
    }
    let mut added = Vec::new();
    for t in json
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = t
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok());
        let id = id.ok_or_else(|| Error::config(path, "added token without an id"))?;
        added.push((id, TokenSpec::from_object(t, false, path, "added_tokens")?));
    }
    Ok((vocab, merges, added))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_clips() {
        let chars = bytes_to_unicode();
        assert_eq!(chars.len(), 256);
        assert_eq!(chars[0], '!');
        assert_eq!(chars[188], '\u{100}'); // byte 0 comes after the 188 printable ones
        let mut sorted = chars.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    fn tiny() -> ClipTokenizer {
        let vocab_json = r#"{"a": 0, "b": 1, "c": 2, "a</w>": 3, "b</w>": 4, "c</w>": 5,
            "ab</w>": 6, "<|startoftext|>": 7, "<|endoftext|>": 8}"#;
        ClipTokenizer::from_vocab_merges_text(vocab_json, "#version: 0.2\na b</w>\n").unwrap()
    }

    #[test]
    fn tiny_vocab_encodes_pads_and_truncates() {
        let t = tiny();
        assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (7, 8, 8));
        assert_eq!(t.encode("AB  c"), vec![7, 6, 5, 8]);
        assert_eq!(t.encode_padded("ab", 6), (vec![7, 6, 8, 8, 8, 8], None));
        let (ids, cut) = t.encode_padded("a b c ab", 4);
        assert_eq!(ids, vec![7, 3, 4, 8]);
        assert_eq!(cut.as_deref(), Some("c ab"));
        assert_eq!(t.decode(&t.encode("ab c"), true), "ab c");
        assert_eq!(t.token_to_id("ab</w>"), Some(6));
        assert_eq!(t.id_to_token(6).as_deref(), Some("ab</w>"));
        assert_eq!(t.vocab_size(), 9);
        let t = t.with_pad_token("a").unwrap();
        assert_eq!(t.pad_id(), 0);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("clip-tok-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\n").unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json") && err.contains("not found"),
            "{err}"
        );
        std::fs::write(dir.join("vocab.json"), "{\"a\": 0,").unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("vocab.json") && err.contains("JSON"), "{err}");
        std::fs::write(dir.join("vocab.json"), r#"{"a": 0, "<|endoftext|>": 1}"#).unwrap();
        std::fs::remove_file(dir.join("merges.txt")).unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("not found"),
            "{err}"
        );
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), "[1]").unwrap();
        let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = ClipTokenizer::from_bpe_gz(dir.join("x.gz"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.gz") && err.contains("not found"), "{err}");
    }
}
