"""Every ```python block of README.md runs here on the toy models, each in a fresh namespace from a
temporary working folder, and what it makes is checked.

A block runs exactly as written unless the line right above its fence is a marker, an HTML comment
(invisible in the rendered README) such as

    <!-- readme-test: setup="conductor" swap="/models/sd.safetensors -> weights/toy-sd.safetensors" replace="steps=28 -> steps=2" -->

    swap="REAL -> TOY"    the string literal "REAL" (a real model's file or folder) becomes the toy model
                          file TOY, a path under weights/ resolved to the installed toy weights
    replace="OLD -> NEW"  the text OLD becomes NEW: fewer steps, a layer the toy model has
    setup="NAME"          SETUPS[NAME] (below) runs first: it puts into the namespace the names the
                          fragment assumes (pipe, encoder, tensors, a toy file in the working folder)
                          and returns the block's check

Each swap and replace must match the block and no "/models/..." path may remain, so a block that
changes under its marker fails here instead of drifting. A block without a setup must leave
`images`, a batch of toy-size images (checked: shape, range, finite, not constant); a block without
a marker must run as it is, so a new example cannot escape the test.
"""

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from minigen.controls import Controls, LowRank
from minigen.loading.edlora import EDLoRA, Factors, save_edlora
from minigen.loading.toy import WEIGHTS
from minigen.methods.edlora_training import EDLoRATraining, cross_attention_layers, initializers
from minigen.methods.residuals import Residuals
from minigen.models.flux_tokens import image_ids, pack_latents, text_ids
from minigen.text.spans import token_span
from minigen.text.t5 import encode_flux

from conftest import REPO

README = REPO / "README.md"
MARKER = re.compile(r"^<!--\s*readme-test:(?P<body>.*?)-->\s*$")
ATTRIBUTE = re.compile(r'\s*(?P<key>[a-z]+)="(?P<value>[^"]*)"')
ARROW = " -> "


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    section: str
    index: int  # the block's place in its section, from 0
    code: str
    marker: list[tuple[str, str]] | None  # (key, value) in marker order

    @property
    def id(self) -> str:  # "FLUX-1.1": the second block under "## FLUX.1"
        return f"{re.sub(r'[^A-Za-z0-9]+', '-', self.section).strip('-')}.{self.index}"


def parse_marker(line: str) -> list[tuple[str, str]]:
    match = MARKER.match(line.strip())
    if match is None:
        raise ValueError(f"not a readme-test marker: {line!r}")
    body, attributes = match["body"], []
    while body.strip():
        attribute = ATTRIBUTE.match(body)
        if attribute is None or attribute["key"] not in ("setup", "swap", "replace"):
            raise ValueError(f"readme-test marker {line!r}: cannot read {body.strip()!r}; write setup=\"…\", swap=\"A -> B\", replace=\"A -> B\"")
        attributes.append((attribute["key"], attribute["value"]))
        body = body[attribute.end() :]
    return attributes


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, section, i = [], "top", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("```"):  # any fence: skip to its end, so a bash block's text is never read as Python
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if line.strip() == "```python":
                marked = i > 0 and "readme-test:" in lines[i - 1]
                code = "\n".join(lines[i + 1 : end]) + "\n"
                index = sum(block.section == section for block in blocks)
                blocks.append(Block(i + 1, section, index, code, parse_marker(lines[i - 1]) if marked else None))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks()


def prepared(block: Block) -> tuple[str, str | None]:
    """The block's code after its marker's swaps and replacements, and its setup's name."""
    code, setup = block.code, None
    for key, value in block.marker or ():
        if key == "setup":
            assert setup is None and value in SETUPS, f"line {block.line}: setup {value!r}: one setup, one of {sorted(SETUPS)}"
            setup = value
            continue
        assert ARROW in value, f"line {block.line}: {key}={value!r} must read \"OLD{ARROW}NEW\""
        old, new = value.split(ARROW, 1)
        if key == "swap":
            toy = WEIGHTS / new.removeprefix("weights/")
            assert new.startswith("weights/") and toy.exists(), f"line {block.line}: swap target {new!r} is no toy model file under weights/"
            old, new = json.dumps(old), json.dumps(str(toy))  # string literals
        assert old in code, f"line {block.line}: the marker's {key} {old!r} is not in the block: update the marker"
        code = code.replace(old, new)
    assert '"/models/' not in code, f"line {block.line}: a real model path is left; add a swap to its readme-test marker"
    return code, setup


