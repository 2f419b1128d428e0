"""Text side of SD1.x / SDXL: tokenizers, token spans, prompt encoding, text-encoder key maps."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from minigen.loading.keys import take_prefix
from minigen.loading.keymaps_text import (
    SD15_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    open_clip_from_transformers,
    open_clip_to_transformers,
    text_encoders_from_single_file,
)
from minigen.text.encoders import (
    PRESETS,
    REBUILT_KEYS,
    TextEncoderConfig,
    build_text_encoder,
    encode_sd1,
    encode_sdxl,
    sdxl_time_ids,
)
from minigen.text.spans import token_span, token_spans
from minigen.text.tokenizer import _bundled_bpe_path, load_clip_tokenizer, tokenize
from minigen.transformers_compat import file_layout, tower

from conftest import meta_tensors

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD15 = "runwayml/stable-diffusion-v1-5"
TINY_CLIP_L = TextEncoderConfig(
    hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4, hidden_act="quick_gelu"
)
TINY_BIGG = TextEncoderConfig(
    hidden_size=64, intermediate_size=80, num_layers=4, num_heads=4, hidden_act="gelu", projection_dim=48
)


@pytest.fixture
def tokenizers(shared_hf):
    return load_clip_tokenizer(shared_hf / SDXL / "tokenizer"), load_clip_tokenizer(shared_hf / SDXL / "tokenizer_2")


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("typed, cleaned", [
    ("a dog’s portrait, “cinematic” lighting", 'a dog\'s portrait, "cinematic" lighting'),  # ftfy's uncurl_quotes
    ("ＡＩ art, 4ｋ，　ＨＤ", "ai art, 4k, hd"),  # fix_character_width
    ("a ﬁeld of ﬂowers", "a field of flowers"),  # fix_latin_ligatures
    ("salt &amp; pepper &amp;lt;3", "salt & pepper <3"),  # html.unescape, twice, as open_clip
])  # fmt: skip
def test_prompts_are_cleaned_as_the_encoders_training_text_was(shared_hf, typed, cleaned):
    """OpenAI's and OpenCLIP's tokenizers run ftfy.fix_text and html.unescape before BPE; transformers 5's
    CLIPTokenizer does not, so "a dog’s" gave 13 tokens ("âĢ Ļ</w> s</w>") where CLIP was trained on "a dog's".
    Reference: the cleaned text (what ftfy and html make of it, per their documentation), tokenized as is;
    both the bundled vocabulary and a folder's tokenizer, offsets pointing into the typed text."""
    for tokenizer in (load_clip_tokenizer(), load_clip_tokenizer(shared_hf / SDXL / "tokenizer_2")):
        assert tokenizer(typed).input_ids == tokenizer(cleaned).input_ids
    offsets = load_clip_tokenizer()("a dog’s", return_offsets_mapping=True, add_special_tokens=False).offset_mapping
    assert "a dog’s"[offsets[-1][0] : offsets[-1][1]] == "’s"


def test_bundled_bpe_rebuilds_the_official_vocabulary(shared_hf):
    """The vocabulary rebuilt from open_clip's bpe_simple_vocab_16e6.txt.gz equals diffusers' vocab.json."""
    bundled = load_clip_tokenizer()
    folder = load_clip_tokenizer(shared_hf / SD15 / "tokenizer")
    assert bundled.get_vocab() == json.loads((shared_hf / SD15 / "tokenizer" / "vocab.json").read_text())
    prompt = "A photorealistic Cat, on the café's windowsill; 12345 naïve 🐈 <|endoftext|> end"
    assert bundled(prompt).input_ids == folder(prompt).input_ids
    assert len(bundled(prompt).input_ids) > 20


