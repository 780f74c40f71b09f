"""Original (non-diffusers) key layouts, one module per layout: ``ldm`` (SD 1.x / 2.x / XL: CompVis / SGM names),
``sd3`` (Stability's MMDiT: SD3, SD3.5), ``flux`` (Black Forest Labs'); ``registry`` is the table that says which
family uses which (:data:`LAYOUTS`, :func:`detect`)."""

from erase.export.layouts.ldm import materialize
from erase.export.layouts.registry import LAYOUTS, Layout, architecture, detect, markers, pipeline_to_file, v_prediction

__all__ = ["LAYOUTS", "Layout", "architecture", "detect", "markers", "materialize", "pipeline_to_file", "v_prediction"]
