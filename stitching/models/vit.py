"""Vision transformers (timm's ``VisionTransformer``) made cuttable.

The network runs as ``blocks``: patch embedding (normalisation, patches, class token,
position embedding), every transformer block, and the head (final norm, class token,
linear classifier). Cut points are the output tokens ``[N, 1 + patches, width]`` of every
transformer block; a stitch between two ViTs is a linear map on the embedding dimension
applied to every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from stitching.models.cutting import CuttableModel, CutPoint
from stitching.models.inputs import ImageInputs
from stitching.models.layout import Layout
from stitching.models.resnet import Normalize


class PatchEmbedding(nn.Module):
    """Image → tokens: normalise, embed patches, prepend the class token, add positions."""

    def __init__(self, vit: VisionTransformer, normalize: Normalize):
        super().__init__()
        self.normalize = normalize
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.norm_pre = vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.normalize(x))
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm_pre(tokens)


class TokenHead(nn.Module):
    """Tokens → logits: final LayerNorm, class token, linear classifier."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.norm = vit.norm
        self.fc = vit.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(tokens)[:, 0])


class CuttableViT(CuttableModel):
    """A timm ViT re-expressed as ``blocks`` with a cut point after every transformer block.

    Args:
        num_classes: size of the classifier output.
        width: embedding dimension (ViT-Ti: 192); heads = width // 64 (at least 1).
        depth: transformer blocks (ViT-Ti: 12).
        image_size, patch_size: 32 and 4 give 64 patch tokens for CIFAR-sized inputs.
        mean, std: input normalisation applied inside the embedding.
    """

    def __init__(self, num_classes: int = 10, width: int = 192, depth: int = 12, in_channels: int = 3,
                 image_size: int = 32, patch_size: int = 4, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        vit = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_channels,
                                num_classes=num_classes, embed_dim=width, depth=depth,
                                num_heads=max(1, width // 64), mlp_ratio=4.0, global_pool="token")
        self._build(vit, Normalize(mean, std))

    def _build(self, vit: VisionTransformer, normalize: Normalize) -> None:
        self.num_classes = vit.num_classes
        self.blocks = nn.ModuleList([PatchEmbedding(vit, normalize), *vit.blocks, TokenHead(vit)])
        self.block_names = ["embed", *[f"block{b}" for b in range(len(vit.blocks))], "head"]
        grid = tuple(vit.patch_embed.grid_size)
        layout = Layout("tokens", prefix_tokens=1, grid=grid, pool="first")
        positions = [p for p, name in enumerate(self.block_names) if name.startswith("block")]
        self.cut_points = tuple(CutPoint(i, self.block_names[p], p, layout) for i, p in enumerate(positions, 1))
        size = tuple(vit.patch_embed.img_size)
        self.input_spec = ImageInputs(channels=vit.patch_embed.proj.in_channels, size=size,
                                      mean=tuple(normalize.mean.flatten().tolist()),
                                      std=tuple(normalize.std.flatten().tolist()))

    @classmethod
    def from_timm(cls, vit: VisionTransformer, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> CuttableViT:
        """Wrap an existing timm ViT (class-token pooling, learned positions), sharing its weights."""
        if vit.global_pool != "token" or vit.cls_token is None or vit.reg_token is not None:
            raise ValueError("only class-token ViTs without register tokens can be cut here")
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(vit, Normalize(mean, std))
        return model


def vit_tiny(**kwargs) -> CuttableViT:
    return CuttableViT(**{"width": 192, "depth": 12, **kwargs})
