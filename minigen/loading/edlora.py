"""ED-LoRA concept files (Mix-of-Show, Concept Conductor): reading, writing, and layer-wise prompt encoding.

An ED-LoRA (Mix-of-Show's "embedding-decomposed LoRA") adds one personal concept, say a particular dog,
to a Stable Diffusion model in two parts:

    concept words      each word of the concept (`<chow_dog_1>`, `<chow_dog_2>`) has one input token
                       embedding per cross-attention layer of the UNet: [L, C], L = 16 on SD1.x and 70
                       on SDXL, C the text encoder's width (768 for CLIP-L)
    LoRA factors       down [r, in] (or [r, in, 1, 1] on a 1x1 conv) and up [out, r] on the attention
                       projections of the UNet (diffusers names) and of the CLIP text encoder(s)

The official trainer writes `torch.save({'params': delta})` (some files lack the 'params' wrapper):

    delta['new_concept_embedding']    {word: [L, 768]}, in the concept's word order
    delta['text_encoder']             {'text_model.encoder.layers.7.self_attn.k_proj.lora_down.weight': [r, 768], ...}
    delta['unet']                     {'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_up.weight': [320, r], ...}
    delta['new_concept_embedding_2'], delta['text_encoder_2']      SDXL only: the same for its second encoder

The training-time LoRA alpha is a buffer (1.0) and is not saved. At inference the official code merges
every factor pair into its weight with a weight of its own, alpha = 0.7 (Concept Conductor; Mix-of-Show
defaults to 0.6):   W' = W + alpha · up @ down.

A `.pth` is a pickle, so it is read only with `allow_pickle=True`, and then through
`torch.load(weights_only=True)`. minigen's own form is a `.safetensors` file holding the same tensors
under flat keys, with metadata for what safetensors does not keep (it stores keys sorted):

    new_concept_embedding.<word>    new_concept_embedding_2.<word>
    text_encoder.<file key>         text_encoder_2.<file key>          unet.<file key>
    metadata: format = "minigen.edlora", words = the word order (JSON list), base = "sd1" / "sd2" / "sdxl"

`scripts/convert_edlora.py` converts between the two forms.

Layer-wise encoding (Mix-of-Show's `bind_concept_prompt`, inlined in Concept Conductor's pipeline): the
prompt is copied L times, and copy ℓ has each concept word replaced by a new token whose input
embedding is the word's row ℓ. The L copies run through the whole text encoder with its LoRA merged,
and copy ℓ's output is the context of the ℓ-th cross-attention layer in forward order (down, mid, up):
in minigen, `Controls(contexts={layer: ...})` over `unet.attention_sites()`. The unconditional
context is "" through the same merged encoder, one copy per layer.

SDXL (Concept Conductor's SDXL pipeline) does this with both text encoders, each with its own LoRA
(`text`, `text_2`) and its own rows for the words (`embeddings` [70, 768], `embeddings_2` [70, 1280]):
layer ℓ's context is the SDXL concatenation of the two penultimate hidden states of copy ℓ
[77, 768 + 1280], and the concept's pooled text is encoder 2's projection of copy 0 only.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from minigen.controls import LowRank
from minigen.loading.coverage import non_finite
from minigen.loading.detect import CheckpointError
from minigen.loading.files import PICKLE_SUFFIXES, check_output_path, checked_file, read_metadata, read_state_dict, write_atomically
from minigen.loading.lora_files import FAMILY_NAMES, TEXT_FEATURE_WIDTHS, layer_table, merge
from minigen.models.unet import UNet
from minigen.text.tokenizer import MAX_LENGTH
from minigen.transformers_compat import tower
from minigen.storage import to_compute  # the layer's compute dtype and device (a stored layer's weight may be fp16)

FORMAT = "minigen.edlora"  # the `format` metadata of minigen's .safetensors form
MERGE_ALPHA = 0.7  # Concept Conductor's merge weight for both the UNet and the text encoder
EMBEDDINGS, EMBEDDINGS_2 = "new_concept_embedding", "new_concept_embedding_2"
TEXT, TEXT_2, UNET_KEYS = "text_encoder", "text_encoder_2", "unet"
COMPONENTS = (EMBEDDINGS, EMBEDDINGS_2, TEXT, TEXT_2, UNET_KEYS)
DOWN, UP = "lora_down.weight", "lora_up.weight"
RESERVED_METADATA = ("format", "words", "base")
FAMILIES = tuple(TEXT_FEATURE_WIDTHS.values())  # what `base` may be: "sd1", "sd2", "sdxl"
TEXT_WIDTHS = {  # token embedding width -> the text encoder it belongs to
    768: "CLIP-L: SD1.x, SDXL's first encoder",
    1024: "OpenCLIP-H: SD2.x",
    1280: "OpenCLIP-bigG: SDXL's second encoder",
}


class Factors(NamedTuple):
    """One layer's LoRA factors: ΔW = up @ down (with the conv's 1x1 dimensions squeezed)."""

    down: Tensor  # [r, in] or [r, in, 1, 1]
    up: Tensor  # [out, r] or [out, r, 1, 1]


@dataclass
class EDLoRA:
    """One concept file. Factors are keyed by module path as the files spell it (the key without
    `.lora_down.weight`): diffusers paths for the UNet, `text_model.…` paths for the text encoders."""

    embeddings: dict[str, Tensor]  # concept word -> [L, C] input token embeddings, in the file's word order
    unet: dict[str, Factors]  # diffusers module path -> factors
    text: dict[str, Factors]  # CLIP text encoder (SDXL: the first) module path -> factors
    embeddings_2: dict[str, Tensor] = field(default_factory=dict)  # SDXL: word -> [L, 1280] for the second encoder
    text_2: dict[str, Factors] = field(default_factory=dict)  # SDXL: the second text encoder's factors
    base: str | None = None  # the base model family when known: "sd1", "sd2" or "sdxl"

    @property
    def words(self) -> list[str]:
        return list(self.embeddings)

    @property
    def layers(self) -> int:
        """L: embeddings per word, one per cross-attention layer of the base model."""
        return next(iter(self.embeddings.values())).shape[0]


# --- reading ---------------------------------------------------------------------------------------


def read_edlora(path: str | Path, *, allow_pickle: bool = False) -> EDLoRA:
    """Read an ED-LoRA: the official pickled `.pth` (only with `allow_pickle=True`) or minigen's `.safetensors`.

    Every tensor must be finite, every factor pair complete and every word's embedding of one shape
    [L, C]; otherwise a CheckpointError says what is wrong. The tensors keep the file's dtype. `base`
    comes from a `.safetensors` file's metadata; for a `.pth` it is what the shapes show (`guess_base`).
    """
    path = checked_file(path)
    if path.suffix == ".safetensors":
        edlora = _read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        edlora = _read_pickle(path, allow_pickle)
    else:
        raise ValueError(f"{path}: an ED-LoRA is a .pth (official) or a .safetensors (minigen's), not {path.suffix!r}")
    _check(edlora, where=str(path))
    if path.suffix in PICKLE_SUFFIXES:  # a .pth records no base: what its shapes show (once they are known to be sound)
        edlora.base = guess_base(edlora)[0]
    return edlora


def _read_pickle(path: Path, allow_pickle: bool) -> EDLoRA:
    if not allow_pickle:
        raise PermissionError(
            f"{path} is a pickled ED-LoRA (torch.save), and unpickling a file from an untrusted source can run "
            "arbitrary code. If you trust it, pass read_edlora(path, allow_pickle=True) (the scripts: --allow-pickle; then it is read with "
            "torch.load(weights_only=True), which only rebuilds tensors and plain containers), or convert it once: "
            f"python scripts/convert_edlora.py {path.name} {path.stem}.safetensors"
        )
    nested = read_state_dict(path, allow_pickle=True)  # nested dicts flattened with "."
    flat = {key.removeprefix("params."): tensor for key, tensor in nested.items()}
    words = [key.split(".", 1)[1] for key in flat if key.startswith(f"{EMBEDDINGS}.")]  # in the pickle's order
    return _from_flat(flat, words, where=path)


def _read_safetensors(path: Path) -> EDLoRA:
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ED-LoRA in minigen's form (its metadata has format={metadata.get('format')!r}, not "
            f"{FORMAT!r}). An official .pth is read with allow_pickle=True or converted by scripts/convert_edlora.py; "
            "a plain LoRA is read by minigen.loading.lora_files.read_lora."
        )
    try:
        words = json.loads(metadata.get("words", ""))
    except json.JSONDecodeError:
        words = None
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise CheckpointError(f"{path}: its 'words' metadata must be a JSON list of the concept words; the file is damaged")
    edlora = _from_flat(read_state_dict(path), words, where=path)
    edlora.base = metadata.get("base")
    return edlora


def _from_flat(flat: Mapping[str, Tensor], words: list[str], where: str | Path) -> EDLoRA:
    """An EDLoRA from `<component>.<rest>` keys, the embeddings in the order of `words`."""
    parts: dict[str, dict[str, Tensor]] = {component: {} for component in COMPONENTS}
    unknown = []
    for key, tensor in flat.items():
        component, _, rest = key.partition(".")
        if component in parts and rest:
            parts[component][rest] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} keys are not part of an ED-LoRA, e.g. {unknown[:5]}; an ED-LoRA holds only "
            f"{', '.join(COMPONENTS)}. A plain LoRA is read by minigen.loading.lora_files.read_lora."
        )
    return EDLoRA(
        embeddings=_in_word_order(parts[EMBEDDINGS], words, EMBEDDINGS, where),
        unet=_factor_pairs(parts[UNET_KEYS], UNET_KEYS, where),
        text=_factor_pairs(parts[TEXT], TEXT, where),
        embeddings_2=_in_word_order(parts[EMBEDDINGS_2], words, EMBEDDINGS_2, where) if parts[EMBEDDINGS_2] else {},
        text_2=_factor_pairs(parts[TEXT_2], TEXT_2, where),
    )


def _in_word_order(embeddings: Mapping[str, Tensor], words: list[str], component: str, where: str | Path) -> dict:
    if len(set(words)) != len(words) or set(words) != set(embeddings):
        raise CheckpointError(
            f"{where}: {component} holds the words {sorted(embeddings)}, but the file's word list is {words}; "
            "the file is damaged"
        )
    return {word: embeddings[word] for word in words}


def _factor_pairs(tensors: Mapping[str, Tensor], component: str, where: str | Path) -> dict[str, Factors]:
    """{layer: Factors} from `<layer>.lora_down.weight` / `<layer>.lora_up.weight` keys."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, part = key.rpartition(".lora_")
        if part not in ("down.weight", "up.weight"):
            raise CheckpointError(
                f"{where}: {component}.{key} is not a LoRA factor (….lora_down.weight or ….lora_up.weight); "
                "ED-LoRA files hold nothing else: the file is not an ED-LoRA or was written by another tool"
            )
        halves.setdefault(layer, {})[f"lora_{part}"] = tensor
    incomplete = [f"{layer} (no {UP if DOWN in pair else DOWN})" for layer, pair in halves.items() if len(pair) != 2]
    if incomplete:
        raise CheckpointError(
            f"{where}: {len(incomplete)} {component} layers have only one of their two LoRA factors, e.g. "
            f"{incomplete[:3]}: the file is incomplete; export or download it again"
        )
    return {layer: Factors(pair[DOWN], pair[UP]) for layer, pair in halves.items()}


