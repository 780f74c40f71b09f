"""scissorhands-erase. ``from erase import erase_concept, load_erased`` (erase/api.py), imported on first use so that
``import erase`` (and every ``erase.core`` import) stays light."""

__all__ = ["erase_concept", "load_erased"]


def __getattr__(name):
    if name in __all__:
        from erase import api

        return getattr(api, name)
    raise AttributeError(f"module 'erase' has no attribute {name!r}")
