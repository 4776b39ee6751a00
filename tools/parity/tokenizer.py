"""Writes tests/fixtures/tokenizer/cases.json: CLIP token ids from transformers.

Builds diffusers-style `tokenizer/` folders from the shipped
assets/clip/bpe_simple_vocab_16e6.txt.gz (the same rule as OpenAI CLIP's
simple_tokenizer and src/tokenizer.rs), with the tokenizer_config.json and
special_tokens_map.json of Stable Diffusion 1.x (pads with <|endoftext|>) and
2.x (pads with "!"), a bare folder with neither file, and a "modern" one (the
tokenizer_config.json format of transformers >= 4.34, with an added textual
inversion token), loads each with
transformers' CLIPTokenizer (the class diffusers loads) and records, for a few
hundred varied prompts:

  ids        tokenizer(text).input_ids                     (BOS ... EOS, no padding)
  padded     tokenizer(text, padding="max_length", max_length=77, truncation=True)
             .input_ids where attention_mask == 1; n_pad pad ids follow them
  decoded    tokenizer.decode(ids, skip_special_tokens=True)
  truncated  what diffusers' pipelines warn was cut off: decode(ids[76:-1]), or null

To keep the file small, `padded` is left out where it equals `ids`, `truncated`
where it is null, and a case's sd2, bare or modern result where it equals its sd1 result.

The folders are written to a temporary directory and not kept (vocab.json is
2 MB); the Rust test rebuilds the same folders from the gz and the configs
stored in the fixture.

    /work/pyenv/venv/bin/python tools/parity/tokenizer.py
"""

import gzip
import hashlib
import json
import os
import random
import sys
import tempfile

import tokenizers
import transformers
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GZ = os.path.join(ROOT, "assets", "clip", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "cases.json")
MAX_LEN = 77


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges():
    """OpenAI CLIP simple_tokenizer.SimpleTokenizer.__init__, verbatim in effect."""
    lines = gzip.open(GZ).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(merges) == 48894
    return vocab, merges


def added(content, type_field):
    tok = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if type_field else tok


def sd_configs(pad):
    """tokenizer_config.json and special_tokens_map.json as shipped in the
    CompVis/stable-diffusion-v1-4 (pad <|endoftext|>) and
    stabilityai/stable-diffusion-2-1 (pad "!") tokenizer folders."""
    config = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": pad,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>", True),
    }
    special = {
        "bos_token": added("<|startoftext|>", False),
        "eos_token": added("<|endoftext|>", False),
        "pad_token": pad,
        "unk_token": added("<|endoftext|>", False),
    }
    return config, special


def modern_config():
    """tokenizer_config.json as transformers >= 4.34 saves it (added_tokens_decoder,
    no special_tokens_map.json): an SDXL tokenizer_2 (pad "!") after textual
    inversion added the non-special token <cat-toy>."""

    def tok(content, special, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                "single_word": False, "special": special}

    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "0": tok("!", True, False),
            "49406": tok("<|startoftext|>", True, False),
            "49407": tok("<|endoftext|>", True, False),
            "49408": tok("<cat-toy>", False, True),
        },
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }


def prompts():
    words = ["dog", "cat", "sks", "person", "backpack", "vase", "teapot", "robot", "castle", "forest"]
    subjects = ["a photo of sks dog", "a sks dog", "sks", "a photo of a dog", "A PHOTO OF SKS DOG"]
    styles = [
        "", " in the snow", ", oil painting", " on the beach at sunset!", " wearing a red hat.",
        ", trending on artstation, 8k, highly detailed", " -- by Greg Rutkowski", " (masterpiece:1.2)",
    ]
    out = [
        "", " ", "   ", "\t", "\n", "\r\n", " \t\n\r\x0b\x0c ",
        "a photo of sks dog", "a photo of a dog", "sks", "SKS", "Sks dog", "sksdog", "sks_dog", "sks-dog",
        "a  photo   of\tsks\n\ndog", "  leading and trailing  ", "tabs\tbetween\twords", "new\nlines\nhere",
        "A Photo Of SKS Dog", "ALL CAPS PROMPT WITH SKS", "camelCaseWordsHere", "snake_case_words_here",
        "hello world", "Hello, World!", "hello!", "hello!!", "!!!", "!", "?!", "...", "…", "hello...world",
        "don't", "DON'T", "it's", "we're", "they've", "I'm", "you'll", "she'd", "can't won't shouldn't",
        "rock'n'roll", "'s", "'quoted'", "\"double quoted\"", "it’s (curly apostrophe)", "o'clock",
        "dog's toy", "dogs' toys", "''s", "'''", "'ll've'd",
        "1", "12", "123", "2024", "3.14159", "1,000,000", "10x", "x10", "4k 8k 16k", "v1.5", "sd-2.1",
        "#hashtag", "@mention", "user@example.com", "https://example.com/a?b=c&d=e#f", "C:\\path\\to\\file",
        "a+b=c", "50% off", "$100", "€50", "£20", "¥1000", "₹500", "100°C", "5'11\"", "(a)[b]{c}<d>",
        "a|b|c", "a/b\\c", "~tilde~", "`backtick`", "^caret^", "*stars*", "**bold**", "__under__",
        "&amp;", "&lt;div&gt;", "&quot;quoted&quot;", "&#39;", "&#x27;", "&nbsp;", "<b>bold</b>", "<br/>",
        "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|startoftext|>hi<|endoftext|>",
        "<|ENDOFTEXT|>", "a <|EndOfText|> b", "<|STARTOFTEXT|>", "x <|StartOfText|> y", "<|startoftext|", "|endoftext|>", "<|endoftext|><|endoftext|>",
        "<sks>", "<sks-token>", "a photo of <cat-toy>", "<CAT-TOY>", "x<cat-toy>y", "<cat-toy><cat-toy>", "<lora:sks:0.8>", "[sks]", "{sks}",
        "café", "CAFÉ", "cafe\u0301", "CAFE\u0301", "naïve", "résumé", "Ångström", "\u212bngstr\u00f6m",
        "ﬁnal ﬂow", "Straße", "STRASSE", "ẞ", "İstanbul", "ıi", "ΟΔΥΣΣΕΥΣ", "Σίσυφος", "ǅ ǆ Ǆ",
        "a\u0300\u0301\u0302", "\u0301", "\u0301\u0302 lone marks", "e\u0308\u0304",
        "你好世界", "一只小狗的照片", "日本語のテキスト", "カタカナ", "ひらがな", "한국어 텍스트",
        "\u1100\u1161\u11a8", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "Ｈｅｌｌｏ！", "、。「」",
        "Привет мир", "ПРИВЕТ", "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "سلام \u200fدنیا",
        "\u202eright-to-left override", "नमस्ते दुनिया", "क्षत्रिय", "สวัสดีชาวโลก", "ຍິນດີ", "ሰላም",
        "Xin chào thế giới", "Tiếng Việt có dấu", "Ελληνικά", "Հայերեն", "ქართული", "தமிழ்",
        "٣٤٥ arabic digits", "३४५ devanagari digits", "½ ¾ ⅓", "x² y³ z⁴", "H₂O", "Ⅻ ⅻ", "①②③",
        "𝐀𝐁𝐂 math bold", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ⓐⓑⓒ", "🐶", "🐶🐱", "a 🐶 dog", "🐕‍🦺", "👩‍👩‍👧‍👦", "👍🏽",
        "🇺🇸🇯🇵", "1️⃣", "❤️", "☕ coffee", "✨sparkles✨", "🔥🔥🔥", "😀😃😄😁😆😅😂🤣",
        "zero\u200bwidth", "zero\u200dwidth joiner", "soft\u00adhyphen", "\ufeffBOM", "non\u00a0breaking",
        "ideographic\u3000space", "line\u2028separator", "para\u2029separator", "thin\u2009space",
        "em\u2003space", "narrow\u202fnbsp", "nel\u0085char", "ogham\u1680space", "mongolian\u180evowel",
        "ctrl\x00nul", "ctrl\x01soh", "del\x7fchar", "info\x1csep\x1dsep\x1esep\x1fsep", "bell\x07",
        "\x1c", "\x85", "tab\x0bvertical", "form\x0cfeed", "c1\x80\x9fcontrols", "private\ue000use",
        "noncharacter\ufffe", "replacement\ufffd", "astral \U0001f600\U00010000\U0010fffd",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
        "antidisestablishmentarianism" * 4, "x" * 300, "1234567890" * 10, "!?" * 60, "🐶" * 40,
        "a" * 1000, " ".join(["sks"] * 76), " ".join(["sks"] * 75), " ".join(["sks"] * 74),
        " ".join(["dog"] * 200),
    ]
    long_prompt = (
        "a highly detailed photograph of sks dog sitting on a wooden bench in a sunny park, "
        "surrounded by autumn leaves in shades of red, orange and yellow, with a golden retriever "
        "friend nearby, soft bokeh background, shot on a Canon EOS R5 with an 85mm f/1.2 lens, "
        "natural lighting, award-winning composition, national geographic style, 8k resolution, "
        "sharp focus, vivid colors, masterpiece, best quality, ultra realistic, cinematic"
    )
    out += [long_prompt, long_prompt.upper(), long_prompt + " " + long_prompt, long_prompt.replace(" ", "\n")]
    for s in subjects:
        for st in styles:
            out.append(s + st)
    for a in words:
        for b in ["a photo of {}", "a {} in the jungle", "{}!", "{}'s face", "A {} WITH {}"]:
            out.append(b.format(a, a))
    # Reproducible random strings over many character classes.
    rng = random.Random(0)
    pools = [
        "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n  ",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "àéîõüçñßÀÉÎÕÜÇÑ", "\u0300\u0301\u0308\u0327",
        "你好世界狗猫", "こんにちはカタ", "한국어", "абвгдЖЗИЙ", "αβγδΩΣ", "שלוםمرحبا", "🐶🐱✨🔥👍🏽❤️",
        "\u200b\u200d\u00a0\u3000\ufeff", "½²₂Ⅻ①٣३",
    ]
    for i in range(140):
        n = rng.randint(1, 40 if i % 10 else 150)
        k = rng.randint(1, 4)
        chosen = rng.sample(pools, k)
        out.append("".join(rng.choice(rng.choice(chosen)) for _ in range(n)))
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def run(tok, text):
    ids = tok(text).input_ids
    enc = tok(text, padding="max_length", max_length=MAX_LEN, truncation=True)
    assert len(enc.input_ids) == MAX_LEN
    kept = [i for i, m in zip(enc.input_ids, enc.attention_mask) if m == 1]
    n_pad = MAX_LEN - len(kept)
    assert enc.input_ids[len(kept) :] == [tok.pad_token_id] * n_pad and all(enc.attention_mask[: len(kept)])
    truncated = tok.batch_decode([ids[MAX_LEN - 1 : -1]])[0] if len(ids) > MAX_LEN else None
    return {
        "ids": ids,
        "padded": kept,
        "n_pad": n_pad,
        "decoded": tok.decode(ids, skip_special_tokens=True),
        "truncated": truncated,
    }


