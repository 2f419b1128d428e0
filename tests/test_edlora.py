"""ED-LoRA concept files (minigen.loading.edlora, scripts/convert_edlora.py) on tiny random models.

The ED-LoRA is random and in the official layout, `torch.save({'params': {...}})`, built from the
tiny models' own names as Mix-of-Show's trainer would save it: LoRA factors (rank 2) on every
attn1/attn2 to_q/to_k/to_v/to_out.0, proj_in/proj_out and ff of a diffusers UNet (1x1 conv factors
where diffusers has a conv), on q/k/v/out_proj of every CLIP layer, and two concept words with one
embedding row per cross-attention layer (L = 11 on the tiny SD1.5-like UNet).

References and tolerances, fp32:
- UNet: minigen's UNet with `edlora_low_rank` applied as residuals (Controls) against minigen's twin of
  a diffusers UNet whose weights were merged by hand, by diffusers key name, W + 0.7 · up @ down:
  <= 1e-5 (outputs have std ≈ 1 and move by ≈ 2 with the LoRA; measured difference ≈ 5e-6).
- Text: Mix-of-Show's encoding written out on a deep copy: weights merged by hand, a HF CLIPTokenizer
  with the new tokens added (`add_tokens`), `resize_token_embeddings` and the rows written, L prompt
  copies that differ only in the new token, `last_hidden_state`: <= 1e-5 (outputs have std ≈ 1;
  measured ≈ 1.5e-6).
- Files: exact (torch.equal) after every round trip.
"""

import copy
import importlib.util
import re
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minigen.controls import Controls
from minigen.loading.detect import CheckpointError
from minigen.loading.edlora import (
    EDLoRA,
    Factors,
    edlora_low_rank,
    layerwise_prompt_embeddings,
    read_edlora,
    save_edlora,
)
from minigen.text.tokenizer import load_clip_tokenizer, tokenize

from conftest import REPO, tiny_clip, tiny_diffusers_unet, unet_twin

pytest.importorskip("diffusers")

RANK, ALPHA = 2, 0.7
WORDS = ("<chow_dog_2>", "<chow_dog_1>")  # not in sorted order: safetensors stores keys sorted, the order must survive
PROMPT = "a photo of <chow_dog_2> <chow_dog_1> on the beach"
UNET_LAYERS = re.compile(  # Mix-of-Show's where=Transformer2DModel: attention, feed-forward, proj_in/out
    r"attentions\.\d+\.(transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))|proj_in|proj_out)$"
)


# --- the tiny models and a random official ED-LoRA ---------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_unet():
    return tiny_diffusers_unet("sd15-like")


@pytest.fixture(scope="module")
def unet(diffusers_unet):
    return unet_twin(diffusers_unet)


@pytest.fixture
def text_encoder():
    torch.manual_seed(3)
    return tiny_clip()  # 32 wide, 2 layers, the real vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()  # OpenAI's BPE, bundled with open_clip


def official_params(diffusers_unet, text_encoder, layers: int = 11, seed: int = 0) -> dict:
    """The `params` dict of an official ED-LoRA file for these models, all factors random."""
    g = torch.Generator().manual_seed(seed)
    unet = {}
    for path, module in diffusers_unet.named_modules():
        if UNET_LAYERS.search(path) and isinstance(module, (nn.Linear, nn.Conv2d)):
            out_features, in_features, *kernel = module.weight.shape
            unet[f"{path}.lora_down.weight"] = torch.randn(RANK, in_features, *kernel, generator=g) * 0.2
            unet[f"{path}.lora_up.weight"] = torch.randn(out_features, RANK, *kernel, generator=g) * 0.2
    hidden = text_encoder.config.hidden_size
    text = {}
    for i in range(text_encoder.config.num_hidden_layers):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            path = f"text_model.encoder.layers.{i}.self_attn.{projection}"
            text[f"{path}.lora_down.weight"] = torch.randn(RANK, hidden, generator=g) * 0.3
            text[f"{path}.lora_up.weight"] = torch.randn(hidden, RANK, generator=g) * 0.3
    embeddings = {word: torch.randn(layers, hidden, generator=g) for word in WORDS}
    return {"new_concept_embedding": embeddings, "text_encoder": text, "unet": unet}


