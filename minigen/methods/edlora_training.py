"""Training ED-LoRA concepts: Mix-of-Show's embedding-decomposed LoRA, the concepts Concept Conductor composes.

What one concept learns, with the base model frozen (minigen.loading.edlora describes the file):

    concept words   each word (`<dog1>`, `<dog2>`) gets one input token embedding per cross-attention
                    layer of the UNet, [L, C]: L = 16 on SD1.5 (7 on toy-sd), C the text encoder's width
    text LoRA       down [r, in] and up [out, r] on q_proj, k_proj, v_proj, out_proj of every CLIP layer
    UNet LoRA       the same on to_q, to_k, to_v, to_out.0 of attn1 and attn2 of every transformer block

One training step, as Mix-of-Show's trainer takes it:

    1. The prompt ("a photo of a <dog1> <dog2>") is copied L times, and copy ℓ reads row ℓ of each word's
       embeddings where the word stands (`layerwise_token_ids`, `concept_token_rows`). The copies run
       through the CLIP text encoder with W + up @ down in its attention (`torch.func.functional_call`:
       the frozen weights are never written, and gradients reach the factors) -> [L, 77, C].
    2. Copy ℓ is the context of the ℓ-th cross-attention layer in forward order (down, mid, up:
       `Controls.contexts`), and the UNet LoRA is applied as `LowRank` residuals at scale 1.0 (the
       training alpha, a buffer the official code does not save).
    3. The loss is the ε-prediction error on the references' VAE latents (a posterior sample per step)
       at uniform timesteps, with offset noise 0.01.
    4. AdamW with learning rates of their own: embeddings 1e-3, text LoRA 1e-5, UNet LoRA 1e-4 (constant
       here, gradients clipped to norm 1 by the Trainer; the official configs name a "linear" schedule
       and weight decay 0.01).
    5. Once the mean norm of the concept's embedding rows reaches 0.55 (`emb_norm_threshold`), the
       embeddings stop: later steps read them detached, so only the LoRAs move on.

Initialisation as the official code: each word starts from an initializer, either a word of one
token (its token embedding, the same in all L rows) or `<rand-σ>` (one N(0, σ²) vector in all rows);
the official configs start the first word random and the last from the class word (`<rand-0.013>+dog`).
lora_down is drawn like torch's nn.Linear weights (kaiming-uniform, U(±1/√in)) and lora_up is zero,
so training starts at the base model.

    concept = EDLoRATraining(pipe, ["<dog1>", "<dog2>"], initializers(["<dog1>", "<dog2>"], ["dog"]), generator=g)
    trained = train_edlora(pipe, concept, images, "a photo of a <dog1> <dog2>", TRAINING, "runs/dog")
    save_edlora(trained.edlora, "dog.safetensors", metadata=trained.metadata)

The exported `EDLoRA` names its factors as the official files do (diffusers UNet paths, `text_model.`
CLIP paths) and is used like a downloaded one: `layerwise_prompt_embeddings` and `edlora_low_rank`,
merged at 0.7 by Concept Conductor. At alpha 1.0 they reproduce the training-time outputs.
Not implemented: the optional attention regularisation (`attn_reg_weight`, it needs concept masks),
the mask loss, data augmentation, SDXL (its two text encoders).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from minigen.controls import Controls
from minigen.image import check_reference_images
from minigen.loading.edlora import EDLoRA, FAMILIES, concept_token_rows, layerwise_token_ids
from minigen.loading.detect import detect
from minigen.loading.keymaps_unet import unet_to_diffusers
from minigen.methods.lora_factors import LoRAFactors, check_rank, cpu_copy
from minigen.models.unet import UNet
from minigen.objectives import diffusion_loss
from minigen.pipelines.sd import StableDiffusion
from minigen.trainer import Trainer, TrainConfig, fingerprint
from minigen.transformers_compat import file_layout, tower

RANK = 4
RANDOM_INIT = "<rand-0.013>"  # the official initializer of every word but the last
EMB_NORM_THRESHOLD = 0.55  # embeddings stop once their mean norm reaches this
NOISE_OFFSET = 0.01
LEARNING_RATES = {"embeddings": 1e-3, "text_lora": 1e-5, "unet_lora": 1e-4}  # peak (here: constant) per part
# Batch 2, constant learning rates, no EMA: the last weights are the concept. The step count is ours
# (the notes do not give the official one); lr is the UNet LoRA's, the other parts have their own.
TRAINING = TrainConfig(steps=800, batch=2, lr=LEARNING_RATES["unet_lora"], seed=0, warmup=0, ema=0.0, cosine=False)
UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # in attn1 and attn2 of every transformer block
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # in every CLIP self-attention
_RANDOM = re.compile(r"<rand-(\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)>")


# --- what is trained ---------------------------------------------------------------------------------


class ConceptEmbeddings(nn.Module):
    """The concept words' layer-wise input embeddings: `rows` [W, L, C], word w's row ℓ for layer ℓ."""

    def __init__(self, words: Sequence[str], rows: Tensor):
        super().__init__()
        self.words = list(words)
        self.rows = nn.Parameter(rows)

    def mean_norm(self) -> Tensor:
        """The mean L2 norm of the W·L rows: what `emb_norm_threshold` is compared with."""
        return self.rows.detach().norm(dim=-1).mean()


class EDLoRATraining(nn.Module):
    """The trainable parts of one ED-LoRA concept for an SD1.x (or SD2.x) pipeline.

    `embeddings` (words [W, L, C]), `text_lora` and `unet_lora` (rank `rank`, up = 0 at start).
    `initializers` gives one per word: a one-token word or "<rand-σ>" (see `initializers`). Random
    draws come from `generator`: one seed, one start (a resumed run then loads its checkpoint over it).
    """

    def __init__(
        self,
        pipe: StableDiffusion,
        words: Sequence[str],
        initializers: Sequence[str],
        *,
        rank: int = RANK,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        check_pipeline(pipe)
        check_words(words)
        if len(initializers) != len(words):
            raise ValueError(
                f"give one initializer per concept word: {len(words)} words {list(words)}, {len(initializers)} initializers"
            )
        unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoders[0], pipe.tokenizers[0]
        layers = len(cross_attention_layers(unet))
        rows = torch.stack([initial_rows(text_encoder, tokenizer, init, layers, generator) for init in initializers])
        targets = [(text_encoder, text_attention_layers(text_encoder)), (unet, unet_attention_layers(unet))]
        check_rank(rank, [model.get_submodule(target).weight for model, layers in targets for target in layers])
        self.rank = rank
        self.embeddings = ConceptEmbeddings(words, rows)  # [W, L, C]
        self.text_lora = LoRAFactors(*targets[0], rank, generator)
        self.unet_lora = LoRAFactors(*targets[1], rank, generator)

    @property
    def words(self) -> list[str]:
        return self.embeddings.words

    def parts(self) -> dict[str, nn.Module]:
        """The three parts by the names of their learning rates (`LEARNING_RATES`)."""
        return {"embeddings": self.embeddings, "text_lora": self.text_lora, "unet_lora": self.unet_lora}

    def parameter_count(self) -> int:
        """The trainable numbers, for a training's log."""
        return sum(p.numel() for p in self.parameters())

    def encode(
        self, text_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, *, train_embeddings: bool = True
    ) -> Tensor:
        """The prompt's layer-wise contexts [L, 77, C] through the text encoder with its LoRA (scale 1.0).

        Gradients reach the text LoRA, and the embeddings unless `train_embeddings` is False (then
        they are read detached: Adam leaves a parameter without a gradient as it is).
        """
        check_prompt(prompt, self.words)
        rows = self.embeddings.rows if train_embeddings else self.embeddings.rows.detach()  # [W, L, C]
        table = tower(text_encoder, "text_model").embeddings.token_embedding
        ids = layerwise_token_ids(tokenizer, prompt, self.words, table.num_embeddings, rows.shape[1])  # [L, 77]
        weights = self.text_lora.merged_weights(text_encoder)
        with concept_token_rows(text_encoder, rows.flatten(0, 1)):  # word w's layer-ℓ token reads row w·L + ℓ
            return functional_call(text_encoder, weights, (ids.to(table.weight.device),)).last_hidden_state

    def controls(self, unet: UNet, contexts: Tensor, batch: int) -> Controls:
        """The UNet's controls: context ℓ ([L, 77, C], one per cross-attention layer in forward order)
        for layer ℓ, repeated over `batch` rows, and the UNet LoRA at the training alpha 1.0."""
        layers = cross_attention_layers(unet)
        per_layer = {layer: contexts[i][None].expand(batch, -1, -1) for i, layer in enumerate(layers)}  # [B, 77, C]
        return Controls(contexts=per_layer, low_rank=self.unet_lora.low_rank(1.0))

    def export(self, base: str | None = None) -> EDLoRA:
        """The concept as an `EDLoRA`, named as the official files name it (CPU, fp32)."""
        rows = cpu_copy(self.embeddings.rows)  # [W, L, C]
        embeddings = {word: rows[i] for i, word in enumerate(self.words)}  # [L, C] each
        return EDLoRA(embeddings=embeddings, unet=self.unet_lora.factors(), text=self.text_lora.factors(), base=base)


