"""trainer.images: device-side example construction against a slow NumPy reference; noise and rare images."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqgen.config import BuildConfig, DatasetConfig, ExampleType, Exemplars, SequenceConfig
from seqgen.split import make_split
from trainer.images import GRAY_LUT, make_examples, prepare_table, rare_mask, resize_matrix

N_CHARS = 12
RNG = np.random.default_rng(0)
TABLE = RNG.integers(0, 256, size=(N_CHARS, 20, 105, 105), dtype=np.uint8)


@pytest.fixture(scope="module")
def tables():
    return {105: prepare_table(TABLE, 105), 28: prepare_table(TABLE, 28)}


def ref_example(ex: int, exm: int, d: DatasetConfig, size: int) -> np.ndarray:
    """The slow obvious version: the id mapping of docs/shard-format.md, np.fliplr / np.rot90 per image, then TF resize."""
    t, base = (ex % 8, ex // 8) if d.augment else (0, ex)
    char, draw = (base // 20, base % 20) if d.exemplars is Exemplars.SEPARATED else (base, exm)
    img = GRAY_LUT[TABLE[char, draw]].astype(np.float64)
    if t // 4:
        img = np.fliplr(img)
    img = np.rot90(img, t % 4)
    if size != 105:
        r = resize_matrix(105, size).astype(np.float64)
        img = r @ img @ r.T
    return img


def _batch(d: DatasetConfig, b: int = 3, length: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    per_char = (8 if d.augment else 1) * (20 if d.exemplars is Exemplars.SEPARATED else 1)
    return {
        "example": rng.integers(0, N_CHARS * per_char, size=(b, length)).astype(np.int32),
        "exemplar": rng.integers(0, 20, size=(b, length)).astype(np.int32),
        "noise_seed": rng.integers(0, 2**32, size=b, dtype=np.uint32),
    }


def test_gray_lut_matches_tf_conversion():
    assert GRAY_LUT[0] == 0.0
    assert abs(GRAY_LUT[255] - 0.9999) < 1e-6  # rgb_to_grayscale weights sum to 0.9999
    assert np.all(np.diff(GRAY_LUT) > 0)


@pytest.mark.parametrize("out", [28, 50])
def test_resize_matrix_is_tf_bilinear(out):
    r = resize_matrix(105, out)
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=1e-6)
    x = RNG.random((105, 105)).astype(np.float32)
    ref = jax.image.resize(jnp.asarray(x), (out, out), method="linear", antialias=False)
    np.testing.assert_allclose(r @ x @ r.T, np.asarray(ref), atol=1e-5)
    # hand check of TF's half-pixel formula for 105 -> 28: out 0 samples input 1.375
    if out == 28:
        np.testing.assert_allclose(r[0, :3], [0.0, 0.625, 0.375])
        np.testing.assert_allclose(r[::-1, ::-1], r, atol=1e-7)  # symmetric: commutes with flips


def test_prepare_table(tables):
    assert tables[105].dtype == jnp.uint8 and tables[105].shape == (N_CHARS, 20, 105, 105)
    assert tables[28].dtype == jnp.float32 and tables[28].shape == (N_CHARS, 20, 28, 28)
    with pytest.raises(ValueError, match="uint8"):
        prepare_table(TABLE.astype(np.float32), 28)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("exemplars", [Exemplars.ALL, Exemplars.SEPARATED, Exemplars.SINGLE])
@pytest.mark.parametrize("size", [105, 28])
def test_matches_numpy_reference(tables, augment, exemplars, size):
    d = DatasetConfig(exemplars=exemplars, augment=augment)
    cfg = BuildConfig(dataset=d)
    batch = _batch(d)
    out = np.asarray(jax.jit(make_examples, static_argnums=2)(tables[size], batch, cfg))
    assert out.shape == (3, 5, size, size, 1) and out.dtype == np.float32
    for b in range(3):
        for j in range(5):
            ref = ref_example(int(batch["example"][b, j]), int(batch["exemplar"][b, j]), d, size)
            np.testing.assert_allclose(out[b, j, ..., 0], ref, atol=2e-5, err_msg=f"{b},{j}")


def test_all_eight_transforms_distinct(tables):
    d = DatasetConfig(augment=True)
    batch = {"example": np.arange(8, dtype=np.int32)[None] + 8 * 3, "exemplar": np.zeros((1, 8), np.int32)}
    out = np.asarray(make_examples(tables[105], batch, BuildConfig(dataset=d)))[0, ..., 0]
    assert len({o.tobytes() for o in out}) == 8
    np.testing.assert_array_equal(out[5], np.rot90(np.fliplr(out[0])))  # t=5: flip, then rot90 once (CCW)


def test_symbolic_returns_ids():
    cfg = BuildConfig(dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC))
    ex = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = make_examples(jnp.zeros((1,)), {"example": ex}, cfg)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, ex)


def _noisy_cfg(noise: float, rare: bool) -> BuildConfig:
    return BuildConfig(sequence=SequenceConfig(noise_scale=noise, randomly_generate_rare=rare))


def test_noise_deterministic_per_sequence(tables):
    cfg, clean_cfg = _noisy_cfg(0.5, False), BuildConfig()
    batch = _batch(cfg.dataset, b=4, length=6)
    a = np.asarray(make_examples(tables[105], batch, cfg))
    b = np.asarray(make_examples(tables[105], batch, cfg))
    np.testing.assert_array_equal(a, b)
    clean = np.asarray(make_examples(tables[105], batch, clean_cfg))
    noise = a - clean
    assert abs(noise.std() - 0.5) < 0.01 and abs(noise.mean()) < 0.01
    # sequence b's noise depends only on its own seed, not on the rest of the batch
    single = {k: v[2:3] for k, v in batch.items()}
    np.testing.assert_allclose(np.asarray(make_examples(tables[105], single, cfg))[0], a[2], atol=1e-6)
    other = dict(batch, noise_seed=batch["noise_seed"] + 1)
    assert not np.allclose(np.asarray(make_examples(tables[105], other, cfg)), a)
    # key = fold_in(key(0), seed), noise stream fold_in(., 0): check one value by hand
    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), int(batch["noise_seed"][0])), 0)
    expect = np.asarray(jax.random.normal(k, (6, 105, 105)))[1] * 0.5
    np.testing.assert_allclose(noise[0, 1, ..., 0], expect, atol=1e-5)


def test_random_rare_images(tables):
    cfg = _noisy_cfg(0.0, True)
    rare = np.zeros(cfg.dataset.num_dataset_classes, bool)
    rare[[3, 5]] = True
    batch = {
        "example": np.array([[3, 1, 5, 3, 5, 3], [5, 3, 2, 2, 3, 7]], np.int32),
        "exemplar": np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], np.int32),
        "noise_seed": np.array([11, 12], np.uint32),
    }
    out = np.asarray(make_examples(tables[105], batch, cfg, rare=rare))[..., 0]
    clean = np.asarray(make_examples(tables[105], batch, BuildConfig()))[..., 0]
    for s in range(2):
        for j in range(6):
            c = batch["example"][s, j]
            if rare[c]:
                assert set(np.unique(out[s, j])) <= {0.0, 1.0} and 0.4 < out[s, j].mean() < 0.6
            else:
                np.testing.assert_array_equal(out[s, j], clean[s, j])
    np.testing.assert_array_equal(out[0, 0], out[0, 3])  # class 3 repeated in sequence 0: same image
    np.testing.assert_array_equal(out[0, 0], out[0, 5])
    np.testing.assert_array_equal(out[0, 2], out[0, 4])  # class 5
    assert not np.array_equal(out[0, 0], out[0, 2])  # different classes differ
    assert not np.array_equal(out[0, 0], out[1, 1])  # same class, other sequence (seed) differs
    # with noise on top: same underlying image, independent noise per position
    noisy = np.asarray(make_examples(tables[105], batch, _noisy_cfg(0.1, True), rare=rare))[..., 0]
    diff = noisy[0, 0] - noisy[0, 3]
    assert 0.1 < diff.std() < 0.2  # sqrt(2) * 0.1


def test_default_rare_mask_is_split_rare_pool():
    cfg = _noisy_cfg(0.0, True)
    mask = rare_mask(cfg)
    assert mask.sum() == cfg.split.n_rare_classes
    np.testing.assert_array_equal(np.flatnonzero(mask), np.sort(make_split(cfg).rare))


def test_downsampled_equals_resize_of_full_size(tables):
    """Noise and random rare images are drawn at 105 px then resized, as the original's order."""
    cfg = _noisy_cfg(0.3, True)
    rare = np.zeros(cfg.dataset.num_dataset_classes, bool)
    rare[[2, 4]] = True
    batch = {"example": np.array([[2, 1, 4, 2, 0]], np.int32), "exemplar": np.array([[0, 3, 1, 2, 9]], np.int32),
             "noise_seed": np.array([7], np.uint32)}
    full = np.asarray(make_examples(tables[105], batch, cfg, rare=rare))[..., 0].astype(np.float64)
    small = np.asarray(make_examples(tables[28], batch, cfg, rare=rare))[..., 0]
    r = resize_matrix(105, 28).astype(np.float64)
    np.testing.assert_allclose(small, r @ full @ r.T, atol=1e-4)