@pytest.fixture
def params(diffusers_unet, text_encoder):
    return official_params(diffusers_unet, text_encoder)


@pytest.fixture
def pth(params, tmp_path):
    path = tmp_path / "chow_dog.pth"
    torch.save({"params": params}, path)
    return path


def saved(params, tmp_path, name="edited.pth"):
    """`params` written as an official file, for a test that edits them first."""
    torch.save({"params": params}, tmp_path / name)
    return tmp_path / name


def assert_same(a: EDLoRA, b: EDLoRA):
    assert a.words == b.words and a.base == b.base
    for first, second in ((a.embeddings, b.embeddings), (a.embeddings_2, b.embeddings_2)):
        assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)
    for first, second in ((a.unet, b.unet), (a.text, b.text), (a.text_2, b.text_2)):
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k].down, second[k].down) and torch.equal(first[k].up, second[k].up) for k in first)


# --- (a), (b) reading and writing --------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", [True, False])
def test_pth_needs_the_opt_in_and_then_reads_the_official_layout(params, tmp_path, wrapped):
    path = tmp_path / "concept.pth"
    torch.save({"params": params} if wrapped else params, path)
    with pytest.raises(PermissionError, match=r"allow_pickle=True.*scripts/convert_edlora\.py"):
        read_edlora(path)
    edlora = read_edlora(path, allow_pickle=True)
    assert edlora.words == list(WORDS) and edlora.layers == 11
    assert torch.equal(edlora.embeddings[WORDS[1]], params["new_concept_embedding"][WORDS[1]])
    layer = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"
    assert torch.equal(edlora.unet[layer].down, params["unet"][f"{layer}.lora_down.weight"])
    assert torch.equal(edlora.unet[layer].up, params["unet"][f"{layer}.lora_up.weight"])
    assert 2 * len(edlora.unet) == len(params["unet"]) and 2 * len(edlora.text) == len(params["text_encoder"]) == 16
    assert edlora.embeddings_2 == {} and edlora.text_2 == {} and edlora.base is None  # 32-wide context: no known family


def test_pth_to_safetensors_and_back_round_trips_exactly(pth, tmp_path):
    official = read_edlora(pth, allow_pickle=True)
    official.base = "sd1"
    save_edlora(official, tmp_path / "concept.safetensors", metadata={"source": "chow_dog.pth"})
    converted = read_edlora(tmp_path / "concept.safetensors")
    assert_same(converted, official)

    save_edlora(converted, tmp_path / "back.pth")
    raw = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(raw) == ["params"] and set(raw["params"]) == {"new_concept_embedding", "text_encoder", "unet"}
    assert list(raw["params"]["new_concept_embedding"]) == list(WORDS)
    back = read_edlora(tmp_path / "back.pth", allow_pickle=True)
    back.base = "sd1"
    assert_same(back, official)


def test_sdxl_layout_round_trips(params, tmp_path):
    """SDXL files add new_concept_embedding_2 (70 rows, 1280 wide) and text_encoder_2; shapes are not checked
    against a model here, so small stand-ins do."""
    g = torch.Generator().manual_seed(5)
    params = dict(params)
    params["new_concept_embedding_2"] = {word: torch.randn(11, 48, generator=g) for word in WORDS}
    params["text_encoder_2"] = {
        "text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": torch.randn(RANK, 48, generator=g),
        "text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight": torch.randn(48, RANK, generator=g),
    }
    torch.save({"params": params}, tmp_path / "xl.pth")
    edlora = read_edlora(tmp_path / "xl.pth", allow_pickle=True)
    assert edlora.base == "sdxl" and list(edlora.embeddings_2) == list(WORDS) and len(edlora.text_2) == 1
    save_edlora(edlora, tmp_path / "xl.safetensors")
    assert_same(read_edlora(tmp_path / "xl.safetensors"), edlora)
    save_edlora(edlora, tmp_path / "xl_back.pth")
    assert_same(read_edlora(tmp_path / "xl_back.pth", allow_pickle=True), edlora)


