"""Shared fixtures: small real imzML files (both modes) written with pyimzML's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_PAIR = SHARED / "data" / "mouse-cerebellum"


def _spectra(mode: str, shape=(6, 8), missing=((2, 3),), seed=0):
    rng = np.random.default_rng(seed)
    axis = np.linspace(400.0, 900.0, 500)
    out = []
    for row in range(shape[0]):
        for col in range(shape[1]):
            if (row, col) in missing:
                continue
            if mode == "continuous":
                mz = axis
            else:
                mz = np.sort(np.concatenate([rng.uniform(400, 900, 40), [500.0, 750.0]]))
            intensity = rng.uniform(0, 10, len(mz)).astype(np.float32)
            intensity[np.isclose(mz, 500.0)] = 100.0 + row * 10 + col  # a planted, known ion image
            out.append((row, col, mz, intensity))
    return out


@pytest.fixture(params=["processed", "continuous"])
def imzml_file(request, tmp_path) -> tuple[Path, str, list]:
    """(path, mode, spectra) of a 6 x 8 imzML with pixel (2, 3) never acquired."""
    from napari_smsdl.io import write_imzml

    spectra = _spectra(request.param)
    path = write_imzml(tmp_path / f"small_{request.param}.imzML", spectra, mode=request.param, pixel_size_um=20.0)
    return path, request.param, spectra


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The built-in sample written to disk once per session."""
    from napari_smsdl.sample import write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(out)
    return out


@pytest.fixture(scope="session")
def real_pair():
    """The real mouse cerebellum H&E + UMAP MSI pair from ../shared (skipped when absent)."""
    if not (REAL_PAIR / "HE.png").exists():
        pytest.skip(f"real data not found at {REAL_PAIR} (../shared is absent)")
    from skimage import io as skio

    he = skio.imread(REAL_PAIR / "HE.png")[..., :3]
    umap = np.loadtxt(REAL_PAIR / "mouse_brain_umap.txt").reshape(40, 36, 3).transpose(2, 0, 1)
    return he, umap.astype(np.float32)


@pytest.fixture
def hipt_style_checkpoint():
    """Writes a DINO/HIPT-format ViT checkpoint and returns the source ViT (see ``_hipt_style_checkpoint``)."""
    return _hipt_style_checkpoint


def _hipt_style_checkpoint(path, embed_dim=128, depth=1):
    """A DINO/HIPT-format ViT checkpoint: 16-px patches, class token, 14 x 14 position grid, 64 dims
    per attention head, {"teacher": ...} with "backbone." prefixes, a DINO head and the training's
    argparse options beside them (a ViT-256 is the same at 384 x 12)."""
    import argparse

    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(123)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth,
                            num_heads=max(1, embed_dim // 64), mlp_ratio=4.0, num_classes=0)
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    state["head.mlp.0.weight"] = torch.zeros(8, embed_dim)  # DINO projection head: not part of the encoder
    args = argparse.Namespace(arch="vit_small", patch_size=16)
    torch.save({"teacher": state, "student": state, "epoch": 3, "args": args}, path)
    return vit.eval()
