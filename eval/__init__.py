"""Audits on top of erase/: I2P nudity audits, reports, utility metrics, attack audits and the digits benchmark.

``from eval import audit`` is the one-call Python form of ``python -m eval.i2p`` (``eval/api.py``).
"""


def __getattr__(name):  # lazy: importing eval must not load diffusers or NudeNet
    if name == "audit":
        from eval.api import audit

        return audit
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
