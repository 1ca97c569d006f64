"""The comparison figure of `smsdl benchmark` / `reconstruct` / demo and Export: fit for a paper."""

from __future__ import annotations

import numpy as np
import pytest


def test_figure_for_a_paper_has_he_scale_bar_metrics_colour_bars_and_a_pdf(tmp_path):
    """The paper figure: H&E panel, per-panel metrics, a vector PDF beside the PNG at 300 dpi."""
    from PIL import Image

    from napari_smsdl.evaluation import comparison_figure, score_stack
    from napari_smsdl.evaluation._figures import _scores, nice_length

    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 1, (2, 24, 24)).astype(np.float32)
    stacks = {"smsdl": truth + 0.05 * rng.normal(size=truth.shape).astype(np.float32), "bicubic": truth * 0.8}
    mask = np.ones((24, 24), bool)
    mask[:3] = False
    he = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    out = comparison_figure(tmp_path / "figure.png", stacks, truth=truth, mask=mask, he_rgb=he, pixel_size_um=10.0,
                            channel_names=["m/z 885.5499", "m/z 760.5851"])
    assert out.exists() and (tmp_path / "figure.pdf").read_bytes()[:4] == b"%PDF"
    assert Image.open(out).info["dpi"][0] == pytest.approx(300, abs=1)
    scores = _scores(stacks, truth, mask, 2)  # the numbers written on the panels: the benchmark's
    assert scores["smsdl"]["rmse"] == pytest.approx(score_stack(truth, stacks["smsdl"], mask)["rmse"]["per_channel"])
    assert scores["smsdl"]["rmse"][0] < scores["bicubic"]["rmse"][0]
    assert nice_length(240.0) == 50.0 and nice_length(1000.0) == 200.0  # scale-bar lengths: 1, 2 or 5 × 10^k
    no_he = comparison_figure(tmp_path / "plain.png", stacks, truth=truth, mask=mask, pdf=False)
    assert Image.open(out).size[0] > Image.open(no_he).size[0] and not (tmp_path / "plain.pdf").exists()


def test_channel_names_for_a_npy_come_from_a_file_or_a_json_beside_it(tmp_path):
    """`--channel-names FILE` (one per line) or `<name>.json` name the channels of a .npy stack."""
    import json
    from types import SimpleNamespace

    from napari_smsdl.commands._common import load_msi
    from napari_smsdl.errors import InputError

    stack = np.random.default_rng(0).uniform(0, 1, (2, 6, 5)).astype(np.float32)
    np.save(tmp_path / "msi.npy", stack)
    args = SimpleNamespace(mz=[], peaks=5, tol="10ppm", norm="none", shape=None, region=None, msi_pixel_size=None,
                           channel_names=None)
    assert load_msi(str(tmp_path / "msi.npy"), args).channel_names == ("channel 0", "channel 1")
    (tmp_path / "msi.json").write_text(json.dumps({"channel_names": ["m/z 700.1", "m/z 800.2"]}))
    assert load_msi(str(tmp_path / "msi.npy"), args).channel_names == ("m/z 700.1", "m/z 800.2")
    names = tmp_path / "names.txt"
    names.write_text("m/z 885.5499\n\nm/z 760.5851\n")
    args.channel_names = str(names)
    assert load_msi(str(tmp_path / "msi.npy"), args).channel_names == ("m/z 885.5499", "m/z 760.5851")
    names.write_text("m/z 885.5499\n")
    with pytest.raises(InputError, match="names 1 channels, but the MSI has 2") as err:
        load_msi(str(tmp_path / "msi.npy"), args)
    assert str(names) in str(err.value)
