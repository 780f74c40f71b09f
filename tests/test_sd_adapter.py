"""erase.diffusion.DiffusionAdapter on a tiny UNet: targets, keyed draws, prediction targets, forget terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def parts():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from erase.diffusion.adapter import LatentSet, PromptEmbeddings

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=2, norm_num_groups=32)
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(6, 4, 8, 8, generator=g), 0.1 * torch.ones(6, 4, 8, 8)
    retain = LatentSet(mean, std, torch.arange(6) % 2)  # prompt rows of the retain table
    forget = LatentSet(mean, std, torch.zeros(6, dtype=torch.long))  # one forget group
    emb = PromptEmbeddings(forget=torch.randn(3, 5, 16, generator=g), retain=torch.randn(2, 5, 16, generator=g),
                           anchor=torch.randn(1, 5, 16, generator=g), uncond=torch.randn(1, 5, 16, generator=g),
                           distill=torch.randn(4, 5, 16, generator=g))
    return unet, (forget, retain), emb, DDPMScheduler


def adapter(parts, prediction_type="epsilon", frozen=False, batch_size=2, **kw):
    from erase.diffusion.adapter import DiffusionAdapter

    unet, (forget, retain), emb, cls = parts
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    return DiffusionAdapter(unet, sched, kw.pop("emb", emb), kw.pop("forget", forget), retain, batch_size=batch_size,
                            device="cpu", esd_ddim_steps=4, frozen_unet=DiffusionAdapter.frozen_copy(unet) if frozen else None, **kw)


def test_target_presets(parts):
    from erase.core import select_parameters
    from erase.diffusion.adapter import TARGET_PRESETS

    unet = parts[0]
    x = select_parameters(unet, "xattn", presets=TARGET_PRESETS)
    s = select_parameters(unet, "selfattn", presets=TARGET_PRESETS)
    u = select_parameters(unet, "noxattn", presets=TARGET_PRESETS)
    full = select_parameters(unet, "full", presets=TARGET_PRESETS)
    assert x and all(".attn2." in n and n.split(".attn2.")[1].split(".")[0] in ("to_q", "to_k", "to_v", "to_out") for n in x)
    assert s and all(".attn1." in n for n in s)
    assert not set(u) & set(x) and "conv_in.weight" in u and "conv_out.weight" not in u
    assert len(full) == len(list(unet.parameters()))


def test_keys_follow_the_global_batch(parts):
    """Process r of N with batch b draws the keys (hence the noise) of positions r*b.. of one process with batch N*b."""
    a1, a2 = adapter(parts, batch_size=2), adapter(parts, batch_size=1)
    one = next(a1.forget_stream(5))
    r0, r1 = next(a2.forget_stream(5, 0, 2)), next(a2.forget_stream(5, 1, 2))
    assert one["index"].tolist() == r0["index"].tolist() + r1["index"].tolist()
    assert one["keys"].tolist() == r0["keys"].tolist() + r1["keys"].tolist()
    assert torch.equal(a1.loss(a1.model, {**one, "index": one["index"][:1], "keys": one["keys"][:1]}), a2.loss(a2.model, r0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target(parts, prediction_type):
    a = adapter(parts, prediction_type)
    batch = next(a.retain_stream(0))
    zt, t, target, r = a._noisy(batch, "loss")
    x0 = (parts[1][1].mean[batch["index"]] + 0.1 * r["eps"]) * a.scaling_factor
    expected = r["noise"] if prediction_type == "epsilon" else a.scheduler.get_velocity(x0, r["noise"], t)
    torch.testing.assert_close(target, expected)
    cond = parts[2].retain[parts[1][1].prompt_index[batch["index"]]]
    manual = F.mse_loss(a.model(zt, t, encoder_hidden_states=cond).sample, expected)
    torch.testing.assert_close(a.loss(a.model, batch), manual)


def test_forget_terms(parts):
    a = adapter(parts, frozen=True)
    batch = next(a.forget_stream(0))
    lf = a.forget_loss(a.model, batch)
    torch.testing.assert_close(a.forget_term("ascent", a.model, batch), -lf)
    assert float(a.forget_term("ascent", a.model, batch, bound=0.01)) == pytest.approx(-0.01)
    for kind in ("redirect", "esd"):
        a.model.zero_grad(set_to_none=True)
        term = a.forget_term(kind, a.model, batch, eta=2.0)
        term.backward()
        assert torch.isfinite(term) and any(p.grad is not None for p in a.model.parameters())
        assert all(p.grad is None for p in a.frozen.parameters())
    # esd with the model equal to the frozen base and eta = 0: the target is the unconditional prediction
    x, t, cond, uncond = a.sample_esd_start(batch)
    with torch.no_grad():
        expected = F.mse_loss(a.model(x, t, encoder_hidden_states=cond).sample, a.frozen(x, t, encoder_hidden_states=uncond).sample)
        torch.testing.assert_close(a.forget_term("esd", a.model, batch, eta=0.0), expected)
    with pytest.raises(ValueError, match="forget term 'nope'"):
        a.forget_term("nope", a.model, batch)


def test_distill_retain_term(parts):
    """distill: zero while the model equals the frozen base, gradients only into the model; the share of empty
    prompts decides which conditions are used; the stream walks the distillation prompts, needing no images."""
    from dataclasses import replace

    a = adapter(parts, frozen=True, retain_mode="distill", distill_empty_fraction=0.0)
    batch = next(a.retain_stream(3))
    assert batch["split"] == "distill" and set(batch["index"].tolist()) <= set(range(4))
    loss = a.retain_loss(a.model, batch)
    assert float(loss) == 0.0
    a.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        a.frozen.conv_in.bias.add_(0.5)  # the base moves away: the term pulls the model back
    loss = a.retain_loss(a.model, batch)
    loss.backward()
    assert float(loss) > 0 and a.model.conv_in.bias.grad is not None and all(p.grad is None for p in a.frozen.parameters())
    other = replace(parts[2], distill=torch.randn(4, 5, 16))
    changed = adapter(parts, frozen=True, retain_mode="distill", distill_empty_fraction=0.0, emb=other)
    changed.frozen = a.frozen
    assert float(changed.retain_loss(a.model, batch)) != float(loss)  # conditions are the distillation prompts
    empty_a = adapter(parts, frozen=True, retain_mode="distill", distill_empty_fraction=1.0)
    empty_b = adapter(parts, frozen=True, retain_mode="distill", distill_empty_fraction=1.0, emb=other)
    empty_a.frozen = empty_b.frozen = a.frozen
    assert float(empty_a.retain_loss(a.model, batch)) == float(empty_b.retain_loss(a.model, batch))  # all unconditional
    both = adapter(parts, frozen=True, retain_mode="both")
    both.frozen = a.frozen
    data_batch = next(both.retain_stream(3))
    assert data_batch["split"] == "retain"
    torch.testing.assert_close(both.retain_loss(a.model, data_batch),
                               both.loss(a.model, data_batch) + both.distill_loss(a.model, data_batch))
    with pytest.raises(ValueError, match="needs the frozen base"):
        adapter(parts, retain_mode="distill")


def test_forget_groups_choose_their_prompts_and_anchor(parts):
    """Group g draws its condition among groups[g] only, and is redirected to its own anchor."""
    from dataclasses import replace

    from erase.diffusion.adapter import LatentSet

    unet, (forget, _), emb, _ = parts
    grouped = LatentSet(forget.mean, forget.std, torch.tensor([0, 1, 0, 1, 1, 0]))
    emb2 = replace(emb, anchor=torch.randn(2, 5, 16), groups=[[0, 1], [2]], group_anchor=[0, 1])
    a = adapter(parts, frozen=True, emb=emb2, forget=grouped, batch_size=6)
    batch = next(a.forget_stream(0))
    r = a._draw(batch["keys"], "loss", (4, 8, 8), grouped.prompt_index[batch["index"]])
    for grp, choice in zip(grouped.prompt_index[batch["index"]].tolist(), r["choice"].tolist()):
        assert (choice == 2) if grp == 1 else (choice in (0, 1))
    ones = {**batch, "index": torch.tensor([1, 3, 4]), "keys": batch["keys"][:3]}
    same_anchor = replace(emb2, anchor=torch.stack([emb2.anchor[1], emb2.anchor[1]]))
    b = adapter(parts, frozen=True, emb=same_anchor, forget=grouped, batch_size=6)
    torch.testing.assert_close(a.forget_term("redirect", a.model, ones), b.forget_term("redirect", b.model, ones))


def test_esd_start_timestep_is_where_x_t_sits(parts):
    """After s DDIM steps x_t sits at ddim.timesteps[s]; the ESD loss is evaluated exactly there."""
    from diffusers import DDIMScheduler

    from erase.diffusion.adapter import _generator, _SALTS

    a = adapter(parts, frozen=True, batch_size=6)
    batch = next(a.forget_stream(3))
    x, t, _, _ = a.sample_esd_start(batch)
    steps = [int(torch.randint(0, a.esd_ddim_steps, (1,), generator=_generator(k, _SALTS["esd"]))) for k in batch["keys"].tolist()]
    ddim = DDIMScheduler.from_config(a.scheduler.config)
    ddim.set_timesteps(a.esd_ddim_steps)
    assert t.tolist() == [int(ddim.timesteps[s]) for s in steps]
    assert 0 in steps and max(t.tolist()) < a.num_train_timesteps
    assert int(t[steps.index(0)]) == int(ddim.timesteps[0])  # s = 0: pure noise, at the schedule's first timestep


def test_forget_captions_condition_their_images(parts, tmp_path):
    """A forget image with a sidecar caption is conditioned on it (a group of one); one without keeps the keyed random
    choice among the concept's forget prompts (the same draw as without any caption)."""
    from dataclasses import replace

    from PIL import Image

    from erase.diffusion.data import caption_index, folder_split
    from erase.diffusion.adapter import LatentSet

    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"img{i}.png")
    (tmp_path / "img1.txt").write_text("a red cube\n")
    (tmp_path / "img4.txt").write_text("a blue sphere")
    (tmp_path / "img5.txt").write_text("a red cube")
    (tmp_path / "img2.txt").write_text("  \n")  # empty: no caption
    images = folder_split("forget", tmp_path, None)
    captions, index = caption_index(images)
    assert captions == [("a blue sphere", 0), ("a red cube", 0)] and index.tolist() == [-1, 1, -1, -1, 0, 1]
    assert images.captioned == [False, True, False, False, True, True] and images.prompts[0] is None

    unet, (forget, _), emb, _ = parts
    table = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))
    n = emb.forget.shape[0]
    # as erase/sd.py builds it: concept prompts are group 0, caption c is group 1 + c (one row each)
    with_captions = replace(emb, forget=torch.cat([emb.forget, table]), groups=[list(range(n)), [n], [n + 1]], group_anchor=[0, 0, 0])
    groups = torch.tensor([1 + int(i) if i >= 0 else 0 for i in index])
    a = adapter(parts, emb=with_captions, forget=LatentSet(forget.mean, forget.std, groups), batch_size=6)
    b = adapter(parts, forget=LatentSet(forget.mean, forget.std, torch.zeros(6, dtype=torch.long)), batch_size=6)
    batch_a, batch_b = next(a.forget_stream(4)), next(b.forget_stream(4))
    assert torch.equal(batch_a["keys"], batch_b["keys"])
    _, _, _, ra = a._noisy(batch_a, "loss")
    _, _, _, rb = b._noisy(batch_b, "loss")
    cond_a, cond_b = a._cond(batch_a, ra), b._cond(batch_b, rb)
    for row, i in enumerate(batch_a["index"].tolist()):
        if index[i] >= 0:
            assert torch.equal(cond_a[row], table[index[i]])
        else:
            assert torch.equal(cond_a[row], cond_b[row])  # keyed: the same draw as without captions
    assert not torch.equal(cond_a, cond_b)
    # the loss uses it: a captioned image's loss equals the loss under its caption
    zt, t, target, _ = a._noisy(batch_a, "loss")
    manual = F.mse_loss(unet(zt, t, encoder_hidden_states=cond_a).sample, target)
    torch.testing.assert_close(a.loss(a.model, batch_a), manual)