def compact(result):
    """Leaves out `padded` when it equals `ids` and `truncated` when null."""
    out = dict(result)
    if out["padded"] == out["ids"]:
        del out["padded"]
    if out["truncated"] is None:
        del out["truncated"]
    return out


def main():
    vocab, merges = clip_vocab_and_merges()
    variants = {}
    cfg1, map1 = sd_configs("<|endoftext|>")
    cfg2, map2 = sd_configs("!")
    layouts = {
        "sd1": {"tokenizer_config.json": cfg1, "special_tokens_map.json": map1},
        "sd2": {"tokenizer_config.json": cfg2, "special_tokens_map.json": map2},
        "bare": {},
        "modern": {"tokenizer_config.json": modern_config()},
    }
    tokenizers_by_name = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in layouts.items():
            d = os.path.join(tmp, name)
            os.makedirs(d)
            with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
                json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
            with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
            for fname, content in files.items():
                with open(os.path.join(d, fname), "w", encoding="utf-8") as f:
                    json.dump(content, f, indent=2)
            tok = CLIPTokenizer.from_pretrained(d)
            tokenizers_by_name[name] = tok
            variants[name] = {
                "files": files,
                "bos_id": tok.bos_token_id,
                "eos_id": tok.eos_token_id,
                "pad_id": tok.pad_token_id,
            }
    texts = prompts()
    assert len(texts) >= 300, len(texts)
    cases = []
    for text in texts:
        case = {"text": text}
        for name, tok in tokenizers_by_name.items():
            result = compact(run(tok, text))
            # sd2, bare and modern are left out where they equal sd1.
            if name == "sd1" or result != case["sd1"]:
                case[name] = result
        cases.append(case)
    with open(GZ, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    header = {
        "generator": "tools/parity/tokenizer.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "bpe_gz_sha256": sha,
        "max_length": MAX_LEN,
        "variants": variants,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    # One case per line keeps diffs readable.
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("{\n")
        for k, v in header.items():
            f.write(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))},\n")
        f.write('"cases": [\n')
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]\n}\n")
    n_trunc = sum(1 for c in cases if "truncated" in c["sd1"])
    print(f"wrote {OUT}: {len(cases)} cases ({n_trunc} truncated), {os.path.getsize(OUT)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
