"""Encodings of blocks at rest in a tier: how a cold tier holds more blocks per byte.

A tier may hold its blocks encoded (``Tier.encoding``): ``none`` (the bytes as put),
the lossless codecs ``zstd`` and ``lz4`` (the block's bytes compressed, decoded to
exactly the bytes put; a block of whole bf16 values is byte-shuffled first, the high
bytes of its values, sign and exponent, apart from the low ones, as Blosc's shuffle
filter does, which is what lets the codecs find the exponents' redundancy), and the
*lossy* ``int8`` and ``int4`` (bf16 values quantized to 8 or 4 bits, keys grouped per
channel and values per token, with a float16 scale and zero point per group, within
each KV head of the block: a block of ``heads`` heads is ``heads`` equal contiguous
spans, the layout of the paged KV cache, whose head axis comes first; one quantizer,
``Grouped``, parametrized by its bits).
Lossy encodings are never chosen unless asked for.

Every encoded block starts with a header that names its encoding and the length of the
bytes it decodes to (``HEADER``); ``decode`` refuses a blob whose header is not its
own, or whose payload does not decode to that length, with ``ValueError``. The store
checksums the encoded bytes (header included), so damage at rest is caught before
anything is decoded.
"""

from __future__ import annotations

import struct
import threading
from abc import ABC, abstractmethod

# numpy (and each codec's library) is imported where it is used: the settings, and so the
# command line, import this module and stay light.


HEADER = struct.Struct(">4sBBxxI")  # magic, encoding code, flags, 2 reserved, decoded length
SHUFFLED = 1  # flag: the payload holds the block's bytes shuffled by 2 (bf16 values)
MAGIC = b"KVE1"


class Encoding(ABC):
    """One way of holding a block at rest. ``encode`` returns the header and payload;
    ``decode`` the block's bytes (for a lossy encoding, close to those put, not equal).
    ``heads``: how many KV heads the block holds (its bytes split into that many equal
    spans); encodings that do not look inside a block ignore it."""

    name: str
    code: int
    lossy = False

    def encode(self, data: bytes | memoryview, heads: int = 1) -> bytes:
        return HEADER.pack(MAGIC, self.code, 0, len(data)) + self._encode(data, heads)

    def decode(self, blob: bytes | memoryview) -> bytes:
        flags, length = self._header(blob)
        data = self._decode(memoryview(blob)[HEADER.size:], length)
        if len(data) != length:
            raise ValueError(f"{self.name} block decoded to {len(data)} bytes, its header says {length}")
        return data

    def _header(self, blob: bytes | memoryview) -> tuple[int, int]:
        """The flags and decoded length of a blob of this encoding; ``ValueError`` if it
        is not one."""
        if len(blob) < HEADER.size:
            raise ValueError("encoded block shorter than its header")
        magic, code, flags, length = HEADER.unpack_from(blob)
        if magic != MAGIC or code != self.code:
            raise ValueError(f"not a {self.name} block (header {magic!r}, code {code})")
        return flags, length

    @abstractmethod
    def _encode(self, data: bytes | memoryview, heads: int) -> bytes: ...

    @abstractmethod
    def _decode(self, payload: memoryview, length: int) -> bytes: ...


def shuffle(data: bytes | memoryview) -> bytes:
    """The low bytes of each 16-bit value, then their high bytes (little-endian)."""
    import numpy as np

    values = np.frombuffer(data, np.uint16)
    out = np.empty(len(data), np.uint8)
    np.bitwise_and(values, 0xFF, out=out[:values.size], casting="unsafe")
    np.right_shift(values, 8, out=out[values.size:], casting="unsafe")
    return out.tobytes()


def unshuffle(data: bytes | memoryview) -> bytes:
    """What ``shuffle`` took apart, put back together."""
    import numpy as np

    planes = np.frombuffer(data, np.uint8).reshape(2, -1)
    values = planes[1].astype(np.uint16) << 8
    values |= planes[0]
    return values.tobytes()


class _Lossless(Encoding):
    """A byte codec over the block, shuffled by 2 where its length is even."""

    def encode(self, data, heads=1):
        shuffled = len(data) % 2 == 0 and len(data) > 0
        if shuffled:
            data = shuffle(data)
        return HEADER.pack(MAGIC, self.code, SHUFFLED if shuffled else 0, len(data)) + self._encode(data, heads)

    def decode(self, blob):
        flags, length = self._header(blob)
        data = self._decode(memoryview(blob)[HEADER.size:], length)
        if len(data) != length:
            raise ValueError(f"{self.name} block decoded to {len(data)} bytes, its header says {length}")
        if flags & SHUFFLED:
            data = unshuffle(data)
        return data