# --- the layers and the initial embeddings --------------------------------------------------------


def cross_attention_layers(unet: UNet) -> list[str]:
    """The UNet's cross-attention layer ids in forward order (down, mid, up): layer ℓ reads context ℓ."""
    return [layer for layer, kinds in unet.attention_sites().items() if "cross" in kinds]


def unet_attention_layers(unet: UNet) -> dict[str, str]:
    """{minigen module path: diffusers module path} of to_q, to_k, to_v, to_out.0 in attn1 and attn2."""
    paths = [
        f"{block}.{attention}.{projection}"
        for block in unet.attention_layers().values()
        for attention in ("attn1", "attn2")
        for projection in UNET_PROJECTIONS
    ]
    tagged = {f"{path}.weight": torch.tensor(i) for i, path in enumerate(paths)}  # the key map renames keys only
    diffusers = {int(index): key.removesuffix(".weight") for key, index in unet_to_diffusers(tagged, unet.config).items()}
    return {path: diffusers[i] for i, path in enumerate(paths)}


def text_attention_layers(text_encoder: nn.Module) -> dict[str, str]:
    """{installed module path: file path (`text_model.encoder.layers.i.self_attn.q_proj`)} of the CLIP
    attention projections; the two differ where transformers has no `text_model` level."""
    paths = [
        name
        for name, module in text_encoder.named_modules()
        if isinstance(module, nn.Linear) and re.search(r"self_attn\.(" + "|".join(TEXT_PROJECTIONS) + r")$", name)
    ]
    if not paths:
        raise ValueError(f"the text encoder ({type(text_encoder).__name__}) has no CLIP self-attention projections to adapt")
    return dict(zip(paths, file_layout({path: path for path in paths}, text_encoder, "text_model")))


