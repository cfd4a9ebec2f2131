"""lsskd: Layered Self-Supervised Knowledge Distillation (arXiv 2506.07055) as a library."""
from .registry import DATASETS, METHODS, MODELS, TRANSFORMS  # noqa: F401
from .version import __version__  # noqa: F401


def _load_builtin():
    # Importing the subpackages fills the registries.
    from . import data, methods, models  # noqa: F401


_load_builtin()

# The library API for your own training loop (docs/api.md).
from .api import RECOMMENDED, SelfDistiller, StepOutput, WithIndex, profiles  # noqa: E402,F401
from .errors import UsageError  # noqa: E402,F401
