"""Erasure-coding throughput against memcpy on the same buffer.

    .venv/bin/python -m benchmarks.erasure [--mib 256] [--repeats 7]

GB/s = bytes of data / wall time (GB = 1e9), median of the repeats after a warm-up. encode, decode and
memcpy run interleaved in each repeat so machine noise hits them alike. Decode rebuilds data shards 0
and 1 from the two parity shards. All buffers are preallocated and touched before timing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from orchestrate.checkpoint.erasure import NumpyKernel, ReedSolomon, split_into_shards

MIB = 1 << 20


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median_gbps(nbytes: int, timings: list[float]) -> float:
    return nbytes / statistics.median(timings) / 1e9


def measure(codec: ReedSolomon, buffer: np.ndarray, repeats: int) -> dict[str, float]:
    data, layout = split_into_shards(buffer, codec.k)
    parity = [np.ones(layout.shard_len, dtype=np.uint8) for _ in range(codec.m)]
    rebuilt = {i: np.ones(layout.shard_len, dtype=np.uint8) for i in (0, 1)}
    copy_target = np.ones_like(buffer)

    codec.encode_into(data, parity)
    survivors = {i: shard for i, shard in enumerate(data + parity) if i not in rebuilt}
    actions = {
        "memcpy": lambda: np.copyto(copy_target, buffer),
        "encode": lambda: codec.encode_into(data, parity),
        "decode": lambda: codec.decode(survivors, layout.shard_len, out=rebuilt),
    }
    timings: dict[str, list[float]] = {name: [] for name in actions}
    for round_ in range(repeats + 1):
        for name, action in actions.items():
            elapsed = seconds(action)
            if round_:  # round 0 is the warm-up
                timings[name].append(elapsed)
    assert all(np.array_equal(rebuilt[i], data[i]) for i in rebuilt), "decode produced wrong bytes"
    return {name: median_gbps(buffer.nbytes, values) for name, values in timings.items()}


def table(codec: ReedSolomon, nbytes: int, native: dict[str, float], oracle: dict[str, float],
          oracle_bytes: int) -> str:
    memcpy = native["memcpy"]
    lines = [
        f"k={codec.k} m={codec.m}, {nbytes // MIB} MiB, backend `{codec.backend}`, "
        f"memory overhead n/k = {codec.memory_overhead:.2f}",
        "",
        "| operation | GB/s | / memcpy |",
        "|---|---|---|",
        f"| memcpy (numpy copyto, preallocated) | {memcpy:.2f} | 1.00 |",
        f"| encode ({codec.backend}) | {native['encode']:.2f} | {native['encode'] / memcpy:.2f} |",
        f"| decode, 2 data shards lost ({codec.backend}) | {native['decode']:.2f} | "
        f"{native['decode'] / memcpy:.2f} |",
        f"| memcpy ({oracle_bytes // MIB} MiB, reference for the oracle rows) | {oracle['memcpy']:.2f} | 1.00 |",
        f"| encode (numpy oracle, {oracle_bytes // MIB} MiB) | {oracle['encode']:.3f} | "
        f"{oracle['encode'] / oracle['memcpy']:.3f} |",
        f"| decode (numpy oracle, {oracle_bytes // MIB} MiB) | {oracle['decode']:.3f} | "
        f"{oracle['decode'] / oracle['memcpy']:.3f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--oracle-mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    buffer = rng.integers(0, 256, args.mib * MIB, dtype=np.uint8)
    codec = ReedSolomon(4, 2)
    native = measure(codec, buffer, args.repeats)

    oracle_buffer = buffer[:args.oracle_mib * MIB]
    oracle = measure(ReedSolomon(4, 2, NumpyKernel()), oracle_buffer, max(1, args.repeats // 3))
    print(table(codec, buffer.nbytes, native, oracle, oracle_buffer.nbytes))


if __name__ == "__main__":
    main()
