"""Ambient: learning from corrupted data (noisy, blurred, compressed, partially observed images).

- ``corruptions``: the operators that make (and describe) corrupted data, deterministic per sample;
- ``dataset``: :class:`CorruptedDataset`, corrupting any map-style dataset per record key;
- ``annotations``: per-sample noise levels (sigma_tn, sigma_max) as a CSV that training reads;
- ``annotate``: ``microdiff annotate``, a noise-conditional quality classifier that writes them;
- ``sampling``: sampling Ambient Diffusion models with fixed masks;
- ``consistency``: Ambient Tweedie's consistency loss for sigma < sigma_tn.

The ambient losses live in the one denoising loss (``diffusion.loss.denoising_loss``: ``sigma_tn``,
``input_mask``); the trainer's glue (levels, sigma-first selection) in ``train.ambient``.
"""

from .annotate import (AnnotateConfig, QualityClassifier, annotate, annotate_sigma_tn, load_quality_classifier,
                       low_quality_probability, sigma_grid, train_quality_classifier)
from .annotations import read_annotations, write_annotations
from .consistency import consistency_loss, reverse_draw
from .corruptions import (CORRUPTIONS, MASK_CORRUPTIONS, Corrupted, additive_noise, apply_corruption, box,
                          colour_shift, downup, dust, fixed_box, further_mask, gaussian_blur, jpeg, keep_patch,
                          parse_corruption, pixel_mask, sample_generator)
from .dataset import CorruptedDataset, corrupt_record
from .sampling import FixedMaskDenoiser, sampling_masks

__all__ = ["CORRUPTIONS", "MASK_CORRUPTIONS", "Corrupted", "additive_noise", "apply_corruption", "box", "colour_shift",
           "downup", "dust", "fixed_box", "further_mask", "gaussian_blur", "jpeg", "keep_patch", "parse_corruption",
           "pixel_mask", "sample_generator", "CorruptedDataset", "corrupt_record", "read_annotations",
           "write_annotations", "FixedMaskDenoiser", "sampling_masks", "AnnotateConfig", "QualityClassifier", "annotate",
           "annotate_sigma_tn", "load_quality_classifier", "low_quality_probability", "sigma_grid",
           "train_quality_classifier", "consistency_loss", "reverse_draw"]
