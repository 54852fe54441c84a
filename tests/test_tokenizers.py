"""T5 and CLIP tokenizers against transformers' tokenizers loading the same files.

The files are made here: a small SentencePiece unigram model trained with sentencepiece's own trainer (the T5 format:
<pad>=0, </s>=1, <unk>=2, no BOS), the tokenizer.json transformers converts it to, and a small byte-level BPE learned
here and written in CLIP's vocab.json + merges.txt layout. Ids must be equal on a few hundred varied strings.
"""

import io
import json
import random

import pytest
import regex
import torch

from clip import CLIPTokenizer
from t5 import T5Tokenizer

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")

WORDS = (
    "a photo of the cat dog sitting on red blue green sofa in garden under bright sky with clouds and trees near "
    "river mountain city street at night neon lights painting portrait woman man child playing ball highly detailed "
    "sharp focus cinematic lighting watercolor sketch oil canvas golden hour 4k 8k render unreal engine trending "
    "café crème brûlée naïve façade über schön grüße mañana jalapeño piñata résumé déjà vu smörgåsbord "
    "東京 夜景 ネオン 猫 犬 Ελληνικά κείμενα русский текст пример שלום مرحبا नमस्ते 안녕하세요"
).split()


def corpus(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        words = [w.capitalize() if rng.random() < 0.2 else w for w in words]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", "", " :)", "..."]))
    return lines


def varied_strings() -> list[str]:
    """Hand-picked edge cases plus seeded random mixtures: >= 200 strings."""
    hand = [
        "",
        " ",
        "   ",
        "\t\n",
        "a",
        "A",
        "a photo of a cat",
        "A Photo Of A CAT",
        "a  photo   of    a cat",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\nmixed",
        "punctuation!!! ... ??? ;;; ,,, --- ___ ***",
        "it's I'm we're they've you'll he'd can't",
        "IT'S I'M WE'RE",
        "quotes \"double\" 'single' `back`",
        "brackets (round) [square] {curly} <angle>",
        "email@example.com http://x.org/a?b=c&d=e#frag",
        "numbers 0 1 12 123 1234 3.14159 -42 +7 1e10 1,000,000",
        "2024-01-31 12:34:56",
        "$100 €50 £20 ¥1000 ₹500",
        "100% 50/50 3x4 a+b=c a*b a^b",
        "café crème brûlée",
        "CAFÉ CRÈME BRÛLÉE",
        "cafe\u0301 (combining accent)",
        "ﬁne ﬂour ligatures",
        "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
        "東京の夜景とネオン",
        "猫 が 好き",
        "Ελληνικά κείμενα",
        "русский текст",
        "שלום עולם",
        "مرحبا بالعالم",
        "नमस्ते दुनिया",
        "안녕하세요 세계",
        "emoji 😀🐱🚀 mixed 👍🏽",
        "math ∑ ∫ √ ∞ ≠ ≤ ≥ π α β γ",
        "arrows → ← ↑ ↓ ⇒",
        "no\u00a0break\u00a0space",
        "zero\u200bwidth\u200bspace",
        "ideographic\u3000space",
        "en\u2002em\u2003thin\u2009spaces",
        "line\u2028separator and para\u2029graph",
        "control\x1cchars\x1dhere\x1e\x1f",
        "bell\x07 and delete\x7f",
        "soft\u00adhyphen",
        "</s>",
        "a </s> b",
        "x</s>y",
        "<pad> <unk> <s>",
        "<extra_id_0> fill <extra_id_1> in <extra_id_99>",
        "<extra_id_100> is not a sentinel",
        "<|startoftext|> hello <|endoftext|>",
        "<|StartOfText|> and <|ENDOFTEXT|>",
        "<|endoftext|><|endoftext|>",
        "Ⅻ ⅔ ² ³ ½",
        "ǆ ǅ Ǆ ß ẞ İ ı",
        "ｶﾀｶﾅ half-width katakana",
        "repeated letters aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "CamelCaseWordsTogether snake_case_words kebab-case-words",
        "a.b.c d-e-f g_h_i",
        "....",
        "'",
        "''",
        "'s",
        "!",
        "1",
        "é",
        "\u0301",
        "mixed 東京 and english and 123",
    ]
    long_words = " ".join(corpus(40, seed=7))
    long = [long_words, long_words.upper(), ("word " * 400).strip(), "x" * 1000, "日本語" * 200]
    rng = random.Random(1234)
    pool = list(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     .,;:!?'\"-_()[]éèàüößçñ東京猫ΩЖ😀\t\n"
    )
    generated = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(80)]
    sentences = corpus(60, seed=99)
    strings = hand + long + generated + sentences
    assert len(strings) >= 200
    return strings


STRINGS = varied_strings()


# ---------------------------------------------------------------------------------------------------- T5 fixtures


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_spiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(3000, seed=0)),
        model_writer=model,
        model_type="unigram",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=0.995,  # leaves some rare characters to <unk>
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def hf_t5(spiece_folder):
    return transformers.T5TokenizerFast.from_pretrained(str(spiece_folder))


@pytest.fixture(scope="module")
def json_folder(hf_t5, tmp_path_factory):
    """The tokenizer.json transformers converts spiece.model to (the file diffusers loads from tokenizer_2/)."""
    folder = tmp_path_factory.mktemp("t5_json")
    hf_t5.save_pretrained(str(folder))
    (folder / "spiece.model").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def legacy_json_folder(json_folder, tmp_path_factory):
    """The same tokenizer.json in the older format of google/t5-v1_1-xxl's file (Metaspace `add_prefix_space`)."""
    folder = tmp_path_factory.mktemp("t5_json_legacy")
    content = json.loads((json_folder / "tokenizer.json").read_text(encoding="utf-8"))
    content["pre_tokenizer"]["pretokenizers"][1] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    content["decoder"] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    (folder / "tokenizer.json").write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["spiece", "json", "legacy-json"])
