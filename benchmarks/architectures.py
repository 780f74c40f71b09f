"""The real architectures the GPU figures and the memory plan are computed for, written out (nothing is downloaded):
the transformer / text-encoder configs of SD3.5-medium, SD3.5-large and FLUX.1-dev as their hub folders give them
(``transformer/config.json``, ``text_encoder*/config.json``). The UNet families' configs live in benchmarks/sd_step.py
(SD v1.4) and benchmarks/gpu_figures.py (SDXL)."""

from __future__ import annotations

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

#: name -> (family, denoiser class, its config, text encoders as (class, config), T5 tokens, CLIP tokens)
MMDIT = {
    "sd35_medium": ("sd3", "SD3Transformer2DModel", SD35_MEDIUM, [("CLIPTextModelWithProjection", CLIP_L),
                                                                  ("CLIPTextModelWithProjection", CLIP_BIGG), ("T5EncoderModel", T5_XXL)], 256, 77),
    "sd35_large": ("sd3", "SD3Transformer2DModel", SD35_LARGE, [("CLIPTextModelWithProjection", CLIP_L),
                                                                ("CLIPTextModelWithProjection", CLIP_BIGG), ("T5EncoderModel", T5_XXL)], 256, 77),
    "flux_dev": ("flux", "FluxTransformer2DModel", FLUX_DEV, [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)], 512, 0),
}
