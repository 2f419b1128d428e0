"""CLIP tokenizers for SD1.x and SDXL, available offline, and the fixed 77-token prompt layout.

Every CLIP text encoder in Stable Diffusion reads exactly 77 token ids:

    [<|startoftext|>, up to 75 prompt tokens, <|endoftext|>, padding ...]
     position 0       positions 1..75          first EOS     up to 76

Two sources give the same byte-level BPE vocabulary (49408 entries):

- a diffusers model folder's ``tokenizer/`` or ``tokenizer_2/`` (``vocab.json`` + ``merges.txt``), whose
  config files also say what padding token to use;
- OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, which the ``open_clip_torch`` wheel ships. It holds only
  the merge list; the vocabulary is rebuilt from it exactly as OpenAI's ``simple_tokenizer.py`` does.

The padding token differs between SDXL's two encoders, and it changes the encoder's output at the
padded positions: CLIP-L (SD1.x, SDXL encoder 1) pads with ``<|endoftext|>`` (id 49407), while
OpenCLIP ViT-bigG (SDXL encoder 2) pads with id 0, which is the token ``!``.

One quirk follows from diffusers' ``tokenizer_2`` declaring ``!`` its padding token: the tokenizer
then treats ``!`` as a special token, so "wow!!" gives ids [wow, 0, 0] where OpenCLIP's own
tokenizer (used to train SDXL) gives [wow, "!!</w>"]. Loading that folder reproduces diffusers.

Text is cleaned before BPE as OpenAI's and OpenCLIP's tokenizers clean it (``ftfy.fix_text``, then
``html.unescape``), which transformers 5's CLIPTokenizer no longer does: the encoders were trained on
cleaned text. minigen does what those steps do to prompts people type (``CLEANUP``: curly quotes made
straight, full-width letters, digits and punctuation made ASCII, Latin ligatures spelled out, common HTML
entities read), in the tokenizer's own normalizer, so every use (spans and offsets too) sees the same
text. "a dog’s portrait, “cinematic” lighting" then tokenizes as "a dog's portrait, "cinematic" lighting" (9 tokens, 13 without).
"""

from __future__ import annotations

import gzip
import importlib.util
import warnings
from pathlib import Path

import torch
from tokenizers import normalizers
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

MAX_LENGTH = 77  # BOS + 75 prompt tokens + EOS
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
OPEN_CLIP_PAD = "!"  # id 0: OpenCLIP pads with zeros, and id 0 is "!"
BUNDLED_BPE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary size, minus 256 bytes and the 2 special tokens

# ftfy.fix_text's uncurl_quotes, fix_latin_ligatures and fix_character_width, and html.unescape of the
# entities prompts carry (copied from web pages), as replacements made before BPE ("&amp;" first: "&amp;lt;"
# becomes "<", as open_clip's unescape, twice, makes it).
CLEANUP = {
    **{quote: "'" for quote in "‘’‚‛"}, **{quote: '"' for quote in "“”„‟"},
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st",
    **{chr(code): chr(code - 0xFEE0) for code in range(0xFF01, 0xFF5F)}, "\u3000": " ",  # full-width forms
    "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&#x27;": "'", "&apos;": "'", "&nbsp;": " ",
}  # fmt: skip


