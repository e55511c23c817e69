"""The package version, importable without importing the rest of ckpt."""

__version__ = "0.1.0"
