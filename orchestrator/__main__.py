from orchestrate.cli import entrypoint

entrypoint()