def _check(edlora: EDLoRA, where: str) -> None:
    """Refuse an ED-LoRA that cannot be right, whatever model it meets: see `read_edlora`."""
    if not edlora.embeddings:
        raise CheckpointError(
            f"{where}: {EMBEDDINGS} is empty: without concept words this is a plain LoRA; "
            "read it with minigen.loading.lora_files.read_lora"
        )
    _check_embeddings(edlora.embeddings, EMBEDDINGS, where)
    if edlora.embeddings_2:
        _check_embeddings(edlora.embeddings_2, EMBEDDINGS_2, where)
        layers_2 = next(iter(edlora.embeddings_2.values())).shape[0]
        if list(edlora.embeddings_2) != edlora.words or layers_2 != edlora.layers:
            raise CheckpointError(
                f"{where}: the two text encoders' embeddings disagree: {EMBEDDINGS} has words {edlora.words} with "
                f"{edlora.layers} rows each, {EMBEDDINGS_2} words {list(edlora.embeddings_2)} with {layers_2}; "
                "the file is damaged"
            )
    for component, factors in ((UNET_KEYS, edlora.unet), (TEXT, edlora.text), (TEXT_2, edlora.text_2)):
        misshaped = [f"{layer}: down {list(f.down.shape)}, up {list(f.up.shape)}" for layer, f in factors.items() if not _pair(*f)]
        if misshaped:
            raise CheckpointError(
                f"{where}: {component} factors must be down [r, in] and up [out, r] of one rank r; got {misshaped[:3]}"
            )
    if bad := non_finite(_flat_tensors(edlora)):
        raise CheckpointError(
            f"{where}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]}): the concept was saved from a "
            "diverged training run or the file is damaged; train it again or download it again"
        )
    if edlora.base is not None and edlora.base not in FAMILIES:
        raise CheckpointError(f"{where}: base model {edlora.base!r} is not one of {', '.join(FAMILIES)}")


