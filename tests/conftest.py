import os

# Spinning OpenMP threads on 2 shared cores is ~30x slower; hub look-ups hang before failing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def mixture():
    """A 2-D, 3-component mixture with unequal weights and spreads: the exact denoiser is known."""
    from microdiff.data.mixture import GaussianMixture

    return GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], [0.3, 0.2, 0.25], [0.5, 0.3, 0.2])
