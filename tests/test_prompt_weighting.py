"""Long and weighted prompts (minigen/text/weighting.py), AUTOMATIC1111's syntax and chunking, and token spans in it."""

from functools import partial

import pytest
import torch

from minigen.text.encoders import TextEncoderConfig, build_text_encoder, encode_sd1, encode_sdxl
from minigen.text.spans import token_span, token_spans
from minigen.text.tokenizer import load_clip_tokenizer, tokenize
from minigen.text.weighting import (
    BREAK,
    chunk_count,
    encode_sd1_weighted,
    encode_sdxl_weighted,
    parse_prompt_attention,
    prompt_chunks,
)

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
TINY_CLIP_L = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4, hidden_act="quick_gelu")
TINY_BIGG = TextEncoderConfig(hidden_size=64, intermediate_size=80, num_layers=4, num_heads=4, hidden_act="gelu", projection_dim=48)
BOS, EOS, COMMA = 49406, 49407, 267
# one token each in CLIP's vocabulary (checked in `words`)
WORDS = "red cat dog blue house tree green car sky moon sun fish bird road hill lake star rock wall door".split()


@pytest.fixture
def tokenizers(shared_hf):
    return load_clip_tokenizer(shared_hf / SDXL / "tokenizer"), load_clip_tokenizer(shared_hf / SDXL / "tokenizer_2")


@pytest.fixture(scope="module")
def encoders():
    """Tiny random encoders with random LayerNorm gains and biases: a fresh model's zero biases make
    the final-normed states' mean exactly 0 (trained CLIP's is not), where restoring the mean divides by 0."""
    torch.manual_seed(0)
    models = build_text_encoder(TINY_CLIP_L), build_text_encoder(TINY_BIGG)
    with torch.no_grad():
        for norm in (m for model in models for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.copy_(1 + 0.1 * torch.randn_like(norm.weight))
            norm.bias.copy_(0.1 + 0.1 * torch.randn_like(norm.bias))
    return models


def words(tokenizer, n: int, start: int = 0) -> list[str]:
    chosen = [WORDS[(start + i) % len(WORDS)] for i in range(n)]
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in set(chosen))
    return chosen


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- parsing

A1111_DOCSTRING = [  # every example of A1111's parse_prompt_attention docstring (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
         (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    ),
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING)
def test_parse_matches_a1111_docstring(text, expected):
    """Reference: the input -> output pairs of A1111's parse_prompt_attention doctest, written out here.
    Tolerance: exact equality, floats included (the doctest prints them to the last bit)."""
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),  # the keyword swallows the spaces around it
        ("BREAKFAST", [("BREAKFAST", 1.0)]),  # a whole word only
        ("a break b", [("a break b", 1.0)]),  # in capitals only
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # minigen: a BREAK in brackets still breaks
        ("(cat: 1.3 ) x", [("cat", 1.3), (" x", 1.0)]),  # spaces around the number
        ("[[cat]]", [("cat", 1 / 1.1 * (1 / 1.1))]),
        ("((cat:2))", [("cat", 2 * 1.1)]),
        ("cat) dog]", [("cat) dog]", 1.0)]),  # closers with nothing open are text
        ("cat:1.2) x", [("cat:1.2) x", 1.0)]),  # a weight with no ( open is text
        ("(a:b)", [("a:b", 1.1)]),  # a colon without a number is text
        ("a\\b \\\\", [("ab \\", 1.0)]),  # a lone backslash vanishes, \\ is one backslash
        ("", [("", 1.0)]),
        ("[a (b] c)", [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1)), (" c", 1.1)]),  # ] closes the [ though ( is open
    ],
)
def test_parse_rules(text, expected):
    """Reference: A1111's rules (its docstring and re_attention / re_break), expected values written by
    hand; floats compared to 1e-12 (products of the same factors, possibly in another order)."""
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], abs=1e-12)


def test_bad_weight_is_refused():
    with pytest.raises(ValueError, match=r"weight '1\.2\.3' .* is not a number"):
        parse_prompt_attention("(cat:1.2.3)")


# ---------------------------------------------------------------- chunking


