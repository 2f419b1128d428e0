"""FLUX's text conditioning: the T5 v1.1-XXL encoder, its tokenizer, and ``encode_flux``.

FLUX reads two text encoders, as BFL's ``HFEmbedder`` and diffusers' ``FluxPipeline`` do:

    txt     = T5-XXL last_hidden_state                    [B, 512, 4096]  (schnell: 256 tokens)
    pooled  = CLIP-L final_layer_norm(h)[first EOS]       [B, 768]        (not projected)

``txt`` is the token stream of the transformer's text branch; ``pooled`` joins the timestep in the
modulation vector. Two details matter for exact numerics:

- T5 reads the prompt padded to ``max_length`` with ``<pad>`` (id 0) and **no attention mask**, so
  every padding token is attended and gets a hidden state of its own. FLUX was trained that way.
- T5 has no BOS: ids are [prompt pieces, ``</s>`` (id 1), ``<pad>`` ...]; truncation keeps ``</s>``.

The encoder is transformers' ``T5EncoderModel`` (RMS norm without mean or bias, no 1/sqrt(d) in the
attention, relative position buckets learned in block 0 and shared by all blocks, gated-GELU MLP).
Run it in bf16 or fp32: T5 activations overflow fp16. ``build_t5_encoder`` makes one from a preset
and a state dict in the file layout (``shared.weight``, ``encoder.*``), i.e. a diffusers
``text_encoder_2/`` folder or the single file ``t5xxl_fp16.safetensors`` (same keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from minigen.loading.coverage import load_exact

from .tokenizer import tokenize

MAX_LENGTH_DEV = 512  # T5 tokens read by FLUX.1 dev (and the default)
MAX_LENGTH_SCHNELL = 256  # T5 tokens read by FLUX.1 schnell
NUM_EXTRA_IDS = 100  # <extra_id_0..99>: T5's span-corruption sentinels, ids 32099 down to 32000

SHARED_KEY = "shared.weight"  # the token embedding table [vocab, d_model]
TIED_KEY = "encoder.embed_tokens.weight"  # the encoder's view of the same table; usually not stored
# A full encoder-decoder T5 file (e.g. google/t5-v1_1-xxl's own, which FLUX's T5 comes from) also
# holds a decoder and an LM head. The FLUX files (diffusers text_encoder_2/, t5xxl_fp16) do not.
DECODER_PREFIXES = ("decoder.", "lm_head.")


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 v1.1 encoder (gated MLP: ``wo(act(wi_0 x) * wi_1 x)``)."""

    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int = 64  # per-head width: attention inner width is num_heads * d_kv (need not be d_model)
    vocab_size: int = 32128  # 32000 sentencepiece pieces + 100 sentinels, padded to a multiple of 128
    activation: str = "gelu_pytorch_tanh"  # tanh-approximate GELU
    num_buckets: int = 32  # relative position buckets (bidirectional: half for each direction)
    max_distance: int = 128  # distances beyond this share the last, logarithmically spaced bucket
    layer_norm_eps: float = 1e-6

    def to_transformers(self) -> transformers.T5Config:
        return transformers.T5Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            layer_norm_epsilon=self.layer_norm_eps,
            feed_forward_proj=f"gated-{self.activation}",
            dense_act_fn=self.activation,  # "gated-gelu" alone would mean gelu_new to transformers
        )


PRESETS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl encoder: FLUX.1 text_encoder_2 (and SD3's text_encoder_3), 4.76 B parameters
    "t5-xxl": T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}


def build_t5_encoder(config: T5Config, state_dict: dict[str, torch.Tensor] | None = None) -> T5EncoderModel:
    """Build a T5 encoder in eval mode: random weights on the CPU, or exactly ``state_dict``.

    With a state dict (``shared.weight`` + ``encoder.*``), the model is built on the meta device and
    takes the given tensors as they are (device and dtype included); every key must match.
    ``encoder.embed_tokens.weight`` may be present or not: it is the same table as ``shared.weight``
    and is tied to it after loading. ``decoder.*`` and ``lm_head.*`` of full T5 files are skipped.
    """
    if state_dict is None:
        return T5EncoderModel(config.to_transformers()).eval()
    with torch.device("meta"):
        model = T5EncoderModel(config.to_transformers())
    load_exact(model, _encoder_layout(state_dict))  # a mismatch is a CheckpointError listing the keys
    model.tie_weights()  # assign=True gave embed_tokens its own Parameter: share shared.weight again
    return model.eval()