def load_convert_script():
    spec = importlib.util.spec_from_file_location("convert_edlora", REPO / "scripts" / "convert_edlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_script_round_trips(pth, tmp_path, capsys):
    script = load_convert_script()
    out, back = tmp_path / "out.safetensors", tmp_path / "back.pth"
    assert script.run([str(pth), str(out), "--base", "sd1"]) == 0
    assert "2 concept words (<chow_dog_2>, <chow_dog_1>) of 11 layer-wise embeddings" in capsys.readouterr().out
    converted = read_edlora(out)
    assert converted.base == "sd1"
    assert script.run([str(out), str(back)]) == 0
    assert_same(read_edlora(back, allow_pickle=True), read_edlora(pth, allow_pickle=True))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{pth}", "{tmp}/out.pth"], "convert a .pth to a .safetensors"),
        (["{tmp}/missing.pth", "{tmp}/out.safetensors"], "not found"),
        (["{pth}", "{tmp}/exists.safetensors"], "exists; choose another output path or allow overwriting (--overwrite)"),
        (["{tmp}/out.safetensors", "{tmp}/back.pth", "--base", "sd1"], "a .pth has no place for it: drop --base"),
     ],
    ids=["wrong-direction", "missing-source", "existing-target", "base-for-pth"],
)
def test_convert_script_errors_are_one_line_with_exit_code_2(pth, tmp_path, capsys, arguments, message):
    (tmp_path / "exists.safetensors").write_bytes(b"")
    script = load_convert_script()
    assert script.run([str(pth), str(tmp_path / "out.safetensors")]) == 0
    capsys.readouterr()
    assert script.run([a.format(pth=pth, tmp=tmp_path) for a in arguments]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_convert_script_never_passes_on_torchs_advice_to_unpickle_unsafely(tmp_path, capsys):
    """A PNG renamed .pth, or a .pth of Python objects: torch's error advises weights_only=False, which runs the
    file's code; the message says what is wrong with the file instead, and nothing is written."""
    import argparse

    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "image.png")
    (tmp_path / "image.pth").write_bytes((tmp_path / "image.png").read_bytes())
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "objects.pth")
    script = load_convert_script()
    for name, message in [("image", "image.pth is not a readable PyTorch file: it may be cut short or not a checkpoint torch can read safely"),
                          ("objects", "objects.pth holds Python objects other than tensors and containers")]:  # fmt: skip
        assert script.run([str(tmp_path / f"{name}.pth"), str(tmp_path / f"{name}.safetensors")]) == 2
        err = capsys.readouterr().err
        assert message in err and "weights_only=False" not in err and "weights_only` set to `False" not in err, err
        assert not (tmp_path / f"{name}.safetensors").exists()


def test_convert_script_refuses_a_base_the_shapes_contradict(params, tmp_path, capsys):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight"
    params["unet"][key] = torch.randn(RANK, 768)  # a cross-attention reading CLIP-L's 768-wide features: SD1.x
    assert load_convert_script().run([str(saved(params, tmp_path)), str(tmp_path / "out.safetensors"), "--base", "sdxl"]) == 2
    assert "--base sdxl, but this ED-LoRA looks made for SD1.x (its cross-attention reads 768-wide" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()



