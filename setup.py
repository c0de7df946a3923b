"""The package list, found rather than listed: the repository's folders install as the parts of one import name,
``orchestrate`` (orchestrator/ is the package itself), and any subpackage added to a folder (a model family under
orchestrator/models/) is picked up. pyproject.toml's static ``packages`` cannot map several folders this way."""
from setuptools import find_packages, setup

FOLDERS = {"orchestrate": "orchestrator", "orchestrate.parallel": "parallel", "orchestrate.checkpoint": "checkpoint",
           "orchestrate.cluster": "cluster", "orchestrate.recipes": "recipes"}

setup(package_dir=FOLDERS,
      packages=[name for package, folder in FOLDERS.items()
                for name in (package, *(f"{package}.{sub}" for sub in find_packages(folder)))])
