"""Train, quantize and evaluate one experiment: ``python train.py recipe=NAME [overrides]``.

``python train.py --help`` lists the recipes and config groups; see README.md.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lightning_qat import keep_freed_memory
from lightning_qat.app.experiment import register_recipes, run
from lightning_qat.app.run_folder import register_resolvers

register_recipes(Path(__file__).parent / "recipes")
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    if cfg.keep_freed_memory:
        keep_freed_memory()  # glibc reuses freed pages: see lightning_qat/allocator.py
    return run(cfg)["test_acc"]


if __name__ == "__main__":
    main()
