"""SDXL ED-LoRAs: layer-wise encoding through both text encoders, and scripts/conduct.py on SDXL.

The ED-LoRAs are random, in the official SDXL layout: two concept words with rows for both encoders
(`new_concept_embedding` [L, 32], `new_concept_embedding_2` [L, 48]) and rank-2 factors on q/k/v/out_proj
of every layer of each encoder (`text_encoder`, `text_encoder_2`).

Reference and tolerance, fp32: Concept Conductor's SDXL encoding written out on deep copies, as its
pipeline does it: both encoders' weights merged by hand (W + 0.7 · up @ down), the tokens `<new{w·L+ℓ}>`
added to both HF tokenizers, `resize_token_embeddings` and each encoder's rows written, L prompt copies,
the penultimate hidden states of both encoders concatenated, and the pooled text (transformers'
`text_embeds`, pooled at the first EOS) of copy 0 only: <= 1e-5 (outputs have std ≈ 0.6; measured
6e-7 for the contexts, 1e-6 for the pooled text).
"""

import copy
import importlib.util

import pytest
import torch
from torch import nn

from minigen.loading.detect import CheckpointError
from minigen.loading.edlora import (
    EDLoRA,
    Factors,
    layerwise_prompt_embeddings,
    layerwise_prompt_embeddings_sdxl,
    read_edlora,
    save_edlora,
)
from minigen.methods.concept_conductor import ConductorSettings
from minigen.text.encoders import encode_sdxl, sdxl_time_ids
from minigen.text.tokenizer import OPEN_CLIP_PAD, load_clip_tokenizer, tokenize

from conftest import REPO, TINY_SDXL_UNET, TINY_VAE, tiny_clip

RANK, ALPHA, LAYERS = 2, 0.7, 5
WORDS = ("<chow_dog_2>", "<chow_dog_1>")
PROMPT = "a photo of <chow_dog_2> <chow_dog_1> on the beach"


@pytest.fixture
def encoders():
    torch.manual_seed(3)
    return [tiny_clip(32), tiny_clip(48, projection=True)]  # CLIP-L and bigG stand-ins: 32 + 48 wide


@pytest.fixture(scope="module")
def tokenizers():
    return [load_clip_tokenizer(), load_clip_tokenizer(pad_token=OPEN_CLIP_PAD)]  # EOS padding, "!" padding


def text_factors(encoder: nn.Module, g: torch.Generator) -> dict:
    """Official `text_encoder(_2)` entries: rank-2 factors on the attention projections of every layer."""
    hidden, factors = encoder.config.hidden_size, {}
    for i in range(encoder.config.num_hidden_layers):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            path = f"text_model.encoder.layers.{i}.self_attn.{projection}"
            factors[f"{path}.lora_down.weight"] = torch.randn(RANK, hidden, generator=g) * 0.3
            factors[f"{path}.lora_up.weight"] = torch.randn(hidden, RANK, generator=g) * 0.3
    return factors


def sdxl_params(encoders, words=WORDS, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "new_concept_embedding": {word: torch.randn(LAYERS, 32, generator=g) for word in words},
        "new_concept_embedding_2": {word: torch.randn(LAYERS, 48, generator=g) for word in words},
        "text_encoder": text_factors(encoders[0], g),
        "text_encoder_2": text_factors(encoders[1], g),
        "unet": {},
    }


def read(params, tmp_path, name="concept.pth") -> EDLoRA:
    torch.save({"params": params}, tmp_path / name)
    return read_edlora(tmp_path / name, allow_pickle=True)


def official_sdxl_encoding(encoders, tokenizers, prompt: str, all_params: list[dict], alpha: float, legacy_eos: bool = False):
    """Concept Conductor's SDXL encoding on copies -> (contexts [L, 77, 80], pooled of every copy [L, 48]).
    `legacy_eos`: encoder 2 pools as transformers does under SDXL's configs (eos_token_id=2: at argmax(ids))."""
    encoders, tokenizers = copy.deepcopy(encoders), copy.deepcopy(tokenizers)
    if legacy_eos:
        getattr(encoders[1], "text_model", encoders[1]).eos_token_id = 2
    outputs = []
    with torch.no_grad():
        for encoder, tokenizer, suffix in zip(encoders, tokenizers, ("", "_2")):
            tower = getattr(encoder, "text_model", encoder)  # transformers >= 5.6 has no .text_model level
            names, prompts = {}, [prompt] * LAYERS
            for params in all_params:
                for key, down in params[f"text_encoder{suffix}"].items():
                    if key.endswith(".lora_down.weight"):
                        up = params[f"text_encoder{suffix}"][key.replace("lora_down", "lora_up")]
                        tower.get_submodule(key.removesuffix(".lora_down.weight").removeprefix("text_model.")).weight += alpha * up @ down
                for word, rows in params[f"new_concept_embedding{suffix}"].items():
                    names[word] = [f"<new{len(names) * LAYERS + layer}>" for layer in range(LAYERS)]
                    assert tokenizer.add_tokens(names[word]) == LAYERS
                    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are written next
                    encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names[word])] = rows
            for word, new_tokens in names.items():
                prompts = [p.replace(word, new) for p, new in zip(prompts, new_tokens)]  # copy ℓ: the ℓ-th token
            outputs.append(encoder(tokenize(tokenizer, prompts), output_hidden_states=True))
    return torch.cat([outputs[0].hidden_states[-2], outputs[1].hidden_states[-2]], dim=-1), outputs[1].text_embeds


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(encoders, tokenizers, before, tables, sizes):
    for encoder, saved, table in zip(encoders, before, tables):
        now = encoder.state_dict()
        assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)  # bit for bit
        assert encoder.get_input_embeddings() is table
    assert [len(tokenizer) for tokenizer in tokenizers] == sizes


