"""The colour oracle on rendered palette images (every colour, with and without a digit), its valid flag,
allowed colours, and the checks that an oracle fits the checkpoint's dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biasamp.data import COLOUR_NAMES, PALETTE, BiasedMNIST
from biasamp.data.stream import to_model_range
from biasamp.errors import UsageError
from biasamp.oracles import ColourOracle, build_oracle


def _solid(rgb, size=32):
    img = torch.tensor(rgb, dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, size, size)
    return to_model_range(img.contiguous())


@pytest.mark.parametrize("no_digit", [True, False])
def test_every_palette_colour_is_recognised(no_digit):
    data = BiasedMNIST(rho=1.0, class_size=20, no_digit=no_digit, seed=0)  # all ten colours, all aligned
    oracle = ColourOracle(list(COLOUR_NAMES))
    out = oracle(to_model_range(data.images))
    assert torch.equal(out.bias[:, 0], data.biases)
    assert out.valid.all()
    assert (out.confidence > 0.5).all()


def test_background_mean_follows_the_seed_rule():
    # a red background with a white square: the white pixels (all channels >= 0.7) are not background
    img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    img[:, 0] = 255
    img[:, :, 2:5, 2:5] = 255
    rgb, has_bg = ColourOracle(["red", "green"]).background_rgb(to_model_range(img))
    torch.testing.assert_close(rgb, torch.tensor([[255.0, 0.0, 0.0]]))
    assert has_bg.item()


def test_invalid_when_far_from_every_allowed_colour_or_no_background():
    oracle = ColourOracle(["red", "green", "blue"], max_distance=80)
    images = torch.cat([
        _solid((235, 42, 39)),     # a typical generated red, 60.7 from red: valid
        _solid((60, 60, 200)),     # 101 from blue: invalid, still called blue
        _solid((255, 255, 255)),   # no background pixel: invalid
        _solid((255, 0, 128)),     # rose is not allowed: nearest allowed is red, 128 away: invalid
    ])
    out = oracle(images)
    assert out.bias[:, 0].tolist()[:2] == [0, 2] and out.bias[3, 0].item() == 0
    assert out.valid.tolist() == [True, False, False, False]
    # midway between orange (255,128,0) and yellow (225,225,0): within 80 of both, so a near tie: invalid
    tie = ColourOracle(["orange", "yellow"])(_solid((240, 176, 0)))
    assert tie.confidence.item() < 0.2 and not tie.valid.item()


def test_allowed_colours_restrict_the_choice():
    rose = _solid(tuple(int(v) for v in PALETTE[7]))
    assert ColourOracle(list(COLOUR_NAMES))(rose).bias.item() == 7
    assert ColourOracle(["red", "green"])(rose).bias.item() == 0  # red is the nearest of the two


def test_build_oracle_orders_values_like_the_classes_and_checks_the_fit():
    meta = {"config": {"dataset": {"name": "biased_mnist"}}, "bias_names": ["yellow", "cyan"],
            "class_names": ["3", "5"]}
    oracle = build_oracle({"name": "colour", "allowed_colours": None, "max_distance": 50.0}, meta)
    assert oracle.value_names == [["yellow", "cyan"]]
    assert oracle(_solid((0, 255, 255))).bias.item() == 1  # cyan is the colour of class index 1
    wider = build_oracle({"name": "colour", "allowed_colours": ["red", "cyan", "yellow"]}, meta)
    assert wider.value_names == [["yellow", "cyan", "red"]]
    with pytest.raises(UsageError, match="lacks the checkpoint's bias colour"):
        build_oracle({"name": "colour", "allowed_colours": ["red"]}, meta)
    with pytest.raises(UsageError, match="does not fit dataset 'waterbirds'"):
        build_oracle({"name": "colour"}, {**meta, "config": {"dataset": {"name": "waterbirds"}}})
    with pytest.raises(UsageError, match="oracle.thresh"):
        build_oracle({"name": "colour", "thresh": 3}, meta)
    with pytest.raises(UsageError, match="oracle='clip'"):
        build_oracle({"name": "clip"}, meta)
    with pytest.raises(UsageError, match="unknown colour"):
        ColourOracle(["red", "teal"])
    with pytest.raises(UsageError, match=r"^oracle\.max_distance='far' is not allowed: a number > 0"):
        build_oracle({"name": "colour", "max_distance": "far"}, meta)
    with pytest.raises(UsageError, match=r"^oracle\.min_confidence=1\.0 is not allowed: a number in \[0, 1\)"):
        build_oracle({"name": "colour", "min_confidence": 1.0}, meta)
    with pytest.raises(ValueError, match="regions"):  # the checkpoint's own metadata, not a user's setting
        ColourOracle(["red"], regions=("top",))


def test_palette_pairwise_distances_need_the_confidence_guard():
    d = np.linalg.norm(PALETTE[:, None, :].astype(float) - PALETTE[None, :, :].astype(float), axis=-1)
    closest = d[np.triu_indices(10, 1)].min()
    assert closest == pytest.approx(101.5, abs=0.1)
    assert 2 * 80.0 > closest  # a colour can be within max_distance of two entries: min_confidence decides
