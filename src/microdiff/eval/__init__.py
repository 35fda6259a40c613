"""Evaluation: distances between sample sets, FID/FD, CLIP score, memorisation."""

from .frechet import feature_statistics, frechet_distance, frechet_distance_from_features, pixel_features
from .shapes_checker import judge_image, judge_prompt, prompt_alignment

__all__ = ["frechet_distance", "feature_statistics", "frechet_distance_from_features", "pixel_features",
           "judge_image", "judge_prompt", "prompt_alignment"]
