"""scissorhands-erase. ``from erase import erase_concept, load_erased`` (erase/api.py); the run as a config and stages:
``from erase import EraseConfig, erase, prepare_data`` (erase/diffusion/). Imported on first use so that ``import erase``
(and every ``erase.core`` import) stays light."""

__all__ = ["EraseConfig", "erase", "erase_concept", "load_erased", "prepare_data"]

_WHERE = {"erase_concept": "erase.api", "load_erased": "erase.api", "EraseConfig": "erase.diffusion.config",
          "erase": "erase.diffusion.run", "prepare_data": "erase.diffusion.run"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'erase' has no attribute {name!r}")
