"""Triton kernels where the compiler does not already do the job, each with a plain-torch reference.

Public API (other folders use exactly these names):
    postprocess, postprocess_reference, postprocess_triton, triton_available

Importing this package never imports Triton; see triton_support.py.

Other folders call the post-process as `from pidserve import kernels; kernels.postprocess(...)`: the
function shares its name with its module postprocess.py, and `from pidserve.kernels import postprocess`
reads (to import-linter) as an import of that private module.
"""

from .postprocess import postprocess, postprocess_reference, postprocess_triton
from .triton_support import triton_available

__all__ = ["postprocess", "postprocess_reference", "postprocess_triton", "triton_available"]