def t5_tokenizer(request, spiece_folder, json_folder, legacy_json_folder):
    folders = {"spiece": spiece_folder, "json": json_folder, "legacy-json": legacy_json_folder}
    return T5Tokenizer.from_folder(folders[request.param])


def test_t5_matches_transformers(t5_tokenizer, hf_t5):
    assert (t5_tokenizer.vocab_size, t5_tokenizer.eos_id, t5_tokenizer.pad_id) == (len(hf_t5), 1, 0)
    mismatches = [s for s in STRINGS if t5_tokenizer.encode(s) != hf_t5(s).input_ids]
    for s in mismatches[:10]:
        print(repr(s), t5_tokenizer.encode(s), hf_t5(s).input_ids)
    assert not mismatches, f"{len(mismatches)} of {len(STRINGS)} strings differ"
    for max_length in (256, 8):  # 8 truncates most strings, 256 a few
        expected = hf_t5(STRINGS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        torch.testing.assert_close(t5_tokenizer(STRINGS, max_length=max_length), expected.input_ids, rtol=0, atol=0)
    print(f"T5: ids of {len(STRINGS)} strings equal transformers' (no limit, max_length 256 and 8)")


def test_t5_layout(t5_tokenizer):
    ids = t5_tokenizer(["a photo of a cat", "x " * 300], max_length=256)
    assert ids.shape == (2, 256) and ids.dtype == torch.long
    short = t5_tokenizer.encode("a photo of a cat")
    assert short[-1] == 1 and ids[0, : len(short)].tolist() == short and (ids[0, len(short) :] == 0).all()
    assert ids[1, -1] == 1 and (ids[1, :-1] != 1).all()  # truncated: 255 pieces, then the EOS
    assert t5_tokenizer("", max_length=4).tolist() == [[1, 0, 0, 0]]


def test_t5_word_pieces(t5_tokenizer, hf_t5):
    """Words split at Unicode White_Space; each word's positions hold exactly the ids transformers gives the word
    alone; every piece belongs to exactly one word, in order, and the EOS to none."""
    checked = 0
    for text in STRINGS:
        encoded = t5_tokenizer.encode(text)
        words = t5_tokenizer.word_pieces(text)
        assert [word for word, _ in words] == regex.findall(r"[^\p{White_Space}]+", text)
        assert [p for _, positions in words for p in positions] == list(range(len(encoded) - 1)), text
        for word, positions in words:
            assert [encoded[p] for p in positions] == hf_t5(word, add_special_tokens=False).input_ids, (text, word)
            checked += 1
    print(f"T5 word_pieces: {checked} words checked")


def test_t5_errors(tmp_path, spiece_folder):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        T5Tokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5Tokenizer.from_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer.from_spiece(tmp_path / "spiece.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T5Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    tokenizer = T5Tokenizer.from_folder(spiece_folder)
    with pytest.raises(ValueError, match="token id 123456 "):
        tokenizer.id_to_piece(123456)
    with pytest.raises(ValueError, match="max_length"):
        tokenizer("a", max_length=0)


# ---------------------------------------------------------------------------------------------------- CLIP fixtures


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def learn_merges(lines: list[str], count: int) -> list[tuple[str, str]]:
    """Greedy BPE on CLIP's byte-level words with </w> on the last symbol (ties broken by the pair itself)."""
    byte_char = bytes_to_unicode()
    words: dict[tuple[str, ...], int] = {}
    for line in lines:
        for token in CLIP_PATTERN.findall(line.lower()):
            symbols = [byte_char[b] for b in token.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] = words.get(tuple(symbols), 0) + 1
    merges = []
    for _ in range(count):
        pairs: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + freq
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + freq
        words = merged
    return merges


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    merges = learn_merges(corpus(500, seed=3), count=300)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    return folder


def test_clip_matches_transformers(clip_folder):
    hf = transformers.CLIPTokenizer.from_pretrained(str(clip_folder))
    ours = CLIPTokenizer.from_folder(clip_folder)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    mismatches = [s for s in STRINGS if ours.encode(s) != hf(s).input_ids]
    for s in mismatches[:10]:
        print(repr(s), ours.encode(s), hf(s).input_ids)
    assert not mismatches, f"{len(mismatches)} of {len(STRINGS)} strings differ"
    expected = hf(STRINGS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ours(STRINGS), expected, rtol=0, atol=0)
    print(f"CLIP: ids of {len(STRINGS)} strings equal transformers' (no limit and max_length 77)")


def test_clip_layout(clip_folder):
    tokenizer = CLIPTokenizer.from_folder(clip_folder)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert eos == tokenizer.vocab_size - 1  # the largest id, which the encoder's pooling relies on
    ids = tokenizer(["a photo of a cat", "x " * 300])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    short = tokenizer.encode("a photo of a cat")
    assert short[0] == bos and short[-1] == eos and ids[0, : len(short)].tolist() == short
    assert (ids[0, len(short) :] == eos).all()  # padded with EOS
    assert ids[1, 0] == bos and ids[1, -1] == eos and (ids[1, 1:-1] != eos).all()  # 75 pieces kept
    assert tokenizer("", max_length=4).tolist() == [[bos, eos, eos, eos]]


def test_clip_errors(tmp_path, clip_folder):
    (tmp_path / "vocab.json").write_bytes((clip_folder / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").write_bytes((clip_folder / "merges.txt").read_bytes())
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        CLIPTokenizer({"a</w>": 0, "<|startoftext|>": 1}, [])
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer.from_folder(clip_folder)("a", max_length=1)
