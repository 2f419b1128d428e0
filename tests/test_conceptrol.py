"""Conceptrol's mask logic written as clients of the public controls API, against independent references.

Each client is a plain object whose bound methods go into `Controls` (no hooks, no globals), in the
way the Conceptrol method module will package them. The references are diffusers models whose
attention processors are written out here the way the official code patches diffusers: module-style
state, an explicit softmax, the official order of operations (../shared/notes/conceptrol.md §2, §3).

- SD: global concept mask from one layer; layers run before it use the previous step's mask, and their
  own local mask at step 0; nearest resize to every other layer's grid (up- and down-sampling); the mask
  gates the IP-Adapter branch before to_out; warmup steps run the IP branch at scale 0.
  Reference: diffusers UNet2DConditionModel, fp32. Tolerances: noise predictions 1e-4, masks 1e-5.
- FLUX: the log-mask bias over [text | image | condition] rebuilt after every extraction, which happens at
  every `every`-th block call (so also inside one forward, taking effect from the next call); non-concept
  text rows blocked from the condition with -1e7; λ = 0.5 during warmup.
  Reference: diffusers FluxTransformer2DModel with the condition appended to the image tokens, fp32.
  Tolerances: velocities 1e-5, masks 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from minigen.controls import AttentionBias, BatchLayout, Controls, ExtraTokens, RecordAttention, resize_mask  # noqa: E402
from minigen.loading.coverage import load_exact  # noqa: E402
from minigen.methods import conceptrol as methods  # noqa: E402
from minigen.loading.keymaps_flux import flux_from_diffusers  # noqa: E402
from minigen.models.flux import Flux  # noqa: E402
from minigen.models.flux_config import FluxConfig  # noqa: E402
from minigen.models.flux_tokens import TokenGroup, image_ids, text_ids  # noqa: E402

from conftest import tiny_diffusers_unet, unet_twin  # noqa: E402

# ================================================================ SD: the client (35 lines)


class ConceptrolSD:
    """Gate each cross-attention layer's IP branch with the textual concept mask (official behaviour)."""

    def __init__(self, concept_layer, span, ip_tokens, projections, scale, warmup_steps, global_masking=True):
        self.concept_layer, self.span, self.global_masking = concept_layer, span, global_masking
        self.ip_tokens, self.projections, self.scale, self.warmup_steps = ip_tokens, projections, scale, warmup_steps
        self.global_mask, self.local_mask = None, None  # the concept layer's mask persists across steps

    def controls(self, step: int) -> Controls:
        record = RecordAttention(kind="cross", tokens=self.span, sink=self.keep)
        scale = 0.0 if step < self.warmup_steps else self.scale
        return Controls(record=[record], extra_tokens=[ExtraTokens(self.ip_tokens, self.projections, scale, gate=self.gate)])

    def keep(self, site, probs):  # (a) after the text softmax: probs [B, 1 (heads averaged), N, |span|]
        mask = probs.mean(-1)[site.layout.cond[0]]  # the conditional row's, for every row
        mask = mask / (mask.amax(-1, keepdim=True) + 1e-6)
        self.local_mask = mask.view(1, 1, *site.grid)
        if site.layer == self.concept_layer:
            self.global_mask = self.local_mask

    def gate(self, site):  # (c) the same call, after keep
        if self.global_masking and self.global_mask is not None and site.layer != self.concept_layer:
            return resize_mask(self.global_mask, site.grid, "nearest")
        return self.local_mask


# ================================================================ SD: the reference


class ReferenceConceptrolProcessor:
    """The official ConceptrolAttnProcessor's arithmetic for one attn2, on diffusers' Attention: the
    IP tokens after the text are one group per concept, each gated by its concept's mask."""

    def __init__(self, name, state, to_k_ip, to_v_ip):
        self.name, self.state, self.to_k_ip, self.to_v_ip = name, state, to_k_ip, to_v_ip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state
        text, ip = encoder_hidden_states[:, : s["text_length"]], encoder_hidden_states[:, s["text_length"] :]

        def heads(t):
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        probs = (q @ heads(attn.to_k(text)).transpose(-1, -2) * attn.scale).softmax(-1)  # [B, H, N, 77]
        out = probs @ heads(attn.to_v(text))
        for i, (span, group) in enumerate(zip(s["spans"], ip.chunk(len(s["spans"]), dim=1))):
            mask = probs[..., span].mean(-1).mean(1)[1:2]  # tokens, then heads; row 1 = the conditional half
            mask = mask / (mask.amax(-1, keepdim=True) + 1e-6)  # [1, N]
            if self.name == s["concept"]:
                s["global"][i] = mask
            elif s["global"][i] is not None:
                side, n = math.isqrt(s["global"][i].shape[-1]), math.isqrt(mask.shape[-1])
                mask = F.interpolate(s["global"][i].view(1, 1, side, side), size=(n, n), mode="nearest").view(1, -1)
            s["masks"].append((self.name, mask))
            ip_out = (q @ heads(self.to_k_ip(group)).transpose(-1, -2) * attn.scale).softmax(-1) @ heads(self.to_v_ip(group))
            out = out + s["scale"] * ip_out * mask[:, None, :, None]
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


def diffusers_name(layer_id: str) -> str:
    """minigen's "up.1.0.0" -> diffusers' "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"."""
    part, *index = layer_id.split(".")
    block = "mid_block" if part == "mid" else f"{part}_blocks.{index.pop(0)}"
    return f"{block}.attentions.{index[0]}.transformer_blocks.{index[1]}.attn2.processor"


