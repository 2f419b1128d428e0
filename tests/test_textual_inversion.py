"""Textual-inversion embeddings (minigen/loading/textual_inversion.py): formats, loading, prompt expansion."""

import copy

import pytest
import safetensors.torch
import torch

from minigen.loading.detect import CheckpointError
from minigen.loading.textual_inversion import expand_textual_inversion, load_textual_inversion, read_textual_inversion
from minigen.text.encoders import PRESETS, TextEncoderConfig, build_text_encoder, encode_sd1, encode_sdxl
from minigen.text.tokenizer import load_clip_tokenizer, tokenize
from minigen.text.weighting import encode_sd1_weighted, prompt_chunks
from minigen.transformers_compat import tower

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
TINY_CLIP_L = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4, hidden_act="quick_gelu")
TINY_BIGG = TextEncoderConfig(hidden_size=64, intermediate_size=80, num_layers=4, num_heads=4, hidden_act="gelu", projection_dim=48)


@pytest.fixture
def tokenizers(shared_hf):
    return load_clip_tokenizer(shared_hf / SDXL / "tokenizer"), load_clip_tokenizer(shared_hf / SDXL / "tokenizer_2")


def table(encoder) -> torch.Tensor:
    return tower(encoder, "text_model").embeddings.token_embedding.weight


def a1111_pt(path, vectors, name):
    """An A1111 .pt as its trainer saves it (a pickle)."""
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vectors}, "name": name,
                "step": 1500, "sd_checkpoint": "81761151", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


# ---------------------------------------------------------------- parity with diffusers

FORMATS = ["diffusers-safetensors-1", "diffusers-bin-3", "a1111-pt-2", "a1111-safetensors-2"]


def write_format(tmp_path, kind: str, width: int):
    """(path, the token to pass or None, the word the prompt uses, allow_pickle) for each file format."""
    if kind == "diffusers-safetensors-1":  # one vector [C], named by its key
        safetensors.torch.save_file({"<cat-toy>": torch.randn(width)}, tmp_path / "learned_embeds.safetensors")
        return tmp_path / "learned_embeds.safetensors", None, "<cat-toy>", False
    if kind == "diffusers-bin-3":  # three vectors, pickled
        torch.save({"<cat-toy>": torch.randn(3, width)}, tmp_path / "learned_embeds.bin")
        return tmp_path / "learned_embeds.bin", None, "<cat-toy>", True
    if kind == "a1111-pt-2":  # stored name = file stem, so diffusers (name) and minigen (stem) agree
        return a1111_pt(tmp_path / "charturner.pt", torch.randn(2, width), "charturner"), None, "charturner", True
    safetensors.torch.save_file({"emb_params": torch.randn(2, width)}, tmp_path / "badhands.safetensors")
    return tmp_path / "badhands.safetensors", "badhands", "badhands", False  # diffusers would name it "emb_params"