def _pair(down: Tensor, up: Tensor) -> bool:
    """down [r, in] / up [out, r] (or a 1x1 conv's [r, in, 1, 1] / [out, r, 1, 1]) of one rank r."""
    return down.dim() in (2, 4) and up.dim() in (2, 4) and up.shape[1] == down.shape[0]


def _check_embeddings(embeddings: Mapping[str, Tensor], component: str, where: str) -> None:
    shapes = {word: list(tensor.shape) for word, tensor in embeddings.items()}
    if any(len(shape) != 2 for shape in shapes.values()) or len({tuple(s) for s in shapes.values()}) != 1:
        raise CheckpointError(
            f"{where}: {component} must hold one [L, C] tensor per word (L layers, C channels), all of one shape; "
            f"got {shapes}. The file is damaged or not an ED-LoRA."
        )


def guess_base(edlora: EDLoRA) -> tuple[str | None, str]:
    """The base model family the ED-LoRA's shapes show ("sd1", "sd2", "sdxl" or None), and why."""
    if edlora.embeddings_2 or edlora.text_2:
        return "sdxl", "it has weights for a second text encoder"
    width = _cross_attention_width(edlora)
    if width in TEXT_FEATURE_WIDTHS:
        return TEXT_FEATURE_WIDTHS[width], f"its cross-attention reads {width}-wide text features"
    if next(iter(edlora.embeddings.values())).shape[1] == 1024:
        return "sd2", f"its concept embeddings are 1024 wide ({TEXT_WIDTHS[1024]})"
    return None, "its shapes do not tell"


