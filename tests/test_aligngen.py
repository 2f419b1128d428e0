"""AlignGen inference (minigen/methods/aligngen.py, minigen/loading/aligngen.py).

References and tolerances, test by test:
- S* replacement: every prompt-embedding position but S*'s is bit-identical to the input (torch.equal);
  S*'s holds the DEM's output for that concept, recomputed alone (equal within 1e-6, fp32).
- The DEM: against Eq. 3-5 written out in float64 (LayerNorm, q·kᵀ/√d_head softmax, tanh-GELU MLP): 1e-12.
- The selective mask: joint attention recorded (RecordAttention, every block, every head) in a tiny
  random FLUX; the probability is exactly 0.0 on every listed (query, key) pair and > 0 on every other,
  for one subject, two subjects, and the negative rows of true CFG.
- The tokenizer path: placeholder and concept positions against the tokenizer's own ids and `token_span`;
  T5 states and CLIP pooled bit-identical to the pipeline's encoder on the same texts.
- Bad input: each refused with an error naming the problem.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from minigen.controls import Controls, RecordAttention
from minigen.loading.aligngen import load_aligngen, save_aligngen, trained_settings
from minigen.loading.detect import CheckpointError
from minigen.methods.aligngen import (
    PLACEHOLDER,
    AlignGen,
    AlignGenConfig,
    AlignGenSettings,
    ConceptTokens,
    aligngen_inputs,
    encode_prompt,
    insert_placeholders,
    prepare,
    reference_groups,
    with_updated_tokens,
)
from minigen.models.flux import Flux
from minigen.models.vae import AutoencoderKL
from minigen.pipelines.flux import FluxPipeline
from minigen.text.spans import token_span
from minigen.text.t5 import encode_flux_ids
from minigen.text.tokenizer import tokenize

from conftest import TINY_FLUX, TINY_FLUX_VAE

SIZE, M = 32, 8  # 32 px: 2x2 image tokens and 2x2 reference tokens; 8 text tokens
ONE = [ConceptTokens((3, 4), 2)]  # "a photo of <S*> acoustic guitar ...": S* at 2, the word at 3-4
TWO = [ConceptTokens((3, 4), 2), ConceptTokens((6,), 5)]


def randomized(aligngen: AlignGen, seed: int = 0, std: float = 0.2) -> AlignGen:
    """Every weight of `aligngen` (the zero-initialized outputs and LoRA ups too) drawn from N(0, std²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aligngen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return aligngen


@pytest.fixture(scope="module")
def tiny():
    """A tiny random FLUX pipeline (no text encoders: every prompt comes as embeddings) and a random AlignGen."""
    torch.manual_seed(0)
    transformer, vae = Flux(TINY_FLUX).eval(), AutoencoderKL(TINY_FLUX_VAE).eval()
    pipe = FluxPipeline(transformer, vae, None, None, None, None, default_size=SIZE, default_cfg=1.0)
    aligngen = randomized(AlignGen(AlignGenConfig.for_transformer(transformer), transformer))
    return pipe, aligngen


def tensors(k: int, seed: int = 1):
    """Prompt embeddings [1, M, d], pooled [1, D], k references [1, 3, 32, 32] and k sets of Redux tokens [1, 5, d]."""
    g = torch.Generator().manual_seed(seed)
    d = TINY_FLUX.context_in_dim
    txt, pooled = torch.randn(1, M, d, generator=g), torch.randn(1, TINY_FLUX.vec_in_dim, generator=g)
    references = [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(k)]
    return txt, pooled, references, [torch.randn(1, 5, d, generator=g) for _ in range(k)]


def inputs(tiny, concepts, settings=AlignGenSettings(reference_size=None), seed=1):
    pipe, aligngen = tiny
    txt, pooled, references, redux = tensors(len(concepts), seed)
    return aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, concepts, references, redux, settings), txt, redux


