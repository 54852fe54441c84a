"""The CLIP tokenizer of FLUX.1's `tokenizer/` and SD3's `tokenizer/` + `tokenizer_2/`: byte-level BPE over
`vocab.json` + `merges.txt`.

Follows transformers' `CLIPTokenizer` (the `tokenizers`-backed one; `CLIPTokenizerFast` in transformers 4), built with
the `tokenizers` library from the two files:
- normalise: Unicode NFC, every run of whitespace -> one space, lower-case;
- pre-tokenise with CLIP's pattern (`'s|'t|'re|'ve|'m|'ll|'d`, letter runs, single digits, runs of other non-space
  characters), then map bytes to GPT-2's printable characters;
- BPE with `</w>` appended to the last symbol of each word; `<|startoftext|>` and `<|endoftext|>` typed in the text
  are special tokens.
Differs in: one call returns the padded id tensor Flux needs, `[BOS] + pieces[:max_length - 2] + [EOS]` padded with the
pad token to `max_length` (77), with BOS and EOS looked up in the vocabulary (49406 and 49407 for CLIP-L).

The pad token: `<|endoftext|>` unless the folder's `tokenizer_config.json` or `special_tokens_map.json` names another
(the former wins, as in transformers). SD3's and SDXL's bigG `tokenizer_2/` says "!" (id 0). As in transformers, a pad
token other than EOS is a special token, so a "!" typed in the text also becomes id 0 there (not the piece "!</w>").
Whether BOS, EOS and pad are matched before or after normalisation (lower-casing: a typed "<|StartOfText|>") is read
from `added_tokens_decoder` (`normalized`), else from the token's entry; by default, before (transformers' default).

Note that transformers 4's slow `CLIPTokenizer` (which older diffusers used) pre-processes differently when `ftfy` is
missing (BERT-style clean-up that also splits CJK characters apart); this follows the fast one.
"""

import json
from pathlib import Path

from torch import Tensor

from t5.tokenizer import pad_ids

__all__ = ["CLIPTokenizer"]

REPLACE = "replace it with an intact copy from the model's source"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def read_object(path: Path) -> dict:
    """A tokenizer file's JSON object; a damaged one (invalid JSON or UTF-8, or not an object) names itself."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # a UnicodeDecodeError is a ValueError
        raise ValueError(f"{path} is damaged ({type(error).__name__}: {error}); {REPLACE}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is a JSON {type(data).__name__}, not an object; {REPLACE}")
    return data


def special_tokens(folder: Path) -> tuple[str, frozenset[str]]:
    """The pad token and the special tokens matched after normalisation, from `special_tokens_map.json` and
    `tokenizer_config.json` (which wins) when the folder has them."""
    settings, read = {}, []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            settings |= read_object(folder / name)
            read.append(name)
    try:
        entries = [
            settings[key] for key in ("bos_token", "eos_token", "pad_token") if isinstance(settings.get(key), dict)
        ]
        entries += list(settings.get("added_tokens_decoder", {}).values())  # the later entry of a token wins
        flags = {entry["content"]: entry.get("normalized", False) for entry in entries}
        pad = settings.get("pad_token") or EOS  # null: no padding in transformers; ours always pads, as CLIP-L does
        pad = pad["content"] if isinstance(pad, dict) else pad
        hash(pad)
    except (KeyError, TypeError, AttributeError) as error:  # an entry that is no {"content": ...} object
        raise ValueError(f"{folder}: {' or '.join(read)} has a malformed token entry ({error!r}); {REPLACE}") from None
    unsupported = sorted(set(flags) - {BOS, EOS, pad})
    if unsupported:
        raise ValueError(f"{folder}: added tokens {unsupported} are not supported (only BOS, EOS and the pad token)")
    return pad, frozenset(token for token, flag in flags.items() if flag)


class CLIPTokenizer:
    """Build with `from_folder` (a `tokenizer/`-style folder) or from the vocabulary and merges themselves."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS,
        normalized: frozenset[str] = frozenset(),
    ):
        """`pad_token`: the padding piece (CLIP-L: EOS; bigG: "!"); `normalized`: the special tokens (of BOS, EOS and
        the pad token) matched in the normalised text rather than the raw one."""
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for name in (BOS, EOS, pad_token):
            if name not in vocab:
                raise ValueError(f"the CLIP vocabulary has no {name} token")
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = vocab[pad_token]
        self.vocab_size = len(vocab)
        bpe = BPE(vocab, merges, unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
        self.backend = Tokenizer(bpe)
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        self.backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
                # its own GPT-2 split (use_regex) only matters for pieces such as a typed "<|StartOfText|>"
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        specials = dict.fromkeys((BOS, EOS, pad_token))  # the pad token is EOS for CLIP-L
        self.backend.add_special_tokens(
            [AddedToken(token, special=True, normalized=token in normalized) for token in specials]
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder {folder} does not exist")
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CLIP tokenizer folder {folder} has no {name}")
        vocab = read_object(folder / "vocab.json")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
            raise ValueError(f"{folder / 'vocab.json'} maps pieces to values that are not whole numbers; {REPLACE}")
        try:
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except ValueError as error:
            raise ValueError(f"{folder / 'merges.txt'} is not UTF-8 text ({error}); {REPLACE}") from None
        merges = []
        for number, line in enumerate(lines, start=1):
            if line.startswith("#version") or not line.strip():
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{folder / 'merges.txt'} line {number} is not two symbols: {line!r}")
            merges.append((pair[0], pair[1]))
        if not merges:  # every word would fall apart into single characters
            raise ValueError(f"{folder / 'merges.txt'} holds no merges; {REPLACE}")
        pad, normalized = special_tokens(folder)
        try:
            return cls(vocab, merges, pad, normalized)
        except Exception as error:  # a token missing from the vocabulary, or tokenizers' own refusal of the BPE
            raise ValueError(f"{folder}: vocab.json and merges.txt make no tokenizer ({error}); {REPLACE}") from None

    def encode(self, text: str) -> list[int]:
        """BOS + BPE ids of `text` + EOS; no truncation, no padding."""
        return [self.bos_id, *self.backend.encode(text, add_special_tokens=False).ids, self.eos_id]

    def __call__(self, texts: str | list[str], max_length: int = 77) -> Tensor:
        """Ids [B, max_length]: BOS + pieces cut to max_length - 2 + EOS, padded with EOS."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for BOS and EOS), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return pad_ids([self.encode(text) for text in texts], max_length, self.eos_id, self.pad_id)
