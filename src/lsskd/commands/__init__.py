"""CLI sub-commands (see :mod:`lsskd.cli`)."""
