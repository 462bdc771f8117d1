"""Checkpoints written before the layout change (penni 0.1.0 at commit 34e4792) still load and compute the same.

The files in tests/penni/data were written by that commit's code: the quickstart's fine-tuned model (held masks)
and its shrunk model, from the default run, and a decomposed torchvision ShuffleNet whose recipe spells the
architecture the old way (``torchvision:shufflenet_v2_x0_5``). ``v0_expected_outputs.safetensors`` holds the
inputs and the outputs that code computed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import penni
from penni.masking import iter_masks

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = load_file(str(DATA / "v0_expected_outputs.safetensors"))
CASES = [("quickstart_finetune", "x28"), ("quickstart_shrink", "x28"), ("torchvision_shufflenet", "x64")]


@pytest.mark.parametrize("name,inputs", CASES)
def test_a_file_from_before_the_layout_change_loads_and_computes_the_same(name, inputs):
    model = penni.load(DATA / f"v0_{name}.safetensors").eval()
    with torch.no_grad():
        out = model(EXPECTED[inputs])
    torch.testing.assert_close(out, EXPECTED[name], rtol=1e-5, atol=1e-5)


def test_the_old_fine_tuned_file_holds_its_masks_again():
    model = penni.load(DATA / "v0_quickstart_finetune.safetensors")
    assert list(iter_masks(model)), "the masks saved with the fine-tuned model are not held after loading"
