"""The T5 tokenizer of FLUX.1's `tokenizer_2/`: SentencePiece unigram pieces + `</s>`, padded to 256 with `<pad>`.

Reads either `tokenizer.json` with the `tokenizers` library (what diffusers' `T5TokenizerFast` loads; preferred when
present) or `spiece.model` with `sentencepiece`. Follows transformers' `T5TokenizerFast` for the ids; differs in:
- one call returns the padded id tensor Flux needs: pieces + EOS (id 1), truncation keeps the EOS, right padding with
  `<pad>` (id 0) to `max_length`; no attention mask (Flux passes none);
- `word_pieces(text)` reports which positions of `encode(text)` belong to each whitespace-separated word, for the
  concept modes that use several pieces per word.

With `spiece.model` the behaviour of the fast tokenizer is reproduced on top of sentencepiece: special tokens (`<pad>`,
`</s>`, `<unk>`, `<extra_id_0>`..`<extra_id_99>` = ids vocab+99..vocab) typed in the text become their ids, and
the text is split at whitespace (Unicode White_Space, as the tokenizers library's `WhitespaceSplit`) before
sentencepiece sees each word, so every word starts with its own "▁" piece.
"""

import re
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["T5Tokenizer", "pad_ids"]

# Unicode White_Space: what the tokenizers library's WhitespaceSplit splits on (Python's str.split also splits on
# the control characters \x1c-\x1f, which are not whitespace there).
WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WORD = re.compile(f"[^{WHITESPACE}]+")
EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, appended after the sentencepiece vocabulary


def pad_ids(encoded: list[list[int]], max_length: int, eos_id: int, pad_id: int) -> Tensor:
    """Rows of ids ending in EOS -> [B, max_length]: a row too long is cut and keeps its EOS; short rows are
    right-padded with `pad_id`. Shared by the T5 and CLIP tokenizers."""
    ids = torch.full((len(encoded), max_length), pad_id, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        if len(tokens) > max_length:
            tokens = tokens[: max_length - 1] + [eos_id]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


class T5Tokenizer:
    """Build with `from_folder` (a `tokenizer_2/`-style folder), `from_tokenizer_json` or `from_spiece`."""

    def __init__(self, backend, vocab_size: int, eos_id: int, pad_id: int, specials: dict[str, int] | None = None):
        """`backend`: a tokenizers.Tokenizer (it splits off special tokens itself; `specials` None) or a
        SentencePieceProcessor with the special tokens to split off before it sees the text (`specials`)."""
        self.backend = backend
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.specials = specials
        # leftmost, then longest match, like the tokenizers library's added-token matching
        longest_first = sorted(specials or {}, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    @classmethod
    def from_folder(cls, path: str | Path) -> "T5Tokenizer":
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"T5 tokenizer folder {folder} does not exist")
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        if (folder / "spiece.model").is_file():
            return cls.from_spiece(folder / "spiece.model")
        raise FileNotFoundError(
            f"T5 tokenizer folder {folder} has neither tokenizer.json nor spiece.model; "
            f"it holds: {sorted(p.name for p in folder.iterdir())}"
        )

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "T5Tokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"T5 tokenizer file {path} does not exist")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own Exception type for a damaged file
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"{path} is not a tokenizers file ({reason}); replace it with an intact copy") from None
        backend.no_truncation()  # we truncate and pad ourselves, whatever the file says
        backend.no_padding()
        ids = {name: backend.token_to_id(name) for name in ("</s>", "<pad>")}
        for name, index in ids.items():
            if index is None:
                raise ValueError(f"{path} has no {name} token, so it is not a T5 tokenizer")
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
        return cls(backend, vocab_size, eos_id=ids["</s>"], pad_id=ids["<pad>"])

    @classmethod
    def from_spiece(cls, path: str | Path) -> "T5Tokenizer":
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"T5 tokenizer file {path} does not exist")
        try:
            backend = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:  # a damaged or empty file: sentencepiece cannot parse it
            raise ValueError(f"{path} is not a SentencePiece model ({error}); replace it with an intact copy") from None
        size = backend.get_piece_size()
        # the model's own control pieces (<pad>, </s>) and <unk>, then the sentinels in reverse order, as transformers
        specials = {backend.id_to_piece(i): i for i in range(size) if backend.is_control(i) or backend.is_unknown(i)}
        specials |= {f"<extra_id_{i}>": size + EXTRA_IDS - 1 - i for i in range(EXTRA_IDS)}
        if backend.eos_id() < 0 or backend.pad_id() < 0:
            raise ValueError(f"{path} defines no </s> or no <pad> piece, so it is not a T5 tokenizer")
        return cls(backend, size + EXTRA_IDS, eos_id=backend.eos_id(), pad_id=backend.pad_id(), specials=specials)

    def pieces_with_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(id, start, end) of each piece of `text`, no EOS; [start, end) is the stretch of `text` it came from."""
        if self.specials is None:  # tokenizers backend
            encoding = self.backend.encode(text, add_special_tokens=False)
            return [(i, start, end) for i, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)]
        pieces = []
        position = 0
        found = list(self._special_pattern.finditer(text)) if self._special_pattern else []
        for special in [*found, None]:
            end = len(text) if special is None else special.start()
            for word in WORD.finditer(text, position, end):
                pieces += [(i, word.start(), word.end()) for i in self.backend.encode(word.group())]
            if special is not None:
                pieces.append((self.specials[special.group()], special.start(), special.end()))
                position = special.end()
        return pieces

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text` followed by EOS; no truncation, no padding."""
        return [i for i, _, _ in self.pieces_with_spans(text)] + [self.eos_id]

    def __call__(self, texts: str | list[str], max_length: int = 256) -> Tensor:
        """Ids [B, max_length]: pieces + EOS, cut to max_length - 1 pieces + EOS, right-padded with <pad>."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for the EOS), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return pad_ids([self.encode(text) for text in texts], max_length, self.eos_id, self.pad_id)

    def word_pieces(self, text: str) -> list[tuple[str, list[int]]]:
        """Each whitespace-separated word of `text` with the positions (indices into `encode(text)`) of its pieces.

        A piece belongs to a word when the stretch of text it came from overlaps the word; the EOS belongs to none.
        """
        spans = self.pieces_with_spans(text)
        words = []
        for word in WORD.finditer(text):
            # a piece with an empty span (a lone "▁") counts as one character wide
            positions = [
                index
                for index, (_, start, end) in enumerate(spans)
                if max(start, word.start()) < min(max(end, start + 1), word.end())
            ]
            words.append((word.group(), positions))
        return words

    def id_to_piece(self, index: int) -> str:
        """The piece string of one id (for display); ids outside the vocabulary raise a ValueError naming the id."""
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the T5 vocabulary of {self.vocab_size} ids")
        if self.specials is None:
            return self.backend.id_to_token(index)
        if index >= self.backend.get_piece_size():
            return f"<extra_id_{self.vocab_size - 1 - index}>"
        return self.backend.id_to_piece(index)