@pytest.mark.parametrize(
    "embedding_width, base, message",
    [
        (32, "sdxl", "--base sdxl, but this ED-LoRA has no weights for SDXL's second text encoder"),  # shapes that tell nothing else
        (1024, "sd1", "--base sd1, but this ED-LoRA looks made for SD2.x (its concept embeddings are 1024 wide"),
    ],
    ids=["no-second-encoder", "sd2-embeddings"],
)
def test_convert_script_refuses_a_base_the_shapes_contradict_where_the_factors_do_not_tell(params, tmp_path, capsys, embedding_width, base, message):
    """Where the cross-attention factors did not show the family, --base was recorded unchecked: sdxl for a file
    without weights for a second text encoder, sd1 for concept embeddings of SD2's 1024-wide encoder."""
    params["new_concept_embedding"] = {word: torch.randn(11, embedding_width) for word in WORDS}
    assert load_convert_script().run([str(saved(params, tmp_path)), str(tmp_path / "out.safetensors"), "--base", base]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_converting_to_pth_names_what_the_pth_leaves_out(params, tmp_path, capsys):
    """A .pth has no metadata: the base a .safetensors records (where its shapes do not show it) and a
    training's metadata were lost without a word."""
    edlora = read_edlora(saved(params, tmp_path), allow_pickle=True)
    source = save_edlora(replace(edlora, base="sd1"), tmp_path / "trained.safetensors", metadata={"prompt": "a photo of a dog"})
    script = load_convert_script()
    assert script.run([str(source), str(tmp_path / "back.pth")]) == 0
    err = capsys.readouterr().err
    assert "leaves out the base sd1 (its shapes do not show it: give --base sd1 to convert it back) and the metadata prompt" in err
    assert read_edlora(tmp_path / "back.pth", allow_pickle=True).base is None  # what the note says
    save_edlora(edlora, tmp_path / "plain.safetensors")  # no base, no metadata of its own: nothing is lost, nothing said
    assert script.run([str(tmp_path / "plain.safetensors"), str(tmp_path / "plain.pth")]) == 0
    assert "leaves out" not in capsys.readouterr().err


# --- (c) the UNet LoRA ---------------------------------------------------------------------------------


def merged_by_hand(diffusers_unet, unet_params: dict, alpha: float):
    """A copy of the diffusers UNet with W + alpha · up @ down added by diffusers key name."""
    merged = copy.deepcopy(diffusers_unet)
    weights = merged.state_dict()  # shares storage with the parameters
    with torch.no_grad():
        for key, down in unet_params.items():
            if key.endswith(".lora_down.weight"):
                up = unet_params[key.replace("lora_down", "lora_up")]
                weight = weights[key.replace(".lora_down.weight", ".weight")]
                weight += alpha * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return merged


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 32, generator=g)


def test_unet_low_rank_equals_the_official_merge(diffusers_unet, unet, params, pth):
    edlora = read_edlora(pth, allow_pickle=True)
    deltas = edlora_low_rank(edlora, unet)
    assert len(deltas) == len(edlora.unet) and {d.scale for d in deltas} == {ALPHA}
    with torch.no_grad():
        plain = unet(*unet_inputs())
        residual = unet(*unet_inputs(), controls=Controls(low_rank=deltas))
        merged = unet_twin(merged_by_hand(diffusers_unet, params["unet"], ALPHA))(*unet_inputs())
        first_row_only = edlora_low_rank(edlora, unet, rows=torch.tensor([1.0, 0.0]))
        by_row = unet(*unet_inputs(), controls=Controls(low_rank=first_row_only))
    assert (residual - plain).abs().max() > 0.05, "the LoRA should visibly change the output"
    assert (residual - merged).abs().max() <= 1e-5
    assert (by_row[0] - merged[0]).abs().max() <= 1e-5 and torch.equal(by_row[1], plain[1])  # rows: [1, 0]


def test_factors_take_the_layers_dtype(unet, pth):
    edlora = read_edlora(pth, allow_pickle=True)
    half = EDLoRA(edlora.embeddings, {k: Factors(f.down.half(), f.up.half()) for k, f in edlora.unet.items()}, edlora.text)
    assert {(d.down.dtype, d.up.dtype) for d in edlora_low_rank(half, unet)} == {(torch.float32, torch.float32)}


