"""Background copies of training state: same bytes as ``copy_``, and no OpenMP team on the copying thread."""
import json
import subprocess
import sys

import pytest
import torch

from orchestrate.checkpoint.background_copy import copy_tensor


@pytest.mark.parametrize("source", [
    torch.randn(3, 5), torch.randn(4, 4, dtype=torch.float64).to(torch.bfloat16), torch.tensor(2.5),
    torch.arange(12, dtype=torch.int64), torch.zeros(0, 3), torch.randn(4, 6).t(),  # the last one is strided
    torch.tensor([True, False, True]),
], ids=["float32", "bfloat16", "scalar", "int64", "empty", "strided", "bool"])
def test_copies_the_same_bytes_as_copy_(source):
    out = torch.full(source.shape, 7, dtype=source.dtype)
    copy_tensor(out, source)
    assert torch.equal(out, source)


PROBE = """
import concurrent.futures, json, os, torch
from orchestrate.checkpoint.background_copy import copy_tensor
torch.set_num_threads(2)
torch.ones(1 << 22).add_(1)  # the main thread's own team, as the training thread has one
threads = lambda: len(os.listdir("/proc/self/task"))
copier = concurrent.futures.ThreadPoolExecutor(1)  # a long-lived thread, as the checkpoint engine's
copier.submit(lambda: None).result()
before = threads()
out, source = torch.empty(1 << 22), torch.ones(1 << 22)
copier.submit((lambda: out.copy_(source)) if {torch_copy} else (lambda: copy_tensor(out, source))).result()
print(json.dumps({{"added": threads() - before, "equal": bool(torch.equal(out, source))}}))
"""


def probe(torch_copy: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(torch_copy=torch_copy)], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP")
def test_a_copy_on_another_thread_starts_no_openmp_team():
    assert probe(torch_copy=True)["added"] > 0  # the premise: copy_ there starts a team that stays
    result = probe(torch_copy=False)
    assert result == {"added": 0, "equal": True}
