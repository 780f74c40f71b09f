"""Sharded runs: the untrained weights in FSDP2 shards, the targeted tensors whole on every process.

The trim's global top-k, its score accumulators and the projection's inner products read every targeted tensor
whole; the weights a run does not train (on FLUX.1-dev's text paths 11.3 of 12 B) only have to be there for the
forward and the backward. So a sharded run (``accelerate launch`` with an FSDP config, ``docs/accelerate/
fsdp_bf16.yaml``) shards exactly those: every block named by the model's ``_no_split_modules`` (or the config's
``fsdp_transformer_layer_cls_to_wrap``), then the root, goes through torch's ``fully_shard`` with the targeted tensors
as ``ignored_params``. FSDP2 all-gathers a block's frozen weights for its forward (and again in the backward, to carry
the gradient through), and frees them after; the targeted tensors stay plain tensors, replicated, and their gradients
are averaged across processes after each backward (:func:`all_reduce_grads`) as DDP would: every process then holds the
same whole gradient, so saliency, trim, projection and the optimizer run unchanged and give the same result as data
parallelism. Memory per process: the frozen weights / processes, plus the targets whole (fp32 master, gradient,
optimizer moments).

accelerate's own FSDP preparation is not used (it would shard the targets too, and on the CPU it never runs: accelerate
1.16 keeps a CPU launch with ``--use_fsdp`` as multi-CPU data parallelism); the settings come from the same place
(the accelerate config, through the environment ``accelerate launch`` sets, or the ``Accelerator``'s FSDP plugin).
Checkpoints hold the targeted tensors and the optimizer state whole (safetensors), the frozen weights are the base's.
DeepSpeed and Megatron-LM launches are refused in one line.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from accelerate.utils import parse_flag_from_env
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoints import OPTIMIZER_FILE, TARGETS_FILE, CheckpointError


class ShardingError(ValueError):
    """The launch shards parameters in a way the engine cannot run (DeepSpeed ZeRO, Megatron-LM), or an FSDP launch asks
    for something a sharded run does not support (fp16's loss scaler)."""


def _kind(accelerator) -> str:
    kind = getattr(accelerator, "distributed_type", None)
    return getattr(kind, "name", str(kind or ""))


def sharding_of(accelerator) -> str | None:
    """``"fsdp"`` when the launch asks for FSDP (accelerate's distributed type, or ``--use_fsdp`` / an FSDP config on a
    CPU launch, which accelerate runs as multi-CPU) on more than one process, else ``None``; a :class:`ShardingError`
    for DeepSpeed / Megatron-LM and for FSDP under fp16."""
    kind = _kind(accelerator)
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ShardingError(f"the accelerate config shards parameters with {kind}, which this engine does not run; launch with "
                            "FSDP (docs/accelerate/fsdp_bf16.yaml: the untrained weights sharded, the targets whole) or with "
                            "--multi_gpu (one full copy per GPU); docs/FAMILIES.md, 'Scale', gives the memory per GPU")
    wants = kind == "FSDP" or (parse_flag_from_env("ACCELERATE_USE_FSDP") and getattr(accelerator, "num_processes", 1) > 1)
    if not wants:
        return None
    if getattr(accelerator, "mixed_precision", "no") == "fp16":
        raise ShardingError("mixed precision 'fp16' is not supported with FSDP (its loss scaler would need the sharded "
                            "gradients); use --mixed_precision bf16 or no")
    return "fsdp"


def shards(accelerator, method) -> bool:
    """Whether a run of ``method`` under ``accelerator`` is sharded (:func:`sharding_of`; a closed-form edit runs no
    backward, so each process edits the whole model)."""
    return sharding_of(accelerator) == "fsdp" and not method.closed_form


@dataclass
class ShardSettings:
    """What a sharded run takes from the accelerate FSDP config (plugin first, then the environment
    ``accelerate launch`` sets from the config file)."""

    reshard_after_forward: bool = True
    offload_params: bool = False
    wrap: tuple[str, ...] = ()  # module class names sharded one by one; empty: the model's ``_no_split_modules``

    @classmethod
    def of(cls, accelerator) -> "ShardSettings":
        plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        reshard = getattr(plugin, "reshard_after_forward", None)
        if reshard is None and plugin is not None:  # an FSDP1 plugin says it with its sharding strategy
            reshard = getattr(plugin, "sharding_strategy", None)
        if reshard is None:
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")
        if not isinstance(reshard, bool):  # FSDP1's strategies: only SHARD_GRAD_OP (ZeRO-2) keeps the gathered weights
            reshard = str(getattr(reshard, "name", reshard)).strip().upper() not in _KEEP_GATHERED
        offload = getattr(plugin, "cpu_offload", None)
        if offload is None:
            offload = parse_flag_from_env("FSDP_OFFLOAD_PARAMS")
        elif not isinstance(offload, bool):  # FSDP2's CPUOffloadPolicy / OffloadPolicy, FSDP1's CPUOffload(offload_params)
            from torch.distributed.fsdp import CPUOffloadPolicy

            offload = isinstance(offload, CPUOffloadPolicy) or bool(getattr(offload, "offload_params", False))
        wrap = getattr(plugin, "transformer_cls_names_to_wrap", None) or os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        if isinstance(wrap, str):
            wrap = wrap.split(",")
        return cls(reshard, offload, tuple(w.strip() for w in wrap if w.strip()))


#: values of ``fsdp_reshard_after_forward`` (FSDP2: a bool; FSDP1: the sharding strategy, by name or number) that keep
#: a block's gathered weights from its forward to its backward
_KEEP_GATHERED = ("FALSE", "0", "NO", "OFF", "SHARD_GRAD_OP", "2", "_HYBRID_SHARD_ZERO2", "5")


def shard_frozen(model: nn.Module, params: dict[str, nn.Parameter], accelerator, settings: ShardSettings | None = None) -> dict:
    """Shard every parameter of ``model`` but ``params`` across the processes (FSDP2 ``fully_shard``, block by block,
    then the root); ``params`` move to the process's device whole. In place: ``model`` and the ``params`` objects keep
    their identity. Returns what a record says about it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    settings = settings or ShardSettings.of(accelerator)
    wrap = set(settings.wrap or getattr(model, "_no_split_modules", None) or ())
    unknown = wrap - {type(m).__name__ for m in model.modules()}
    if settings.wrap and unknown:
        raise ShardingError(f"fsdp_transformer_layer_cls_to_wrap names {sorted(unknown)}, which this model does not have; "
                            f"its blocks are {sorted(set(getattr(model, '_no_split_modules', None) or ()))}")
    device = torch.device(accelerator.device)
    world = accelerator.num_processes
    mesh = init_device_mesh(device.type, (world,))
    ignored = set(params.values())
    offload = CPUOffloadPolicy() if settings.offload_params and device.type != "cpu" else OffloadPolicy()
    kwargs = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload, ignored_params=ignored)

    def frozen_in(module: nn.Module) -> bool:
        return any(p not in ignored for p in module.parameters())

    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in wrap]
    for module in reversed(blocks):  # children before their parents (FSDP2 nests bottom-up)
        if frozen_in(module):
            fully_shard(module, **kwargs)
    if frozen_in(model):
        fully_shard(model, **kwargs)
    for p in params.values():  # the targets stay plain tensors, whole on every process
        if p.device != device:
            p.data = p.data.to(device)
    frozen = sum(p.numel() for p in model.parameters() if p not in ignored)
    return {"kind": "fsdp2", "processes": world, "sharded_blocks": sum(map(frozen_in, blocks)),
            "sharded_parameters": int(frozen), "whole_parameters": int(sum(p.numel() for p in params.values())),
            **asdict(settings), "wrap": sorted(wrap)}


@torch.no_grad()
def all_reduce_grads(params, world: int) -> None:
    """Average the gradients of ``params`` across the ``world`` processes in place (as DDP does after a backward); a
    tensor with no gradient joins as zeros, so every process makes the same calls."""
    import torch.distributed as dist

    if world <= 1:
        return
    handles = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        handles.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
    for h, p in zip(handles, params):
        h.wait()
        p.grad.div_(world)


def release_meshes() -> None:
    """Free what a sharded run leaves behind (call once its modules are dropped, before its process groups end): the
    device mesh lives on in DTensor's sharding-propagation caches, and with it the mesh's process groups and their gloo
    worker threads, which would then end during the interpreter's shutdown, where they can abort the process."""
    try:
        from torch.distributed.tensor._redistribute import _gen_transform_infos
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()  # the Python and the C++ fast path's
        ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
        _gen_transform_infos.cache_clear()
    except (ImportError, AttributeError):  # another torch: its caches are its own
        pass
    gc.collect()


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`shard_frozen` (its forward is then a collective: every process must run
    the same number of them)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def agree_max(n: int, module: nn.Module, device=None) -> int:
    """The largest ``n`` over the processes when ``module`` is sharded (``n`` itself otherwise): a loop of forwards whose
    length depends on each process's own draws (ESD's partial sampling) runs this many on every process."""
    if not is_sharded(module):
        return n
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# -- optimizer state as safetensors (a sharded checkpoint holds the targets and their optimizer state whole) ------

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer's state as flat tensors (``{index}.{key}``) and metadata (param groups, non-tensor values)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Put back what :func:`optimizer_tensors` saved."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in json.loads(metadata.get("scalars", "{}")).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON has no tuples: torch's optimizers keep their pairs (Adam's betas) as tuples
        group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_sharded_state(folder, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """The trained tensors and the optimizer state of a sharded run (identical on every process: one writer)."""
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(folder / TARGETS_FILE))
    tensors, metadata = optimizer_tensors(optimizer)
    save_file(tensors, str(folder / OPTIMIZER_FILE), metadata=metadata)


def load_sharded_state(folder, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Put back what :func:`save_sharded_state` wrote (the optimizer moves its state to the parameters' device)."""
    saved = load_file(str(folder / TARGETS_FILE))
    if set(saved) != set(params):
        raise CheckpointError(f"{folder} holds other targeted tensors than this run ({len(saved)} vs {len(params)})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    with safe_open(str(folder / OPTIMIZER_FILE), "pt", device="cpu") as f:
        load_optimizer_tensors(optimizer, {k: f.get_tensor(k) for k in f.keys()}, f.metadata())