# --- (d) layer-wise prompt encoding ----------------------------------------------------------------------


def mix_of_show_encoding(text_encoder, tokenizer, prompt: str, all_params: list[dict], alpha: float):
    """Mix-of-Show's layer-wise encoding written out on copies: merge, add tokens, bind the prompt, encode."""
    encoder, tok = copy.deepcopy(text_encoder), copy.deepcopy(tokenizer)
    text_tower = getattr(encoder, "text_model", encoder)  # transformers >= 5.6 has no .text_model level
    names = {}
    with torch.no_grad():
        for params in all_params:
            for key, down in params["text_encoder"].items():
                if key.endswith(".lora_down.weight"):
                    up = params["text_encoder"][key.replace("lora_down", "lora_up")]
                    path = key.removesuffix(".lora_down.weight").removeprefix("text_model.")
                    text_tower.get_submodule(path).weight += alpha * up @ down
            for word, rows in params["new_concept_embedding"].items():
                layers = rows.shape[0]
                names[word] = [f"<new{len(names) * layers + layer}>" for layer in range(layers)]
                assert tok.add_tokens(names[word]) == layers
                encoder.resize_token_embeddings(len(tok), mean_resizing=False)  # the rows are written next
                encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids(names[word])] = rows
        prompts = [prompt] * layers
        for word, new_tokens in names.items():
            prompts = [p.replace(word, new) for p, new in zip(prompts, new_tokens)]  # copy ℓ: the ℓ-th token
        return encoder(tokenize(tok, prompts)).last_hidden_state


@pytest.mark.parametrize(
    "prompt, too_long",
    [
        (PROMPT, False),
        ("A photo of<chow_dog_2>'s toy,<chow_dog_1>dog", False),  # HF splits the text at added tokens: "of" "<w>" "'s"
        ("a dog " * 34 + PROMPT, True),  # 76 tokens: the last one ("beach") is dropped, with a warning
    ],
    ids=["plain", "words-glued-to-text", "truncated"],
)
def test_layerwise_embeddings_equal_mix_of_show(text_encoder, tokenizer, params, pth, prompt, too_long):
    edlora = read_edlora(pth, allow_pickle=True)
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    table, vocabulary = text_encoder.get_input_embeddings(), len(tokenizer)

    with pytest.warns(UserWarning, match="dropped the last 1 tokens") if too_long else nullcontext():
        contexts = layerwise_prompt_embeddings(text_encoder, tokenizer, prompt, edlora)
    with pytest.warns(UserWarning, match="dropped the last 1 tokens") if too_long else nullcontext():
        reference = mix_of_show_encoding(text_encoder, tokenizer, prompt, [params], ALPHA)

    assert contexts.shape == (11, 77, 32)
    assert (contexts - reference).abs().max() <= 1e-5
    assert (contexts[0] - contexts[5]).abs().max() > 1e-2, "each layer's copy reads its own embedding row"
    state = text_encoder.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)  # bit for bit
    assert text_encoder.get_input_embeddings() is table and len(tokenizer) == vocabulary


def test_a_concept_word_cut_away_by_truncation_is_refused(text_encoder, tokenizer, pth):
    """Pushed past the 75 tokens the encoder reads, the concept word was dropped with the generic
    truncation warning: the path then drew without its concept. Refused as a missing word is."""
    edlora = read_edlora(pth, allow_pickle=True)
    with pytest.raises(ValueError, match=r"a concept word \(.*\) lies past the 75 the text encoder reads"):
        layerwise_prompt_embeddings(text_encoder, tokenizer, "a dog " * 38 + PROMPT, edlora)


def test_an_edlora_without_a_unet_lora_warns(unet, pth):
    """A file of embeddings only gave no LowRank without a word: the concept's path was the base UNet."""
    from dataclasses import replace

    with pytest.warns(UserWarning, match="holds no UNet LoRA"):
        assert edlora_low_rank(replace(read_edlora(pth, allow_pickle=True), unet={}), unet) == []


