"""Text side of FLUX: T5 tokenizer and encoder, ``encode_flux``, T5 token spans, file coverage."""

import json
import shutil
import warnings

import pytest
import torch

from minigen.loading.detect import CheckpointError
from minigen.text.encoders import TextEncoderConfig, build_text_encoder
from minigen.text.spans import token_span
from minigen.text.t5 import (
    MAX_LENGTH_DEV,
    PRESETS,
    TIED_KEY,
    build_t5_encoder,
    encode_flux,
    load_t5_tokenizer,
    t5_config_from_diffusers,
)
from minigen.text.tokenizer import load_clip_tokenizer, tokenize

from conftest import TINY_T5, meta_tensors

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
TINY_CLIP_L = TextEncoderConfig(
    hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4, hidden_act="quick_gelu"
)
CAT_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]  # "a photo of a cat": ▁ a ▁photo ▁of ▁ a ▁cat </s>


@pytest.fixture
def t5_tokenizer(shared_hf):
    return load_t5_tokenizer(shared_hf / FLUX_DEV / "tokenizer_2")


# ---------------------------------------------------------------- tokenizer


def test_t5_tokenizer_ids_from_tokenizer_json_and_spiece_model(shared_hf, t5_tokenizer, tmp_path):
    """FLUX's tokenizer.json and sentencepiece's spiece.model (SD3's copy) give the same ids."""
    shutil.copy(shared_hf / SD3 / "tokenizer_3" / "spiece.model", tmp_path)
    from_spiece = load_t5_tokenizer(tmp_path)
    for tok in (t5_tokenizer, from_spiece):
        ids = tokenize(tok, "a photo of a cat", MAX_LENGTH_DEV)
        assert ids.shape == (1, 512)
        assert ids[0, :8].tolist() == CAT_IDS and (ids[0, 8:] == 0).all()  # no BOS, </s>, then <pad> = 0
        assert tok.model_max_length == 512
    prompts = ["A statue reads the book", "  Héllo, wörld!! café naïve 🐈 12 ﬁ", "tab\tand\nline", "x <extra_id_0>y"]
    assert from_spiece(prompts).input_ids == t5_tokenizer(prompts).input_ids
    assert tokenize(from_spiece, prompts, 256).equal(tokenize(t5_tokenizer, prompts, 256))


