"""A ResNet backbone (bottleneck blocks, frozen batch norm) as pure functions.

The layout is torchvision's ResNet v1.5 (the stride on each block's 3x3 conv): a 7x7
stride-2 stem conv, batch norm, ReLU, a 3x3 stride-2 max pool, then four stages of
bottleneck blocks (1x1 down to ``planes``, 3x3, 1x1 up to ``4 * planes``) whose first
block strides (stages 2-4) and projects its shortcut. :func:`resnet` returns the last
stage's features, ``[B, 32 * width, H / 32, W / 32]``: the feature map detectors read.

Batch norm is frozen, as detectors fine-tune it (DETR, MDETR): the running statistics
and the affine params are constants of the pretrained net, never trained, so their
leaves are read detached. ``frozen_stages`` also freezes the stem and the first stages'
convolutions (MDETR trains only stages 2-4).

Param tree (torchvision's names but a named ``downsample``)::

    conv1.weight [width, 3, 7, 7]        bn1.{weight, bias, running_mean, running_var}
    layer{1..4}.N.conv{1,2,3}.weight     layer{1..4}.N.bn{1,2,3}.*
    layer{1..4}.0.downsample.{conv.weight, bn.*}

Example::

    cfg = ResNetConfig(depths=(1, 1, 1, 1), width=8)
    feats = resnet(init_resnet(cfg, fmm.random.key(0)), torch.rand(2, 3, 64, 64), cfg=cfg)
    # [2, 256, 2, 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fmm import random
from fmm.nn.conv import conv2d, init_conv2d
from fmm.nn.norm import batch_norm, init_batch_norm

Params = dict[str, Any]
EXPANSION = 4  # a bottleneck's output is 4x its inner width


@dataclass(frozen=True, kw_only=True)
class ResNetConfig:
    """``depths``: bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``, ResNet-101:
    ``(3, 4, 23, 3)``); ``width``: the stem's channels and stage 1's inner width (64 in
    the published nets; stage ``s`` has ``width * 2**(s-1)`` inner and 4x that out).
    ``frozen_stages``: the stem and this many first stages take no gradient (0: only the
    batch norms are frozen). ``norm_eps``: the frozen batch norm's epsilon."""

    depths: tuple[int, ...] = (3, 4, 23, 3)
    width: int = 64
    frozen_stages: int = 1
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))  # JSON gives a list
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"ResNetConfig: depths must be 4 positive ints, got {self.depths}")
        if self.width < 1:
            raise ValueError(f"ResNetConfig: width must be positive, got {self.width}")
        if not 0 <= self.frozen_stages <= 4:
            raise ValueError(
                f"ResNetConfig: frozen_stages must be in [0, 4], got {self.frozen_stages}"
            )

    @property
    def channels(self) -> int:
        """Channels of the last stage's features."""
        return self.width * 8 * EXPANSION


def _init_conv_bn(cin: int, cout: int, kernel: int, key, dtype) -> tuple[Params, Params]:
    conv = init_conv2d(cin, cout, kernel, key, bias=False, dtype=dtype)
    return conv, init_batch_norm(cout, device=key.device, dtype=dtype)


def _init_bottleneck(cin: int, planes: int, project: bool, key, dtype) -> Params:
    p: Params = {}
    sizes = ((cin, planes, 1), (planes, planes, 3), (planes, planes * EXPANSION, 1))
    for i, (a, b, k) in enumerate(sizes, 1):
        p[f"conv{i}"], p[f"bn{i}"] = _init_conv_bn(a, b, k, random.fold_in(key, f"conv{i}"), dtype)
    if project:
        conv, bn = _init_conv_bn(cin, planes * EXPANSION, 1, random.fold_in(key, "down"), dtype)
        p["downsample"] = {"conv": conv, "bn": bn}
    return p


def init_resnet(
    cfg: ResNetConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Params:
    """Fresh params (He-initialised convs, identity batch norms): the tree in the module
    docstring. Pure in ``(cfg, key)``; a ``meta`` key gives shapes only."""
    params: Params = {}
    params["conv1"], params["bn1"] = _init_conv_bn(
        3, cfg.width, 7, random.fold_in(key, "stem"), dtype
    )
    cin = cfg.width
    for s, depth in enumerate(cfg.depths, 1):
        planes, k = cfg.width * 2 ** (s - 1), random.fold_in(key, f"layer{s}")
        blocks = []
        for i in range(depth):
            blocks.append(_init_bottleneck(cin, planes, i == 0, random.fold_in(k, i), dtype))
            cin = planes * EXPANSION
        params[f"layer{s}"] = blocks
    return params


def _frozen(params: Params) -> Params:
    return {name: leaf.detach() for name, leaf in params.items()}


def _conv_bn(p: Params, bn: Params, x, cfg: ResNetConfig, *, stride=1, padding=0, freeze=False):
    conv = _frozen(p) if freeze else p
    return batch_norm(
        _frozen(bn), conv2d(conv, x, stride=stride, padding=padding), train=False, eps=cfg.norm_eps
    )


def _bottleneck(p: Params, x: torch.Tensor, stride: int, cfg: ResNetConfig, freeze: bool):
    h = F.relu(_conv_bn(p["conv1"], p["bn1"], x, cfg, freeze=freeze))
    h = F.relu(_conv_bn(p["conv2"], p["bn2"], h, cfg, stride=stride, padding=1, freeze=freeze))
    h = _conv_bn(p["conv3"], p["bn3"], h, cfg, freeze=freeze)
    if "downsample" in p:
        d = p["downsample"]
        x = _conv_bn(d["conv"], d["bn"], x, cfg, stride=stride, freeze=freeze)
    return F.relu(h + x)


def resnet(params: Params, images: torch.Tensor, *, cfg: ResNetConfig) -> torch.Tensor:
    """The last stage's features of ``images: [B, 3, H, W]`` ->
    ``[B, cfg.channels, ceil(H / 32), ceil(W / 32)]`` (each stride-2 step rounds up)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"resnet: images must be [batch, 3, H, W], got {list(images.shape)}")
    frozen = cfg.frozen_stages
    x = F.relu(
        _conv_bn(
            params["conv1"], params["bn1"], images, cfg, stride=2, padding=3, freeze=frozen > 0
        )
    )
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for s in range(1, 5):
        for i, block in enumerate(params[f"layer{s}"]):
            stride = 2 if s > 1 and i == 0 else 1
            x = _bottleneck(block, x, stride, cfg, freeze=s <= frozen)
    return x