def _cross_attention_width(edlora: EDLoRA) -> int | None:
    """The text-feature width its UNet's cross-attention reads: attn2.to_k's down factor is [r, width]."""
    return next((f.down.shape[1] for layer, f in edlora.unet.items() if layer.endswith("attn2.to_k")), None)


# --- writing ---------------------------------------------------------------------------------------


def save_edlora(
    edlora: EDLoRA, path: str | Path, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `edlora` to `path`: `.safetensors` (minigen's form; `metadata` adds string entries beside
    format, words and base) or `.pth` (the official layout, for the official code; no metadata).

    The write is atomic (a temporary file in the same folder takes the name when complete), and an
    existing file is kept unless `overwrite` (FileExistsError).
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"{path}: save an ED-LoRA as .safetensors (minigen's form) or .pth (the official form)")
    check_output_path(path, overwrite=overwrite, suffix=path.suffix)
    _check(edlora, where="this ED-LoRA")
    if path.suffix == ".safetensors":
        data = safetensors.torch.save(_flat_tensors(edlora, portable=True), _metadata(edlora, metadata or {}))
        write_atomically(path, lambda file: file.write(data), overwrite)
    elif metadata:
        raise ValueError(f"{path}: a .pth holds only the official layout; metadata goes into a .safetensors file")
    else:
        write_atomically(path, lambda file: torch.save(_official_layout(edlora), file), overwrite)
    return path


def _flat_tensors(edlora: EDLoRA, portable: bool = False) -> dict[str, Tensor]:
    """Every tensor under its key in minigen's form; `portable`: as compact CPU copies, for a file."""
    tensors = {f"{EMBEDDINGS}.{word}": rows for word, rows in edlora.embeddings.items()}
    tensors |= {f"{EMBEDDINGS_2}.{word}": rows for word, rows in edlora.embeddings_2.items()}
    for component, factors in ((TEXT, edlora.text), (TEXT_2, edlora.text_2), (UNET_KEYS, edlora.unet)):
        tensors |= {f"{component}.{key}": tensor for key, tensor in _factor_keys(factors).items()}
    if portable:
        tensors = {key: t.detach().cpu().clone(memory_format=torch.contiguous_format) for key, t in tensors.items()}
    return tensors


def _factor_keys(factors: Mapping[str, Factors]) -> dict[str, Tensor]:
    """The factors under their file keys, `<layer>.lora_down.weight` and `<layer>.lora_up.weight`."""
    keys = {}
    for layer, (down, up) in factors.items():
        keys[f"{layer}.{DOWN}"], keys[f"{layer}.{UP}"] = down, up
    return keys


