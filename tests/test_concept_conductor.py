"""Concept Conductor against the official code's structure, written here on diffusers.

The oracle (`Official`) follows ../shared/notes/concept_conductor.md §1-§4 the way the official pipeline
runs: one path at a time, each concept's LoRA merged into a deep copy of the diffusers UNet
(W + 0.7·up@down), batches [cond, uncond], attention processors that use layer-wise contexts by the
cross-attention forward index, store every decoder attention output of a custom path after to_out[0]
and overwrite the base's, record the keys of the guided layer and the head-mean self-attention of the
mask layer. minigen instead runs all paths as rows of one batch with row-scoped LoRAs.

Model: a tiny UNet of the SD1.5 topology (16 cross-attention layers, 8 heads, the official layer names),
random weights, fp32. Tolerance: 1e-4 absolute on noise predictions, gradients and latents (values of
order 1; the two sides differ in summation order and in LoRA merged vs applied at run time).
"""

import copy
import re
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, unet_twin

from minigen.controls import BatchLayout, Controls, LowRank, RecordAttention
from minigen.loading.lora_files import layer_table
from minigen.methods.concept_conductor import (
    Concept,
    ConceptConductor,
    ConductorSettings,
    Reference,
    Rows,
    invert_reference,
)
from minigen.methods.conductor_masks import kmeans, masks_at, masks_from_points
from minigen.sampling import DiscreteSchedule

TOL = 1e-4
ALPHA = 0.7
BATCH, CONCEPTS, T, C = 2, 2, 5, 32


@pytest.fixture(scope="module")
def models():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=C, attention_head_dim=8,  # 8 heads, as SD1.5
    ).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return reference, unet_twin(reference)


@pytest.fixture(scope="module")
def inputs(models):
    """Base contexts, two concepts (layer-wise contexts, LoRAs on every attention Linear, masks), a latent."""
    reference, unet = models
    g = torch.Generator().manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    table = layer_table(unet)
    concepts, loras = [], []
    for i in range(CONCEPTS):
        lora = {}
        for name, module in reference.named_modules():
            if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
                lora[name] = (randn(2, module.weight.shape[1]) * 0.2, randn(module.weight.shape[0], 2) * 0.2)
        mask = torch.zeros(16, 16)
        mask[:, 8 * i : 8 * i + 8] = 1  # left half, right half
        concepts.append(
            Concept(
                context=randn(16, T, C), uncond=randn(16, T, C), mask=mask,
                low_rank=[LowRank(table[name.replace(".", "_")], down, up, ALPHA) for name, (down, up) in lora.items()],
            )
        )
        loras.append(lora)
    return dict(context=randn(T, C), uncond=randn(T, C), concepts=concepts, loras=loras, z=randn(BATCH, 4, 16, 16), ref_context=randn(T, C))


# ---------------------------------------------------------------- the oracle


