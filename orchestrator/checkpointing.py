"""The trainer's side of checkpointing: which tensors make up a version, and how a resume restores them.

A version holds the parameters and optimizer state (global names, any layout, via checkpoint.fragments), the
sync strategy's tensors, and the trainer state (step, samples consumed, scheduler position, resolved config).
Replica ids say which holder writes a block: DTensor blocks are deduplicated along their mesh plus the replica
index outside it; plain tensors are written by the rank at (dp, cp, tp) = (0, 0, 0) of their pipeline stage.

Sync-strategy state may differ between replicas (NoLoCo's slow weights, 1-bit Adam's error buffers), so every
replica saves its own copy as ``sync.replica<r>.<name>``. State shaped like a parameter's local shard takes the
parameter's layout and reshards like it; other buffers are per rank (``sync.replica<r>.pp<p>.tp<t>.<name>``).
Resume rule, printed as a warning when it applies: with the same replica count each replica loads its own copy;
with another count every replica loads replica 0's copy, and per-rank buffers that no longer fit the layout
(e.g. 1-bit Adam error feedback) restart from zero.
"""
from __future__ import annotations

import dataclasses
from dataclasses import replace
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from orchestrate.checkpoint import adamw_into
from orchestrate.checkpoint.engine import CheckpointEngine, UniversalPersister
from orchestrate.checkpoint.arena import HostArena
from orchestrate.checkpoint.identity_memo import IdentityMemo
from orchestrate.checkpoint.keepers.arena import TRAINER_STATE_META, ArenaHandle, estimate_meta_capacity
from orchestrate.checkpoint.keepers.arena_writer import ArenaWriter
from orchestrate.checkpoint.snapshot_codec import copy_into, pack, plan_index
from orchestrate.checkpoint.snapshot_index import SnapshotIndex
from orchestrate.checkpoint.fragments import (OPTIM_PREFIX, init_optimizer_state, load_model, load_optimizer, model_fragments,
                                  optimizer_fragments, tensor_fragment)
from orchestrate.checkpoint.reshard import load_into
from orchestrate.checkpoint.universal import CheckpointError, FragmentSpec, Manifest, TrainerState, read_manifest, resolve_version_dir
from orchestrate.config import Config
from orchestrate.step_report import RankCheckpoint

log = logging.getLogger(__name__)

SYNC_PREFIX = "sync."
REPLICAS_PREFIX = "replicas."


@dataclasses.dataclass(eq=False)
class _SlotPlace:
    """The optimizer's targets in one slot for one list of fragments, and the fragments as they are once the
    step moved the tensors there (both depend only on which tensors and which slot)."""

    targets: dict
    after_step: Optional[list[FragmentSpec]] = None
    sync_tensors: tuple = ()  # (name, tensor) of the sync strategy's state when ``after_step`` was worked out


def _same_tensors(items: tuple, others: tuple) -> bool:
    """The same names with the very same tensor objects (held, so that no other object can have taken an id)."""
    return len(items) == len(others) and all(
        name == other_name and tensor is other for (name, tensor), (other_name, other) in zip(items, others))


def _moved_by_step(param: torch.Tensor, state: dict) -> tuple[torch.Tensor, ...]:
    """What a zero-copy step writes into the slot for one parameter, in ``adamw_into.step_into``'s target order."""
    return param, state["exp_avg"], state["exp_avg_sq"], state["step"]