def initializers(words: Sequence[str], given: Sequence[str] = ()) -> list[str]:
    """One initializer per word: `given` one per word as is, or fewer (the last words), the earlier words
    then starting random (`<rand-0.013>`, the official `<rand-0.013>+dog`). None given: all random."""
    given = list(given)
    if len(given) > len(words):
        raise ValueError(
            f"{len(given)} initializers {given} for {len(words)} concept words {list(words)}: give at most one per word"
        )
    return [RANDOM_INIT] * (len(words) - len(given)) + given


def initial_rows(
    text_encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, initializer: str, layers: int, generator: torch.Generator | None
) -> Tensor:
    """A word's starting embeddings [L, C]: `<rand-σ>` -> one N(0, σ²) vector, a word -> its token
    embedding; the same vector in all L rows."""
    table = tower(text_encoder, "text_model").embeddings.token_embedding.weight  # [V, C]
    if match := _RANDOM.fullmatch(initializer):
        vector = torch.randn(table.shape[1], generator=generator) * float(match[1])
    else:
        ids = tokenizer(initializer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"the initializer {initializer!r} is {len(ids)} tokens, but a concept word starts from one token's "
                f"embedding: pick a word of one token (e.g. the class word 'dog'), or '<rand-σ>' such as {RANDOM_INIT!r}"
            )
        vector = table[ids[0]].detach().float().cpu()
    return vector.float().repeat(layers, 1).to(table.device)


# --- checks ----------------------------------------------------------------------------------------


def check_pipeline(pipe) -> None:
    """ED-LoRA training here takes an SD1.x-style pipeline: one CLIP text encoder with its tokenizer, and a UNet."""
    if not isinstance(pipe, StableDiffusion):
        raise ValueError(
            f"ED-LoRA concepts are trained for Stable Diffusion UNets (SD1.x); this model is a {type(pipe).__name__}"
        )
    if pipe.is_sdxl:
        raise ValueError(
            "ED-LoRA training for SDXL (two text encoders, 70 embeddings per word) is not implemented; "
            "train on an SD1.x model such as sd15 or toy-sd"
        )
    if not pipe.tokenizers or not pipe.text_encoders:
        raise ValueError("ED-LoRA training adds its concept words to the CLIP tokenizer and trains them through the text encoder; "
                         "this pipeline lacks them: load the model with its tokenizer and text encoder")


def check_words(words: Sequence[str]) -> None:
    if not words:
        raise ValueError("give at least one concept word, e.g. '<dog1>'")
    if bad := [word for word in words if not word or re.search(r"\s", word)]:
        raise ValueError(f"concept words must be non-empty and without spaces, got {bad}")
    if len(set(words)) != len(words):
        raise ValueError(f"the concept words {list(words)} repeat one; each word gets embeddings of its own")


def check_prompt(prompt: str, words: Sequence[str]) -> None:
    if absent := [word for word in words if word not in prompt]:
        raise ValueError(
            f"the concept words {absent} do not occur in the training prompt {prompt!r}; write every word into it, "
            f"e.g. 'a photo of a {' '.join(words)}'"
        )