def sd_models():
    """A tiny SD1.5-like diffusers UNet, the same weights in minigen's UNet, and random IP projections."""
    ref = tiny_diffusers_unet("sd15-like")
    unet = unet_twin(ref)
    dims = {layer: unet.get_submodule(path).attn2.to_q.out_features for layer, path in unet.attention_layers().items()}
    projections = {layer: (torch.nn.Linear(32, d, bias=False), torch.nn.Linear(32, d, bias=False)) for layer, d in dims.items()}
    for to_k, to_v in projections.values():
        torch.nn.init.normal_(to_k.weight, std=0.3), torch.nn.init.normal_(to_v.weight, std=0.3)
    return unet, ref, projections


def install_reference(ref, projections, state):
    processors = {name: AttnProcessor() for name in ref.attn_processors}
    processors.update({diffusers_name(layer): ReferenceConceptrolProcessor(diffusers_name(layer), state, *projections[layer])
                       for layer in projections})  # fmt: skip
    ref.set_attn_processor(processors)


@pytest.mark.parametrize("implementation", ["client", "method"])
def test_conceptrol_sd_equals_the_official_arithmetic(implementation):
    """The test client above, and minigen.methods.conceptrol.ConceptrolSD, against the reference."""
    unet, ref, projections = sd_models()
    g = torch.Generator().manual_seed(1)
    text, ip = torch.randn(2, 7, 32, generator=g), torch.randn(2, 4, 32, generator=g)  # rows [uncond, cond]
    concept, span, scale, warmup = "up.0.1.0", [2, 3], 1.5, 1  # an 8x8 concept layer: other layers are 16x16 or 8x8

    if implementation == "client":
        ours_method = ConceptrolSD(concept, torch.tensor(span), ip, projections, scale, warmup)
        concept_mask = lambda: ours_method.global_mask  # noqa: E731
    else:
        ours_method = methods.ConceptrolSD(projections, [methods.SDConcept(span, ip)], steps=3, concept_layer=concept,
                                           scale=scale, warmup=warmup / 3)  # fmt: skip
        concept_mask = lambda: ours_method.masks()[0]  # noqa: E731
    state = {"text_length": 7, "spans": [span], "concept": diffusers_name(concept), "global": [None], "masks": []}
    install_reference(ref, projections, state)

    x = torch.randn(2, 4, 16, 16, generator=g)
    ours_masks = []
    step0_global = None  # step 0's 8x8 concept mask, which step 1's down layers read
    for step, t in enumerate([900.0, 500.0, 100.0]):
        state["scale"], state["masks"] = (0.0 if step < warmup else scale), []
        controls = ours_method.controls(step).at_step(step, BatchLayout.cfg(1))
        for tokens in controls.extra_tokens:  # keep what each layer's gate gives (the method has none in warmup)

            def gate_and_keep(site, gate=tokens.gate):
                ours_masks.append((site.layer, gate(site)))
                return ours_masks[-1][1]

            tokens.gate = gate_and_keep
        with torch.no_grad():
            ours = unet(x, torch.tensor([t, t]), text, controls=controls)
            theirs = ref(x, torch.tensor([t, t]), torch.cat([text, ip], dim=1)).sample
        assert (ours - theirs).abs().max() <= 1e-4
        assert (concept_mask()[-1].flatten() - state["global"][0].flatten()).abs().max() <= 1e-5
        if ours_masks:
            assert [diffusers_name(layer) for layer, _ in ours_masks] == [name for name, _ in state["masks"]]
            for (_, mine), (_, official) in zip(ours_masks, state["masks"]):
                assert (mine[-1].flatten() - official.flatten()).abs().max() <= 1e-5
        if step == 1:  # the down layers (16x16) read step 0's 8x8 concept mask, upsampled: not their own
            assert state["masks"][0][1].view(16, 16)[::2, ::2].equal(step0_global.view(8, 8))
        step0_global = state["global"][0].clone()
        ours_masks.clear()
        x = x - 0.1 * ours


def test_conceptrol_sd_with_two_concepts_and_without_global_masking():
    """Two (span, IP tokens) pairs as the official code runs them (its IP tokens one group per concept),
    and global_masking off (every layer its own mask): noise predictions within 1e-4 over 3 steps."""
    unet, ref, projections = sd_models()
    g = torch.Generator().manual_seed(2)
    text, ips = torch.randn(2, 7, 32, generator=g), [torch.randn(2, 4, 32, generator=g) for _ in range(2)]
    spans = [[1], [4, 5]]
    for global_masking in (True, False):
        method = methods.ConceptrolSD(projections, [methods.SDConcept(s, ip) for s, ip in zip(spans, ips)], steps=3,
                                      concept_layer="up.1.0.0" if global_masking else None, scale=1.2, warmup=0.0,
                                      global_masking=global_masking)  # fmt: skip
        state = {"text_length": 7, "spans": spans, "concept": diffusers_name("up.1.0.0") if global_masking else None,
                 "global": [None, None], "scale": 1.2, "masks": []}  # fmt: skip
        install_reference(ref, projections, state)
        x = torch.randn(2, 4, 16, 16, generator=g)
        for step, t in enumerate([900.0, 500.0, 100.0]):
            with torch.no_grad():
                ours = unet(x, torch.tensor([t, t]), text, controls=method.controls(step).at_step(step, BatchLayout.cfg(1)))
                theirs = ref(x, torch.tensor([t, t]), torch.cat([text, *ips], dim=1)).sample
            assert (ours - theirs).abs().max() <= 1e-4
            x = x - 0.1 * ours


