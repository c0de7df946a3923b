"""The project installs one import name, ``orchestrate``; the repository's folders are its parts."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("orchestrator", "parallel", "checkpoint", "cluster", "recipes", "benchmarks")


def test_a_built_wheel_holds_only_the_orchestrate_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("orchestrate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"orchestrate", wheel.name.split("-py")[0] + ".dist-info"}
    for part in ("orchestrate/__main__.py", "orchestrate/models/llama/model.py", "orchestrate/parallel/sync/ddp.py",
                 "orchestrate/checkpoint/adamw_into_kernel.cpp", "orchestrate/cluster/worker_group.py",
                 "orchestrate/recipes/config.yaml", "orchestrate/recipes/recipe/quickstart.yaml"):
        assert part in names, part


def test_the_installed_package_imports_by_its_one_name_outside_the_checkout(tmp_path):
    """Run away from the checkout (whose folders would be importable from its root): the parts import under
    ``orchestrate``, and none of the folder names is an importable top-level module."""
    probe = ("import importlib.util, orchestrate.parallel.sync.ddp, orchestrate.checkpoint.engine, "
             "orchestrate.cluster.worker_group, orchestrate.recipes, orchestrate.cli\n"
             f"print(sorted(n for n in {FOLDERS!r} if importlib.util.find_spec(n) is not None))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