@pytest.mark.parametrize("kind", FORMATS)
def test_sd1_matches_diffusers(tmp_path, shared_hf, kind):
    """Reference: diffusers StableDiffusionPipeline.load_textual_inversion on a copy of the same tiny
    random CLIP-L and tokenizer, then its encode_prompt (which expands multi-vector words with
    maybe_convert_prompt). Ours: load_textual_inversion, expand_textual_inversion, encode_sd1.
    Tolerance 1e-6 on the prompt embeddings (measured 0); the token ids must be equal."""
    from diffusers import StableDiffusionPipeline

    encoder, tokenizer = build_text_encoder(TINY_CLIP_L), load_clip_tokenizer(shared_hf / SDXL / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=copy.deepcopy(encoder), tokenizer=load_clip_tokenizer(shared_hf / SDXL / "tokenizer"),
        unet=None, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path, token, word, allow_pickle = write_format(tmp_path, kind, 32)
    pipe.load_textual_inversion(str(path), token=token)
    assert load_textual_inversion([encoder], [tokenizer], path, token, allow_pickle=allow_pickle) == word

    prompts = [f"a photo of {word} on a table, {word}", "no concept here"]
    expanded = expand_textual_inversion(tokenizer, prompts)
    assert expanded == pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    assert torch.equal(tokenize(tokenizer, expanded), tokenize(pipe.tokenizer, pipe.maybe_convert_prompt(prompts, pipe.tokenizer)))
    with torch.no_grad():
        reference, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
        ours = encode_sd1(encoder, tokenizer, expanded)
    assert (ours - reference).abs().max() <= 1e-6
    vectors = read_textual_inversion(path, allow_pickle=allow_pickle).vectors[0]
    assert len(tokenizer) == 49408 + len(vectors) and table(encoder).shape == (49408 + len(vectors), 32)
    assert torch.equal(table(encoder)[49408:], table(pipe.text_encoder)[49408:])
    assert torch.equal(table(encoder)[49408:], vectors)


def test_sdxl_matches_diffusers(tmp_path, tokenizers, shared_hf):
    """Reference: diffusers StableDiffusionXLPipeline, clip_l loaded into text_encoder/tokenizer and clip_g
    into text_encoder_2/tokenizer_2 (diffusers' documented SDXL recipe), then encode_prompt. Ours: one
    load_textual_inversion, expand_textual_inversion, encode_sdxl. Tolerance 1e-6 (measured 0)."""
    from diffusers import StableDiffusionXLPipeline

    encoders = [build_text_encoder(TINY_CLIP_L), build_text_encoder(TINY_BIGG)]
    embedding = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}
    safetensors.torch.save_file(embedding, tmp_path / "web_y2k.safetensors")
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=copy.deepcopy(encoders[0]), text_encoder_2=copy.deepcopy(encoders[1]),
        tokenizer=load_clip_tokenizer(shared_hf / SDXL / "tokenizer"),
        tokenizer_2=load_clip_tokenizer(shared_hf / SDXL / "tokenizer_2"), unet=None, scheduler=None,
    )
    pipe.load_textual_inversion(embedding["clip_l"], token="web_y2k", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(embedding["clip_g"], token="web_y2k", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    assert load_textual_inversion(encoders, tokenizers, tmp_path / "web_y2k.safetensors") == "web_y2k"  # the stem

    prompts = ["a web_y2k style house wow!!", "a house"]
    with torch.no_grad():
        reference, _, reference_pooled, _ = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        context, pooled = encode_sdxl(encoders[0], tokenizers[0], encoders[1], tokenizers[1], expand_textual_inversion(tokenizers[0], prompts))
    assert (context - reference).abs().max() <= 1e-6 and (pooled - reference_pooled).abs().max() <= 1e-6
    assert torch.equal(table(encoders[0])[49408:], embedding["clip_l"]) and torch.equal(table(encoders[1])[49408:], embedding["clip_g"])


# ---------------------------------------------------------------- naming, rows, expansion


def test_a1111_files_are_named_by_their_stem(tmp_path, tokenizers):
    """A1111's rule: the word is the file's stem, not the .pt's stored name (diffusers reads the name)."""
    path = a1111_pt(tmp_path / "EasyNegative.pt", torch.randn(2, 32), "easynegative-v2")
    with pytest.raises(PermissionError, match="pickled PyTorch file"):
        load_textual_inversion([build_text_encoder(TINY_CLIP_L)], [tokenizers[0]], path)
    assert read_textual_inversion(path, allow_pickle=True).name == "EasyNegative"
    assert load_textual_inversion([build_text_encoder(TINY_CLIP_L)], [tokenizers[0]], path, allow_pickle=True) == "EasyNegative"
    assert load_textual_inversion([build_text_encoder(TINY_CLIP_L)], [tokenizers[1]], path, "<neg>", allow_pickle=True) == "<neg>"


def test_rows_are_appended_in_the_tables_dtype(tmp_path, tokenizers):
    encoder = build_text_encoder(TINY_CLIP_L)
    before = table(encoder).detach().clone()
    vectors = torch.randn(4, 32, dtype=torch.float16)
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / "zqstyle.safetensors")
    load_textual_inversion([encoder], [tokenizers[0]], tmp_path / "zqstyle.safetensors")
    assert tokenizers[0].convert_tokens_to_ids(["zqstyle", "zqstyle_1", "zqstyle_2", "zqstyle_3"]) == [49408, 49409, 49410, 49411]
    assert table(encoder).dtype == torch.float32 and encoder.config.vocab_size == 49412
    assert torch.equal(table(encoder)[:49408], before) and torch.equal(table(encoder)[49408:], vectors.float())


def test_expansion_rules(tmp_path, tokenizers):
    """Reference: diffusers' maybe_convert_prompt expands "w" to "w w_1 ..."; the tokenizer matches added
    words in any case and prefers the longer of two that start alike, and expansion follows it."""
    tok = tokenizers[0]
    assert expand_textual_inversion(tok, "EasyNeg, a cat") == "EasyNeg, a cat"  # nothing loaded: unchanged
    safetensors.torch.save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "EasyNeg.safetensors")
    safetensors.torch.save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "EasyNegXL.safetensors")
    encoder = build_text_encoder(TINY_CLIP_L)
    load_textual_inversion([encoder], [tok], tmp_path / "EasyNeg.safetensors")
    load_textual_inversion([encoder], [tok], tmp_path / "EasyNegXL.safetensors")
    prompt = "easyneg, EASYNEG a cat easynegxl EasyNeg_1"
    expanded = expand_textual_inversion(tok, prompt)
    assert expanded == "EasyNeg EasyNeg_1, EasyNeg EasyNeg_1 a cat easynegxl EasyNeg_1"
    assert tok(expanded, add_special_tokens=False).input_ids == [49408, 49409, 267, 49408, 49409, 320, 2368, 49410, 49409]
    assert expand_textual_inversion(tok, [prompt, "x"]) == [expanded, "x"]


