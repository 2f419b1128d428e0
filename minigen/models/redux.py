"""FLUX.1 Redux: an image turned into 729 extra "text" tokens for FLUX.

Redux conditions FLUX on an image without any change to the transformer. A frozen SigLIP vision
tower (google/siglip-so400m-patch14-384) describes the image as one feature per 14x14 patch, and a
small projector, the only weights of `flux1-redux-dev.safetensors`, maps those features into the
space of T5 states that FLUX's `txt_in` reads:

    image     [B, 3, 384, 384]   resized to 384 x 384, scaled to [-1, 1]     (preprocess_siglip)
    SigLIP    [B, 729, 1152]     last_hidden_state, after post_layernorm     (27 x 27 patches, no CLS)
    projector [B, 729, 4096]     redux_down(silu(redux_up(x)))               (ReduxImageEncoder)

The tokens are appended after the T5 tokens and, like them, carry position id (0, 0, 0):

    txt     = cat([t5_states, redux_tokens(...)], dim=1)     [B, L + 729, 4096]   (L: 512 dev, 256 schnell)
    txt_ids = zeros(B, L + 729, 3)

FLUX then attends to the image's description as if it were part of the prompt; the same projector
serves FLUX.1 dev and schnell. With no prompt, diffusers' FluxPriorReduxPipeline passes zeros as
the T5 states and as the pooled CLIP vector.

The SigLIP tower is transformers' `SiglipVisionModel`; `build_siglip` makes one from a config and
a state dict in the hub file's layout (`vision_model.*`), the same way `minigen.text.encoders`
builds CLIP. The file also holds SigLIP's attention-pooling head (`vision_model.head.*`): it is
loaded with the rest but Redux never reads its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from minigen.loading.coverage import load_exact

# --- the projector: flux1-redux-dev.safetensors ---------------------------------------------------


@dataclass(frozen=True)
class ReduxConfig:
    siglip_dim: int = 1152  # width of the SigLIP features it reads
    hidden: int = 3 * 4096  # width of the one hidden layer
    txt_dim: int = 4096  # width of FLUX's text tokens (T5-XXL states)


PRESETS: dict[str, ReduxConfig] = {
    "redux-dev": ReduxConfig(),
    "tiny-redux": ReduxConfig(siglip_dim=32, hidden=3 * 32, txt_dim=32),  # tiny-siglip features in
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

VISION_PREFIX = "vision_model."

# Keys of the hub's full SigLIP file (google/siglip-so400m-patch14-384 `model.safetensors`, a
# SiglipModel) that Redux does not load: the text tower and the two scalars of the contrastive loss.
SIGLIP_NON_VISION_KEYS: tuple[str, ...] = ("text_model.*", "logit_scale", "logit_bias")


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
    # random-weight tests: 4 x 4 patches of 14 px
    "tiny-siglip": SiglipConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=14, image_size=56
    ),
}


def build_siglip(
    config: SiglipConfig, state_dict: dict[str, Tensor] | None = None, *, dtype: torch.dtype | None = None
) -> SiglipVisionModel:
    """Build a SigLIP vision tower in eval mode: random weights on the CPU, or exactly `state_dict`.

    state_dict: the hub file's layout, either the vision tower alone (`vision_model.*`) or the
    whole SiglipModel, whose text tower and `logit_scale` / `logit_bias` are dropped on purpose
    (SIGLIP_NON_VISION_KEYS). Every vision key, the pooling head `vision_model.head.*` included,
    must be present with the model's shape. The model is built on the meta device and takes the
    given tensors (cast to `dtype` if given).
    """
    if state_dict is None:
        return SiglipVisionModel(config.to_transformers()).eval()
    with torch.device("meta"):
        model = SiglipVisionModel(config.to_transformers())
    load_exact(model, _installed_layout(state_dict, model), ignore=SIGLIP_NON_VISION_KEYS, dtype=dtype)
    _rebuild_position_ids(model)
    return model.eval()


def _installed_layout(state_dict: dict[str, Tensor], model: SiglipVisionModel) -> dict[str, Tensor]:
    """File layout -> the installed transformers' layout.

    Up to transformers 4.x a SiglipVisionModel wraps its layers in `.vision_model`, so its keys are
    the file's. From 5.0 the layers sit on the model itself: strip `vision_model.` (keys without
    it, such as the text tower's or those of a state dict saved from such a model, stay as they are).
    """
    if hasattr(model, "vision_model"):
        return dict(state_dict)
    return {key.removeprefix(VISION_PREFIX): tensor for key, tensor in state_dict.items()}


def _rebuild_position_ids(model: SiglipVisionModel) -> None:
    """position_ids (arange over the patches) is a non-persistent buffer: loading does not replace
    it, so after building on the meta device it is still empty. Recreate it beside the weights."""
    embeddings = getattr(model, "vision_model", model).embeddings
    table = embeddings.position_embedding.weight  # [num_patches, hidden]
    embeddings.position_ids = torch.arange(table.shape[0], device=table.device).expand(1, -1)


# --- image -> tokens -------------------------------------------------------------------------------

SIGLIP_MEAN = SIGLIP_STD = 0.5  # pixels in [0, 1] -> [-1, 1]


def preprocess_siglip(images: Image.Image | Sequence[Image.Image] | Tensor, size: int = 384) -> Tensor:
    """Images -> SigLIP's input [B, 3, size, size] in [-1, 1]: squash-resize, then (x - 0.5) / 0.5.

    The aspect ratio is not kept (no crop, no padding), as in SiglipImageProcessor.
    PIL images: converted to RGB (transparency composited onto white), resized with PIL's bicubic
    filter on 8-bit pixels. This is exactly transformers' SiglipImageProcessor with the hub's
    settings (PIL backend, the one that existed when Redux was released).
    Tensors [B, 3, H, W] in [0, 1]: resized with torch's antialiased bicubic, the tensor twin of
    PIL's filter; the result is clipped to [0, 1] as PIL's 8-bit output is, and agrees with the
    PIL path up to 8-bit rounding.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, Tensor):
        pixels = _resize_tensor(images, size)
    else:
        pixels = torch.stack([_resize_pil(image, size) for image in images])
    return (pixels - SIGLIP_MEAN) / SIGLIP_STD


def _resize_pil(image: Image.Image, size: int) -> Tensor:
    """One PIL image -> [3, size, size] in [0, 1]."""
    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0  # [size, size, 3]
    return torch.from_numpy(array).permute(2, 0, 1)


def _resize_tensor(images: Tensor, size: int) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected images as [B, 3, H, W], got shape {list(images.shape)}; add a batch axis with x[None]"
        )
    if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            "expected float pixels in [0, 1]: convert uint8 images with x / 255 and [-1, 1] images "
            "(e.g. VAE decodes) with (x + 1) / 2"
        )
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def redux_tokens(siglip: SiglipVisionModel, redux: ReduxImageEncoder, pixel_values: Tensor) -> Tensor:
    """SigLIP input [B, 3, S, S] (from `preprocess_siglip`) -> Redux tokens [B, (S/14)², txt_dim].

    For the released models [B, 729, 4096], to append after the T5 tokens (ids all zero).
    Gradients flow; wrap in `torch.no_grad()` for sampling.
    """
    features = siglip(pixel_values=pixel_values.to(siglip.device, siglip.dtype)).last_hidden_state  # [B, N, 1152]
    projector = redux.redux_up.weight
    return redux(features.to(projector.device, projector.dtype))