# --- S* and the DEM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("concepts", [ONE, TWO], ids=["one", "two"])
def test_s_star_replacement_touches_its_position_only(tiny, concepts):
    """Every position but S*'s is bit-identical; S*'s holds DEM([S*; concept states], Redux)[0] of its own concept."""
    _, aligngen = tiny
    out, txt, redux = inputs(tiny, concepts)
    s_positions = [c.s_star for c in concepts]
    others = [p for p in range(M) if p not in s_positions]
    assert torch.equal(out.prompt_embeds[:, others], txt[:, others])
    for concept, tokens in zip(concepts, redux):
        expected = aligngen.updated_token(txt[0, list(concept.span)], tokens[0])
        assert (out.prompt_embeds[0, concept.s_star] - expected).abs().max() <= 1e-6
        assert (out.prompt_embeds[0, concept.s_star] - txt[0, concept.s_star]).abs().max() > 0.1
    if len(concepts) == 2:  # each S*' reads its own concept and Redux tokens
        assert not torch.allclose(out.prompt_embeds[0, 2], out.prompt_embeds[0, 5])


def test_the_dem_is_eq_3_to_5_written_out(tiny):
    """float64: c += SA(LN c); c += CA(LN c, LN redux); c += MLP(LN c); against the module, within 1e-12."""
    _, aligngen = tiny
    transformer = tiny[0].transformer
    config = AlignGenConfig.for_transformer(transformer, inner=16, heads=2, mlp_hidden=24)
    dem = randomized(AlignGen(config, transformer), 3).dem.double()
    g = torch.Generator().manual_seed(4)
    c, redux = torch.randn(2, 3, 32, generator=g, dtype=torch.float64), torch.randn(2, 7, 32, generator=g, dtype=torch.float64)

    def ln(x, norm):
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt() * norm.weight + norm.bias

    def attend(x, context, a, heads=2):
        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(x @ a.to_q.weight.T), split(context @ a.to_k.weight.T), split(context @ a.to_v.weight.T)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return (p @ v).transpose(1, 2).flatten(2) @ a.to_out.weight.T + a.to_out.bias

    h = ln(c, dem.norm_self)
    expected = c + attend(h, h, dem.self_attn)
    expected = expected + attend(ln(expected, dem.norm_cross), ln(redux, dem.norm_redux), dem.cross_attn)
    hidden = ln(expected, dem.norm_mlp) @ dem.mlp[0].weight.T + dem.mlp[0].bias
    expected = expected + F.gelu(hidden, approximate="tanh") @ dem.mlp[2].weight.T + dem.mlp[2].bias
    assert (dem(c, redux) - expected).abs().max() <= 1e-12


def test_a_new_dem_is_the_identity_and_the_ablations_switch_what_they_name(tiny):
    """A fresh AlignGen's S*' is S* (zero output projections); dem=False puts the raw S*; s_star=False
    changes nothing and needs no S* positions."""
    pipe, aligngen = tiny
    txt, _, _, redux = tensors(1)
    fresh = AlignGen(AlignGenConfig.for_transformer(pipe.transformer), pipe.transformer, initial_token=torch.randn(32))
    assert torch.equal(fresh.updated_token(txt[0, [3, 4]], redux[0]), fresh.token.vector)
    raw = with_updated_tokens(aligngen, txt, [ONE], [redux], AlignGenSettings(dem=False))
    assert torch.equal(raw[0, 2], aligngen.token.vector) and torch.equal(raw[0, [0, 1, 3, 4, 5, 6, 7]], txt[0, [0, 1, 3, 4, 5, 6, 7]])
    plain, txt, _ = inputs(tiny, [ConceptTokens((3, 4))], AlignGenSettings(s_star=False, reference_size=None))
    assert torch.equal(plain.prompt_embeds, txt)


# --- the selective cross-modal attention mask ----------------------------------------------------------------


def recorded(tiny, out, **generate):
    """Joint attention probabilities of every block at the one sampling step: {layer: [B, heads, L, L]}."""
    pipe, _ = tiny
    record = RecordAttention(kind="joint", mean_heads=False)
    kwargs = out.generate_kwargs() | {"controls": Controls(bias=out.bias, record=[record])}
    pipe.generate(**kwargs, width=SIZE, height=SIZE, steps=1, progress=False, output="latents", **generate)
    return {layer: maps[0] for layer, maps in record.maps.items()}