def test_short_prompt_chunk_is_tokenize(tokenizers):
    """Reference: minigen.text.tokenizer.tokenize (the plain path). Exact: same ids, both paddings."""
    for tok in tokenizers:  # CLIP-L pads with EOS, bigG with 0
        prompt = "a photo of a Cat, sitting wow!!"
        ids, weights = prompt_chunks(tok, prompt)
        assert torch.equal(ids, tokenize(tok, prompt)) and torch.equal(weights, torch.ones(1, 77))


def test_long_prompt_is_cut_every_75_tokens(tokenizers):
    tok = tokenizers[0]
    prompt = " ".join(words(tok, 160))
    ids, _ = prompt_chunks(tok, prompt)
    body = ids_of(tok, prompt)
    assert ids.shape == (3, 77) and chunk_count(tok, prompt) == 3
    assert ids[0].tolist() == [BOS, *body[:75], EOS]
    assert ids[1].tolist() == [BOS, *body[75:150], EOS]
    assert ids[2].tolist() == [BOS, *body[150:], EOS] + [EOS] * 65


@pytest.mark.parametrize("comma_at, cut", [(60, 61), (55, 56), (54, 75), (74, 75), (75, 75)])
def test_a_chunk_ends_at_a_comma_in_its_last_20_tokens(tokenizers, comma_at, cut):
    """Reference: A1111's comma padding backtrack (20): a chunk that fills up ends after its last comma
    if that comma is one of its last 20 tokens (indices 55..74), and the words after it open the next
    chunk. `comma_at`: the comma's index among the prompt's tokens; `cut`: tokens in chunk 0."""
    tok = tokenizers[0]
    body = words(tok, comma_at) + [","] + words(tok, 100 - comma_at, start=3)
    prompt = " ".join(body)
    tokens = ids_of(tok, prompt)
    assert tokens[comma_at] == COMMA and len(tokens) == 101
    ids, _ = prompt_chunks(tok, prompt)
    assert ids[0].tolist() == [BOS, *tokens[:cut], EOS] + [EOS] * (75 - cut)
    assert ids[1, 1 : 1 + 101 - cut].tolist() == tokens[cut:]


def test_break_ends_the_chunk(tokenizers):
    tok = tokenizers[1]
    ids, _ = prompt_chunks(tok, "a cat BREAK a dog BREAK")  # a BREAK at the end opens no empty chunk
    assert ids.tolist() == tokenize(tok, ["a cat", "a dog"]).tolist()
    ids, _ = prompt_chunks(tok, "BREAK a dog")  # at the start it leaves an empty chunk, as A1111
    assert ids.tolist() == tokenize(tok, ["", "a dog"]).tolist()


def test_weights_follow_their_tokens(tokenizers):
    tok = tokenizers[0]
    ids, weights = prompt_chunks(tok, "a (red cat:1.5), [[dog]] (photorealistic)")
    tokens = tok.convert_ids_to_tokens(ids[0, :9].tolist())
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "cat</w>", ",</w>", "dog</w>", "photo", "realistic</w>", "<|endoftext|>"]
    assert weights[0, :9].tolist() == pytest.approx([1, 1, 1.5, 1.5, 1, 1 / 1.21, 1.1, 1.1, 1])
    assert (weights[0, 9:] == 1).all()


