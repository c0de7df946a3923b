"""Reed-Solomon erasure coding over byte buffers: k data shards + m parity shards.

Any k of the n = k + m shards rebuild the data, so a group survives the loss of any m shards at a memory
overhead of n / k. The generator is ISA-L's Cauchy matrix [I_k; C] with C[i][j] = 1 / (i XOR j) over
GF(2^8) (polynomial 0x11d); every k x k submatrix of it is invertible.

Two kernels compute "output rows = matrix x input shards":
  * ISA-L, loaded from the copy bundled in the pyeclib wheel and called through ctypes on the shards' own
    memory (~18 GB/s, faster than memcpy). No maintained Python binding exposes ISA-L's erasure code
    without copying into `bytes`, hence ctypes by hand.
  * numpy table lookups (~0.5 GB/s): the test oracle, and the fallback when no ISA-L is found.

Shards are any C-contiguous buffers (numpy arrays, CPU torch tensors, bytearray, memoryview); they are
viewed as uint8, never copied.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- GF(2^8) arithmetic (numpy, reference)

_POLY = 0x11D  # x^8 + x^4 + x^3 + x^2 + 1, the field ISA-L uses


def _exp_log_tables() -> tuple[np.ndarray, np.ndarray]:
    exp, logt = np.zeros(512, dtype=np.int32), np.zeros(256, dtype=np.int32)
    x = 1
    for power in range(255):
        exp[power], logt[x] = x, power
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    exp[255:510] = exp[:255]
    return exp, logt


_EXP, _LOG = _exp_log_tables()


def _mul_table() -> np.ndarray:
    """MUL[a][b] = a * b in GF(2^8); row a is the lookup table that multiplies a whole shard by a."""
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    product = _EXP[_LOG[a] + _LOG[b]].astype(np.uint8)
    product[(a == 0) | (b == 0)] = 0
    return product


GF_MUL = _mul_table()


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(_EXP[255 - _LOG[a]])


def cauchy_generator(k: int, m: int) -> np.ndarray:
    """The (k+m) x k generator, identical to ISA-L's gf_gen_cauchy1_matrix."""
    rows = np.zeros((k + m, k), dtype=np.uint8)
    rows[:k] = np.eye(k, dtype=np.uint8)
    for i in range(k, k + m):
        for j in range(k):
            rows[i, j] = gf_inv(i ^ j)
    return rows


def gf_invert_matrix(matrix: np.ndarray) -> np.ndarray:
    """Gauss-Jordan inversion over GF(2^8); rows are added with XOR."""
    size = matrix.shape[0]
    work = np.concatenate([matrix.astype(np.uint8), np.eye(size, dtype=np.uint8)], axis=1)
    for col in range(size):
        pivot = next((r for r in range(col, size) if work[r, col]), None)
        if pivot is None:
            raise ValueError("matrix is singular over GF(2^8)")
        work[[col, pivot]] = work[[pivot, col]]
        work[col] = GF_MUL[gf_inv(int(work[col, col]))][work[col]]
        for r in range(size):
            if r != col and work[r, col]:
                work[r] ^= GF_MUL[work[r, col]][work[col]]
    return np.ascontiguousarray(work[:, size:])


# ---------------------------------------------------------------- kernels: outputs = matrix x inputs


