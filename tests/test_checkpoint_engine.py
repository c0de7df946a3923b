import threading

import pytest
import torch

from orchestrate.checkpoint.arena import HostArena
from orchestrate.checkpoint.engine import CheckpointEngine, UniversalPersister, _StateFreezer
from orchestrate.checkpoint.fragments import load_model, load_optimizer, model_fragments, optimizer_fragments
from orchestrate.checkpoint.universal import (CheckpointError, FragmentSpec, TrainerState, committed_versions,
                                  latest_version_dir, read_manifest)


def _state(n=3, numel=1 << 20):
    return {f"t{i}": torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)}


def _fragments(state):
    return [FragmentSpec.whole(name, tensor) for name, tensor in state.items()]


def _simulated_step(size=256):
    a = torch.randn(size, size)
    for _ in range(4):
        a = torch.tanh(a @ a / size)
    return a


class RecordingPersister:
    """A stand-in for the disk level: records what it was handed, optionally holding on until released."""

    def __init__(self, hold=False):
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.started = threading.Event()
        self.calls = []
        self.closed = False

    def persist(self, version, fragments, trainer_state):
        self.started.set()
        self.calls.append((version, {f.name: f.tensor.clone() for f in fragments}, trainer_state,
                           threading.get_ident()))
        assert self.release.wait(timeout=60)

    def close(self):
        self.closed = True


def test_arena_reuses_buffers_and_reallocates_on_shape_or_dtype_change():
    arena = HostArena()
    state = {"a": torch.ones(4, 3), "b": torch.zeros(5)}
    arena.copy_from(state)
    first = dict(arena.buffers)
    state["a"].add_(1)
    arena.copy_from(state)
    assert arena.allocations == 2 and arena.buffers["a"] is first["a"]
    assert torch.equal(arena.buffers["a"], state["a"]) and arena.buffers["a"].data_ptr() != state["a"].data_ptr()
    arena.copy_from({"a": torch.ones(4, 3, dtype=torch.float64), "b": torch.zeros(6)})
    assert arena.allocations == 4 and arena.buffers["a"].dtype == torch.float64
    arena.copy_from({"b": torch.zeros(6)})
    assert set(arena.buffers) == {"b"} and arena.allocations == 4 and arena.nbytes == 24


def test_a_full_host_arena_spares_the_version_a_recovery_rolls_back_to():
    arena = HostArena(slots=3)
    arena.reported_step = 1  # the controller took the report of step 1, then fell behind
    for version in range(1, 7):
        arena.copy_version(version, _fragments({"w": torch.full((3,), float(version))}), version)
    assert arena.versions() == [1, 5, 6]
    assert torch.equal(arena.held(1)[0]["w@0"], torch.full((3,), 1.0))
    arena.reported_step = None  # without one, the oldest makes room
    arena.copy_version(7, _fragments({"w": torch.zeros(3)}), 7)
    assert arena.versions() == [5, 6, 7]


def test_snapshot_copies_in_background_and_keeps_the_state_of_snapshot_time():
    live = _state()
    at_snapshot = {name: tensor.clone() for name, tensor in live.items()}
    engine = CheckpointEngine(HostArena(), every=1)
    assert engine.snapshot(1, lambda: _fragments(live))
    _simulated_step()  # forward/backward overlaps the copy; it only reads the live tensors
    engine.wait_until_copied()
    for tensor in live.values():  # the optimizer step, allowed only after wait_until_copied
        tensor.add_(1.0)
    assert engine.copied_version == 1
    for name, expected in at_snapshot.items():
        assert torch.equal(engine.arena.buffers[f"{name}@0"], expected), name
    stats = engine.stats[-1]
    assert stats.version == 1 and stats.copy_s > 0 and stats.blocked_s >= 0 and stats.persist_s is None
    engine.close()


