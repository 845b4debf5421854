"""fmm: functional multimodal models for PyTorch.

A model is ``(config, params, pure functions)``: ``params`` is a pytree of tensors and every
layer, loss and model is a function you can ``torch.func.grad``, ``vmap`` and
``torch.compile``.
"""

import os

# MKL, torch's BLAS on x86, picks some kernels by the memory alignment of their operands
# unless its conditional numerical reproducibility is on: two equal rows of one batched
# attention then round differently (seen on an AMD EPYC with AVX-512, where torch's CPU
# flash attention calls MKL from each thread's own buffers), and a served request's tokens
# would depend on which slot it sits in. MKL reads this once, at its first computation, so
# it is set before any: a value the user set is kept (see fmm.invariance.mkl_reproducible).
os.environ.setdefault("MKL_CBWR", "AUTO")

from fmm import losses, nn, random, tree

__version__ = "0.1.0"
__all__ = ["losses", "nn", "random", "tree"]
