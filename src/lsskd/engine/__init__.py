"""Engine: trainer, evaluation, checkpoints, profiling, distributed helpers."""
from .trainer import Trainer  # noqa: F401