def _official_layout(edlora: EDLoRA) -> dict:
    """{'params': {...}} as the official trainer saves it; the SDXL entries only for an SDXL concept."""
    flat = _flat_tensors(edlora, portable=True)
    delta: dict[str, dict[str, Tensor]] = {EMBEDDINGS: {}, TEXT: {}, UNET_KEYS: {}}
    if edlora.embeddings_2 or edlora.text_2:
        delta |= {EMBEDDINGS_2: {}, TEXT_2: {}}
    for key, tensor in flat.items():
        component, _, rest = key.partition(".")
        delta[component][rest] = tensor
    return {"params": delta}


def _metadata(edlora: EDLoRA, extra: Mapping[str, str]) -> dict[str, str]:
    if clash := sorted(set(extra) & set(RESERVED_METADATA)):
        raise ValueError(f"metadata {clash} is written from the ED-LoRA itself; set EDLoRA.base, or pick other names")
    if not all(isinstance(value, str) for value in extra.values()):
        raise ValueError("safetensors metadata values must be strings; encode other values as JSON")
    known = {"format": FORMAT, "words": json.dumps(edlora.words)}
    return known | ({"base": edlora.base} if edlora.base else {}) | dict(extra)


# --- the UNet LoRA ---------------------------------------------------------------------------------


def edlora_low_rank(
    edlora: EDLoRA, unet: UNet, *, alpha: float = MERGE_ALPHA, rows: Tensor | None = None
) -> list[LowRank]:
    """The ED-LoRA's UNet factors as `LowRank` residuals on minigen module paths, each with scale `alpha`.

    Applied through `Controls(low_rank=...)` (optionally weighted per batch row by `rows` [B]), they
    compute what the official merge W + alpha · up @ down computes. The factors are cast to their
    layer's dtype and device. A file for another base model, or a key that names no layer of `unet`
    or does not fit it, is a CheckpointError.
    """
    _check_base_model(edlora, unet)
    if not edlora.unet:
        warnings.warn("this ED-LoRA holds no UNet LoRA (its embeddings only): the concept is drawn by the base UNet "
                      "reading its words, as textual inversion", stacklevel=2)  # fmt: skip
    return _low_rank(edlora.unet, unet, alpha, "UNet", rows=rows)


def _check_base_model(edlora: EDLoRA, unet: UNet) -> None:
    """Refuse an ED-LoRA made for another base model: the text width its cross-attention reads, and L."""
    width, context_dim = _cross_attention_width(edlora), unet.config.context_dim
    if width is not None and width != context_dim:
        raise CheckpointError(
            f"this ED-LoRA was made for {_family_name(width)}: its cross-attention to_k reads {width}-wide text "
            f"features, but this UNet's context_dim is {context_dim} ({_family_name(context_dim)}). "
            "Fix: use the ED-LoRA with the base model it was trained for, or pick one trained for this model."
        )
    layers = len(unet.attention_sites())
    if edlora.layers != layers:
        raise CheckpointError(
            f"this ED-LoRA has {edlora.layers} embeddings per word, one per cross-attention layer of its base model "
            f"(16 on SD1.x, 70 on SDXL), but this UNet has {layers} cross-attention layers. "
            "Fix: use the ED-LoRA with the base model it was trained for."
        )


def _family_name(context_width: int) -> str:
    family = TEXT_FEATURE_WIDTHS.get(context_width)
    return FAMILY_NAMES[family] if family else "an unknown base model"


def _low_rank(
    factors: Mapping[str, Factors], model: nn.Module, scale: float, what: str, rows: Tensor | None = None
) -> list[LowRank]:
    """One LowRank per factor pair, on the layer of `model` the file's path names (`layer_table`)."""
    table = layer_table(model)
    deltas, missing, misfit = [], [], []
    for layer, (down, up) in factors.items():
        target = table.get(layer.replace(".", "_"))
        if target is None:
            missing.append(layer)
            continue
        module = model.get_submodule(target)
        weight = module.weight
        if not _fits(down, up, weight):
            misfit.append(f"{layer}: down {list(down.shape)}, up {list(up.shape)} for a weight {list(weight.shape)}")
            continue
        deltas.append(LowRank(target, to_compute(down, module), to_compute(up, module), scale, rows=rows))
    if missing or misfit:
        raise CheckpointError(
            f"this ED-LoRA's factors do not fit this {what}: {len(missing)} name no layer of it (e.g. {missing[:3]}), "
            f"{len(misfit)} have the wrong shape (e.g. {misfit[:2]}). "
            "Fix: use the ED-LoRA with the base model it was trained for."
        )
    return deltas


