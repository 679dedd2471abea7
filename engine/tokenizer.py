"""Byte-level tokenizer: UTF-8 bytes are token ids 0..255, plus BOS and EOS. Torch-free."""

from __future__ import annotations

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


class ByteTokenizer:
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        # Ids outside the byte range (specials, or a bigger model's vocab) carry no text.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
