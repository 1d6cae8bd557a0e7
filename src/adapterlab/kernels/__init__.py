"""Low-rank and sparse update ops: the one dispatch point the method classes call.

Today every op runs the plain-torch reference (kernels/reference.py), which is also the oracle
for tests; the Triton kernels plug in behind these same names.
"""
from .reference import lora_add

__all__ = ["lora_add"]