def _fits(down: Tensor, up: Tensor, weight: Tensor) -> bool:
    """down [r, in(, 1, 1)] and up [out, r(, 1, 1)] shaped for `weight` [out, in(, 1, 1)]."""
    return (
        down.dim() == weight.dim()
        and down.shape[1:] == weight.shape[1:]
        and up.shape[:2] == (weight.shape[0], down.shape[0])
        and up.shape[2:] in ((), (1, 1))
    )


# --- layer-wise prompt encoding ----------------------------------------------------------------------


def layerwise_prompt_embeddings(
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    edloras: EDLoRA | Sequence[EDLoRA],
    *,
    alpha: float = MERGE_ALPHA,
) -> Tensor:
    """SD1.x contexts [L, 77, C], one per cross-attention layer in forward order, encoded as the official code does.

    The text encoder (a transformers CLIPTextModel) runs with each ED-LoRA's text factors merged at
    `alpha` and each concept word in `prompt` read as its layer's token: copy ℓ of the prompt puts
    row ℓ of the word's embeddings where the word stands, and the copies run through the whole encoder
    (last hidden state after the final norm, as `encode_sd1`). Tokens are those of a HF CLIPTokenizer
    to which the words were added as tokens: the text between words is tokenized piece by piece.
    A word is found in the prompt as a plain substring (the official `str.replace`).

    `prompt=""` gives the official unconditional context: "" through the same merged encoder, equal for
    every layer. Any other prompt must contain every concept word (ValueError otherwise). Several
    ED-LoRAs (different words, the same L) have their text factors merged together.

    Nothing is kept: the merged weights are restored from copies (bit for bit) and the token table is
    back as it was, also when the call fails. Runs without gradients.
    """
    edloras = [edloras] if isinstance(edloras, EDLoRA) else list(edloras)
    (embeddings,) = _concept_embeddings(edloras, prompt, sdxl=False)  # word -> [L, C]
    texts = [edlora.text for edlora in edloras]
    with torch.no_grad(), _concept_encoder(text_encoder, tokenizer, prompt, embeddings, texts, alpha) as ids:
        return text_encoder(ids).last_hidden_state  # [L, 77, C]


def layerwise_prompt_embeddings_sdxl(
    text_encoders: Sequence[nn.Module],
    tokenizers: Sequence[PreTrainedTokenizerBase],
    prompt: str,
    edloras: EDLoRA | Sequence[EDLoRA],
    *,
    alpha: float = MERGE_ALPHA,
    official_pooling: bool = True,
) -> tuple[Tensor, Tensor]:
    """SDXL (contexts [L, 77, 2048], pooled [1280]) of a prompt with concept words, as the official SDXL pipeline.

    `text_encoders` are SDXL's [CLIP-L, OpenCLIP-bigG] (transformers CLIPTextModel and
    CLIPTextModelWithProjection) and `tokenizers` theirs. Each encoder reads copy ℓ of the prompt as
    `layerwise_prompt_embeddings` does, with its own factors merged at `alpha` (`text` into encoder 1,
    `text_2` into encoder 2) and its own rows for the words (`embeddings`, `embeddings_2`). Layer ℓ's
    context is the concatenation of the two penultimate hidden states of copy ℓ (no final norm), as
    `encode_sdxl`. The pooled text is encoder 2's projection of its final-normed state in copy 0 only
    (the official pipeline keeps the pooled embedding of the first variant), taken where transformers
    takes it under SDXL's configs (`eos_token_id=2`, legacy): at the largest token id, which with
    concept tokens is the first occurrence of the last concept word, not EOS. `official_pooling=False`
    takes it at the first EOS instead, as `encode_sdxl` does for plain prompts.

    `prompt=""` gives the official unconditional pair: "" through the merged encoders, its context
    equal for every layer. Errors, merging of several ED-LoRAs and the restoring of every weight are as
    in `layerwise_prompt_embeddings`.
    """
    edloras = [edloras] if isinstance(edloras, EDLoRA) else list(edloras)
    if len(text_encoders) != 2 or len(tokenizers) != 2:
        raise ValueError(f"SDXL has two text encoders and two tokenizers, got {len(text_encoders)} and {len(tokenizers)}")
    (encoder, encoder_2), (tokenizer, tokenizer_2) = text_encoders, tokenizers
    embeddings, embeddings_2 = _concept_embeddings(edloras, prompt, sdxl=True)  # word -> [L, 768], [L, 1280]
    texts, texts_2 = [edlora.text for edlora in edloras], [edlora.text_2 for edlora in edloras]
    with torch.no_grad():
        with _concept_encoder(encoder, tokenizer, prompt, embeddings, texts, alpha) as ids:
            context = encoder(ids, output_hidden_states=True).hidden_states[-2]  # [L, 77, 768]
        with _concept_encoder(encoder_2, tokenizer_2, prompt, embeddings_2, texts_2, alpha) as ids_2:
            out_2 = encoder_2(ids_2, output_hidden_states=True)
            eos = (ids_2[0] == tokenizer_2.eos_token_id).int().argmax()  # copy 0's first EOS
            position = ids_2[0].argmax() if official_pooling else eos  # argmax: a concept token when there is one
            pooled = encoder_2.text_projection(out_2.last_hidden_state[0, position])  # [1280]
        return torch.cat([context, out_2.hidden_states[-2]], dim=-1), pooled  # [L, 77, 768 + 1280], [1280]


