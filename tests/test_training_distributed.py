"""Two processes on CPU (gloo) give the same training result as one process on the same batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gflows.training.checkpoint import load_checkpoint
from gflows.training.distributed import Dist

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"
ARGS = ["preset=tiny", "flow=g_coupling", "group=c4", "flow.n_scales=1", "flow.blocks_per_scale=1",
        f"data.root={SUBSET}", "data.verify=false", "wandb.mode=disabled", "trainer.steps=3",
        "trainer.batch_size=8", "trainer.ckpt_every=3", "trainer.eval_at_end=false", "trainer.lr=1e-2"]


def test_shard_splits_a_global_batch():
    x = torch.arange(8)
    assert torch.equal(torch.cat([Dist(r, 2).shard(x) for r in range(2)]), x)
    with pytest.raises(ValueError, match="does not split"):
        Dist(0, 3).shard(x)


@pytest.mark.skipif(not (SUBSET / "cifar-10-batches-py").exists(), reason=f"no CIFAR-10 subset at {SUBSET}")
def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "CI": "true", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), *ARGS, f"run_dir={tmp_path / 'one'}"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    multi = subprocess.run([*torchrun, str(ROOT / "train.py"), *ARGS, f"run_dir={tmp_path / 'two'}"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert one["step"] == two["step"] == 3
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5, rtol=1e-4), k
    # The comparison is not vacuous: three steps moved the weights away from the (lagging) EMA.
    assert any(not torch.allclose(v, one["model"][k]) for k, v in one["ema"].items())
