"""Train, evaluate or sample gflows models from the Hydra configs in ``configs/``.

    python train.py flow=g_residual data=cifar10            # exact-likelihood image model
    python train.py data=phi4 data.preset=E2                 # lattice phi^4 sampler

A mistake the program can name (an unknown value, missing data, a checkpoint of another model) ends
with one line on stderr and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

# What the trainers raise for a user's mistake; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from gflows.training.run import run

    try:
        run(cfg)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