@contextmanager
def _concept_encoder(
    text_encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    embeddings: Mapping[str, Tensor],
    factors: Sequence[Mapping[str, Factors]],
    alpha: float,
) -> Iterator[Tensor]:
    """Within the block, `text_encoder` has `factors` merged at `alpha` and reads each word's layer
    tokens from `embeddings` {word: [L, C]}; yields the token ids [L, 77] of the L prompt copies."""
    table = tower(text_encoder, "text_model").embeddings.token_embedding
    rows = torch.cat(list(embeddings.values()))  # [W·L, C]: word w's layer-ℓ token reads row w·L + ℓ
    _check_width(rows.shape[1], table.embedding_dim)
    layers = rows.shape[0] // len(embeddings)
    ids = layerwise_token_ids(tokenizer, prompt, list(embeddings), table.num_embeddings, layers)  # [L, 77]
    deltas = [delta for part in factors for delta in _low_rank(part, text_encoder, alpha, "text encoder")]
    with _merged(text_encoder, deltas), concept_token_rows(text_encoder, rows):
        yield ids.to(table.weight.device)


def _check_width(concept_width: int, token_width: int) -> None:
    """Refuse concept embeddings made for another text encoder than the one given."""
    if concept_width != token_width:
        raise CheckpointError(
            f"this ED-LoRA's concept embeddings are {concept_width} wide ({TEXT_WIDTHS.get(concept_width, 'unknown')}), "
            f"but this text encoder's tokens are {token_width} wide ({TEXT_WIDTHS.get(token_width, 'unknown')}). "
            "Fix: use the ED-LoRA with the base model it was trained for."
        )


def _concept_embeddings(edloras: Sequence[EDLoRA], prompt: str, *, sdxl: bool) -> list[dict[str, Tensor]]:
    """Every word of the ED-LoRAs -> its [L, C] rows, one dict per text encoder (SD1.x: one, SDXL: two);
    concepts of one family and one L, with distinct words that all occur in `prompt` unless it is ""."""
    if not edloras:
        raise ValueError("give at least one ED-LoRA")
    is_sdxl = [bool(edlora.embeddings_2 or edlora.text_2) for edlora in edloras]
    if not sdxl and any(is_sdxl):
        raise ValueError(
            "this is an SDXL ED-LoRA (it has weights for a second text encoder): encode it with "
            "layerwise_prompt_embeddings_sdxl and SDXL's two text encoders"
        )
    if sdxl and not all(edlora.embeddings_2 for edlora in edloras):
        raise ValueError(
            f"SDXL encoding needs each concept word's rows for both text encoders, but ED-LoRA(s) "
            f"{[i for i, edlora in enumerate(edloras) if not edlora.embeddings_2]} have no {EMBEDDINGS_2}: "
            "they were made for SD1.x/SD2.x; use them with such a model and layerwise_prompt_embeddings"
        )
    if len({edlora.layers for edlora in edloras}) != 1:
        layers = [edlora.layers for edlora in edloras]
        raise ValueError(f"the ED-LoRAs have {layers} embeddings per word: they belong to different base models")
    words = [word for edlora in edloras for word in edlora.words]
    if len(set(words)) != len(words):
        raise ValueError(f"the ED-LoRAs share concept words ({words}); each word must name one concept")
    if prompt and (absent := [word for word in words if word not in prompt]):
        raise ValueError(
            f"the concept words {absent} do not occur in the prompt {prompt!r}: write every word of the ED-LoRA "
            f"({' '.join(words)}) into the prompt, e.g. 'a photo of {' '.join(words)}'; "
            "for the unconditional context pass prompt=\"\""
        )
    parts = ("embeddings", "embeddings_2") if sdxl else ("embeddings",)
    return [{word: rows for edlora in edloras for word, rows in getattr(edlora, part).items()} for part in parts]