def blocked_pairs(concepts, rows_without_concepts=(), batch=1, mask=True):
    """[B, L, L] True where the mask must block: text -> reference k outside S*_k and concept k, and reference j
    -> reference k; rows in `rows_without_concepts` (negative prompts) block every text -> reference pair."""
    image, ref = 4, 4
    length = M + image + ref * len(concepts)
    blocked = torch.zeros(batch, length, length, dtype=torch.bool)
    refs = [range(M + image + ref * k, M + image + ref * (k + 1)) for k in range(len(concepts))]
    for b in range(batch):
        for k, columns in enumerate(refs):
            for q in range(M):
                if mask and (b in rows_without_concepts or q not in concepts[k].positions):
                    blocked[b, q, list(columns)] = True
            for j, rows in enumerate(refs):
                if j != k:
                    blocked[b, list(rows)[0] : list(rows)[-1] + 1, list(columns)] = True
    return blocked


@pytest.mark.parametrize("concepts", [ONE, TWO], ids=["one subject", "two subjects"])
def test_the_mask_blocks_exactly_the_listed_pairs(tiny, concepts):
    """Recorded probabilities: exactly 0 where blocked, > 0 everywhere else, in every block and head."""
    out, _, _ = inputs(tiny, concepts)
    blocked = blocked_pairs(concepts)[:, None]  # [1, 1, L, L]
    maps = recorded(tiny, out)
    assert len(maps) == TINY_FLUX.depth + TINY_FLUX.depth_single_blocks
    for probs in maps.values():
        assert probs.shape[-1] == blocked.shape[-1]
        assert torch.all(probs.masked_select(blocked.expand_as(probs)) == 0.0)
        assert torch.all(probs.masked_select(~blocked.expand_as(probs)) > 0.0)


def test_under_true_cfg_the_negative_prompt_sees_no_reference(tiny):
    """Rows [negative | prompt]: the negative's text rows have probability 0 on the reference, the prompt's follow the mask."""
    out, txt, _ = inputs(tiny, ONE)
    negative = torch.randn_like(txt)
    maps = recorded(tiny, out, true_cfg=2.0, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=out.pooled_prompt_embeds)
    blocked = blocked_pairs(ONE, rows_without_concepts=(0,), batch=2)[:, None]
    for probs in maps.values():
        assert probs.shape[0] == 2
        assert torch.all(probs.masked_select(blocked.expand_as(probs)) == 0.0)
        assert torch.all(probs.masked_select(~blocked.expand_as(probs)) > 0.0)


def test_without_the_mask_text_sees_every_reference_but_references_stay_apart(tiny):
    out, _, _ = inputs(tiny, TWO, AlignGenSettings(mask=False, reference_size=None))
    blocked = blocked_pairs(TWO, mask=False)[:, None]
    for probs in recorded(tiny, out).values():
        assert torch.all(probs.masked_select(blocked.expand_as(probs)) == 0.0)
        assert torch.all(probs.masked_select(~blocked.expand_as(probs)) > 0.0)


@pytest.mark.parametrize("policy", ["concept", "none"])
def test_reference_to_text_closes_what_it_says(tiny, policy):
    out, _, _ = inputs(tiny, ONE, AlignGenSettings(reference_to_text=policy, reference_size=None))
    probs = next(iter(recorded(tiny, out).values()))[0]  # [heads, L, L]
    to_text = probs[:, M + 4 :, :M]  # reference rows -> text columns
    open_columns = ONE[0].positions if policy == "concept" else []
    closed = [q for q in range(M) if q not in open_columns]
    assert torch.all(to_text[..., closed] == 0.0) and torch.all(to_text[..., open_columns] > 0.0)


# --- files ------------------------------------------------------------------------------------------------------