def test_augmented_separated_ids_map_to_characters(tables):
    d = DatasetConfig(exemplars=Exemplars.SEPARATED, augment=True)
    cfg = BuildConfig(dataset=dataclasses.replace(d))
    # id = ((char * 20 + drawing) * 8 + t): char 4, drawing 7, t 0
    ex = np.array([[(4 * 20 + 7) * 8]], np.int32)
    out = np.asarray(make_examples(tables[105], {"example": ex, "exemplar": np.zeros_like(ex)}, cfg))
    np.testing.assert_array_equal(out[0, 0, ..., 0], GRAY_LUT[TABLE[4, 7]])


SOURCE_NOISE_KEPT_AT_28 = 0.653  # the std of 105-px noise resized to 28 px, per unit of noise_scale (measured)


def test_noise_drawn_at_the_training_size_keeps_its_scale(tables):
    """The original draws noise at 105 px and resizes it with the image: at 28 px the bilinear resize averages
    neighbouring pixels, leaving a fraction of the noise's standard deviation (TrainingConfig.noise_at's help
    gives it). noise_at_size draws it at 28 px, after the resize: std noise_scale, as at 105 px."""
    cfg = _noisy_cfg(0.5, False)
    batch = _batch(cfg.dataset, b=8, length=9)
    clean = np.asarray(make_examples(tables[28], batch, BuildConfig()))
    source = np.asarray(make_examples(tables[28], batch, cfg)) - clean
    at_size = np.asarray(make_examples(tables[28], batch, cfg, noise_at_size=True)) - clean
    assert abs(at_size.std() - 0.5) < 0.01 and abs(at_size.mean()) < 0.01
    assert abs(source.std() / 0.5 - SOURCE_NOISE_KEPT_AT_28) < 0.01
    np.testing.assert_array_equal(np.asarray(make_examples(tables[105], batch, cfg, noise_at_size=True)),
                                  np.asarray(make_examples(tables[105], batch, cfg)))  # at 105 px: the same



def test_a_run_makes_its_inputs_with_its_noise_placement(tables):
    from trainer.config import NoiseAt, TrainConfig, TrainingConfig
    from trainer.images import examples_for

    cfg = _noisy_cfg(0.5, False)
    batch = _batch(cfg.dataset, b=2, length=9)
    for at, size in ((NoiseAt.SOURCE, False), (NoiseAt.TRAINING, True)):
        run = TrainConfig(training=TrainingConfig(image_size=28, noise_at=at))
        np.testing.assert_array_equal(np.asarray(examples_for(run)(tables[28], batch, cfg)),
                                      np.asarray(make_examples(tables[28], batch, cfg, noise_at_size=size)))
