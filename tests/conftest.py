"""Fixtures and helpers shared by the tests, and the tiny random-weight configs they build models of.

Test modules import the constants and helpers by name, `from conftest import TINY_UNET, tiny_clip`:
pytest puts tests/ (which has no __init__.py) on sys.path, and no test module imports another.
"""

import importlib.util
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minigen.loading.auto import load_pipeline
from minigen.loading.detect import UNET_PREFIX
from minigen.loading.files import read_metadata, read_state_dict
from minigen.loading.sd import ema_name
from minigen.loading.toy import TOY_SD
from minigen.models.flux_config import FluxConfig
from minigen.models.redux import ReduxConfig, SiglipConfig
from minigen.models.unet_config import UNetConfig
from minigen.models.vae import VAEConfig
from minigen.text.t5 import T5Config

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: 10 s or more on a 2-core CPU (trains, compiles, or runs a script in processes); -m 'not slow' skips them"
    )

# --- tiny configs: the official topologies at a few megabytes at most --------------------------------

TINY_UNET = UNetConfig(  # SD1.5 topology: two levels, attention on both
    model_channels=32, channel_mult=(1, 2), transformer_depth=(1, 1), num_heads=4, context_dim=32, norm_groups=8
)
TINY_SDXL_UNET = UNetConfig(  # SDXL topology: no attention on the first level, Linear projections, the vector y
    model_channels=32,
    channel_mult=(1, 2),
    transformer_depth=(0, 2),
    transformer_depth_middle=2,
    num_heads=None,
    head_dim=8,
    context_dim=32,
    use_linear_proj=True,
    adm_in_channels=32 + 6 * 8,
    norm_groups=8,
)
TINY_VAE = VAEConfig(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)  # 8x, as SD's
TINY_FLUX_VAE = VAEConfig(  # and as FLUX's: 16 latent channels, shift factor, no quant convs
    base_channels=16,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    norm_groups=8,
    z_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
)
TINY_FLUX = FluxConfig(  # 2 heads of 16 channels, 2 double and 2 single blocks; reads TINY_T5 and a 24-wide CLIP
    in_channels=16 * 4,
    out_channels=16 * 4,
    vec_in_dim=24,
    context_in_dim=32,
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 6, 6),
)
TINY_T5 = T5Config(  # the full vocabulary (real tokenizer ids), everything else tiny
    d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, num_buckets=8, max_distance=20
)
TINY_SIGLIP = SiglipConfig(  # 4 x 4 patches of 14 px
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=14, image_size=56
)
TINY_REDUX = ReduxConfig(siglip_dim=32, hidden=3 * 32, txt_dim=32)  # reads TINY_SIGLIP's features

# --- their diffusers and transformers twins ----------------------------------------------------------


def diffusers_vae(config: VAEConfig):
    """A diffusers AutoencoderKL of `config`'s shape (random weights, eval mode)."""
    from diffusers import AutoencoderKL

    levels = len(config.channel_mult)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_quant_conv,
    ).eval()


TINY_DIFFUSERS_UNETS = {  # diffusers UNet2DConditionModel arguments of the SD1.5 and SDXL topologies
    "sd15-like": dict(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ),
    "sdxl-like": dict(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48,
    ),
}


def tiny_diffusers_unet(name: str = "sd15-like"):
    """A diffusers UNet2DConditionModel of TINY_DIFFUSERS_UNETS[name], N(0, 0.1²) added to every weight
    (seed 0), eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_DIFFUSERS_UNETS[name], sample_size=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def unet_twin(reference):
    """minigen's UNet holding the weights of a diffusers UNet2DConditionModel, eval mode."""
    from minigen.loading.coverage import load_exact
    from minigen.loading.keymaps_unet import unet_config_from_diffusers, unet_from_diffusers
    from minigen.models.unet import UNet

    config = unet_config_from_diffusers(dict(reference.config))
    with torch.device("meta"):
        unet = UNet(config)
    load_exact(unet, unet_from_diffusers(reference.state_dict(), config))
    return unet.eval()


def tiny_diffusers_flux(config: FluxConfig = TINY_FLUX, *, std: float = 0.1, seed: int = 0):
    """A diffusers FluxTransformer2DModel of `config`'s shape, every weight drawn from N(0, std²):
    norms start at 1 and would hide a misplaced scale."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        in_channels=config.in_channels, num_layers=config.depth, num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim, pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=config.guidance_embed, axes_dims_rope=config.axes_dim,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model.eval()


def tiny_clip(hidden: int = 32, heads: int = 4, projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A random 2-layer transformers CLIP text encoder over the real vocabulary, pooling at the first EOS
    (49407). `projection`: with SDXL's text projection and OpenCLIP's GELU (else OpenAI's quick GELU)."""
    config = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
        hidden_act="gelu" if projection else "quick_gelu", projection_dim=hidden, eos_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


# --- official files and the scripts -----------------------------------------------------------------


def meta_tensors(manifest: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """An official file's tensors under `prefix` (prefix stripped) as meta tensors of the file's shapes
    and dtypes: names, shapes and dtypes of the real file, no weights."""
    dtypes = manifest.get("tensor_dtypes", {})  # the exceptions to the file's dtype (int position ids)
    return {
        key[len(prefix) :]: torch.empty(shape, dtype=getattr(torch, dtypes.get(key, manifest["dtype"])), device="meta")
        for key, shape in manifest["tensors"].items()
        if key.startswith(prefix)
    }


def with_ema(tmp_path, shadow_of=lambda key: True, name="ema.safetensors", offset=1.0):
    """toy-sd plus `model_ema.*` shadows (each UNet weight + `offset`) for the UNet keys `shadow_of` picks, and
    LitEma's bookkeeping; returns (file, the original tensors, the shadows by UNet key)."""
    checkpoint = read_state_dict(TOY_SD)
    shadows = {
        key.removeprefix(UNET_PREFIX): (value.float() + offset).to(value.dtype)
        for key, value in checkpoint.items()
        if key.startswith(UNET_PREFIX) and shadow_of(key)
    }
    extra = {ema_name(UNET_PREFIX + key): value for key, value in shadows.items()}
    extra |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
    file = tmp_path / name
    save_file({**checkpoint, **extra}, str(file), read_metadata(TOY_SD))
    return file, checkpoint, shadows


def load_script(name: str):
    """scripts/<name>.py as a module, freshly executed."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sample_script():
    """scripts/sample.py as a module, freshly executed."""
    return load_script("sample")


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def toy_sd():
    """The shipped toy-sd pipeline (weights/), loaded once per test module."""
    return load_pipeline("toy-sd")


@pytest.fixture(scope="module")
def toy_flux():
    """The shipped toy-flux pipeline (weights/), loaded once per test module."""
    return load_pipeline("toy-flux")


@pytest.fixture
def manifest():
    """Loader for the official key manifests in ../shared/manifests (tensor names and shapes)."""

    def load(name: str) -> dict:
        path = SHARED / "manifests" / name
        if not path.exists():
            pytest.skip(f"{path} not found: the shared folder sits beside the checkout")
        return json.loads(path.read_text())

    return load


@pytest.fixture(scope="session")
def shared_hf():
    """Folder of the official configs and tokenizer files (../shared/hf)."""
    path = SHARED / "hf"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared folder sits beside the checkout")
    return path


@pytest.fixture
def manifest_tensors(manifest):
    """`manifest_tensors(name, prefix)`: `meta_tensors` of the official manifest `name`."""

    def load(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
        return meta_tensors(manifest(name), prefix)

    return load