def test_padding_follows_each_folders_config(shared_hf, tokenizers):
    tok_1, tok_2 = tokenizers
    ids_1, ids_2 = tokenize(tok_1, "a cat"), tokenize(tok_2, "a cat")
    assert ids_1.shape == ids_2.shape == (1, 77)
    assert ids_1[0, :4].tolist() == ids_2[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert (ids_1[0, 4:] == 49407).all()  # CLIP-L pads with <|endoftext|>
    assert (ids_2[0, 4:] == 0).all()  # OpenCLIP pads with 0 = "!"
    assert (tokenize(load_clip_tokenizer(), "a cat")[0, 4:] == 49407).all()
    assert (tokenize(load_clip_tokenizer(pad_token="!"), "a cat")[0, 4:] == 0).all()


def test_long_prompt_is_truncated_with_a_warning(tokenizers):
    tok = tokenizers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(tok, " ".join(["cat"] * 75))  # exactly fits: no warning
    assert ids[0, 75] == 2368 and ids[0, 76] == 49407
    with pytest.warns(UserWarning, match=r"dropped the last 6 tokens \('dog dog dog dog dog dog'\)"):
        ids = tokenize(tok, " ".join(["cat"] * 75 + ["dog"] * 6))
    assert ids[0, 75] == 2368 and ids[0, 76] == 49407


def test_missing_tokenizer_files_name_the_fix(shared_hf, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Pass one of its tokenizer folders: .*/tokenizer, .*/tokenizer_2"):
        load_clip_tokenizer(shared_hf / SDXL)  # a model folder, not its tokenizer folder
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        _bundled_bpe_path("no_such_package_installed")


# ---------------------------------------------------------------- token spans


def test_token_span_positions(tokenizers):
    tok_1, tok_2 = tokenizers
    prompt = "a photorealistic Cat, on a mat next to a CAT"
    for tok in (tok_1, tok_2):  # both SDXL tokenizers give the same positions
        assert token_span(tok, prompt, "a") == [1]  # BOS is position 0
        assert token_span(tok, prompt, "photorealistic") == [2, 3]  # photo + realistic</w>
        assert token_span(tok, prompt, "cat") == [4]  # "Cat," matches: case and punctuation
        assert token_span(tok, prompt, "cat", occurrence=1) == [12]
        assert token_span(tok, prompt, "a", occurrence=2) == [11]
        assert token_span(tok, prompt, "on a mat") == [6, 7, 8]
    tokens = tok_1.convert_ids_to_tokens(tokenize(tok_1, prompt)[0, [2, 3, 4]].tolist())
    assert tokens == ["photo", "realistic</w>", "cat</w>"]


def test_token_span_matches_whole_words_only(tokenizers):
    tok = tokenizers[0]
    with pytest.raises(ValueError, match=r"Phrase 'realistic' is not in prompt 'a photorealistic cat'.*whole words"):
        token_span(tok, "a photorealistic cat", "realistic")  # the tail of "photorealistic"
    tok.add_tokens(["<sks>"])  # a textual-inversion placeholder starts and ends a word
    assert token_span(tok, "a <sks>dog", "dog") == [3]
    assert token_span(tok, "a <sks>dog", "<sks>") == [2]
    # CLIP gives every digit a word of its own: "3" stood in "1930", "k" in "4k" and "d" in "3d"
    assert token_spans(tok, "a photo from 1930 with 3 cats", "3") == [[9]]
    assert token_spans(tok, "a 4k photo of k", "k") == [[6]] and token_spans(tok, "a 3d model", "d") == []
    assert token_spans(tok, "rock &amp; roll", "& roll") == token_spans(tok, "rock & roll", "& roll") == [[2, 3]]  # the entity cleaned
    # and inside a phrase: "a 4k" stood in "a4k" (and "a4k" in "a 4k"), the same tokens glued otherwise; punctuation still free
    assert token_spans(tok, "on a4k", "a 4k") == token_spans(tok, "on a 4k", "a4k") == []
    assert token_spans(tok, "on a 4k", "a 4k") == [[2, 3, 4]] and token_spans(tok, "on a4k", "a4k") == [[2, 3, 4]]
    assert token_spans(tok, "a cat,dog", "cat, dog") == [[2, 3, 4]]


def test_an_unknown_t5_piece_continues_its_word_only_where_it_stands_for_a_letter(shared_hf):
    """FLUX.1's T5 has no piece for "狗", "~" or "{": each reads as <unk>. A letter continues the word, so "dog"
    is not in "dog狗"; punctuation ends it, so "dog" is in "dog~" and "dog{x}"."""
    from minigen.text.t5 import load_t5_tokenizer

    t5 = load_t5_tokenizer(shared_hf / "black-forest-labs/FLUX.1-dev/tokenizer_2")
    assert t5.convert_ids_to_tokens(t5("a dog狗 here").input_ids)[3] == t5.unk_token
    with pytest.raises(ValueError, match="Phrase 'dog' is not in prompt 'a dog狗 here'"):
        token_span(t5, "a dog狗 here", "dog")
    assert token_span(t5, "a dog~ here", "dog") == token_span(t5, "a dog{x}", "dog") == token_span(t5, "a dog here", "dog") == [2]


def test_token_span_errors(tokenizers):
    tok = tokenizers[0]
    with pytest.raises(ValueError, match=r"Phrase 'dog' is not in prompt 'a cat'"):
        token_span(tok, "a cat", "dog")
    with pytest.raises(ValueError, match=r"occurs 1 time\(s\).*occurrence=1"):
        token_span(tok, "a cat", "cat", occurrence=1)
    long_prompt = " ".join(["x"] * 74) + " red cat"  # red at 75, cat at 76
    assert token_span(tok, long_prompt, "red") == [75]
    with pytest.raises(ValueError, match=r"positions 76\.\.76 .*reads only positions 1\.\.75"):
        token_span(tok, long_prompt, "cat")


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_encode_sd1_matches_diffusers(tokenizers, clip_skip):
    """Reference: diffusers StableDiffusionPipeline.encode_prompt, same tiny random CLIP, fp32; with
    clip_skip, its formula (layer -(clip_skip + 1), then the final layer norm) written out here, since
    diffusers reaches for `text_encoder.text_model`, which transformers 5 no longer has.
    Tolerance 1e-5 (measured: 0, bit-identical); output std ~1.0."""
    from diffusers import StableDiffusionPipeline

    tok = tokenizers[0]
    text_encoder = build_text_encoder(TINY_CLIP_L)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tok, unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    prompts = ["a photo of a Cat, sitting", "an astronaut riding a horse on mars"]
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
        if clip_skip:
            hidden = text_encoder(tokenize(tok, prompts), output_hidden_states=True).hidden_states
            reference = tower(text_encoder, "text_model").final_layer_norm(hidden[-(clip_skip + 1)])
        context = encode_sd1(text_encoder, tok, prompts, clip_skip)
        skipped_nothing = encode_sd1(text_encoder, tok, prompts)
    assert context.shape == (2, 77, 32)
    assert clip_skip == 0 or (context - skipped_nothing).abs().max() > 0.1
    assert (context - reference).abs().max() <= 1e-5
    assert context.std() > 0.5


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_encode_sdxl_matches_diffusers(tokenizers, clip_skip):
    """Reference: diffusers StableDiffusionXLPipeline.encode_prompt (its clip_skip too), same tiny random
    encoders, fp32. Tolerance 1e-5 (measured: 0, bit-identical); context std ~0.5, pooled std ~1.0."""
    from diffusers import StableDiffusionXLPipeline

    tok_1, tok_2 = tokenizers
    te_1, te_2 = build_text_encoder(TINY_CLIP_L), build_text_encoder(TINY_BIGG)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=te_1, text_encoder_2=te_2, tokenizer=tok_1, tokenizer_2=tok_2, unet=None, scheduler=None
    )
    prompts = ["a photo of a Cat, sitting", "an astronaut riding a horse on mars"]
    with torch.no_grad():
        reference, _, reference_pooled, _ = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False,
            clip_skip=clip_skip or None,
        )
        context, pooled = encode_sdxl(te_1, tok_1, te_2, tok_2, prompts, clip_skip)
    assert context.shape == (2, 77, 32 + 64) and pooled.shape == (2, 48)
    assert (context - reference).abs().max() <= 1e-5
    assert (pooled - reference_pooled).abs().max() <= 1e-5
    assert context.std() > 0.1 and pooled.std() > 0.1