def test_weights_reach_every_vector_of_a_word(tmp_path, tokenizers):
    """A weighted multi-vector word weighs all its vectors (A1111 gives an embedding's vectors its weight).
    Reference: the prompt_chunks weights; and the encoding is finite and differs from the unweighted one."""
    tok, encoder = tokenizers[0], build_text_encoder(TINY_CLIP_L)
    with torch.no_grad():  # a fresh model's final-normed states have mean 0, where restoring the mean divides by 0
        tower(encoder, "text_model").final_layer_norm.bias.fill_(0.1)
    safetensors.torch.save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "zqtoy.safetensors")
    load_textual_inversion([encoder], [tok], tmp_path / "zqtoy.safetensors")
    prompt = expand_textual_inversion(tok, "a (zqtoy:1.3) cat")
    ids, weights = prompt_chunks(tok, prompt)
    assert ids[0, :7].tolist() == [49406, 320, 49408, 49409, 49410, 2368, 49407]
    assert weights[0, :7].tolist() == pytest.approx([1, 1, 1.3, 1.3, 1.3, 1, 1])
    with torch.no_grad():
        weighted = encode_sd1_weighted(encoder, tok, prompt)
        plain = encode_sd1_weighted(encoder, tok, expand_textual_inversion(tok, "a zqtoy cat"))
    assert weighted.isfinite().all() and (weighted - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- refusals


def meta_encoders(*presets):
    with torch.device("meta"):
        return [build_text_encoder(PRESETS[p]) for p in presets]


@pytest.mark.parametrize(
    "file, presets, message",
    [
        ({"emb_params": torch.zeros(2, 768)}, ("clip-l", "openclip-bigg"),
         r"for text encoders 768 \(CLIP-L.*\), but this model's are 768 \(CLIP-L.*\) \+ 1280 \(OpenCLIP-bigG"),
        ({"emb_params": torch.zeros(2, 1024)}, ("clip-l",), r"for text encoders 1024 \(OpenCLIP-H: SD2.x\), but this model's are 768"),
        ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, ("clip-l",), r"768 \(.*\) \+ 1280 \(.*\), but this model's are 768 \("),
    ],
)
def test_embeddings_for_other_text_encoders_are_refused(tmp_path, tokenizers, file, presets, message):
    """An SD1.5 embedding on SDXL, an SD2 one on SD1.5, an SDXL one on SD1.5: full-size widths, meta models."""
    safetensors.torch.save_file(file, tmp_path / "emb.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_textual_inversion(meta_encoders(*presets), tokenizers[: len(presets)], tmp_path / "emb.safetensors")
    assert len(tokenizers[0]) == len(tokenizers[1]) == 49408  # nothing added


def test_a_word_the_tokenizer_has_is_refused(tmp_path, tokenizers):
    encoders = [build_text_encoder(TINY_CLIP_L), build_text_encoder(TINY_BIGG)]
    safetensors.torch.save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, tmp_path / "y2k.safetensors")
    for word in ("cat", "Cat", "<|endoftext|>"):  # a word of CLIP's vocabulary, in any case
        with pytest.raises(ValueError, match=f"{word!r} is already a token of the tokenizer"):
            load_textual_inversion(encoders, tokenizers, tmp_path / "y2k.safetensors", word)
    tokenizers[1].add_tokens(["y2k_1"])  # only the second tokenizer has it: refused before the first changes
    with pytest.raises(ValueError, match="'y2k_1' is already a token"):
        load_textual_inversion(encoders, tokenizers, tmp_path / "y2k.safetensors")
    assert len(tokenizers[0]) == 49408 and table(encoders[0]).shape[0] == 49408
    load_textual_inversion(encoders, tokenizers, tmp_path / "y2k.safetensors", "<y2k>")
    with pytest.raises(ValueError, match="'<y2k>' is already a token"):  # loaded twice
        load_textual_inversion(encoders, tokenizers, tmp_path / "y2k.safetensors", "<y2k>")


