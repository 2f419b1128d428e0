"""Whole FLUX runs against diffusers' FluxPipeline, and FLUX loading from folders and BFL files.

Reference: diffusers FluxPipeline (0.42) with tiny random models (transformer 2+2 blocks, a 16-channel
VAE, CLIP and T5 of width 24 and 32 with the real tokenizers from ../shared/hf), the official
FLUX.1 scheduler config, the same prompt and starting latents; 4 steps, 64x64 px, fp32.
Tolerance: max abs difference <= 1e-4 on images in [0, 1].
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from transformers import AutoTokenizer, CLIPTokenizer  # noqa: E402

from minigen.loading.detect import CheckpointError  # noqa: E402
from minigen.loading.files import config_metadata  # noqa: E402
from minigen.loading.flux import METADATA_FLUX_CONFIG, load_flux, load_flux_transformer  # noqa: E402
from minigen.loading.keymaps_flux import flux_from_diffusers  # noqa: E402
from minigen.loading.keymaps_vae import vae_from_diffusers  # noqa: E402
from minigen.pipelines.flux import FluxPipeline as MinigenFlux  # noqa: E402
from minigen.text.t5 import build_t5_encoder  # noqa: E402

from conftest import (  # noqa: E402
    TINY_FLUX,
    TINY_FLUX_VAE,
    TINY_T5,
    diffusers_vae,
    load_sample_script,
    tiny_clip,
    tiny_diffusers_flux,
)

PROMPT, NEGATIVE, SEED, SIZE, STEPS = "a large red star to the left of a small blue circle", "blurry", 3, 64, 4
TOL = 1e-4


def tiny_flux_pipeline(repo, guidance: bool) -> FluxPipeline:
    """diffusers' FluxPipeline of the tiny models: TINY_FLUX, TINY_FLUX_VAE, a 24-wide CLIP and TINY_T5,
    with the tokenizers and scheduler of the hub folder `repo`."""
    transformer = tiny_diffusers_flux(dataclasses.replace(TINY_FLUX, guidance_embed=guidance))
    vae, clip = diffusers_vae(TINY_FLUX_VAE), tiny_clip(TINY_FLUX.vec_in_dim, heads=2)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler")
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"),
        text_encoder_2=build_t5_encoder(TINY_T5), tokenizer_2=AutoTokenizer.from_pretrained(repo / "tokenizer_2"),
        transformer=transformer,
    )


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def flux_folder(request, tmp_path_factory, shared_hf):
    """A tiny FLUX diffusers folder (transformer in 3 shards) and the pipeline that wrote it."""
    repo = shared_hf / "black-forest-labs" / ("FLUX.1-dev" if request.param else "FLUX.1-schnell")
    pipe = tiny_flux_pipeline(repo, request.param)
    folder = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(folder, max_shard_size="40KB")
    return pipe, folder


def reference_images(pipe: FluxPipeline, guidance: bool, **kwargs) -> torch.Tensor:
    latents = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
    packed = FluxPipeline._pack_latents(latents, 1, 16, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        out = pipe(
            PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5 if guidance else 0.0,
            latents=packed, output_type="pt", max_sequence_length=512 if guidance else 256, **kwargs,
        )
    return out.images


def test_diffusers_folder_with_sharded_transformer_loads_and_matches_flux_pipeline(flux_folder):
    """load_flux(folder) then generate: same images as FluxPipeline (max abs diff <= 1e-4)."""
    pipe, folder = flux_folder
    guidance = pipe.transformer.config.guidance_embeds
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    ours = load_flux(folder, dtype=torch.float32)
    assert ours.max_length == ours.t5_tokenizer.model_max_length == (512 if guidance else 256)  # token_span's default: schnell's 256
    images = ours.generate(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, progress=False)
    theirs = reference_images(pipe, guidance)
    assert theirs.std() > 0.01
    assert (images - theirs).abs().max() <= TOL


@pytest.mark.parametrize("changes", [{"use_dynamic_shifting": False, "shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 1.0, "max_shift": 2.0}],
                         ids=["fixed-shift-3", "other-dynamic-shift"])
def test_a_folders_scheduler_config_sets_the_schedule(flux_folder, tmp_path, changes):
    """A fine-tune's scheduler_config.json with its own shift: FluxPipeline samples with it (<= 1e-4); minigen
    read the shift from the model kind alone (0.11 and 0.08 off)."""
    import shutil

    pipe, folder = flux_folder
    edited = shutil.copytree(folder, tmp_path / "edited")
    config = json.loads((edited / "scheduler" / "scheduler_config.json").read_text())
    (edited / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **changes}))
    theirs = FluxPipeline.from_pretrained(edited)
    ours = load_flux(edited, dtype=torch.float32)
    images = ours.generate(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, progress=False)
    assert (images - reference_images(theirs, pipe.transformer.config.guidance_embeds)).abs().max() <= TOL
    assert (images - load_flux(folder, dtype=torch.float32).generate(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=SEED, progress=False)).abs().max() > 1e-2


def test_a_scheduler_config_minigen_cannot_follow_is_refused(flux_folder, tmp_path):
    import shutil

    _, folder = flux_folder
    edited = shutil.copytree(folder, tmp_path / "edited")
    config = json.loads((edited / "scheduler" / "scheduler_config.json").read_text())
    (edited / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "use_karras_sigmas": True, "shift_terminal": 0.1}))
    with pytest.raises(CheckpointError, match=r"scheduler_config.json: scheduler options \{'shift_terminal': 0.1, 'use_karras_sigmas': True\}: minigen's flow sigmas do not take them"):
        load_flux(edited, dtype=torch.float32)


def test_true_cfg_matches_flux_pipeline(flux_folder):
    """true_cfg 2.5 with a negative prompt: two passes per step, as FluxPipeline's true_cfg_scale."""
    pipe, folder = flux_folder
    guidance = pipe.transformer.config.guidance_embeds
    ours = load_flux(folder, dtype=torch.float32)
    images = ours.generate(PROMPT, NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, true_cfg=2.5, seed=SEED, progress=False)
    theirs = reference_images(pipe, guidance, negative_prompt=NEGATIVE, true_cfg_scale=2.5)
    assert (images - theirs).abs().max() <= TOL


