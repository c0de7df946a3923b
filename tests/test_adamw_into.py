"""The AdamW step that writes into the next snapshot's slot: bit-identical to ``optimizer.step()``."""
import copy
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import cpp_extension

from orchestrate.checkpoint import fused_adamw_into
from orchestrate.checkpoint.adamw_into import step_into, unsupported_reason


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 4))


def _adamw(model: torch.nn.Module, **options) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, **(options or {"foreach": False}))


def _slot_views(params, slot: np.ndarray) -> dict:
    """(param, exp_avg, exp_avg_sq, step) views of one uint8 buffer per parameter, 64-byte aligned, as an arena
    lays them out."""
    flat, offset, views = torch.from_numpy(slot), 0, {}
    for param in params:
        outs = []
        for shape in (param.shape, param.shape, param.shape, ()):
            nbytes = torch.Size(shape).numel() * 4
            outs.append(flat[offset:offset + nbytes].view(torch.float32).reshape(shape))
            offset += -(-nbytes // 64) * 64
        views[param] = tuple(outs)
    return views


@pytest.mark.parametrize("kernel", [{"foreach": False}, {"fused": True}], ids=["single-tensor", "fused"])
def test_step_into_slots_matches_torch_adamw_bit_for_bit(kernel):
    reference, moved = _model(), _model()
    reference_opt, moved_opt = _adamw(reference, **kernel), _adamw(moved, **kernel)
    slots = [_slot_views(list(moved.parameters()), np.zeros(1 << 16, dtype=np.uint8)) for _ in range(3)]
    inputs = torch.randn(8, 16)
    frozen_at = {3, 4}  # steps where the last layer has no gradient: torch skips it, so must step_into
    steps = 11  # the last three steps go between slots as earlier steps did (the fused step reuses its arguments)
    for step in range(steps):
        for model, optimizer in ((reference, reference_opt), (moved, moved_opt)):
            optimizer.zero_grad(set_to_none=True)
            model(inputs).pow(2).mean().backward()
            if step in frozen_at:
                model[2].weight.grad = model[2].bias.grad = None
        reference_opt.step()
        # slot 0 twice in a row at the start: a target that is the tensor it replaces (the in-place case)
        targets = slots[max(0, step - 1) % 3]
        before = {p: p.detach().clone() for p in moved.parameters()}
        steps_before = {p: s["step"].clone() for p, s in moved_opt.state.items()}
        updated = step_into(moved_opt, targets)
        assert len(updated) == (4 if step in frozen_at else 6)
        with torch.no_grad():
            for param in updated:
                state = moved_opt.state[param]
                if targets[param][0].data_ptr() != param.data_ptr():
                    # the old tensors are left as they were
                    assert torch.equal(param, before[param])
                    assert torch.equal(state["step"], steps_before.get(param, torch.tensor(0.0)))
                param.data, state["exp_avg"].data, state["exp_avg_sq"].data, state["step"].data = targets[param]
    for mine, theirs in zip(moved.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moved_opt.state[mine][key], reference_opt.state[theirs][key])
    assert moved[0].weight.data_ptr() == slots[(steps - 2) % 3][moved[0].weight][0].data_ptr()


@pytest.mark.parametrize("build, reason", [
    (lambda m: torch.optim.AdamW(m.parameters(), foreach=True), "foreach=True"),
    (lambda m: torch.optim.AdamW(m.parameters(), amsgrad=True, foreach=False), "amsgrad=True"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "not AdamW"),
    (lambda m: torch.optim.Adam(m.parameters(), weight_decay=0.1, foreach=False), "coupled weight decay"),
])
def test_optimizers_it_cannot_stand_in_for_are_named(build, reason):
    assert reason in unsupported_reason(build(_model()))
    assert unsupported_reason(_adamw(_model())) is None
    assert unsupported_reason(_adamw(_model(), fused=True)) is None


def test_the_fused_kernel_runs_torch_s_vector_width_and_every_width_it_has_matches_torch():
    """The kernel takes the vector code torch itself runs here (the scalar loop is ~3x slower than torch's own
    step), and its scalar and vector paths each give torch's fused AdamW bit for bit on every tensor length."""
    kernel = fused_adamw_into.kernel()
    assert kernel is not None
    assert kernel.lanes == fused_adamw_into.vector_lanes()
    assert kernel.lanes == {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)
    for lanes in sorted({0, kernel.lanes}):
        candidate = copy.copy(kernel)
        candidate.lanes = lanes
        assert fused_adamw_into.mismatch_with_torch(candidate) is None, f"{lanes} lanes"


def _cpu_seconds_by_thread() -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def test_the_fused_kernel_runs_on_torch_s_own_threads():
    """One OpenMP runtime in the process (torch's), and the kernel's parallel work done by the threads torch's
    own kernels run on, not by threads started per call (whose start and exit interrupt the training)."""
    kernel = fused_adamw_into.kernel()
    assert kernel is not None
    assert fused_adamw_into.torch_openmp_runtime() is not None  # exactly one libgomp mapped
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n = 1 << 22
        sources = [(torch.randn(n), torch.randn(n), torch.rand(n))]
        targets = [tuple(torch.empty(n) for _ in range(3))]
        torch.ones(n).mul_(2)  # torch's own threads exist from here on
        before = _cpu_seconds_by_thread()
        for step in range(1, 41):
            kernel.step(sources, [torch.randn(n)], targets, [float(step)], lr=1e-3, beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.1)
        after = _cpu_seconds_by_thread()
    finally:
        torch.set_num_threads(threads)
    helpers = {tid: after[tid] - before[tid] for tid in before if tid in after and tid != threading.get_native_id()}
    assert max(helpers.values()) >= 0.05, helpers


_LOAD_KERNEL = "from orchestrate.checkpoint import fused_adamw_into; print(fused_adamw_into.kernel().lanes)"


def test_a_builder_killed_mid_build_does_not_stall_the_next_one(tmp_path, monkeypatch):
    """A worker SIGKILLed while it builds the kernel (a fault, a cancelled run) leaves torch's build marker
    behind; the next process to load the kernel builds and loads it instead of waiting on the marker forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    env = dict(os.environ)
    marker = fused_adamw_into.build_directory_here(cpp_extension) / "lock"
    builder = subprocess.Popen([sys.executable, "-c", _LOAD_KERNEL], env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and builder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    builder.kill()
    builder.wait()
    assert marker.exists(), "the builder finished before it could be killed mid-build"
    loaded = subprocess.run([sys.executable, "-c", _LOAD_KERNEL], env=env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert int(loaded.stdout) == fused_adamw_into.vector_lanes()