def test_snapshot_returns_while_the_copy_is_held_back_and_persistence_runs_on_another_thread():
    persister = RecordingPersister(hold=True)
    live = _state(n=2, numel=1024)
    engine = CheckpointEngine(HostArena(), every=1, persist_every=1, persister=persister)
    engine.snapshot(1, lambda: _fragments(live), TrainerState(step=1, samples_consumed=8))
    engine.wait_until_copied()
    assert persister.started.wait(timeout=60)
    live["t0"].fill_(2.0)
    # version 1 is still being persisted from the arena, so version 2's copy must wait for it: the
    # snapshot call returns anyway and the trainer keeps computing
    assert engine.snapshot(2, lambda: _fragments(live))
    _simulated_step()
    assert engine.copied_version == 1
    persister.release.set()
    engine.wait_until_copied()
    assert engine.copied_version == 2 and torch.all(engine.arena.buffers["t0@0"] == 2.0)
    engine.close()
    assert persister.closed and [call[0] for call in persister.calls] == [1, 2]
    version, tensors, trainer_state, thread = persister.calls[0]
    assert thread != threading.get_ident()
    assert trainer_state.samples_consumed == 8 and not torch.all(tensors["t0"] == 2.0)


def test_only_every_kth_snapshot_is_persisted_and_persist_errors_surface():
    persister = RecordingPersister()
    engine = CheckpointEngine(HostArena(), every=2, persist_every=3, persister=persister)
    live = _state(n=1, numel=16)
    taken = [step for step in range(1, 13) if engine.snapshot(step, lambda: _fragments(live))]
    engine.close()
    assert taken == [2, 4, 6, 8, 10, 12] and [call[0] for call in persister.calls] == [6, 12]

    class FailingPersister(RecordingPersister):
        def persist(self, version, fragments, trainer_state):
            raise OSError(f"disk full while writing version {version}")

    engine = CheckpointEngine(HostArena(), every=1, persist_every=1, persister=FailingPersister())
    engine.snapshot(1, lambda: _fragments(live))
    engine.wait_until_copied()
    engine.snapshot(2, lambda: _fragments(live))
    with pytest.raises(OSError, match="version 1"):
        engine.wait_until_copied()
    engine.close()


def test_config_is_validated_with_the_key_name():
    with pytest.raises(CheckpointError, match=r"checkpoint\.every=0"):
        CheckpointEngine(HostArena(), every=0)
    with pytest.raises(CheckpointError, match="needs a persister"):
        CheckpointEngine(HostArena(), persist_every=1)


def test_the_trainer_state_s_config_is_frozen_once_per_config_object():
    """A run passes the same config object with every snapshot: it is copied once, so a change made to that
    object in place is not seen; another config object is copied anew."""
    freeze = _StateFreezer()
    config = {"optim": {"lr": 0.01}}
    first = freeze(TrainerState(step=1, samples_consumed=5, config=config))
    config["optim"]["lr"] = 0.02
    second = freeze(TrainerState(step=2, samples_consumed=10, config=config))
    assert second.config is first.config and second.config == {"optim": {"lr": 0.01}} and first.config is not config
    assert (second.step, second.samples_consumed) == (2, 10)  # the rest is copied on every snapshot
    third = freeze(TrainerState(step=3, config={"optim": {"lr": 0.03}}))
    assert third.config == {"optim": {"lr": 0.03}} and first.config == {"optim": {"lr": 0.01}}


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))


def _train_step(model, optimizer, step):
    inputs = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
    model(inputs).square().mean().backward()


def test_training_loop_persists_to_disk_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine = CheckpointEngine(HostArena(), every=2, persist_every=2, persister=UniversalPersister(tmp_path, keep=1))
    at_step = {}
    for step in range(1, 9):
        _train_step(model, optimizer, step)
        engine.wait_until_copied()
        optimizer.step()
        optimizer.zero_grad()
        at_step[step] = [p.detach().clone() for p in model.parameters()]
        engine.snapshot(step, lambda: model_fragments(model) + optimizer_fragments(model, optimizer),
                        TrainerState(step=step, samples_consumed=5 * step, config={"lr": 0.01}))
    engine.close()
    assert committed_versions(tmp_path) == [8] and engine.persister.committed_version == 8
    assert engine.stats[-1].persist_s is not None and engine.stats[-2].persist_s is None

    latest = latest_version_dir(tmp_path)
    manifest = read_manifest(latest)
    assert manifest.trainer_state.samples_consumed == 40 and manifest.trainer_state.config == {"lr": 0.01}
    resumed = _mlp()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    load_model(latest, resumed, manifest)
    load_optimizer(latest, resumed, resumed_optimizer, manifest)
    for expected, actual in zip(at_step[8], resumed.parameters()):
        assert torch.equal(expected, actual)
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        _train_step(net, opt, 9)
        opt.step()
    for expected, actual in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(expected, actual)
