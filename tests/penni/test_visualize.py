"""penni.visualize: the pictures are valid, non-blank PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from penni.conv import PenniConv2d
from penni.decomposition import svd_factors
from penni.masking import hold_mask
from penni.visualize import plot_coefficients, plot_learning_curves, plot_reconstructed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> np.ndarray:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].var()) > 1e-3  # not blank
    return img


def _layer(cout=16, cin=8, d=5, zero_frac=0.6, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(cout, cin, 3, 3)
    layer = PenniConv2d(cin, cout, 3, d=d, padding=1)
    basis, coeff = svd_factors(weight, d)
    with torch.no_grad():
        layer.basis.copy_(basis)
        layer.coefficients.copy_(coeff)
    mask = (torch.rand_like(coeff) > zero_frac).float()
    mask[3] = 0  # a dead output channel
    hold_mask(layer, "coefficients", mask)  # parametrized: drawn with the masked values
    return layer, weight


def test_plot_coefficients(tmp_path):
    layer, _ = _layer()
    out = plot_coefficients(layer, tmp_path / "deep" / "dir" / "coef.png")
    assert out == tmp_path / "deep" / "dir" / "coef.png"
    img = _check_png(out)
    white = np.all(img[..., :3] > 0.99, axis=-1)
    assert white.mean() > 0.05  # zeros are drawn white (and the margins)
    assert isinstance(plot_coefficients(layer, str(tmp_path / "c2.png"), title="conv2_1"), Path)


def test_plot_coefficients_rejects_plain_conv(tmp_path):
    with pytest.raises(TypeError):
        plot_coefficients(torch.nn.Conv2d(2, 2, 3), tmp_path / "x.png")


def test_plot_reconstructed(tmp_path):
    layer, weight = _layer()
    alone = _check_png(plot_reconstructed(layer, tmp_path / "recon.png"))
    both = _check_png(plot_reconstructed(layer, tmp_path / "both.png", original_weight=weight, title="conv"))
    assert both.shape[1] > alone.shape[1]  # side by side
    # an original of another shape (before shrinking) is fine
    _check_png(plot_reconstructed(layer, tmp_path / "other.png", original_weight=torch.randn(20, 8, 3, 3)))
    with pytest.raises(ValueError):
        plot_reconstructed(layer, tmp_path / "bad.png", original_weight=torch.randn(20, 8))


def _epochs(n, start_loss):
    return [{"epoch": i, "train_loss": start_loss / i, "val_loss": 1.1 * start_loss / i,
             "val_top1": 0.5 + 0.03 * i, "sparsity": min(0.1 * i, 0.9), "note": "text is ignored"}
            for i in range(1, n + 1)]


def test_plot_learning_curves_phases(tmp_path):
    history = {"retrain": _epochs(8, 2.0), "finetune": _epochs(4, 0.5)}
    both = _check_png(plot_learning_curves(history, tmp_path / "curves.png", title="ResNet-50 R4"))
    one = _check_png(plot_learning_curves(_epochs(8, 2.0), tmp_path / "one.png"))
    assert both.shape[1] > one.shape[1]  # two phase columns
    # a phase as a dict of lists, and a metric selection (panel name or metric name)
    history = {"retrain": {"train_loss": [2.0, 1.5, 1.2], "val_top1": [0.4, 0.5, 0.6]},
               "finetune": {"train_loss": [1.0, 0.9], "val_top1": [0.6, 0.65]}}
    _check_png(plot_learning_curves(history, tmp_path / "dict.png", metrics=["loss", "val_top1"]))


def test_plot_learning_curves_single_dict_and_errors(tmp_path):
    path = plot_learning_curves({"loss": [3.0, 2.0, 1.5, 1.2], "top1": [0.2, 0.4, 0.5, 0.55]},
                                tmp_path / "single.png")
    _check_png(path)
    with pytest.raises(KeyError):
        plot_learning_curves({"loss": [1.0, 0.5]}, tmp_path / "x.png", metrics=["top5"])
    with pytest.raises(ValueError):
        plot_learning_curves([{"note": "no numbers"}], tmp_path / "y.png")


def test_learning_curves_number_epochs_from_1_and_shade_what_learns(tmp_path):
    from penni.visualize import _phase_series, learning_spans

    retrain = [{"epoch": e, "phase": p, "val_top1": 0.5, "sparsity": 0.0, "prunable_fraction": 0.1 * e}
               for e, p in enumerate(["coefficients", "coefficients", "basis", "coefficients", "all"])]
    assert _phase_series(retrain)["val_top1"][0] == [1.0, 2.0, 3.0, 4.0, 5.0]  # the loop counts from 0
    assert _phase_series(_epochs(3, 1.0))["val_top1"][0] == [1.0, 2.0, 3.0]  # already from 1: kept
    assert learning_spans(retrain) == [(1.0, 2.0, "coefficients"), (3.0, 3.0, "basis"), (4.0, 4.0, "coefficients")]
    assert learning_spans(_epochs(3, 1.0)) == []
    history = {"baseline": _epochs(2, 2.0), "retrain": retrain, "finetune": _epochs(2, 0.5)}
    img = _check_png(plot_learning_curves(history, tmp_path / "three.png", metrics=["top1", "sparsity"]))
    two = _check_png(plot_learning_curves({"retrain": retrain, "finetune": _epochs(2, 0.5)}, tmp_path / "two.png",
                                          metrics=["top1", "sparsity"]))
    assert img.shape[1] > two.shape[1]  # the baseline's column
