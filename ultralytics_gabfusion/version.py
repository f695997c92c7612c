"""The plugin's version (its own module so that every module can read it without importing the package)."""

__version__ = "0.1.0"
