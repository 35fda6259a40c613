"""Training: config as data, the loop, EMA, checkpoints, distributed runs (``microdiff train``).

    from microdiff.train import load_config, train
    summary = train(load_config("configs/demo.yaml", ["train.steps=200"]), "runs/try")
"""

from .config import ConfigError, RunConfig, load_config, save_config
from .trainer import Trainer, TrainingDiverged, train

__all__ = ["RunConfig", "ConfigError", "load_config", "save_config", "Trainer", "TrainingDiverged", "train"]
