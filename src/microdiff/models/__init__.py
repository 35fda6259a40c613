"""Backbones: plain nn.Modules F(x_in, c_noise, **cond) that know nothing about noise."""

from .mlp import MLPBackbone

__all__ = ["MLPBackbone"]