class TrainerCheckpointer:
    """Binds the lazy engine to one rank's trainer: what to copy at each snapshot, and how to restore."""

    def __init__(self, cfg: Config, rank: int, coords: dict[str, int], runner, optimizer, sync, trainer_state_fn,
                 keeper=None):
        dims = cfg.dims
        replica = dims.replica_of(coords)
        self.replica, self.replicas = replica, dims.replicas * dims.cp
        shard = f".shard{coords['dp'] % dims.dp_shard}" if dims.dp_shard > 1 else ""
        self.rank_tag = f"pp{coords['pp']}.tp{coords['tp']}{shard}"
        self.tp_rank = coords["tp"]
        self.per_replica = sync.replicas_diverge
        # FSDP2's DTensor mesh holds every copy of a sharded parameter (HSDP: the replicas too)
        self.replica_index = 0 if dims.dp_shard > 1 else replica
        self.plain_replica_id = replica * dims.tp + coords["tp"]
        self.runner, self.optimizer, self.sync = runner, optimizer, sync
        self.trainer_state_fn = trainer_state_fn
        self.engine: Optional[CheckpointEngine] = None
        c = cfg.checkpoint
        self.rank, self.every, self.keeper, self.slots = rank, c.every, keeper, c.shm_versions
        self.persist_cadence = c.every * c.persist_every  # steps between versions written to disk
        self.writer: Optional[ArenaWriter] = None  # keepers on: L0 is this rank's arena in the keeper's memory
        self._fragments: list[FragmentSpec] = []
        self._fragments_by_signature: dict[tuple, tuple[list[FragmentSpec], tuple]] = {}  # -> (fragments, held)
        # [fragments, a slot's view] -> the optimizer's targets in that slot (``_slot_targets``)
        self._targets_by_place = IdentityMemo(capacity=4 * self.slots)
        self._stepped_into: Optional[_SlotPlace] = None  # where this step's optimizer wrote (zero copy)
        # the fragments of the state as the last zero-copy snapshot left it (nothing replaces a tensor between
        # steps when the optimizer writes into slots: ``_zero_copy_reason``)
        self._after_last_step: Optional[list[FragmentSpec]] = None
        self.zero_copy = False  # the optimizer writes each version straight into its slot (``use_arena``)
        # Decided here, on the training thread, not in ``use_arena`` on the control thread: deciding runs torch's
        # fused AdamW once to check the kernel, and a parallel torch kernel on another thread gives that thread
        # an OpenMP team of its own, which slows every later step (checkpoint/background_copy.py says why).
        self._zero_copy_blocker = self._zero_copy_reason() if c.keepers and c.every > 0 else "keepers off"
        self._in_arena = False  # parameters and moments live in a slot of the arena (a published version)
        if c.every > 0 and keeper is None:
            persister = (UniversalPersister(c.dir, rank, tuple(range(dims.world_size)), c.keep)
                         if c.persist_every > 0 else None)
            # several versions, as the keepers' arenas hold: a recovery rolls back to the newest one whose metrics
            # were logged, and a lost rank's reports of the latest steps die with it
            self.engine = CheckpointEngine(HostArena(slots=c.shm_versions), c.every, c.persist_every, persister)

    def fragments(self) -> list[FragmentSpec]:
        """This rank's part of a version. Built again only when a tensor it refers to was replaced (the optimizer
        created its state, a load, a strategy's new buffer): the step updates them in place, and building the
        list costs the training thread more than the copy itself on a small model."""
        return list(self._state_fragments())

    def _state_fragments(self) -> list[FragmentSpec]:
        """``fragments()`` as kept: the same list object for the same tensors in the same places (not to be
        changed by the caller)."""
        sync_state = self.sync.state_dict()
        params = list(self.runner.parameters())
        moments = [v for state in self.optimizer.state.values() for v in state.values()]
        signature = (tuple(map(id, params)), tuple(map(id, moments)),
                     tuple((name, id(tensor)) for name, tensor in sync_state.items()))
        if self.zero_copy:  # the same tensors move between slots: one list per place they live in
            signature += (tuple(map(torch.Tensor.data_ptr, params)), tuple(map(torch.Tensor.data_ptr, moments)))
        remembered = self._fragments_by_signature.get(signature)
        if remembered is None:
            if len(self._fragments_by_signature) > 2 * self.slots:
                self._fragments_by_signature.clear()
            fragments = self.training_fragments(self.replica) + self.sync_fragments(sync_state, self.replica)
            # the signature's tensors are held with it: an id is unique only while its object lives, and a
            # strategy may make a tensor anew at each call (a step count) that the fragments only view
            remembered = self._fragments_by_signature[signature] = (fragments, (params, moments, sync_state))
        fragments = self._fragments = remembered[0]
        return fragments

    def training_fragments(self, replica: int) -> list[FragmentSpec]:
        """Parameters and optimizer state. Replica 0's are the model's (stable names, what export and any
        layout read); when replicas diverge (DiLoCo, NoLoCo), replica r > 0 also keeps its own copy as
        ``replicas.r<r>.<name>``."""
        runner = self.runner
        if not (self.per_replica and replica > 0):
            replica_index, plain = self.replica_index, self.plain_replica_id
            return model_fragments(runner, replica_index, plain) + optimizer_fragments(
                runner, self.optimizer, replica_index, plain)
        own = model_fragments(runner, 0, self.tp_rank) + optimizer_fragments(runner, self.optimizer, 0, self.tp_rank)
        return [dataclasses.replace(f, name=f"{REPLICAS_PREFIX}r{replica}.{f.name}") for f in own]

    def sync_fragments(self, state: dict[str, torch.Tensor], replica: int) -> list[FragmentSpec]:
        params = dict(self.runner.named_parameters())
        fragments = []
        for name, tensor in state.items():
            param = _parameter_of(name, params)
            if param is not None and isinstance(param, DTensor) and tensor.shape == param.to_local().shape:
                laid_out = DTensor.from_local(tensor.detach(), param.device_mesh, param.placements, run_check=False,
                                              shape=param.shape, stride=param.stride())
                fragments.append(tensor_fragment(f"{SYNC_PREFIX}replica{replica}.{name}", laid_out, 0))
            elif param is not None and not isinstance(param, DTensor):
                fragments.append(FragmentSpec.whole(f"{SYNC_PREFIX}replica{replica}.{name}", tensor.detach(), 0))
            else:
                fragments.append(FragmentSpec.whole(f"{SYNC_PREFIX}replica{replica}.{self.rank_tag}.{name}",
                                                    tensor.detach(), 0))
        return fragments

    def snapshot_size_estimate(self) -> tuple[int, int]:
        """(payload, metadata) bytes of this rank's snapshots, to size its arena before the first step. Optimizer
        state that does not exist yet (torch creates it at the first step) is counted as two float32 moments and
        a step count per parameter, as Adam keeps; a snapshot that turns out larger gets a larger arena."""
        fragments = self.fragments()
        if not self.optimizer.state:
            for f in model_fragments(self.runner):
                moment = torch.empty(f.tensor.shape, dtype=torch.float32, device="meta")
                fragments += [replace(f, name=f"{OPTIM_PREFIX}{key}.{f.name}", tensor=moment)
                              for key in ("exp_avg", "exp_avg_sq")]
                fragments.append(FragmentSpec.whole(f"{OPTIM_PREFIX}step.{f.name}",
                                                    torch.empty((), dtype=torch.float32, device="meta")))
        index = plan_index(fragments, {TRAINER_STATE_META: dataclasses.asdict(self.trainer_state_fn(0))})
        return index.nbytes, estimate_meta_capacity(index)

    def use_arena(self, keeper, handle: dict) -> None:
        """Snapshot into ``handle``'s arena (from this node's keeper) from the next version on."""
        self.keeper, arena = keeper, ArenaHandle.from_json(handle)
        if self.writer is None:
            self.writer = ArenaWriter(arena, self._reallocate, self.persist_cadence)
            self.engine = CheckpointEngine(self.writer, self.every)
            self.zero_copy = self._zero_copy_blocker is None
            if not self.zero_copy:
                log.debug("rank %d: snapshots are copied in the background (%s)", self.rank, self._zero_copy_blocker)
        else:
            self.writer.replace(arena)

    def _zero_copy_reason(self) -> Optional[str]:
        """Why the optimizer cannot write each version straight into its slot, or None when it can: every
        version must be snapshotted (a step between snapshots would update a held version in place), nothing
        else may write the state between steps, and the step must be AdamW's on plain CPU tensors."""
        if self.every != 1:
            return f"checkpoint.every={self.every}"
        if self.sync.writes_state_between_steps:
            return f"sync {self.sync.name}"
        if any(isinstance(p, DTensor) for p in self.runner.parameters()):
            return "sharded parameters"
        return adamw_into.unsupported_reason(self.optimizer)

    def _reallocate(self, payload_nbytes: int, meta_nbytes: int) -> ArenaHandle:
        import ray

        return ArenaHandle.from_json(ray.get(self.keeper.allocate.remote(self.rank, payload_nbytes, meta_nbytes)))

    def note_reported(self, step: int) -> None:
        """The controller took the report of ``step``: a full arena spares its version (``slot_to_overwrite``)."""
        if self.engine is not None:
            self.engine.arena.reported_step = step

    def wait_until_copied(self) -> None:
        if self.engine is not None:
            self.engine.wait_until_copied()

    def optimizer_step(self, step: int) -> None:
        """``optimizer.step()``; with ``zero_copy`` the new parameters, moments and step counts are written
        straight into the arena slot of version ``step`` (bit-identical results), so its snapshot copies nothing."""
        self._stepped_into, known, self._after_last_step = None, self._after_last_step, None
        place = self._slot_targets(step, known) if self.zero_copy and self.engine.is_due(step) else None
        if place is None:
            self._leave_arena()  # an in-place step must not change a version the arena holds
            self.optimizer.step()
            return
        updated = set(adamw_into.step_into(self.optimizer, place.targets))
        with torch.no_grad():
            for param, outs in place.targets.items():
                state = self.optimizer.state[param]
                tensors = _moved_by_step(param, state)
                if param not in updated:  # no gradient this step: unchanged, but the slot must hold it
                    torch._foreach_copy_(list(outs), list(tensors))
                # ``.data =`` keeps the objects (module, optimizer, DDP hold them); torch DDP gets the gradients
                # wrong after a ``set_`` on its parameters
                for tensor, out in zip(tensors, outs):
                    tensor.data = out
        self._in_arena, self._stepped_into = True, place

    def _slot_targets(self, step: int, known: Optional[list[FragmentSpec]] = None) -> Optional[_SlotPlace]:
        """The slot taken for version ``step`` with the optimizer's targets in it (param -> its (param,
        exp_avg, exp_avg_sq, step) views); None when no slot is free or the state is not laid out yet (the first
        step creates the moments). ``known``: the state's fragments, when the last snapshot left them known."""
        if not self.optimizer.state:
            return None
        if known is None:
            fragments = self._state_fragments()
        else:
            fragments, self._fragments = known, known
        views = self.writer.begin(step, fragments)
        if views is None:
            return None
        # The same fragments (so the same tensors in the same places) and the same slot's views give the same
        # targets: worked out once, not on every step (a small model's step is short). An empty layout has no
        # view to tell its slot by; the check below finds no targets in it.
        slot_view = next(iter(views.values()), None)
        cached = self._targets_by_place.get((self._fragments, slot_view))
        if cached is not None:
            return cached
        # each tensor's place in the slot is that of the fragment that refers to its memory
        view_of = {f.tensor.data_ptr(): views.get(f.key) for f in fragments if f.tensor.numel()}
        targets = {}
        for param, state in self.optimizer.state.items():
            tensors = _moved_by_step(param, state)
            slot_views = tuple(view_of.get(tensor.data_ptr()) for tensor in tensors)
            if any(view is None or view.shape != tensor.shape for view, tensor in zip(slot_views, tensors)):
                return None
            targets[param] = slot_views
        return self._targets_by_place.put((self._fragments, slot_view), _SlotPlace(targets))

    def _leave_arena(self) -> None:
        """Give parameters and moments that live in a held version's slot their own memory again."""
        if not self._in_arena:
            return
        with torch.no_grad():
            for param, state in self.optimizer.state.items():
                for tensor in _moved_by_step(param, state):
                    tensor.data = tensor.data.clone()
        self._in_arena = False

    def snapshot(self, step: int) -> None:
        if self.engine is not None:
            place, self._stepped_into = self._stepped_into, None
            fragments = self.fragments if place is None else lambda: self._fragments_after_step(place)
            self.engine.snapshot(step, fragments, self.trainer_state_fn(step))

    def _fragments_after_step(self, place: _SlotPlace) -> list[FragmentSpec]:
        """``fragments()`` right after the optimizer wrote into ``place``: the same for the same fragments
        before the step, slot and sync tensors, so worked out once per place (on a small model, the signature
        that finds them costs the training thread more than the snapshot)."""
        sync_tensors = tuple(self.sync.state_dict().items())
        if place.after_step is None or not _same_tensors(place.sync_tensors, sync_tensors):
            place.after_step, place.sync_tensors = self._state_fragments(), sync_tensors
        self._fragments = self._after_last_step = place.after_step
        return place.after_step

    def versions(self) -> RankCheckpoint:
        """Newest version copied to host memory (L0), and handed to the keeper or committed to disk (L2)."""
        if self.engine is None:
            return RankCheckpoint()
        if self.writer is not None:
            return RankCheckpoint(l0=self.engine.copied_version, handed=self.writer.handed_version,
                                  copied_bytes=self.writer.copied_bytes)
        persister = self.engine.persister
        return RankCheckpoint(l0=self.engine.copied_version,
                              l2=persister.committed_version if persister is not None else None)

    def held_versions(self, wait_for_copy: bool = True) -> list[int]:
        """Versions of this rank's state in its own memory (the level-0 arena), once the running copy is done
        (``wait_for_copy=False`` while the training thread runs: only it may wait for its copies)."""
        if self.engine is None:
            return []
        try:
            if wait_for_copy:
                self.engine.wait_until_copied()
        except Exception:  # noqa: BLE001 - a failed copy leaves the versions copied before it
            pass
        if self.writer is not None:
            return self.writer.held_versions()
        return self.engine.arena.versions()

    def held_snapshot(self, version: int) -> tuple[dict, object]:
        """(index, payload) of a version this rank holds in memory, in the packed format of ``restore_snapshot``:
        a view of the shared-memory slot, or packed from the host arena."""
        if self.writer is not None:
            return self.writer.read(version)
        if version not in self.held_versions():
            raise CheckpointError(f"rank {self.rank} holds versions {self.held_versions()} in memory, not {version}")
        buffers, trainer_state = self.engine.arena.held(version)
        held = [replace(f, tensor=buffers[f.key]) for f in self._fragments]
        index, payload = pack(held, {TRAINER_STATE_META: dataclasses.asdict(trainer_state)})
        return index.to_json(), payload

    def pin(self, version: Optional[int]) -> bool:
        """Keep a version in the host arena from being overwritten while training goes on (``None`` unpins)."""
        return self.writer is None and self.engine is not None and self.engine.arena.pin(version)

    def save_pinned(self, version: int, root: str, world_ranks: tuple[int, ...], keep: int) -> None:
        """Write a pinned version to ``root`` in the universal format (a run interrupted with keepers off); the
        lowest rank commits it once every rank wrote its part."""
        try:
            buffers, trainer_state = self.engine.arena.held(version)
            held = [replace(f, tensor=buffers[f.key]) for f in self._fragments]
            persister = UniversalPersister(root, self.rank, world_ranks, keep)
            try:
                persister.persist(version, held, trainer_state)
            finally:
                persister.close()
        finally:
            self.pin(None)

    def release(self) -> None:
        """Stop using this checkpointer (a recovery built a new one): the running copy is finished, a disk commit
        that waits for ranks that died is given up, the arena is unmapped."""
        if self.engine is not None:
            self.engine.abandon()
        if self.writer is not None:
            self.writer.close()

    def restore_snapshot(self, index: dict, payload) -> TrainerState:
        """Same-layout restore from a level-1 snapshot (this rank's packed arena, from a keeper)."""
        self._leave_arena()
        parsed = SnapshotIndex.from_json(index)
        # A fresh optimizer has no state yet: allocate what the snapshot holds, then copy into it.
        own_prefix = f"{REPLICAS_PREFIX}r{self.replica}."
        records = {t.name.removeprefix(own_prefix): t for t in parsed.tensors}
        init_optimizer_state(self.runner, self.optimizer, SimpleNamespace(directory="snapshot", tensors=records))
        copy_into(self.fragments(), index, payload)
        return TrainerState.from_json(parsed.meta[TRAINER_STATE_META])

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def restore(self, directory: str | Path) -> TrainerState:
        """Load parameters, optimizer and sync state (resharding to this layout); return the trainer state."""
        self._leave_arena()
        version = resolve_version_dir(directory)
        manifest = read_manifest(version)
        load_model(version, self.runner, manifest)
        load_optimizer(version, self.runner, self.optimizer, manifest)
        if self.per_replica and self.replica > 0:
            own = self.training_fragments(self.replica)
            if all(f.name in manifest.tensors for f in own):
                load_into(version, own, manifest)
            else:
                warnings.warn(f"{version}: no parameters of replica {self.replica} saved (another replica count "
                              f"or strategy); this replica starts from replica 0's parameters and optimizer state")
        self.sync.load_state_dict(self.load_sync_state(version, manifest))
        return manifest.trainer_state

    def load_sync_state(self, version: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
        saved_replicas = manifest.trainer_state.extra.get("replicas", self.replicas)
        source = self.replica if saved_replicas == self.replicas else 0
        if source != self.replica or saved_replicas != self.replicas:
            warnings.warn(f"sync state was saved by {saved_replicas} replicas and resumes on {self.replicas}: every "
                          f"replica starts from replica 0's copy; per-rank buffers that do not fit restart at zero")
        current = {name: tensor.detach().clone() for name, tensor in self.sync.state_dict().items()}
        targets = [f for f in self.sync_fragments(current, source) if f.name in manifest.tensors]
        if saved_replicas != self.replicas:
            targets = [f for f in targets if f".{self.rank_tag}." not in f.name]
        load_into(version, targets, manifest)
        prefix = f"{SYNC_PREFIX}replica{source}."
        loaded = {f.name[len(prefix):].removeprefix(f"{self.rank_tag}."): f.tensor for f in targets}
        return {name: (tensor.to_local() if isinstance(tensor, DTensor) else tensor)
                for name, tensor in loaded.items()}


def check_model_matches(manifest: Manifest, model_params: dict[str, tuple[int, ...]]) -> None:
    """The model the new config builds must have exactly the checkpoint's parameters and global shapes."""
    saved = {name: record.global_shape for name, record in manifest.tensors.items()
             if not name.startswith(("optim.", SYNC_PREFIX, REPLICAS_PREFIX))}
    for name, shape in model_params.items():
        if name not in saved:
            raise CheckpointError(f"{manifest.directory}: tensor {name!r} of the model is not in the checkpoint "
                                  f"(a different model.* config?)")
        if tuple(saved[name]) != tuple(shape):
            raise CheckpointError(f"{manifest.directory}: tensor {name!r} has shape {list(saved[name])} in the "
                                  f"checkpoint but {list(shape)} in the model (model.* must match the checkpoint)")
    extra = sorted(set(saved) - set(model_params))
    if extra:
        raise CheckpointError(f"{manifest.directory}: tensor {extra[0]!r} is in the checkpoint but not in the model")


def _parameter_of(state_name: str, params: dict) -> Optional[torch.Tensor]:
    """The parameter a sync-state tensor belongs to: the longest parameter name its name ends with."""
    matches = [name for name in params if state_name.endswith("." + name)]
    return params[max(matches, key=len)] if matches else None