class NumpyKernel:
    name = "numpy"

    def generator(self, k: int, m: int) -> np.ndarray:
        return cauchy_generator(k, m)

    def invert(self, matrix: np.ndarray) -> np.ndarray:
        return gf_invert_matrix(matrix)

    def prepare(self, matrix: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(matrix, dtype=np.uint8)

    def apply(self, prepared: np.ndarray, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        for row, out in zip(prepared, outputs):
            out[:] = 0
            for coefficient, shard in zip(row, inputs):
                if coefficient == 1:
                    out ^= shard
                elif coefficient:
                    out ^= GF_MUL[coefficient][shard]


_REQUIRED_SYMBOLS = ("ec_init_tables", "ec_encode_data", "gf_gen_cauchy1_matrix", "gf_invert_matrix")
# ec_encode_data takes an int length; longer shards are encoded in slices of this many bytes
_MAX_SLICE = 1 << 30


def _pyeclib_candidates() -> list[str]:
    """libisal files shipped with pyeclib: listed in its wheel RECORD, or next to its package directory.

    auditwheel renames the bundled file (libisal-pyeclib.so.2) and picks the folder (pyeclib.libs,
    .libs, .dylibs), so match by prefix rather than by a fixed path.
    """
    found: list[str] = []
    try:
        recorded = importlib.metadata.files("pyeclib") or ()
    except importlib.metadata.PackageNotFoundError:
        recorded = ()
    found += [str(file.locate()) for file in recorded if os.path.basename(str(file)).startswith("libisal")]
    spec = importlib.util.find_spec("pyeclib")
    for package_dir in (spec.submodule_search_locations or []) if spec else []:
        site = os.path.dirname(package_dir)
        for pattern in ("pyeclib.libs/libisal*", "pyeclib/.libs/libisal*", "pyeclib/.dylibs/libisal*", ".libs/libisal*"):
            found.extend(glob.glob(os.path.join(site, pattern)))
    return list(dict.fromkeys(found))


def _library_candidates() -> list[str]:
    candidates = _pyeclib_candidates()
    system = ctypes.util.find_library("isal")  # e.g. Debian libisal2: older, slower kernels
    return candidates + ([system] if system else [])


def _open_isal(path: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    if not all(hasattr(lib, symbol) for symbol in _REQUIRED_SYMBOLS):
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.ec_init_tables.argtypes = [integer, integer, pointer, pointer]
    lib.ec_encode_data.argtypes = [integer, integer, integer, pointer, pointer, pointer]
    lib.gf_gen_cauchy1_matrix.argtypes = [pointer, integer, integer]
    lib.gf_invert_matrix.argtypes = [pointer, pointer, integer]
    lib.gf_invert_matrix.restype = integer
    for function in (lib.ec_init_tables, lib.ec_encode_data, lib.gf_gen_cauchy1_matrix):
        function.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def load_isal() -> tuple[ctypes.CDLL, str] | None:
    """The first usable ISA-L and its path, or None (warned about once)."""
    for path in _library_candidates():
        lib = _open_isal(path)
        if lib is not None:
            return lib, path
    log.warning("ISA-L not found (looked in the pyeclib wheel and the system); "
                "erasure coding falls back to numpy at well under 1 GB/s")
    return None


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _pointer_array(addresses: list[int]) -> ctypes.Array:
    return (ctypes.c_void_p * len(addresses))(*addresses)


class IsalKernel:
    name = "isal"

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path

    def generator(self, k: int, m: int) -> np.ndarray:
        matrix = np.empty((k + m, k), dtype=np.uint8)
        self.lib.gf_gen_cauchy1_matrix(_address(matrix), k + m, k)
        return matrix

    def invert(self, matrix: np.ndarray) -> np.ndarray:
        scratch = np.array(matrix, dtype=np.uint8, order="C")  # ISA-L destroys its input
        inverse = np.empty_like(scratch)
        if self.lib.gf_invert_matrix(_address(scratch), _address(inverse), scratch.shape[0]) != 0:
            raise ValueError("matrix is singular over GF(2^8)")
        return inverse

    def prepare(self, matrix: np.ndarray) -> tuple[int, int, np.ndarray]:
        """Expand the matrix into ISA-L's 32-bytes-per-coefficient multiplication tables."""
        rows, cols = matrix.shape
        tables = np.empty(32 * rows * cols, dtype=np.uint8)
        coefficients = np.ascontiguousarray(matrix, dtype=np.uint8)
        self.lib.ec_init_tables(cols, rows, _address(coefficients), _address(tables))
        return rows, cols, tables

    def apply(self, prepared: tuple[int, int, np.ndarray], inputs: list[np.ndarray],
              outputs: list[np.ndarray]) -> None:
        rows, cols, tables = prepared
        length = inputs[0].nbytes
        in_base = [_address(shard) for shard in inputs]
        out_base = [_address(shard) for shard in outputs]
        for start in range(0, length, _MAX_SLICE):
            span = min(_MAX_SLICE, length - start)
            self.lib.ec_encode_data(span, cols, rows, _address(tables),
                                    _pointer_array([a + start for a in in_base]),
                                    _pointer_array([a + start for a in out_base]))


def default_kernel() -> IsalKernel | NumpyKernel:
    found = load_isal()
    return IsalKernel(*found) if found else NumpyKernel()


# ---------------------------------------------------------------- buffers


def as_bytes(buffer, *, writable: bool = False) -> np.ndarray:
    """A flat uint8 numpy view of a C-contiguous buffer (numpy, CPU torch tensor, bytearray, ...), no copy."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buffer, torch.Tensor):
        if buffer.device.type != "cpu" or not buffer.is_contiguous():
            raise ValueError("torch shards must be contiguous CPU tensors")
        buffer = buffer.detach().reshape(-1).view(torch.uint8).numpy()
    array = np.asarray(buffer) if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
    if not array.flags.c_contiguous:
        raise ValueError("shards must be C-contiguous")
    if writable and not array.flags.writeable:
        raise ValueError("output shards must be writable")
    return array.reshape(-1).view(np.uint8)


@dataclass(frozen=True)
class ShardLayout:
    """How a buffer of total_len bytes was cut into k shards of shard_len bytes (the tail zero-padded)."""
    k: int
    shard_len: int
    total_len: int

    @property
    def padding(self) -> int:
        return self.k * self.shard_len - self.total_len


def split_into_shards(buffer, k: int) -> tuple[list[np.ndarray], ShardLayout]:
    """Cut a buffer into k equal shards. Full shards are views; only shards that hit the end are copied."""
    data = as_bytes(buffer)
    layout = ShardLayout(k, -(-data.nbytes // k), data.nbytes)
    shards = []
    for i in range(k):
        piece = data[i * layout.shard_len:(i + 1) * layout.shard_len]
        if piece.nbytes < layout.shard_len:
            padded = np.zeros(layout.shard_len, dtype=np.uint8)
            padded[:piece.nbytes] = piece
            piece = padded
        shards.append(piece)
    return shards, layout


def join_shards(data_shards: list, layout: ShardLayout, out=None) -> np.ndarray:
    """Concatenate the k data shards into out (or a new array), dropping the padding."""
    target = np.empty(layout.total_len, dtype=np.uint8) if out is None else as_bytes(out, writable=True)
    if target.nbytes != layout.total_len:
        raise ValueError(f"output holds {target.nbytes} bytes, layout needs {layout.total_len}")
    for i, shard in enumerate(data_shards):
        start = i * layout.shard_len
        span = max(0, min(layout.shard_len, layout.total_len - start))
        target[start:start + span] = as_bytes(shard)[:span]
    return target


# ---------------------------------------------------------------- the codec


class ReedSolomon:
    """k data + m parity shards; any k of the n = k + m shards rebuild the data."""

    _DECODE_CACHE_SIZE = 64

    def __init__(self, k: int, m: int, kernel: IsalKernel | NumpyKernel | None = None):
        if k < 1 or m < 1 or k + m > 256:
            raise ValueError(f"need k >= 1, m >= 1 and k + m <= 256, got k={k}, m={m}")
        self.k, self.m, self.n = k, m, k + m
        self.kernel = kernel or default_kernel()
        self.generator = self.kernel.generator(k, m)
        self._encode_plan = self.kernel.prepare(self.generator[k:])
        self._decode_plans: dict[tuple, object] = {}
        self._decode_plans_lock = threading.Lock()  # keepers may rebuild several stripes on threads

    @property
    def backend(self) -> str:
        return self.kernel.name

    @property
    def memory_overhead(self) -> float:
        return self.n / self.k

    def encode(self, data_shards: list) -> list[np.ndarray]:
        """The m parity shards of k equal-length data shards, in new arrays."""
        length = self._shard_length(data_shards, self.k, "data")
        parity = [np.empty(length, dtype=np.uint8) for _ in range(self.m)]
        self.encode_into(data_shards, parity)
        return parity

    def encode_into(self, data_shards: list, parity_shards: list) -> None:
        """Write the parity of data_shards into the m preallocated parity_shards."""
        length = self._shard_length(data_shards, self.k, "data")
        inputs = [as_bytes(shard) for shard in data_shards]
        outputs = [as_bytes(shard, writable=True) for shard in parity_shards]
        if len(outputs) != self.m or any(out.nbytes != length for out in outputs):
            raise ValueError(f"need {self.m} parity buffers of {length} bytes")
        if length:
            self.kernel.apply(self._encode_plan, inputs, outputs)

    def decode(self, shards: dict, shard_len: int, out: dict | None = None) -> list:
        """The k data shards, rebuilding lost ones from any k survivors.

        shards maps shard index (0..k-1 data, k..n-1 parity) to buffer. Surviving data shards are returned
        as given; rebuilt ones are written into out[index] when provided, else into new arrays.
        """
        self._check_survivors(shards, shard_len)
        missing = [i for i in range(self.k) if i not in shards]
        if not missing:
            return [shards[i] for i in range(self.k)]
        survivors = sorted(shards)[:self.k]  # data shards first: their rows are cheap identity rows
        out = out or {}
        rebuilt = {i: as_bytes(out[i], writable=True) if i in out else np.empty(shard_len, dtype=np.uint8)
                   for i in missing}
        if any(buf.nbytes != shard_len for buf in rebuilt.values()):
            raise ValueError(f"output buffers must hold {shard_len} bytes")
        if shard_len:
            plan = self._decode_plan(tuple(survivors), tuple(missing))
            self.kernel.apply(plan, [as_bytes(shards[i]) for i in survivors], [rebuilt[i] for i in missing])
        return [rebuilt[i] if i in rebuilt else shards[i] for i in range(self.k)]

    def _decode_plan(self, survivors: tuple, missing: tuple):
        key = (survivors, missing)
        with self._decode_plans_lock:
            if key not in self._decode_plans:
                if len(self._decode_plans) >= self._DECODE_CACHE_SIZE:
                    self._decode_plans.pop(next(iter(self._decode_plans)))
                inverse = self.kernel.invert(self.generator[list(survivors)])
                self._decode_plans[key] = self.kernel.prepare(inverse[list(missing)])
            return self._decode_plans[key]

    def _check_survivors(self, shards: dict, shard_len: int) -> None:
        bad = [i for i in shards if not 0 <= i < self.n]
        if bad:
            raise ValueError(f"shard indices {bad} outside 0..{self.n - 1}")
        lost = self.n - len(shards)
        if lost > self.m:
            raise ValueError(f"lost {lost} of {self.n} shards; group of k={self.k}, m={self.m} "
                             f"survives at most {self.m}")
        for index, shard in shards.items():
            if as_bytes(shard).nbytes != shard_len:
                raise ValueError(f"shard {index} holds {as_bytes(shard).nbytes} bytes, expected {shard_len}")

    @staticmethod
    def _shard_length(shards: list, count: int, kind: str) -> int:
        lengths = {as_bytes(shard).nbytes for shard in shards}
        if len(shards) != count or len(lengths) != 1:
            raise ValueError(f"need {count} {kind} shards of equal length, got {len(shards)} "
                             f"with lengths {sorted(lengths)}")
        return lengths.pop()