def test_negatives_per_image_and_what_cannot_apply(flux_folder):
    """A list of negatives, one per image, gives each image the image of its own single run (seed + k),
    within 1e-5; a negative at true_cfg 1 (guidance off), steps=0, wrong negative embeddings and arguments of
    the wrong kind are refused by name."""
    pipe, folder = flux_folder
    ours = load_flux(folder, dtype=torch.float32)
    kwargs = dict(width=SIZE, height=SIZE, steps=2, true_cfg=2.5, progress=False)
    both = ours.generate([PROMPT, "a blue box"], [NEGATIVE, "dark"], seed=SEED, **kwargs)
    assert (both[1] - ours.generate("a blue box", "dark", seed=SEED + 1, **kwargs)[0]).abs().max() <= 1e-5
    assert (both[1] - ours.generate("a blue box", NEGATIVE, seed=SEED + 1, **kwargs)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="negative is read by true classifier-free guidance, which true_cfg=1 turns off"):
        ours.generate(PROMPT, NEGATIVE, **{**kwargs, "true_cfg": 1.0})
    with pytest.raises(ValueError, match=r"negative is a string \('' for none\), or a list of 2 strings \(one per image\)"):
        ours.generate([PROMPT, "a blue box"], [NEGATIVE], **kwargs)
    unguided = dict(kwargs, true_cfg=1.0, output="latents")  # a list of empty negatives is no negative, as "" (it was refused)
    assert torch.equal(ours.generate([PROMPT, "a blue box"], ["", ""], **unguided), ours.generate([PROMPT, "a blue box"], **unguided))
    cond = ours.encode_prompt([PROMPT])
    embeds = dict(prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y, **kwargs)
    with pytest.raises(ValueError, match="pass negative_pooled_prompt_embeds with negative_prompt_embeds"):  # named the prompt's
        ours.generate(negative_prompt_embeds=cond.txt, **embeds)
    with pytest.raises(ValueError, match=r"^negative_prompt_embeds must be \[B, T, \d+\] \(T5\) and negative_pooled_prompt_embeds"):
        ours.generate(negative_prompt_embeds=cond.txt[..., :8], negative_pooled_prompt_embeds=cond.y, **embeds)
    with pytest.raises(TypeError, match="true_cfg takes a number, got '2'"):  # failed in the first step
        ours.generate(PROMPT, **{**kwargs, "true_cfg": "2"})
    for name in ("redux", "latents", "image"):  # AttributeErrors
        with pytest.raises(TypeError, match=rf"{name} takes a torch tensor, got ndarray: give a torch tensor \(torch.from_numpy"):
            ours.generate(PROMPT, **{name: np.zeros((1, 3, SIZE, SIZE), np.float32)}, **kwargs)
    for steps in (0, 1.5):
        with pytest.raises(ValueError, match=f"number of steps must be a whole number, at least 1; got {steps}"):
            ours.generate(PROMPT, **{**kwargs, "steps": steps})


