"""KID, improved precision/recall, Vendi score and CLIP score against known answers.

KID: the unbiased MMD^2 against a brute-force double loop over pairs (exact to 1e-12), ~0 for two
samples of one distribution, clearly positive for shifted Gaussians, and against torchmetrics'
polynomial-kernel MMD and KernelInceptionDistance (subsets covering the whole sets) when installed.
Precision/recall: identical sets (1, 1), far-apart sets (0, 0), a generator covering one of two
reference clusters (precision ~1, recall ~1/2), batching invariance and a naive broadcast reference.
Vendi: n orthogonal vectors -> n, n copies -> 1, two equal groups -> 2, two vectors at cosine c ->
the closed form, the (D, D) shortcut against the (n, n) kernel. CLIP score: identical -> 100,
orthogonal/opposite -> 0, scale, and torchmetrics' clip_score with a stand-in CLIP model. Errors.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from microdiff.eval.metrics import (clip_score, kernel_inception_distance, paired_cosine, polynomial_mmd2,
                                    precision_recall, vendi_score, vendi_score_from_kernel)


# --- KID ----------------------------------------------------------------------------------------------
def _mmd2_double_loop(x, y, degree=3, gamma=None, coef0=1.0):
    """Textbook unbiased MMD^2, one kernel evaluation at a time in Python floats."""
    gamma = 1.0 / len(x[0]) if gamma is None else gamma

    def k(a, b):
        return (gamma * sum(float(u) * float(v) for u, v in zip(a, b)) + coef0) ** degree

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("m,n,degree,gamma,coef0", [(5, 5, 3, None, 1.0), (4, 7, 3, None, 1.0),
                                                    (6, 3, 2, 0.3, 0.5)])
def test_unbiased_mmd_matches_a_double_loop(m, n, degree, gamma, coef0):
    rng = np.random.default_rng(m * 10 + n)
    x, y = rng.standard_normal((m, 4)), rng.standard_normal((n, 4)) + 0.5
    expected = _mmd2_double_loop(x, y, degree, gamma, coef0)
    assert polynomial_mmd2(x, y, degree, gamma, coef0) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_kid_with_whole_equal_sets_is_the_single_mmd_with_zero_std():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    mean, std = kid = kernel_inception_distance(x, y, subsets=5, subset_size=100)
    assert mean == pytest.approx(_mmd2_double_loop(x, y), rel=1e-12, abs=1e-12) and std == 0.0
    assert kernel_inception_distance(torch.from_numpy(x).float(), y.tolist(), subset_size=6) == \
        pytest.approx(kid, rel=1e-6)  # tensors (float32 -> float64) and lists accepted


def test_kid_of_one_distribution_is_zero_within_its_std_and_positive_when_shifted():
    rng = np.random.default_rng(1)
    ref, same = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    shifted = rng.standard_normal((300, 8)) + 1.0
    mean, std = kernel_inception_distance(same, ref, subsets=20, subset_size=150, seed=3)
    # Measured over data seeds 0-29: |mean| / std 0.02-1.76 (<= 1 in only 87% of seeds); a biased
    # V-statistic (diagonal kept) gives 4.6-7.6, so 3 separates them.
    assert std > 0 and abs(mean) <= 3 * std
    mean_shift, std_shift = kernel_inception_distance(shifted, ref, subsets=20, subset_size=150, seed=3)
    # Measured over seeds 0-29: mean_shift / std_shift 9.6-17.3, mean_shift / |mean| 200 and more.
    assert mean_shift > 5 * std_shift > 0 and mean_shift > 50 * abs(mean)


def test_kid_clips_subset_size_to_the_smaller_set_and_is_seeded():
    rng = np.random.default_rng(2)
    gen, ref = rng.standard_normal((20, 4)), rng.standard_normal((50, 4)) + 0.3
    a = kernel_inception_distance(gen, ref, subsets=4, subset_size=1000, seed=7)
    assert a == kernel_inception_distance(gen, ref, subsets=4, subset_size=20, seed=7)
    assert a != kernel_inception_distance(gen, ref, subsets=4, subset_size=20, seed=8)
    assert a[1] > 0  # the 20 gen rows are all used, the 50 ref rows are subsampled


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics():
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((40, 16)), rng.standard_normal((40, 16)) * 1.2 + 0.2
    ours, std = kernel_inception_distance(x, y, subset_size=40)
    theirs = float(kid_module.poly_mmd(torch.from_numpy(y), torch.from_numpy(x)))  # (real, fake)
    assert ours == pytest.approx(theirs, rel=1e-12) and std == 0.0
    metric = kid_module.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=40)
    metric.set_dtype(torch.float64)
    metric.update(torch.from_numpy(y), real=True)
    metric.update(torch.from_numpy(x), real=False)
    mean, spread = metric.compute()  # every subset is a permutation of the whole sets
    assert float(mean) == pytest.approx(ours, rel=1e-9) and float(spread) == pytest.approx(0.0, abs=1e-9)


# --- precision / recall -----------------------------------------------------------------------------
def _precision_recall_naive(gen, ref, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    d = np.sqrt(((gen[:, None] - ref[None]) ** 2).sum(-1))  # (N_gen, N_ref)
    precision = (d <= radii(ref)[None, :]).any(axis=1).mean()
    recall = (d <= radii(gen)[:, None]).any(axis=0).mean()
    return {"precision": float(precision), "recall": float(recall)}


def test_identical_sets_have_precision_and_recall_one():
    x = np.random.default_rng(5).standard_normal((200, 16)) + 50.0  # far from the origin: centring matters
    assert precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0}


def test_far_away_generator_has_zero_precision_and_recall():
    ref = np.random.default_rng(6).standard_normal((100, 8))
    gen = np.random.default_rng(7).standard_normal((100, 8)) + 100.0
    assert precision_recall(gen, ref) == {"precision": 0.0, "recall": 0.0}


def test_generator_covering_one_of_two_clusters_halves_recall_only():
    rng = np.random.default_rng(8)
    centres = np.zeros((2, 4))
    centres[1, 0] = 20.0
    ref = np.concatenate([rng.standard_normal((200, 4)) + centres[0], rng.standard_normal((200, 4)) + centres[1]])
    gen = rng.standard_normal((400, 4)) + centres[0]
    result = precision_recall(gen, ref, k=3)
    # Measured over data seeds 0-29: precision 0.90-0.96, recall 0.46-0.485.
    assert result["precision"] > 0.85
    assert 0.4 < result["recall"] <= 0.5  # no ref point of the second cluster is covered


def test_precision_recall_matches_a_naive_reference_and_ignores_batching():
    rng = np.random.default_rng(9)
    gen, ref = rng.standard_normal((70, 5)) * 0.8 + 0.8, rng.standard_normal((90, 5))
    expected = _precision_recall_naive(gen, ref, k=4)
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
    assert precision_recall(gen, ref, k=4) == expected
    assert precision_recall(torch.from_numpy(gen), ref, k=4, batch_size=7) == expected


# --- Vendi score ------------------------------------------------------------------------------------
def test_vendi_of_orthogonal_identical_and_two_groups():
    n = 6
    assert vendi_score(np.eye(n) * 3.0) == pytest.approx(n, rel=1e-12)
    assert vendi_score(np.eye(n, 10)) == pytest.approx(n, rel=1e-12)  # D > n: the (n, n) path
    assert vendi_score(np.tile([[1.0, 2.0, -1.0]], (n, 1))) == pytest.approx(1.0, rel=1e-12)
    two_groups = np.repeat(np.eye(2, 5), 4, axis=0) * np.arange(1, 9)[:, None]  # 4 + 4 rows, scaled
    assert vendi_score(two_groups) == pytest.approx(2.0, rel=1e-12)
    assert vendi_score_from_kernel(np.eye(n)) == pytest.approx(n, rel=1e-12)
    assert vendi_score_from_kernel(np.ones((n, n))) == pytest.approx(1.0, rel=1e-12)


def test_vendi_of_two_vectors_at_cosine_c_is_the_closed_form():
    c = 0.6  # K / 2 has eigenvalues (1 +- c) / 2
    p = np.array([(1 + c) / 2, (1 - c) / 2])
    expected = float(np.exp(-(p * np.log(p)).sum()))
    assert vendi_score([[1.0, 0.0], [c, np.sqrt(1 - c * c)]]) == pytest.approx(expected, rel=1e-12)
    assert vendi_score_from_kernel([[1.0, c], [c, 1.0]]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n,d", [(40, 5), (5, 40)])
def test_vendi_feature_shortcut_matches_the_kernel_matrix(n, d):
    x = np.random.default_rng(n).standard_normal((n, d))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert vendi_score(torch.from_numpy(x)) == pytest.approx(vendi_score_from_kernel(unit @ unit.T), rel=1e-10)


# --- CLIP score -------------------------------------------------------------------------------------
def test_clip_score_of_identical_orthogonal_and_opposite_embeddings():
    image = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    text = np.array([[5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    mean, per_pair = clip_score(image, text)
    np.testing.assert_allclose(per_pair, [100.0, 0.0, 0.0], atol=1e-12)
    assert mean == pytest.approx(100 / 3, rel=1e-12)
    assert clip_score(image, image)[0] == pytest.approx(100.0, rel=1e-12)
    np.testing.assert_allclose(paired_cosine(image, text), [1.0, 0.0, -1.0], atol=1e-12)


def test_clip_score_scale_multiplies_the_clipped_cosine():
    image, text = [[1.0, 0.0], [1.0, 0.0]], [[0.5, np.sqrt(0.75)], [-0.5, np.sqrt(0.75)]]  # cos 0.5 and -0.5
    mean, per_pair = clip_score(torch.tensor(image), text, scale=2.5)
    np.testing.assert_allclose(per_pair, [1.25, 0.0], atol=1e-12)
    assert mean == pytest.approx(0.625, rel=1e-12)


def test_clip_score_matches_torchmetrics_with_a_stand_in_clip_model():
    functional = pytest.importorskip("torchmetrics.functional.multimodal.clip_score")
    rng = np.random.default_rng(10)
    image_features = rng.standard_normal((6, 8)) + 1.0  # positive cosines: both clipping conventions agree
    text_features = image_features + 0.8 * rng.standard_normal((6, 8))
    text_table = torch.from_numpy(text_features)

    class StandIn:  # images carry their own features; captions "0".."5" index the text table
        config = SimpleNamespace()

        def to(self, device):
            return self

        def get_image_features(self, pixel_values):
            return pixel_values.reshape(len(pixel_values), -1)

        def get_text_features(self, input_ids, attention_mask):
            return text_table[input_ids[:, 0]]

    def processor(images=None, text=None, **kwargs):
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        ids = torch.tensor([[int(t)] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    images = torch.from_numpy(image_features).reshape(6, 1, 1, 8)
    captions = [str(i) for i in range(6)]
    theirs = functional.clip_score(images, captions, model_name_or_path=lambda: (StandIn(), processor))
    ours, per_pair = clip_score(image_features, text_features)
    assert np.all(per_pair > 0) and ours == pytest.approx(float(theirs), rel=1e-12)


# --- errors -----------------------------------------------------------------------------------------
def _one_line_error(call, *fragments):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_errors_are_one_line_and_name_the_problem():
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((10, 4)), rng.standard_normal((10, 5))
    nan = a.copy()
    nan[3, 1] = np.nan
    _one_line_error(lambda: kernel_inception_distance(a, b), "same feature dimension", "4 and 5")
    _one_line_error(lambda: precision_recall(a, b), "same feature dimension")
    _one_line_error(lambda: clip_score(a, b), "image_features and text_features")
    _one_line_error(lambda: kernel_inception_distance(np.zeros((0, 4)), a), "gen is empty")
    _one_line_error(lambda: vendi_score([]), "features must be (N, D)")
    _one_line_error(lambda: kernel_inception_distance(a[:1], a), "gen has 1 sample", "at least 2")
    _one_line_error(lambda: precision_recall(a, a[:3], k=3), "ref has 3 sample", "lower k")
    _one_line_error(lambda: kernel_inception_distance(a, nan), "ref contains NaN")
    _one_line_error(lambda: vendi_score(nan), "features contains NaN")
    _one_line_error(lambda: clip_score(nan, a), "image_features contains NaN")
    _one_line_error(lambda: clip_score(a, a[:5]), "same number of rows")
    _one_line_error(lambda: clip_score(np.zeros((2, 4)), a[:2]), "all-zero row")
    _one_line_error(lambda: clip_score(a, a, scale=0), "scale must be")
    _one_line_error(lambda: kernel_inception_distance(a, a, subsets=0), "subsets must be")
    _one_line_error(lambda: kernel_inception_distance(a, a, gamma=-1.0), "gamma must be")
    _one_line_error(lambda: precision_recall(a, a, k=0), "k must be")
    _one_line_error(lambda: vendi_score(a, kernel="rbf"), "kernel must be 'cosine'")
    _one_line_error(lambda: vendi_score_from_kernel(np.ones((2, 3))), "square")
    _one_line_error(lambda: vendi_score_from_kernel(2 * np.eye(3)), "ones on the diagonal")
    _one_line_error(lambda: vendi_score_from_kernel([[1.0, 0.5], [0.1, 1.0]]), "not symmetric")
