import dataclasses

import pytest

from orchestrate.cli import compose_config, packaged_recipes
from orchestrate.config import ConfigError, FaultSpec, derive
from orchestrate.models.llama import LlamaConfig


def test_recipes_compose_with_overrides():
    assert {"quickstart", "small"} <= set(packaged_recipes())
    cfg = compose_config(["recipe=quickstart", "parallel.dp=1", "train.steps=7", "train.seed=3"])
    assert (cfg.parallel.dp, cfg.train.steps, cfg.train.seed) == (1, 7, 3)
    assert cfg.world_size == 1
    small = compose_config(["recipe=small"])
    assert small.model.dim == 480 and small.run.name == "small"


def test_config_is_frozen_and_derived_copies_change_only_their_keys():
    cfg = compose_config(["recipe=quickstart", "sync.name=diloco", "fault.kill_rank=1", "fault.at_step=3"])
    assert isinstance(cfg.model, LlamaConfig)  # the model section is the model's own config type
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.dp = 1  # type: ignore[misc]
    smaller = derive(cfg, {"parallel.dp": 1, "cluster.num_workers": None, "sync.diloco.sync_every": 7,
                           "fault.schedule": [FaultSpec(rank=0, during_recovery=True)]})
    assert (smaller.parallel.dp, smaller.sync.diloco.sync_every, smaller.world_size) == (1, 7, 1)
    assert smaller.fault.schedule == [FaultSpec(rank=0, during_recovery=True)] and smaller.fault.kill_rank == 1
    assert (cfg.parallel.dp, cfg.sync.diloco.sync_every, cfg.fault.schedule) == (2, 500, [])
    assert smaller.model is cfg.model and smaller.parallel.tp == cfg.parallel.tp


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tpp=2"], "unknown key 'parallel.tpp'; valid keys in parallel: dp, tp, pp, cp"),
    (["trian.steps=2"], "unknown key 'trian.steps'; valid keys in the top level: run, model"),
    (["+parallel.tpp=2"], "adding or deleting keys is not allowed"),
    (["parallel.dp=abc"], "parallel.dp: Value 'abc' of type 'str' could not be converted to Integer"),
    (["train.steps=1.5"], "train.steps: Value '1.5' of type 'float' could not be converted to Integer"),
    (["recipe=quikstart"], "recipe=quikstart: unknown recipe; valid: "),
    (["cluster.num_workers=3"], "cluster.num_workers=3: must equal parallel.dp*tp*pp*cp"),
    (["cluster.setup_timeout_s=0"], "cluster.setup_timeout_s=0.0: must be > 0"),
    (["sync.name=gossip"], "sync.name=gossip: unknown; valid: ddp"),
    (["parallel.dp=3"], "train.global_batch_size=8: must be divisible by parallel.dp=3"),
    (["model.n_heads=3"], "model.n_heads=3: must divide model.dim=128"),
    (["fault.kill_rank=5", "fault.at_step=2"], "fault.kill_rank=5: valid: 0..1"),
    (["parallel.dp_shard=3"], "parallel.dp_shard=3: must divide parallel.dp=2 (valid: true, false, or a divisor "
                              "of 2: 1, 2)"),
    (["parallel.dp_shard=maybe"], "parallel.dp_shard: Value 'maybe' of type 'str' is incompatible with true, "
                                  "false or an integer"),
    (["sync.diloco.ddp_warmup_steps=-1"], "sync.diloco.ddp_warmup_steps=-1: must be >= 0"),
    (["parallel.dp_shard=2", "sync.name=onebit_adam"], "parallel.dp_shard=2: needs sync.name in ddp, diloco, "
                                                       "streaming_diloco, noloco (got onebit_adam)"),
    # 4 blocks, 3 per fragment: 2 block fragments and one for the rest
    (["sync.name=streaming_diloco", "sync.streaming_diloco.sync_every=4"],
     "sync.streaming_diloco.overlap_steps=1: must be < sync_every // fragments = 4//3"),
    (["sync.name=streaming_diloco", "sync.streaming_diloco.sync_every=2"],
     "sync.streaming_diloco.sync_every=2: must be >= the 3 fragments"),
])
def test_bad_input_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(["recipe=quickstart", *overrides])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_every_packaged_recipe_composes_and_validates():
    for name in packaged_recipes():
        if name == "continue":  # leaves the model and the data to the command line, and says so
            with pytest.raises(ConfigError, match=r"^model.init_from: required by recipe continue"):
                compose_config([f"recipe={name}"])
            cfg = compose_config([f"recipe={name}", "model.init_from=hf", "data.path=tokens"], read_inputs=False)
        else:
            cfg = compose_config([f"recipe={name}"])
        assert cfg.run.name == name and cfg.world_size * cfg.cluster.cpus_per_worker <= 2