def test_long_t5_prompt_is_truncated_with_a_warning(t5_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(t5_tokenizer, "cat " * 255, max_length=256)  # 255 pieces + </s>: fits
    assert ids[0, 254].item() == 1712 and ids[0, 255].item() == 1
    with pytest.warns(UserWarning, match=r"dropped the last 2 tokens \('dog dog'\)"):
        ids = tokenize(t5_tokenizer, "cat " * 255 + "dog dog", max_length=256)
    assert ids[0, 254].item() == 1712 and ids[0, 255].item() == 1  # </s> kept at the end


def test_missing_tokenizer_files_name_the_fix(shared_hf, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no T5 tokenizer: looked for tokenizer.json .* and spiece.model"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2/ folder of a FLUX diffusers folder"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Pass its T5 tokenizer folder: \S*FLUX.1-dev/tokenizer_2\."):
        load_t5_tokenizer(shared_hf / FLUX_DEV)  # the model folder, not its tokenizer folder


# ---------------------------------------------------------------- token spans


def test_token_span_on_t5(t5_tokenizer):
    prompt = "A statue is reading the book in the library"
    assert token_span(t5_tokenizer, prompt, "book") == [5]  # Conceptrol's locate_subject: (5, 6), no BOS offset
    assert token_span(t5_tokenizer, prompt, "A statue") == [0, 1]  # the first piece sits at 0
    assert token_span(t5_tokenizer, prompt, "the", occurrence=1) == [7]
    assert token_span(t5_tokenizer, "a photo of a cat", "a", occurrence=1) == [4, 5]  # "a" is ▁ + a
    assert token_span(t5_tokenizer, "the book, the book's cover", "book", occurrence=1) == [4]  # punctuation ends words
    with pytest.raises(ValueError, match=r"Phrase 'dog' is not in prompt 'A statue .*'.*whole words"):
        token_span(t5_tokenizer, prompt, "dog")
    with pytest.raises(ValueError, match=r"Phrase 'Book' is not in prompt"):
        token_span(t5_tokenizer, prompt, "Book")  # T5 keeps case
    with pytest.raises(ValueError, match=r"Phrase 'books' is not in prompt 'a bookshelf'"):
        token_span(t5_tokenizer, "a bookshelf", "books")  # ▁books h elf: the word goes on
    with pytest.raises(ValueError, match=r"Phrase 'statue' is not in prompt 'a statuette'"):
        token_span(t5_tokenizer, "a statuette", "statue")


def test_token_span_t5_window_follows_max_length(t5_tokenizer):
    prompt = "cat " * 254 + "red dog"  # red at 254, dog at 255
    assert token_span(t5_tokenizer, prompt, "red", max_length=256) == [254]
    assert token_span(t5_tokenizer, prompt, "dog") == [255]  # dev: 512 tokens
    with pytest.raises(ValueError, match=r"positions 255\.\.255 .*reads only positions 0\.\.254"):
        token_span(t5_tokenizer, prompt, "dog", max_length=256)  # schnell: 256 tokens


# ---------------------------------------------------------------- encoding


def test_token_span_defaults_to_what_the_loaded_pipeline_reads(toy_flux):
    """The T5 tokenizer kept 512 positions whatever the model read (toy-flux 48, schnell 256): a phrase
    truncated away got a span past the text, and a control there read image keys without a word."""
    assert toy_flux.t5_tokenizer.model_max_length == toy_flux.max_length == 48
    prompt = "a red star on grass " * 9 + "and a blue heart"
    with pytest.raises(ValueError, match="the text encoder reads only positions 0..46; the rest is truncated"):
        token_span(toy_flux.t5_tokenizer, prompt, "heart")


@pytest.mark.parametrize("max_length", [512, 256])
def test_encode_flux_matches_diffusers(shared_hf, t5_tokenizer, max_length):
    """Reference: diffusers FluxPipeline.encode_prompt with the same tiny random CLIP-L and T5 and the
    official FLUX.1-dev tokenizers, fp32. Tolerance 1e-5 (measured: 0, bit-identical);
    txt std ~1.0 (T5 ends in an RMS norm), pooled std ~1.0."""
    from diffusers import FluxPipeline

    clip_tokenizer = load_clip_tokenizer(shared_hf / FLUX_DEV / "tokenizer")
    clip, t5 = build_text_encoder(TINY_CLIP_L), build_t5_encoder(TINY_T5)
    pipe = FluxPipeline(
        scheduler=None, vae=None, text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=None,
    )
    prompts = ["a photo of a Cat, sitting", "an astronaut riding a horse on mars, detailed photograph"]
    with torch.no_grad():
        reference, reference_pooled, _ = pipe.encode_prompt(
            prompts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=max_length
        )
        txt, pooled = encode_flux(t5, t5_tokenizer, clip, clip_tokenizer, prompts, max_length=max_length)
    assert txt.shape == (2, max_length, 32) and pooled.shape == (2, 32)
    assert (txt - reference).abs().max() <= 1e-5
    assert (pooled - reference_pooled).abs().max() <= 1e-5
    assert txt.std() > 0.5 and pooled.std() > 0.5
    assert not torch.allclose(txt[:, -1], txt[:, -2])  # padding is attended: each pad position differs


# ---------------------------------------------------------------- configs and file coverage


def test_official_t5_file_loads_completely(manifest):
    """diffusers_flux1_text_encoder_2.json (219 tensors, no encoder.embed_tokens) onto the t5-xxl
    preset: the same key set with equal shapes, and the embedding tied afterwards."""
    state_dict = meta_tensors(manifest("diffusers_flux1_text_encoder_2.json"))
    assert len(state_dict) == 219 and TIED_KEY not in state_dict
    with torch.device("meta"):
        fresh = build_t5_encoder(PRESETS["t5-xxl"])
    expected = {key: tuple(t.shape) for key, t in fresh.state_dict().items() if key != TIED_KEY}
    assert {key: tuple(t.shape) for key, t in state_dict.items()} == expected
    model = build_t5_encoder(PRESETS["t5-xxl"], state_dict)  # strict=True inside
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.shared.weight.dtype == torch.bfloat16 and model.shared.weight.shape == (32128, 4096)
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656  # the manifest's num_elements


def test_t5_config_from_official_configs(shared_hf):
    for folder in (FLUX_DEV, FLUX_SCHNELL):
        config = json.loads((shared_hf / folder / "text_encoder_2" / "config.json").read_text())
        assert t5_config_from_diffusers(config) == PRESETS["t5-xxl"]
    sd3 = json.loads((shared_hf / SD3 / "text_encoder_3" / "config.json").read_text())  # says "gated-gelu"
    assert t5_config_from_diffusers(sd3).activation == "gelu_new"
    with pytest.raises(ValueError, match=r"plain \(not gated\) MLP.*is_gated_act=true"):
        t5_config_from_diffusers({**config, "feed_forward_proj": "relu", "is_gated_act": False, "dense_act_fn": "relu"})


def test_t5_file_layouts_load_with_or_without_embed_tokens_and_from_full_t5():
    """Reference: transformers T5ForConditionalGeneration's encoder; every layout gives identical output."""
    from transformers import T5ForConditionalGeneration

    config = TINY_T5
    full = T5ForConditionalGeneration(config.to_transformers()).eval()
    full_sd = full.state_dict()
    assert any(k.startswith("decoder.") for k in full_sd) and "lm_head.weight" in full_sd
    encoder_sd = {k: v for k, v in full_sd.items() if k == "shared.weight" or k.startswith("encoder.")}
    ids = torch.tensor([CAT_IDS + [0] * 8])
    with torch.no_grad():
        reference = full.encoder(ids).last_hidden_state
        for state_dict in (encoder_sd, {k: v for k, v in encoder_sd.items() if k != TIED_KEY}, full_sd):
            model = build_t5_encoder(config, state_dict)
            assert model.shared.weight.data_ptr() == full_sd["shared.weight"].data_ptr()  # tensors taken as they are
            assert model.encoder.embed_tokens.weight is model.shared.weight
            assert torch.equal(model(ids).last_hidden_state, reference)
    with pytest.raises(CheckpointError, match=r"1 missing keys(.|\n)*encoder.final_layer_norm.weight"):
        build_t5_encoder(config, {k: v for k, v in encoder_sd.items() if k != "encoder.final_layer_norm.weight"})
