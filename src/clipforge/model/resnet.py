"""OpenAI's modified ResNet image tower (Radford et al., 2021, §2.4; ``clip/model.py``).

Three changes from torchvision's ResNet: a stem of three 3x3 convolutions with an average
pool instead of one 7x7 convolution and a max pool; anti-aliased downsampling (an average pool
before each strided step, Zhang 2019, instead of strided convolutions); and attention pooling
(one query, the mean of the feature map) instead of global average pooling.  Parameter names
match OpenAI's checkpoints.  On the CPU the tower runs in channels-last layout (see
`ModifiedResNet.channels_last`; `benchmarks/bench_demo_step.py` measures it).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.model.config import VisionConfig, check_image_shape

__all__ = ["Bottleneck", "AttentionPool2d", "ModifiedResNet"]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool when strided) -> 1x1 (4x wider), plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Every convolution has stride 1; a stride > 1 is an average pool after conv2.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            # The shortcut pools first, then projects with a stride-1 convolution.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the map's mean over [mean, pixels]; returns the mean's row."""

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        H = self.heads
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        x = x + self.positional_embedding.to(x.dtype)
        L = x.shape[1]
        # Only the first row (the mean) is read out, so only it needs a query.
        q = self.q_proj(x[:, :1]).view(B, 1, H, C // H).transpose(1, 2)  # [B, H, 1, C/H]
        k = self.k_proj(x).view(B, L, H, C // H).transpose(1, 2)  # [B, H, L, C/H]
        v = self.v_proj(x).view(B, L, H, C // H).transpose(1, 2)  # [B, H, L, C/H]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, C/H]
        y = y.transpose(1, 2).reshape(B, C)  # [B, C]
        return self.c_proj(y)  # [B, output_dim]


class ModifiedResNet(nn.Module):
    """Images [B, 3, S, S] -> features [B, output_dim]; S must be a multiple of 32."""

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        if not config.is_resnet:
            raise ValueError("ModifiedResNet needs VisionConfig.patch_size=None")
        self.image_size = config.image_size
        width = config.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for i, depth in enumerate(config.layers):
            planes = width * 2**i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(config.image_size // 32, width * 32, config.heads, output_dim)
        # On the CPU, run the convolutions on channels-last (NHWC) tensors, where oneDNN's
        # kernels and their gradients are faster (values equal up to rounding); each layer keeps
        # the layout of its input.  BatchNorm over few channels is slower in that layout, so a
        # narrow stem (under 32 channels out) stays NCHW and the switch comes after it.
        # Not a parameter: checkpoints do not change.
        self.channels_last = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI's initialisation (``CLIP.initialize_parameters``)."""
        pool = self.attnpool
        std = pool.c_proj.in_features**-0.5
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(linear.weight, std=std)
        # Each residual branch starts as zero (Goyal et al., 2017, §5.1).
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError(
                "gradient checkpointing is not supported for the ResNet image tower: "
                "recomputing a block would update its BatchNorm running statistics twice"
            )

    def forward(self, images: Tensor) -> Tensor:
        check_image_shape(images, self.image_size)
        nhwc = self.channels_last and images.device.type == "cpu"
        if nhwc and self.conv3.out_channels >= 32:  # the stem's width
            images = images.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(images)))  # [B, w/2, S/2, S/2]
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))  # [B, w, S/2, S/2]
        x = self.avgpool(x)  # [B, w, S/4, S/4]
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.layer1(x)  # [B, 4w, S/4, S/4]
        x = self.layer2(x)  # [B, 8w, S/8, S/8]
        x = self.layer3(x)  # [B, 16w, S/16, S/16]
        x = self.layer4(x)  # [B, 32w, S/32, S/32]
        return self.attnpool(x)  # [B, output_dim]