def test_a_multi_vector_word_is_never_split(tokenizers):
    """Reference: A1111 moves a whole textual-inversion embedding to the next chunk when it does not fit."""
    tok = tokenizers[0]
    tok.add_tokens(["<x>", "<x>_1", "<x>_2"])
    x = tok.convert_tokens_to_ids(["<x>", "<x>_1", "<x>_2"])
    ids, _ = prompt_chunks(tok, " ".join(words(tok, 73)) + " <x> <x>_1 <x>_2 cat")
    assert ids[0, 74:].tolist() == [EOS] * 3  # 73 words, then padding: 3 vectors do not fit in 2 places
    assert ids[1, 1:5].tolist() == [*x, 2368]
    ids, _ = prompt_chunks(tok, " ".join(words(tok, 74)) + " <x>_1 <x>_2")  # not the group's start: no group
    assert ids[0, 75].item() == x[1] and ids[1, 1].item() == x[2]


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_plain_short_prompt_is_encode_sd1(tokenizers, encoders, clip_skip):
    """Invariant: without weights and within 75 tokens, the weighted path is encode_sd1 (reference,
    itself checked against diffusers in test_text.py). Tolerance 1e-6; measured 0 (bit-identical)."""
    prompts = ["a photo of a Cat, sitting", "an astronaut riding a horse on mars"]
    with torch.no_grad():
        ours = encode_sd1_weighted(encoders[0], tokenizers[0], prompts, clip_skip)
        reference = encode_sd1(encoders[0], tokenizers[0], prompts, clip_skip)
    assert ours.shape == (2, 77, 32)
    assert (ours - reference).abs().max() <= 1e-6
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_plain_short_prompt_is_encode_sdxl(tokenizers, encoders, clip_skip):
    """Invariant, as above, against encode_sdxl (context and pooled). Tolerance 1e-6; measured 0."""
    prompts = ["a photo of a Cat, sitting wow!!", "an astronaut riding a horse on mars"]
    with torch.no_grad():
        context, pooled = encode_sdxl_weighted(encoders[0], tokenizers[0], encoders[1], tokenizers[1], prompts, clip_skip)
        ref_context, ref_pooled = encode_sdxl(encoders[0], tokenizers[0], encoders[1], tokenizers[1], prompts, clip_skip)
    assert context.shape == (2, 77, 96) and pooled.shape == (2, 48)
    assert (context - ref_context).abs().max() <= 1e-6 and (pooled - ref_pooled).abs().max() <= 1e-6
    assert torch.equal(context, ref_context) and torch.equal(pooled, ref_pooled)


