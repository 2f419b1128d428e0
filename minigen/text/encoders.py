"""CLIP text encoders of SD1.x and SDXL (transformers models) and prompt encoding.

SD1.x reads one encoder, OpenAI's CLIP ViT-L/14 text tower, and conditions on its last hidden state
after the final layer norm. SDXL reads two and conditions on the *penultimate* layer of both, without
the final norm, concatenated along channels; it also takes a pooled vector from the second encoder:

    SD1.x   context = CLIP-L.final_layer_norm(layer 12)                    [B, 77, 768]
    SDXL    context = cat(CLIP-L layer 11, OpenCLIP-bigG layer 31)          [B, 77, 768 + 1280]
            pooled  = bigG.text_projection(bigG.final_layer_norm(layer 32)[EOS position])   [B, 1280]

The encoders are transformers' ``CLIPTextModel`` (CLIP-L) and ``CLIPTextModelWithProjection``
(bigG, whose ``text_projection`` gives the pooled vector). ``build_text_encoder`` makes one from a
preset and a state dict in the file layout (``text_model.*`` keys, as in a diffusers
``text_encoder/model.safetensors`` and as ``minigen.loading.keymaps_text`` produces).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minigen.loading.coverage import load_exact
from minigen.transformers_compat import installed_layout, rebuild_position_ids, tower

from .tokenizer import MAX_LENGTH, tokenize

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407

# Keys of the files that the model rebuilds instead of loading. position_ids is arange(77): a
# persistent buffer in transformers < 4.31 (so SD1.5 / SDXL files carry it), non-persistent since.
# Some merged community checkpoints even carry it corrupted (float, off by one), so it is never read.
REBUILT_KEYS = ("text_model.embeddings.position_ids",)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP text transformer. ``projection_dim`` set -> with ``text_projection``."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str  # "quick_gelu" (x * sigmoid(1.702 x)) for OpenAI CLIP, "gelu" for OpenCLIP
    projection_dim: int | None = None
    vocab_size: int = VOCAB_SIZE
    max_positions: int = MAX_LENGTH
    layer_norm_eps: float = 1e-5

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.projection_dim or self.hidden_size,
            bos_token_id=BOS_ID,
            # The official configs say eos_token_id=2, which makes transformers pool at argmax(ids):
            # right only while EOS is the largest id. 49407 pools at the first EOS, also with added tokens.
            eos_token_id=EOS_ID,
        )


PRESETS: dict[str, TextEncoderConfig] = {
    # OpenAI CLIP ViT-L/14 text tower: SD1.x, SDXL encoder 1 (and FLUX's CLIP)
    "clip-l": TextEncoderConfig(
        hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, hidden_act="quick_gelu"
    ),
    # OpenCLIP ViT-bigG/14 text tower (LAION-2B): SDXL encoder 2
    "openclip-bigg": TextEncoderConfig(
        hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu", projection_dim=1280
    ),
}


def build_text_encoder(
    config: TextEncoderConfig, state_dict: dict[str, torch.Tensor] | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Build a text encoder in eval mode: random weights on the CPU, or exactly ``state_dict``.

    With a state dict (file layout, ``text_model.*``), the model is built on the meta device and
    takes the given tensors as they are (device and dtype included); every key and shape must match
    (else a CheckpointError that lists what differs, as for the UNet).
    """
    model_class = CLIPTextModelWithProjection if config.projection_dim else CLIPTextModel
    if state_dict is None:
        return model_class(config.to_transformers()).eval()
    with torch.device("meta"):
        model = model_class(config.to_transformers())
    state_dict = {k: v for k, v in state_dict.items() if k not in REBUILT_KEYS}
    load_exact(model, installed_layout(state_dict, model, "text_model"))  # a mismatch is a CheckpointError listing the keys
    rebuild_position_ids(model, "text_model")
    return model.eval()


