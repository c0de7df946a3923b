"""Subcommands for runs on a Ray cluster (submit, status, logs, stop, list) and for results (report, bench).

``submit`` composes and validates the config here first (bad input: exit 2, nothing submitted), then submits
``python -m orchestrate launch <same overrides> cluster.address=auto`` as a Ray job: inside the job the driver
joins the cluster it runs on through ``RAY_ADDRESS``. On the submitting side ``cluster.address`` is the
dashboard URL (http://HOST:8265). The job carries the framework packages (``py_modules``, the code installed
here) and, when given, a working directory. Every failure is one line on stderr and exit code 2.

Wire into the CLI with ``add_commands(subparsers)`` and ``run_command(args)``.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

EXIT_BAD_INPUT = 2
EXIT_JOB_DID_NOT_SUCCEED = 1
# The framework's one import name and the subpackages a source checkout keeps in folders of their own; shipped to
# the job as one module so it runs the code installed here.
FRAMEWORK = "orchestrate"
FRAMEWORK_PARTS = ("parallel", "checkpoint", "cluster", "recipes")
WORKING_DIR_EXCLUDES = [".git/", ".venv/", "venv/", "__pycache__/", "runs/", "outputs/", "wandb/"]
JOB_RUNS_FOLDER = "runs"
STOP_TIMEOUT_S = 60.0
COMMANDS = ("submit", "status", "logs", "stop", "list", "report", "bench")


ADDRESS_KEY = "cluster.address"


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("settings", nargs="*", metavar="cluster.address=URL",
                        help="Ray dashboard URL http://HOST:8265, as for launch and submit "
                             "(default: RAY_API_SERVER_ADDRESS, or RAY_ADDRESS if it is a URL)")
    parser.add_argument("--address", help=f"the same as {ADDRESS_KEY}=URL")


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """argparse cannot take positionals after an option (``logs JOB --follow cluster.address=URL``): settings
    left over after parsing join the command's ``settings`` when it has them."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "settings") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.settings += extra
    return args


def dashboard_address(args: argparse.Namespace) -> Optional[str]:
    """``cluster.address=URL`` (the grammar of launch and submit) or its alias ``--address URL``."""
    from orchestrate.cluster.jobs import JobsError

    given = []
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if key.strip() != ADDRESS_KEY or not sep:
            raise JobsError(f"'{setting}': {args.command} takes only {ADDRESS_KEY}=URL (or --address URL)")
        given.append(value)
    if args.address is not None:
        given.append(args.address)
    if len(set(given)) > 1:
        raise JobsError(f"{ADDRESS_KEY}: given twice with different values ({', '.join(given)})")
    return given[0] if given else None


def add_commands(subparsers) -> None:
    submit = subparsers.add_parser("submit", help="submit a recipe as a Ray job (cluster.address=http://HOST:8265)")
    submit.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides, as for launch")
    submit.add_argument("--recipes-dir", action="append", default=[],
                        help="extra folder with recipe/NAME.yaml files; must be inside --working-dir")
    submit.add_argument("--working-dir", help="folder uploaded as the job's working directory "
                                              "(.gitignore and runs/, .venv/, .git/ are left out)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    status = subparsers.add_parser("status", help="state of a submitted job")
    status.add_argument("job_id")
    logs = subparsers.add_parser("logs", help="print a job's log")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true",
                      help="stream until the job ends; exit 0 only if it SUCCEEDED")
    stop = subparsers.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.add_argument("--no-wait", action="store_true", help="return without waiting for the job to end")
    listing = subparsers.add_parser("list", help="jobs on the cluster")
    for parser in (status, logs, stop, listing):
        _address_option(parser)
    report = subparsers.add_parser("report", help="plots (PNG) and summary.md for a run directory")
    report.add_argument("run_dir")
    bench = subparsers.add_parser("bench", help="run the benchmarks under benchmarks/ and print a markdown table")
    bench.add_argument("suite", nargs="?", help="run only this benchmark (module name under benchmarks/)")
    bench.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")


