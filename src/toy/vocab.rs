//! The tiny model's own tokenizer files: CLIP's BPE format (vocab.json +
//! merges.txt, byte-level alphabet, `</w>` word ends), with merges learned on
//! the world's caption words so that every word is one token, and a few rare
//! words (identifier candidates such as `sks`) that pretraining never shows.

use std::collections::HashMap;

use crate::tokenizer::ClipTokenizer;

/// CLIP's byte → printable-character table (the BPE alphabet).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Learns BPE merges on `words` (with frequencies) until every word is a
/// single symbol. Ties break on the lexicographically smallest pair, so the
/// result is deterministic.
pub fn learn_merges(words: &[(&str, usize)]) -> Vec<(String, String)> {
    let mut corpus: Vec<(Vec<String>, usize)> = words
        .iter()
        .map(|(w, f)| {
            let chars: Vec<char> = w.chars().collect();
            let syms = chars
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i + 1 == chars.len() {
                        format!("{c}</w>")
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            (syms, *f)
        })
        .collect();
    let mut merges = Vec::new();
    loop {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for (syms, f) in &corpus {
            for p in syms.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += f;
            }
        }
        let Some(best) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(p, _)| p)
        else {
            break;
        };
        for (syms, _) in corpus.iter_mut() {
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == best.0 && syms[i + 1] == best.1 {
                    out.push(format!("{}{}", best.0, best.1));
                    i += 2;
                } else {
                    out.push(syms[i].clone());
                    i += 1;
                }
            }
            *syms = out;
        }
        merges.push(best);
    }
    merges
}

/// vocab.json and merges.txt text for `words` (caption words, frequent) and
/// `rare` (identifier candidates, seen once).
pub fn build_vocab_files(words: &[&str], rare: &[&str]) -> (String, String) {
    let mut corpus: Vec<(&str, usize)> = words.iter().map(|w| (*w, 1000)).collect();
    corpus.extend(rare.iter().map(|w| (*w, 1)));
    let merges = learn_merges(&corpus);
    let alphabet = bytes_to_unicode();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    (serde_json::Value::Object(vocab).to_string(), merges_txt)
}

/// The tokenizer the tiny model is trained with, built in memory.
pub fn toy_tokenizer() -> crate::Result<ClipTokenizer> {
    let (vocab, merges) = build_vocab_files(&super::world::vocabulary(), super::world::RARE_TOKENS);
    ClipTokenizer::from_vocab_merges_text(&vocab, &merges)
}
