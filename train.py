"""Train, evaluate or sample gflows models from the Hydra configs in ``configs/``.

    python train.py flow=g_residual data=cifar10            # exact-likelihood image model
    python train.py data=phi4 data.preset=E2 flow=g_coupling  # lattice phi^4 sampler
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.data.name == "phi4":
        from gflows.training.lattice import run
    else:
        from gflows.training.images import run
    run(cfg)


if __name__ == "__main__":
    main()
