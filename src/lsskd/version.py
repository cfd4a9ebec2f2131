"""The package version, in a module of its own: the root package imports the
subpackages (to fill the registries), so modules below it read the version here."""
__version__ = "0.1.0"
