"""Checkpoints: atomic, the previous one kept, damaged files rejected with the reason, other models
refused with their keys named."""

import pickle

import pytest
import torch

from gflows.training.checkpoint import load_latest, load_model_state, previous, save_checkpoint


class Foreign:  # a class: unpickling it would run code from outside the weights
    pass


def write_two(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 10, "w": torch.ones(3)}, path)
    save_checkpoint({"step": 20, "w": torch.zeros(3)}, path)
    return path


def test_the_previous_checkpoint_is_kept(tmp_path):
    path = write_two(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    state, used = load_latest(path)
    assert used == path and state["step"] == 20
    assert torch.load(previous(path), weights_only=True)["step"] == 10


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "foreign code"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, damage, capsys):
    path = write_two(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("not a checkpoint")
    else:
        with open(path, "wb") as fh:
            pickle.dump({"step": 30, "payload": Foreign()}, fh)
    state, used = load_latest(path)
    assert used == previous(path) and state["step"] == 10
    out = capsys.readouterr().out
    assert f"rejected {path}" in out and "using the older checkpoint" in out
    if damage == "foreign code":
        assert "arbitrary code" in out


def test_no_readable_checkpoint_names_every_file(tmp_path):
    path = write_two(tmp_path)
    path.write_bytes(b"")
    previous(path).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"no readable checkpoint: .*checkpoint\.pt: .*checkpoint\.prev\.pt"):
        load_latest(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_latest(tmp_path / "none.pt")


def test_a_checkpoint_of_another_model_is_refused_with_its_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    other = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1), torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"another model \(unexpected 2.bias, 2.weight; with other shapes "
                                         r"0.bias, 0.weight, 1.weight\)"):
        load_model_state(model, other.state_dict(), tmp_path / "checkpoint.pt")
    load_model_state(model, model.state_dict(), tmp_path / "checkpoint.pt")
