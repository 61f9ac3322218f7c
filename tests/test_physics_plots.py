"""The sampler report's figures."""

import torch

from gflows.physics.plots import save_plots


def test_plots_with_and_without_a_training_curve(tmp_path):
    arrays = {"log_w": torch.randn(200, dtype=torch.float64), "m_flow": torch.randn(200),
              "m_hmc": torch.randn(300)}
    paths = save_plots(tmp_path, arrays, [(s, 0.5 + 0.001 * s) for s in range(1, 120)])
    assert [p.rsplit("/", 1)[1] for p in paths] == ["ess.png", "log_weights.png", "magnetisation.png"]
    assert all((tmp_path / n).stat().st_size > 1000 for n in ("ess.png", "log_weights.png"))
    del arrays["m_hmc"]
    assert len(save_plots(tmp_path / ".", arrays)) == 2
