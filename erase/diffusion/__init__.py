"""The diffusion side of erasure: the model families (``families/``), the adapter that turns a denoiser into an
``erase.core`` adapter (``adapter``), forget / retain data (``data``), batched resumable generation (``generate``) and
audit prompt tables (``prompt_table``)."""