def mean_restored(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis written from its description: z *= w; z *= mean(z) / mean(z * w)."""
    weighted = z * weights[:, :, None]
    return weighted * (z.mean() / weighted.mean())


def test_weighted_tokens_sd1(tokenizers, encoders):
    """Reference: encode_sd1 of the same words without syntax, times the weights, times the
    mean-restore factor recomputed here. Tolerance 1e-6 (values ~1)."""
    tok, te = tokenizers[0], encoders[0]
    with torch.no_grad():
        ours = encode_sd1_weighted(te, tok, "a (red cat:1.5) on [a mat]")
        plain = encode_sd1(te, tok, "a red cat on a mat")
    weights = torch.ones(1, 77)
    weights[0, 2:4], weights[0, 5:7] = 1.5, 1 / 1.1
    reference = mean_restored(plain, weights)
    assert (ours - reference).abs().max() <= 1e-6
    assert (ours - plain).abs().max() > 0.1  # the weights did something
    assert ours.mean().item() == pytest.approx(plain.mean().item(), abs=1e-6)


def test_weighted_tokens_sdxl(tokenizers, encoders):
    """Reference: encode_sdxl without syntax; each encoder's half weighted and mean-restored on its
    own (A1111 runs each SDXL embedder separately); pooled unweighted. Tolerance 1e-6."""
    with torch.no_grad():
        context, pooled = encode_sdxl_weighted(encoders[0], tokenizers[0], encoders[1], tokenizers[1], "a ((red)) cat")
        plain, plain_pooled = encode_sdxl(encoders[0], tokenizers[0], encoders[1], tokenizers[1], "a red cat")
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.1 * 1.1
    reference = torch.cat([mean_restored(plain[..., :32], weights), mean_restored(plain[..., 32:], weights)], dim=-1)
    assert (context - reference).abs().max() <= 1e-6
    assert (pooled - plain_pooled).abs().max() <= 1e-6


def test_long_prompt_sd1(tokenizers, encoders):
    """A 100-token prompt gives 154 positions; reference for each chunk: encode_sd1 of its 75 / 25 words.
    Tolerance 1e-6; measured 0."""
    tok, te = tokenizers[0], encoders[0]
    body = words(tok, 100)
    with torch.no_grad():
        ours = encode_sd1_weighted(te, tok, " ".join(body))
        first = encode_sd1(te, tok, " ".join(body[:75]))
        second = encode_sd1(te, tok, " ".join(body[75:]))
    assert ours.shape == (1, 154, 32)
    assert (ours[:, :77] - first).abs().max() <= 1e-6 and (ours[:, 77:] - second).abs().max() <= 1e-6


def test_long_prompt_sdxl_pools_the_first_chunk(tokenizers, encoders):
    """Reference: encode_sdxl of each chunk's words; pooled is the first chunk's (A1111). Tolerance 1e-6."""
    body = words(tokenizers[0], 100)
    with torch.no_grad():
        context, pooled = encode_sdxl_weighted(encoders[0], tokenizers[0], encoders[1], tokenizers[1], " ".join(body))
        first, first_pooled = encode_sdxl(encoders[0], tokenizers[0], encoders[1], tokenizers[1], " ".join(body[:75]))
        second, _ = encode_sdxl(encoders[0], tokenizers[0], encoders[1], tokenizers[1], " ".join(body[75:]))
    assert context.shape == (1, 154, 96) and pooled.shape == (1, 48)
    assert (context[:, :77] - first).abs().max() <= 1e-6 and (context[:, 77:] - second).abs().max() <= 1e-6
    assert (pooled - first_pooled).abs().max() <= 1e-6


def test_min_chunks_pads_with_the_empty_prompt(tokenizers, encoders):
    """Cond and negative must end with as many chunks: the shorter gets chunks of "" (reference:
    encode_sd1 / encode_sdxl of ""). A batch is padded to its longest prompt. Tolerance 1e-6."""
    tok, te = tokenizers[0], encoders[0]
    long_prompt = " ".join(words(tok, 100))
    k = chunk_count(tok, [long_prompt, ""])
    assert k == 2 and chunk_count(tok, "") == 1
    with torch.no_grad():
        negative = encode_sd1_weighted(te, tok, "", min_chunks=k)
        batch = encode_sd1_weighted(te, tok, ["a cat", long_prompt])
        empty, cat = encode_sd1(te, tok, ""), encode_sd1(te, tok, "a cat")
        context, _ = encode_sdxl_weighted(encoders[0], tok, encoders[1], tokenizers[1], "a cat", min_chunks=3)
        empty_xl, _ = encode_sdxl(encoders[0], tok, encoders[1], tokenizers[1], "")
    assert negative.shape == (1, 154, 32) and batch.shape == (2, 154, 32) and context.shape == (1, 231, 96)
    assert (negative[:, 77:] - empty).abs().max() <= 1e-6
    assert (batch[:1, :77] - cat).abs().max() <= 1e-6 and (batch[:1, 77:] - empty).abs().max() <= 1e-6
    assert (context[:, 77:154] - empty_xl).abs().max() <= 1e-6 and (context[:, 154:] - empty_xl).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="min_chunks must be at least 1"):
        encode_sd1_weighted(te, tok, "a cat", min_chunks=0)


def test_a_prompt_does_not_depend_on_its_batch(tokenizers, encoders):
    """minigen restores the mean per prompt (A1111: over the batch), so a prompt's embedding is the same
    alone or in a batch. Reference: each prompt encoded alone. Tolerance 1e-6."""
    tok, te = tokenizers[0], encoders[0]
    prompts = ["a (red:1.4) cat", "[[a dog]] on (grass)"]
    with torch.no_grad():
        batch = encode_sd1_weighted(te, tok, prompts)
        alone = torch.cat([encode_sd1_weighted(te, tok, p) for p in prompts])
    assert (batch - alone).abs().max() <= 1e-6


def test_a_fresh_encoder_with_zero_mean_states_stays_finite(tokenizers):
    """A fresh model's final-normed states have mean 0: unweighted chunks are left exactly as encoded
    (no 0 / 0). Reference: encode_sd1 of each chunk's words; exact equality."""
    te, tok = build_text_encoder(TINY_CLIP_L), tokenizers[0]
    body = words(tok, 80)
    with torch.no_grad():
        ours = encode_sd1_weighted(te, tok, " ".join(body))
        reference = torch.cat([encode_sd1(te, tok, " ".join(body[:75])), encode_sd1(te, tok, " ".join(body[75:]))], dim=1)
    assert torch.equal(ours, reference)


def test_sdxl_encoders_that_chunk_apart_get_as_many_chunks(tokenizers, encoders):
    """bigG's tokenizer reads each "!" as its own token (diffusers' pad-token quirk), CLIP-L's "!!!!" as
    one: a prompt can take 2 chunks in one and 1 in the other. The shorter gets an empty chunk.
    Reference: encode_sdxl's CLIP-L half of "" for that chunk. Tolerance 1e-6."""
    tok_1, tok_2 = tokenizers
    prompt = " ".join(words(tok_1, 70)) + " " + "!" * 12
    assert chunk_count(tok_1, prompt) == 1 and chunk_count(tok_2, prompt) == 2
    with torch.no_grad():
        context, _ = encode_sdxl_weighted(encoders[0], tok_1, encoders[1], tok_2, prompt)
        empty, _ = encode_sdxl(encoders[0], tok_1, encoders[1], tok_2, "")
    assert context.shape == (1, 154, 96)
    assert (context[:, 77:, :32] - empty[..., :32]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="min_chunks must be at least 1"):
        encode_sdxl_weighted(encoders[0], tok_1, encoders[1], tok_2, "a cat", min_chunks=0)


@pytest.mark.parametrize("prompt", ["a cat AND a dog", "a [cat:dog:0.5] on grass", "[cat|dog]", "[cat::0.3]", "a [cat: 10] rug"])
def test_a1111_prompt_editing_and_and_are_refused(prompt):
    """Read as plain text, `a cat AND a dog` was one prompt with the word AND and `[cat:dog:0.5]` the text
    "cat:dog:0.5" at weight 1/1.1: A1111's composable AND and prompt editing changed meaning without a word."""
    tok = load_clip_tokenizer()
    with pytest.raises(ValueError, match="A1111's prompt editing, alternation and AND change the prompt during sampling"):
        prompt_chunks(tok, prompt)


def test_text_that_only_looks_like_prompt_editing_is_read():
    tok = load_clip_tokenizer()
    for prompt in (r"a \[cat:0.5\] sign", "a (cat:1.3) and [dog], 10:30", "ANDROID [a b c]", "a sign [note: ...]", "[abc:.]"):  # no digit: text
        ids, _ = prompt_chunks(tok, prompt)
        assert ids.shape == (1, 77)


# ---------------------------------------------------------------- token spans in the a1111 syntax


def at(tokenizer, prompt: str, positions: list[int]) -> list[int]:
    """The ids the encoder reads at context positions of `prompt`'s chunks, concatenated (chunk k: k·77 .. k·77 + 76)."""
    return prompt_chunks(tokenizer, prompt)[0].flatten()[positions].tolist()


def test_a1111_spans_are_positions_in_the_concatenated_chunks(tokenizers):
    """Hand-computed from the chunk layout: chunk 0 is [BOS, a, red, cat, ",", EOS ...] (positions 0..76),
    chunk 1 (after BREAK) [BOS, a, dog, EOS ...] from 77; the ids at the returned positions are the phrase's."""
    prompt = "a (red:1.3) cat, BREAK a [dog]"
    for tok in tokenizers:
        assert token_span(tok, prompt, "red cat", syntax="a1111") == [2, 3]
        assert token_span(tok, prompt, "dog", syntax="a1111") == [79]
        assert token_spans(tok, prompt, "a", syntax="a1111") == [[1], [78]]
        assert token_span(tok, prompt, "a", occurrence=1, syntax="a1111") == [78]
        for phrase, span in (("red cat", [2, 3]), ("dog", [79]), ("a", [78])):
            assert at(tok, prompt, span) == ids_of(tok, phrase)
        assert token_spans(tok, prompt, "red", syntax="plain") == [[3]]  # the plain syntax reads "(" first


def test_a1111_span_in_the_second_chunk_and_across_the_boundary(tokenizers):
    """75 tokens fill chunk 0 (positions 1..75); token i >= 75 sits at 77 + 1 + (i - 75). 90 words, then the
    phrase: tokens 90, 91 -> 93, 94. 74 words: "purple" is token 74 (position 75), "zebra" token 75, the first
    of chunk 1 (position 78): the span skips chunk 0's EOS and chunk 1's BOS."""
    tok = tokenizers[0]
    far = " ".join(words(tok, 90)) + " (purple:1.2) zebra"
    assert token_span(tok, far, "purple zebra", syntax="a1111") == [93, 94]
    assert at(tok, far, [93, 94]) == ids_of(tok, "purple zebra")
    across = " ".join(words(tok, 74)) + " purple zebra"
    assert token_span(tok, across, "purple zebra", syntax="a1111") == [75, 78]
    assert at(tok, across, [75, 78]) == ids_of(tok, "purple zebra")
    with pytest.raises(ValueError, match=r"positions 91\.\.92 .*reads only positions 1\.\.75"):  # the plain syntax cuts it off
        token_span(tok, far.replace("(purple:1.2)", "purple"), "purple zebra")


def test_a1111_spans_match_whole_words_of_the_parsed_text(tokenizers):
    """CLIP gives each digit a word: "3" stands in "(1930)", and in "(19)30" the piece "30" holds it ("3" "0"
    glued in the text). "realistic" is the tail of "photorealistic" inside brackets too. A word split by a
    bracket is tokenized as two pieces, so the encoder reads two words: "(red)dish" is "red" and "dish"
    ("dish" was refused, and the error listed "reddish", which is not found either)."""
    tok = tokenizers[0]
    assert token_spans(tok, "a photo from (1930) with 3 cats", "3", syntax="a1111") == [[9]]
    assert token_spans(tok, "a (19)30 and 3 cats", "3", syntax="a1111") == [[7]]
    assert token_span(tok, "a (red)dish", "dish", syntax="a1111") == [3]
    assert token_span(tok, "a (red)dish", "red dish", syntax="a1111") == [2, 3]
    with pytest.raises(ValueError, match=r"a word split by a bracket is two words\)\. The prompt's words: \['a', 'red', 'dish'\]"):
        token_span(tok, "a (red)dish", "reddish", syntax="a1111")
    assert token_spans(tok, "a (photorealistic) cat", "realistic", syntax="a1111") == []
    assert token_spans(tok, "a (photorealistic) cat", "photorealistic", syntax="a1111") == [[2, 3]]
    assert token_spans(tok, "a cat BREAK dog", "cat dog", syntax="a1111") == [[2, 78]]  # in reading order, across the BREAK


def test_a1111_spans_of_a_prompt_without_brackets_are_the_plain_ones(tokenizers):
    """Hand-computed in tests/test_text.py's test_token_span_positions: the same prompt, the same positions."""
    prompt = "a photorealistic Cat, on a mat next to a CAT"
    for tok in tokenizers:
        for phrase, spans in (("a", [[1], [7], [11]]), ("photorealistic", [[2, 3]]), ("cat", [[4], [12]]), ("on a mat", [[6, 7, 8]])):
            assert token_spans(tok, prompt, phrase, syntax="a1111") == token_spans(tok, prompt, phrase) == spans


def test_a1111_spans_write_out_multi_vector_words_and_keep_them_whole(tokenizers):
    """A 3-vector word <x> is written out before parsing; 73 words leave 2 places in chunk 0, so its 3
    vectors open chunk 1 (positions 78, 79, 80) and "cat" follows at 81."""
    tok = tokenizers[0]
    tok.add_tokens(["<x>", "<x>_1", "<x>_2"])
    assert token_span(tok, "a (<x>:1.2) cat", "<x>", syntax="a1111") == [2, 3, 4]
    prompt = " ".join(words(tok, 73)) + " <x> cat"
    assert token_span(tok, prompt, "<x> cat", syntax="a1111") == [78, 79, 80, 81]
    written = prompt.replace("<x>", "<x> <x>_1 <x>_2")  # as the pipelines write it out before encoding
    assert at(tok, written, [78, 79, 80, 81]) == tok.convert_tokens_to_ids(["<x>", "<x>_1", "<x>_2"]) + ids_of(tok, "cat")


def test_sdxl_spans_must_agree_for_both_text_encoders(tokenizers):
    """SDXL joins its two encoders' contexts channel by channel; diffusers' second tokenizer reads "!" as a token of
    its own ("wow!!!": wow ! ! ! against CLIP-L's wow !!!), so "cat" sits at 5 for one and 7 for the other, and the
    first tokenizer's positions named other tokens in the second half of the context. A prompt_2 is what the second
    encoder reads: the phrase must sit at the same place in it."""
    from minigen.text.spans import same_for_every_encoder

    for syntax in ("plain", "a1111"):
        find = partial(token_span, phrase="cat", syntax=syntax)
        with pytest.raises(ValueError, match=r"'cat' sits at token positions \[\d+\] for the first text encoder but at \[\d+\] .* without '!'"):
            same_for_every_encoder(tokenizers, "wow!!! a (red:1.2) cat", None, find, "the phrase 'cat'")
    find = partial(token_span, phrase="cat", syntax="a1111")
    assert same_for_every_encoder(tokenizers, "wow, a (red:1.2) cat", None, find, "the phrase 'cat'") == [5]  # [BOS, wow, ",", a, red, cat]
    assert same_for_every_encoder(tokenizers, "a red cat", "a blue cat", find, "the phrase 'cat'") == [3]
    with pytest.raises(ValueError, match=r"at token positions \[3\] for the first text encoder but at \[4\] .*prompt_2 names it elsewhere"):
        same_for_every_encoder(tokenizers, "a red cat", "a big blue cat", find, "the phrase 'cat'")
    with pytest.raises(ValueError, match="this pipeline has one text encoder: drop prompt_2"):  # was read by no encoder, silently
        same_for_every_encoder(tokenizers[:1], "a red cat", "a blue cat", find, "the phrase 'cat'")


def test_sd_concepts_and_sample_lag_ask_both_sdxl_encoders(tokenizers, monkeypatch):
    """sd_concepts and sample.py's --lag took positions from the first tokenizer only (an SDXL pipeline stands in:
    its two tokenizers, the reference tokens stubbed)."""
    import sys
    from types import SimpleNamespace

    from conftest import REPO
    from minigen.methods import conceptrol

    sys.path.insert(0, str(REPO / "scripts"))
    import sample

    pipe = SimpleNamespace(tokenizers=tokenizers)
    monkeypatch.setattr(conceptrol, "preprocess_clip", lambda image, size: None)
    monkeypatch.setattr(conceptrol, "reference_tokens", lambda adapter, encoder, pixels: (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)))
    encoder = SimpleNamespace(config=SimpleNamespace(image_size=224))
    [concept] = conceptrol.sd_concepts(pipe, None, encoder, "a red cat", [(None, "cat")], prompt_2="a blue cat")
    assert list(concept.span) == [3]
    with pytest.raises(ValueError, match=r"the phrase 'cat' sits at token positions \[4\] for the first text encoder but at \[6\]"):
        conceptrol.sd_concepts(pipe, None, encoder, "wow!!! a cat", [(None, "cat")])
    with pytest.raises(ValueError, match="prompt_2 names it elsewhere"):
        conceptrol.sd_concepts(pipe, None, encoder, "a red cat", [(None, "cat")], prompt_2="a big blue cat")
    residuals = SimpleNamespace(identifier="sks", macro_class="dog")
    options = SimpleNamespace(lag=True, prompt="wow!!! a sks dog", prompt_2="", lag_quantile=0.5)
    with pytest.raises(ValueError, match=r"the concept 'sks dog' sits at token positions \[4, 5\] for the first text encoder but at \[6, 7\]"):
        sample.residual_controls(pipe, options, [(residuals, 1.0)], "plain")