# --- checks ----------------------------------------------------------------------------------------------------------


def check_images(namespace: dict) -> None:
    assert "images" in namespace, "the block must leave `images`, or its marker must name a setup whose check fits it"
    images = namespace["images"]
    assert images.dim() == 4 and images.shape[1:] == (3, 64, 64), images.shape
    assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1 and images.std() > 0.01


# --- setups: the names each fragment assumes, and its check ----------------------------------------------------------

Check = Callable[[dict], None]
Pipes = Callable[[str], object]  # "toy-sd" / "toy-flux" -> the pipeline (loaded once per module)


def flux_controls(namespace: dict, pipes: Pipes) -> Check:
    """FLUX token groups and joint-attention controls: toy-flux's transformer at the fragment's sizes, a
    512 px image (32 x 32 tokens) after dev's 512 text tokens, so `queries=range(512, 1536)` are the
    image's; a random condition group with a random subject LoRA on every double block's image qkv."""
    pipe = pipes("toy-flux")
    config, g = pipe.transformer.config, torch.Generator().manual_seed(0)
    prompt, length = "a red star on grass", 512
    with torch.no_grad():
        txt, y = encode_flux(pipe.t5, pipe.t5_tokenizer, pipe.clip, pipe.clip_tokenizer, [prompt], length)
    width, rank = config.hidden_size, 4
    subject_lora = [
        LowRank(f"double_blocks.{i}.img_attn.qkv", torch.randn(rank, width, generator=g) * 0.05, torch.randn(3 * width, rank, generator=g) * 0.05)
        for i in range(config.depth)
    ]
    subject = torch.full((32, 32), 0.1)
    subject[8:24, 8:24] = 1.0  # where the subject goes
    namespace.update(
        pipe=pipe, cond_tokens=pack_latents(torch.randn(1, 16, 64, 64, generator=g)), subject_lora=subject_lora,
        log_mask=subject.log(), span=token_span(pipe.t5_tokenizer, prompt, "star", max_length=length),
        img=pack_latents(torch.randn(1, 16, 64, 64, generator=g)), img_ids=image_ids(32, 32), txt=txt,
        txt_ids=text_ids(length), t=torch.full([1], 0.5), y=y, guidance=None,  # toy-flux, like schnell, has no guidance input
    )  # fmt: skip
    span = namespace["span"]

    def check(ns: dict) -> None:
        assert ns["v"].shape == (1, 1024, config.out_channels) and torch.isfinite(ns["v"]).all()
        assert ns["condition"].tokens.shape == (1, 1024, config.in_channels) and ns["condition"].ids.shape == (1, 1024, 3)
        assert ns["bias"][("img", "cond")].shape == (1024, 1)  # "a per-query column: [1024, 1]"
        (maps,) = ns["maps"].maps["double_blocks.1"]  # one call: [rows, heads averaged, the image queries, the span]
        assert maps.shape == (1, 1, 1024, len(span)) and 0 <= maps.min() and maps.max() <= 1

    return check


def sd_controls(namespace: dict, pipes: Pipes) -> Check:
    """The ConceptGate fragment on toy-sd: random image tokens and random per-layer key/value projections
    stand in for an IP-Adapter."""
    pipe = pipes("toy-sd")
    width = pipe.unet.config.context_dim  # IP-Adapter's image tokens have the text's width
    projections = {}
    for layer, path in pipe.unet.attention_layers().items():
        inner = pipe.unet.get_submodule(f"{path}.attn2.to_k").out_features
        projections[layer] = (nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False))
    g = torch.Generator().manual_seed(0)
    namespace.update(pipe=pipe, projections=projections, ip_tokens=torch.randn(1, 4, width, generator=g), empty_tokens=torch.randn(1, 4, width, generator=g))

    def check(ns: dict) -> None:
        check_images(ns)
        assert ns["span"] == [5]
        assert ns["gate"].mask.shape == (2, 1, 8, 8)  # [rows, 1, h, w]: both CFG rows, up.1.0.0's grid at 64 px
        assert 0 <= ns["gate"].mask.min() and ns["gate"].mask.max() <= 1

    return check


