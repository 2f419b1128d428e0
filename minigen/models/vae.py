"""The KL autoencoder (VAE) that maps images to the latent space of SD1.x, SDXL and FLUX.

All three families share one architecture (Rombach et al., 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"): a convolutional encoder that halves the resolution at every level
but the last, a middle stage with one single-head self-attention, and a mirrored decoder. SD and
SDXL use 4 latent channels; FLUX uses 16 and drops the 1x1 `quant_conv` / `post_quant_conv`.

The encoder predicts a diagonal Gaussian over latents. Diffusion models do not see those raw
latents but a normalized version, so that they have roughly unit variance:

    latents = (z - shift_factor) * scaling_factor        (encode)
    z       = latents / scaling_factor + shift_factor    (decode)

Module attribute names are the ldm/BFL single-file key names (`encoder.down.0.block.1.conv2`,
`decoder.mid.attn_1.q`, ...), so `first_stage_model.*` of an SD/SDXL file (prefix stripped) and
FLUX's `ae.safetensors` load with `load_state_dict(strict=True)`. The diffusers layout goes through
the VAE key map of the loaders (`keymaps_vae.vae_from_diffusers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigen.sampling.denoisers import NonFiniteError
from minigen.storage import compute_dtype


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels
    out_channels: int = 3
    base_channels: int = 128  # channels of the first (full-resolution) level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # level i has base_channels * channel_mult[i]
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4  # latent channels
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True  # 1x1 quant_conv / post_quant_conv around the latent (not in FLUX)
    norm_groups: int = 32

    def __post_init__(self):
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig: scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for every official VAE)."""
        return 2 ** (len(self.channel_mult) - 1)


PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(),
    "sdxl": VAEConfig(scaling_factor=0.13025),
    "flux": VAEConfig(z_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False),
}


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # Every norm of the ldm VAE uses eps=1e-6 (not PyTorch's default 1e-5).
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v and proj_out are 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def as_tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            # contiguous: with channels strided, SDPA falls back to its math kernel, which holds the
            # whole (H·W)² attention matrix (1 GiB for a 128x128 latent); the fused kernel holds none
            return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

        q, k, v = as_tokens(self.q(h)), as_tokens(self.k(h)), as_tokens(self.v(h))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv.

    The padding is asymmetric: one zero row/column at the bottom/right only, so an H x W input
    gives exactly H/2 x W/2 and output pixel (i, j) sees input rows 2i..2i+2 and columns 2j..2j+2.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> self-attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks (`block.{j}`), then an optional resampling conv.

    The resampler is `downsample` in the encoder and `upsample` in the decoder, as in the checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups) for j in range(num_blocks)
        )
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """[B, in_channels, H, W] image -> [B, 2 * z_channels, H/f, W/f] Gaussian mean and log-variance."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            Level(
                in_channels=widths[max(i - 1, 0)],
                out_channels=widths[i],
                num_blocks=config.num_res_blocks,
                groups=config.norm_groups,
                resample="down" if i < last else None,
            )
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], config.norm_groups)
        self.norm_out = group_norm(widths[-1], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] latent -> [B, out_channels, h*f, w*f] image.

    `up.{i}` is the level with width base_channels * channel_mult[i], so `up` is indexed like the
    encoder's `down` and runs in reverse order: from the deepest level up to full resolution.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1], config.norm_groups)
        self.up = nn.ModuleList(
            Level(
                in_channels=widths[min(i + 1, last)],
                out_channels=widths[i],
                num_blocks=config.num_res_blocks + 1,
                groups=config.norm_groups,
                resample="up" if i > 0 else None,
            )
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The VAE of SD1.x / SDXL / FLUX with `encode` (image -> latents) and `decode` (latents -> image).

    Images are [B, 3, H, W] in [-1, 1]; latents are [B, z_channels, H/8, W/8], already scaled and
    shifted to the space the diffusion model works in.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # FLUX has no quant convs; Identity keeps the forward uniform and adds no state-dict keys.
        z2, z = 2 * config.z_channels, config.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, kernel_size=1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(z, z, kernel_size=1) if config.use_quant_conv else nn.Identity()

    def encode(
        self, images: Tensor, generator: torch.Generator | None = None, tile_size: int | None = None, tile_overlap: int = 16
    ) -> Tensor:
        """[B, 3, H, W] images in [-1, 1] (cast to the VAE's compute dtype) -> [B, z_channels, H/f, W/f] scaled
        latents in that dtype (f: `config.downsample_factor`, 8 for SD and FLUX.1, 4 for the toy models).

        Returns the mean of the posterior when `generator` is None, otherwise one sample
        z = mean + std * noise drawn with `generator` (on the generator's device, so that seeds
        reproduce across devices). Both are then mapped to (z - shift_factor) * scaling_factor.

        With `tile_size` (in latent pixels, as for `decode`: 64 means 512-pixel tiles) the encoder runs
        on overlapping tiles and their posteriors are cross-faded over `tile_overlap` latent pixels (see
        `_encode_tiled`), which bounds memory for large images. An approximation, like tiled decoding;
        an image that fits in one tile is encoded whole, exactly as without `tile_size`.
        """
        self._check_image_size(images)
        _check_tiles("encode", tile_size, tile_overlap)
        images = images.to(compute_dtype(self.encoder.conv_in))
        f = self.config.downsample_factor
        if tile_size is None or (images.shape[-2] <= tile_size * f and images.shape[-1] <= tile_size * f):
            moments = self.quant_conv(self.encoder(images))
        else:
            moments = self._encode_tiled(images, tile_size, tile_overlap)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + std * noise.to(mean.device)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: Tensor, tile_size: int | None = None, tile_overlap: int = 16) -> Tensor:
        """[B, z_channels, h, w] scaled latents (cast to the VAE's compute dtype) -> [B, 3, fh, fw] images in
        about [-1, 1], in that dtype (f: `config.downsample_factor`).

        With `tile_size` (in latent pixels, e.g. 64 for 512-pixel tiles) the decoder runs on
        overlapping tiles of at most tile_size x tile_size latents, which bounds memory for large
        images; the tiles overlap by `tile_overlap` latent pixels and are cross-faded (see
        `_decode_tiled`). Tiling is an approximation: group norms and the mid attention then see
        one tile instead of the whole image; latents that fit in one tile are decoded whole, exactly as
        without `tile_size`.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.z_channels:
            raise ValueError(f"decode: expected latents [B, {self.config.z_channels}, h, w], got shape {list(latents.shape)}")
        _check_tiles("decode", tile_size, tile_overlap)
        z = latents.to(compute_dtype(self.decoder.conv_in)) / self.config.scaling_factor + self.config.shift_factor
        if tile_size is None or max(z.shape[-2:]) <= tile_size:
            return self.decoder(self.post_quant_conv(z))
        return self._decode_tiled(z, tile_size, tile_overlap)

    def _decode_tiled(self, z: Tensor, tile_size: int, overlap: int) -> Tensor:
        """Decode unscaled latents tile by tile and blend the tiles with a weighted average.

        Each tile's pixels are weighted by a ramp that rises linearly over the `overlap` band at
        every edge; dividing the weighted sum by the summed weights cross-fades neighbouring tiles
        and leaves pixels covered by a single tile (including the image border) unchanged.
        """
        f = self.config.downsample_factor
        b, _, height, width = z.shape
        out = z.new_zeros(b, self.config.out_channels, height * f, width * f)
        total_weight = z.new_zeros(1, 1, height * f, width * f)
        for top in _tile_starts(height, tile_size, tile_size - overlap):
            for left in _tile_starts(width, tile_size, tile_size - overlap):
                tile = z[:, :, top : top + tile_size, left : left + tile_size]
                pixels = self.decoder(self.post_quant_conv(tile))
                weight = _ramp(pixels.shape[-2], overlap * f, z)[:, None] * _ramp(pixels.shape[-1], overlap * f, z)
                rows = slice(top * f, top * f + pixels.shape[-2])
                cols = slice(left * f, left * f + pixels.shape[-1])
                out[:, :, rows, cols] += pixels * weight
                total_weight[:, :, rows, cols] += weight
        return out / total_weight

    def _encode_tiled(self, images: Tensor, tile_size: int, overlap: int) -> Tensor:
        """The posterior moments [B, 2 * z_channels, H/f, W/f] of `images`, encoded tile by tile: the
        mirror of `_decode_tiled`. Tiles of tile_size * f pixels start every (tile_size - overlap) * f
        pixels; each tile's moments (mean and log-variance) are weighted by the same edge ramp over
        `overlap` latent pixels, and the weighted sum is divided by the summed weights."""
        f = self.config.downsample_factor
        b, _, height, width = images.shape
        h, w = height // f, width // f
        out = images.new_zeros(b, 2 * self.config.z_channels, h, w)
        total_weight = images.new_zeros(1, 1, h, w)
        for top in _tile_starts(h, tile_size, tile_size - overlap):
            for left in _tile_starts(w, tile_size, tile_size - overlap):
                tile = images[:, :, top * f : (top + tile_size) * f, left * f : (left + tile_size) * f]
                moments = self.quant_conv(self.encoder(tile))
                weight = _ramp(moments.shape[-2], overlap, images)[:, None] * _ramp(moments.shape[-1], overlap, images)
                rows = slice(top, top + moments.shape[-2])
                cols = slice(left, left + moments.shape[-1])
                out[:, :, rows, cols] += moments * weight
                total_weight[:, :, rows, cols] += weight
        return out / total_weight

    def encode_images(self, images: Tensor, tile_size: int | None = None, tile_overlap: int = 16) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] (any float dtype) -> float32 scaled latents (float64 from a float64
        model), the posterior mean: the one way in for image-to-image, inpainting, DDIM inversion and the
        reference tokens of the methods. Row by row (diffusers' "sliced" VAE), so that memory does not
        grow with the batch, and in tiles with `tile_size` (see `encode`); non-finite latents (an overflow
        in fp16) are a NonFiniteError."""
        if not images.is_floating_point() or not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
            raise ValueError(f"encode_images takes float images in [0, 1] (to_tensor's range, not 0-255), got {images.dtype} "
                             + (f"from {images.min().item()} to {images.max().item()}" if images.numel() else "of no values"))
        dtype = compute_dtype(self.decoder.conv_in)
        latents = torch.cat([self.encode(row.to(dtype) * 2 - 1, tile_size=tile_size, tile_overlap=tile_overlap) for row in images.split(1)])
        return _finite(latents.to(torch.promote_types(dtype, torch.float32)), "encode")

    def decode_images(self, latents: Tensor, tile_size: int | None = None, tile_overlap: int = 16) -> Tensor:
        """Scaled latents (any float dtype) -> float32 images [B, 3, H, W] in [0, 1] (float64 from a float64
        model), as pipelines return them. Row by row, as `encode_images`, and in tiles with `tile_size` (see
        `decode`: latents too large to decode whole); non-finite pixels (an overflow in fp16) are a
        NonFiniteError, never a black image."""
        dtype = compute_dtype(self.decoder.conv_in)
        images = torch.cat([self.decode(row, tile_size=tile_size, tile_overlap=tile_overlap) for row in latents.split(1)])
        return ((_finite(images, "decode").to(torch.promote_types(dtype, torch.float32)) + 1) / 2).clamp(0, 1)

    def _check_image_size(self, images: Tensor) -> None:
        f = self.config.downsample_factor
        if images.ndim != 4:
            raise ValueError(f"encode: expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % f or width % f:
            raise ValueError(
                f"encode: image size {height}x{width} (HxW) is not divisible by {f}, the VAE's downsampling "
                f"factor; resize or crop the image to a multiple of {f}, e.g. "
                f"{height // f * f or f}x{width // f * f or f}"
            )


def _tile_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile_size` every `stride` along `length`; the last one ends at the edge."""
    starts = list(range(0, max(length - tile_size, 0) + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def _ramp(length: int, band: int, like: Tensor) -> Tensor:
    """[length] weights: (i + 0.5) / band within `band` pixels of either end, 1 in between (computed in
    float32: bf16 counts integers exactly only up to 256), in `like`'s dtype."""
    i = torch.arange(length, device=like.device, dtype=torch.float32)
    distance_to_edge = torch.minimum(i, length - 1 - i) + 0.5
    return (distance_to_edge / band).clamp(max=1.0).to(like.dtype)


def _check_tiles(what: str, tile_size: int | None, overlap: int) -> None:
    """Tiles of `tile_size` latent pixels overlapping by `overlap`: whole numbers, 0 < overlap < tile_size."""
    if tile_size is None:
        return
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (tile_size, overlap)) or not 0 < overlap < tile_size:
        raise ValueError(f"{what}: tile_size={tile_size!r} and tile_overlap={overlap!r} must be whole numbers of latent pixels "
                         "with 0 < tile_overlap < tile_size; e.g. tile_size=64, tile_overlap=16")


def _finite(tensor: Tensor, what: str) -> Tensor:
    """`tensor`, refused if it holds a NaN or an Inf (one check, one device sync)."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(
            f"the autoencoder's {what} produced non-finite values (NaN or Inf): an overflow in fp16 (SDXL's original VAE, "
            "or SD's at large sizes), or non-finite weights or latents; run the autoencoder in float32 (pipe.vae.float()) "
            "or use an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix)"
        )
    return tensor