# --- training ----------------------------------------------------------------------------------------


@dataclass
class TrainedEDLoRA:
    """What `train_edlora` returns: the concept, the metadata for its file, this run's losses."""

    edlora: EDLoRA
    metadata: dict[str, str]
    losses: list[float]


def train_edlora(
    pipe: StableDiffusion,
    concept: EDLoRATraining,
    images: Tensor,
    prompt: str,
    config: TrainConfig = TRAINING,
    work: str | Path = "runs/edlora",
    *,
    learning_rates: Mapping[str, float] = LEARNING_RATES,
    emb_norm_threshold: float | None = EMB_NORM_THRESHOLD,
    noise_offset: float = NOISE_OFFSET,
    save_every: int = 100,
    log_every: int = 50,
) -> TrainedEDLoRA:
    """Fit `concept` to reference `images` ([N, 3, H, W] in [0, 1]) captioned `prompt`; the UNet, VAE and
    text encoder stay frozen (bit for bit). Each step draws `config.batch` references and a posterior
    sample of their latents. `learning_rates` by part (`LEARNING_RATES`; a part at 0 is not trained);
    `emb_norm_threshold` None lets the embeddings train to the end. Resumable from `work`, but only
    from a checkpoint of the same base, references, prompt, words and settings."""
    check_pipeline(pipe)
    check_prompt(prompt, concept.words)
    check_reference_images(images)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoders[0], pipe.tokenizers[0]
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    parts = trainable_parts(concept, learning_rates)
    device = concept.embeddings.rows.device
    pixels = (images * 2 - 1).to(device, vae.decoder.conv_in.weight.dtype)  # [N, 3, H, W] in [-1, 1]

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = torch.randint(0, len(pixels), (config.batch,), generator=generator)
        with torch.no_grad():
            latents = vae.encode(pixels[index], generator=generator)  # [B, 4, H/8, W/8]
        train_embeddings = emb_norm_threshold is None or float(concept.embeddings.mean_norm()) < emb_norm_threshold
        contexts = concept.encode(text_encoder, tokenizer, prompt, train_embeddings=train_embeddings)  # [L, 77, C]
        controls = concept.controls(unet, contexts, config.batch)
        return diffusion_loss(
            unet, pipe.schedule, latents, None, generator=generator, controls=controls, noise_offset=noise_offset
        )

    settings = {"rank": concept.rank, "batch": config.batch, "seed": config.seed, "lr": dict(learning_rates),
                "emb_norm_threshold": emb_norm_threshold, "noise_offset": noise_offset}  # fmt: skip
    base = fingerprint(unet, vae, text_encoder)
    run = {  # a checkpoint in `work` resumes only if it was trained on the same base, data and settings
        "base": base,
        "references": fingerprint(images),
        "prompt": prompt,
        "words": json.dumps(concept.words),
        "initial": fingerprint(*concept.parts().values()),  # where training starts (--init-word, --seed): another start is another run
        "settings": json.dumps(settings),
    }
    trainer = Trainer("edlora", parts, config, Path(work), device, run, lr={name: learning_rates[name] for name in parts})
    losses = trainer.run(loss_fn, save_every, log_every)
    norm = round(float(concept.embeddings.mean_norm()), 6)
    training = settings | {"references": len(images), "embedding_norm": norm}
    metadata = {"base_fingerprint": base, "prompt": prompt, "steps": str(config.steps), "training": json.dumps(training)}
    return TrainedEDLoRA(concept.export(base_family(unet)), metadata, losses)


def trainable_parts(concept: EDLoRATraining, learning_rates: Mapping[str, float]) -> dict[str, nn.Module]:
    """The parts the Trainer optimizes: those with a positive learning rate (the others are frozen)."""
    if unknown := sorted(set(learning_rates) ^ set(LEARNING_RATES)):
        raise ValueError(
            f"give learning rates for exactly {sorted(LEARNING_RATES)}; got {sorted(learning_rates)} ({unknown} differ)"
        )
    if negative := [name for name, lr in learning_rates.items() if not lr >= 0]:
        raise ValueError(f"learning rates must be >= 0 (0 freezes a part); {negative} are not")
    parts = {}
    for name, part in concept.parts().items():
        part.requires_grad_(learning_rates[name] > 0)
        if learning_rates[name] > 0:
            parts[name] = part
    if not parts:
        raise ValueError("every learning rate is 0: nothing to train")
    return parts


def base_family(unet: UNet) -> str | None:
    """The family the file's `base` records ("sd1", "sd2"), or None where the weights do not tell."""
    family = detect(unet.state_dict()).family
    return family if family in FAMILIES else None