def test_bad_files_are_refused(tmp_path, tokenizers):
    encoder, tok = build_text_encoder(TINY_CLIP_L), tokenizers[0]
    load = lambda path, **kw: load_textual_inversion([encoder], [tok], path, **kw)  # noqa: E731
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="junk.safetensors is not a readable safetensors file"):
        load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")
    torch.save({"<x>": torch.randn(32)}, tmp_path / "x.bin")
    with pytest.raises(PermissionError, match="allow_pickle=True"):
        load(tmp_path / "x.bin")
    cases = {
        "lora.safetensors": ({"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}, "not a textual-inversion embedding"),
        "nan.safetensors": ({"emb_params": torch.full((1, 32), float("nan"))}, "NaN or infinite"),
        "long.safetensors": ({"emb_params": torch.zeros(76, 32)}, r"1 <= n <= 75, got torch.float32 \[76, 32\]"),
        "ints.safetensors": ({"emb_params": torch.zeros(1, 32, dtype=torch.int64)}, "must be a float"),
        "uneven.safetensors": ({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 64)}, "clip_l has 2 vectors but clip_g 3"),
        "g_only.safetensors": ({"clip_g": torch.zeros(2, 64)}, "holds clip_g without clip_l"),
    }
    for name, (tensors, message) in cases.items():
        safetensors.torch.save_file(tensors, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load(tmp_path / name)
    safetensors.torch.save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "ok.safetensors")
    for word in ("(x)", "a:b", " "):
        with pytest.raises(ValueError, match="cannot be a prompt word"):
            load(tmp_path / "ok.safetensors", token=word)
    assert len(tok) == 49408 and table(encoder).shape[0] == 49408
    safetensors.torch.save_file({"clip_l": torch.randn(2, 32)}, tmp_path / "myconcept.safetensors")  # CLIP-L's alone: an SD1.x embedding
    assert load(tmp_path / "myconcept.safetensors") == "myconcept"  # was the word "clip_l", the key's name


def test_a_span_counts_the_vectors_of_a_multi_vector_word_before_it(tmp_path, shared_hf):
    """The pipelines write a 3-vector word out as 3 tokens before encoding, but token_span looked in the
    prompt as typed: "circle" was found 2 positions early (Conceptrol's mask then followed "beside",
    LAG's residuals the wrong word), and the word's own span covered its first vector only. Reference:
    the ids of the written-out prompt, as the encoder reads them."""
    from minigen.text.spans import token_span

    tokenizer = load_clip_tokenizer(shared_hf / SDXL / "tokenizer")
    encoder = build_text_encoder(TINY_CLIP_L)
    safetensors.torch.save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "myti.safetensors")
    word = load_textual_inversion([encoder], [tokenizer], tmp_path / "myti.safetensors")
    prompt = f"a {word} beside a circle on grass"
    ids = tokenizer(expand_textual_inversion(tokenizer, prompt)).input_ids
    assert token_span(tokenizer, prompt, "circle") == [ids.index(tokenizer.convert_tokens_to_ids("circle</w>"))] == [7]
    assert token_span(tokenizer, prompt, word) == [2, 3, 4]


