"""Evaluation: distances between sample sets, FID/FD, CLIP score, memorisation."""