class Zstd(_Lossless):
    """zstandard at a fast level (lossless)."""

    name, code = "zstd", 1

    def __init__(self, level: int = 1) -> None:
        import zstandard

        self._level = level
        self._zstd = zstandard
        self._local = threading.local()  # a (de)compressor per thread: they are not thread-safe

    def _codec(self):
        local = self._local
        if not hasattr(local, "c"):
            local.c = self._zstd.ZstdCompressor(level=self._level)
            local.d = self._zstd.ZstdDecompressor()
        return local

    def _encode(self, data, heads):
        return self._codec().c.compress(data)

    def _decode(self, payload, length):
        return self._codec().d.decompress(payload, max_output_size=length)


class LZ4(_Lossless):
    """LZ4 block compression (lossless; faster than zstd, compresses less)."""

    name, code = "lz4", 2

    def __init__(self) -> None:
        import lz4.block

        self._lz4 = lz4.block

    def _encode(self, data, heads):
        return self._lz4.compress(data, store_size=False)

    def _decode(self, payload, length):
        return self._lz4.decompress(payload, uncompressed_size=length)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) as float32 values."""
    import numpy as np

    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), as uint16 bit patterns."""
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _quantize(values: np.ndarray, bits: int, asymmetric: bool) -> bytes:
    """Groups of values (the rows of ``values``, float32) as ``bits``-bit integers (8,
    or 4: two to a byte), after the groups' float16 parameters: asymmetric, a scale and
    a zero point per group (its range over ``2**bits - 1`` and its smallest value;
    integers 0 to ``2**bits - 1``); symmetric, a scale only (its largest magnitude over
    ``2**(bits-1) - 1``; integers that far each side of 0, stored offset by that much).
    ``ValueError`` where a parameter is too large for float16."""
    import numpy as np

    top = (1 << bits) - 1 if asymmetric else (1 << (bits - 1)) - 1
    with np.errstate(over="ignore", invalid="ignore"):  # too large for float16: refused below
        if asymmetric:
            low = values.min(axis=1).astype(np.float16)
            scale = ((values.max(axis=1) - low.astype(np.float32)) / top).astype(np.float16)
            params = np.stack([scale, low], axis=1)
        else:
            scale = (np.abs(values).max(axis=1) / top).astype(np.float16)
            params = scale[:, None]
    if not np.isfinite(params).all():
        raise ValueError("values too large for float16 scales")
    params[:, 0][params[:, 0] == 0] = 1.0
    steps = params[:, :1].astype(np.float32)
    if asymmetric:  # in place: one temporary array of the values' size
        q = values - params[:, 1:].astype(np.float32)
        q /= steps
        np.rint(q, out=q)
        np.clip(q, 0, top, out=q)
    else:
        q = values / steps
        np.rint(q, out=q)
        np.clip(q, -top, top, out=q)
        q += top
    ints = q.astype(np.uint8).reshape(-1)
    if bits == 4:
        ints = ints[0::2] | (ints[1::2] << 4)
    return params.astype("<f2").tobytes() + ints.tobytes()


def _dequantize(blob: memoryview, groups: int, group: int, bits: int,
                asymmetric: bool) -> tuple[np.ndarray, int]:
    """What ``_quantize`` made of ``groups`` groups of ``group`` values: float32 rows,
    and how many bytes of ``blob`` they took. ``ValueError`` if ``blob`` is too short."""
    import numpy as np

    width = 2 if asymmetric else 1
    start = groups * width * 2
    count = groups * group * bits // 8
    if len(blob) < start + count:
        raise ValueError("quantized block shorter than its groups")
    params = np.frombuffer(blob, "<f2", count=groups * width).astype(np.float32).reshape(groups, width)
    packed = np.frombuffer(blob, np.uint8, count=count, offset=start)
    if bits == 4:
        q = np.empty(groups * group, np.float32)
        q[0::2] = packed & 0x0F
        q[1::2] = packed >> 4
    else:
        q = packed.astype(np.float32)
    q = q.reshape(groups, group)
    if asymmetric:  # in place
        q *= params[:, :1]
        q += params[:, 1:]
    else:
        q -= (1 << (bits - 1)) - 1
        q *= params
    return q, start + count


