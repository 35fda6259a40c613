"""Evaluation: distances between sample sets, FID/FD, KID, precision/recall, Vendi, CLIP score,
memorisation."""

from .frechet import feature_statistics, frechet_distance, frechet_distance_from_features, pixel_features
from .features import Features, extract, load_clip, load_features
from .inception import FIDInceptionV3, inception_features, load_fid_inception
from .memorization import distributed_top_k, memorization_report, save_report, top_k_similar
from .metrics import (clip_score, kernel_inception_distance, paired_cosine, polynomial_mmd2, precision_recall,
                      vendi_score, vendi_score_from_kernel)
from .shapes_checker import judge_image, judge_prompt, prompt_alignment

__all__ = ["frechet_distance", "feature_statistics", "frechet_distance_from_features", "pixel_features",
           "FIDInceptionV3", "load_fid_inception", "inception_features", "kernel_inception_distance",
           "polynomial_mmd2", "precision_recall", "vendi_score", "vendi_score_from_kernel", "clip_score",
           "paired_cosine", "judge_image", "judge_prompt", "prompt_alignment", "Features", "load_features", "load_clip",
           "extract", "top_k_similar", "distributed_top_k", "memorization_report", "save_report"]