def bfl_files(pipe: FluxPipeline, folder, dtype=torch.float32, prefix=""):
    """The transformer and autoencoder of `pipe` saved as BFL single files (with minigen's config)."""
    weights = flux_from_diffusers(pipe.transformer.state_dict())
    config = dataclasses.replace(TINY_FLUX, guidance_embed="guidance_in.in_layer.weight" in weights)
    transformer = folder / f"flux-{dtype}.safetensors".replace("torch.", "")
    save_file(
        {prefix + k: v.contiguous().to(dtype) for k, v in weights.items()}, transformer,
        metadata=config_metadata({METADATA_FLUX_CONFIG: config}),
    )
    ae = folder / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_from_diffusers(pipe.vae.state_dict()).items()}, ae)
    return transformer, ae


def test_bfl_single_files_load_the_same_pipeline(flux_folder, tmp_path):
    """flux1-*.safetensors + ae.safetensors + text encoders from a folder: the same weights, bit for bit,
    and the same configs, so the same images up to fp32 rounding (≤ 1e-5): exact on the AMX CPU where
    this was written, 1.8e-6 apart on an AVX2 one, though weights, strides and configs are all equal
    there (its fp32 kernels sum in another order for the two loads; two loads of one folder agree)."""
    pipe, folder = flux_folder
    transformer, ae = bfl_files(pipe, tmp_path)
    a = load_flux(folder, dtype=torch.float32)
    b = load_flux(transformer, ae=ae, text_encoders=folder, dtype=torch.float32)
    for name in ("transformer", "vae", "t5", "clip"):
        ours, theirs = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert (a.transformer.config, a.vae.config) == (b.transformer.config, b.vae.config)
    images = [p.generate(PROMPT, width=SIZE, height=SIZE, steps=2, seed=SEED, progress=False) for p in (a, b)]
    assert (images[0] - images[1]).abs().max() <= 1e-5


def test_ae_may_be_the_diffusers_folders_vae_file(flux_folder, tmp_path):
    """ae= given vae/diffusion_pytorch_model.safetensors alone (the diffusers layout, which load_vae read)
    was an IndexError inside the VAE's build: it loads the folder's autoencoder, bit for bit."""
    pipe, folder = flux_folder
    transformer, _ = bfl_files(pipe, tmp_path)
    ae = tmp_path / "diffusion_pytorch_model.safetensors"  # the folder's own is in shards here
    save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()}, ae)
    loaded = load_flux(transformer, ae=ae, text_encoders=folder, dtype=torch.float32,
                       ae_config={"norm_groups": pipe.vae.config.norm_num_groups})  # fmt: skip
    ours, theirs = loaded.vae.state_dict(), load_flux(folder, dtype=torch.float32).vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_prefixed_and_fp8_transformer_files(flux_folder, tmp_path):
    """A `model.diffusion_model.`-prefixed file loads the same weights; an fp8 file is upcast on load."""
    pipe, _ = flux_folder
    plain, _ = bfl_files(pipe, tmp_path)
    (tmp_path / "prefixed").mkdir(), (tmp_path / "fp8").mkdir()
    prefixed, _ = bfl_files(pipe, tmp_path / "prefixed", prefix="model.diffusion_model.")
    fp8, _ = bfl_files(pipe, tmp_path / "fp8", dtype=torch.float8_e4m3fn)
    reference = load_flux_transformer(plain, torch.float32).state_dict()
    for key, value in load_flux_transformer(prefixed, torch.float32).state_dict().items():
        assert torch.equal(value, reference[key])
    upcast = load_flux_transformer(fp8, torch.float32).state_dict()
    for key, value in upcast.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, reference[key].to(torch.float8_e4m3fn).float())


