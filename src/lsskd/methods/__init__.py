"""Training methods; each registers itself in :data:`lsskd.METHODS`."""
from .base import Method, mix_targets, soft_cross_entropy  # noqa: F401
from . import ce  # noqa: F401
