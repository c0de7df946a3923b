"""torch's fused AdamW step with its results written into other tensors: the kernel in adamw_into_kernel.cpp,
built once per machine with torch's extension builder and called through ctypes.

It is used only where it reproduces ``torch.optim.AdamW(fused=True)`` bit for bit, which ``kernel()`` checks
against torch itself on this machine before returning it: losses must not depend on whether snapshots are on.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("adamw_into_kernel.cpp")
_POINTERS = ctypes.POINTER(ctypes.c_void_p)


class FusedAdamWInto:
    """The loaded kernel: one call steps a parameter group's float32 tensors."""

    def __init__(self, library: ctypes.CDLL, lanes: int):
        self._step = library.orchestrate_adamw_into
        self._step.restype = None
        self._step.argtypes = ([ctypes.c_int64] + [_POINTERS] * 7 + [ctypes.POINTER(ctypes.c_int64),
                               ctypes.POINTER(ctypes.c_double)] + [ctypes.c_double] * 5 + [ctypes.c_int])
        self.lanes = lanes  # floats per vector operation (16: AVX-512, 8: AVX2, 0: scalar)

    def step(self, sources: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], grads: Sequence[torch.Tensor],
             targets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: Sequence[float], *,
             lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """Tensor n's (param, exp_avg, exp_avg_sq) ``sources[n]`` and gradient ``grads[n]`` give its new
        values in ``targets[n]``; ``steps[n]`` is its step count after this step's increment."""
        count = len(grads)
        if not count:
            return
        columns = (*zip(*sources), *zip(*targets))  # params, exp_avgs, exp_avg_sqs, then their targets
        addresses = tuple(tuple(t.data_ptr() for t in column) for column in columns)
        source_pointers, target_pointers, numels = _tensor_arguments(addresses, tuple(p.numel() for p in columns[0]))
        self._step(count, *source_pointers, _pointers([g.data_ptr() for g in grads]), *target_pointers, numels,
                   (ctypes.c_double * count)(*steps), lr, beta1, beta2, eps, weight_decay, self.lanes)


def _pointers(addresses: Sequence[int]):
    return ctypes.cast((ctypes.c_void_p * len(addresses))(*addresses), _POINTERS)


# A run steps the same tensors into the same few slots over and over: their arrays are built once. The arrays are
# a function of the key (addresses and sizes), so an entry can never be wrong, only unused.
@functools.lru_cache(maxsize=64)
def _tensor_arguments(addresses: tuple[tuple[int, ...], ...], numels: tuple[int, ...]) -> tuple:
    """The kernel's arguments that only depend on which tensors it steps: the pointer arrays of the sources'
    (param, exp_avg, exp_avg_sq), those of the targets', and the tensors' sizes."""
    pointers = [_pointers(column) for column in addresses]
    return pointers[:3], pointers[3:], (ctypes.c_int64 * len(numels))(*numels)


@functools.cache
def kernel() -> Optional[FusedAdamWInto]:
    """The kernel, or None (the reason logged) when it cannot be built here or its results differ from torch's
    fused AdamW on this machine (another CPU's code path in torch, another compiler)."""
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        build_directory = build_directory_here(cpp_extension)
        with _only_builder_here(build_directory):
            library = _load_or_clear(_build(cpp_extension, build_directory), build_directory)
        candidate = FusedAdamWInto(library, vector_lanes())
    except Exception as err:  # noqa: BLE001 - no compiler or no ninja: snapshots fall back to a copy
        log.info("fused AdamW into snapshot slots unavailable (%s: %s); snapshots copy the state",
                 type(err).__name__, err)
        return None
    mismatch = mismatch_with_torch(candidate)
    if mismatch is not None:
        log.info("fused AdamW into snapshot slots differs from torch's fused AdamW here (%s); snapshots copy the "
                 "state", mismatch)
        return None
    return candidate