def test_a_new_or_reused_method_starts_without_masks():
    """The masks live in the method, not in the (shareable) concepts: a second generation with a fresh
    ConceptrolSD on the same SDConcept list gives exactly the first one's outputs; so does the same
    method run again (it clears its masks at step 0, as the official pipeline clears its global mask)."""
    unet, _, projections = sd_models()
    g = torch.Generator().manual_seed(5)
    text, ip, x = torch.randn(2, 7, 32, generator=g), torch.randn(2, 4, 32, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    concepts = [methods.SDConcept([2, 3], ip)]

    def generation(method=None):
        method = method or methods.ConceptrolSD(projections, concepts, steps=2, concept_layer="up.0.1.0", warmup=0.0)
        with torch.no_grad():
            return [unet(x, torch.tensor([t, t]), text, controls=method.controls(step).at_step(step, BatchLayout.cfg(1)))
                    for step, t in enumerate([900.0, 500.0])]

    first, second = generation(), generation()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    reused = methods.ConceptrolSD(projections, concepts, steps=2, concept_layer="up.0.1.0", warmup=0.0)
    generation(reused)
    assert all(torch.equal(a, b) for a, b in zip(first, generation(reused)))


def test_conceptrol_flux_counts_every_block_of_a_forward_the_step_cache_cut_short():
    """A first-block-cache call runs one block, yet the official period counts the model's blocks: the
    extraction blocks stay where they are in every forward."""
    from minigen.controls import Site

    layers = ["double_blocks.0", "double_blocks.1", *(f"single_blocks.{i}" for i in range(4))]
    method = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3)
    before = method.extract_at()
    method.count_calls(Site("", None, call=1, step=1, layout=None, grid=None))  # a skipped call: one block ran
    assert method.extract_at() == before == ["double_blocks.1", "single_blocks.1", "single_blocks.3"]


def test_conceptrol_sd_batch_rows_equal_single_runs():
    """Beyond the official code (one prompt): a CFG batch of two images gives each image what it gets alone
    (each row's mask from its own conditional row), within 1e-5."""
    unet, _, projections = sd_models()
    g = torch.Generator().manual_seed(3)
    texts, ips = torch.randn(2, 2, 7, 32, generator=g), torch.randn(2, 2, 4, 32, generator=g)  # [image][uncond, cond]
    xs = torch.randn(2, 4, 16, 16, generator=g)
    alone = []
    for i in range(2):
        method = methods.ConceptrolSD(projections, [methods.SDConcept([2, 3], ips[i])], steps=2, concept_layer="up.0.1.0", warmup=0.0)
        with torch.no_grad():
            for step in range(2):
                out = unet(torch.stack([xs[i]] * 2), torch.tensor([700.0] * 2), texts[i], controls=method.controls(step).at_step(step, BatchLayout.cfg(1)))
        alone.append(out)
    batch = lambda t: torch.cat([t[:, 0], t[:, 1]])  # noqa: E731  [uncond 0, uncond 1, cond 0, cond 1]
    method = methods.ConceptrolSD(projections, [methods.SDConcept([2, 3], batch(ips))], steps=2, concept_layer="up.0.1.0", warmup=0.0)
    with torch.no_grad():
        for step in range(2):
            out = unet(torch.cat([xs, xs]), torch.tensor([700.0] * 4), batch(texts), controls=method.controls(step).at_step(step, BatchLayout.cfg(2)))
    for i in range(2):
        assert (out[[i, 2 + i]] - alone[i]).abs().max() <= 1e-5


# ================================================================ FLUX: the client (38 lines)


class ConceptrolFlux:
    """The log concept mask as a bias on image -> condition attention (official 'code' behaviour)."""

    def __init__(self, layers, span, every, at, condition_scale, warmup_steps):
        self.span, self.scale, self.warmup_steps = span, condition_scale, warmup_steps
        self.extract_at = [layer for i, layer in enumerate(layers) if i % every == at]  # every `every`-th block call
        self.log_mask = None  # [B, N]: kept from one call (and step) to the next

    def controls(self, step: int) -> Controls:
        self.log_lambda = math.log(0.5 if step < self.warmup_steps else self.scale)
        record = RecordAttention(kind="joint", layers=self.extract_at, mean_heads=False, sink=self.extract)
        return Controls(record=[record], bias=[AttentionBias(self.bias, kind="joint")])

    def bias(self, site):  # (b) before the logits of every block call
        text = site.groups["txt"].stop
        concept_rows = torch.zeros(text, 1, dtype=torch.bool)
        concept_rows[self.span] = True
        text_rows = torch.where(concept_rows, self.log_lambda, -1e7)  # other text rows cannot see the condition
        image = self.log_lambda if self.log_mask is None else self.log_lambda + self.log_mask[:, None, :, None]
        return {("txt", "cond"): text_rows, ("img", "cond"): image, ("cond", "img"): self.log_lambda}

    def extract(self, site, probs):  # (a) after the softmax of an extraction call: [B, H, L, L]
        text, image = site.groups["txt"], site.groups["img"]
        to_text = probs[:, :, image, text]  # image queries -> text keys
        share = to_text[..., self.span] / to_text.sum(-1, keepdim=True)  # of the text attention
        mask = share.mean(dim=(1, 3))  # heads and concept tokens
        self.log_mask = (mask / mask.mean(-1, keepdim=True)).log()  # used from the next call on


# ================================================================ FLUX: the reference


