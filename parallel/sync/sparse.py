"""SparseLoCo's wire format (arXiv 2508.15706): per-chunk top-k of a flat tensor, the kept values quantised, as
one ``uint8`` message per replica. The bytes counted are exactly the message's bytes.

Chunks: the flat tensor (N elements) is cut into n = ceil(N / C) chunks of C consecutive elements, with
C = min(sparse_chunk, N); the last chunk is padded with zeros. Every chunk keeps its k = max(1, round(density * C))
entries of largest |x| (``torch.topk``), listed by ascending position within the chunk.

The message is the concatenation of these sections, in this order, without headers (every size follows from N, C,
k, bits and dtype, which all replicas share):

    bits = 32 (full precision)
        values     n*k values in the tensor's own dtype (fp32; fp64 for fp64 parameters), raw little-endian
                   bytes, chunk after chunk, by ascending position.
    bits = 2
        levels     n pairs (low, high) of fp32 magnitudes, one pair per chunk.
        codes      n*k 2-bit codes as a bit stream (below): bit 0 = sign (set: negative), bit 1 = level (set: high).
                   A kept value decodes as +-low or +-high, so an exact 0 decodes as +low.
                   Levels: m = mean |v| of the chunk's k kept values; high = mean |v| of those with |v| >= m,
                   low = mean |v| of the others (0 when there are none). Each level is the mean of its bin, as in
                   the reference code's lookup of bin means, but per chunk and sign-symmetric (the reference keeps
                   one 4-entry table and a mean shift per parameter tensor).
    then, for both
        positions  index list, when k * b <= C with b = max(1, ceil(log2 C)): n*k positions within their chunk,
                   b bits each, as a bit stream. Bitmap, when that is smaller (k * b > C): C bits per chunk, bit p
                   of chunk j set when position p is kept.

Bit stream: unsigned integers of ``bits`` bits each, least significant bit first: bit j of integer i is stream bit
i*bits + j, and stream bit s is bit s % 8 of byte s // 8; the last byte is zero-padded.

Size: values (n*k*itemsize) or levels + codes (8n + ceil(2nk / 8)), plus positions (ceil(nkb / 8) or ceil(nC / 8))
bytes. Example, C = 4096, k = 82 (density 0.02), 2 bits: 8 + 20.5 + 123 bytes per 4096 values, 0.92% of fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrate.parallel.quantize import pad_to, round_up

SPARSE_BITS = (2, 32)
_SIGN, _HIGH = 1, 2  # the two bits of a 2-bit code


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers below 2**bits as a bit stream (module docstring), ceil(numel * bits / 8) bytes."""
    values = values.reshape(-1).to(torch.int64)
    stream = torch.zeros(round_up(values.numel() * bits, 8), dtype=torch.uint8)
    per_value = stream[: values.numel() * bits].view(-1, bits)
    for bit in range(bits):
        per_value[:, bit] = (values >> bit) & 1
    per_byte = stream.view(-1, 8)
    packed = torch.zeros(per_byte.shape[0], dtype=torch.uint8)
    for bit in range(8):
        packed |= per_byte[:, bit] << bit
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` integers of a bit stream, as int64."""
    stream = torch.empty(packed.numel(), 8, dtype=torch.uint8)
    for bit in range(8):
        stream[:, bit] = (packed >> bit) & 1
    per_value = stream.view(-1)[: count * bits].view(count, bits)
    values = torch.zeros(count, dtype=torch.int64)
    for bit in range(bits):
        values |= per_value[:, bit].to(torch.int64) << bit
    return values


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def _from_bytes(section: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return section.clone().view(dtype)  # the clone starts at offset 0, so the reinterpretation is aligned


@dataclass(frozen=True)
class SparseCodec:
    """Encodes a flat tensor of ``numel`` elements of ``dtype`` into the message above and decodes it back dense."""

    numel: int
    chunk: int  # C
    k: int  # kept per chunk
    bits: int  # 2, or 32 for values at full precision
    dtype: torch.dtype

    @classmethod
    def build(cls, numel: int, density: float, chunk: int, bits: int, dtype: torch.dtype) -> "SparseCodec":
        if bits not in SPARSE_BITS:
            raise ValueError(f"sparse_bits={bits}: valid: {', '.join(map(str, SPARSE_BITS))}")
        chunk = max(1, min(chunk, numel))  # a small tensor is one chunk, not one padded to sparse_chunk
        return cls(numel, chunk, min(chunk, max(1, round(density * chunk))), bits, dtype)

    @property
    def num_chunks(self) -> int:
        return -(-self.numel // self.chunk)

    @property
    def position_bits(self) -> int:
        return max(1, (self.chunk - 1).bit_length())

    @property
    def uses_bitmap(self) -> bool:
        return self.k * self.position_bits > self.chunk

    @property
    def kept(self) -> int:
        return self.num_chunks * self.k

    @property
    def value_bytes(self) -> int:
        """Values (full precision) or levels and codes (2 bits)."""
        if self.bits == 32:
            return self.kept * self.dtype.itemsize
        return self.num_chunks * 2 * 4 + round_up(self.kept * 2, 8) // 8

    @property
    def position_bytes(self) -> int:
        stream_bits = self.num_chunks * self.chunk if self.uses_bitmap else self.kept * self.position_bits
        return round_up(stream_bits, 8) // 8

    @property
    def nbytes(self) -> int:
        return self.value_bytes + self.position_bytes

    @torch.no_grad()
    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.numel() != self.numel:
            raise ValueError(f"{flat.numel()} elements, but this codec encodes {self.numel}")
        chunks = pad_to(flat.to(self.dtype), self.num_chunks * self.chunk).view(self.num_chunks, self.chunk)
        positions = torch.topk(chunks.abs(), self.k, dim=1, sorted=False).indices.sort(dim=1).values
        values = chunks.gather(1, positions)
        return torch.cat([self._encode_values(values), self._encode_positions(positions)])

    @torch.no_grad()
    def decode(self, message: torch.Tensor) -> torch.Tensor:
        """The dense tensor the message stands for: kept values in place, zeros elsewhere."""
        if message.numel() != self.nbytes:
            raise ValueError(f"a message of {message.numel()} bytes, but this codec's are {self.nbytes}")
        values = self._decode_values(message[: self.value_bytes])
        positions = self._decode_positions(message[self.value_bytes:])
        dense = torch.zeros(self.num_chunks, self.chunk, dtype=self.dtype)
        dense.scatter_(1, positions, values)
        return dense.view(-1)[: self.numel]

    def _encode_values(self, values: torch.Tensor) -> torch.Tensor:
        if self.bits == 32:
            return _as_bytes(values)
        magnitudes = values.abs().to(torch.float32)
        high = magnitudes >= magnitudes.mean(dim=1, keepdim=True)
        levels = torch.stack([_bin_mean(magnitudes, ~high), _bin_mean(magnitudes, high)], dim=1)
        codes = (values < 0).to(torch.uint8) * _SIGN + high.to(torch.uint8) * _HIGH
        return torch.cat([_as_bytes(levels), pack_bits(codes, 2)])

    def _decode_values(self, section: torch.Tensor) -> torch.Tensor:
        if self.bits == 32:
            return _from_bytes(section, self.dtype).view(self.num_chunks, self.k)
        levels = _from_bytes(section[: self.num_chunks * 8], torch.float32).view(self.num_chunks, 2)
        codes = unpack_bits(section[self.num_chunks * 8:], 2, self.kept).view(self.num_chunks, self.k)
        magnitudes = torch.where((codes & _HIGH).bool(), levels[:, 1:], levels[:, :1])
        return torch.where((codes & _SIGN).bool(), -magnitudes, magnitudes).to(self.dtype)

    def _encode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.uses_bitmap:
            return pack_bits(positions, self.position_bits)
        mask = torch.zeros(self.num_chunks, self.chunk, dtype=torch.uint8)
        mask.scatter_(1, positions, 1)
        return pack_bits(mask, 1)

    def _decode_positions(self, section: torch.Tensor) -> torch.Tensor:
        if not self.uses_bitmap:
            return unpack_bits(section, self.position_bits, self.kept).view(self.num_chunks, self.k)
        mask = unpack_bits(section, 1, self.num_chunks * self.chunk).view(self.num_chunks, self.chunk)
        return mask.nonzero()[:, 1].view(self.num_chunks, self.k)  # row-major: ascending within each chunk


def _bin_mean(magnitudes: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of the magnitudes in the bin (0 for an empty bin)."""
    total = torch.where(members, magnitudes, torch.zeros_like(magnitudes)).sum(dim=1)
    return total / members.sum(dim=1).clamp(min=1).to(magnitudes.dtype)