def test_without_text_encoders_embeddings_are_read_and_text_is_refused_by_name(flux_folder):
    """A pipeline without T5 and CLIP (as a checker builds it) gives from embeddings the latents the same pipeline with
    them gives; under true CFG without negative embeddings, or given a prompt, it names the embeddings to pass (an
    AttributeError on the missing tokenizer)."""
    _, folder = flux_folder
    ours = load_flux(folder, dtype=torch.float32)
    bare = dataclasses.replace(ours, t5=None, t5_tokenizer=None, clip=None, clip_tokenizer=None)
    cond, negative = ours.encode_prompt([PROMPT]), ours.encode_prompt([NEGATIVE])
    call = dict(prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y, width=SIZE, height=SIZE, steps=1, true_cfg=2.0, seed=SEED,
                output="latents", progress=False)  # fmt: skip
    negatives = dict(negative_prompt_embeds=negative.txt, negative_pooled_prompt_embeds=negative.y)
    assert torch.equal(bare.generate(**negatives, **call), ours.generate(**negatives, **call))
    with pytest.raises(ValueError, match="^this pipeline has no text encoders to encode the negative prompt: pass negative_prompt_embeds and "
                                         "negative_pooled_prompt_embeds$"):  # fmt: skip
        bare.generate(**call)
    with pytest.raises(ValueError, match="^this pipeline has no text encoders to encode the prompt: pass prompt_embeds and pooled_prompt_embeds$"):
        bare.generate(PROMPT, width=SIZE, height=SIZE, steps=1, progress=False)


def test_wrong_family_missing_tokenizer_and_bad_sizes(flux_folder, tmp_path):
    pipe, folder = flux_folder
    _, ae = bfl_files(pipe, tmp_path)
    with pytest.raises(CheckpointError, match="holds flux-ae weights"):
        load_flux_transformer(ae)
    broken = tmp_path / "broken"
    broken.mkdir()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer"):
        (broken / part).symlink_to(folder / part)
    (broken / "tokenizer_2").mkdir()
    with pytest.raises(FileNotFoundError, match="no T5 tokenizer"):
        load_flux(broken, dtype=torch.float32)

    ours = load_flux(folder, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiples of 16.*try 48x64"):
        ours.generate(PROMPT, width=56, height=64, steps=1, progress=False)
    if not ours.is_guidance_distilled:
        with pytest.raises(ValueError, match="takes no guidance"):
            ours.generate(PROMPT, width=SIZE, height=SIZE, steps=1, guidance=3.5, progress=False)


def test_controls_reach_the_transformer_each_step(flux_folder):
    """A per-step controls function is called once per step with its step index."""
    _, folder = flux_folder
    from minigen.controls import Controls, RecordAttention

    ours: MinigenFlux = load_flux(folder, dtype=torch.float32)
    records, steps_seen = [], []

    def controls(step):
        steps_seen.append(step)
        records.append(RecordAttention(kind="joint", layers=["double_blocks.1"], tokens=[0, 1]))
        return Controls(record=[records[-1]])

    ours.generate(PROMPT, width=SIZE, height=SIZE, steps=3, seed=SEED, controls=controls, progress=False)
    assert steps_seen == [0, 1, 2]
    assert all(len(r.maps["double_blocks.1"]) == 1 for r in records)


def test_sample_script_runs_flux_and_checks_guidance(flux_folder, tmp_path):
    """scripts/sample.py picks the FLUX loader for a FLUX folder; schnell refuses --guidance."""
    from PIL import Image

    pipe, folder = flux_folder
    sample = load_sample_script()
    out = tmp_path / "flux.png"
    argv = ["--model", str(folder), "--prompt", PROMPT, "--width", "32", "--height", "48", "--steps", "2",
            "--seed", "1", "--dtype", "fp32", "--out", str(out)]
    if pipe.transformer.config.guidance_embeds:
        sample.main(argv + ["--guidance", "2.5"])
        image = Image.open(out)
        assert image.size == (32, 48)
        assert "Sampler: Euler, CFG scale: 1.0, Distilled CFG Scale: 2.5, Seed: 1" in image.text["parameters"]
    else:
        with pytest.raises(SystemExit, match="takes no --guidance"):
            sample.main(argv + ["--guidance", "2.5"])
        sample.main(argv)
        assert "Guidance" not in Image.open(out).text["parameters"]


def test_sample_script_merges_a_flux_lora(flux_folder, tmp_path):
    """--lora reads a peft FLUX LoRA (on the fused q/k/v too), merges it, and records it in the PNG."""
    from PIL import Image

    pipe, folder = flux_folder
    g, lora = torch.Generator().manual_seed(0), {}
    for name in ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp", "proj_out"):
        out_features, in_features = pipe.transformer.get_submodule(name).weight.shape
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, in_features, generator=g)
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 2, generator=g)
    save_file(lora, tmp_path / "style.safetensors")
    sample = load_sample_script()
    argv = ["--model", str(folder), "--prompt", PROMPT, "--width", "32", "--height", "32", "--steps", "2", "--seed", "1",
            "--dtype", "fp32"]
    sample.main(argv + ["--out", str(tmp_path / "plain.png")])
    sample.main(argv + ["--out", str(tmp_path / "lora.png"), "--lora", f"{tmp_path / 'style.safetensors'}:0.5"])
    plain, styled = (Image.open(tmp_path / name) for name in ("plain.png", "lora.png"))
    assert 'Lora: "style.safetensors:0.5"' in styled.text["parameters"]
    assert (np.asarray(plain, dtype=np.int16) - np.asarray(styled, dtype=np.int16)).any()