def toy_edlora(pipe, words: list[str], init_word: str, seed: int) -> EDLoRA:
    """An ED-LoRA for toy-sd with small random values: the trainer's start, its zero up factors drawn."""
    g = torch.Generator().manual_seed(seed)
    edlora = EDLoRATraining(pipe, words, initializers(words, [init_word]), rank=2, generator=g).export()

    def drawn(factors: dict[str, Factors]) -> dict[str, Factors]:
        return {name: Factors(down, torch.randn(up.shape, generator=g) * 0.02) for name, (down, up) in factors.items()}

    edlora.unet, edlora.text = drawn(edlora.unet), drawn(edlora.text)
    return edlora


def conductor(namespace: dict, pipes: Pipes) -> Check:
    """Concept Conductor on toy-sd: two random ED-LoRAs (the dog's saved to dog.safetensors in the working
    folder), layout masks on the 16 x 16 latent grid (dog left, cat right), a random reference latent."""
    from minigen.loading.edlora import edlora_low_rank, layerwise_prompt_embeddings
    from minigen.methods.concept_conductor import Concept

    pipe = pipes("toy-sd")
    encoder, tokenizer = pipe.text_encoders[0], pipe.tokenizers[0]
    save_edlora(toy_edlora(pipe, ["<dog1>", "<dog2>"], "dog", seed=1), "dog.safetensors")
    cat_edlora = toy_edlora(pipe, ["<cat1>", "<cat2>"], "cat", seed=2)
    g = torch.Generator().manual_seed(0)
    dog_mask, cat_mask = torch.zeros(16, 16, dtype=torch.bool), torch.zeros(16, 16, dtype=torch.bool)
    dog_mask[4:12, 1:7], cat_mask[4:12, 9:15] = True, True
    cat = Concept(
        context=layerwise_prompt_embeddings(encoder, tokenizer, "a <cat1> <cat2> on the beach", cat_edlora),
        uncond=layerwise_prompt_embeddings(encoder, tokenizer, "", cat_edlora),
        low_rank=edlora_low_rank(cat_edlora, pipe.unet), mask=cat_mask,
    )  # fmt: skip
    with torch.no_grad():
        uncond, context = pipe.encode_prompt(["", "a dog and a cat on the beach"], 64, 64).context  # [77, C] each
        reference_context = pipe.encode_prompt(["a dog and a cat in the street"], 64, 64).context[0]
    namespace.update(
        pipe=pipe, encoder=encoder, tokenizer=tokenizer, dog_mask=dog_mask, cat=cat, context=context, uncond=uncond,
        reference_latent=torch.randn(1, 4, 16, 16, generator=g), reference_context=reference_context,
        noise=torch.randn(1, 4, 16, 16, generator=g),
    )  # fmt: skip
    layers, width = len(cross_attention_layers(pipe.unet)), pipe.unet.config.context_dim

    def check(ns: dict) -> None:
        assert ns["dog"].words == ["<dog1>", "<dog2>"]
        concept = ns["concept"]
        assert concept.context.shape == concept.uncond.shape == (layers, 77, width)  # SD1.5: [16, 77, 768]
        assert concept.mask.shape == ns["noise"].shape[-2:]  # SD1.5 at 512 px: [64, 64]
        assert concept.low_rank and all(isinstance(delta, LowRank) for delta in concept.low_rank)
        assert len(ns["reference"].latents) >= 2  # the inversion's latents at the guided steps
        z0 = ns["z0"]
        assert z0.shape == ns["noise"].shape and torch.isfinite(z0).all() and z0.std() > 0.01

    return check


def residuals(namespace: dict, pipes: Pipes) -> Check:
    """Personalized Residuals on toy-sd: random residuals for "sks dog" saved to dog.safetensors."""
    pipe = pipes("toy-sd")
    concept = Residuals(pipe.unet, identifier="sks", macro_class="dog", generator=torch.Generator().manual_seed(0))
    concept.save("dog.safetensors", base="toy-sd")
    prompt = "a sks dog on grass"
    namespace.update(pipe=pipe, prompt=prompt)
    positions = token_span(pipe.tokenizers[0], prompt, "sks") + token_span(pipe.tokenizers[0], prompt, "dog")

    def check(ns: dict) -> None:
        check_images(ns)
        assert ns["residuals"].identifier == "sks" and ns["residuals"].macro_class == "dog"
        assert isinstance(ns["everywhere"], Controls) and len(ns["everywhere"].low_rank) == len(ns["residuals"].targets)
        assert ns["tokens"] == positions  # identifier + class word
        assert isinstance(ns["lag"], Controls) and len(ns["lag"].record) == 1

    return check