def test_last_read_position_checks_its_syntax(tokenizers):
    from minigen.text.spans import last_read_position

    assert last_read_position(tokenizers[0]) == 75 and last_read_position(tokenizers[0], syntax="a1111") is None
    with pytest.raises(ValueError, match="prompt syntax must be 'plain' or 'a1111'.*got 'A1111'"):
        last_read_position(tokenizers[0], syntax="A1111")  # read as plain: 75


def test_a1111_span_refusals(tokenizers, shared_hf):
    from minigen.text.t5 import load_t5_tokenizer

    tok = tokenizers[0]
    with pytest.raises(ValueError, match="prompt syntax must be 'plain' or 'a1111'.*got 'comfy'"):
        token_spans(tok, "a cat", "cat", syntax="comfy")
    with pytest.raises(ValueError, match="prompt syntax must be 'plain' or 'a1111'.*got 'A1111'"):
        token_span(tok, "a cat", "cat", syntax="A1111")  # last_read_position read it as plain
    with pytest.raises(ValueError, match="max_length=77 is where a plain prompt is cut.*drop max_length"):
        token_span(tok, "a cat", "cat", max_length=77, syntax="a1111")
    with pytest.raises(ValueError, match="A1111's prompt editing"):
        token_span(tok, "a [cat:dog:0.5]", "cat", syntax="a1111")
    with pytest.raises(ValueError, match=r"without brackets, weights or BREAK .*\. The prompt's words: \['a', 'red', 'cat'\]"):
        token_span(tok, "a (red:1.3) cat", "(red:1.3)", syntax="a1111")
    t5 = load_t5_tokenizer(shared_hf / "black-forest-labs/FLUX.1-dev/tokenizer_2")
    with pytest.raises(ValueError, match="A1111's prompt syntax reads prompts with CLIP's BPE tokenizer.*T5's reads prompts in the plain syntax only"):
        token_span(t5, "a cat", "cat", syntax="a1111")