class Processor:
    """The official attention processor, reduced to what these tests compare (notes §2.2, §3, §4.1)."""

    def __init__(self, name, cross_index, state):
        self.name, self.cross_index, self.state = name, cross_index, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state, name = self.state, self.name
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # bound before any merge
        if context.dim() == 4:  # layer-wise contexts [B, 16, T, C]: this layer's own
            context = context[:, self.cross_index]
        x = hidden_states
        hidden_states = self.merge(hidden_states, "x")  # the official "feature_input": read by to_q only
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q = self.merge(q, "q")  # "query"
        b, n, _ = q.shape
        split = lambda x: x.view(b, x.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
        probs = (split(q) @ split(k).transpose(-1, -2) * attn.scale).softmax(-1)
        out = attn.to_out[0]((probs @ split(v)).transpose(1, 2).reshape(b, n, -1))
        if state["mode"] == "guidance" and name in state["guidance_layers"]:  # feature_input, query, key, value, feature_output
            state["features"][(state["branch"], name)] = {"x": x, "q": q, "k": k, "v": v, "out": out}
        if state["mode"] == "generate" and name == state["mask_layer"]:
            state["probs"][state["branch"]] = probs.mean(1)[: b // 2]
        return attn.to_out[1](self.merge(out, "out"))  # "feature_output"

    def merge(self, h, feature):
        """The official merge of one params_merge feature at the layers of processor_filter_merge: a custom
        branch keeps its h, the base blends them in, concept after concept, in both CFG halves."""
        state, name = self.state, self.name
        if state["mode"] != "generate" or feature not in state["merge_features"] or not re.match(state["merge_filter"], name):
            return h
        if state["branch"] > 0:
            state["outputs"][(state["branch"], name, feature)] = h
            return h
        side = int(h.shape[1] ** 0.5)
        for i in range(1, state["concepts"] + 1):
            m = state["masks"][side][:, i - 1].flatten(1)[..., None].float().repeat(2, 1, 1)  # both halves
            h = m * state["outputs"][(i, name, feature)] + (1 - m) * h
        return h


class Official:
    """The official sequential structure: deep copy + merge per concept, [cond, uncond] batches."""

    def __init__(self, reference, loras, settings, merge_filter=r".*up_blocks.*"):
        self.settings = settings
        self.state = dict(mode=None, branch=0, features={}, probs={}, outputs={}, masks=None, concepts=len(loras), merge_filter=merge_filter,
                          merge_features=settings.fuse_features,
                          guidance_layers=[self.diffusers_name(layer) for layer in settings.guidance_layers], mask_layer=self.diffusers_name(settings.mask_layer))
        self.models = [self.with_processors(reference)] + [self.with_processors(self.merged(reference, lora)) for lora in loras]

    @staticmethod
    def diffusers_name(layer):  # "up.2.2.0" -> up_blocks.2.attentions.2.transformer_blocks.0.attn1
        part, block, attention, index = layer.split(".")
        return f"{part}_blocks.{block}.attentions.{attention}.transformer_blocks.{index}.attn1"

    @staticmethod
    def merged(reference, lora):
        model = copy.deepcopy(reference)
        with torch.no_grad():
            for name, (down, up) in lora.items():
                model.get_submodule(name).weight += ALPHA * up @ down
        return model

    def with_processors(self, model):
        cross = [n for n in self.forward_order(model) if n.endswith("attn2")]
        model.set_attn_processor({
            f"{n}.processor": Processor(n, cross.index(n.replace("attn1", "attn2")), self.state)
            for n in (name.removesuffix(".processor") for name in model.attn_processors)
        })
        return model

    @staticmethod
    def forward_order(model):  # down, mid, up (the dict of processors lists mid last)
        names = [n for n, m in model.named_modules() if n.endswith(("attn1", "attn2"))]
        return sorted(names, key=lambda n: ("down" not in n, "up" in n))

    def eps(self, z, t, context, uncond, concepts, masks):
        """Generation phase at one step: the custom paths, then the fused base; CFG on the base."""
        state = self.state
        state.update(mode="generate", masks=masks, outputs={}, probs={})
        tt = torch.tensor(t)
        for i, concept in enumerate(concepts, start=1):
            state["branch"] = i
            layerwise = lambda c: c[None].expand(BATCH, -1, -1, -1)  # noqa: E731
            self.models[i](torch.cat([z, z]), tt, torch.cat([layerwise(concept.context), layerwise(concept.uncond)])).sample
        state["branch"] = 0
        cond_context = torch.cat([context[None].expand(BATCH, -1, -1), uncond[None].expand(BATCH, -1, -1)])
        cond, un = self.models[0](torch.cat([z, z]), tt, cond_context).sample.chunk(2)
        return un + self.settings.cfg * (cond - un)

    def layout_gradient(self, z, t, context, concepts, ref_latent, ref_context, params=("k",)):
        """Guidance phase at one step: loss and ∇_z, full forwards (no early break: same gradient); the
        loss of each of `params` (params_guidance), averaged."""
        state = self.state
        state.update(mode="guidance", features={})
        z = z.clone().requires_grad_(True)
        tt = torch.tensor(t)
        for i, concept in enumerate(concepts, start=1):
            state["branch"] = i
            self.models[i](z, tt, concept.context[None].expand(BATCH, -1, -1, -1))
        state["branch"] = "ref"
        with torch.no_grad():
            self.models[0](ref_latent, tt, ref_context[None])
        state["branch"] = 0
        self.models[0](z, tt, context[None].expand(BATCH, -1, -1))
        losses = []
        for layer in state["guidance_layers"]:
            for param in params:
                ref = state["features"][("ref", layer)][param].detach()
                mse = lambda f: ((f - ref) ** 2).sum(0).mean()  # noqa: E731
                features = [state["features"][(i, layer)][param] for i in range(len(concepts) + 1)]
                losses.append(mse(features[0]) + torch.stack([mse(f) for f in features[1:]]).mean())
        loss = torch.stack(losses).mean()
        return loss, torch.autograd.grad(loss, z)[0]


def official_masks(masks, sides=(4, 8, 16)):
    """Masks [B, N, 16, 16] per resolution, as `store_masks`: bilinear with antialias, then > 0.5."""
    return {s: F.interpolate(masks.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False) > 0.5 for s in sides}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    "kinds, merge_filter, features",
    [(("self", "cross"), r".*up_blocks.*", ("out",)), (("self",), r".*up_blocks.*attn1.*", ("out",)),
     (("cross",), r".*up_blocks.*attn2.*", ("out",)), (("self", "cross"), r".*up_blocks.*", ("x",)),
     (("self", "cross"), r".*up_blocks.*", ("q",)), (("self",), r".*up_blocks.*attn1.*", ("x", "q", "out"))],
    ids=["official-default", "self-only", "cross-only", "feature_input", "query", "all-three"],
)
def test_batched_generation_step_equals_the_sequential_official_structure(models, inputs, kinds, merge_filter, features):
    """One generation step: noise prediction (multipath + injection + CFG) and the mask layer's attention;
    `fuse_kinds` and `fuse_features` against the official processor_filter_merge and params_merge."""
    reference, unet = models
    settings = ConductorSettings(steps=10, fuse_kinds=kinds, fuse_features=features)
    official = Official(reference, inputs["loras"], settings, merge_filter)
    concepts = inputs["concepts"]
    masks = torch.stack([c.mask for c in concepts])[None].expand(BATCH, -1, -1, -1)
    by_side = official_masks(masks)
    with torch.no_grad():
        expected = official.eps(inputs["z"], 501, inputs["context"], inputs["uncond"], concepts, by_side)

    conductor = ConceptConductor(unet, settings)
    rows = Rows(1 + CONCEPTS, BATCH)
    from minigen.controls import RecordAttention

    record = RecordAttention(layers={settings.mask_layer}, kind="self", rows=conductor.cond_rows(rows))
    fused = {(s, s): m for s, m in by_side.items()}
    with torch.no_grad():
        generation = conductor.generation_inputs(rows, inputs["context"], inputs["uncond"], concepts)
        eps = conductor.guided_eps(inputs["z"], 501, rows, generation, fused, conductor.layer_grids((16, 16)), record)
    assert (eps - expected).abs().max() < TOL
    probs = record.maps[settings.mask_layer][0][:, 0]  # [paths·B, N, N], path-major
    for path in range(1 + CONCEPTS):
        assert (probs[path * BATCH : (path + 1) * BATCH] - official.state["probs"][path]).abs().max() < 1e-5
    # and injection matters: without the masks the prediction differs
    empty = {grid: torch.zeros_like(m) for grid, m in fused.items()}
    with torch.no_grad():
        plain = conductor.guided_eps(inputs["z"], 501, rows, generation, empty, conductor.layer_grids((16, 16)), None)
    assert (plain - eps).abs().max() > 100 * TOL


@pytest.mark.parametrize(
    "layers, features",
    [(("up.1.0.0",), ("k",)), (("up.1.0.0",), ("q", "v")), (("up.1.0.0",), ("out",)), (("up.1.0.0",), ("x",)),
     (("up.1.2.0", "up.1.0.0", "up.2.1.0"), ("k", "v")), (("down.0.0.0",), ("k",))],
    ids=["key", "query-value", "feature_output", "feature_input", "three-layers", "first-layer"],
)
def test_layout_gradient_equals_the_official_structure(models, inputs, layers, features):
    """One guidance step: the loss (base + mean of customs, summed over images; averaged over the guided
    layers and features, the official processors_guidance and params_guidance) and ∇_z L. At the first layer
    the forward stops before any cross-attention reads the per-layer contexts (once refused as controls past the stop)."""
    reference, unet = models
    settings = ConductorSettings(steps=10, guidance_layers=layers, guidance_features=features)
    ref_latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    loss_expected, grad_expected = Official(reference, inputs["loras"], settings).layout_gradient(
        inputs["z"], 901, inputs["context"], inputs["concepts"], ref_latent, inputs["ref_context"], params=features
    )
    conductor = ConceptConductor(unet, settings)
    rows = Rows(1 + CONCEPTS, BATCH)
    z = inputs["z"].clone()
    found = conductor.layout_features(z, 901, rows, inputs["context"], inputs["concepts"], Reference(inputs["ref_context"], {901: ref_latent}))
    assert set(found) == set(layers) and all(set(by_name) == set(features) for by_name in found.values())
    loss = conductor.layout_loss(found, rows)
    (grad,) = torch.autograd.grad(loss, z)
    assert abs(loss.item() - loss_expected.item()) < TOL * loss_expected.item()
    assert (grad - grad_expected).abs().max() < TOL * grad_expected.abs().max()
    assert grad.abs().max() > 0


def test_layout_gradient_flows_only_through_the_guided_layer(models, inputs):
    """The forward stops at the guided layer: weights after it (later decoder blocks, the guided block's
    cross-attention and feed-forward, the output convolution) do not change the gradient, while a weight
    before it does; the reference row contributes no gradient (z alone requires grad)."""
    _, unet = models
    settings = ConductorSettings(steps=10)
    conductor = ConceptConductor(unet, settings)
    rows = Rows(1 + CONCEPTS, BATCH)
    reference = Reference(inputs["ref_context"], {901: torch.randn(1, 4, 16, 16)})

    def gradient(model):
        z = inputs["z"].clone()
        features = ConceptConductor(model, settings).layout_features(z, 901, rows, inputs["context"], inputs["concepts"], reference)
        return torch.autograd.grad(conductor.layout_loss(features, rows), z)[0]

    before = gradient(unet)
    after_changed = copy.deepcopy(unet)
    before_changed = copy.deepcopy(unet)
    with torch.no_grad():
        later = tuple(f"output_blocks.{i}." for i in range(4, 12)) + ("out.", "output_blocks.3.1.proj_out")
        guided_block = "output_blocks.3.1.transformer_blocks.0."
        unused = tuple(guided_block + part for part in ("attn1.to_q", "attn1.to_v", "attn1.to_out", "attn2", "ff", "norm2", "norm3"))
        for name, p in after_changed.named_parameters():
            if name.startswith(later + unused):
                p.add_(torch.randn_like(p))
        weight = before_changed.middle_block[0].in_layers[2].weight
        weight.add_(torch.randn_like(weight) * 0.1)
    assert torch.equal(gradient(after_changed), before)
    assert (gradient(before_changed) - before).abs().max() > 1e-3


def diffusers_inversion(reference, latent, context, steps, alphas_cumprod=None) -> dict:
    """{t: z_t} of diffusers' DDIMInverseScheduler (SD's schedule) over `steps` steps, optionally with
    its alphas replaced (float64 ones for a float64 run)."""
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    if alphas_cumprod is not None:
        scheduler.alphas_cumprod, scheduler.initial_alpha_cumprod = alphas_cumprod, alphas_cumprod[0]
    scheduler.set_timesteps(steps)
    expected, z = {}, latent
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(reference(z, t, context[None]).sample, t, z).prev_sample
            expected[int(t)] = z
    return expected


def test_inversion_matches_diffusers_ddim_inverse_scheduler(models, tmp_path):
    """invert_reference against diffusers' DDIMInverseScheduler (99 steps here, 999 officially), and its
    cache: a second call reads the file; another UNet gets another file."""
    reference, unet = models
    g = torch.Generator().manual_seed(7)
    latent, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(T, C, generator=g)
    expected = diffusers_inversion(reference, latent, context, 99)
    result = invert_reference(unet, latent, context, steps=10, inversion_steps=99, cache=tmp_path, progress=False)
    assert sorted(result.latents) == [int(t) for t in DiscreteSchedule().timesteps(10).flip(0)]
    for t, z in result.latents.items():
        assert (z - expected[t]).abs().max() < TOL * expected[t].abs().max()
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = invert_reference(unet, latent, context, steps=10, inversion_steps=99, cache=tmp_path, progress=False)
    assert all(torch.equal(again.latents[t], result.latents[t]) for t in result.latents)
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.out[2].bias.add_(1.0)
    invert_reference(other, latent, context, steps=10, inversion_steps=99, cache=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match="timesteps must start above 0; this schedule's first is 0: use timestep_spacing 'leading' with steps_offset=1"):
        invert_reference(unet, latent, context, steps=10, inversion_steps=99, schedule=DiscreteSchedule(steps_offset=0), progress=False)


def test_inversion_in_float64_stays_in_float64(models):
    """A float64 parity run: invert_reference on float64 models against diffusers' DDIMInverseScheduler with
    its alphas computed in float64 too, to 1e-10 relative (sigmas rounded through float32 would leave about 1e-7)."""
    reference = type(models[0]).from_config(models[0].config)  # default processors: other tests install the oracle's
    reference.load_state_dict(models[0].state_dict())
    reference, unet = reference.double().eval(), copy.deepcopy(models[1]).double()
    g = torch.Generator().manual_seed(7)
    latent, context = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64), torch.randn(T, C, generator=g, dtype=torch.float64)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear, in float64
    expected = diffusers_inversion(reference, latent, context, 49, alphas_cumprod=torch.cumprod(1 - betas, dim=0))
    result = invert_reference(unet, latent, context, steps=7, inversion_steps=49, progress=False)
    for t, z in result.latents.items():
        assert z.dtype == torch.float64 and (z - expected[t]).abs().max() < 1e-10 * expected[t].abs().max()


