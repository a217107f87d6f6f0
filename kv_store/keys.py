"""Block keys.

A block is ``block_size`` consecutive prompt tokens. Its key names exactly which bytes a
holder has, so that a reader with a different tensor- or pipeline-parallel split can ask
for the heads and layers it needs:

* ``namespace``: model id and layout fingerprint (dtype, head size, block size, cache
  layout of the platform), hashed to 8 bytes; blocks of different models or layouts
  never share keys.
* ``chain_hash``: hash of the parent block's chain hash, the tenant salt and this
  block's token ids, so a key stands for the whole prefix up to and including it.
* ``layers``: the half-open layer range ``[start, end)`` the bytes cover.
* ``heads``: the half-open KV-head range ``[start, end)`` the bytes cover.

Chain hashes use BLAKE2b, a cryptographic hash: tenants cannot craft prompts whose
blocks collide with another tenant's.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Sequence

HASH_BYTES = 16
_ROOT = b"\x00" * HASH_BYTES
_KEY = struct.Struct(">8s16sHHHH")


def namespace(model_id: str, layout: str) -> bytes:
    """8-byte id of a model and its cache layout."""
    return hashlib.blake2b(f"{model_id}\x00{layout}".encode(), digest_size=8).digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[bytes]:
    """Chain hashes of every *full* block of ``token_ids``; a trailing partial block gets none."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    salt_bytes = (salt or "").encode()
    out: list[bytes] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(digest_size=HASH_BYTES)
        h.update(parent)
        h.update(struct.pack(">I", len(salt_bytes)))
        h.update(salt_bytes)
        h.update(struct.pack(f"<{block_size}i", *token_ids[start:start + block_size]))
        parent = h.digest()
        out.append(parent)
    return out


@dataclass(frozen=True)
class BlockKey:
    namespace: bytes
    chain_hash: bytes
    layers: tuple[int, int]
    heads: tuple[int, int]

    def to_bytes(self) -> bytes:
        return _KEY.pack(self.namespace, self.chain_hash, *self.layers, *self.heads)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "BlockKey":
        ns, chain, l0, l1, h0, h1 = _KEY.unpack(raw)
        return cls(ns, chain, (l0, l1), (h0, h1))


@dataclass(frozen=True)
class DraftSpace:
    """Where a draft model's layers are keyed (speculative decoding): in the draft's own
    namespace (its model id and layout), under its own layer indices and KV heads, so its
    blocks never mix with the target's and any target served with the same draft shares
    them. The worker numbers the draft's layers after the target's, from ``first_layer``."""

    first_layer: int
    namespace: bytes
    heads: tuple[int, int]


@dataclass(frozen=True)
class KeySpace:
    """Everything but the chain hash: builds the keys one worker reads and writes.
    Layer ``first_layer`` of ``draft`` and above are the draft model's (``DraftSpace``)."""

    namespace: bytes
    heads: tuple[int, int]
    draft: DraftSpace | None = None

    def key(self, chain_hash: bytes, layer: int) -> bytes:
        """``BlockKey(namespace, chain_hash, (layer, layer + 1), heads).to_bytes()``, packed
        without the dataclass (a load builds one per block and layer, hundreds a request);
        a draft model's layer (``draft``, numbered after the target's) in the draft's own
        namespace, with its own layer index and heads."""
        if self.draft is not None and layer >= self.draft.first_layer:
            layer -= self.draft.first_layer
            return _KEY.pack(self.draft.namespace, chain_hash, layer, layer + 1, *self.draft.heads)
        return _KEY.pack(self.namespace, chain_hash, layer, layer + 1, *self.heads)

    def block_group(self, chain_hash: bytes, layers: Sequence[int]) -> list[bytes]:
        """The keys of one block across ``layers``: the block is usable only if all exist."""
        return [self.key(chain_hash, layer) for layer in layers]
