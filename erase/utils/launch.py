"""How a command starts: logging and an Accelerator that also works for multi-process CPU runs."""

from __future__ import annotations

import logging
import os


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if main_process else logging.WARNING,
    )


def make_accelerator():
    """An Accelerator that also works for multi-process CPU runs (torchrun env without CUDA -> gloo)."""
    import torch
    from accelerate import Accelerator

    multi_cpu = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=multi_cpu)
    if multi_cpu and accelerator.num_processes > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return accelerator