@pytest.mark.parametrize("prompt", [PROMPT, "A photo of<chow_dog_2>'s toy,<chow_dog_1>dog"], ids=["plain", "words-glued-to-text"])
def test_sdxl_layerwise_embeddings_equal_the_official_pipeline(encoders, tokenizers, tmp_path, prompt):
    params = sdxl_params(encoders)
    before, tables, sizes = [state(e) for e in encoders], [e.get_input_embeddings() for e in encoders], [len(t) for t in tokenizers]

    contexts, pooled = layerwise_prompt_embeddings_sdxl(encoders, tokenizers, prompt, read(params, tmp_path), official_pooling=False)
    reference, pooled_per_copy = official_sdxl_encoding(encoders, tokenizers, prompt, [params], ALPHA)
    _, official_pooled = layerwise_prompt_embeddings_sdxl(encoders, tokenizers, prompt, read(params, tmp_path))
    _, legacy_per_copy = official_sdxl_encoding(encoders, tokenizers, prompt, [params], ALPHA, legacy_eos=True)
    assert (official_pooled - legacy_per_copy[0]).abs().max() <= 1e-5, "pooled where transformers pools under SDXL's configs"
    assert (official_pooled - pooled).abs().max() > 1e-3, "the legacy pooling reads a concept token, not EOS"

    assert contexts.shape == (LAYERS, 77, 80) and pooled.shape == (48,)
    assert (contexts - reference).abs().max() <= 1e-5
    assert (pooled - pooled_per_copy[0]).abs().max() <= 1e-5, "the pooled text of the first copy (official)"
    assert (pooled_per_copy[0] - pooled_per_copy[3]).abs().max() > 1e-2, "copies differ: taking copy 0 matters"
    assert (contexts[0, :, :32] - contexts[3, :, :32]).abs().max() > 1e-2, "encoder 1 reads each layer's row"
    assert (contexts[0, :, 32:] - contexts[3, :, 32:]).abs().max() > 1e-2, "encoder 2 reads each layer's row"
    assert_unchanged(encoders, tokenizers, before, tables, sizes)


def test_sdxl_empty_prompt_is_the_official_uncond(encoders, tokenizers, tmp_path):
    params = sdxl_params(encoders)
    uncond, pooled = layerwise_prompt_embeddings_sdxl(encoders, tokenizers, "", read(params, tmp_path))
    reference, pooled_per_copy = official_sdxl_encoding(encoders, tokenizers, "", [params], ALPHA)
    assert uncond.shape == (LAYERS, 77, 80) and (uncond - reference).abs().max() <= 1e-5
    assert (pooled - pooled_per_copy[0]).abs().max() <= 1e-5
    assert (uncond - uncond[0]).abs().max() <= 1e-6  # the same for every layer
    with torch.no_grad():
        unmerged, unmerged_pooled = encode_sdxl(encoders[0], tokenizers[0], encoders[1], tokenizers[1], "")
    assert (uncond[0, :, :32] - unmerged[0, :, :32]).abs().max() > 1e-2, "encoder 1's LoRA is merged"
    assert (uncond[0, :, 32:] - unmerged[0, :, 32:]).abs().max() > 1e-2, "encoder 2's LoRA is merged"
    assert (pooled - unmerged_pooled[0]).abs().max() > 1e-2


