//! Parity of the CLIP tokenizer with transformers' `CLIPTokenizer`.
//!
//! tests/fixtures/tokenizer/cases.json comes from tools/parity/tokenizer.py: token
//! ids for a few hundred prompts from tokenizer folders built from the shipped
//! assets/clip/bpe_simple_vocab_16e6.txt.gz with Stable Diffusion 1 and 2 configs
//! (and a bare and a "modern" one). We rebuild the same folders from the gz here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use dreambooth::tokenizer::{ClipTokenizer, MAX_LEN, read_bpe_gz};
use serde::Deserialize;
use serde_json::Value;

const GZ: &str = "assets/clip/bpe_simple_vocab_16e6.txt.gz";
const CASES: &str = "tests/fixtures/tokenizer/cases.json";
const VARIANTS: [&str; 4] = ["sd1", "sd2", "bare", "modern"];

#[derive(Deserialize)]
struct Fixture {
    max_length: usize,
    variants: HashMap<String, Variant>,
    cases: Vec<HashMap<String, Value>>,
}

#[derive(Deserialize)]
struct Variant {
    files: HashMap<String, Value>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// One prompt's results under one tokenizer; the fixture leaves out `padded`
/// where it equals `ids` and `truncated` where it is null.
#[derive(Deserialize, Clone)]
struct Expected {
    ids: Vec<u32>,
    padded: Option<Vec<u32>>,
    n_pad: usize,
    decoded: String,
    truncated: Option<String>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string(root().join(CASES)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A diffusers-style tokenizer folder: vocab.json and merges.txt from the gz,
/// plus the variant's config files.
fn write_folder(dir: &Path, files: &HashMap<String, Value>) {
    let (vocab, merges) = read_bpe_gz(root().join(GZ)).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let vocab: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i)))
        .collect();
    std::fs::write(dir.join("vocab.json"), Value::Object(vocab).to_string()).unwrap();
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("merges.txt"), text).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(name), content.to_string()).unwrap();
    }
}

/// Compares one tokenizer with the expected results, returning mismatch messages.
fn compare(tok: &ClipTokenizer, pad_id: u32, cases: &[(String, Expected)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (text, exp) in cases {
        let ids = tok.encode(text);
        if ids != exp.ids {
            bad.push(format!("{text:?}: ids {ids:?}, expected {:?}", exp.ids));
            continue;
        }
        let mut padded = exp.padded.clone().unwrap_or_else(|| exp.ids.clone());
        padded.extend(std::iter::repeat_n(pad_id, exp.n_pad));
        let (got, truncated) = tok.encode_padded(text, MAX_LEN);
        if got != padded {
            bad.push(format!("{text:?}: padded {got:?}, expected {padded:?}"));
        }
        if truncated != exp.truncated {
            bad.push(format!(
                "{text:?}: truncated {truncated:?}, expected {:?}",
                exp.truncated
            ));
        }
        let decoded = tok.decode(&ids, true);
        if decoded != exp.decoded {
            bad.push(format!(
                "{text:?}: decoded {decoded:?}, expected {:?}",
                exp.decoded
            ));
        }
    }
    bad
}

/// The cases of one variant (falling back to sd1's where the fixture omits them).
fn cases_for(fx: &Fixture, variant: &str) -> Vec<(String, Expected)> {
    fx.cases
        .iter()
        .map(|c| {
            let text = c["text"].as_str().unwrap().to_string();
            let v = c.get(variant).unwrap_or(&c["sd1"]);
            (text, serde_json::from_value(v.clone()).unwrap())
        })
        .collect()
}

#[test]
fn matches_transformers_for_every_folder_layout() {
    let fx = fixture();
    assert_eq!(fx.max_length, MAX_LEN);
    assert!(fx.cases.len() >= 300, "{} cases", fx.cases.len());
    let tmp = std::env::temp_dir().join(format!("dreambooth-tokenizer-{}", std::process::id()));
    let mut report = Vec::new();
    for name in VARIANTS {
        let variant = &fx.variants[name];
        let dir = tmp.join(name);
        write_folder(&dir, &variant.files);
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (variant.bos_id, variant.eos_id, variant.pad_id),
            "{name}: special ids"
        );
        assert_eq!(tok.model_max_length(), MAX_LEN, "{name}");
        let bad = compare(&tok, variant.pad_id, &cases_for(&fx, name));
        report.extend(bad.into_iter().map(|m| format!("[{name}] {m}")));
    }
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(
        report.is_empty(),
        "{} mismatches:\n{}",
        report.len(),
        report[..report.len().min(30)].join("\n")
    );
}

#[test]
fn bpe_gz_matches_a_bare_folder() {
    let fx = fixture();
    let tok = ClipTokenizer::from_bpe_gz(root().join(GZ)).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    assert_eq!(tok.token_to_id("dog</w>"), Some(1929));
    assert_eq!(tok.id_to_token(1929).as_deref(), Some("dog</w>"));
    assert_eq!(
        tok.encode("a photo of sks dog"),
        [49406, 320, 1125, 539, 48136, 1929, 49407]
    );
    let bad = compare(&tok, 49407, &cases_for(&fx, "bare"));
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );

    // Stable Diffusion 2 pads with "!", which then is a special token.
    let sd2 = tok.with_pad_token("!").unwrap();
    assert_eq!(sd2.pad_id(), 0);
    assert_eq!(sd2.encode("hello!"), [49406, 3306, 0, 49407]);
    let (ids, cut) = sd2.encode_padded("a photo of sks dog", MAX_LEN);
    assert_eq!(ids[..8], [49406, 320, 1125, 539, 48136, 1929, 49407, 0]);
    assert!(ids[7..].iter().all(|&i| i == 0) && ids.len() == MAX_LEN && cut.is_none());
}

#[test]
fn errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("dreambooth-tokenizer-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\n").unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
}
