"""train.py's entry: the task of the data, the modes it offers, and flows of the other domain."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gflows.training.run import DATA, FLOWS, run

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path, *overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", ["wandb.mode=disabled", f"run_dir={tmp_path}", *overrides])


def test_flows_of_the_other_domain_are_refused_naming_both_choices(tmp_path):
    with pytest.raises(ValueError, match="flow=g_coupling is an image flow and data=phi4 needs") as e:
        run(config(tmp_path, "data=phi4", "flow=g_coupling"))
    assert "data=cifar10 with flow=g_coupling" in str(e.value)
    assert all(f"flow={f}" in str(e.value) for f in FLOWS["lattice"])
    with pytest.raises(ValueError, match="flow=realnvp is a lattice flow and data=cifar10 needs an image"):
        run(config(tmp_path, "flow=realnvp"))
    assert set(DATA) == set(FLOWS)


def test_modes_depend_on_the_task(tmp_path):
    with pytest.raises(ValueError, match="unknown mode 'sample' for data=phi4"):
        run(config(tmp_path, "data=phi4", "mode=sample"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(config(tmp_path, "data=phi4", "mode=eval", "flow.n_layers=1"))