def layerwise_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, words: list[str], vocabulary: int, layers: int
) -> Tensor:
    """Token ids [L, 77]: BOS, the prompt, EOS, padding; in copy ℓ word w is the id vocabulary + w·L + ℓ."""
    first = {word: vocabulary + i * layers for i, word in enumerate(words)}  # each word's layer-0 token
    body, is_word = _prompt_ids(tokenizer, prompt, first)
    if len(body) > MAX_LENGTH - 2:
        warnings.warn(
            f"Prompt is {len(body)} tokens long but the text encoder reads at most {MAX_LENGTH - 2}: "
            f"dropped the last {len(body) - (MAX_LENGTH - 2)} tokens of {prompt!r}.",
            stacklevel=3,
        )
        if any(is_word[MAX_LENGTH - 2 :]):  # the concept itself would be cut away, leaving a prompt without it
            raise ValueError(f"Prompt is {len(body)} tokens long and a concept word ({', '.join(words)}) lies past the "
                             f"{MAX_LENGTH - 2} the text encoder reads: shorten the prompt or put the concept earlier")
        body, is_word = body[: MAX_LENGTH - 2], is_word[: MAX_LENGTH - 2]
    if any(i >= vocabulary for i, word in zip(body, is_word) if not word):
        raise ValueError(f"the tokenizer gives ids beyond the text encoder's {vocabulary} token embeddings: not its tokenizer")
    padding = [tokenizer.pad_token_id] * (MAX_LENGTH - 2 - len(body))
    ids = torch.tensor([tokenizer.bos_token_id, *body, tokenizer.eos_token_id, *padding])  # [77]
    at_words = torch.tensor([False, *is_word, False, *[False] * len(padding)])  # [77]
    return ids + torch.arange(layers)[:, None] * at_words  # [L, 77]


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, word_ids: Mapping[str, int]
) -> tuple[list[int], list[bool]]:
    """The prompt's token ids (no BOS or EOS) with each word as the one id `word_ids[word]`, and where
    the words are. As a HF tokenizer does for added tokens, the text is split at the words and each
    piece is tokenized alone ("of<w>'s" gives "of", <w>, "'s"); longer words are matched first."""
    alternatives = "|".join(re.escape(word) for word in sorted(word_ids, key=len, reverse=True))
    ids: list[int] = []
    is_word: list[bool] = []
    for i, piece in enumerate(re.split(f"({alternatives})", prompt)):  # text, word, text, ..., text
        tokens = [word_ids[piece]] if i % 2 else tokenizer(piece, add_special_tokens=False).input_ids
        ids += tokens
        is_word += [bool(i % 2)] * len(tokens)
    return ids, is_word


@contextmanager
def _merged(model: nn.Module, deltas: Sequence[LowRank]) -> Iterator[None]:
    """Within the block, `model` has the deltas merged into its weights; afterwards the weights are
    copied back from copies taken before (exact, unlike subtracting the deltas again)."""
    saved = {delta.target: model.get_submodule(delta.target).weight.detach().clone() for delta in deltas}
    try:
        merge(model, list(deltas))
        yield
    finally:
        with torch.no_grad():
            for target, weight in saved.items():
                model.get_submodule(target).weight.copy_(weight)


@contextmanager
def concept_token_rows(text_encoder: nn.Module, rows: Tensor) -> Iterator[None]:
    """Within the block, token ids from the vocabulary size on read `rows` [N, C]: the token table
    extended for one call (the table itself is not touched). Gradients reach `rows` (ED-LoRA training)."""
    embeddings = tower(text_encoder, "text_model").embeddings
    table = embeddings.token_embedding
    embeddings.token_embedding = _ExtendedTable(table, rows.to(table.weight))
    try:
        yield
    finally:
        embeddings.token_embedding = table


class _ExtendedTable(nn.Module):
    """A token embedding table followed by extra rows: id i < V reads table[i], id V + j reads rows[j]."""

    def __init__(self, table: nn.Embedding, rows: Tensor):
        super().__init__()
        self.table, self.rows = table, rows

    def forward(self, ids: Tensor) -> Tensor:
        vocabulary = self.table.num_embeddings
        known = self.table(ids.clamp(max=vocabulary - 1))  # [..., C]
        extra = self.rows[(ids - vocabulary).clamp(min=0)]  # [..., C]
        return torch.where((ids >= vocabulary)[..., None], extra, known)
