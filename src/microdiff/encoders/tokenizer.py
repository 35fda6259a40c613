"""A byte-level tokenizer for the built-in text encoder: no vocabulary file, no download.

Why bytes and not a word vocabulary built from the captions: a byte tokenizer is a pure function
of the text, so it never fails on an unseen word, typo, emoji or script, needs nothing stored
beside the weights, and gives the same ids on every machine and for every dataset (a vocabulary
built from one caption set silently maps new words of another to <unk>). The price is longer
sequences (about 4-5 bytes per English word), which is cheap at caption lengths and with the
small encoder it serves.

Ids: 0 = <pad>, 1 = <bos>, 2 = <eos>, byte b -> b + 3 (vocabulary of 259). Text is NFC-normalised
(so visually equal strings get equal ids) and stripped of surrounding whitespace; case is kept.
A caption longer than ``max_length - 2`` bytes is cut at a character boundary and flagged.
"""

from __future__ import annotations

import unicodedata

import torch

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def _cut_utf8(data: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of UTF-8 ``data`` without a broken character at the end."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and (data[end] & 0xC0) == 0x80:  # data[end] continues a character: step back
        end -= 1
    return data[:end]


class ByteTokenizer:
    """Captions -> ``input_ids`` (B, L) long and ``attention_mask`` (B, L) bool, True = real token.

    ``padding="max_length"`` gives L = ``max_length`` (fixed shapes for shards and batching);
    ``"longest"`` pads to the longest caption of the batch. ``truncated`` (B,) flags the captions
    that were cut.
    """

    pad_id, bos_id, eos_id, vocab_size = PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE

    def __init__(self, max_length: int = 128):
        if max_length < 3:
            raise ValueError(f"max_length must leave room for <bos>, one byte and <eos>: got {max_length}, use >= 3")
        self.max_length = max_length

    @staticmethod
    def normalize(text: str) -> str:
        return unicodedata.normalize("NFC", text).strip()

    def ids(self, text: str) -> tuple[list[int], bool]:
        """Token ids of one caption (with <bos> and <eos>) and whether it was truncated."""
        data = self.normalize(text).encode("utf-8")
        kept = _cut_utf8(data, self.max_length - 2)
        return [BOS_ID, *(b + BYTE_OFFSET for b in kept), EOS_ID], len(kept) < len(data)

    def __call__(self, captions: list[str], padding: str = "max_length") -> dict:
        """``input_ids`` and ``attention_mask`` (B, L) tensors and ``truncated``, one bool per caption."""
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        rows, cut = zip(*(self.ids(c) for c in captions)) if captions else ((), ())
        length = self.max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
        input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": input_ids != PAD_ID,
                "truncated": list(cut)}

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The text of one row of ids (special tokens dropped; invalid UTF-8 shown as U+FFFD)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


__all__ = ["ByteTokenizer", "PAD_ID", "BOS_ID", "EOS_ID", "BYTE_OFFSET", "VOCAB_SIZE"]
