"""Tensor augmentations against closed forms and PIL's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vitprune.errors import VitPruneError
from vitprune.training import augment as A


def _img(c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), generator=g).float() / 255.0


def _pil(x: torch.Tensor) -> Image.Image:
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr if arr.shape[2] == 3 else arr[:, :, 0])


def _from_pil(img: Image.Image) -> torch.Tensor:
    return A.to_tensor(img)


def test_to_tensor_and_normalize():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = A.to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    y = A.Normalize([0.5, 0.25, 0.0], [0.5, 0.5, 1.0])(x)
    assert torch.allclose(y[1], (x[1] - 0.25) / 0.5)
    gray = A.to_tensor(Image.fromarray(arr[:, :, 0]))
    assert gray.shape == (1, 2, 3)


def test_flip_and_padded_crop():
    x = _img()
    assert torch.equal(A.RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(A.RandomHorizontalFlip(0.0)(x), x)
    torch.manual_seed(0)
    out = A.RandomCrop(16, padding=2)(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    hits = [(t, c) for t in range(5) for c in range(5) if torch.equal(padded[:, t : t + 16, c : c + 16], out)]
    assert hits, "a padded random crop must be a window of the padded image"


def test_random_resized_crop_full_area_is_identity_and_boxes_are_valid():
    x = _img()
    assert torch.equal(A.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x), x)
    rrc = A.RandomResizedCrop(8, scale=(0.1, 0.5))
    torch.manual_seed(1)
    for _ in range(50):
        top, left, h, w = rrc.get_params(16, 16)
        assert top >= 0 and left >= 0 and top + h <= 16 and left + w <= 16 and h > 0 and w > 0
    assert rrc(x).shape == (3, 8, 8)


def test_rotate_90_is_rot90_and_translate_is_a_shift():
    x = _img(h=8, w=8)
    assert torch.allclose(A.rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)
    assert torch.allclose(A.rotate(x, 0.0), x)
    shifted = A.translate(x, 2, 1)
    expect = torch.zeros_like(x)
    expect[:, 1:, 2:] = x[:, :-1, :-2]
    assert torch.allclose(shifted, expect, atol=1e-6)
    assert torch.allclose(A.shear_x(x, 0.0), x) and torch.allclose(A.shear_y(x, 0.0), x)


def test_shear_x_moves_rows_by_their_offset():
    """Output (u, v) samples input (u + f v, v) about the centre; rows 0 / 7 sit at v = -3.5 / +3.5."""
    x = _img(c=1, h=8, w=8)
    out = A.shear_x(x, 1.0 / 3.5, fill=0.0)
    assert torch.allclose(out[:, 7, :-1], x[:, 7, 1:], atol=1e-6) and out[0, 7, -1] == 0
    assert torch.allclose(out[:, 0, 1:], x[:, 0, :-1], atol=1e-6) and out[0, 0, 0] == 0
    out_y = A.shear_y(x, 1.0 / 3.5)
    assert torch.allclose(out_y[:, :-1, 7], x[:, 1:, 7], atol=1e-6)


@pytest.mark.parametrize(
    ("ours", "pil"),
    [
        (lambda x: A.brightness(x, 1.6), lambda im: ImageEnhance.Brightness(im).enhance(1.6)),
        (lambda x: A.brightness(x, 0.3), lambda im: ImageEnhance.Brightness(im).enhance(0.3)),
        (lambda x: A.color(x, 0.2), lambda im: ImageEnhance.Color(im).enhance(0.2)),
        (lambda x: A.sharpness(x, 1.8), lambda im: ImageEnhance.Sharpness(im).enhance(1.8)),
        (lambda x: A.sharpness(x, 0.1), lambda im: ImageEnhance.Sharpness(im).enhance(0.1)),
        (lambda x: A.solarize(x, 128 / 255), lambda im: ImageOps.solarize(im, 128)),
        (lambda x: A.posterize(x, 3), lambda im: ImageOps.posterize(im, 3)),
        (A.autocontrast, ImageOps.autocontrast),
    ],
)
def test_colour_ops_match_pil(ours, pil):
    x = _img(h=12, w=12, seed=3)
    expect = _from_pil(pil(_pil(x)))
    assert torch.allclose(ours(x), expect, atol=1.5 / 255)


def test_contrast_matches_pil_up_to_mean_rounding():
    x = _img(h=12, w=12, seed=4)
    expect = _from_pil(ImageEnhance.Contrast(_pil(x)).enhance(1.5))
    assert torch.allclose(A.contrast(x, 1.5), expect, atol=2.5 / 255)


def test_randaugment_shapes_range_determinism_and_identity_at_zero():
    x = _img(c=1, h=28, w=28)
    ra = A.RandAugment(num_ops=2, magnitude=9)
    torch.manual_seed(5)
    a = [ra(x) for _ in range(20)]
    torch.manual_seed(5)
    b = [ra(x) for _ in range(20)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(u.shape == x.shape and u.min() >= 0 and u.max() <= 1 for u in a)
    assert any(not torch.equal(u, x) for u in a)
    geometric = A.RandAugment(num_ops=3, magnitude=0, ops=("rotate", "shear_x", "translate_y", "brightness"))
    assert torch.allclose(geometric(x), x, atol=1e-6)
    for op in A.RandAugment.OPS:
        assert A.RandAugment().apply_op(x, op, 0.7).shape == x.shape


def test_parse_randaugment():
    ra = A.parse_randaugment("rand-m7-n3")
    assert ra.magnitude == 7 and ra.num_ops == 3
    assert A.parse_randaugment("none") is None and A.parse_randaugment(None) is None
    for bad in ("auto-m9", "rand-x9", "rand-m11"):
        with pytest.raises(VitPruneError):
            A.parse_randaugment(bad)


def test_build_train_transform_from_pil_and_tensor():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    tf = A.build_train_transform(24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), randaugment="rand-m9-n2")
    torch.manual_seed(0)
    out = tf(img)
    assert out.shape == (3, 24, 24) and out.min() >= -1 and out.max() <= 1
    tf2 = A.build_train_transform(28, scale=None, crop_padding=2, randaugment=None)
    assert tf2(_img(c=1, h=28, w=28)).shape == (1, 28, 28)


def test_mixup_targets_and_images_are_consistent():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mix = A.MixupCutmix(num_classes=5, mixup_alpha=0.4, cutmix_alpha=0.0)
    xm, t = mix(x, y)
    assert torch.allclose(t.sum(1), torch.ones(6))
    lam = t[0, 0].item()  # sample 0 (class 0) mixed with sample 5 (class 0) -> use sample 1 instead
    lam = t[1, 1].item() if y[1] != y[4] else lam
    assert torch.allclose(xm[1], lam * x[1] + (1 - lam) * x[4], atol=1e-6)


def test_cutmix_pastes_a_box_with_the_target_area():
    torch.manual_seed(3)
    x = torch.zeros(2, 1, 10, 10)
    x[1] = 1.0
    y = torch.tensor([0, 1])
    xm, t = A.MixupCutmix(num_classes=2, mixup_alpha=0.0, cutmix_alpha=1.0)(x, y)
    pasted = xm[0].mean().item()  # fraction of sample 0's pixels that came from sample 1
    assert t[0, 1].item() == pytest.approx(pasted, abs=1e-6)
    assert t[0, 0].item() == pytest.approx(1 - pasted, abs=1e-6)


def test_mixup_disabled_returns_one_hot_and_collate():
    y = torch.tensor([1, 0])
    x = torch.randn(2, 3)
    xm, t = A.MixupCutmix(3, 0.0, 0.0)(x, y)
    assert torch.equal(xm, x) and torch.equal(t, torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    batch = [(torch.ones(1, 2, 2) * i, i % 3) for i in range(4)]
    xb, tb = A.MixupCollate(A.MixupCutmix(3, 1.0, 0.0))(batch)
    assert xb.shape == (4, 1, 2, 2) and tb.shape == (4, 3)
    assert torch.allclose(tb.sum(1), torch.ones(4))
    with pytest.raises(VitPruneError):
        A.MixupCutmix(0)