def load_clip_tokenizer(source: str | Path | None = None, *, pad_token: str | None = None) -> CLIPTokenizer:
    """Return a CLIP tokenizer with ``model_max_length == 77``.

    source:
        - a tokenizer folder holding ``vocab.json`` and ``merges.txt`` or a ``tokenizer.json``
          (e.g. ``<sdxl>/tokenizer_2``):
          its ``special_tokens_map.json`` / ``tokenizer_config.json`` decide the padding token;
        - a ``bpe_simple_vocab_16e6.txt.gz`` file;
        - None: the copy of that file inside the installed ``open_clip_torch`` package.
    pad_token: overrides the padding token. Without a folder config it defaults to ``<|endoftext|>``
        (CLIP-L); pass ``OPEN_CLIP_PAD`` (``"!"``) for SDXL's second encoder.
    """
    if source is None:
        source = _bundled_bpe_path()
    source = Path(source)
    if source.is_file() and source.name.endswith(".txt.gz"):
        vocab, merges = _vocab_and_merges_from_bpe(source)
        return _cleaning(CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token or EOS, model_max_length=MAX_LENGTH))
    has_vocab = (source / "vocab.json").is_file() and (source / "merges.txt").is_file()
    if has_vocab or (source / "tokenizer.json").is_file():
        overrides = {} if pad_token is None else {"pad_token": pad_token}
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True, **overrides)
        tokenizer.model_max_length = MAX_LENGTH
        return _cleaning(tokenizer)
    subfolders = sorted(p.name for p in source.glob("tokenizer*") if (p / "vocab.json").is_file())
    hint = f" Pass one of its tokenizer folders: {', '.join(str(source / s) for s in subfolders)}."
    hint = hint if subfolders else ""
    raise FileNotFoundError(
        f"{source} is not a CLIP tokenizer: expected a folder with vocab.json and merges.txt "
        "(or tokenizer.json), "
        f"or a {BUNDLED_BPE} file.{hint}"
    )


def _cleaning(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """`tokenizer`, its normalizer preceded by the `CLEANUP` replacements (module docstring)."""
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([*(normalizers.Replace(a, b) for a, b in CLEANUP.items()), backend.normalizer])
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: str | list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Token ids of shape [B, max_length]: the prompt between the tokenizer's special tokens, then padding.

    CLIP (77): BOS, prompt, EOS, padding. T5 (512 or 256 for FLUX): prompt, ``</s>``, ``<pad>``.
    A longer prompt is cut so that the special tokens are kept, with a warning that says how many
    tokens, and which words, were dropped.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    special = tokenizer.num_special_tokens_to_add()  # 2 for CLIP (BOS, EOS), 1 for T5 (</s>)
    for prompt, ids in zip(prompts, tokenizer(prompts, verbose=False).input_ids):
        dropped = ids[max_length - 1 : -1]  # everything between the last kept prompt token and the end token
        if dropped:
            dropped_text = tokenizer.decode(dropped, clean_up_tokenization_spaces=False)
            warnings.warn(
                f"Prompt is {len(ids) - special} tokens long but the text encoder reads at most "
                f"{max_length - special}: dropped the last {len(dropped)} tokens ({dropped_text!r}) of {prompt!r}.",
                stacklevel=2,
            )
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch.input_ids


def _bundled_bpe_path(package: str = "open_clip") -> Path:
    """Locate open_clip's BPE merge file without importing open_clip (its import needs torchvision)."""
    spec = importlib.util.find_spec(package)
    folders = [] if spec is None or spec.submodule_search_locations is None else spec.submodule_search_locations
    for folder in folders:
        path = Path(folder) / BUNDLED_BPE
        if path.is_file():
            return path
    raise FileNotFoundError(
        "No CLIP tokenizer files found. Pass a tokenizer folder with vocab.json and merges.txt "
        "(e.g. stable-diffusion-v1-5/tokenizer, or stable-diffusion-xl-base-1.0/tokenizer_2 for SDXL's "
        f"second encoder), pass the path of a {BUNDLED_BPE} file, or `pip install --no-deps open_clip_torch` "
        "(it ships that file; --no-deps skips its torchvision requirement)."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable bytes map to themselves; the others (control characters, space, ...) are moved to the
    code points 256, 257, ... in byte order. The order of this dict is the order of the first 256
    vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    moved = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return mapping


def _vocab_and_merges_from_bpe(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocabulary from the merge list, as OpenAI's simple_tokenizer does.

    Vocabulary order: the 256 byte characters, the same with the end-of-word marker ``</w>``, one
    entry per merge (the two halves joined), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges
