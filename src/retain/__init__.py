"""retain: continual post-training of language models — what a model learned, what it forgot, and why.

From a notebook: ``retain.run(config, out)``, ``retain.load(run_dir)``, ``retain.compare(dirs)`` (see
:mod:`retain.api`); imported on first use, so ``import retain`` stays cheap.
"""

from retain.version import __version__  # noqa: F401 - the package version, re-exported

__all__ = ["Results", "compare", "load", "run"]  # from retain.api


def __getattr__(name: str):
    if name in __all__:
        from retain import api

        return getattr(api, name)
    raise AttributeError(f"module 'retain' has no attribute {name!r}")
