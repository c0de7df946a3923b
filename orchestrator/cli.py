"""``orchestrate`` command line: Hydra's compose API over the packaged recipes, then the controller.

The compose API (not ``hydra.main``) gives real subcommands, creates no output folders, and behaves the same
in tests and Ray jobs. Every bad input is one line on stderr and exit code 2, before anything starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrate import cluster_commands, job_commands, prepare_data
from orchestrate.config import (DEFAULT_MODEL, Config, ConfigError, ModelSection, SyncConfig, check_choice, derive,
                                 model_section, schema, validate)
from orchestrate.inputs import apply_data, explicit_keys, resolve_inputs, tokenizer_file
from orchestrate.interrupt import InterruptRequests

EXIT_BAD_INPUT = 2
RECIPE_GROUP = "recipe"


def packaged_recipes() -> list[str]:
    folder = resources.files("orchestrate.recipes") / RECIPE_GROUP
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def available_recipes(extra_dirs: Sequence[str]) -> list[str]:
    names = set(packaged_recipes())
    for folder in extra_dirs:
        names.update(p.stem for p in (Path(folder) / RECIPE_GROUP).glob("*.yaml"))
    return sorted(names)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_override_key(key: str, model_type: type = ModelSection) -> None:
    """The key must name a field of the schema, whose ``model`` section is ``model_type``; the error lists the
    valid keys at the level that went wrong."""
    node, path = Config, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in _field_names(node):
            where = ".".join(path) or "the top level"
            valid = _field_names(node) if dataclasses.is_dataclass(node) else []
            suffix = f"; valid keys in {where}: {', '.join(valid)}" if valid else f"; {where} has no sub-keys"
            raise ConfigError(f"unknown key '{key}'{suffix}")
        node = model_type if path == [] and part == "model" else \
            _resolve_type(next(f.type for f in dataclasses.fields(node) if f.name == part))
        path.append(part)


def _is_family_key(key: str) -> bool:
    """A key of the model family's own hyper-parameters: known only once ``model.name`` is."""
    head, _, rest = key.partition(".")
    return head == "model" and rest.split(".")[0] not in _field_names(ModelSection)


def _resolve_type(annotation):
    """Field types are strings under postponed annotations; map section names back to their dataclasses."""
    if isinstance(annotation, str):
        import orchestrate.config as schema

        return getattr(schema, annotation, annotation)
    return annotation


def parse_overrides(overrides: Sequence[str]) -> list:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)}: {str(err).splitlines()[0]}") from None


def check_overrides(overrides: Sequence[str], extra_dirs: Sequence[str]) -> None:
    """Every key but the model family's own (``check_model_keys``, once the family is known)."""
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if override.is_add() or override.is_delete() or override.is_force_add():
            raise ConfigError(f"'{override.input_line}': adding or deleting keys is not allowed; "
                              f"set an existing key as key=value")
        if key == RECIPE_GROUP:
            name, valid = override.value(), available_recipes(extra_dirs)
            if name not in valid:
                raise ConfigError(f"recipe={name}: unknown recipe; valid: {', '.join(valid)}")
            continue
        if not _is_family_key(key):
            check_override_key(key)


def check_model_keys(model_values, name: str) -> None:
    """The keys given for the ``model`` section (by a recipe, the command line or a saved config) against those of
    family ``name``'s section."""
    check_choice("model.name", name)
    valid = _field_names(model_section(name))
    for key in model_values:
        if key not in valid:
            raise ConfigError(f"unknown key 'model.{key}' for model.name={name}; valid keys in model: "
                              f"{', '.join(valid)}")


def compose_config(overrides: Sequence[str], extra_dirs: Sequence[str] = (), read_inputs: bool = True) -> Config:
    """Recipe + overrides -> a validated Config, or ConfigError with a one-line message. ``read_inputs``: check
    the data, the tokenizer and ``model.init_from`` on this machine and fold them into the config (``submit``
    does not: those paths are the cluster's)."""
    check_overrides(overrides, extra_dirs)
    # the model section's keys depend on model.name, which a recipe may set: compose with that section open, then
    # check it against the chosen family's section
    ConfigStore.instance().store(name="schema", node=schema(model=None))
    search = [f"hydra.searchpath=[{','.join('file://' + str(Path(d).resolve()) for d in extra_dirs)}]"] \
        if extra_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="orchestrate.recipes", version_base="1.3"):
            composed = compose(config_name="config", overrides=search + list(overrides))
        check_model_keys(composed.model, composed.model.name)
        cfg = to_config(OmegaConf.merge(schema(composed.model.name), OmegaConf.to_container(composed)))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg)
    if read_inputs:
        cfg = resolve_inputs(cfg, explicit_keys(overrides))
        validate(cfg)  # the model section and vocabulary may have changed
    return cfg


def to_config(composed) -> Config:
    """DictConfig -> Config; a component dataclass that rejects its values (``__post_init__``) names its key."""
    for section in dataclasses.fields(SyncConfig):
        if dataclasses.is_dataclass(_resolve_type(section.type)):
            try:
                OmegaConf.to_object(composed.sync[section.name])
            except ValueError as err:
                raise ConfigError(f"sync.{section.name}.{err}") from None
    return OmegaConf.to_object(composed)