class ReferenceConceptrolFluxProcessor:
    """Official FLUX Conceptrol attention on diffusers' FluxAttention: an explicit softmax with an [L, L] bias
    over [text M | image N | condition N], a call counter, and the mask extracted when `extract(count)`."""

    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        s = self.state

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = (f(x).unflatten(-1, (attn.heads, -1)) for f in (to_q, to_k, to_v))
            return norm_q(q), norm_k(k), v

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:  # double block: text comes separately, first in the sequence
            eq, ek, ev = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q, k = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1), apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        M, N, lam = s["text"], s["image"], s["log_lambda"]
        bias = torch.zeros(q.shape[0], 1, M + 2 * N, M + 2 * N)
        if s.get("mode", "conceptrol") == "ominicontrol":
            bias[..., : M + N, M + N :] = lam
            bias[..., M + N :, : M + N] = lam
        else:
            bias[..., :M, M + N :] = -1e7
            bias[..., s["span"], M + N :] = lam
            bias[..., M : M + N, M + N :] = lam + (s["log_mask"].view(-1, 1, N, 1) if s["log_mask"] is not None else 0.0)
            bias[..., M + N :, M : M + N] = lam
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(-1)
        if s["extract"](s["count"]):
            a = probs[:, :, M : M + N, s["span"]] / probs[:, :, M : M + N, :M].sum(-1, keepdim=True)
            a = a.mean(dim=(-1, 1))
            s["log_mask"] = (a / a.mean(-1, keepdim=True)).log()
            s["masks"].append(s["log_mask"])
        s["count"] += 1
        out = (probs @ v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)


M, H, W = 7, 3, 5  # text tokens, image and condition token grid


def flux_models():
    """A tiny FLUX (2 double + 4 single blocks: 6 block calls a step) in diffusers and, same weights, in minigen."""
    torch.manual_seed(0)
    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2,
                        depth=2, depth_single_blocks=4, axes_dim=(4, 6, 6), guidance_embed=False)  # fmt: skip
    ref = FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.1)
    with torch.device("meta"):
        model = Flux(config)
    load_exact(model, flux_from_diffusers(ref.state_dict()))
    return model.eval(), ref


def run_flux_steps(model, ref, method, state, inputs, *, scale, warmup, keep_mask=None):
    """Three steps of both; velocities within 1e-5 each step; extracted masks (when `keep_mask` reads the
    method's latest) within 1e-5 of the reference's. Returns the last velocity."""
    x, txt, y, cond = inputs
    batch = x.shape[0]
    for step, sigma in enumerate([1.0, 0.7, 0.4]):
        state["log_lambda"], state["masks"] = math.log(0.5 if step < warmup else scale), []
        masks = []
        controls = method.controls(step).at_step(step, BatchLayout.plain(batch))
        for record in controls.record:

            def extract_and_keep(site, probs, extract=record.sink):
                extract(site, probs)
                masks.append(keep_mask())

            record.sink = extract_and_keep
        t = torch.full([batch], sigma)
        with torch.no_grad():
            ours = model(x, image_ids(H, W), txt, text_ids(M), t, y, extra=[cond], controls=controls)
            theirs = ref(
                hidden_states=torch.cat([x, cond.tokens.expand(batch, -1, -1)], 1), encoder_hidden_states=txt,
                pooled_projections=y, timestep=t, img_ids=torch.cat([image_ids(H, W), cond.ids], 1)[0], txt_ids=text_ids(M)[0],
            ).sample[:, : H * W]
        assert (ours - theirs).abs().max() <= 1e-5
        assert len(masks) == len(state["masks"])
        for mine, official in zip(masks, state["masks"]):
            assert (mine - official).abs().max() <= 1e-5
        x = x - 0.3 * ours
    return ours, x