def test_empty_prompt_is_the_official_uncond(text_encoder, tokenizer, params, pth):
    edlora = read_edlora(pth, allow_pickle=True)
    uncond = layerwise_prompt_embeddings(text_encoder, tokenizer, "", edlora)
    reference = mix_of_show_encoding(text_encoder, tokenizer, "", [params], ALPHA)
    assert uncond.shape == (11, 77, 32) and (uncond - reference).abs().max() <= 1e-5
    assert (uncond - uncond[0]).abs().max() <= 1e-6  # the same for every layer
    with torch.no_grad():
        unmerged = text_encoder(tokenize(tokenizer, "")).last_hidden_state
    assert (uncond[0] - unmerged[0]).abs().max() > 1e-2, "the uncond goes through the LoRA-merged encoder"


def test_two_edloras_in_one_prompt(diffusers_unet, text_encoder, tokenizer, params, tmp_path):
    other = official_params(diffusers_unet, text_encoder, seed=1)
    other["new_concept_embedding"] = {"<cat>": other["new_concept_embedding"][WORDS[0]]}
    torch.save(params, tmp_path / "dog.pth")
    torch.save(other, tmp_path / "cat.pth")
    edloras = [read_edlora(tmp_path / name, allow_pickle=True) for name in ("dog.pth", "cat.pth")]
    prompt = "<chow_dog_2> <chow_dog_1> and a <cat>"
    contexts = layerwise_prompt_embeddings(text_encoder, tokenizer, prompt, edloras)
    reference = mix_of_show_encoding(text_encoder, tokenizer, prompt, [params, other], ALPHA)
    assert (contexts - reference).abs().max() <= 1e-5


def test_weights_are_restored_when_the_encoder_fails(text_encoder, tokenizer, pth):
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    table = text_encoder.get_input_embeddings()

    def fail(module, inputs, output):
        raise RuntimeError("out of memory")

    handle = getattr(text_encoder, "text_model", text_encoder).final_layer_norm.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            layerwise_prompt_embeddings(text_encoder, tokenizer, PROMPT, read_edlora(pth, allow_pickle=True))
    finally:
        handle.remove()
    state = text_encoder.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before) and text_encoder.get_input_embeddings() is table


# --- (e) errors --------------------------------------------------------------------------------------------


