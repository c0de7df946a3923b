"""The typed configuration schema: one dataclass per section, the one place where defaults live.

Hydra composes recipe YAML from the packaged ``recipes/`` over these dataclasses (registered in the ConfigStore
as ``schema``), so an unknown key or a wrong type fails before anything starts. The ``model`` section is the
chosen family's own config type (``model_section``). ``validate`` adds the checks that need several keys at once
(parallel degrees, batch divisibility).

A Config is frozen: whoever needs another one (the controller after a node loss, a resume) derives it with
``derive``, so a config handed to the workers never changes under them.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from omegaconf import OmegaConf

from orchestrate.checkpoint.keepers.settings import KeeperSettings
from orchestrate.models import family, family_names
from orchestrate.parallel.mesh import ParallelDims, ParallelConfigError
from orchestrate.parallel.sync import STRATEGIES


class ConfigError(ValueError):
    """Bad user input: one line naming the key and the valid choices. The CLI exits with code 2."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: Optional[str] = None  # default: runs/<name>-<timestamp>
    requires: List[str] = field(default_factory=list)  # keys a recipe leaves to the command line (e.g. data.path)


DEFAULT_MODEL = "llama"


@dataclass(frozen=True)
class ModelSection:
    """What every ``model`` section has: which family (``model.name``) and which weights to start from. The rest
    of the section is the family's own ``Config`` (``model_section``), so it follows ``model.name``."""

    name: str = DEFAULT_MODEL
    # a Hugging Face folder (config.json + safetensors): the model section follows its config.json and training
    # starts from its weights (on any layout)
    init_from: Optional[str] = None

    def __reduce__(self):
        # the section's class is made per family at run time, so it is rebuilt by name where it is unpickled
        return _rebuild_section, (self.name, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@functools.cache
def model_section(name: str) -> type:
    """The ``model`` section's type for family ``name``: the family's ``Config`` with ``name`` and ``init_from``."""
    return dataclasses.make_dataclass(
        f"{name.title()}ModelConfig", [("name", str, field(default=name))],
        bases=(family(name).Config, ModelSection), frozen=True, namespace={"__module__": __name__})


def _rebuild_section(name: str, values: dict) -> ModelSection:
    return model_section(name)(**values)


ModelConfig = model_section(DEFAULT_MODEL)


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | path
    # text file, folder of text files, pre-tokenized *.u16 file, or a folder written by `orchestrate prepare-data`
    path: Optional[str] = None
    tokenizer: str = "bytes"  # bytes | path to a tokenizer.json (Hugging Face `tokenizers`)
    max_bytes: int = 8_000_000  # corpus size cap for text sources
    val_fraction: float = 0.02  # tail of the token stream held out for eval_loss (prepared folders: their split)
    # filled in at launch: the tokenizer that made the tokens ("bytes" or its sha256); resume checks it
    tokenizer_hash: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 30
    seed: int = 0
    global_batch_size: int = 8
    seq_len: int = 128
    grad_clip: float = 1.0  # 0 disables
    eval_batches: int = 0  # >0: eval_loss on that many held-out batches after the last step
    eval_every: int = 0  # >0 (with eval_batches): eval_loss also every N steps, in that step's metrics record


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 5
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    # torch's fused AdamW kernel: one pass over each tensor, about 4x faster than the single-tensor loop on CPU;
    # false: that loop. With keepers, either step writes each version straight into its snapshot slot (no copy)
    fused: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # FSDP2: shard each replica's parameters, gradients and optimizer state over dp_shard of its dp ranks. false:
    # replicate (no sharding); true: shard over all dp ranks; S: dp/S replicas of S ranks each (HSDP under DDP; the
    # ranks of one replica under DiLoCo, Streaming DiLoCo and NoLoCo, which sync each shard across replicas)
    dp_shard: Union[int, bool] = False
    cp_impl: str = "ring"  # ring | ulysses
    sequence_parallel: bool = False  # shard norm/residual activations along the sequence between TP regions
    loss_parallel: bool = True  # with tp: cross-entropy on vocabulary-sharded logits, never gathering them
    pp_schedule: str = "1f1b"
    microbatches: int = 4  # per replica and step, for pipeline schedules
    pp_virtual_stages: int = 1  # stages per rank for looped schedules (interleaved_1f1b, looped_bfs, ...)
    pp_split: Optional[List[int]] = None  # first layer of each stage after the first; None: balanced by cost


def _chosen_options(self) -> dict:
    """The chosen strategy's hyper-parameters as plain values (empty for one without any, ddp)."""
    section = getattr(self, self.name, None)
    return dataclasses.asdict(section) if section is not None else {}


# ``name`` picks the strategy; a section per strategy with hyper-parameters (defaults: docs/lowcomm.md section
# 0.4), made from the strategy registry (parallel/sync/__init__.py): a new strategy needs no change here
SyncConfig = dataclasses.make_dataclass(
    "SyncConfig",
    [("name", str, field(default="ddp"))] + [(name, entry.hyper, field(default_factory=entry.hyper))
                                             for name, entry in STRATEGIES.items() if entry.hyper is not None],
    namespace={"options": _chosen_options, "__module__": __name__}, frozen=True)


@dataclass(frozen=True)
class ErasureConfig:
    group_size: int = 0  # keepers per erasure-coded group; 0: all nodes in one group
    parity: int = 1  # members a group may lose (capped at group size - 1)
    # most of the wall time L1 commits (parity across nodes) may take: they share CPUs and network with training,
    # so they are spaced out; a node loss redoes the steps since the last commit
    commit_share: float = 0.25


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    every: int = 1  # snapshot (L0, host memory, copied while the next step computes) every N steps; 0: off
    persist_every: int = 50  # write every K-th snapshot to disk (L2, universal format) in the background; 0: off
    keep: int = 2  # committed versions kept on disk
    resume_from: Optional[str] = None  # checkpoint root (follows 'latest') or a version directory
    # level 1: every snapshot is copied into shared memory owned by a SnapshotKeeper per node (it survives the
    # trainer), erasure-coded across nodes; the keepers write L2. Needs every >= 1 (with every=0 it is off)
    keepers: bool = True
    shm_dir: str = "/dev/shm"  # where the keepers' arenas live (a tmpfs on each node)
    # versions each rank keeps in memory (its arena in the keeper's shared memory, or in its own process with
    # keepers off): the committed one, ones being committed, the newest few a recovery may roll back to
    shm_versions: int = 4
    ec: ErasureConfig = field(default_factory=ErasureConfig)

    @property
    def keepers_on(self) -> bool:
        return self.keepers and self.every > 0

    def keeper_settings(self) -> KeeperSettings:
        return KeeperSettings(dir=self.dir, every=self.every, persist_every=self.persist_every, keep=self.keep,
                              shm_dir=self.shm_dir, slots=self.shm_versions, group_size=self.ec.group_size,
                              parity=self.ec.parity, commit_share=self.ec.commit_share)


@dataclass(frozen=True)
class ClusterConfig:
    address: Optional[str] = None  # None: a new embedded local Ray cluster; else an address to join
    num_workers: Optional[int] = None  # None: parallel.dp*tp*pp*cp
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    num_cpus: Optional[int] = None  # embedded cluster size; None: this machine's cores
    object_store_mb: int = 512
    # for the placement and for every rank to start and join; None: 60 s + 4 s per worker (workers import torch
    # and join one by one, so a large gang on small nodes needs longer)
    start_timeout_s: Optional[float] = None
    collective_timeout_s: float = 120.0
    # for every rank's setup (model, data, restoring a checkpoint, the snapshot kernel): a rank still in it then
    # fails the run with every rank's threads written out, not a wait without end
    setup_timeout_s: float = 900.0


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "orchestrate"
    mode: str = "offline"  # used unless WANDB_MODE is set in the environment


@dataclass(frozen=True)
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True
    log_every: int = 1


FAULT_KINDS = ("process", "node", "keeper")


@dataclass(frozen=True)
class FaultSpec:
    """One deliberate failure. ``process``: the rank's process exits abruptly; ``node``: the rank kills its node's
    raylet, so every process of that node (its trainers and keeper) dies; ``keeper``: the rank kills its node's
    SnapshotKeeper. It fires when the rank is about to start step ``at_step``, or, with ``during_recovery``,
    while the rank restores in the next recovery."""

    rank: int = 0
    at_step: Optional[int] = None
    kind: str = "process"
    during_recovery: bool = False


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection: ``kill_rank``/``at_step``/``kind`` is one fault; ``schedule`` lists more
    (``'fault.schedule=[{rank:1,at_step:8},{rank:0,during_recovery:true}]'``)."""

    kill_rank: Optional[int] = None
    at_step: Optional[int] = None
    kind: str = "process"
    schedule: list[FaultSpec] = field(default_factory=list)
    max_restarts: int = 3  # automatic recoveries per run before it fails

    def planned(self) -> list[FaultSpec]:
        single = [FaultSpec(self.kill_rank, self.at_step, self.kind)] if self.kill_rank is not None else []
        return single + list(self.schedule)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    @property
    def dims(self) -> ParallelDims:
        p = self.parallel
        return ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, dp_shard=shard_degree(p))

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def start_timeout_s(self) -> float:
        given = self.cluster.start_timeout_s
        return given if given is not None else START_TIMEOUT_BASE_S + START_TIMEOUT_PER_WORKER_S * self.world_size


START_TIMEOUT_BASE_S, START_TIMEOUT_PER_WORKER_S = 60.0, 4.0

CHOICES = {
    "model.name": family_names(),
    "data.source": ("stdlib", "path"),
    "optim.name": ("adamw",),
    "optim.schedule": ("cosine", "constant"),
    "sync.name": tuple(STRATEGIES),
}


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_choice(key: str, value: Any) -> None:
    """A ConfigError naming ``key``, its ``value`` and the valid ones, unless ``value`` is one (``CHOICES``)."""
    valid = CHOICES[key]
    _require(value in valid, f"{key}={value}: unknown; valid: {', '.join(valid)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-key checks; each failure is one line naming the key and what is valid."""
    for key in cfg.run.requires:
        try:
            given = _get(cfg, key) is not None
        except AttributeError:
            raise ConfigError(f"run.requires: '{key}' is not a config key") from None
        _require(given, f"{key}: required by recipe {cfg.run.name} ({key}=...)")
    for key in CHOICES:
        check_choice(key, _get(cfg, key))
    try:
        cfg.dims.validate(cfg.cluster.num_workers)
    except ParallelConfigError as err:
        raise ConfigError(str(err)) from None
    for key in ("train.steps", "train.global_batch_size", "train.seq_len", "logging.log_every"):
        _require(_get(cfg, key) > 0, f"{key}={_get(cfg, key)}: must be a positive integer")
    m, t = cfg.model, cfg.train
    try:
        m.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _require(m.vocab_size >= 256 or cfg.data.tokenizer != "bytes",
             f"model.vocab_size={m.vocab_size}: the byte tokenizer needs at least 256")
    dp = cfg.parallel.dp
    _require(t.global_batch_size % dp == 0,
             f"train.global_batch_size={t.global_batch_size}: must be divisible by parallel.dp={dp}")
    _require(cfg.data.source != "path" or cfg.data.path,
             "data.path: required when data.source=path (a text file, a folder, or a *.u16 token file)")
    _require(0.0 <= cfg.data.val_fraction < 0.5, f"data.val_fraction={cfg.data.val_fraction}: valid: [0, 0.5)")
    _require(cfg.cluster.start_timeout_s is None or cfg.cluster.start_timeout_s > 0,
             f"cluster.start_timeout_s={cfg.cluster.start_timeout_s}: must be > 0 (leave it unset for the default)")
    _require(cfg.cluster.setup_timeout_s > 0, f"cluster.setup_timeout_s={cfg.cluster.setup_timeout_s}: must be > 0")
    _require(cfg.cluster.cpus_per_worker > 0,
             f"cluster.cpus_per_worker={cfg.cluster.cpus_per_worker}: must be > 0")
    for key in ("checkpoint.every", "checkpoint.persist_every", "train.eval_batches", "train.eval_every"):
        _require(_get(cfg, key) >= 0, f"{key}={_get(cfg, key)}: must be >= 0 (0 turns it off)")
    _require(not t.eval_every or t.eval_batches, f"train.eval_every={t.eval_every}: needs train.eval_batches > 0")
    _require(cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep}: must be >= 1")
    _require(cfg.checkpoint.ec.parity >= 0 and cfg.checkpoint.ec.group_size >= 0,
             "checkpoint.ec.parity and checkpoint.ec.group_size: must be >= 0")
    _require(0 < cfg.checkpoint.ec.commit_share <= 1,
             f"checkpoint.ec.commit_share={cfg.checkpoint.ec.commit_share}: valid: (0, 1]")
    _require(cfg.checkpoint.shm_versions >= 2,
             f"checkpoint.shm_versions={cfg.checkpoint.shm_versions}: must be >= 2 (the committed version and a "
             f"newer one)")
    validate_pipeline(cfg)
    validate_tensor_and_context(cfg)
    _require(cfg.dims.dp_shard == 1 or cfg.sync.name in SHARDED_SYNCS,
             f"parallel.dp_shard={_shard_text(cfg.parallel)}: needs sync.name in {', '.join(SHARDED_SYNCS)} "
             f"(got {cfg.sync.name})")
    validate_faults(cfg)


def validate_faults(cfg: Config) -> None:
    f = cfg.fault
    _require((f.kill_rank is None) == (f.at_step is None), "fault.kill_rank and fault.at_step: set both or neither")
    _require(f.max_restarts >= 0, f"fault.max_restarts={f.max_restarts}: must be >= 0")
    entries = [({"rank": "fault.kill_rank", "at_step": "fault.at_step", "kind": "fault.kind"}, spec)
               for spec in f.planned()[:f.kill_rank is not None]]
    entries += [({name: f"fault.schedule[{i}].{name}" for name in ("rank", "at_step", "kind")}, spec)
                for i, spec in enumerate(f.schedule)]
    for key, spec in entries:
        _require(spec.kind in FAULT_KINDS, f"{key['kind']}={spec.kind}: unknown; valid: {', '.join(FAULT_KINDS)}")
        _require(0 <= spec.rank < cfg.world_size, f"{key['rank']}={spec.rank}: valid: 0..{cfg.world_size - 1}")
        _require(spec.during_recovery == (spec.at_step is None),
                 f"{key['at_step']}={spec.at_step}: set exactly one of at_step and during_recovery=true")
        _require(spec.at_step is None or 1 <= spec.at_step <= cfg.train.steps,
                 f"{key['at_step']}={spec.at_step}: valid: 1..{cfg.train.steps}")
        _require(spec.kind != "keeper" or cfg.checkpoint.keepers_on,
                 f"{key['kind']}=keeper: needs checkpoint.keepers=true and checkpoint.every >= 1 (there is no "
                 f"keeper to kill)")
        _require(spec.kind != "node" or cfg.cluster.address is not None,
                 f"{key['kind']}=node: needs a multi-node cluster (cluster.address); the embedded cluster is one "
                 f"node")


def validate_pipeline(cfg: Config) -> None:
    p = cfg.parallel
    if p.pp == 1:
        return
    from orchestrate.parallel.pipeline import validate_pp

    _require(not cfg.model.tie_embeddings, "model.tie_embeddings=true: not available with parallel.pp > 1")
    _require(cfg.dims.dp_shard == 1, f"parallel.dp_shard={_shard_text(p)}: not available with parallel.pp > 1")
    try:
        validate_pp(cfg.model.n_layers, p.pp, p.pp_schedule, p.microbatches, p.pp_virtual_stages,
                    cfg.train.global_batch_size // p.dp)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate_tensor_and_context(cfg: Config) -> None:
    p = cfg.parallel
    try:
        if p.tp > 1:
            _require(not cfg.model.tie_embeddings, "model.tie_embeddings=true: not available with parallel.tp > 1")
            family(cfg.model.name).validate_tp(cfg.model, p.tp, cfg.train.seq_len // p.cp if p.sequence_parallel else None)
        if p.cp > 1 or p.cp_impl not in ("ring", "ulysses"):
            from orchestrate.parallel.context import validate_cp

            validate_cp(cfg.train.seq_len, cfg.model.n_heads, p.cp, p.cp_impl, p.tp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if p.pp == 1:  # a pipeline stage's blocks are known once the model's cut is (the worker checks then)
        try:
            STRATEGIES[cfg.sync.name].check_blocks(cfg.sync.options(), cfg.model.n_layers)
        except ValueError as err:
            raise ConfigError(f"sync.{cfg.sync.name}.{err}") from None
    _require(STRATEGIES[cfg.sync.name].pipeline_with_tp or p.pp == 1 or p.tp == 1,
             f"parallel.pp with parallel.tp: needs sync.name in "
             f"{', '.join(n for n, s in STRATEGIES.items() if s.pipeline_with_tp)} (got {cfg.sync.name})")
    _require(cfg.dims.dp_shard == 1 or (p.tp == 1 and p.cp == 1),
             f"parallel.dp_shard={_shard_text(p)}: not available with parallel.tp > 1 or parallel.cp > 1 yet")


# strategies that run over FSDP2-sharded replicas
SHARDED_SYNCS = tuple(name for name, strategy in STRATEGIES.items() if strategy.sharded_replicas)


def shard_degree(p: ParallelConfig) -> int:
    """``parallel.dp_shard`` as the number of ranks a replica is sharded over: true is dp, false is 1."""
    if isinstance(p.dp_shard, bool):
        return p.dp if p.dp_shard else 1
    return p.dp_shard


def _shard_text(p: ParallelConfig) -> str:
    return str(p.dp_shard).lower() if isinstance(p.dp_shard, bool) else str(p.dp_shard)


def derive(cfg, changes: dict[str, Any]):
    """A copy of the (frozen) config ``cfg`` with dotted keys changed: ``derive(cfg, {"parallel.dp": 2})``."""
    direct, nested = {}, {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    direct.update({head: derive(getattr(cfg, head), inner) for head, inner in nested.items()})
    return dataclasses.replace(cfg, **direct)


def schema(model: Optional[str] = DEFAULT_MODEL):
    """The schema as an OmegaConf node for recipes, overrides and saved configs to merge into, with the ``model``
    section of family ``model``; None leaves that section open (any keys), to learn ``model.name`` from a recipe
    before its keys can be checked. OmegaConf makes the nodes of frozen dataclasses read-only, which would refuse
    every merge, so they are opened here; the Config made from the merge (``OmegaConf.to_object``) is frozen
    again."""
    node = OmegaConf.structured(Config)
    _open(node)
    node.model = OmegaConf.structured(model_section(model) if model is not None else ModelSection)
    _open(node.model)
    if model is None:
        OmegaConf.set_struct(node.model, False)
    return node


def _open(node) -> None:
    OmegaConf.set_readonly(node, False)
    for key in (node.keys() if OmegaConf.is_dict(node) else range(len(node))):
        child = node._get_node(key)  # the child node itself (item access would resolve values)
        if OmegaConf.is_config(child):
            _open(child)
