"""JAX/Flax port of the Stable Diffusion x2 latent upscaler."""

from flax_latentup.configs import (
    AutoencoderKLConfig,
    CLIPTextConfig,
    ConfigError,
    UNet2DConditionConfig,
)
from flax_latentup.hub import HubError
from flax_latentup.models.clip import CLIPTextOutput, FlaxCLIPTextModel
from flax_latentup.models.conv import conv_config
from flax_latentup.models.layers import attention, attention_config
from flax_latentup.models.unet import FlaxUNet2DConditionModel
from flax_latentup.models.vae import (
    DiagonalGaussianDistribution,
    FlaxAutoencoderKL,
    nonfinite_images,
)
from flax_latentup.pipeline import (
    FlaxStableDiffusionLatentUpscalePipeline,
    UpscalePipelineOutput,
    preferred_dtype,
)
from flax_latentup.weights import WeightsError

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKLConfig",
    "CLIPTextConfig",
    "CLIPTextOutput",
    "ConfigError",
    "DiagonalGaussianDistribution",
    "FlaxAutoencoderKL",
    "FlaxCLIPTextModel",
    "FlaxStableDiffusionLatentUpscalePipeline",
    "FlaxUNet2DConditionModel",
    "HubError",
    "UNet2DConditionConfig",
    "UpscalePipelineOutput",
    "WeightsError",
    "attention",
    "attention_config",
    "conv_config",
    "nonfinite_images",
    "preferred_dtype",
    "__version__",
]
