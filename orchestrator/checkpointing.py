"""The trainer's side of checkpointing: which tensors make up a version, and how a resume restores them.

A version holds the parameters and optimizer state (global names, any layout, via checkpoint.fragments), the
sync strategy's tensors, and the trainer state (step, samples consumed, scheduler position, resolved config).
Replica ids say which holder writes a block: DTensor blocks are deduplicated along their mesh plus the replica
index outside it; plain tensors are written by the rank at (dp, cp, tp) = (0, 0, 0) of their pipeline stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from checkpoint.engine import CheckpointEngine, UniversalPersister
from checkpoint.arena import HostArena
from checkpoint.fragments import load_model, load_optimizer, model_fragments, optimizer_fragments
from checkpoint.reshard import load_slices
from checkpoint.universal import (CheckpointError, FragmentSpec, Manifest, SliceSpec, TrainerState,
                                  read_manifest, resolve_version_dir)
from orchestrator.config import Config

SYNC_PREFIX = "sync."


class TrainerCheckpointer:
    """Binds the lazy engine to one rank's trainer: what to copy at each snapshot, and how to restore."""

    def __init__(self, cfg: Config, rank: int, coords: dict[str, int], runner, optimizer, sync, trainer_state_fn):
        dims = cfg.dims
        replica = coords["dp"] * dims.cp + coords["cp"]
        self.replica_index = 0 if cfg.parallel.dp_shard else replica
        self.plain_replica_id = replica * dims.tp + coords["tp"]
        self.runner, self.optimizer, self.sync = runner, optimizer, sync
        self.trainer_state_fn = trainer_state_fn
        self.engine: Optional[CheckpointEngine] = None
        c = cfg.checkpoint
        if c.every > 0:
            persister = (UniversalPersister(c.dir, rank, tuple(range(dims.world_size)), c.keep)
                         if c.persist_every > 0 else None)
            self.engine = CheckpointEngine(HostArena(), c.every, c.persist_every, persister)

    def fragments(self) -> list[FragmentSpec]:
        runner, replica, plain = self.runner, self.replica_index, self.plain_replica_id
        sync_state = [FragmentSpec.whole(SYNC_PREFIX + name, tensor.detach(), plain)
                      for name, tensor in self.sync.state_dict().items()]
        return (model_fragments(runner, replica, plain) + optimizer_fragments(runner, self.optimizer, replica, plain)
                + sync_state)

    def wait_until_copied(self) -> None:
        if self.engine is not None:
            self.engine.wait_until_copied()

    def snapshot(self, step: int) -> None:
        if self.engine is not None:
            self.engine.snapshot(step, self.fragments, self.trainer_state_fn(step))

    def versions(self) -> dict[str, Optional[int]]:
        """Newest version copied to host memory (L0) and newest committed to disk (L2) that this rank knows."""
        if self.engine is None:
            return {"ckpt_l0": None, "ckpt_l2": None}
        persister = self.engine.persister
        return {"ckpt_l0": self.engine.copied_version,
                "ckpt_l2": persister.committed_version if persister is not None else None}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def restore(self, directory: str | Path) -> TrainerState:
        """Load parameters, optimizer and sync state (resharding to this layout); return the trainer state."""
        version = resolve_version_dir(directory)
        manifest = read_manifest(version)
        load_model(version, self.runner, manifest)
        load_optimizer(version, self.runner, self.optimizer, manifest)
        self.sync.load_state_dict(load_sync_state(version, manifest))
        return manifest.trainer_state


def check_model_matches(manifest: Manifest, model_params: dict[str, tuple[int, ...]]) -> None:
    """The model the new config builds must have exactly the checkpoint's parameters and global shapes."""
    saved = {name: record.global_shape for name, record in manifest.tensors.items()
             if not name.startswith(("optim.", SYNC_PREFIX))}
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


def load_sync_state(version: Path, manifest: Manifest) -> dict:
    wanted = {name: SliceSpec(record.global_shape, (0,) * len(record.global_shape), record.global_shape)
              for name, record in manifest.tensors.items() if name.startswith(SYNC_PREFIX)}
    loaded = load_slices(version, wanted, manifest) if wanted else {}
    return {name[len(SYNC_PREFIX):]: tensor for name, tensor in loaded.items()}