def official_loop(official, settings, inputs, ref_latents, cluster, placement=None, generator=None, prediction_type="epsilon"):
    """The oracle's loop with diffusers' DDIMScheduler and the refinement written from the notes (§4.2-§4.3),
    and, with `placement` (init latent, mask [h, w]), the official object-placement blend after each step:
    the image's latent noised by scheduler.add_noise to the next timestep outside the mask, the latent
    itself after the last step. With `settings.eta` > 0 the scheduler draws its noise from `generator`.
    Returns the final latent and the fusion masks."""
    from diffusers import DDIMScheduler

    concepts = inputs["concepts"]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                              prediction_type=prediction_type)  # fmt: skip
    scheduler.set_timesteps(settings.steps)
    start = torch.stack([c.mask for c in concepts])[None].expand(BATCH, -1, -1, -1)
    masks = official_masks(start)
    custom, base = official_masks(start)[8].clone(), official_masks(start)[8].clone()
    expected = inputs["z"]
    for step, t in enumerate(scheduler.timesteps):
        if step <= settings.guidance_end:
            _, grad = official.layout_gradient(expected, int(t), inputs["context"], concepts, ref_latents[int(t)], inputs["ref_context"])
            expected = expected - settings.guidance_weight * grad
        with torch.no_grad():
            eps = official.eps(expected, int(t), inputs["context"], inputs["uncond"], concepts, masks)
        if settings.refine_start <= step <= settings.refine_end:
            masks = official_refine(official.state["probs"], custom, base, masks, cluster)
        expected = scheduler.step(eps, t, expected, eta=settings.eta, generator=generator).prev_sample.detach()
        if placement is not None:
            init, mask = placement
            proper = init
            if step < len(scheduler.timesteps) - 1:
                proper = scheduler.add_noise(init, inputs["z"], scheduler.timesteps[step + 1 : step + 2])
            expected = (1 - mask) * proper + mask * expected
    return expected, masks


def test_a_short_run_matches_the_official_loop(models, inputs):
    """A 6-step run with layout alignment at steps 0-2 and refinement at steps 3 and 4 (the same K-means
    on both sides), against the oracle's loop: the final latent and the final masks."""
    reference, unet = models
    settings = ConductorSettings(steps=6, guidance_end=2, refine_start=3, refine_end=4, refine_interval=1, kmeans_restarts=3)
    cluster = lambda points, k: kmeans(points, k, restarts=3, seed=123)  # noqa: E731
    concepts = inputs["concepts"]
    schedule = DiscreteSchedule()
    ref_latents = {int(t): torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(int(t))) for t in schedule.timesteps(6)}
    reference_input = Reference(inputs["ref_context"], ref_latents)

    final_masks = {}
    z = ConceptConductor(unet, settings, cluster=cluster).sample(
        inputs["z"], inputs["context"], inputs["uncond"], concepts, reference_input,
        on_step=lambda step, z, masks: final_masks.update(masks), progress=False,
    )

    expected, masks = official_loop(Official(reference, inputs["loras"], settings), settings, inputs, ref_latents, cluster)
    assert (z - expected).abs().max() < TOL * 10
    for side in (4, 8, 16):
        assert torch.equal(final_masks[(side, side)], masks[side])
    start = torch.stack([c.mask for c in concepts])[None].expand(BATCH, -1, -1, -1)
    assert any(not torch.equal(masks[side], official_masks(start)[side]) for side in (4, 8, 16))  # refinement moved them


def test_a_v_prediction_model_is_sampled_as_the_official_scheduler_samples_it(models, inputs, tmp_path):
    """Every UNet output was taken for noise: with a v-prediction schedule the latent was the epsilon
    run's, bit for bit (and scripts/conduct.py passed no schedule at all). Reference: the oracle's loop
    with DDIMScheduler(prediction_type="v_prediction"). The inversion cache keyed the schedule by its
    betas alone, so a v-prediction inversion was read back from an epsilon one's file."""
    reference, unet = models
    settings = ConductorSettings(steps=3, guidance_end=-1, refine_start=99)
    v = DiscreteSchedule(prediction_type="v")
    args = (inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], None)
    z = ConceptConductor(unet, settings, schedule=v).sample(*args, progress=False)
    expected, _ = official_loop(Official(reference, inputs["loras"], settings), settings, inputs, {}, None, prediction_type="v_prediction")
    assert (z - expected).abs().max() < TOL * 10
    assert (z - ConceptConductor(unet, settings).sample(*args, progress=False)).abs().max() > 100 * TOL
    latent = inputs["z"][:1]
    inverted = {name: invert_reference(unet, latent, inputs["ref_context"], steps=3, inversion_steps=6, schedule=schedule, cache=tmp_path,
                                       progress=False) for name, schedule in (("epsilon", DiscreteSchedule()), ("v", v))}  # fmt: skip
    fresh = invert_reference(unet, latent, inputs["ref_context"], steps=3, inversion_steps=6, schedule=v, progress=False)
    assert len(list(tmp_path.iterdir())) == 2 and all(torch.equal(inverted["v"].latents[t], fresh.latents[t]) for t in fresh.latents)


def test_object_placement_matches_the_official_blend(models, inputs):
    """Object placement (official init_image / init_mask), 3 steps with layout alignment at step 0: the
    final latent against the oracle's loop with the official blend (diffusers' add_noise); outside the
    mask the result is the image's latent exactly, and inside it the kept image changes what is drawn."""
    reference, unet = models
    settings = ConductorSettings(steps=3, guidance_end=0, refine_start=9)
    concepts = inputs["concepts"]
    ref_latents = {int(t): torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(int(t))) for t in DiscreteSchedule().timesteps(3)}
    reference_input = Reference(inputs["ref_context"], ref_latents)
    init = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(16, 16)
    mask[2:14, 3:13] = 1  # where the concepts go

    conductor = ConceptConductor(unet, settings)
    run = lambda **placement: conductor.sample(inputs["z"], inputs["context"], inputs["uncond"], concepts, reference_input, progress=False, **placement)  # noqa: E731
    z = run(init_latent=init, init_mask=mask)
    expected, _ = official_loop(Official(reference, inputs["loras"], settings), settings, inputs, ref_latents, None, placement=(init, mask))
    assert (z - expected).abs().max() < TOL * 10
    assert torch.equal(z[..., mask == 0], init.expand(BATCH, -1, -1, -1)[..., mask == 0])
    assert (z - run())[..., mask == 1].abs().mean() > 0.01


@pytest.mark.parametrize(
    "changes, message",
    [({"cfg": 1e300, "guidance_end": -1}, r"step 1 of 3 produced non-finite values .* cfg \(1e\+300\) or a concept's LoRA scale \(.*0\.7\) too large"),
     ({"guidance_weight": 1e300, "guidance_end": 1}, r"step 1 of 3 .*, a concept's LoRA scale .* or the layout alignment's guidance_weight \(1e\+300\) too large")],
    ids=["cfg", "guidance-weight"],
)  # fmt: skip
def test_a_step_that_overflows_stops_the_run_and_names_the_scales(models, inputs, changes, message):
    """Absurd scales ran every step to NaN, and the VAE's decode then blamed fp16 overflow: the first
    non-finite latent now stops the run at its step, before the caller's on_step sees it."""
    from minigen.sampling import NonFiniteError

    _, unet = models
    settings = ConductorSettings(steps=3, refine_start=9, **changes)
    reference = Reference(inputs["ref_context"], {int(t): inputs["z"][:1] for t in DiscreteSchedule().timesteps(3)})
    seen = []
    with pytest.raises(NonFiniteError, match=message):
        ConceptConductor(unet, settings).sample(inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], reference,
                                                on_step=lambda step, z, masks: seen.append(step), progress=False)  # fmt: skip
    assert seen == []


def test_a_generator_without_fresh_noise_is_refused(models, inputs):
    """At eta 0 DDIM draws no fresh noise, so a generator was accepted and never read."""
    _, unet = models
    reference = Reference(inputs["ref_context"], {int(t): inputs["z"][:1] for t in DiscreteSchedule().timesteps(3)})
    with pytest.raises(ValueError, match="generator draws DDIM's fresh noise, which eta=0 adds none of"):
        ConceptConductor(unet, ConductorSettings(steps=3, refine_start=9)).sample(
            inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], reference, generator=torch.Generator(), progress=False)


def test_the_callers_controls_join_every_generation_call_told_its_rows(models, inputs):
    """`sample(controls=)` (it took none: a caller could not record a path's attention or add a control of its
    own): the caller's controls join each step's generation call, not layout alignment's gradient calls, told
    the step, the run's steps and the rows: 3 paths x 2 images, each path's [cond | uncond] rows, so the
    conditional rows 0, 1, 4, 5, 8, 9 pair with 2, 3, 6, 7, 10, 11 (written out here). No controls, empty
    ones and a function returning None give the same latent, bit for bit; a conflicting context and a
    run length of another are refused. Tolerance: TOL where recording writes the attention out (SDPA elsewhere)."""
    _, unet = models
    settings = ConductorSettings(steps=3, guidance_end=1, refine_start=9)
    reference = Reference(inputs["ref_context"], {int(t): inputs["z"][:1] for t in DiscreteSchedule().timesteps(3)})
    conductor = ConceptConductor(unet, settings)

    def run(controls):
        return conductor.sample(inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], reference, controls=controls, progress=False)

    seen = []
    record = RecordAttention(layers={"up.1.0.0"}, kind="cross", tokens=[1], sink=lambda site, probs: seen.append((site.step, site.layout, probs.shape)))
    plain = run(None)
    assert (run(lambda step: Controls(record=[record], steps=3)) - plain).abs().max() < TOL  # recording writes the softmax out: float noise
    layout = BatchLayout(cond=(0, 1, 4, 5, 8, 9), uncond=(2, 3, 6, 7, 10, 11))
    assert [step for step, _, _ in seen] == [0, 1, 2]  # once per step: the alignment calls at steps 0 and 1 are not the caller's
    assert all(seen_layout == layout == Rows(3, 2).layout() and shape[0] == 12 for _, seen_layout, shape in seen)
    assert torch.equal(run(Controls()), plain) and torch.equal(run(lambda step: None), plain)
    assert not torch.equal(run(Controls(low_rank=inputs["concepts"][0].low_rank)), plain)  # a control of the caller's applies
    with pytest.raises(ValueError, match="made for a run of 5 sampling steps, and this run takes 3"):
        run(Controls(steps=5))
    with pytest.raises(ValueError, match=r"contexts for \['down.1.0.0'\], but the conductor gives every cross-attention layer each path's"):
        run(Controls(contexts={"down.1.0.0": torch.zeros(12, T, C)}))


def test_an_overflow_without_concept_loras_blames_cfg_alone(models, inputs):
    """Concepts without low-rank residuals: the message named "a LoRA scale ... up to 0" (and with a
    single cause would have read " or cfg ...")."""
    from dataclasses import replace as with_fields

    from minigen.sampling import NonFiniteError

    _, unet = models
    settings = ConductorSettings(steps=3, refine_start=9, cfg=1e300, guidance_end=-1)
    concepts = [with_fields(concept, low_rank=()) for concept in inputs["concepts"]]
    reference = Reference(inputs["ref_context"], {int(t): inputs["z"][:1] for t in DiscreteSchedule().timesteps(3)})
    with pytest.raises(NonFiniteError, match=r"Likely causes: cfg \(1e\+300\) too large; non-finite"):
        ConceptConductor(unet, settings).sample(inputs["z"], inputs["context"], inputs["uncond"], concepts, reference, progress=False)


@pytest.mark.parametrize("per_image", [False, True], ids=["one-generator", "one-per-image"])
def test_eta_draws_the_official_ddim_noise(models, inputs, per_image):
    """DDIM with eta 0.7 (the official pipeline's `eta` and `generator`, one or a list of one per image),
    3 steps with layout alignment at step 0: the final latent against the oracle's loop with diffusers'
    DDIMScheduler.step(eta=, generator=) from generators in the same state; and eta moves the result."""
    reference, unet = models
    settings = ConductorSettings(steps=3, guidance_end=0, refine_start=9, eta=0.7)
    ref_latents = {int(t): torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(int(t))) for t in DiscreteSchedule().timesteps(3)}
    reference_input = Reference(inputs["ref_context"], ref_latents)
    generators = lambda: [torch.Generator().manual_seed(7 + j) for j in range(BATCH)] if per_image else torch.Generator().manual_seed(7)  # noqa: E731
    run = lambda settings, generator: ConceptConductor(unet, settings).sample(  # noqa: E731
        inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], reference_input, generator=generator, progress=False,
    )
    z = run(settings, generators())
    expected, _ = official_loop(Official(reference, inputs["loras"], settings), settings, inputs, ref_latents, None, generator=generators())
    assert (z - expected).abs().max() < TOL * 10
    assert (z - run(replace(settings, eta=0.0), None)).abs().mean() > 0.05  # eta 0 draws nothing (a generator is refused)


def test_object_placement_keeps_each_images_own_latent(models, inputs):
    """A latent per image [B, C, h, w] and a bool mask: after the last step each image's kept region is its
    own latent exactly, and the drawn region is not."""
    _, unet = models
    init = torch.randn(BATCH, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = True
    z = ConceptConductor(unet, ConductorSettings(steps=2, guidance_end=-1)).sample(
        inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], None, progress=False, init_latent=init, init_mask=mask
    )
    assert torch.equal(z[..., ~mask], init[..., ~mask])
    assert (z - init)[..., mask].abs().min() > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 0}, "ConductorSettings.steps must be a whole number of 1 or more, got 0"),
        ({"guidance_interval": 0}, "guidance_interval must be a whole number"),  # step % 0: ZeroDivisionError at the first step
        ({"refine_interval": 0}, "refine_interval must be a whole number"),
        ({"kmeans_restarts": 0}, "kmeans_restarts must be a whole number"),
        ({"cfg": float("nan")}, "ConductorSettings.cfg must be a finite number, got nan"),
        ({"guidance_weight": float("inf")}, "guidance_weight must be a finite number"),
        ({"overlap_threshold": 1.5}, r"overlap_threshold is an IoU in \[0, 1\]"),
    ],
)
def test_settings_that_cannot_run_are_named_when_the_conductor_is_made(models, changes, message):
    _, unet = models
    with pytest.raises(ValueError, match=message):
        ConceptConductor(unet, ConductorSettings(**changes))
    unused = {"guidance_interval": {"guidance_end": -1}, "refine_interval": {"refine_start": 9, "refine_end": 8},
              "kmeans_restarts": {"rect_masks": True}}.get(next(iter(changes)))  # fmt: skip
    if unused is not None:  # the part that reads it is off: the setting is not read, so not refused
        ConceptConductor(unet, ConductorSettings(**changes, **unused))


@pytest.mark.parametrize(
    "placement, message",
    [
        ({"init_latent": torch.zeros(1, 4, 16, 16)}, "needs both init_latent .* and init_mask"),
        ({"init_latent": torch.zeros(1, 4, 8, 8), "init_mask": torch.ones(16, 16)}, r"init_latent must be \[1 or 2, 4, 16, 16\]"),
        ({"init_latent": torch.zeros(1, 4, 16, 16), "init_mask": torch.ones(128, 128)}, r"init_mask is \[128, 128\] but the latent grid is \[16, 16\]"),
        ({"init_latent": torch.zeros(1, 4, 16, 16), "init_mask": torch.full((16, 16), 255, dtype=torch.uint8)}, r"bool or float in \[0, 1\].*mask > 127"),
        ({"init_latent": torch.zeros(1, 4, 16, 16), "init_mask": torch.zeros(16, 16)}, "init_mask marks no pixel of the 16x16 latent grid: nothing would be redrawn"),
        ({"init_latent": torch.zeros(1, 4, 16, 16), "init_mask": torch.full((16, 16), float("nan"))}, r"init_mask must be bool or float in \[0, 1\]"),
    ],
    ids=["latent-without-mask", "latent-size", "mask-in-pixels", "mask-of-0-255", "empty-mask", "nan-mask"],  # empty: the image came back unchanged
)
def test_bad_placement_is_named(models, inputs, placement, message):
    _, unet = models
    with pytest.raises(ValueError, match=message):
        ConceptConductor(unet, ConductorSettings(steps=2, guidance_end=-1)).sample(
            inputs["z"], inputs["context"], inputs["uncond"], inputs["concepts"], None, progress=False, **placement
        )


def official_refine(probs, custom, base, masks, cluster):
    """§4.2-§4.3: per image and concept, pool the clusters of k = N+1..2N+1 on the custom path's and the
    base path's attention, pick the best IoU with that tracker (threshold 0), then per resolution the union
    of the two trackers, the previous mask kept where concepts overlap."""
    n = len(probs) - 1
    for image in range(BATCH):
        pools = {}
        for path in range(n + 1):
            points = probs[path][image]
            candidates = []
            for k in range(n + 1, 2 * n + 2):
                labels = cluster(points, k)
                candidates += [(labels == c).view(8, 8) for c in range(k)]
            pools[path] = candidates
        for i in range(n):
            for tracker, pool in ((custom, pools[i + 1]), (base, pools[0])):
                previous = tracker[image, i]
                ious = torch.stack([(c & previous).sum() / (c | previous).sum().clamp(min=1) for c in pool])
                tracker[image, i] = pool[int(ious.argmax())]
    new = {}
    for side, old in masks.items():
        union = official_masks(custom.float().view(BATCH, n, 8, 8), (side,))[side] | official_masks(base.float(), (side,))[side]
        overlap = union.sum(1, keepdim=True) > 1
        new[side] = torch.where(overlap, old, union)
    return new


def guided_reference(latent=(1, 4, 16, 16), context=(T, C)) -> Reference:
    """A Reference of random tensors of these shapes for a 2-step run that aligns the layout at its first step."""
    return Reference(torch.randn(context), {int(DiscreteSchedule().timesteps(2)[0]): torch.randn(latent)})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {"concepts": [replace(i["concepts"][0], context=i["concepts"][0].context[:8], low_rank=[])]},
         "8 layer-wise contexts.*16 cross-attention layers"),
        (lambda i: {"concepts": [replace(i["concepts"][0], low_rank=[], mask=torch.ones(8, 8))]},
         r"mask is \[8, 8\] but the latent grid is \[16, 16\]"),
        (lambda i: {"context": torch.zeros(T, 16), "uncond": torch.zeros(T, 16)},
         r"the base context must be one context \[T, 32\] \(this UNet's text width\), got shape \[5, 16\]: encode it with this model's"),
        (lambda i: {"noise": torch.zeros(2, 8, 16, 16)},
         r"noise must be \[B, 4, h, w\] \(this UNet reads 4 latent channels\), got shape \[2, 8, 16, 16\]"),
        (lambda i: {"reference": guided_reference(latent=(1, 4, 8, 8))},
         r"Reference.latents\[\d+\] must be one latent \[1, 4, 16, 16\], got shape \[1, 4, 8, 8\]"),
        (lambda i: {"reference": guided_reference(latent=(4, 16, 16))},
         r"Reference.latents\[\d+\] must be one latent \[1, 4, 16, 16\], got shape \[4, 16, 16\]"),
        (lambda i: {"reference": guided_reference(context=(1, T, C))},
         r"Reference.context must be one context \[T, 32\] .*got shape \[1, 5, 32\]: drop its batch"),
        (lambda i: {"reference": guided_reference(context=(T, 16))}, r"Reference.context must be one context \[T, 32\] .*got shape \[5, 16\]"),
    ],
    ids=["edlora-for-another-model", "mask-size", "base-context-width", "noise-channels", "reference-latent-size", "reference-latent-unbatched",
         "reference-context-batched", "reference-context-width"],
)  # fmt: skip
def test_bad_input_is_named(models, inputs, change, message):
    """Each but the first two was a bare torch error (a matmul, a convolution, torch.cat or torch.stack, an IndexError)."""
    _, unet = models
    given = {"noise": inputs["z"], "context": inputs["context"], "uncond": inputs["uncond"], "concepts": inputs["concepts"], "reference": None}
    given |= change(inputs)
    guidance_end = 0 if given["reference"] is not None else -1  # the reference is read by the layout alignment
    with pytest.raises(ValueError, match=message):
        ConceptConductor(unet, ConductorSettings(steps=2, guidance_end=guidance_end)).sample(**given, progress=False)


@pytest.mark.parametrize(
    "latent, context, message",
    [
        ((4, 16, 16), (T, C), r"invert_reference's latent must be one latent \[1, 4, h, w\], got shape \[4, 16, 16\]"),
        ((1, 4, 16, 16), (1, T, C), r"invert_reference's context must be one context \[T, 32\] .*got shape \[1, 5, 32\]: drop its batch"),
        ((1, 4, 16, 16), (T, 16), r"invert_reference's context must be one context \[T, 32\] .*got shape \[5, 16\]"),
    ],
    ids=["latent-unbatched", "context-batched", "context-width"],
)
def test_bad_inversion_input_is_named(models, latent, context, message):
    """Each was a bare torch error (a group norm, a matmul)."""
    _, unet = models
    with pytest.raises(ValueError, match=message):
        invert_reference(unet, torch.zeros(latent), torch.zeros(context), steps=2, inversion_steps=2, progress=False)


def test_masks_from_points_take_the_official_point_mapping(models):
    """The method's masks are conductor_masks.masks_from_points' on the attention it records, with its
    official_cell passed on (32: the official SDXL code's cells, at half the coordinates)."""
    _, unet = models
    recorded = []

    def cluster(points, k):
        recorded.append(points)
        return kmeans(points, k, restarts=3)

    conductor = ConceptConductor(unet, ConductorSettings(steps=2), cluster=cluster)
    g = torch.Generator().manual_seed(3)
    reference = Reference(torch.randn(T, C, generator=g), {int(DiscreteSchedule().timesteps(2)[-1]): torch.randn(1, 4, 16, 16, generator=g)})
    points, size = [(100, 100), (20, 30)], (128, 128)
    for cell in (None, 64, 32):
        masks = conductor.masks_from_points(reference, points, size, (16, 16), k=4, official_cell=cell)
        expected = masks_from_points(recorded[-1], (8, 8), points, size, k=4, cluster=cluster, official_cell=cell)
        assert torch.equal(masks, masks_at(expected[None], (16, 16))[0])


@pytest.mark.parametrize(
    "change, message",
    [({"fuse_kinds": ("joint",)}, r"fuse_kinds must be a non-empty tuple of \['self', 'cross'\], got \('joint',\)"),
     ({"fuse_kinds": ()}, r"fuse_kinds must be a non-empty tuple"),
     ({"fuse_kinds": "self"}, r"fuse_kinds must be a non-empty tuple .*got 'self'"),
     ({"fuse_layers": ("up.9.0.0",)}, r"fuse_layers must be a non-empty tuple of \[.*'up.1.0.0'.*\], got \('up.9.0.0',\)"),
     ({"fuse_layers": ()}, r"fuse_layers must be a non-empty tuple"),
     ({"guidance_features": ("attention_probs",)}, r"guidance_features must be a non-empty tuple of \['x', 'q', 'k', 'v', 'out'\] .*'attention_probs' adds no gradient"),
     ({"fuse_features": ("k",)}, r"fuse_features must be a non-empty tuple of \['x', 'q', 'out'\] \(the official .*, got \('k',\)"),
     ({"eta": -0.5}, r"eta must be in \[0, 1\]"),
     ({"eta": 1.5}, r"eta must be in \[0, 1\] .* got 1.5"),
     ({"guidance_features": "out"}, r"guidance_features must be a non-empty tuple .*got 'out'"),
     ({"guidance_layers": ("up.1.0.0", "up.9.0.0")}, r"guidance_layers must be a non-empty tuple of \[.*\], got \('up.1.0.0', 'up.9.0.0'\)"),
     ({"guidance_layers": "up.1.0.0"}, r"guidance_layers must be a non-empty tuple .*got 'up.1.0.0'"),
     ({"mask_layer": "up.9.0.0"}, r"mask_layer='up.9.0.0' is not an attention layer of this UNet.*ConductorSettings.for_unet\(unet\) gives the official")],
    ids=["fuse-kind", "no-fuse-kind", "fuse-kind-string", "fuse-layer", "no-fuse-layer", "guidance-feature", "fuse-feature", "eta", "eta-above-1",
         "guidance-feature-string", "guidance-layer", "guidance-layer-string", "mask-layer"],
)
def test_bad_settings_are_named(models, change, message):
    _, unet = models
    with pytest.raises(ValueError, match=message):
        ConceptConductor(unet, ConductorSettings(**change))


def test_overlapping_masks_warn(models, inputs):
    _, unet = models
    first, second = inputs["concepts"]
    overlapping = Concept(second.context, second.uncond, second.low_rank, torch.ones(16, 16))
    with pytest.warns(UserWarning, match="overlap on 128 latent pixels"):
        ConceptConductor(unet, ConductorSettings(steps=1, guidance_end=-1)).check(
            inputs["z"], inputs["context"], inputs["uncond"], [first, overlapping], None
        )


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(16, 16), "concept 1's mask marks no latent pixel"),
    (torch.full((16, 16), 0.3), "concept 1's mask marks no latent pixel"),  # all below the 0.5 cut
    (torch.full((16, 16), float("nan")), r"concept 1's mask must hold values in \[0, 1\].*NaN"),
    (torch.full((16, 16), 2.0), r"must hold values in \[0, 1\] \(1: the concept's place\), got 2.0 to 2.0"),
])  # fmt: skip
def test_a_mask_that_would_drop_its_concept_is_refused(models, inputs, mask, message):
    """Masks are cut at 0.5 on every grid: an empty, faint or NaN mask would inject its concept nowhere."""
    _, unet = models
    first, second = inputs["concepts"]
    with pytest.raises(ValueError, match=message):
        ConceptConductor(unet, ConductorSettings(steps=1, guidance_end=-1)).check(
            inputs["z"], inputs["context"], inputs["uncond"], [first, Concept(second.context, second.uncond, second.low_rank, mask)], None
        )


def test_soft_masks_warn_of_overlap_only_where_they_are_applied(models, inputs):
    """Masks of 0.9 inside and 0.3 outside overlap nowhere once cut at 0.5, as they are applied; every
    pixel above 0 was taken as the concept's (a warning of 256 overlapping pixels)."""
    _, unet = models
    soft = [Concept(c.context, c.uncond, c.low_rank, 0.3 + 0.6 * c.mask) for c in inputs["concepts"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConceptConductor(unet, ConductorSettings(steps=1, guidance_end=-1)).check(inputs["z"], inputs["context"], inputs["uncond"], soft, None)


def test_inputs_that_could_not_run_together_are_named_before_any_step(models, inputs):
    """Each was a bare error (torch.stack, a slice index) or, for a mask on too few latent pixels, a
    concept fused nowhere on the coarser grids and replaced by an arbitrary cluster at refinement."""
    _, unet = models
    first, second = inputs["concepts"]
    conductor = ConceptConductor(unet, ConductorSettings(steps=1, guidance_end=-1))
    longer = Concept(torch.cat([second.context, second.context[:, :1]], 1), second.uncond, second.low_rank, second.mask)
    with pytest.raises(ValueError, match=r"different token counts \(the base context 5, .*concept 1's context 6"):
        conductor.check(inputs["z"], inputs["context"], inputs["uncond"], [first, longer], None)
    dot = torch.zeros(16, 16)
    dot[3, 3] = 1
    with pytest.raises(ValueError, match="concept 1's mask covers no cell of the 4x4 grid of the fused and refined layers"):
        conductor.check(inputs["z"], inputs["context"], inputs["uncond"], [first, Concept(second.context, second.uncond, [], dot)], None)
    with pytest.raises(ValueError, match="ConductorSettings.guidance_end must be a whole step number, got 2.5"):
        ConceptConductor(unet, ConductorSettings(steps=4, guidance_end=2.5))
    many = [Concept(first.context, first.uncond, [], torch.ones(8, 8)) for _ in range(8)]
    refining = ConceptConductor(unet, ConductorSettings(steps=2, guidance_end=-1, refine_start=0, refine_end=1, refine_interval=1))
    with pytest.raises(ValueError, match="8 concepts need 17 clusters at refinement, more than the 16 cells"):  # found after steps before
        refining.check(inputs["z"][..., :8, :8], inputs["context"], inputs["uncond"], many, None)


# ---------------------------------------------------------------- the command line, on toy-sd


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """Two random ED-LoRAs for toy-sd (7 cross-attention layers), a reference image and its masks."""
    import numpy as np
    from PIL import Image

    from minigen.loading.auto import load_pipeline
    from minigen.loading.edlora import EDLoRA, Factors, save_edlora
    from minigen.loading.keymaps_unet import unet_to_diffusers

    folder = tmp_path_factory.mktemp("conduct")
    pipe = load_pipeline("toy-sd")
    g = torch.Generator().manual_seed(0)
    weights = {k: v for k, v in pipe.unet.state_dict().items() if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))}
    width = pipe.text_encoders[0].config.hidden_size
    for i, word in enumerate(["<star1>", "<heart1>"]):
        unet = {k.removesuffix(".weight"): Factors(torch.randn(2, v.shape[1], generator=g) * 0.05, torch.randn(v.shape[0], 2, generator=g) * 0.05)
                for k, v in unet_to_diffusers(weights, pipe.unet.config).items()}  # fmt: skip
        save_edlora(EDLoRA({word: torch.randn(7, width, generator=g) * 0.01}, unet, {}, base="sd1"), folder / f"c{i}.safetensors")
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32], image[:, 32:] = (200, 50, 50), (50, 50, 200)
    Image.fromarray(image).save(folder / "ref.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(folder / "m0.png")
    Image.fromarray(255 - mask).save(folder / "m1.png")
    Image.fromarray(mask[:32, :32]).save(folder / "small.png")
    return folder


def conduct(folder, *extra, concepts=(("a <star1> on grass", "c0", "m0"), ("a <heart1> on grass", "c1", "m1"))):
    import importlib.util

    spec = importlib.util.spec_from_file_location("conduct", REPO_SCRIPTS / "conduct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--reference", str(folder / "ref.png"), "--reference-prompt", "a red star and a blue heart",
            "--prompt", "a red star and a blue heart on grass", "--steps", "2", "--no-layout"]  # fmt: skip
    for prompt, lora, mask in concepts:
        args += ["--concept", prompt, str(folder / f"{lora}.safetensors"), mask if "," in mask else str(folder / f"{mask}.png")]  # a point X,Y as is
    return module.run([*args, *extra])


REPO_SCRIPTS = REPO / "scripts"


def test_the_command_line_writes_the_image_and_the_masks(toy_files, tmp_path):
    """toy-sd, 2 steps: a 64x64 PNG and the mask grid (one row, two concept columns of 16x16 cells, 8x)."""
    from PIL import Image

    assert conduct(toy_files, "--out", str(tmp_path / "out.png"), "--save-masks") == 0
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)
    with Image.open(tmp_path / "out-masks.png") as masks:
        assert masks.size == (2 * 16 * 8, 16 * 8)
        grid = torch.tensor(__import__("numpy").array(masks.convert("L")), dtype=torch.float32)  # [128, 256]
    assert grid[:, :64].mean() == 255 and grid[:, 64:128].mean() == 0  # concept 0: the left half
    assert grid[:, 128:192].mean() == 0 and grid[:, 192:].mean() == 255  # concept 1: the right half


@pytest.mark.parametrize(
    "concepts, message",
    [
        ((("a star on grass", "c0", "m0"), ("a <heart1> on grass", "c1", "m1")), "concept words \\['<star1>'\\] do not occur"),
        ((("a <star1> on grass", "c0", "small"), ("a <heart1> on grass", "c1", "m1")), "is 32x32 but the reference image is 64x64"),
    ],
    ids=["word-not-in-prompt", "mask-size"],
)
def test_the_command_line_names_bad_input(toy_files, tmp_path, capsys, concepts, message):
    assert conduct(toy_files, "--out", str(tmp_path / "out.png"), concepts=concepts) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and err.count("\n") == 1


def test_the_command_line_refuses_bad_paths_and_sizes_before_loading_the_model(toy_files, tmp_path, capsys, monkeypatch):
    """A taken masks file, a missing mask, a missing ED-LoRA, --size 0, a missing reference, an init image
    without its mask, a missing init image, a reference cut short, a mask of another size, a point outside
    the reference, a --cache that is or lies under a file, masks cut short and all-black masks end in one line
    before the model loads (loading it would fail the test)."""
    from PIL import Image

    import minigen.loading.auto

    monkeypatch.setattr(minigen.loading.auto, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "out-masks.png").write_bytes(b"taken")
    cases = [
        (["--out", str(tmp_path / "out.png"), "--save-masks"], {}, "out-masks.png exists"),
        (["--out", str(tmp_path / "a.png")], {"concepts": (("a <star1> on grass", "c0", "missing"),)}, "missing.png not found"),
        (["--out", str(tmp_path / "b.png")], {"concepts": (("a <star1> on grass", "absent", "m0"),)}, "absent.safetensors"),
        (["--out", str(tmp_path / "c.png"), "--size", "0"], {}, "argument --size: 0 is not positive; give 1 or more"),
        (["--out", str(tmp_path / "d.png"), "--reference", str(tmp_path / "none.png")], {}, "none.png not found; give the reference image"),
        (["--out", str(tmp_path / "e.png"), "--init-image", str(toy_files / "ref.png")], {}, "needs both --init-image and --init-mask"),
        (["--out", str(tmp_path / "f.png"), "--init-image", str(tmp_path / "no.png"), "--init-mask", str(toy_files / "m0.png")], {}, "--init-image"),
        (["--out", str(tmp_path / "g.png"), "--reference", str(tmp_path / "half.png")], {}, "half.png: cannot be read as an image"),
        (["--out", str(tmp_path / "h.png")], {"concepts": (("a <star1> on grass", "c0", "small"),)}, "is 32x32 but the reference image is 64x64"),
        (["--out", str(tmp_path / "i.png")], {"concepts": (("a <star1> on grass", "c0", "999,999"),)}, "the point 999,999 lies outside the reference"),
        (["--out", str(tmp_path / "j.png"), "--cache", str(toy_files / "ref.png")], {}, "ref.png is a file, and --cache names a folder"),
        (["--out", str(tmp_path / "k.png"), "--cache", str(toy_files / "ref.png" / "sub")], {}, "is a file, so nothing can be written under it"),
        (["--out", str(tmp_path / "l.png")], {"concepts": (("a <star1> on grass", "c0", str(tmp_path / "half-mask")),)}, "half-mask.png: cannot be read"),
        (["--out", str(tmp_path / "m.png"), "--init-image", str(toy_files / "ref.png"), "--init-mask", str(tmp_path / "half-mask.png")], {},
         "half-mask.png: cannot be read as an image"),
        (["--out", str(tmp_path / "n.png")], {"concepts": (("a <star1> on grass", "c0", str(tmp_path / "black")),)},
         "black.png has no white pixel (none above 127, where masks are cut): paint the concept's region white"),
        (["--out", str(tmp_path / "o.png"), "--init-image", str(toy_files / "ref.png"), "--init-mask", str(tmp_path / "black.png")], {},
         "--init-mask " + str(tmp_path / "black.png") + " has no white pixel (none above 127, where masks are cut): paint the region to redraw white"),
    ]  # h and i were found after the model and the inversion (22 s on toy-sd; minutes to hours on SD1.5), j to n after the inversion;
    # o was never found: the image came back unchanged
    whole = (toy_files / "ref.png").read_bytes()
    (tmp_path / "half.png").write_bytes(whole[: len(whole) // 2])  # cut short: was "image file is truncated", after loading the model
    mask = (toy_files / "m0.png").read_bytes()
    (tmp_path / "half-mask.png").write_bytes(mask[: len(mask) * 2 // 3])  # its header intact: Image.open alone takes it
    Image.new("L", (64, 64)).save(tmp_path / "black.png")
    for extra, concepts, message in cases:
        assert conduct(toy_files, *extra, **concepts) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_the_command_line_refuses_masks_that_vanish_on_the_latent_grid_before_the_inversion(toy_files, tmp_path, capsys, monkeypatch):
    """A mask or --init-mask whose one white pixel vanishes on toy-sd's 16x16 latent grid (resized as the
    official code: bilinear, cut at 127) passes the file check; it was refused after the reference's inversion
    (minutes on SD1.5), which a point (concept 1 here) always runs; now before it."""
    from PIL import Image

    import minigen.methods.concept_conductor

    monkeypatch.setattr(minigen.methods.concept_conductor, "invert_reference", lambda *a, **k: pytest.fail("inverted"))
    dot = Image.new("L", (64, 64))
    dot.putpixel((10, 10), 255)
    dot.save(tmp_path / "dot.png")
    concepts = (("a <star1> on grass", "c0", str(tmp_path / "dot")), ("a <heart1> on grass", "c1", "48,32"))
    assert conduct(toy_files, "--out", str(tmp_path / "a.png"), concepts=concepts) == 2
    err = capsys.readouterr().err
    assert "dot.png marks no latent pixel (none above 0.5, where the masks are cut)" in err and err.count("\n") == 1, err
    concepts = (("a <star1> on grass", "c0", "m0"), ("a <heart1> on grass", "c1", "48,32"))
    init = ["--init-image", str(toy_files / "ref.png"), "--init-mask", str(tmp_path / "dot.png")]
    assert conduct(toy_files, "--out", str(tmp_path / "b.png"), *init, concepts=concepts) == 2
    err = capsys.readouterr().err
    assert "dot.png (resized as the official code resizes it) marks no pixel of the 16x16 latent grid: nothing would be redrawn" in err and err.count("\n") == 1, err


def test_the_command_line_refuses_a_size_beyond_memory_before_the_inversion(toy_files, tmp_path, capsys, monkeypatch):
    """--size 100000 ran until the kernel killed it (sample.py refused it at once): the estimate stops it first."""
    import minigen.methods.concept_conductor

    monkeypatch.setattr(minigen.methods.concept_conductor, "invert_reference", lambda *a, **k: pytest.fail("inverted"))
    assert conduct(toy_files, "--out", str(tmp_path / "a.png"), "--size", "100000") == 2
    err = capsys.readouterr().err
    assert "Concept Conductor at 100000x100000 needs about" in err and "--no-memory-check" in err and err.count("\n") == 1


def test_the_command_line_says_when_the_official_refinement_window_is_past_its_steps(toy_files, tmp_path, capsys):
    """The official windows are step numbers (refinement at 50-80 of 200): with 2 steps --no-refine would
    change nothing (the images were identical) and is refused; without it a note says the masks stay."""
    from PIL import Image

    assert conduct(toy_files, "--out", str(tmp_path / "a.png"), "--no-refine") == 2
    assert "--no-refine: with --steps 2 mask refinement (steps 50-80 of the official 200) never runs anyway" in capsys.readouterr().err
    assert conduct(toy_files, "--out", str(tmp_path / "b.png")) == 0
    assert "note: with --steps 2 mask refinement (steps 50-80 of the official 200) does not run" in capsys.readouterr().err
    with Image.open(tmp_path / "b.png") as image:
        settings = image.info["parameters"]
    assert "Alpha: 0.7" in settings and "Layout alignment: off" in settings  # conduct() runs --no-layout


def test_the_command_line_places_the_concepts_into_an_image(toy_files, tmp_path):
    """--init-image / --init-mask on toy-sd, 2 steps. Metric: mean abs difference to the init image on
    0-255, outside the mask and 8 px from its edge. The latent there is the image's exactly (the API test
    above), so what remains is the autoencoder's error on this out-of-domain image (about 15-18 by itself)
    and the decoder's attention, which reads the whole latent; without placement the same seed is 4x
    further away."""
    import numpy as np
    from PIL import Image

    init = np.zeros((64, 64, 3), np.uint8)
    init[:, :32], init[:, 32:] = (90, 160, 70), (220, 190, 120)  # grass and sand
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "init-mask.png")
    assert conduct(toy_files, "--out", str(tmp_path / "placed.png"), "--init-image", str(tmp_path / "init.png"), "--init-mask", str(tmp_path / "init-mask.png")) == 0
    assert conduct(toy_files, "--out", str(tmp_path / "free.png")) == 0
    outside = np.ones((64, 64), bool)
    outside[8:56, 8:56] = False
    difference = {}
    for name in ("placed", "free"):
        with Image.open(tmp_path / f"{name}.png") as image:
            difference[name] = np.abs(np.asarray(image.convert("RGB"), np.float32) - init)[outside].mean()
    assert difference["placed"] < 20 and difference["free"] > 45, difference


def test_loss_mask_weighs_the_key_error_by_the_layout_masks(models, inputs):
    """use_loss_mask: each token's squared key error counts as often as layout masks cover it (a
    recomputation from the captured keys and the masks resized to the guided 4x4 grid)."""
    _, unet = models
    concepts = inputs["concepts"]
    rows = Rows(1 + CONCEPTS, BATCH)
    reference = Reference(inputs["ref_context"], {901: torch.randn(1, 4, 16, 16)})
    conductor = ConceptConductor(unet, ConductorSettings(steps=10, loss_mask=True))
    with torch.no_grad():
        keys = conductor.layout_features(inputs["z"].clone(), 901, rows, inputs["context"], concepts, reference)["up.1.0.0"]["k"]
    weight = official_masks(torch.stack([c.mask for c in concepts])[None], (4,))[4].float().sum(1).flatten(1)[..., None]
    errors = [((keys[1 + p * BATCH : 1 + (p + 1) * BATCH] - keys[:1]) ** 2 * weight).sum(0).mean() for p in range(3)]
    expected = errors[0] + (errors[1] + errors[2]) / 2
    assert abs(conductor.layout_loss({"up.1.0.0": {"k": keys}}, rows, {"up.1.0.0": weight}) - expected) < 1e-6 * expected
    z = inputs["z"].clone()
    left_only = [concepts[0], Concept(concepts[1].context, concepts[1].uncond, concepts[1].low_rank, torch.zeros(16, 16))]
    plain = ConceptConductor(unet, ConductorSettings(steps=10)).align_layout(z, 901, rows, inputs["context"], left_only, reference)
    masked = conductor.align_layout(z, 901, rows, inputs["context"], left_only, reference)
    assert (plain - masked).abs().max() > 1e-6  # the right half's error no longer counts


def test_rect_masks_turn_the_trackers_into_boxes(models):
    """rect_mask: refinement skips clustering; each tracker becomes its bounding box, and the fusion masks
    their union (here one concept, so no overlap)."""
    _, unet = models
    conductor = ConceptConductor(unet, ConductorSettings(rect_masks=True), cluster=lambda p, k: pytest.fail("no clustering"))
    tracker = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    tracker[0, 0, 2, 3] = tracker[0, 0, 5, 1] = True
    trackers = {"custom": tracker.clone(), "base": tracker.clone()}
    fused = conductor.refine(torch.zeros(2, 64, 64), Rows(2, 1), trackers, {(8, 8): tracker.clone()}, (8, 8))
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[2:6, 1:4] = True
    assert torch.equal(trackers["custom"][0, 0], box) and torch.equal(fused[(8, 8)][0, 0], box)


def test_sdxl_paths_read_their_own_vectors_and_loras():
    """A tiny SDXL-topology UNet: the base rows of a generation call (masks empty) equal the plain UNet on
    the base text and vector; a concept's guidance keys equal those of a deep copy with its LoRA merged,
    on its layer-wise contexts and its vector; without vectors the run is refused."""
    from conftest import TINY_SDXL_UNET

    from minigen.controls import CaptureFeatures, Controls
    from minigen.loading.lora_files import merge
    from minigen.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(TINY_SDXL_UNET).eval()
    settings = ConductorSettings.for_unet(unet, steps=4, guidance_end=0, refine_start=9)
    conductor = ConceptConductor(unet, settings)
    g = torch.Generator().manual_seed(3)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    D, L = TINY_SDXL_UNET.adm_in_channels, len(conductor.cross_layers)
    targets = [p for p, m in unet.named_modules() if p.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    left = (torch.arange(8) < 4).float().expand(8, 8)  # the layout: concept 0 left, concept 1 right
    concepts = [
        Concept(randn(L, T, C), randn(L, T, C), [LowRank(p, randn(2, unet.get_submodule(p).weight.shape[1]) * 0.3, randn(unet.get_submodule(p).weight.shape[0], 2) * 0.3, ALPHA) for p in targets],
                mask, randn(D), randn(D))  # fmt: skip
        for mask in (left, 1 - left)
    ]
    context, uncond, y, y_uncond, z = randn(T, C), randn(T, C), randn(D), randn(D), randn(1, 4, 8, 8)
    rows = Rows(3, 1)
    with torch.no_grad():
        generation = conductor.generation_inputs(rows, context, uncond, concepts)
        vectors = conductor.vectors(rows, [Concept(context, uncond, (), None, y, y_uncond), *concepts], rows.generation, (False, True))
        empty = {grid: torch.zeros(1, 2, *grid, dtype=torch.bool) for grid in set(conductor.layer_grids((8, 8)).values())}
        eps = conductor.guided_eps(z, 901, rows, generation, empty, conductor.layer_grids((8, 8)), None, vectors)
        t = torch.tensor([901.0, 901.0])
        cond, un = unet(torch.cat([z, z]), t, torch.stack([context, uncond]), y=torch.stack([y, y_uncond])).chunk(2)
    assert (eps - (un + settings.cfg * (cond - un))).abs().max() < TOL

    reference = Reference(randn(T, C), {901: randn(1, 4, 8, 8)}, randn(D))
    guidance_y = torch.stack([reference.y, y, concepts[0].y, concepts[1].y])
    with torch.no_grad():
        keys = conductor.layout_features(z.clone(), 901, rows, context, concepts, reference, guidance_y)[settings.guidance_layers[0]]["k"]
        merged = copy.deepcopy(unet)
        merge(merged, list(concepts[1].low_rank))
        capture = CaptureFeatures(layers=set(settings.guidance_layers), kind="self")
        merged(z, torch.tensor([901.0]), None, y=concepts[1].y[None],
               controls=Controls(contexts={l: concepts[1].context[i][None] for i, l in enumerate(conductor.cross_layers)}, capture=[capture]))  # fmt: skip
    assert (keys[rows.guidance(2, 0)] - capture.features[settings.guidance_layers[0]]["k"][0]).abs().max() < TOL
    with pytest.raises(ValueError, match="needs the vector y"):
        conductor.sample(z, context, uncond, concepts, Reference(reference.context, {751: z}, reference.y), progress=False)
    # without layout alignment a reference without a vector is allowed, and nothing reads it (a TypeError built its vectors)
    no_layout = ConceptConductor(unet, replace(settings, guidance_end=-1))
    with torch.no_grad():
        out = no_layout.sample(z, context, uncond, concepts, Reference(reference.context, {}), y=y, y_uncond=y_uncond, progress=False)
        assert torch.equal(out, no_layout.sample(z, context, uncond, concepts, None, y=y, y_uncond=y_uncond, progress=False))


def test_the_toy_study_matches_objects_to_concepts_one_to_one():
    """scripts/evaluate_conductor.py: each concept gets the judged object with most of its traits, never the
    same object twice; a missing object is None. Checked on hand-made judged objects."""
    import importlib.util
    from types import SimpleNamespace

    from minigen.toy import world

    spec = importlib.util.spec_from_file_location("evaluate_conductor", REPO_SCRIPTS / "evaluate_conductor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    first, second = world.concept("my_heart"), world.concept("my_heart_2")
    looks_like = lambda c: SimpleNamespace(shape=c.shape, color=c.color, pattern=c.pattern, pattern_color=c.pattern_color)  # noqa: E731
    a, b = looks_like(first), looks_like(second)
    assert script.match([b, a], [first, second]) == [a, b]
    assert script.match([a], [first, second]) == [a, None]
    hybrid = SimpleNamespace(shape="heart", color=first.color, pattern=second.pattern, pattern_color=second.pattern_color)
    assert script.match([hybrid, a], [first, second]) == [a, hybrid]  # the hybrid carries more of the second


def test_the_toy_study_refuses_an_earlier_runs_outputs_unless_forced(tmp_path):
    """scripts/evaluate_conductor.py keeps an earlier run's images and table unless --force; checked before any work."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_conductor", REPO_SCRIPTS / "evaluate_conductor.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "table.md").write_text("an earlier table\n")
    with pytest.raises(SystemExit, match=re.escape("holds an earlier run's table.md; give another --work, or pass --force")):
        script.parse(["--work", str(tmp_path)])
    assert script.parse(["--work", str(tmp_path), "--force"]).force


def test_the_command_line_names_a_prompt_without_its_words_before_the_inversion(toy_files, tmp_path, capsys, monkeypatch):
    """A point mask asks for the reference's inversion (999 steps on a real model); a concept prompt that
    lacks its ED-LoRA's words is refused before it (the inversion would fail the test)."""
    import minigen.methods.concept_conductor

    monkeypatch.setattr(minigen.methods.concept_conductor, "invert_reference", lambda *a, **k: pytest.fail("the reference was inverted"))
    point = ["--concept", "a star on grass", str(toy_files / "c0.safetensors"), "16,32"]  # the word <star1> left out
    assert conduct(toy_files, "--out", str(tmp_path / "out.png"), *point, concepts=(("a <heart1> on grass", "c1", "m1"),)) == 2
    err = capsys.readouterr().err
    assert re.search("concept words \\['<star1>'\\] do not occur", err) and err.count("\n") == 1, err


def test_the_command_line_keeps_inversions_in_the_cache_folder(toy_files, tmp_path, monkeypatch):
    """--cache names the folder of the reference's inversions (they went to ./runs/conductor/inversions
    whatever --out said). A point mask asks for the inversion, cut to 2 steps here."""
    import minigen.methods.concept_conductor

    invert = minigen.methods.concept_conductor.invert_reference
    monkeypatch.setattr(minigen.methods.concept_conductor, "invert_reference", lambda *a, **k: invert(*a, **k, inversion_steps=2))
    monkeypatch.chdir(tmp_path)
    point = ("a <star1> on grass", "c0", "16,32")
    assert conduct(toy_files, "--out", str(tmp_path / "out.png"), "--cache", str(tmp_path / "cache"), concepts=(point,)) == 0
    assert len(list((tmp_path / "cache").glob("inversion-*.safetensors"))) == 1 and not (tmp_path / "runs").exists()


def test_the_command_line_stops_at_the_first_step_that_overflows(toy_files, tmp_path, capsys):
    """--alpha 1e30 (the ED-LoRA merge weight) ran every step to a NaN image, and the VAE's decode then
    advised fp16 fixes for this fp32 model; the conductor now names the step and the scale."""
    assert conduct(toy_files, "--out", str(tmp_path / "out.png"), "--alpha", "1e30") == 2
    err = capsys.readouterr().err
    assert "error: Concept Conductor stopped: step 1 of 2 produced non-finite values" in err and "here up to 1e+30" in err, err
    assert "autoencoder" not in err and not (tmp_path / "out.png").exists()