def test_a_file_round_trips_and_another_base_model_is_refused(tiny, tmp_path):
    """Saved, loaded: identical tensors and identical generate inputs; a file for another FluxConfig is refused;
    a damaged file (NaN, a missing tensor) too."""
    pipe, aligngen = tiny
    path = save_aligngen(aligngen, tmp_path / "a.safetensors", metadata={"note": "test"})
    loaded = load_aligngen(path, pipe.transformer)
    assert all(torch.equal(a, b) for a, b in zip(aligngen.state_dict().values(), loaded.state_dict().values()))
    ours, _, _ = inputs(tiny, TWO)
    theirs, _, _ = inputs((pipe, loaded), TWO)
    assert torch.equal(ours.prompt_embeds, theirs.prompt_embeds)
    assert all(torch.equal(a.down, b.down) and torch.equal(a.up, b.up) for a, b in zip(ours.extra[0].lora, theirs.extra[0].lora))

    other = Flux(dataclasses.replace(TINY_FLUX, guidance_embed=not TINY_FLUX.guidance_embed))
    with pytest.raises(CheckpointError, match=r"trained for another base model \(its base's FluxConfig has guidance_embed .*dev has guidance_embed true"):
        load_aligngen(path, other)
    with pytest.raises(FileExistsError):
        save_aligngen(aligngen, path)

    tensors_ = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    for name, change in [("nan", lambda t: t | {"token.vector": torch.full_like(t["token.vector"], float("nan"))}),
                         ("missing", lambda t: {k: v for k, v in t.items() if not k.startswith("dem.mlp.0")})]:  # fmt: skip
        save_file(change(dict(tensors_)), tmp_path / f"{name}.safetensors", metadata)
        with pytest.raises(CheckpointError, match="NaN|missing|dem.mlp"):
            load_aligngen(tmp_path / f"{name}.safetensors", pipe.transformer)
    pickled = tmp_path / "a.pt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="safetensors files only"):
        load_aligngen(pickled, pipe.transformer)


def test_a_file_gives_back_the_settings_it_was_trained_with(tiny, tmp_path):
    """train_aligngen's record (metadata "training" -> "method") comes back as AlignGenSettings; a file without it
    gets the defaults; a field of the wrong type, an unknown field or a bad value is refused by name."""
    _, aligngen = tiny
    trained = AlignGenSettings(s_star=True, dem=False, mask=True, reference_to_text="concept", reference_size=64, lora_scale=0.5)
    record = {"method": dataclasses.asdict(trained), "training": {"reference_dropout": 0.5}, "batch": 4, "seed": 0}
    path = save_aligngen(aligngen, tmp_path / "trained.safetensors", metadata={"training": json.dumps(record)})
    assert trained_settings(path) == trained
    assert trained_settings(save_aligngen(aligngen, tmp_path / "bare.safetensors")) == AlignGenSettings()
    before = {k: v for k, v in dataclasses.asdict(trained).items() if k != "reference_shift"}  # a record from before the setting
    old = save_aligngen(aligngen, tmp_path / "old.safetensors", metadata={"training": json.dumps({"method": before})})
    assert trained_settings(old) == dataclasses.replace(trained, reference_shift="right")  # as those files were trained
    for i, (method, message) in enumerate([({"mask": "yes"}, "mask must be true or false"), ({"size": 3}, "unknown field 'size'"),
                                           ({"reference_size": 10**6}, "reference_size must be null or an integer"),
                                           ({"reference_to_text": "some"}, "reference_to_text must be 'all', 'concept' or 'none'")]):  # fmt: skip
        bad = save_aligngen(aligngen, tmp_path / f"bad{i}.safetensors", metadata={"training": json.dumps({"method": method})})
        with pytest.raises(CheckpointError, match=message):
            trained_settings(bad)


