"""Sharded launches (erase/core/sharding.py): which launches shard, the settings taken from the accelerate config,
the refusals, and the pieces a sharded checkpoint is made of. The sharded runs themselves are launched on 2 CPU
processes in tests/test_transformer_families.py and tests/test_sd.py (FSDP == DDP)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from classify.adapter import ClassifierAdapter
from erase.core import EngineConfig, build_method, run


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_deepspeed_and_megatron_are_refused_before_anything_runs(kind, mlp, digits_tensors, tmp_path):
    """The engine shards with FSDP only (erase.core.sharding): a DeepSpeed / Megatron launch is one line, weights untouched."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from erase.core import ShardingError

    x, y = digits_tensors
    forget, retain = (x[:64], y[:64]), (x[64:], y[64:])
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=32)
    fake = SimpleNamespace(distributed_type=getattr(DistributedType, kind))
    with pytest.raises(ShardingError, match=f"shards parameters with {kind}.*fsdp_bf16.yaml.*--multi_gpu"):
        run(adapter, build_method("scissorhands"), EngineConfig(output_dir=str(tmp_path), max_train_steps=1), accelerator=fake)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_which_launches_shard(monkeypatch):
    """FSDP (accelerate's type, or --use_fsdp / an FSDP config on a CPU launch of several processes) shards; fp16 under
    FSDP is refused in one line; data parallelism and one process do not shard."""
    from types import SimpleNamespace as NS

    from accelerate.utils import DistributedType

    from erase.core.sharding import ShardingError, sharding_of

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for fine in ("NO", "MULTI_CPU", "MULTI_GPU"):
        assert sharding_of(NS(distributed_type=getattr(DistributedType, fine), num_processes=2)) is None
    assert sharding_of(NS(distributed_type=DistributedType.FSDP, num_processes=8, mixed_precision="bf16")) == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding_of(NS(distributed_type=DistributedType.MULTI_CPU, num_processes=2, mixed_precision="no")) == "fsdp"
    assert sharding_of(NS(distributed_type=DistributedType.NO, num_processes=1)) is None
    with pytest.raises(ShardingError, match="'fp16' is not supported with FSDP.*bf16"):
        sharding_of(NS(distributed_type=DistributedType.FSDP, num_processes=2, mixed_precision="fp16"))


def test_shard_settings_follow_the_accelerate_config(monkeypatch):
    """The FSDP plugin's settings (FSDP2 and FSDP1 spellings) or, on a CPU launch, the environment accelerate sets."""
    from types import SimpleNamespace as NS

    from accelerate.utils import FullyShardedDataParallelPlugin as Plugin

    from erase.core.sharding import ShardSettings

    def of(**kw):
        return ShardSettings.of(NS(state=NS(fsdp_plugin=Plugin(transformer_cls_names_to_wrap=["A", "B"], **kw))))

    assert of(fsdp_version=2, cpu_offload=True, reshard_after_forward=False) == ShardSettings(False, True, ("A", "B"))
    assert of(fsdp_version=2) == ShardSettings(True, False, ("A", "B"))
    assert of(fsdp_version=1, cpu_offload=True, sharding_strategy="SHARD_GRAD_OP", sync_module_states=False) == ShardSettings(False, True, ("A", "B"))
    for name in ("FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS", "FSDP_TRANSFORMER_CLS_TO_WRAP"):
        monkeypatch.delenv(name, raising=False)
    assert ShardSettings.of(NS()) == ShardSettings(True, False, ())
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block, Other")
    assert ShardSettings.of(NS()) == ShardSettings(False, True, ("Block", "Other"))


def test_a_wrap_class_the_model_lacks_is_one_line(mlp):
    from types import SimpleNamespace as NS

    from erase.core.sharding import ShardingError, ShardSettings, shard_frozen

    with pytest.raises(ShardingError, match=r"names \['NoSuchBlock'\], which this model does not have"):
        shard_frozen(mlp, dict(mlp.named_parameters()), NS(device="cpu", num_processes=2), ShardSettings(wrap=("NoSuchBlock",)))


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_optimizer_state_round_trips_through_safetensors(opt, mlp, tmp_path):
    """A sharded checkpoint's optimizer state (no pickle): saved and loaded, the next step is the same as without the trip."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from erase.core.engine import build_optimizer
    from erase.core.sharding import load_optimizer_tensors, optimizer_tensors

    params = [p for p in mlp.parameters()]
    config = EngineConfig(optimizer=opt, lr=1e-2)
    first = build_optimizer(params, config)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        first.step()
    tensors, metadata = optimizer_tensors(first)
    save_file(tensors, str(tmp_path / "o.safetensors"), metadata=metadata)
    second = build_optimizer(params, config)
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        load_optimizer_tensors(second, {k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    a, b = first.state_dict(), second.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and a["state"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k]))


def test_a_sharded_checkpoint_is_intact_and_resumes_only_a_sharded_run(tmp_path):
    """A sharded checkpoint (targets + optimizer state as safetensors, no accelerate model file) is intact; resuming it
    from a data-parallel launch, or the other way round, is one line naming the launch."""
    from safetensors.torch import save_file

    from erase.core.checkpoints import CheckpointError, check_resume, read_state, record

    method = build_method("scissorhands")
    current = record(method, EngineConfig(), 2, {"concept": "x"})
    sharded = {**current, "sharding": "fsdp"}
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "erase_state.json").write_text(json.dumps({"step": 2, "streams": {}, "record": sharded}))
    with pytest.raises(CheckpointError, match="incomplete"):
        read_state(ckpt)
    save_file({"w": torch.zeros(2)}, str(ckpt / "targets.safetensors"))
    save_file({"0.exp_avg": torch.zeros(2)}, str(ckpt / "optimizer.safetensors"), metadata={"param_groups": "[]"})
    state = read_state(ckpt)
    check_resume(state, sharded, ckpt, 4)  # the same launch: fine
    with pytest.raises(CheckpointError, match=r"launch FSDP -> data parallel"):
        check_resume(state, current, ckpt, 4)
    with pytest.raises(CheckpointError, match=r"launch data parallel -> FSDP"):
        check_resume({**state, "record": current}, sharded, ckpt, 4)


RELEASE_SCRIPT = r"""
import os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from erase.core.sharding import release_meshes

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
fully_shard(model[0]), fully_shard(model)
model(torch.randn(3, 4)).sum().backward()
del model
if sys.argv[2] == "release":
    release_meshes()
dist.destroy_process_group()
print("gloo threads after the groups ended:", len(gloo_threads()))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_a_sharded_run_lets_its_process_groups_end_before_the_interpreter_does():
    """After a sharded run the device mesh lives on in DTensor's caches (and with it its process groups' gloo worker
    threads, which otherwise end during the interpreter's shutdown, where a process aborted once in CI):
    ``release_meshes`` frees it, so that ending the process groups joins those threads. The control run, without it,
    shows the threads outliving the groups."""
    import subprocess
    import sys

    from eval_fixtures import free_port

    def gloo_left(mode):
        out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, str(free_port()), mode], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().rsplit(" ", 1)[-1])

    assert gloo_left("keep") > 0  # the mesh outlives destroy_process_group: its threads are still there
    assert gloo_left("release") == 0