def test_clip_skip_beyond_the_encoder_is_refused(tokenizers):
    """The message counts the encoder's layers as they are (SDXL's said one fewer) and says where SDXL reads."""
    text_encoder = build_text_encoder(TINY_CLIP_L)
    layers = text_encoder.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"clip_skip {layers} must be 0 to {layers - 1}: this text encoder has {layers} layers$"):
        encode_sd1(text_encoder, tokenizers[0], "a cat", clip_skip=layers)
    encoder_2 = build_text_encoder(TINY_BIGG)
    with pytest.raises(ValueError, match=rf"clip_skip {layers - 1} must be 0 to {layers - 2}: this text encoder has {layers} layers, read from the "
                                         r"penultimate one at clip_skip 0 \(SDXL\)"):
        encode_sdxl(text_encoder, tokenizers[0], encoder_2, tokenizers[1], "a cat", clip_skip=layers - 1)


def test_sdxl_time_ids_layout():
    ids = sdxl_time_ids((1024, 768), (16, 0), (896, 640))
    assert ids.dtype == torch.float32 and ids.tolist() == [1024, 768, 16, 0, 896, 640]


# ---------------------------------------------------------------- key maps and coverage


def _file_layout_shapes(config: TextEncoderConfig) -> dict[str, tuple]:
    """Key -> shape of a fresh full-size model on the meta device, in the file layout (text_model.*)."""
    with torch.device("meta"):
        model = build_text_encoder(config)
    return {key: tuple(value.shape) for key, value in file_layout(model.state_dict(), model, "text_model").items()}


