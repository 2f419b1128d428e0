"""FLUX.1 Redux: an image turned into 729 extra "text" tokens for FLUX.

Redux conditions FLUX on an image without any change to the transformer. A frozen SigLIP vision
tower (google/siglip-so400m-patch14-384) describes the image as one feature per 14x14 patch, and a
small projector, the only weights of `flux1-redux-dev.safetensors`, maps those features into the
space of T5 states that FLUX's `txt_in` reads:

    image     [B, 3, 384, 384]   resized to 384 x 384, scaled to [-1, 1]     (minigen.image.preprocess_siglip)
    SigLIP    [B, 729, 1152]     last_hidden_state, after post_layernorm     (27 x 27 patches, no CLS)
    projector [B, 729, 4096]     redux_down(silu(redux_up(x)))               (ReduxImageEncoder)

The tokens are appended after the T5 tokens and, like them, carry position id (0, 0, 0):

    txt     = cat([t5_states, redux_tokens(...)], dim=1)     [B, L + 729, 4096]   (L: 512 dev, 256 schnell)
    txt_ids = zeros(B, L + 729, 3)

FLUX then attends to the image's description as if it were part of the prompt; the same projector
serves FLUX.1 dev and schnell. With no prompt, diffusers' FluxPriorReduxPipeline passes zeros as
the T5 states and as the pooled CLIP vector.

The SigLIP tower is transformers' `SiglipVisionModel` of a `SiglipConfig`, built from the hub file by
the Redux loader (`load_redux`). The file also holds SigLIP's attention-pooling head
(`vision_model.head.*`): it is loaded with the rest but Redux never reads its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel

# --- the projector: flux1-redux-dev.safetensors ---------------------------------------------------


@dataclass(frozen=True)
class ReduxConfig:
    siglip_dim: int = 1152  # width of the SigLIP features it reads
    hidden: int = 3 * 4096  # width of the one hidden layer
    txt_dim: int = 4096  # width of FLUX's text tokens (T5-XXL states)


PRESETS: dict[str, ReduxConfig] = {
    "redux-dev": ReduxConfig(),
}


class ReduxImageEncoder(nn.Module):
    """SigLIP features [B, N, siglip_dim] -> FLUX text tokens [B, N, txt_dim], one per patch.

    Attribute names are the keys of BFL's `flux1-redux-dev.safetensors`.
    """

    def __init__(self, config: ReduxConfig = PRESETS["redux-dev"]):
        super().__init__()
        self.config = config
        self.redux_up = nn.Linear(config.siglip_dim, config.hidden)
        self.redux_down = nn.Linear(config.hidden, config.txt_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


# --- the SigLIP vision tower -----------------------------------------------------------------------


@dataclass(frozen=True)
class SiglipConfig:
    """Shape of a SigLIP *vision* tower (a ViT without class token; learned position embeddings)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"  # GELU, tanh approximation
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        """Tokens per image: 384 // 14 = 27 patches a side, 729 in all (the 6-pixel rest is cut off)."""
        return (self.image_size // self.patch_size) ** 2

    def to_transformers(self) -> SiglipVisionConfig:
        return SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            patch_size=self.patch_size,
            image_size=self.image_size,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            num_channels=self.num_channels,
        )

    @classmethod
    def from_transformers(cls, config: SiglipVisionConfig) -> SiglipConfig:
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            patch_size=config.patch_size,
            image_size=config.image_size,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
            num_channels=config.num_channels,
        )


SIGLIP_PRESETS: dict[str, SiglipConfig] = {
    # the "shape-optimized" 400M SigLIP at 384 px that Redux reads
    "siglip-so400m-patch14-384": SiglipConfig(
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, patch_size=14, image_size=384
    ),
}


# --- image -> tokens -------------------------------------------------------------------------------


def redux_tokens(siglip: SiglipVisionModel, redux: ReduxImageEncoder, pixel_values: Tensor) -> Tensor:
    """SigLIP input [B, 3, S, S] (from `preprocess_siglip`, minigen.image) -> Redux tokens [B, (S/14)², txt_dim].

    For the released models [B, 729, 4096], to append after the T5 tokens (ids all zero).
    Gradients flow; wrap in `torch.no_grad()` for sampling.
    """
    features = siglip(pixel_values=pixel_values.to(siglip.device, siglip.dtype)).last_hidden_state  # [B, N, 1152]
    projector = redux.redux_up.weight
    return redux(features.to(projector.device, projector.dtype))