def _one_line(err: BaseException) -> str:
    """OmegaConf errors wrapped by Hydra: name the full key and keep the first line of the reason."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    reason = reason.replace("type hint 'Union[int, bool]'", "true, false or an integer")
    return f"{key}: {reason}" if key else reason


def split_resume_args(args: Sequence[str]) -> tuple[str, list[str]]:
    """``ckpt=DIR`` names the checkpoint; the rest are overrides of its saved config."""
    ckpt = [a.split("=", 1)[1] for a in args if a.startswith("ckpt=")]
    if len(ckpt) != 1 or not ckpt[0]:
        raise ConfigError("ckpt=DIR: required once (a checkpoint root or one of its step-* version folders)")
    return ckpt[0], [a for a in args if not a.startswith("ckpt=")]


def compose_resume_config(ckpt: str, overrides: Sequence[str]) -> Config:
    """The config saved in the checkpoint, with overrides (any layout the model allows), resuming from it."""
    import torch

    from orchestrate.checkpoint.universal import CheckpointError, read_manifest, resolve_version_dir
    from orchestrate.checkpointing import check_model_matches
    from orchestrate.models import family

    check_overrides(overrides, ())
    if any(o.startswith("recipe=") for o in overrides):
        raise ConfigError("recipe: cannot change on resume; the checkpoint's saved config is the base")
    try:
        version = resolve_version_dir(ckpt)
        manifest = read_manifest(version)
        saved = manifest.trainer_state.config
        model = (saved.get("model") or {}).get("name", DEFAULT_MODEL)
        given = OmegaConf.from_dotlist(list(overrides))
        check_model_keys(given.get("model", {}), model)
        merged = OmegaConf.merge(schema(model), saved, given)
        # the saved config names the source run's folders: a resumed run writes its own (never over the source's
        # committed versions, which another resume may be reading)
        own_dirs = {key: None for key in ("run.dir", "checkpoint.dir")
                    if not any(o.startswith(f"{key}=") for o in overrides)}
        cfg = derive(to_config(merged), {"checkpoint.resume_from": str(Path(ckpt).resolve()), **own_dirs})
        validate(cfg)
        cfg = apply_data(cfg, explicit_keys(overrides))  # the weights come from the checkpoint, not model.init_from
        with torch.device("meta"):
            model = family(cfg.model.name).build(cfg.model, seed=0)
        check_model_matches(manifest, {n: tuple(p.shape) for n, p in model.named_parameters()})
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    return cfg


def export_command(args: Sequence[str]) -> int:
    from orchestrate.checkpoint.universal import CheckpointError, read_manifest, resolve_version_dir
    from orchestrate.models import family

    values = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(values) - {"ckpt", "out"}) + [a for a in args if "=" not in a]
    if unknown or not values.get("ckpt") or not values.get("out"):
        return fail(f"export takes ckpt=DIR out=DIR (got {' '.join(args) or 'nothing'})")
    try:
        saved = read_manifest(resolve_version_dir(values["ckpt"])).trainer_state.config
        name = (saved.get("model") or {}).get("name", DEFAULT_MODEL)
        check_choice("model.name", name)
        out = family(name).export_hf(values["ckpt"], values["out"], tokenizer_file(saved.get("data") or {}))
    except ConfigError as err:
        return fail(f"{values['ckpt']}: {err}")
    except CheckpointError as err:
        return fail(str(err))
    print(f"exported a Hugging Face Llama folder to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrate", description="Train large models across many machines.")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch", help="train a recipe (embedded local Ray unless cluster.address is set)")
    launch.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides (Hydra grammar)")
    launch.add_argument("--recipes-dir", action="append", default=[],
                        help="extra folder with recipe/NAME.yaml files (repeatable)")
    resume = commands.add_parser("resume", help="continue from a checkpoint on any layout: ckpt=DIR [overrides]")
    resume.add_argument("overrides", nargs="*", help="ckpt=DIR and key=value overrides of the saved config")
    export = commands.add_parser("export", help="write a Hugging Face Llama folder: ckpt=DIR out=DIR")
    export.add_argument("overrides", nargs="*", help="ckpt=DIR out=DIR")
    job_commands.add_commands(commands)
    cluster_commands.add_commands(commands)
    prepare_data.add_command(commands)
    show = commands.add_parser("config", help="print the resolved config without running anything")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--recipes-dir", action="append", default=[])
    return parser


def fail(message: str) -> int:
    print(f"orchestrate: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = job_commands.parse_args(build_parser(), argv)
    if args.command in job_commands.COMMANDS:
        return job_commands.run_command(args)
    if args.command == "cluster":
        return cluster_commands.run_command(args)
    if args.command == "prepare-data":
        return prepare_data.run_command(args)
    if args.command == "export":
        return export_command(args.overrides)
    try:
        if args.command == "resume":
            cfg = compose_resume_config(*split_resume_args(args.overrides))
        else:
            cfg = compose_config(args.overrides, args.recipes_dir)
        if args.command == "config":
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return 0
        from orchestrate.controller import Controller, RunState

        with InterruptRequests() as interrupts:
            try:
                result = Controller(cfg, interrupts).run()
            except KeyboardInterrupt:
                print("orchestrate: interrupted again: stopped without saving", file=sys.stderr)
                return 128 + (interrupts.signum or signal.SIGINT)
    except ConfigError as err:
        return fail(str(err))
    if result.state == RunState.INTERRUPTED:
        return report_interrupted(result)
    if result.state != RunState.FINISHED:
        print(f"orchestrate: run failed: {result.error} (run dir {result.run_dir})", file=sys.stderr)
        return 1
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    print(f"finished {result.steps} steps, final loss {loss}; run dir {result.run_dir}")
    return 0


def report_interrupted(result) -> int:
    interrupted = result.interrupted
    if interrupted.checkpoint is None:
        print(f"orchestrate: {interrupted}: no snapshot to save (run dir {result.run_dir})", file=sys.stderr)
    else:
        print(f"orchestrate: {interrupted}: step {interrupted.step} saved in {interrupted.checkpoint}\n"
              f"resume with: orchestrate resume ckpt={interrupted.checkpoint}", file=sys.stderr)
    return interrupted.exit_code


def entrypoint() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a run that hangs waits
    sys.exit(main())