@pytest.mark.parametrize(
    "name, prefix, preset",
    [
        ("sd15_v1-5-pruned-emaonly.json", SD15_CLIP_PREFIX, "clip-l"),
        ("diffusers_sd15_text_encoder.json", "", "clip-l"),
        ("diffusers_sdxl_text_encoder.json", "", "clip-l"),
        ("diffusers_sdxl_text_encoder_2.json", "", "openclip-bigg"),
        ("diffusers_flux1_text_encoder.json", "", "clip-l"),
    ],
)
def test_official_text_encoder_files_load_completely(manifest, name, prefix, preset):
    """Every tensor of the file maps onto the model, shapes equal; only REBUILT_KEYS (position_ids) is skipped."""
    state_dict = take_prefix(meta_tensors(manifest(name)), prefix)
    file_shapes = {key: tuple(t.shape) for key, t in state_dict.items() if key not in REBUILT_KEYS}
    assert file_shapes == _file_layout_shapes(PRESETS[preset])
    model = build_text_encoder(PRESETS[preset], state_dict)  # strict=True inside
    assert tower(model, "text_model").embeddings.position_ids.shape == (1, 77)


def test_sdxl_single_file_text_encoders_load_completely(manifest):
    checkpoint = meta_tensors(manifest("sdxl_sd_xl_base_1.0.json"))
    encoders = text_encoders_from_single_file(checkpoint)
    assert set(encoders) == {"text_encoder", "text_encoder_2"}
    clip_l = {k: tuple(t.shape) for k, t in encoders["text_encoder"].items() if k not in REBUILT_KEYS}
    assert clip_l == _file_layout_shapes(PRESETS["clip-l"])
    big_g = {k: tuple(t.shape) for k, t in encoders["text_encoder_2"].items()}
    assert big_g == _file_layout_shapes(PRESETS["openclip-bigg"])
    open_clip_keys = take_prefix(checkpoint, SDXL_OPEN_CLIP_PREFIX)
    assert len(open_clip_keys) == 1 + 5 + 32 * 12  # logit_scale, 5 top-level tensors, 12 per block
    assert len(big_g) == 5 + 32 * 16 == 517  # logit_scale dropped; in_proj weight, bias -> q, k, v
    build_text_encoder(PRESETS["clip-l"], encoders["text_encoder"])
    build_text_encoder(PRESETS["openclip-bigg"], encoders["text_encoder_2"])


def test_single_file_without_text_encoder_is_rejected():
    from minigen.loading.detect import CheckpointError

    with pytest.raises(CheckpointError, match="this file has no CLIP-L text encoder.*needs a single file with its text encoders"):
        text_encoders_from_single_file({"model.diffusion_model.out.0.weight": torch.zeros(1)})