def flux_inputs(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    txt, y = torch.randn(batch, M, 32, generator=g), torch.randn(batch, 24, generator=g)
    cond = TokenGroup(torch.randn(1, H * W, 64, generator=g), image_ids(H, W, offset=(0, W)), name="cond")
    return torch.randn(batch, H * W, 64, generator=g), txt, y, cond


@pytest.mark.parametrize("implementation", ["client", "method"])
def test_conceptrol_flux_equals_the_official_arithmetic(implementation):
    """The test client above, and minigen.methods.conceptrol.ConceptrolFlux, against the reference.

    The client extracts at calls 2 and 5 of 6 (single_blocks.0 and .3): the first biases the rest of the
    same forward, the last the next step's double blocks (as 18/37/56 of 57 on FLUX.1). The method follows
    the official rule, every depth-th call: 1, 3, 5 (double_blocks.1, single_blocks.1 and .3)."""
    model, ref = flux_models()
    span, scale, warmup = [2, 3], 1.3, 1
    if implementation == "client":
        every, at = 3, 2
        method = ConceptrolFlux(model.attention_layers(), span, every, at, scale, warmup)
        keep_mask = lambda: method.log_mask  # noqa: E731
    else:
        every, at = 2, 1
        method = methods.ConceptrolFlux(model.attention_layers(), [methods.FluxConcept(span, "cond")], steps=3,
                                        condition_scale=scale, warmup=warmup / 3)  # fmt: skip
        keep_mask = lambda: method.log_masks[0]  # noqa: E731
    state = {"text": M, "image": H * W, "span": span, "extract": lambda c: c % every == at, "count": 0, "log_mask": None}
    ref.set_attn_processor(ReferenceConceptrolFluxProcessor(state))
    inputs = flux_inputs()
    ours, x = run_flux_steps(model, ref, method, state, inputs, scale=scale, warmup=warmup, keep_mask=keep_mask)
    _, txt, y, cond = inputs
    assert (ours - model(x, image_ids(H, W), txt, text_ids(M), torch.tensor([0.4]), y, extra=[cond])).abs().max() > 1e-4


@pytest.mark.parametrize("extraction, mode", [("paper", "conceptrol"), ("code", "ominicontrol")])
def test_conceptrol_flux_paper_extraction_and_the_ominicontrol_baseline(extraction, mode):
    """extraction="paper": the mask comes from double_blocks.1 only (call 1 of each step's 6); mode
    "ominicontrol": the plain B(λ) bias, no mask. Both against the reference, velocities within 1e-5."""
    model, ref = flux_models()
    method = methods.ConceptrolFlux(model.attention_layers(), [methods.FluxConcept([2, 3], "cond")], steps=3,
                                    condition_scale=1.3, warmup=0.4, extraction=extraction, mode=mode)  # fmt: skip
    extract = (lambda c: c % 6 == 1) if mode == "conceptrol" else (lambda c: False)
    state = {"text": M, "image": H * W, "span": [2, 3], "extract": extract, "count": 0, "log_mask": None, "mode": mode}
    ref.set_attn_processor(ReferenceConceptrolFluxProcessor(state))
    run_flux_steps(model, ref, method, state, flux_inputs(), scale=1.3, warmup=2, keep_mask=lambda: method.log_masks[0])


def test_conceptrol_flux_batch_rows_have_their_own_masks():
    """Beyond the official code (batch 1): two prompts in one batch, each row with its own mask (the
    reference computes per-row masks the same way), velocities within 1e-5."""
    model, ref = flux_models()
    method = methods.ConceptrolFlux(model.attention_layers(), [methods.FluxConcept([1, 2], "cond")], steps=3, condition_scale=1.0)
    state = {"text": M, "image": H * W, "span": [1, 2], "extract": lambda c: c % 2 == 1, "count": 0, "log_mask": None}
    ref.set_attn_processor(ReferenceConceptrolFluxProcessor(state))
    run_flux_steps(model, ref, method, state, flux_inputs(batch=2, seed=5), scale=1.0, warmup=0,
                   keep_mask=lambda: method.log_masks[0])  # fmt: skip
    masks = method.masks()[0]
    assert masks.shape == (2, H * W) and (masks[0] - masks[1]).abs().max() > 1e-3


def test_a_reused_flux_method_refuses_a_generation_of_another_batch_by_name(toy_flux):
    """The method keeps its mask across generations, as the official object does; reused for a batch of two
    after one of one (toy-flux guides: 2 and 4 rows), the kept mask met the new rows in a bare broadcast RuntimeError."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    groups, concepts = methods.flux_concepts(toy_flux, [], "a star on grass", [(image, "star")], width=64)
    method = methods.ConceptrolFlux(toy_flux.transformer.attention_layers(), concepts, steps=2)
    call = dict(extra=groups, controls=method.controls, steps=2, progress=False)
    toy_flux.generate("a star on grass", **call)
    with pytest.raises(ValueError, match=r"holds a mask of 2 rows x 64 image tokens from an earlier generation .* has 4 x 64: use a fresh"):
        toy_flux.generate(["a star on grass"] * 2, **call)


def test_a_method_made_for_more_steps_than_the_generation_runs_is_refused(toy_flux):
    """`steps` repeats the generation's step count; one larger than the run's held the reference back by a
    schedule the run never finished, silently (ConceptrolSD(steps=50) under generate(steps=10) left the
    image within 7.6e-6 of the adapter-free one). Both methods say the run length they were made for."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    groups, concepts = methods.flux_concepts(toy_flux, [], "a star on grass", [(image, "star")], width=64)
    method = methods.ConceptrolFlux(toy_flux.transformer.attention_layers(), concepts, steps=5)
    with pytest.raises(ValueError, match="made for a run of 5 sampling steps, and this run takes 2: build them with steps=2"):
        toy_flux.generate("a star on grass", extra=groups, controls=method.controls, steps=2, progress=False)
    projections = {"up.1.0.0": (torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))}
    for conceptrol in (True, False):
        sd = methods.ConceptrolSD(projections, [methods.SDConcept([1], torch.zeros(1, 4, 8))], steps=10, conceptrol=conceptrol,
                                  concept_layer="up.1.0.0" if conceptrol else None)  # fmt: skip
        assert {sd.controls(step).steps for step in range(10)} == {10}
    for mode in ("conceptrol", "ominicontrol"):
        flux = methods.ConceptrolFlux(toy_flux.transformer.attention_layers(), concepts, steps=10, mode=mode)
        assert {flux.controls(step).steps for step in range(10)} == {10}


def test_sd_concepts_serve_a_generation_with_or_without_cfg(toy_sd):
    """sd_concepts gives the reference's IP tokens and the empty image's, and the generation's batch layout
    places them: under CFG the image equals the one of the tokens stacked by hand [empty | tokens]; in a call
    of two prompts without CFG both images read the reference. (sd_concepts took cfg=, which had to repeat the
    generation's: tokens stacked for CFG fit that call by their row count and gave image 0 the empty image's.)"""
    import numpy as np

    from minigen.image import preprocess_clip
    from minigen.loading.ip_adapter import load_ip_adapter
    from minigen.models.ip_adapter import reference_tokens
    from minigen.toy import scenes
    from minigen.toy.pairs import reference_scene

    adapter, encoder = load_ip_adapter("ip-adapter-plus_toy-sd", toy_sd.unet)
    image = scenes.render(reference_scene(("circle", "blue", "striped", "orange"), np.random.default_rng(0))).image
    prompt = "a circle on a grass background"
    [concept] = methods.sd_concepts(toy_sd, adapter, encoder, prompt, [(image, "circle")])
    tokens, empty = reference_tokens(adapter, encoder, preprocess_clip(image, encoder.config.image_size))
    assert torch.equal(concept.ip_tokens, tokens) and torch.equal(concept.uncond_tokens, empty)

    def draw(concepts, prompts, cfg):
        method = methods.ConceptrolSD(adapter.projections(), concepts, steps=2, concept_layer=methods.default_concept_layer(toy_sd.unet), warmup=0)
        return toy_sd.generate(prompts, steps=2, cfg=cfg, seed=1, controls=method.controls, output="latents", progress=False)

    stacked = methods.SDConcept(concept.span, torch.cat([empty, tokens]))
    assert torch.equal(draw([concept], prompt, 7.5), draw([stacked], prompt, 7.5))
    two = draw([concept], [prompt] * 2, 1.0)
    assert torch.equal(two, draw([methods.SDConcept(concept.span, tokens)], [prompt] * 2, 1.0))
    assert (two[0] - draw([stacked], [prompt] * 2, 1.0)[0]).abs().max() > 1e-3  # what cfg=True stacking gave image 0 here