class Grouped(Encoding):
    """LOSSY: bf16 values as ``bits``-bit integers (8, or 4: two to a byte), grouped the
    way KIVI groups them: keys per channel across tokens (keys have outlier channels),
    values per token. Each head of the block is taken as its K half then its V half, as
    vLLM's CPU cache holds a head of a block (``[2 * block_size, head_dim]`` rows: K then
    V); a group is ``k_group`` (32) consecutive values of the K half, or ``v_group`` (64)
    of the V half, with a float16 scale and zero point (``asymmetric``; a scale only
    otherwise). On the CPU backend's ``vec`` kernels (x86 without AMX), the K half is
    channel-major (``[head_dim, block_size]``: each channel's tokens consecutive), so a K
    group is one channel over 32 tokens, and a V group one token's values of a 64-wide
    head; on kernels that pack K otherwise the groups are still runs of one head's K or
    V, only not along a channel. A half that is not whole groups is one group.

    Each value is off by at most half its group's step (plus float16 rounding of the
    parameters). A block whose length is not bf16 K and V halves of equal heads (for 4
    bits, of an even number of values each), or with values that are not finite or too
    large for float16 parameters, is refused with ``ValueError`` (the store then keeps
    it where it was, or drops it)."""

    bits: int
    lossy = True
    _META = struct.Struct(">HIIB")  # heads, K group, V group, asymmetric

    def __init__(self, k_group: int = 32, v_group: int = 64, asymmetric: bool = True) -> None:
        if k_group < 1 or v_group < 1:
            raise ValueError("groups must hold at least 1 value")
        self.k_group, self.v_group, self.asymmetric = k_group, v_group, asymmetric

    def _encode(self, data, heads):
        import numpy as np

        if len(data) % (4 * heads) or not data:
            raise ValueError(f"a block of {len(data)} bytes is not bf16 K and V halves in {heads} equal heads")
        half = len(data) // 4 // heads
        if half * self.bits % 8:
            raise ValueError(f"a half of {half} values cannot be packed {8 // self.bits} to a byte")
        values = bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(heads, 2, half)
        if not np.isfinite(values).all():
            raise ValueError("a block with inf or NaN values cannot be quantized")
        kg, vg = self._groups(half)
        return (self._META.pack(heads, kg, vg, self.asymmetric)
                + _quantize(values[:, 0].reshape(-1, kg), self.bits, self.asymmetric)
                + _quantize(values[:, 1].reshape(-1, vg), self.bits, self.asymmetric))

    def _groups(self, half: int) -> tuple[int, int]:
        return (self.k_group if half % self.k_group == 0 else half,
                self.v_group if half % self.v_group == 0 else half)

    def _decode(self, payload, length):
        import numpy as np

        heads, kg, vg, asymmetric = self._META.unpack_from(payload)
        if not heads or length % (4 * heads):
            raise ValueError(f"{self.name} block with a bad head count")
        half = length // 4 // heads
        if kg < 1 or vg < 1 or half % kg or half % vg:
            raise ValueError(f"{self.name} block with bad group sizes")
        body = payload[self._META.size:]
        k, used = _dequantize(body, heads * half // kg, kg, self.bits, bool(asymmetric))
        v, rest = _dequantize(body[used:], heads * half // vg, vg, self.bits, bool(asymmetric))
        if used + rest != len(body):
            raise ValueError(f"{self.name} block of the wrong size")
        block = np.empty((heads, 2, half), np.float32)
        block[:, 0] = k.reshape(heads, half)
        block[:, 1] = v.reshape(heads, half)
        return f32_to_bf16(block).tobytes()


class Int8(Grouped):
    """LOSSY ``Grouped`` at 8 bits a value. At rest: 0.547 of bf16 (a byte per value, 4
    bytes per group: 1/8 more on K, 1/16 on V; the header). Its code is 5: blocks of
    the earlier int8 (code 3: a scale per 64 values of a head, no zero point) are
    refused, not read as this one, so a store drops them as corrupt (recomputed)."""

    name, code, bits = "int8", 5, 8


class Int4(Grouped):
    """LOSSY ``Grouped`` at 4 bits a value (two to a byte). At rest: 0.297 of bf16 (a
    half byte per value, 4 bytes per group; the header)."""

    name, code, bits = "int4", 4, 4


class NoEncoding(Encoding):
    """The bytes as put: no header, no work (``encode`` and ``decode`` return them)."""

    name, code = "none", 0

    def encode(self, data, heads=1):
        return bytes(data)

    def decode(self, blob):
        return bytes(blob)

    def _encode(self, data, heads):  # pragma: no cover - encode is overridden
        raise NotImplementedError

    def _decode(self, payload, length):  # pragma: no cover - decode is overridden
        raise NotImplementedError


ENCODINGS: dict[str, type[Encoding]] = {"none": NoEncoding, "zstd": Zstd, "lz4": LZ4, "int8": Int8, "int4": Int4}
LOSSY = tuple(name for name, cls in ENCODINGS.items() if cls.lossy)


def make_encoding(name: str) -> Encoding:
    """The encoding called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return ENCODINGS[name]()
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; choose one of {sorted(ENCODINGS)}") from None


def heads_of(key: bytes) -> int:
    """How many KV heads the block under ``key`` holds: its head range where the key is a
    ``BlockKey``, else 1."""
    from kvmesh.kv_store.keys import _KEY, BlockKey

    if len(key) != _KEY.size:
        return 1
    start, end = BlockKey.from_bytes(key).heads
    return max(1, end - start)
