"""The package version, importable by any module without importing the package facade (retain/__init__)."""

__version__ = "0.1.0"
