"""Exports of an erased model: the folder and its record (``folder``), the model card (``card``), the formats
(``formats``: the spec and the seam; one module per format: ``single_file``, ``lora``), the original key layouts of each
family (``layouts/``) and the offline converter (``convert``, ``python -m erase.export``)."""

from erase.export.folder import base_identity, export, finish_stage, previous_export, staged_export, versions
from erase.export.formats import CONFIG_NAME, DELTA_NAME, EXPORT_FORMATS, ExportSpec, delta_name, denoiser_folder, spec_from_args

__all__ = ["CONFIG_NAME", "DELTA_NAME", "EXPORT_FORMATS", "ExportSpec", "base_identity", "delta_name", "denoiser_folder", "export",
           "finish_stage", "previous_export", "spec_from_args", "staged_export", "versions"]
