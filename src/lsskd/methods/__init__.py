"""Training methods; each registers itself in :data:`lsskd.METHODS`."""
from .base import Method, MethodContext  # noqa: F401
from .build import build_method  # noqa: F401
from . import ce, lsskd  # noqa: F401
from . import byot, cskd, ddgsd, dlb, hsakd, kd, ls, mixskd, sla, tfkd, zipf  # noqa: F401  (baseline self-distillation methods)