def build_directory_here(cpp_extension) -> Path:
    """Where the kernel is built on this machine: under torch's extension root, one directory per torch version
    (the kernel is compiled against its headers)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    directory = Path(root) / f"orchestrate_adamw_into-torch{torch.__version__}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.contextmanager
def _only_builder_here(build_directory: Path):
    """Hold the machine's build lock. Why not only torch's: its builder marks a build with a ``lock`` file that
    a process killed mid-build (a fault, a test's SIGKILL, a cancelled run) leaves behind, and every later load
    then waits on it forever. This lock is an ``flock`` of our own, which the operating system releases when its
    holder dies; while we hold it no other process of ours is in torch's builder, so a ``lock`` file is stale."""
    with open(build_directory / "orchestrate.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        (build_directory / "lock").unlink(missing_ok=True)
        yield


def _build(cpp_extension, build_directory: Path) -> str:
    """The kernel's shared library, built if its source or flags changed since the last build here."""
    return cpp_extension.load(name="orchestrate_adamw_into", sources=[str(SOURCE)], is_python_module=False,
                              build_directory=str(build_directory),
                              extra_cflags=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
                              extra_ldflags=[torch_openmp_runtime() or "-fopenmp"])


def torch_openmp_runtime() -> Optional[str]:
    """The OpenMP runtime torch loaded (its own ``libgomp``, shipped beside it), or None where none is mapped.
    Linked against it, the kernel needs that runtime by its own name, which the loader finds already loaded: its
    parallel regions then run on torch's thread pool (the system's runtime would bring a second pool)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    return paths.pop() if len(paths) == 1 else None


def _load_or_clear(path: str, build_directory: Path) -> ctypes.CDLL:
    """The built library; one that does not load (left half-linked by a builder killed mid-link) is removed with
    the rest of the build, so that the next process builds it anew (this one's builder already counts it built)."""
    try:
        return ctypes.CDLL(path)
    except OSError:
        for entry in build_directory.iterdir():
            if entry.name != "orchestrate.lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        raise


def vector_lanes() -> int:
    """The widest vector code torch itself runs on this CPU (its AVX2 level requires FMA as well), in floats."""
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` package (a dependency) installs it beside the
    interpreter, which is not on PATH when the environment is not activated."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def mismatch_with_torch(candidate: FusedAdamWInto) -> Optional[str]:
    """Step tensors of every length from 1 to 40 and a few longer ones (all the ways a length splits into
    vector blocks and remainder) three times with torch and with ``candidate``; the first difference, or None."""
    sizes = list(range(1, 41)) + [1000, 4099, 65543]
    generator = torch.Generator().manual_seed(0)
    for beta1, weight_decay in ((0.9, 0.1), (0.9, 0.0), (0.3, 0.1)):
        hyper = dict(lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
        reference = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in sizes]
        optimizer = torch.optim.AdamW(reference, lr=hyper["lr"], betas=(beta1, hyper["beta2"]), eps=hyper["eps"],
                                      weight_decay=weight_decay, fused=True)
        mine = [(p.detach().clone(), torch.zeros(n), torch.zeros(n)) for p, n in zip(reference, sizes)]
        for step in range(1, 4):
            grads = [torch.randn(n, generator=generator) * 10.0 ** (step - 2) for n in sizes]
            for param, grad in zip(reference, grads):
                param.grad = grad.clone()
            optimizer.step()
            targets = [tuple(torch.empty(n) for _ in range(3)) for n in sizes]
            candidate.step(mine, grads, targets, [float(step)] * len(sizes), **hyper)
            mine = targets
            for param, (p, m, v) in zip(reference, mine):
                state = optimizer.state[param]
                for name, theirs, ours in (("param", param, p), ("exp_avg", state["exp_avg"], m),
                                           ("exp_avg_sq", state["exp_avg_sq"], v)):
                    if not torch.equal(theirs.detach(), ours):
                        return (f"{name} of a {param.numel()}-element tensor at step {step} (beta1={beta1}, "
                                f"weight_decay={weight_decay})")
    return None
