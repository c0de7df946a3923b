"""Wire formats for compressed synchronisation: what a replica puts on the wire, as real packed bytes.

Every format here turns a flat floating tensor into a ``uint8`` payload plus floating scales, and the bytes that
are counted are exactly ``payload.numel() + scales.numel() * scales.element_size()``.

E3M0 (Streaming DiLoCo's FP4, ``e3m0``): 4 bits per value, two values per byte (even index in the low nibble).
    bit 3 = sign, bits 0-2 = exponent code c. c = 0 encodes zero; c = 1..7 encodes the magnitude 2**(c - 7),
    i.e. {1/64, 1/32, ..., 1/2, 1}, times the block scale. There is no mantissa.
    Scale (the paper leaves it open): one fp32 scale per block of ``block`` consecutive values, the block's
    absolute maximum, so the largest value of every block is exact and the rest round to the nearest power of
    two (nearest in the linear domain; below 1/128 of the scale they round to zero).
int8 (``int8``, optional for DiLoCo): symmetric per-block absmax, q = round(127 * x / absmax) in [-127, 127].
1-bit signs (1-bit Adam): sign+(z) = +1 if z >= 0 else -1, eight signs per byte (bit i of byte k is element
    8k + i, set for +1), with a scale chosen by the caller (1-bit Adam: ||u||_2 / sqrt(numel)).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import math
from dataclasses import dataclass
from typing import Optional

import torch

QUANTIZATIONS = ("none", "int8", "e3m0")
_E3M0_MAX_CODE = 7  # code c means 2**(c - 7); c = 7 is the block scale itself


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_to(flat: torch.Tensor, numel: int) -> torch.Tensor:
    """``flat`` followed by zeros up to ``numel`` elements (a contiguous copy only when padding is needed)."""
    if flat.numel() == numel:
        return flat.contiguous()
    padded = flat.new_zeros(numel)
    padded[: flat.numel()] = flat
    return padded


@dataclass(frozen=True)
class Packed:
    payload: torch.Tensor  # uint8
    scales: torch.Tensor  # one float per block

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + self.scales.numel() * self.scales.element_size()


class BlockQuantizer(ABC):
    """A per-block-scaled format. Inputs to ``encode`` must hold a multiple of ``block`` elements."""

    name = "base"
    bits = 8

    def __init__(self, block: int = 128):
        if block <= 0 or (block * self.bits) % 8:
            multiple = 8 // math.gcd(8, self.bits)
            raise ValueError(f"quantization block={block}: must be a positive multiple of {multiple}")
        self.block = block

    def payload_bytes(self, numel: int) -> int:
        return numel * self.bits // 8

    def encode(self, flat: torch.Tensor) -> Packed:
        if flat.numel() % self.block:
            raise ValueError(f"{flat.numel()} elements is not a multiple of the block size {self.block}")
        blocks = flat.float().view(-1, self.block)
        absmax = blocks.abs().amax(dim=1)
        normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
        return Packed(self._encode_normalised(normalised.reshape(-1)), absmax)

    def decode(self, packed: Packed) -> torch.Tensor:
        """fp32 values, one block per scale."""
        normalised = self._decode_normalised(packed.payload).view(-1, self.block)
        return (normalised * packed.scales[:, None]).reshape(-1)

    @abstractmethod
    def _encode_normalised(self, values: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _decode_normalised(self, payload: torch.Tensor) -> torch.Tensor: ...


class E3M0Quantizer(BlockQuantizer):
    name = "e3m0"
    bits = 4

    def _encode_normalised(self, values: torch.Tensor) -> torch.Tensor:
        magnitude = values.abs()
        mantissa, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2**exponent, mantissa in [0.5, 1)
        floor_log2 = exponent - 1
        rounds_up = mantissa >= 0.75  # magnitude >= 1.5 * 2**floor_log2: the next power of two is nearer
        code = (floor_log2 + rounds_up.to(floor_log2.dtype) + _E3M0_MAX_CODE).clamp(1, _E3M0_MAX_CODE)
        # Between 0 and the smallest level 2**-6 the midpoint 2**-7 decides.
        code = torch.where(magnitude >= 2.0 ** -(_E3M0_MAX_CODE), code, torch.zeros_like(code))
        sign = ((values < 0) & (code > 0)).to(torch.uint8)
        return pack_nibbles(code.to(torch.uint8) | (sign << 3))

    def _decode_normalised(self, payload: torch.Tensor) -> torch.Tensor:
        nibbles = unpack_nibbles(payload)
        code = (nibbles & 7).to(torch.int32)
        magnitude = torch.where(code > 0, torch.ldexp(torch.ones(code.shape), code - _E3M0_MAX_CODE),
                                torch.zeros(code.shape))
        return torch.where((nibbles >> 3).bool(), -magnitude, magnitude)


class Int8Quantizer(BlockQuantizer):
    name = "int8"
    bits = 8

    def _encode_normalised(self, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values * 127).clamp(-127, 127).to(torch.int8).view(torch.uint8)

    def _decode_normalised(self, payload: torch.Tensor) -> torch.Tensor:
        return payload.view(torch.int8).float() / 127


def build_quantizer(name: str, block: int = 128) -> Optional[BlockQuantizer]:
    """None for ``none`` (full precision on the wire)."""
    if name == "none":
        return None
    if name == "e3m0":
        return E3M0Quantizer(block)
    if name == "int8":
        return Int8Quantizer(block)
    raise ValueError(f"quantization={name}: valid: {', '.join(QUANTIZATIONS)}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16, even count -> one byte per pair (even index in the low nibble)."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)


_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack_signs(values: torch.Tensor) -> torch.Tensor:
    """sign+ of each value as one bit (set for >= 0), eight per byte; numel must be a multiple of 8."""
    if values.numel() % 8:
        raise ValueError(f"{values.numel()} signs: pad to a multiple of 8 first")
    bits = (values.reshape(-1, 8) >= 0).to(torch.uint8)
    return (bits * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8).contiguous()


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """+1/-1 per bit of ``packed`` (8 per byte), as ``dtype``."""
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1).to(dtype) * 2 - 1


def sign_scale(values: torch.Tensor) -> torch.Tensor:
    """The 1-bit scale that preserves the l2 norm: ||s * sign+(u)||_2 == ||u||_2."""
    return values.norm() / math.sqrt(values.numel())


def sign_compress(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed signs, scale, error) with values == scale * sign+(values) + error."""
    scale = sign_scale(values)
    packed = pack_signs(values)
    error = values - scale * unpack_signs(packed, values.dtype)
    return packed, scale, error
