"""Every low-communication strategy trains through the CLI and resumes bit-identically on the same layout."""
import pytest

from tests.test_layouts_e2e import run

STRATEGIES = {
    "diloco": ["sync.diloco.sync_every=4"],
    "streaming_diloco": ["sync.streaming_diloco.sync_every=8"],
    "noloco": ["sync.noloco.sync_every=4"],
    "onebit_adam": ["sync.onebit_adam.freeze_step=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_trains_and_resumes_bit_identically(tmp_path, name):
    overrides = [f"sync.name={name}", *STRATEGIES[name]]
    expected = run(tmp_path / "full", *overrides)
    assert expected[20] < expected[1]
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000000000010"
    resumed = run(tmp_path / "resumed", f"ckpt={checkpoint}", command="resume")
    assert resumed == {s: expected[s] for s in range(11, 21)}