def test_sample_script_conceptrol_with_an_ominicontrol_lora(flux_folder, tmp_path):
    """--omini/--image/--concept: the subject LoRA (OminiControl's module set, peft names) on the condition
    tokens; Conceptrol and the OminiControl baseline (--no-conceptrol) draw different images; masks saved."""
    from PIL import Image
    from safetensors.torch import save_file

    pipe, folder = flux_folder
    g, lora = torch.Generator().manual_seed(0), {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "norm1.linear", "norm.linear")):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g)
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.1
    save_file(lora, tmp_path / "subject.safetensors")
    Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "ref.png")
    sample = load_sample_script()
    argv = ["--model", str(folder), "--prompt", PROMPT, "--width", "32", "--height", "32", "--steps", "2", "--seed", "1",
            "--dtype", "fp32", "--omini", str(tmp_path / "subject.safetensors"), "--image", str(tmp_path / "ref.png")]
    if pipe.transformer.config.guidance_embeds:
        argv += ["--guidance", "3.5"]
    sample.main(argv + ["--concept", "star", "--out", str(tmp_path / "c.png"), "--save-masks", str(tmp_path / "m.png")])
    sample.main(argv + ["--no-conceptrol", "--out", str(tmp_path / "o.png")])
    gated, plain = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("c.png", "o.png"))
    assert np.abs(gated - plain).max() > 0
    assert Image.open(tmp_path / "m.png").size == (2 * 64, 64)  # one concept, two steps
    with pytest.raises(ValueError, match="not in prompt"):
        sample.main(argv + ["--concept", "book", "--out", str(tmp_path / "x.png")])


def test_redux_tokens_are_appended_to_the_prompt_tokens(flux_folder):
    """generate(redux=tokens) equals FluxPipeline given prompt_embeds = cat(T5 tokens, Redux tokens),
    as FluxPriorReduxPipeline hands them over (max abs diff <= 1e-4)."""
    pipe, folder = flux_folder
    guidance = pipe.transformer.config.guidance_embeds
    ours = load_flux(folder, dtype=torch.float32)
    redux = torch.randn(1, 9, 32)
    images = ours.generate(PROMPT, width=SIZE, height=SIZE, steps=2, seed=SEED, redux=redux, progress=False)
    cond = ours.encode_prompt([PROMPT])
    latents = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=torch.cat([cond.txt, redux], 1), pooled_prompt_embeds=cond.y, height=SIZE, width=SIZE,
            num_inference_steps=2, guidance_scale=3.5 if guidance else 0.0, output_type="pt",
            latents=FluxPipeline._pack_latents(latents, 1, 16, SIZE // 8, SIZE // 8),
        ).images
    assert (images - theirs).abs().max() <= TOL


def test_sample_script_records_the_flux_autoencoder_file(tmp_path):
    """A FLUX transformer file drawn with --ae records that autoencoder in its PNG, as --vae is recorded
    for SD (it was left out: two images of other autoencoders read as the same settings)."""
    from PIL import Image

    from minigen.loading.toy import toy_files

    files = toy_files("toy-flux")
    out = tmp_path / "flux.png"
    load_sample_script().main(["--model", str(files["source"]), "--ae", str(files["ae"]), "--text-encoders", str(files["text_encoders"]),
                               "--prompt", "a red star", "--steps", "1", "--out", str(out)])
    with Image.open(out) as image:
        assert "VAE: ae," in image.text["parameters"] and json.loads(image.text["minigen"])["vae"] == "ae"