def test_code_extraction_counts_block_calls_across_forwards_with_the_official_period():
    """extraction="code" extracts at every period-th block call, counted over double and single blocks
    and across forwards (the official `forward_count % NUM_BLOCKS == CONCEPT_BLOCK_IDX`). The default
    period is the double blocks' count (2 here: calls 1, 3, 5); period=19, the official constant kept on
    a 6-block model, extracts once in 4 forwards, at call 18, the first block of the fourth forward; `phase`
    (the official CONCEPT_BLOCK_IDX) moves the call within the period."""
    layers = ["double_blocks.0", "double_blocks.1", *(f"single_blocks.{i}" for i in range(4))]

    def extraction_blocks(method, forwards=4):
        blocks = []
        for _ in range(forwards):
            blocks.append(method.extract_at())
            method.calls_before += len(layers)  # what count_calls adds after a forward
        return blocks

    by_default = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3)
    assert extraction_blocks(by_default) == [["double_blocks.1", "single_blocks.1", "single_blocks.3"]] * 4
    official = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=4, period=19)
    assert not official.controls(0).record  # a forward without an extraction records nothing (and is no empty record)
    assert extraction_blocks(official) == [[], [], [], ["double_blocks.0"]]
    official.calls_before = 18  # the fourth forward's first block is call 18
    assert official.controls(3).record[0].layers == ["double_blocks.0"]
    first = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, phase=0)
    assert extraction_blocks(first) == [["double_blocks.0", "single_blocks.0", "single_blocks.2"]] * 4
    official_idx5 = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, period=19, phase=5)
    assert extraction_blocks(official_idx5) == [["single_blocks.3"], [], [], []]
    with pytest.raises(ValueError, match="0 <= phase < period = 19; got 19"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, period=19, phase=19)
    with pytest.raises(ValueError, match="extraction='code'"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, phase=0, extraction="paper")
    with pytest.raises(ValueError, match="'ominicontrol' extracts nothing"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, period=19, mode="ominicontrol")
    with pytest.raises(ValueError, match="period must be a positive"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, period=0)
    with pytest.raises(ValueError, match="extraction='code'"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, period=19, extraction="paper")


def test_warmup_and_end_follow_the_official_control_guidance_start_and_end():
    """Step i of T runs without the full reference when i / T < start or (i + 1) / T > end (the official
    pipelines' test, written out here): SD drops the IP tokens, FLUX sets λ = 0.5. 10 steps, start 0.2,
    end 0.7: steps 0, 1, 7, 8, 9. SD refuses warmup >= end (its IP branch would never run); FLUX runs such a
    schedule at λ = 0.5 throughout, as the official pipeline."""
    held = [i for i in range(10) if i / 10 < 0.2 or (i + 1) / 10 > 0.7]
    assert held == [0, 1, 7, 8, 9]
    projections = {"up.1.0.0": (torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))}
    sd = methods.ConceptrolSD(projections, [methods.SDConcept([1], torch.zeros(1, 4, 8))], steps=10, concept_layer="up.1.0.0", warmup=0.2, end=0.7)
    assert [i for i in range(10) if not sd.controls(i).extra_tokens] == held
    layers = ["double_blocks.0", "single_blocks.0"]
    flux = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=10, condition_scale=2.0, warmup=0.2, end=0.7)
    scales = []
    for i in range(10):
        flux.controls(i)
        scales.append(round(math.exp(flux.log_lambda), 6))
    assert [i for i, scale in enumerate(scales) if scale == 0.5] == held and set(scales) == {0.5, 2.0}
    held_throughout = methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=4, condition_scale=2.0, warmup=1.0)
    for i in range(4):
        held_throughout.controls(i)
        assert held_throughout.log_lambda == math.log(0.5)
    with pytest.raises(ValueError, match="0 <= warmup < end"):
        methods.ConceptrolSD(projections, [methods.SDConcept([1], torch.zeros(1, 4, 8))], steps=10, concept_layer="up.1.0.0", warmup=0.5, end=0.5)
    for conceptrol in (True, False):  # 0.97 of 25 steps: the IP branch would run on no step (the image equal to no adapter's)
        with pytest.raises(ValueError, match="warmup 0.97 and end 1.0 of 25 steps leave no step to the IP branch"):
            methods.ConceptrolSD(projections, [methods.SDConcept([1], torch.zeros(1, 4, 8))], steps=25, concept_layer="up.1.0.0", warmup=0.97, conceptrol=conceptrol)
    for method in (sd, flux):  # made for 10 steps, run for more: the end rule would hold the reference back, silently
        with pytest.raises(ValueError, match="made for 10 steps, but the sampler is at step 10: give it steps="):
            method.controls(10)
    with pytest.raises(ValueError, match="'up.9.0.0' is not a cross-attention layer of this adapter; choose one of \\['up.1.0.0'\\]"):
        methods.ConceptrolSD(projections, [methods.SDConcept([1], torch.zeros(1, 4, 8))], steps=10, concept_layer="up.9.0.0")


def test_conceptrol_refuses_what_would_give_nan_or_a_math_error():
    """An empty concept span would mask by the mean of nothing (NaN images); a scale of 0 has no log."""
    layers = ["double_blocks.0", "single_blocks.0"]
    with pytest.raises(ValueError, match="no token span.*mode='ominicontrol'"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([], "cond")], steps=3)
    methods.ConceptrolFlux(layers, [methods.FluxConcept([], "cond")], steps=3, mode="ominicontrol")  # the plain adapter needs none
    with pytest.raises(ValueError, match="must be > 0"):
        methods.ConceptrolFlux(layers, [methods.FluxConcept([1], "cond")], steps=3, condition_scale=0.0)
    with pytest.raises(ValueError, match="no token span.*conceptrol=False"):
        methods.ConceptrolSD({}, [methods.SDConcept([], torch.zeros(1, 4, 8))], steps=3)
    methods.ConceptrolSD({}, [methods.SDConcept([], torch.zeros(1, 4, 8))], steps=3, conceptrol=False)


def sd_method(concept, global_masking=True):
    """A ConceptrolSD on one layer of 8-wide IP projections, its concept layer."""
    projections = {"up.1.0.0": (torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))}
    return methods.ConceptrolSD(projections, [concept], steps=3, concept_layer="up.1.0.0", global_masking=global_masking)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: methods.SDConcept(torch.tensor([[2, 3]]), torch.zeros(1, 4, 8)),
         r"SDConcept.span must be token positions, .*got a 2-D torch.int64 Tensor"),
        (lambda: methods.FluxConcept(np.array(3)), r"FluxConcept.span must be token positions, .*got a 0-D int64 ndarray"),  # a TypeError
        (lambda: methods.SDConcept([-1], torch.zeros(1, 4, 8)), r"SDConcept.span holds negative positions \[-1\]: .*-1 is not the last"),
        (lambda: methods.FluxConcept([-1]), r"FluxConcept.span holds negative positions \[-1\]: .*-1 is not the last"),
        (lambda: methods.FluxConcept([2.0]), r"FluxConcept.span must be token positions, .*got \[2.0\]"),
        (lambda: sd_method(methods.SDConcept([1], torch.zeros(1, 4, 16))),
         r"SDConcept 0's ip_tokens are 16 wide, but the adapter's projections read \[8\]"),
        (lambda: sd_method(methods.SDConcept([1], torch.zeros(4, 8))),
         r"SDConcept 0's ip_tokens must be \[B or 1, T, C\], got shape \[4, 8\]: add its batch"),
        (lambda: sd_method(methods.SDConcept([1], torch.zeros(1, 4, 8)), global_masking=False),
         "concept_layer is where global masking reads .* global_masking=False .*drop one of them"),
        (lambda: methods.ConceptrolFlux(["single_blocks.0"], [methods.FluxConcept([1])], steps=3),
         r"layers holds no double blocks .*pass transformer.attention_layers\(\)"),
    ],
    ids=["sd-span-2d", "flux-span-0d-array", "sd-span-negative", "flux-span-negative", "flux-span-float", "sd-tokens-width", "sd-tokens-2d",
         "sd-concept-layer-without-global-masking", "flux-layers-without-double-blocks"],
)  # fmt: skip
def test_conceptrol_names_bad_spans_and_tokens(make, message):
    """Each was a bare torch error (TypeError, a matmul), a misleading one (tokens of 4 rows, phase -1),
    or did something else silently (a span -1 read FLUX's last text token; a concept layer global_masking=False never reads)."""
    with pytest.raises(ValueError, match=message):
        make()


def test_a_flux_span_past_the_text_is_named():
    """A span past the prompt's text tokens was a bare IndexError at the first block call."""
    model, _ = flux_models()
    method = methods.ConceptrolFlux(model.attention_layers(), [methods.FluxConcept([M + 3], "cond")], steps=1)
    x, txt, y, cond = flux_inputs()
    controls = method.controls(0).at_step(0, BatchLayout.plain(1))
    message = rf"FluxConcept 0's span holds positions \[{M + 3}\], outside the prompt's {M} tokens: give positions in 0..{M - 1}"
    with pytest.raises(ValueError, match=message):
        model(x, image_ids(H, W), txt, text_ids(M), torch.ones(1), y, extra=[cond], controls=controls)


@pytest.mark.parametrize(
    "image, position_delta, message",
    [
        (lambda r: (r * 255).to(torch.uint8), None, r"the reference image must hold floats in \[0, 1\], got torch.uint8: divide 0-255 pixels by 255"),
        (lambda r: r * 255, None, r"the reference image must hold finite values in \[0, 1\] .*got 0.\d+ to 2\d\d"),
        (lambda r: r * 2 - 1, None, r"the reference image must hold finite values in \[0, 1\] .*got -0.\d+ to 0.\d+"),
        (lambda r: r * float("nan"), None, r"the reference image must hold finite values in \[0, 1\] .*got nan"),
        (lambda r: r, (0, 1, 2), r"position_delta is the \(row, column\) shift of the reference's position ids: give two numbers, got \(0, 1, 2\)"),
    ],
    ids=["uint8", "0-255", "minus-1-to-1", "nan", "position-delta-of-three"],
)  # fmt: skip
def test_condition_group_refuses_what_it_would_encode_wrong(image, position_delta, message):
    """condition_group checked the shape alone: these gave tokens of another image, or dropped the third shift."""
    from minigen.methods.ominicontrol import condition_group
    from minigen.models.vae import AutoencoderKL

    from conftest import TINY_FLUX_VAE

    reference = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        condition_group(AutoencoderKL(TINY_FLUX_VAE), image(reference), size=None, position_delta=position_delta)


def test_condition_group_takes_its_position_shift_as_numbers_an_array_or_a_tensor():
    """A NumPy array or a tensor of two numbers (accepted before the shift's check) still gives the tuple's ids."""
    from minigen.methods.ominicontrol import condition_group
    from minigen.models.vae import AutoencoderKL

    from conftest import TINY_FLUX_VAE

    vae, reference = AutoencoderKL(TINY_FLUX_VAE), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = [condition_group(vae, reference, size=None, position_delta=delta).ids for delta in ((0, 8), np.array([0, 8]), torch.tensor([0, 8]))]
    assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2]) and ids[0][..., 2].min() == 8


def test_conceptrol_refuses_a_mask_place_it_would_not_read():
    """concept_block was accepted and ignored under extraction='code' (the default) and mode 'ominicontrol',
    a block the model lacks was accepted under 'code'; ConceptrolSD's concept_layer was accepted with
    conceptrol=False."""
    layers = ["double_blocks.0", "double_blocks.1", "single_blocks.0"]
    concepts = [methods.FluxConcept([1], "cond")]
    for options in ({}, {"extraction": "paper", "mode": "ominicontrol"}):
        with pytest.raises(ValueError, match="concept_block is where extraction='paper' reads the mask in mode 'conceptrol'"):
            methods.ConceptrolFlux(layers, concepts, steps=3, concept_block="double_blocks.0", **options)
    with pytest.raises(ValueError, match="concept_block 'nonsense' is not one of the transformer's blocks"):
        methods.ConceptrolFlux(layers, concepts, steps=3, extraction="paper", concept_block="nonsense")
    assert methods.ConceptrolFlux(layers, concepts, steps=3, extraction="paper", concept_block="double_blocks.0").extract_at() == ["double_blocks.0"]
    from dataclasses import replace  # the defaults it resolves are not written back into its fields, which replace reads

    for options in ({}, {"extraction": "paper"}, {"mode": "ominicontrol"}):
        method = methods.ConceptrolFlux(layers, concepts, steps=3, **options)
        assert replace(method, steps=4).extract_at() == method.extract_at()
    with pytest.raises(ValueError, match="concept_layer is where Conceptrol reads its mask; conceptrol=False"):
        methods.ConceptrolSD({"mid.0": None}, [methods.SDConcept([], torch.zeros(1, 4, 8))], steps=3, conceptrol=False, concept_layer="mid.0")


def test_flux_references_are_resized_as_the_official_pipeline_and_sit_right_of_the_image(toy_flux):
    """flux_concepts resizes each reference to CONDITION_SIZE (512, the subject LoRA's), or to the model's
    default side where that is smaller, by PIL (bicubic, rounded to 8 bits, as the official pipeline's
    `image.resize((512, 512))`), and puts the first reference's columns one image width right of 0 (the
    official `width // 16`), each further one a reference width on: toy-flux (8 px per token) at 64 px
    gives 8x8 tokens at columns 8 and 16; asked for 192 px wide images, at 24 and 32; the same model with a
    128 px default side, 16x16 tokens."""
    from dataclasses import replace

    from PIL import Image

    from minigen.image import from_pil
    from minigen.methods.ominicontrol import condition_group

    image = Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy())
    for pipe, width, side, first in ((toy_flux, 64, 8, 8), (toy_flux, 192, 8, 24), (replace(toy_flux, default_size=128), 128, 16, 16)):
        groups, concepts = methods.flux_concepts(pipe, [], "a star and a ring on grass", [(image, "star"), (image, "ring")], width=width)
        assert [g.name for g in groups] == [c.group for c in concepts] == ["cond0", "cond1"]
        for i, group in enumerate(groups):
            assert group.tokens.shape[1] == side * side
            assert group.ids[0, :, 2].min().item() == first + i * side and group.ids[0, :, 1].max().item() == side - 1
    [group], [concept] = methods.flux_concepts(toy_flux, [], "a star on grass", [(image, "star")], width=64)
    assert group.name == concept.group == "cond"
    official = condition_group(toy_flux.vae, from_pil(image.resize((64, 64), Image.BICUBIC)), size=None)
    in_float = condition_group(toy_flux.vae, from_pil(image), size=64)  # torch's antialiased bicubic, without PIL's 8-bit passes
    assert torch.equal(group.tokens, official.tokens) and not torch.allclose(group.tokens, in_float.tokens, atol=1e-4)
    sampled = [methods.flux_concepts(toy_flux, [], "", [(image, None)], width=64, generator=torch.Generator().manual_seed(1))[0][0]
               for _ in range(2)]  # the posterior sampled, as the official code does, where a generator is given
    assert torch.equal(sampled[0].tokens, sampled[1].tokens) and not torch.allclose(sampled[0].tokens, group.tokens, atol=1e-3)


def test_the_sd_concept_layer_is_asked_for_and_defaults_by_the_unets_layout():
    """ConceptrolSD without concept_layer= refuses (a silent SD1.5 layer on SDXL was the old default);
    default_concept_layer reads the layout, not the text width: an SDXL-shaped UNet reading 32-wide text
    gets SDXL's up.0.1.3, SD1.5 and SD2.1 get up.1.0.0, a layout without the block asks for one."""
    from dataclasses import replace

    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS

    from conftest import TINY_SDXL_UNET

    with pytest.raises(ValueError, match="needs concept_layer=.*default_concept_layer"):
        methods.ConceptrolSD({}, [methods.SDConcept([1], torch.zeros(1, 4, 8))], steps=3)
    with torch.device("meta"):
        layers = {name: methods.default_concept_layer(UNet(config))
                  for name, config in (("sd15", PRESETS["sd15"]), ("sd21", PRESETS["sd21"]), ("sdxl", PRESETS["sdxl"]),
                                       ("sdxl, 32-wide text", replace(PRESETS["sdxl"], context_dim=32)))}  # fmt: skip
        with pytest.raises(ValueError, match="no block 'up.0.1.3'.*pass concept_layer="):
            methods.default_concept_layer(UNet(TINY_SDXL_UNET))
    assert layers == {"sd15": "up.1.0.0", "sd21": "up.1.0.0", "sdxl": "up.0.1.3", "sdxl, 32-wide text": "up.0.1.3"}