def test_a_loaded_file_runs_with_the_settings_it_was_trained_with(tiny, tmp_path):
    """A file trained on 64 px references ran at the default 512 px (here 1024 reference tokens instead of 16;
    4096 instead of 64 on toy-flux) unless its settings were passed again: load_aligngen keeps them as AlignGen.settings, which
    aligngen_inputs (and prepare) read when given none."""
    pipe, aligngen = tiny
    trained = AlignGenSettings(reference_size=64)
    path = save_aligngen(aligngen, tmp_path / "trained.safetensors", metadata={"training": json.dumps({"method": dataclasses.asdict(trained)})})
    loaded = load_aligngen(path, pipe.transformer)
    assert loaded.settings == trained and aligngen.settings == AlignGenSettings()  # one built in Python runs the paper's
    txt, pooled, references, redux = tensors(1)
    tokens = lambda *settings: aligngen_inputs(loaded, pipe.vae, pipe.transformer, txt, pooled, ONE, references, redux, *settings).extra[0].tokens  # noqa: E731
    assert tokens().shape[1] == 16 and torch.equal(tokens(), tokens(trained))  # 64 px at 16 px a token
    assert tokens(AlignGenSettings()).shape[1] == 1024  # the paper's 512 px
    again = save_aligngen(loaded, tmp_path / "again.safetensors")  # saved without a training record: its settings are one
    assert load_aligngen(again, pipe.transformer).settings == trained


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_tensor_inputs_are_refused(tiny):
    pipe, aligngen = tiny
    txt, pooled, references, redux = tensors(1)
    with pytest.raises(ValueError, match="2 concept.* but 1 reference image"):
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, TWO, references, redux)
    with pytest.raises(ValueError, match="no S\\* position"):
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, [ConceptTokens((3,))], references, redux)
    with pytest.raises(ValueError, match="outside the prompt"):
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, [ConceptTokens((30,), 29)], references, redux)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, ONE, [references[0] * 3], redux)
    with pytest.raises(ValueError, match="reference 0 must hold floats in \\[0, 1\\], got torch.uint8"):  # all 0: it passed as a float image
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, ONE, [torch.zeros_like(references[0], dtype=torch.uint8)], redux)
    assert ConceptTokens(torch.tensor([3, 4]), 2) == ONE[0]  # a tensor span: "Boolean value of Tensor ... is ambiguous"
    with pytest.raises(TypeError, match=r"reference 0 is a list: give a tensor \[1, 3, H, W\] in \[0, 1\] \(minigen.image.from_pil\)$"):
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, ONE, [[0.5]], redux)  # tensors only
    with pytest.raises(TypeError, match=r"reference 0 is a list: give a tensor .*\(minigen.image.from_pil\) or a file path"):
        prepare(pipe, aligngen, "a photo of a star", ["star"], [[0.5]], redux)  # prepare reads paths: the hint to them was lost
    with pytest.raises(ValueError, match="ConceptTokens.span must be token positions, .*got a 2-D torch.int64 Tensor"):
        ConceptTokens(torch.tensor([[3, 4]]), 2)
    with pytest.raises(ValueError, match="ConceptTokens.span holds negative positions \\[-1\\]"):
        ConceptTokens((-1,), 2)


# --- the tokenizer path (toy-flux: its own T5 tokenizer and encoders) ------------------------------------------------


def test_placeholders_go_before_each_concept_word():
    text, ranks = insert_placeholders("a cat next to a guitar and a cat", ["guitar", "cat"])
    assert text == f"a {PLACEHOLDER} cat next to a {PLACEHOLDER} guitar and a cat" and ranks == [1, 0]
    with pytest.raises(ValueError, match="'drum' is not in the prompt"):
        insert_placeholders("a cat next to a guitar", ["drum"])
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):  # whole words only
        insert_placeholders("a catalogue", ["cat"])