def encode_sd1(text_encoder: CLIPTextModel, tokenizer, prompts: str | list[str], clip_skip: int = 0) -> torch.Tensor:
    """SD1.x context [B, 77, 768]: CLIP-L's last hidden state after the final layer norm.

    ``clip_skip`` skips that many final layers: the hidden state of layer -(clip_skip + 1), through
    the final layer norm, as diffusers' ``clip_skip`` and A1111's "Clip skip" (which counts from 1:
    A1111's 2 is ``clip_skip=1``). Gradients flow (for textual inversion and the like); wrap in
    ``torch.no_grad()`` for sampling.
    """
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)  # [B, 77]
    if not clip_skip:
        return text_encoder(ids).last_hidden_state
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states  # embeddings, then one per layer
    check_clip_skip(clip_skip, len(hidden))
    return tower(text_encoder, "text_model").final_layer_norm(hidden[-(clip_skip + 1)])


def check_clip_skip(clip_skip: int, hidden_states: int, reads: int = 1) -> None:
    """`clip_skip` layers can be skipped of an encoder with `hidden_states` outputs (its embeddings, then one
    per layer) read `reads` from the end (1: the last layer, SD1.x; 2: the penultimate, SDXL), at least one kept."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral):
        raise TypeError(f"clip_skip takes a whole number of layers (A1111's Clip skip 2 is clip_skip=1), got {clip_skip!r}")
    layers = hidden_states - 1
    if not 0 <= clip_skip <= layers - reads:
        where = "" if reads == 1 else ", read from the penultimate one at clip_skip 0 (SDXL)"
        raise ValueError(f"clip_skip {clip_skip} must be 0 to {layers - reads}: this text encoder has {layers} layers{where}")


def encode_sdxl(
    text_encoder: CLIPTextModel,
    tokenizer,
    text_encoder_2: CLIPTextModelWithProjection,
    tokenizer_2,
    prompts: str | list[str],
    clip_skip: int = 0,
    prompts_2: str | list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL (context [B, 77, 2048], pooled [B, 1280]).

    context: penultimate hidden states (no final layer norm) of CLIP-L [.., 768] and bigG [.., 1280];
    ``clip_skip`` goes that many layers further back in both (diffusers' SDXL ``clip_skip``).
    pooled: bigG's final-normed last hidden state at the EOS position, through ``text_projection``.
    Each encoder reads its own tokenizer's ids: the padding differs (EOS for CLIP-L, 0 for bigG).
    ``prompts_2``, when given, is what bigG reads instead of ``prompts`` (diffusers' ``prompt_2``; the
    pooled vector then comes from it too).
    """
    prompts_2 = prompts if prompts_2 is None else prompts_2
    if isinstance(prompts, str) != isinstance(prompts_2, str) or (not isinstance(prompts, str) and len(prompts) != len(prompts_2)):
        raise ValueError(f"prompts_2 must match prompts one for one (a string for a string, a list of {len(prompts)} for a list)")
    ids_1 = tokenize(tokenizer, prompts).to(text_encoder.device)  # [B, 77]
    ids_2 = tokenize(tokenizer_2, prompts_2).to(text_encoder_2.device)  # [B, 77]
    out_1 = text_encoder(ids_1, output_hidden_states=True)  # hidden_states: embeddings, then one per layer
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    check_clip_skip(clip_skip, min(len(out_1.hidden_states), len(out_2.hidden_states)), reads=2)
    layer = -(clip_skip + 2)
    context = torch.cat([out_1.hidden_states[layer], out_2.hidden_states[layer]], dim=-1)  # [B, 77, 768 + 1280]

    eos_position = (ids_2 == tokenizer_2.eos_token_id).int().argmax(dim=1)  # first EOS of each row
    eos_state = out_2.last_hidden_state[torch.arange(len(ids_2), device=ids_2.device), eos_position]  # [B, 1280]
    pooled = text_encoder_2.text_projection(eos_state)
    return context, pooled


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's size and crop micro-conditioning, shape [6]: (orig h, orig w, crop top, crop left, h, w).

    Sizes are (height, width) in pixels. For plain generation pass the output size twice and (0, 0):
    SDXL was trained to produce a centred, uncropped image of ``original_size`` framed as ``target_size``.
    """
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