def test_words_that_would_read_as_one_words_vectors_are_refused(tmp_path, tokenizers):
    """`zqstyle` then `zqstyle_1` (two files): a prompt's "zqstyle" was expanded to "zqstyle zqstyle_1", the
    second file's vector read as the first's second one; likewise `zq_3` loaded before `zq`."""
    tok, encoder = tokenizers[0], build_text_encoder(TINY_CLIP_L)
    for name in ("zqstyle", "zqstyle_1", "zq_3", "zq"):
        safetensors.torch.save_file({"emb_params": torch.randn(1, 32)}, tmp_path / f"{name}.safetensors")
    load_textual_inversion([encoder], [tok], tmp_path / "zqstyle.safetensors")
    with pytest.raises(ValueError, match=r"'zqstyle_1' and the loaded 'zqstyle' would read as one word's vectors"):
        load_textual_inversion([encoder], [tok], tmp_path / "zqstyle_1.safetensors")
    load_textual_inversion([encoder], [tok], tmp_path / "zq_3.safetensors")
    with pytest.raises(ValueError, match=r"'zq' and the loaded 'zq_3' would read as one word's vectors"):
        load_textual_inversion([encoder], [tok], tmp_path / "zq.safetensors")
    assert expand_textual_inversion(tok, "in zqstyle") == "in zqstyle"


def test_expansion_is_idempotent_and_follows_the_tokenizers_spaces(tmp_path, tokenizers):
    """A prompt expanded twice (by hand, then by generate) got the vectors twice over (8 ids -> 10); a
    trigger with a space, typed with two spaces or a line break, is still the tokenizer's added word, and
    was left unexpanded (1 vector of 3 read)."""
    tok, encoder = tokenizers[0], build_text_encoder(TINY_CLIP_L)
    safetensors.torch.save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "charturner.safetensors")
    safetensors.torch.save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "spaced.safetensors")
    load_textual_inversion([encoder], [tok], tmp_path / "charturner.safetensors")
    load_textual_inversion([encoder], [tok], tmp_path / "spaced.safetensors", token="zq toy")
    once = expand_textual_inversion(tok, "charturner, a knight")
    assert once == "charturner charturner_1 charturner_2, a knight" and expand_textual_inversion(tok, once) == once
    for typed in ("a zq  toy on grass", "a zq\ntoy on grass"):
        expanded = expand_textual_inversion(tok, typed)
        assert expanded == "a zq toy zq toy_1 zq toy_2 on grass"
        added = [i for i in tok(expanded, add_special_tokens=False).input_ids if i >= 49408]
        assert len(added) == 3