def t5_config_from_diffusers(config_json: dict) -> T5Config:
    """T5Config from a transformers ``config.json`` (e.g. FLUX ``text_encoder_2/config.json``).

    The activation is read as transformers reads it: ``dense_act_fn`` when given, otherwise from
    ``feed_forward_proj`` ("gated-gelu" means ``gelu_new``, as in SD3's config; FLUX's says
    ``gelu_pytorch_tanh``; both are the tanh approximation). Only gated (v1.1) encoders are supported.
    """
    projection = config_json.get("feed_forward_proj", "relu")
    gated = config_json.get("is_gated_act", projection.startswith("gated-"))
    if not gated:
        raise ValueError(
            f"T5 config with feed_forward_proj={projection!r} has a plain (not gated) MLP: that is the original "
            "T5, not T5 v1.1. minigen builds T5 v1.1 encoders (FLUX, SD3); pass a config with is_gated_act=true."
        )
    default_activation = "gelu_new" if projection == "gated-gelu" else projection.removeprefix("gated-")
    return T5Config(
        d_model=config_json["d_model"],
        d_ff=config_json["d_ff"],
        num_layers=config_json["num_layers"],
        num_heads=config_json["num_heads"],
        d_kv=config_json["d_kv"],
        vocab_size=config_json["vocab_size"],
        activation=config_json.get("dense_act_fn", default_activation),
        num_buckets=config_json.get("relative_attention_num_buckets", 32),
        max_distance=config_json.get("relative_attention_max_distance", 128),
        layer_norm_eps=config_json.get("layer_norm_epsilon", 1e-6),
    )


def load_t5_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """T5's sentencepiece tokenizer (32000 pieces + 100 sentinels; pad 0, EOS 1, no BOS).

    folder: a tokenizer folder with ``tokenizer.json`` (FLUX's ``tokenizer_2/``, read as transformers'
    fast ``T5Tokenizer``) or with ``spiece.model`` (sentencepiece's own file, e.g. SD3's
    ``tokenizer_3/``). Both give the same ids. Reading ``spiece.model`` with the ``legacy`` splitting
    avoids the protobuf dependency; it differs only for text that follows a special token inside a
    prompt, which prompts do not contain. ``model_max_length`` is 512 (FLUX dev).
    """
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return transformers.T5Tokenizer.from_pretrained(folder, local_files_only=True)
    if (folder / "spiece.model").is_file():
        return transformers.SentencePieceBackend(
            vocab_file=str(folder / "spiece.model"),
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            # added in this order they take ids 32000.. with <extra_id_99> first, as in tokenizer.json
            additional_special_tokens=[f"<extra_id_{i}>" for i in reversed(range(NUM_EXTRA_IDS))],
            special_tokens_pattern="eos",  # append </s>; T5 has no BOS
            legacy=True,
            model_max_length=MAX_LENGTH_DEV,
        )
    subfolders = sorted(str(p) for p in folder.glob("tokenizer*") if _has_t5_files(p))
    hint = f" Pass its T5 tokenizer folder: {', '.join(subfolders)}." if subfolders else ""
    raise FileNotFoundError(
        f"{folder} holds no T5 tokenizer: looked for tokenizer.json (T5TokenizerFast) and spiece.model "
        f"(sentencepiece).{hint} For FLUX pass the tokenizer_2/ folder of a FLUX diffusers folder, "
        "e.g. black-forest-labs/FLUX.1-dev/tokenizer_2."
    )


def encode_flux(
    t5: T5EncoderModel,
    t5_tokenizer: PreTrainedTokenizerBase,
    clip: CLIPTextModel,
    clip_tokenizer: CLIPTokenizer,
    prompts: str | list[str],
    max_length: int = MAX_LENGTH_DEV,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX (txt [B, max_length, 4096], pooled [B, 768]).

    txt: T5's last hidden state over the prompt padded to ``max_length``, with no attention mask.
    FLUX.1 dev reads 512 T5 tokens, schnell 256 (``MAX_LENGTH_SCHNELL``).
    pooled: CLIP-L's final-normed last hidden state at the first EOS of the 77-token ids (the
    ``pooler_output`` of ``CLIPTextModel``; no projection).
    Gradients flow; wrap in ``torch.no_grad()`` for sampling.
    """
    t5_ids = tokenize(t5_tokenizer, prompts, max_length)  # [B, max_length]
    clip_ids = tokenize(clip_tokenizer, prompts)  # [B, 77]
    return encode_flux_ids(t5, clip, t5_ids, clip_ids, clip_tokenizer.eos_token_id)


def encode_flux_ids(
    t5: T5EncoderModel, clip: CLIPTextModel, t5_ids: torch.Tensor, clip_ids: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_flux`` from token ids (for training on pre-tokenized captions)."""
    txt = t5(t5_ids.to(t5.device)).last_hidden_state  # [B, max_length, d_model]: padding attended, as in training
    clip_ids = clip_ids.to(clip.device)
    hidden = clip(clip_ids).last_hidden_state  # [B, 77, 768], after final_layer_norm
    eos_position = (clip_ids == eos_token_id).int().argmax(dim=1)  # first EOS of each row
    pooled = hidden[torch.arange(len(clip_ids), device=clip_ids.device), eos_position]  # [B, 768]
    return txt, pooled


def _has_t5_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def _encoder_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File keys -> the keys of ``T5EncoderModel.state_dict()``: drop a decoder and LM head, and give
    the tied ``encoder.embed_tokens.weight`` the embedding table whichever of the two keys holds it."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
    table = state_dict.get(SHARED_KEY, state_dict.get(TIED_KEY))
    if table is not None:
        state_dict[SHARED_KEY] = state_dict[TIED_KEY] = table
    return state_dict