def test_each_concept_binds_its_own_occurrence_of_its_word(toy_flux):
    """Without S* every word took its first occurrence ("a star and a star": both concepts on the first
    star; "big star" and "star": "star" inside "big star"), and a word inside a longer one made the
    longer one unplaceable. Longer words claim their occurrence first; with or without S* each concept
    gets its own. A training caption binds the name at its template's place ("a cross right of a {}")."""
    from minigen.methods.aligngen_training import encode_caption

    tokenizer = toy_flux.t5_tokenizer
    for prompt, words, expected in (("a star and a star", ["star", "star"], [0, 1]), ("a big star near a star", ["big star", "star"], [0, 1]),
                                    ("a star near a big star", ["star", "big star"], [0, 0])):  # fmt: skip (occurrences of each word)
        for s_star in (False, True):
            encoded = encode_prompt(toy_flux, prompt, words, s_star=s_star)
            text = encoded.t5_text
            assert [list(c.span) for c in encoded.concepts] == [token_span(tokenizer, text, w, k, toy_flux.max_length) for w, k in zip(words, expected)]
    both = encode_prompt(toy_flux, "an acoustic guitar near a guitar", ["guitar", "acoustic guitar"])
    assert both.t5_text == f"an {PLACEHOLDER} acoustic guitar near a {PLACEHOLDER} guitar"
    caption = encode_caption(toy_flux, "a cross right of a {} on grass", "cross")
    placed = encode_prompt(toy_flux, "a cross right of a cross on grass", ["cross"], starts=[19])
    assert placed.t5_text == f"a cross right of a {PLACEHOLDER} cross on grass" and caption.concept == placed.concepts[0]
    assert encode_caption(toy_flux, "a {{cross}} right of a {} on grass", "cross").concept.span[0] > caption.concept.span[0]  # "{{" is one "{"
    with pytest.raises(ValueError, match="must hold the concept's place once"):
        encode_caption(toy_flux, "a {{}} on grass", "cross")
    for starts, message in (([2], "gives 1 distinct position"), ([3], "does not stand as a whole word at character 3")):  # a concept dropped, a bare error
        with pytest.raises(ValueError, match=message):
            encode_prompt(toy_flux, "a star near a circle", ["star", "circle"][: len(starts) + (starts == [2])], starts=starts)
    with pytest.raises(ValueError, match=r"occurs 2 time\(s\) in 'a \(star\) and a star' but T5 reads it as a word 1 time"):
        encode_prompt(toy_flux, "a (star) and a star", ["star"], s_star=False)  # bound the second star, where S* binds the first