def test_two_sdxl_edloras_in_one_prompt(encoders, tokenizers, tmp_path):
    dog, cat = sdxl_params(encoders), sdxl_params(encoders, words=("<cat>",), seed=1)
    edloras = [read(dog, tmp_path, "dog.pth"), read(cat, tmp_path, "cat.pth")]
    prompt = "<chow_dog_2> <chow_dog_1> and a <cat>"
    contexts, pooled = layerwise_prompt_embeddings_sdxl(encoders, tokenizers, prompt, edloras)
    reference, pooled_per_copy = official_sdxl_encoding(encoders, tokenizers, prompt, [dog, cat], ALPHA, legacy_eos=True)
    assert (contexts - reference).abs().max() <= 1e-5 and (pooled - pooled_per_copy[0]).abs().max() <= 1e-5


def test_sdxl_weights_are_restored_when_the_second_encoder_fails(encoders, tokenizers, tmp_path):
    edlora = read(sdxl_params(encoders), tmp_path)
    before, tables, sizes = [state(e) for e in encoders], [e.get_input_embeddings() for e in encoders], [len(t) for t in tokenizers]

    def fail(module, inputs, output):
        raise RuntimeError("out of memory")

    handle = getattr(encoders[1], "text_model", encoders[1]).final_layer_norm.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            layerwise_prompt_embeddings_sdxl(encoders, tokenizers, PROMPT, edlora)
    finally:
        handle.remove()
    assert_unchanged(encoders, tokenizers, before, tables, sizes)


def test_sdxl_errors_are_named(encoders, tokenizers, tmp_path):
    edlora = read(sdxl_params(encoders), tmp_path)
    with pytest.raises(CheckpointError, match="concept embeddings are 32 wide .* tokens are 48 wide"):
        layerwise_prompt_embeddings_sdxl(encoders[::-1], tokenizers, PROMPT, edlora)  # the encoders swapped
    with pytest.raises(ValueError, match="two text encoders and two tokenizers, got 1 and 2"):
        layerwise_prompt_embeddings_sdxl(encoders[:1], tokenizers, PROMPT, edlora)
    with pytest.raises(ValueError, match="encode it with layerwise_prompt_embeddings_sdxl"):
        layerwise_prompt_embeddings(encoders[0], tokenizers[0], PROMPT, edlora)
    sd1 = EDLoRA(edlora.embeddings, {}, edlora.text)  # no new_concept_embedding_2
    with pytest.raises(ValueError, match=r"ED-LoRA\(s\) \[0\] have no new_concept_embedding_2"):
        layerwise_prompt_embeddings_sdxl(encoders, tokenizers, PROMPT, sd1)
    with pytest.raises(ValueError, match=r"the concept words \['<chow_dog_1>'\] do not occur"):
        layerwise_prompt_embeddings_sdxl(encoders, tokenizers, "a <chow_dog_2>", edlora)


# ---------------------------------------------------------------- scripts/conduct.py on a tiny SDXL pipeline


def tiny_sdxl_pipeline():
    """A random SDXL-topology pipeline at 64 px: TINY_SDXL_UNET (context 16 + 16, pooled 32), two CLIP encoders."""
    from minigen.models.unet import UNet
    from minigen.models.vae import AutoencoderKL
    from minigen.pipelines.sd import StableDiffusion
    from minigen.text.encoders import TextEncoderConfig, build_text_encoder

    torch.manual_seed(0)
    te1 = build_text_encoder(TextEncoderConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, hidden_act="quick_gelu"))
    te2 = build_text_encoder(TextEncoderConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, hidden_act="gelu", projection_dim=32))
    tokenizers = [load_clip_tokenizer(), load_clip_tokenizer(pad_token=OPEN_CLIP_PAD)]
    return StableDiffusion(UNet(TINY_SDXL_UNET).eval(), AutoencoderKL(TINY_VAE).eval(), [te1, te2], tokenizers, default_size=64)


