"""The one small interface every synchronisation strategy implements (docs/lowcomm.md section 0.3).

A strategy acts across the replica dimension (``replica_group``). For DDP that is the data-parallel ranks
flattened with the context-parallel ranks (which hold the same parameters but see other tokens); the other
strategies get one rank of each replica and, when a replica is several ranks (cp > 1, or FSDP2-sharded replicas),
are wrapped in ``WithinReplicaSync`` (within_replica.py), which runs the replica's own sync first. A strategy
composes with tp/pp/FSDP2 inside a replica because it only touches the local tensors of this rank's parameters.

Training-step contract (orchestrator/trainer.py):
    loss.backward(); sync.before_optimizer(step); optimizer.step(); sync.after_optimizer(step)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from orchestrate.parallel.comm import CommCounter
from orchestrate.parallel.sync.tensors import parameters_holding, reshard


class SyncStrategy:
    name = "base"
    # True when replicas train apart between syncs (their parameters and optimizer state differ), so a
    # checkpoint must keep every replica's copy to resume exactly.
    replicas_diverge = False
    # True when every replica holds exactly the same parameters, optimizer and sync state after each step, so a
    # lost replica can take a survivor's state (DDP; not FSDP shards, not per-rank error feedback)
    replicas_identical = False
    # False when the strategy writes no parameter, optimizer or sync state between one step's optimizer update
    # and the next one's (DDP: it only averages gradients), so a snapshot may share that state's memory
    writes_state_between_steps = True

    def __init__(self, replica_group, counter: Optional[CommCounter] = None):
        self.replica_group = replica_group
        self.counter = counter if counter is not None else CommCounter()
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def wrap_model(self, model: nn.Module, blocks: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        """Return the module the trainer runs forward/backward on (DDP wraps; most strategies do not).
        ``blocks``: the model's repeated blocks keyed by their global index (``ModelParts.blocks_of``), for
        strategies that treat them apart (FSDP2's units, Streaming DiLoCo's fragments); None: no such blocks."""
        self.model = model
        return model

    def build_optimizer(self, params: Iterable[nn.Parameter], build_default) -> torch.optim.Optimizer:
        """Strategies that replace the optimizer (1-bit Adam) override this; others take the default."""
        self.optimizer = build_default(params)
        return self.optimizer

    def before_optimizer(self, step: int) -> None:
        pass

    def after_optimizer(self, step: int) -> None:
        pass

    def wait_for_exchanges(self) -> None:
        """Finish the exchanges still in flight (strategies that overlap them with later steps have some): before
        the parameters are read for evaluation or export, or the strategy is dropped while its group lives on."""

    def evaluation_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """name -> the weights to evaluate this replica on: the live ones, unless the strategy holds the ones
        its replicas agreed on apart from them (Streaming DiLoCo's outer parameters)."""
        return dict(model.named_parameters())

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Inside the block the wrapped model holds ``evaluation_parameters``; its live weights come back after."""
        if self.model is None:
            yield
            return
        # a forward without backward leaves FSDP2's root unsharded (it keeps its parameters for the backward): the
        # evaluation values and the live weights are the local shards, so swap them while the model is resharded
        reshard(self.model)
        with parameters_holding(self.model.named_parameters(), self.evaluation_parameters(self.model)):
            try:
                yield
            finally:
                reshard(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors with stable logical names (e.g. ``diloco.outer_momentum.layers.0.attention.wq.weight``)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def sync_step(sync: SyncStrategy, optimizer: torch.optim.Optimizer, step: int,
              backward: Callable[[], Optional[torch.Tensor]], between: Optional[Callable[[], None]] = None,
              scheduler=None) -> Optional[torch.Tensor]:
    """One training step in the order every strategy relies on (the contract above), for loops outside the
    trainer (tests, benchmarks): gradients cleared, the caller's ``backward`` (forward, loss, backward; returns
    the loss), ``before_optimizer``, ``between`` (gradient clipping, or a test reading the synced gradients), the
    optimizer's and the scheduler's step, ``after_optimizer``. ``step`` counts from 0."""
    optimizer.zero_grad()
    loss = backward()
    sync.before_optimizer(step)
    if between is not None:
        between()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    sync.after_optimizer(step)
    return loss
