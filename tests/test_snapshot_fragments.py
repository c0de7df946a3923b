"""What a rank snapshots follows its state even where the sync strategy hands out a new tensor at each call (the
1-bit Adams' step count): a freed tensor's id is soon another's, so a cache of fragments keyed by ids alone once
snapshotted an earlier step count, and a resume then took the schedule's next sync one step early."""
import torch
import torch.distributed as dist

from orchestrate.config import Config, derive
from orchestrate.checkpointing import TrainerCheckpointer
from orchestrate.parallel.sync.zero_one_adam import ZeroOneAdamSync
from tests.support.lowcomm import TinyNet, batch, train_step

STEPS = 300


def test_the_snapshot_holds_the_step_count_of_now_when_the_strategy_makes_it_anew(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = derive(Config(), {"checkpoint.every": 0})
        model = TinyNet()
        sync = ZeroOneAdamSync(dist.group.WORLD)
        sync.wrap_model(model)
        optimizer = sync.build_optimizer(model.parameters(), lambda params: torch.optim.AdamW(params, lr=0.01))
        checkpointer = TrainerCheckpointer(cfg, 0, cfg.dims.coordinates(0), model, optimizer, sync,
                                           trainer_state_fn=None)
        step_keys = [key for key in sync.state_dict() if key.endswith(".step")]
        assert len(step_keys) == 1
        snapshotted = []
        for step in range(STEPS):
            train_step(model, sync, optimizer, step, batch(0, step))
            snapshotted += [int(f.tensor) for f in checkpointer.fragments() if f.name.endswith(step_keys[0])]
        assert snapshotted == list(range(1, STEPS + 1))
    finally:
        dist.destroy_process_group()