def sdxl_concept(pipe, word: str, g: torch.Generator) -> EDLoRA:
    """A random SDXL ED-LoRA for `pipe`: rows for both encoders, factors on both and on the UNet's attention."""
    from minigen.loading.keymaps_unet import unet_to_diffusers

    layers = len([kinds for kinds in pipe.unet.attention_sites().values() if "cross" in kinds])
    weights = {k: v for k, v in pipe.unet.state_dict().items() if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
    unet = {k.removesuffix(".weight"): Factors(torch.randn(2, v.shape[1], generator=g) * 0.05, torch.randn(v.shape[0], 2, generator=g) * 0.05)
            for k, v in unet_to_diffusers(weights, pipe.unet.config).items()}  # fmt: skip
    texts = [factor_pairs(text_factors(encoder, g)) for encoder in pipe.text_encoders]
    embeddings = [{word: torch.randn(layers, 16, generator=g) * 0.01} for _ in range(2)]
    return EDLoRA(embeddings[0], unet, texts[0], embeddings_2=embeddings[1], text_2=texts[1], base="sdxl")


def factor_pairs(keys: dict) -> dict[str, Factors]:
    """{layer: Factors} from official `<layer>.lora_down.weight` / `<layer>.lora_up.weight` keys."""
    return {k.removesuffix(".lora_down.weight"): Factors(v, keys[k.replace("lora_down", "lora_up")]) for k, v in keys.items() if k.endswith("lora_down.weight")}


@pytest.fixture(scope="module")
def conduct_sdxl(tmp_path_factory):
    """scripts/conduct.py as a module whose load_pipeline gives the tiny SDXL pipeline; two ED-LoRAs,
    a 64x64 reference and its masks in a folder."""
    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("conduct", REPO / "scripts" / "conduct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pipe = tiny_sdxl_pipeline()
    module.load_pipeline = lambda name: pipe
    folder = tmp_path_factory.mktemp("conduct_sdxl")
    module.INVERSIONS = folder / "inversions"
    g = torch.Generator().manual_seed(0)
    for i, word in enumerate(["<star1>", "<heart1>"]):
        save_edlora(sdxl_concept(pipe, word, g), folder / f"c{i}.safetensors")
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32], image[:, 32:] = (200, 50, 50), (50, 50, 200)
    Image.fromarray(image).save(folder / "ref.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(folder / "m0.png")
    Image.fromarray(255 - mask).save(folder / "m1.png")
    return module, pipe, folder


def test_conduct_builds_each_paths_sdxl_vector(conduct_sdxl):
    """A concept's y and y_uncond are the pooled text of its first prompt copy (of "" for the uncond)
    followed by the size embeddings of a 64x64 uncropped image, as StableDiffusion.encode_prompt builds y."""
    from minigen.models.unet import sdxl_vector

    module, pipe, folder = conduct_sdxl
    edlora = read_edlora(folder / "c0.safetensors")
    inputs = module.concept_inputs(pipe, "a <star1> on grass", edlora, 64, ALPHA)
    time_ids = sdxl_time_ids((64, 64), (0, 0), (64, 64))[None]  # [1, 6]
    embed_dim = (TINY_SDXL_UNET.adm_in_channels - 32) // 6
    for prompt, context, y in (("a <star1> on grass", "context", "y"), ("", "uncond", "y_uncond")):
        contexts, pooled = layerwise_prompt_embeddings_sdxl(pipe.text_encoders, pipe.tokenizers, prompt, edlora)
        assert torch.equal(inputs[context], contexts)
        assert (inputs[y] - sdxl_vector(pooled[None], time_ids, embed_dim)[0]).abs().max() <= 1e-6
    settings = ConductorSettings.for_unet(pipe.unet, steps=4)  # what conduct.py runs: SDXL's official settings
    assert (settings.guidance_end, settings.guidance_weight, settings.refine_start, settings.overlap_threshold) == (50, 40.0, 60, 0.7)
    assert set(settings.guidance_layers) <= set(pipe.unet.attention_sites()) and settings.mask_layer in pipe.unet.attention_sites()


def test_conduct_runs_on_sdxl_with_layout_alignment(conduct_sdxl, tmp_path, monkeypatch):
    """2 steps at 64 px with layout alignment and mask refinement: the image and the mask grid are
    written. The reference inversion (999 UNet calls) is replaced by the reference latent at every
    sampling timestep; it must be given the reference prompt's vector y, which the guidance passes read."""
    from PIL import Image

    from minigen.methods.concept_conductor import Reference

    module, pipe, folder = conduct_sdxl
    given = {}

    def invert(unet, latent, context, *, steps, schedule, cache, y):
        given["y"], given["schedule"] = y, schedule
        return Reference(context, {int(t): latent for t in schedule.timesteps(steps)}, y)

    monkeypatch.setattr(module, "invert_reference", invert)
    args = ["--reference", str(folder / "ref.png"), "--reference-prompt", "a red star and a blue heart",
            "--prompt", "a red star and a blue heart on grass", "--steps", "2", "--out", str(tmp_path / "out.png"), "--save-masks"]  # fmt: skip
    for i, prompt in enumerate(["a <star1> on grass", "a <heart1> on grass"]):
        args += ["--concept", prompt, str(folder / f"c{i}.safetensors"), str(folder / f"m{i}.png")]
    assert module.run([*args, "--debug"]) == 0
    reference_y = pipe.encode_prompt(["a red star and a blue heart"], 64, 64).y[0]
    assert (given["y"] - reference_y).abs().max() <= 1e-5  # encoded in a batch of three there
    assert given["schedule"] == pipe.schedule  # the model's own schedule, which the conductor samples with too
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)
    assert (tmp_path / "out-masks.png").exists()
