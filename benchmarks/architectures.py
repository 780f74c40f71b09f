"""The real architectures the GPU figures and the memory plan are computed for, written out (nothing is downloaded):
the denoiser / VAE / text-encoder / scheduler configs of SD v1.4, SDXL base 1.0, SD3.5-medium, SD3.5-large and
FLUX.1-dev as their hub folders give them (``unet/`` or ``transformer/config.json``, ``vae/``, ``text_encoder*/``,
``scheduler/scheduler_config.json``), and tiny versions of each for ``benchmarks/gpu_figures.py --smoke`` (the
structures eval/tiny.py's ``build_tiny_pipeline`` builds: widths of tens, one or two blocks).

:data:`ARCHS` / :data:`SMOKE_ARCHS` map a name to an :class:`Arch`; :data:`MMDIT` is the table benchmarks/memory_plan.py
reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from benchmarks.sd_step import SD14_UNET

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# vae/config.json of SD v1.4 and SDXL (they differ in sample_size, scaling_factor and SDXL's force_upcast only)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in the first 13 blocks)
SD35_MEDIUM = dict(attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=tuple(range(13)), in_channels=16,
                   joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)
# stabilityai/stable-diffusion-3.5-large transformer/config.json
SD35_LARGE = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096, num_attention_heads=38,
                  num_layers=38, out_channels=16, patch_size=2, pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
                  sample_size=128)
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(attention_head_dim=128, axes_dims_rope=(16, 56, 56), guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768)
# google/t5-v1_1-xxl's encoder (text_encoder_3 of SD3.x, text_encoder_2 of Flux)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False)
# CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders (with projection, as SD3 and SDXL load them)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# the 16-channel VAE of SD3.x and Flux (their configs differ in scaling / shift factor only)
FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                use_quant_conv=False, use_post_quant_conv=False)
# scheduler/scheduler_config.json: SD v1.4 / SDXL's betas (the run trains on DDPM, the I2P protocol samples on LMS),
# SD3.5's flow-matching Euler (shift 3) and FLUX.1-dev's (resolution-dependent shift)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)

#: name -> (family, denoiser class, its config, text encoders as (class, config), T5 tokens, CLIP tokens): memory_plan.py's table
MMDIT = {
    "sd35_medium": ("sd3", "SD3Transformer2DModel", SD35_MEDIUM, [("CLIPTextModelWithProjection", CLIP_L),
                                                                  ("CLIPTextModelWithProjection", CLIP_BIGG), ("T5EncoderModel", T5_XXL)], 256, 77),
    "sd35_large": ("sd3", "SD3Transformer2DModel", SD35_LARGE, [("CLIPTextModelWithProjection", CLIP_L),
                                                                ("CLIPTextModelWithProjection", CLIP_BIGG), ("T5EncoderModel", T5_XXL)], 256, 77),
    "flux_dev": ("flux", "FluxTransformer2DModel", FLUX_DEV, [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)], 512, 0),
}


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per model
class Arch:
    """One model to measure: its family (erase.diffusion.families), the configs of its parts (text encoders in the
    family's order, ``erase.diffusion.families.FAMILIES[family].text_encoders``), the resolution it runs at, the hub id it
    stands for (a name in the run's config only: nothing is read from it) and the whole-erasure targets, where an issue
    set them (issue 10: SD v1.4 <= 5 min and 24 GiB, SDXL <= 15 min and 40 GiB on one H100)."""

    name: str
    family: str
    hub_id: str
    denoiser: dict
    vae: dict
    text: tuple
    scheduler: dict
    resolution: int
    t5_tokens: int = 0  # the T5 tokenizer's length (the family pipeline's max_sequence_length); 0 without T5
    target_minutes: float | None = None
    target_gib: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def latent(self) -> int:
        """Latent side: the resolution over the VAE's downsampling."""
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("sd14", "sd1", "CompVis/stable-diffusion-v1-4", SD14_UNET, dict(SD_VAE, sample_size=512, scaling_factor=0.18215), (CLIP_L,),
         SD_SCHEDULER, 512, target_minutes=5, target_gib=24),
    Arch("sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", SDXL_UNET,
         dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True), (CLIP_L, CLIP_BIGG), SD_SCHEDULER, 1024,
         target_minutes=15, target_gib=40),
    Arch("sd35_medium", "sd3", "stabilityai/stable-diffusion-3.5-medium", SD35_MEDIUM,
         dict(FLOW_VAE, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609), (CLIP_L, CLIP_BIGG, T5_XXL), SD3_SCHEDULER, 1024,
         t5_tokens=256),
    Arch("sd35_large", "sd3", "stabilityai/stable-diffusion-3.5-large", SD35_LARGE,
         dict(FLOW_VAE, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609), (CLIP_L, CLIP_BIGG, T5_XXL), SD3_SCHEDULER, 1024,
         t5_tokens=256),
    Arch("flux_dev", "flux", "black-forest-labs/FLUX.1-dev", FLUX_DEV,
         dict(FLOW_VAE, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159), (CLIP_L, T5_XXL), FLUX_SCHEDULER, 1024,
         t5_tokens=512),
)}


# --smoke: the same structures at widths of tens (eval/tiny.py's tiny families), 16 / 32 px images
def _tiny_clip(width: int, act: str = "quick_gelu") -> dict:
    return dict(CLIP_L, vocab_size=600, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=width, hidden_act=act)


_TINY_T5 = dict(T5_XXL, vocab_size=256, num_layers=2, num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
_TINY_SD_VAE = dict(SD_VAE, sample_size=16, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
_TINY_FLOW_VAE = dict(FLOW_VAE, sample_size=32, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
# eval/tiny.py build_tiny_dit("sd35"): 2 joint blocks of 2 heads x 64, RMS qk-norm, dual attention in the first
_TINY_SD35 = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                  joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=96, pos_embed_max_size=16, qk_norm="rms_norm")

SMOKE_ARCHS: dict[str, Arch] = {a.name: a for a in (
    replace(ARCHS["sd14"], resolution=16, vae=dict(_TINY_SD_VAE, scaling_factor=0.18215), text=(_tiny_clip(32),),
            denoiser=dict(SD14_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=2)),
    replace(ARCHS["sdxl"], resolution=16, vae=dict(_TINY_SD_VAE, scaling_factor=0.13025), text=(_tiny_clip(16), _tiny_clip(16, "gelu")),
            denoiser=dict(SDXL_UNET, sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 16)),
    # SD3: CLIP-L 32 + CLIP-G 64 wide (pooled 96), T5 128 wide (the hidden states padded to it)
    replace(ARCHS["sd35_medium"], resolution=32, vae=dict(_TINY_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609), t5_tokens=32,
            text=(_tiny_clip(32), _tiny_clip(64, "gelu"), dict(_TINY_T5, d_model=128, d_kv=32, d_ff=256)),
            denoiser=dict(_TINY_SD35, dual_attention_layers=(0,))),
    replace(ARCHS["sd35_large"], resolution=32, vae=dict(_TINY_FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609), t5_tokens=32,
            text=(_tiny_clip(32), _tiny_clip(64, "gelu"), dict(_TINY_T5, d_model=128, d_kv=32, d_ff=256)), denoiser=_TINY_SD35),
    # eval/tiny.py build_tiny_dit("flux_dev"): 1 double- and 2 single-stream blocks of 2 heads x 16, packed 2x2 latents
    replace(ARCHS["flux_dev"], resolution=32, vae=dict(_TINY_FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159), t5_tokens=32,
            text=(_tiny_clip(32), dict(_TINY_T5, d_model=64, d_kv=16, d_ff=128)),
            denoiser=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))),
)}