def _random_open_clip(width: int = 64, layers: int = 2, projection: int = 48, vocab: int = 49408) -> dict:
    """A random OpenCLIP text tower in open_clip naming (non-square projection to catch a missing transpose)."""
    sd = {
        "token_embedding.weight": torch.randn(vocab, width) * 0.5,
        "positional_embedding": torch.randn(77, width) * 0.5,
        "ln_final.weight": 1 + 0.1 * torch.randn(width),
        "ln_final.bias": 0.1 * torch.randn(width),
        "text_projection": torch.randn(width, projection) / width**0.5,
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + 0.1 * torch.randn(width), 0.1 * torch.randn(width)
        for name, shape in [("attn.in_proj", (3 * width, width)), ("attn.out_proj", (width, width)),
                            ("mlp.c_fc", (4 * width, width)), ("mlp.c_proj", (width, 4 * width))]:
            weight, bias = torch.randn(shape) / shape[1] ** 0.5, 0.1 * torch.randn(shape[0])
            if name == "attn.in_proj":
                sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = weight, bias
            else:
                sd[p + name + ".weight"], sd[p + name + ".bias"] = weight, bias
    return sd


def test_open_clip_map_matches_diffusers_converter():
    """Oracle: diffusers.loaders.single_file_utils.convert_open_clip_checkpoint, random tensors; exact equality."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    open_clip = _random_open_clip()
    checkpoint = {SDXL_OPEN_CLIP_PREFIX + key: value for key, value in open_clip.items()}
    reference = convert_open_clip_checkpoint(build_text_encoder(TINY_BIGG), checkpoint, prefix=SDXL_OPEN_CLIP_PREFIX)
    ours = open_clip_to_transformers(open_clip)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[key], reference[key]) for key in ours)


def test_open_clip_map_matches_diffusers_on_the_sdxl_manifest(manifest):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    checkpoint = meta_tensors(manifest("sdxl_sd_xl_base_1.0.json"))
    with torch.device("meta"):
        model = build_text_encoder(PRESETS["openclip-bigg"])
    reference = convert_open_clip_checkpoint(model, checkpoint, prefix=SDXL_OPEN_CLIP_PREFIX)
    ours = open_clip_to_transformers(take_prefix(checkpoint, SDXL_OPEN_CLIP_PREFIX))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_open_clip_round_trip_is_exact():
    open_clip = _random_open_clip()
    transformers_sd = open_clip_to_transformers(open_clip)
    back = open_clip_from_transformers(transformers_sd)
    assert back.keys() == open_clip.keys() - {"logit_scale"}
    assert all(torch.equal(back[key], open_clip[key]) for key in back)
    again = open_clip_to_transformers(back)
    assert again.keys() == transformers_sd.keys()
    assert all(torch.equal(again[key], transformers_sd[key]) for key in again)
    with pytest.raises(KeyError, match="Unexpected key 'transformer.resblocks.0.attn.bogus'"):
        open_clip_to_transformers({**open_clip, "transformer.resblocks.0.attn.bogus": torch.zeros(1)})


def _open_clip_text_forward(sd: dict, ids: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCLIP's TextTransformer written independently (nn.MultiheadAttention reads in_proj as is).
    Returns (penultimate hidden states, final-normed last hidden states, projected EOS features)."""
    width = sd["positional_embedding"].shape[1]
    x = F.embedding(ids, sd["token_embedding.weight"]) + sd["positional_embedding"]
    causal = torch.full((77, 77), float("-inf")).triu(1)
    layers = sorted({int(key.split(".")[2]) for key in sd if key.startswith("transformer.resblocks.")})
    states = []
    for i in layers:
        p = f"transformer.resblocks.{i}."
        attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({k.removeprefix(p + "attn."): v for k, v in sd.items() if k.startswith(p + "attn.")})
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attention(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        states.append(x)
    final = F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"])
    pooled = final[torch.arange(len(ids)), ids.argmax(dim=-1)] @ sd["text_projection"]
    return states[-2], final, pooled


def test_open_clip_map_reproduces_open_clip_numerics(tokenizers):
    """Reference: OpenCLIP's text forward written out in this test, fed the open_clip-named tensors;
    ours: CLIPTextModelWithProjection loaded through open_clip_to_transformers.
    fp32, tolerance 1e-5 (measured: hidden states 0, pooled 4e-7); output std ~1.0-1.6."""
    open_clip = _random_open_clip(layers=3)
    config = TextEncoderConfig(
        hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, hidden_act="gelu", projection_dim=48
    )
    model = build_text_encoder(config, open_clip_to_transformers(open_clip))
    ids = tokenize(tokenizers[1], ["a photo of a cat", "two dogs playing in the snow, photorealistic"])
    penultimate, final, pooled = _open_clip_text_forward(open_clip, ids, heads=4)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert penultimate.std() > 0.5
    assert (out.hidden_states[-2] - penultimate).abs().max() <= 1e-5
    assert (out.last_hidden_state - final).abs().max() <= 1e-5
    assert (out.text_embeds - pooled).abs().max() <= 1e-5
