"""Original (non-diffusers) key layouts, one module per layout: ``ldm`` (SD 1.x / 2.x / XL single files)."""
