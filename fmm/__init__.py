"""fmm: functional multimodal models for PyTorch.

A model is ``(config, params, pure functions)``: ``params`` is a pytree of tensors and every
layer, loss and model is a function you can ``torch.func.grad``, ``vmap`` and
``torch.compile``.
"""

from fmm import losses, nn, random, tree

__version__ = "0.1.0"
__all__ = ["losses", "nn", "random", "tree"]