def fail(message: str) -> int:
    """One line on stderr, exit code 2 (the format of ``orchestrate.cli.fail``, without importing the CLI)."""
    print(f"orchestrate: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def expected_errors(command: str) -> tuple[type[Exception], ...]:
    """Bad-input errors of one command; imported per command because the config schema imports torch."""
    from orchestrate.cluster.jobs import JobsError

    if command == "submit":
        from orchestrate.config import ConfigError

        return JobsError, ConfigError
    if command == "report":
        from orchestrate.report import ReportError

        return (ReportError,)
    return (JobsError,)


def run_command(args: argparse.Namespace) -> int:
    handlers = {"submit": submit, "status": status, "logs": logs, "stop": stop, "list": list_jobs,
                "report": report, "bench": bench}
    try:
        return handlers[args.command](args)
    except expected_errors(args.command) as err:
        return fail(str(err))


# ---- submit ---------------------------------------------------------------------------------------------

def override_key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def job_id_for(run_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-") or "run"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def package_dir(name: str) -> Path:
    """Where an installed package lies (its parent is imported, not the package: some parts import torch)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package '{name}' is not installed")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def framework_module(staging: Path) -> str:
    """The folder to ship as the ``orchestrate`` module: the installed package itself when its parts lie inside it
    (a regular install), else (an editable install maps them from the checkout's folders) a copy assembled in
    ``staging``."""
    root = package_dir(FRAMEWORK)
    parts = {name: package_dir(f"{FRAMEWORK}.{name}") for name in FRAMEWORK_PARTS}
    if all(path == root / name for name, path in parts.items()):
        return str(root)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    assembled = staging / FRAMEWORK
    shutil.copytree(root, assembled, ignore=ignore)
    for name, path in parts.items():
        shutil.copytree(path, assembled / name, ignore=ignore)
    return str(assembled)


def recipes_dirs_in_job(recipes_dirs: Sequence[str], working_dir: Optional[str]) -> list[str]:
    """The job sees extra recipe folders only through its working dir: paths relative to it."""
    from orchestrate.config import ConfigError

    base = Path(working_dir).resolve() if working_dir else None
    relative = []
    for folder in recipes_dirs:
        resolved = Path(folder).resolve()
        if base is None or not resolved.is_relative_to(base):
            raise ConfigError(f"--recipes-dir {folder}: must be inside --working-dir, which is uploaded to the job")
        relative.append(str(resolved.relative_to(base)))
    return relative


def job_entrypoint(overrides: Sequence[str], recipes_dirs: Sequence[str], default_run_dir: Optional[str]) -> str:
    """The shell command the job runs (Ray runs entrypoints with a shell)."""
    kept = [o for o in overrides if override_key(o) != "cluster.address"]
    words = ["python", "-m", "orchestrate", "launch", *kept, "cluster.address=auto"]
    words += [f"--recipes-dir={folder}" for folder in recipes_dirs]
    command = shlex.join(words)
    if default_run_dir is not None:
        # $PWD expands in the job's shell: an absolute run dir under the job's working directory.
        command += f' "run.dir=$PWD/{default_run_dir}"'
    return command


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    from orchestrate.config import ConfigError

    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair}: expected KEY=VALUE")
        env[key] = value
    return env


def runtime_env(working_dir: Optional[str], env: dict[str, str], staging: Path) -> dict:
    result = {"py_modules": [framework_module(staging)], "excludes": WORKING_DIR_EXCLUDES,
              "env_vars": {"PYTHONUNBUFFERED": "1", **env}}
    if working_dir:
        if not Path(working_dir).is_dir():
            from orchestrate.config import ConfigError

            raise ConfigError(f"--working-dir {working_dir}: not a directory")
        result["working_dir"] = str(Path(working_dir).resolve())
    return result


def submit(args: argparse.Namespace) -> int:
    from orchestrate.cluster.jobs import JobsClient
    from orchestrate.cli import compose_config

    # ConfigError: nothing is submitted. Data and model paths are checked in the job, on the cluster's files.
    cfg = compose_config(args.overrides, args.recipes_dir, read_inputs=False)
    job_recipes_dirs = recipes_dirs_in_job(args.recipes_dir, args.working_dir)
    client = JobsClient(cfg.cluster.address)
    job_id = job_id_for(cfg.run.name)
    default_run_dir = f"{JOB_RUNS_FOLDER}/{job_id}" if cfg.run.dir is None else None
    run_dir = cfg.run.dir or default_run_dir
    where = run_dir if Path(run_dir).is_absolute() else f"<job working dir>/{run_dir}"
    entrypoint = job_entrypoint(args.overrides, job_recipes_dirs, default_run_dir)
    metadata = {"orchestrate": "1", "run_name": cfg.run.name, "run_dir": where,
                "overrides": " ".join(args.overrides)}
    with tempfile.TemporaryDirectory(prefix="orchestrate-submit-") as staging:  # uploaded by ``submit``
        env = runtime_env(args.working_dir, parse_env(args.env), Path(staging))
        client.submit(entrypoint, env, submission_id=job_id, metadata=metadata)
    address = shlex.quote(client.address)
    print(f"submitted job {job_id} to {client.address}")
    print(f"run dir: {where}" + (" (the job log prints the full path)" if default_run_dir else ""))
    print(f"follow:  orchestrate logs {job_id} --follow {ADDRESS_KEY}={address}")
    print(f"status:  orchestrate status {job_id} {ADDRESS_KEY}={address}")
    return 0


# ---- status, logs, stop, list -----------------------------------------------------------------------------

def _when(timestamp: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def status(args: argparse.Namespace) -> int:
    from orchestrate.cluster.jobs import JobsClient

    job = JobsClient(dashboard_address(args)).status(args.job_id)
    print(f"{job.job_id}: {job.status}")
    print(f"  started {_when(job.start_time)}" + (f", ended {_when(job.end_time)}" if job.end_time else ""))
    if job.metadata.get("run_dir"):
        print(f"  run dir {job.metadata['run_dir']}")
    if job.message:
        print(f"  {job.message}")
    return 0


def logs(args: argparse.Namespace) -> int:
    from orchestrate.cluster.jobs import JobsClient

    client = JobsClient(dashboard_address(args))
    if not args.follow:
        print(client.logs(args.job_id), end="")
        return 0
    job = client.follow(args.job_id, lambda chunk: print(chunk, end="", flush=True))
    print(f"orchestrate: job {job.job_id} {job.status}", file=sys.stderr)
    return 0 if job.status == "SUCCEEDED" else EXIT_JOB_DID_NOT_SUCCEED


def stop(args: argparse.Namespace) -> int:
    from orchestrate.cluster.jobs import JobsClient

    client = JobsClient(dashboard_address(args))
    if not client.stop(args.job_id):
        print(f"job {args.job_id} had already ended: {client.status(args.job_id).status}")
        return 0
    if args.no_wait:
        print(f"stopping job {args.job_id}")
        return 0
    job = client.wait(args.job_id, STOP_TIMEOUT_S)
    still = "" if job.is_terminal else f" (still stopping after {STOP_TIMEOUT_S:.0f}s)"
    print(f"job {job.job_id} {job.status}{still}")
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    from orchestrate.cluster.jobs import JobsClient

    client = JobsClient(dashboard_address(args))
    jobs = client.list()
    if not jobs:
        print(f"no jobs on {client.address}")
        return 0
    width = max(len("JOB"), *(len(job.job_id) for job in jobs))
    print(f"{'JOB':<{width}}  {'STATUS':<9}  {'STARTED':<19}  ENTRYPOINT")
    for job in jobs:
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        print(f"{job.job_id:<{width}}  {job.status:<9}  {_when(job.start_time):<19}  {entrypoint}")
    return 0


# ---- report, bench ----------------------------------------------------------------------------------------

def report(args: argparse.Namespace) -> int:
    from orchestrate.report import write_report

    result = write_report(args.run_dir)
    for path in [*result.plots, result.summary]:
        print(f"wrote {path}")
    return 0


def load_bench_runner():
    """benchmarks/ lives next to the packages in a source checkout and is not installed with them."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}")
    name = "orchestrate_bench_runner"  # by file path, not by import name: another 'benchmarks' may be installed
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def bench(args: argparse.Namespace) -> int:
    try:
        runner = load_bench_runner()
    except FileNotFoundError as err:
        return fail(f"bench needs a source checkout: {err} not found")
    argv = ([args.suite] if args.suite else []) + ["--timeout", str(args.timeout)]
    return runner.main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m orchestrate.job_commands COMMAND ...``: these commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="orchestrate")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_command(parse_args(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
