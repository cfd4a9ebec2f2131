"""Engine: trainer, evaluation, checkpoints, profiling, distributed helpers."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
from .trainer import NonFiniteError, RunDirError, Trainer, evaluate  # noqa: F401
