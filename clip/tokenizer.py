"""The CLIP tokenizer of FLUX.1's `tokenizer/` folder: byte-level BPE over `vocab.json` + `merges.txt`.

Follows transformers' `CLIPTokenizer` (the `tokenizers`-backed one; `CLIPTokenizerFast` in transformers 4), built with
the `tokenizers` library from the two files:
- normalise: Unicode NFC, every run of whitespace -> one space, lower-case;
- pre-tokenise with CLIP's pattern (`'s|'t|'re|'ve|'m|'ll|'d`, letter runs, single digits, runs of other non-space
  characters), then map bytes to GPT-2's printable characters;
- BPE with `</w>` appended to the last symbol of each word; `<|startoftext|>` and `<|endoftext|>` typed in the text
  are special tokens.
Differs in: one call returns the padded id tensor Flux needs, `[BOS] + pieces[:max_length - 2] + [EOS]` padded with EOS
to `max_length` (77), with BOS and EOS looked up in the vocabulary (49406 and 49407 for CLIP-L).

Note that transformers 4's slow `CLIPTokenizer` (which older diffusers used) pre-processes differently when `ftfy` is
missing (BERT-style clean-up that also splits CJK characters apart); this follows the fast one.
"""

import json
from pathlib import Path

from torch import Tensor

from t5.tokenizer import pad_ids

__all__ = ["CLIPTokenizer"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class CLIPTokenizer:
    """Build with `from_folder` (a `tokenizer/`-style folder) or from the vocabulary and merges themselves."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for name in (BOS, EOS):
            if name not in vocab:
                raise ValueError(f"the CLIP vocabulary has no {name} token")
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = self.eos_id  # CLIP pads with <|endoftext|>
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
        self.backend.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder {folder} does not exist")
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CLIP tokenizer folder {folder} has no {name}")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = []
        for number, line in enumerate(lines, start=1):
            if line.startswith("#version") or not line.strip():
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{folder / 'merges.txt'} line {number} is not two symbols: {line!r}")
            merges.append((pair[0], pair[1]))
        return cls(vocab, merges)

    def encode(self, text: str) -> list[int]:
        """BOS + BPE ids of `text` + EOS; no truncation, no padding."""
        return [self.bos_id, *self.backend.encode(text, add_special_tokens=False).ids, self.eos_id]

    def __call__(self, texts: str | list[str], max_length: int = 77) -> Tensor:
        """Ids [B, max_length]: BOS + pieces cut to max_length - 2 + EOS, padded with EOS."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for BOS and EOS), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return pad_ids([self.encode(text) for text in texts], max_length, self.eos_id, self.pad_id)