def aligngen(namespace: dict, pipes: Pipes) -> Check:
    """AlignGen on toy-flux: a random AlignGen saved to guitar.safetensors with train_aligngen's record of
    64 px references (the defaults take 512 px), a random reference image and random Redux tokens."""
    from minigen.loading.aligngen import save_aligngen
    from minigen.methods.aligngen import AlignGen, AlignGenConfig, AlignGenSettings

    pipe = pipes("toy-flux")
    g = torch.Generator().manual_seed(0)
    module = AlignGen(AlignGenConfig.for_transformer(pipe.transformer), pipe.transformer)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    trained = {"method": asdict(AlignGenSettings(reference_size=64))}
    save_aligngen(module, "guitar.safetensors", metadata={"training": json.dumps(trained)})
    dim = pipe.transformer.config.context_in_dim
    namespace.update(pipe=pipe, reference=torch.rand(1, 3, 64, 64, generator=g), redux_tokens=torch.randn(1, 8, dim, generator=g))
    tokens = (64 // (2 * pipe.vae.config.downsample_factor)) ** 2  # a 64 px reference in 2x2 latent patches

    def check(ns: dict) -> None:
        check_images(ns)
        assert ns["aligngen"].settings.reference_size == 64  # the file's, not the default 512
        (group,) = ns["inputs"].extra
        assert group.name == "ref0" and group.tokens.shape[1] == tokens

    return check


SETUPS: dict[str, Callable[[dict, Pipes], Check]] = {
    "aligngen": aligngen,
    "flux_controls": flux_controls,
    "sd_controls": sd_controls,
    "conductor": conductor,
    "residuals": residuals,
}


# --- the tests -------------------------------------------------------------------------------------------------------


def test_the_readme_has_examples_and_every_marker_is_above_one():
    assert len(BLOCKS) >= 8
    markers = [line for line in README.read_text().splitlines() if "readme-test:" in line]
    assert len(markers) == sum(block.marker is not None for block in BLOCKS), (
        "a readme-test marker must be the line right above a ```python fence"
    )
    used = {value for block in BLOCKS for key, value in block.marker or () if key == "setup"}
    assert used == set(SETUPS), f"setups no block names: {sorted(set(SETUPS) - used)}"


def test_a_marker_that_no_longer_fits_its_block_fails():
    code = 'pipe = load_sd("/models/sd.safetensors")\nimages = pipe.generate("a star", steps=28)\n'
    swap = ("swap", "/models/sd.safetensors -> weights/toy-sd.safetensors")
    swapped, setup = prepared(Block(1, "x", 0, code, [swap, ("replace", "steps=28 -> steps=2")]))
    assert setup is None and '"/models/' not in swapped and "steps=2)" in swapped and json.dumps(str(WEIGHTS / "toy-sd.safetensors")) in swapped
    for marker, message in (
        ([swap, ("replace", "steps=30 -> steps=2")], "is not in the block"),  # the block changed, the marker did not
        ([("replace", "steps=28 -> steps=2")], "a real model path is left"),  # a real model the marker does not swap
        ([("swap", "/models/sd.safetensors -> weights/sd15.safetensors")], "no toy model file"),
        ([swap, ("setup", "nothing")], "one of"),
    ):
        with pytest.raises(AssertionError, match=message):
            prepared(Block(1, "x", 0, code, marker))
    with pytest.raises(ValueError, match="cannot read"):
        parse_marker('<!-- readme-test: swapp="a -> b" -->')


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_example_runs(block, tmp_path, monkeypatch, request):
    code, setup = prepared(block)
    monkeypatch.chdir(tmp_path)
    pipes = {"toy-sd": "toy_sd", "toy-flux": "toy_flux"}
    namespace: dict = {}
    check = SETUPS[setup](namespace, lambda name: request.getfixturevalue(pipes[name])) if setup else check_images
    exec(compile("\n" * block.line + code, "README.md", "exec"), namespace)  # tracebacks give README line numbers
    check(namespace)
