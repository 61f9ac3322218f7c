"""Train, evaluate or sample gflows image models: ``python train.py flow=g_residual data=cifar10``."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from gflows.training.images import run

    run(cfg)


if __name__ == "__main__":
    main()