def test_an_edlora_for_another_base_model_is_refused(unet, params, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_down.weight"
    params["unet"][key] = torch.randn(RANK, 768)  # an SD1.x cross-attention reads 768-wide CLIP-L features
    with pytest.raises(CheckpointError, match=r"made for SD1\.x.*768-wide.*context_dim is 32"):
        edlora_low_rank(read_edlora(saved(params, tmp_path), allow_pickle=True), unet)


def test_another_number_of_layers_is_refused(unet, params, tmp_path):
    params["new_concept_embedding"] = {word: torch.randn(70, 32) for word in WORDS}  # SDXL's 70
    with pytest.raises(CheckpointError, match="70 embeddings per word.*this UNet has 11 cross-attention layers"):
        edlora_low_rank(read_edlora(saved(params, tmp_path), allow_pickle=True), unet)


def test_a_factor_of_the_wrong_shape_is_named_by_its_layer(unet, params, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight"
    params["unet"][key] = torch.randn(RANK, 31)  # the layer reads 32 features
    with pytest.raises(CheckpointError, match=r"1 have the wrong shape \(e\.g\. \['down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q: down \[\d+, 31\]"):
        edlora_low_rank(read_edlora(saved(params, tmp_path), allow_pickle=True), unet)


def test_a_layer_the_unet_lacks_is_named(unet, params, tmp_path):
    params["unet"]["down_blocks.5.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight"] = torch.randn(RANK, 32)
    params["unet"]["down_blocks.5.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight"] = torch.randn(32, RANK)
    with pytest.raises(CheckpointError, match=r"1 name no layer of it \(e\.g\. \['down_blocks\.5"):
        edlora_low_rank(read_edlora(saved(params, tmp_path), allow_pickle=True), unet)


def test_embeddings_of_another_width_than_the_text_encoder_are_refused(tokenizer, pth):
    wide_encoder = tiny_clip(hidden=64)
    with pytest.raises(CheckpointError, match="embeddings are 32 wide.*tokens are 64 wide"):
        layerwise_prompt_embeddings(wide_encoder, tokenizer, PROMPT, read_edlora(pth, allow_pickle=True))


def test_a_concept_word_missing_from_the_prompt_is_named(text_encoder, tokenizer, pth):
    prompt = "a photo of <chow_dog_2> on the beach"
    with pytest.raises(ValueError, match=re.escape(f"['<chow_dog_1>'] do not occur in the prompt {prompt!r}")):
        layerwise_prompt_embeddings(text_encoder, tokenizer, prompt, read_edlora(pth, allow_pickle=True))


def test_non_finite_tensors_are_refused(params, pth, tmp_path):
    edlora = read_edlora(pth, allow_pickle=True)
    params["new_concept_embedding"][WORDS[0]][3, 1] = float("nan")
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN or infinite .*new_concept_embedding\.<chow_dog_2>"):
        read_edlora(saved(params, tmp_path), allow_pickle=True)
    edlora.embeddings[WORDS[1]] = edlora.embeddings[WORDS[1]] / 0.0  # saving refuses what reading would
    with pytest.raises(CheckpointError, match=r"NaN or infinite .*new_concept_embedding\.<chow_dog_1>"):
        save_edlora(edlora, tmp_path / "concept.safetensors")
    assert not (tmp_path / "concept.safetensors").exists()


def test_half_a_factor_pair_and_uneven_embeddings_are_refused(params, tmp_path):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    up = params["unet"].pop(f"{layer}.lora_up.weight")
    with pytest.raises(CheckpointError, match=rf"only one of their two LoRA factors, e\.g\. \['{re.escape(layer)} \(no lora_up"):
        read_edlora(saved(params, tmp_path), allow_pickle=True)
    params["unet"][f"{layer}.lora_up.weight"] = up
    params["new_concept_embedding"][WORDS[1]] = torch.randn(10, 32)
    with pytest.raises(CheckpointError, match=r"one \[L, C\] tensor per word.*\[11, 32\].*\[10, 32\]"):
        read_edlora(saved(params, tmp_path), allow_pickle=True)


def test_a_pth_without_sound_embeddings_is_refused_by_name(params, tmp_path):
    """A .pth's base was guessed from its embeddings before they were checked: no embeddings ended in a
    StopIteration traceback, a 1-D one in an IndexError."""
    params["new_concept_embedding"] = {}
    with pytest.raises(CheckpointError, match="is empty: without concept words this is a plain LoRA"):
        read_edlora(saved(params, tmp_path), allow_pickle=True)
    params["new_concept_embedding"] = {WORDS[0]: torch.randn(32)}
    with pytest.raises(CheckpointError, match=r"one \[L, C\] tensor per word"):
        read_edlora(saved(params, tmp_path, "one-d.pth"), allow_pickle=True)


def test_a_plain_lora_file_is_not_an_edlora(tmp_path):
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not an ED-LoRA in minigen's form.*read_lora"):
        read_edlora(tmp_path / "lora.safetensors")


def test_saving_refuses_to_overwrite_unless_asked(pth, tmp_path):
    edlora = read_edlora(pth, allow_pickle=True)
    path = save_edlora(edlora, tmp_path / "concept.safetensors")
    with pytest.raises(FileExistsError, match="exists"):
        save_edlora(edlora, path)
    edlora.embeddings = {word: rows + 1 for word, rows in edlora.embeddings.items()}
    save_edlora(edlora, path, overwrite=True)
    assert torch.equal(read_edlora(path).embeddings[WORDS[0]], edlora.embeddings[WORDS[0]])
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []  # no temporary file is left behind
