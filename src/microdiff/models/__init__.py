"""Backbones: plain nn.Modules F(x_in, c_noise, **cond) that know nothing about noise."""

from .dit import DIT_PRESETS, MicroDiT, MicroDiT_Nano_2, MicroDiT_Small_2, MicroDiT_Tiny_2, MicroDiT_XL_2, load_microdit, microdit
from .mlp import MLPBackbone
from .moe import ExpertChoiceMoE
from .unet import UNET_PRESETS, UNet, UNet_DDPMpp_CIFAR, UNet_Noise2Art, UNet_Small, unet

__all__ = [
    "MLPBackbone", "MicroDiT", "MicroDiT_XL_2", "MicroDiT_Tiny_2", "MicroDiT_Small_2", "MicroDiT_Nano_2",
    "DIT_PRESETS", "microdit", "load_microdit", "ExpertChoiceMoE",
    "UNet", "UNet_Small", "UNet_Noise2Art", "UNet_DDPMpp_CIFAR", "UNET_PRESETS", "unet",
]