def test_references_are_read_as_training_reads_them(tiny):
    """A non-square reference was squashed at inference but cropped to its centred square in training; a
    reference side off FLUX's 2x2 patches was a bare reshape error; a PIL image an AttributeError; Redux
    tokens of no token or NaN went through (the DEM attended over nothing)."""
    pipe, aligngen = tiny
    wide, settings = torch.rand(1, 3, SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(2)), AlignGenSettings(reference_size=SIZE)
    [from_wide] = reference_groups(aligngen, pipe.vae, pipe.transformer, [wide], settings)
    [from_square] = reference_groups(aligngen, pipe.vae, pipe.transformer, [wide[..., SIZE // 2 : SIZE // 2 + SIZE]], settings)
    assert torch.equal(from_wide.tokens, from_square.tokens)
    with pytest.raises(ValueError, match=r"reference 0 is drawn at 24x24 pixels, but FLUX reads 2x2 latent patches of 16 pixels"):
        reference_groups(aligngen, pipe.vae, pipe.transformer, [wide], AlignGenSettings(reference_size=24))
    txt, pooled, references, redux = tensors(1)
    from PIL import Image

    with pytest.raises(TypeError, match="reference 0 is a Image: give a tensor"):
        aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, ONE, [Image.new("RGB", (SIZE, SIZE))], redux)
    for bad, message in ((redux[0][:, :0], "R at least 1"), (redux[0] * float("nan"), "NaN or infinite")):
        with pytest.raises(ValueError, match=message):
            aligngen_inputs(aligngen, pipe.vae, pipe.transformer, txt, pooled, ONE, references, [bad])


def test_the_prompt_is_encoded_with_s_star_before_each_concept(toy_flux):
    """Placeholder ids at each S* position, the word right after it (`token_span`); T5 reads the placeholder text,
    CLIP the prompt as written, both bit-identical to the encoders run on those texts."""
    prompt = "a red star to the left of a blue circle on grass"
    encoded = encode_prompt(toy_flux, prompt, ["circle", "star"])
    tokenizer = toy_flux.t5_tokenizer
    ids = tokenize(tokenizer, [encoded.t5_text], toy_flux.max_length)[0]
    assert encoded.t5_text == f"a red {PLACEHOLDER} star to the left of a blue {PLACEHOLDER} circle on grass"
    for concept, word, occurrence in zip(encoded.concepts, ["circle", "star"], [0, 0]):
        assert ids[concept.s_star] == tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        assert list(concept.span) == token_span(tokenizer, encoded.t5_text, word, occurrence, toy_flux.max_length)
        assert concept.span[0] == concept.s_star + 1
    clip_ids = tokenize(toy_flux.clip_tokenizer, [prompt])
    txt, pooled = encode_flux_ids(toy_flux.t5, toy_flux.clip, ids[None], clip_ids, toy_flux.clip_tokenizer.eos_token_id)
    assert torch.equal(encoded.txt, txt) and torch.equal(encoded.pooled, pooled)
    plain = encode_prompt(toy_flux, prompt, ["circle"], s_star=False)  # the ablation without S*: the prompt as written
    assert plain.t5_text == prompt and plain.concepts == [ConceptTokens(tuple(token_span(tokenizer, prompt, "circle")))]


def test_prepare_generates_with_two_subjects_and_refuses_bad_input(toy_flux, tmp_path):
    transformer = toy_flux.transformer
    aligngen = randomized(AlignGen(AlignGenConfig.for_transformer(transformer), transformer), std=0.02)
    d = aligngen.config.dim
    reference, redux = torch.rand(1, 3, 64, 64), torch.randn(1, 9, d)
    settings = AlignGenSettings(reference_size=64)
    out = prepare(toy_flux, aligngen, "a red star and a blue circle", ["star", "circle"], [reference, reference.flip(-1)], [redux, redux], settings)
    images = toy_flux.generate(**out.generate_kwargs(), steps=2, seed=1, progress=False)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert [g.name for g in out.extra] == ["ref0", "ref1"] and torch.equal(out.extra[0].ids, out.extra[1].ids)
    # the paper: reference ids never overlap the image's. Left of column 0 by default (any image size);
    # "right" (files trained before the setting) starts at the reference's width w = 64 px / (4 · 2) = 8 tokens
    columns = {shift: reference_groups(aligngen, toy_flux.vae, transformer, [reference], AlignGenSettings(reference_size=64, reference_shift=shift))[0].ids[0, :, 2]
               for shift in ("left", "right")}  # fmt: skip
    assert (columns["left"].min(), columns["left"].max()) == (-8, -1) and (columns["right"].min(), columns["right"].max()) == (8, 15)

    with pytest.raises(ValueError, match="'guitar' is not in the prompt"):
        prepare(toy_flux, aligngen, "a red star", ["guitar"], [reference], [redux], settings)
    with pytest.raises(ValueError, match="2 concept.* but 1 reference image"):
        prepare(toy_flux, aligngen, "a red star and a blue circle", ["star", "circle"], [reference], [redux], settings)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(toy_flux, aligngen, "a red star", ["star"], [tmp_path / "missing.png"], [redux], settings)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        prepare(toy_flux, aligngen, "a red star", ["star"], [broken], [redux], settings)
    image = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    from_file = prepare(toy_flux, aligngen, "a red star", ["star"], [image], [redux], settings)
    assert from_file.extra[0].tokens.shape[1] == 64  # 64 px / 4 (toy VAE) / 2 (patches): 8 x 8 tokens


def test_a_seeded_generator_gives_the_same_initial_weights(tiny):
    """The DEM's layers drew from torch's global RNG (only the LoRA took the generator), so two runs of
    train_aligngen.py with one --seed started from other weights (63 of 65 tensors differed)."""
    pipe, _ = tiny
    config = AlignGenConfig.for_transformer(pipe.transformer)
    first = AlignGen(config, pipe.transformer, generator=torch.Generator().manual_seed(3)).state_dict()
    torch.manual_seed(123)  # the global stream must not matter
    second = AlignGen(config, pipe.transformer, generator=torch.Generator().manual_seed(3)).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = AlignGen(config, pipe.transformer, generator=torch.Generator().manual_seed(4)).state_dict()
    assert not torch.equal(first["dem.self_attn.to_q.weight"], other["dem.self_attn.to_q.weight"])
