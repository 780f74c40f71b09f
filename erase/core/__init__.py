"""erase.core: a model-agnostic trim-then-repair engine (imports torch and accelerate, never diffusers)."""

from .adapter import Adapter
from .engine import EngineConfig, NonFiniteLossError, RunContext, RunResult, run
from .method import Method
from .projection import project_
from .registry import available_methods, build_method, get_method_class, register_method
from .saliency import saliency_scores
from .sharding import ShardingError
from .stream import EndlessStream, stack_collate
from .targets import TargetError, describe, select_parameters
from .topk import TopKError, global_topk_masks, per_tensor_topk_masks, topk_masks
from .trim import trim_

__all__ = [
    "Adapter", "EndlessStream", "EngineConfig", "Method", "NonFiniteLossError", "RunContext", "RunResult", "ShardingError", "TargetError", "TopKError",
    "available_methods", "build_method", "describe", "get_method_class", "global_topk_masks", "per_tensor_topk_masks",
    "project_", "register_method", "run", "saliency_scores", "select_parameters", "stack_collate", "topk_masks", "trim_",
]