def test_pipeline_composes_with_tensor_context_and_evaluation():
    cfg = compose_config(["recipe=quickstart", "parallel.dp=1", "parallel.pp=2", "parallel.tp=2", "parallel.cp=2",
                          "parallel.sequence_parallel=true", "train.eval_batches=2"])
    assert cfg.world_size == 8
    with pytest.raises(ConfigError, match="parallel.pp with parallel.tp: needs sync.name in ddp"):
        compose_config(["recipe=quickstart", "parallel.dp=1", "parallel.pp=2", "parallel.tp=2", "sync.name=diloco"])


def test_shard_degree_counts_the_ranks_of_a_replica():
    """parallel.dp_shard: true shards over every dp rank (one replica), S gives dp/S replicas of S ranks, and the
    batch is still split over every dp rank."""
    def dims(*overrides):
        return compose_config(["recipe=quickstart", "parallel.dp=4", *overrides]).dims

    assert (dims().dp_shard, dims().replicas) == (1, 4)
    assert (dims("parallel.dp_shard=true").dp_shard, dims("parallel.dp_shard=true").replicas) == (4, 1)
    sharded = dims("parallel.dp_shard=2", "sync.name=diloco")
    assert (sharded.dp_shard, sharded.replicas, sharded.world_size) == (2, 2, 4)
    assert [sharded.replica_of(sharded.coordinates(rank)) for rank in range(4)] == [0, 0, 1, 1]


def test_sync_sections_and_names_come_from_the_strategy_registry():
    """A strategy registered in parallel/sync is selectable and configurable with no change to the config."""
    import dataclasses

    from orchestrate.config import CHOICES, SHARDED_SYNCS, SyncConfig
    from orchestrate.parallel.sync import STRATEGIES

    assert CHOICES["sync.name"] == tuple(STRATEGIES)
    sections = {f.name: f.type for f in dataclasses.fields(SyncConfig) if f.name != "name"}
    assert sections == {name: s.hyper for name, s in STRATEGIES.items() if s.hyper is not None}
    assert set(SHARDED_SYNCS) == {"ddp", "diloco", "streaming_diloco", "noloco"}
    cfg = compose_config(["recipe=quickstart", "sync.name=noloco", "sync.noloco.sync_every=7"])
    assert cfg.sync.options()["sync_every"] == 7
    with pytest.raises(ConfigError, match="sync.name"):
        compose_config(["recipe=quickstart", "sync.name=nosuch"])


TINY_FAMILY = '''
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    vocab_size: int = 256
    width: int = 32
    n_layers: int = 2
    n_heads: int = 2
    tie_embeddings: bool = False

    def validate(self):
        if self.width <= 0:
            raise ValueError(f"model.width={self.width}: must be a positive integer")
'''


@pytest.fixture
def tiny_family(tmp_path, monkeypatch):
    """A second model family whose hyper-parameters are not Llama's, installed as a folder would be."""
    import sys

    from orchestrate import config, models

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "__init__.py").write_text(TINY_FAMILY)
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    monkeypatch.setitem(config.CHOICES, "model.name", models.family_names())
    recipes = tmp_path / "recipes" / "recipe"
    recipes.mkdir(parents=True)
    (recipes / "tiny_recipe.yaml").write_text("# @package _global_\nmodel:\n  name: tiny\n  width: 40\n")
    yield tmp_path / "recipes"
    sys.modules.pop("orchestrate.models.tiny", None)
    config.model_section.cache_clear()


def test_model_section_follows_model_name(tiny_family):
    """The model section is the chosen family's own config type, chosen by model.name from a recipe or the
    command line; its keys are checked against that family's fields."""
    import pickle

    from ray import cloudpickle

    assert tuple(f.name for f in dataclasses.fields(compose_config(["recipe=quickstart"]).model))[:3] == \
        ("name", "init_from", "vocab_size")
    cfg = compose_config(["recipe=tiny_recipe", "model.width=48"], [str(tiny_family)], read_inputs=False)
    assert (cfg.model.name, cfg.model.width, hasattr(cfg.model, "dim")) == ("tiny", 48, False)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and cloudpickle.loads(cloudpickle.dumps(cfg)) == cfg
    from_recipe = compose_config(["recipe=tiny_recipe"], [str(tiny_family)], read_inputs=False)
    assert (from_recipe.model.name, from_recipe.model.width) == ("tiny", 40)
    unknown_dim = (r"^unknown key 'model.dim' for model.name=tiny; valid keys in model: name, init_from, "
                   r"vocab_size, width, n_layers, n_heads, tie_embeddings$")
    with pytest.raises(ConfigError, match=unknown_dim):
        compose_config(["recipe=tiny_recipe", "model.dim=64"], [str(tiny_family)], read_inputs=False)
    with pytest.raises(ConfigError, match=unknown_dim):  # a Llama recipe's model section does not fit tiny
        compose_config(["recipe=quickstart", "model.name=tiny"], read_inputs=False)
    with pytest.raises(ConfigError, match=r"^model.width=0: must be a positive integer$"):
        compose_config(["recipe=tiny_recipe", "model.width=0"], [str(tiny_family)], read_inputs=False)
    with pytest.raises(ConfigError, match=r"^model.name=nosuch: unknown; valid: llama, tiny$"):
        compose_config(["recipe=quickstart", "model.name=nosuch"], read_inputs=False)
