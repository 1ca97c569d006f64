"""Multi-level H&E features from Vision Transformers trained self-supervised on the user's image.

Three timm ``VisionTransformer`` branches look at the registered H&E at three spatial levels,
each defined by how much tissue one ViT token covers:

* **cellular**: one token per super-resolution (SR) cell, windows of 16 × 16 cells;
* **regional**: one token per MSI pixel (F × F SR cells), context of 16 × 16 MSI pixels;
* **tissue**: one token per 4 × 4 MSI pixels, the wide tissue context.

The image of each level is resized so that a token always covers 8 × 8 pixels, so the three
branches share one architecture. Each branch is trained with masked image modelling (SimMIM:
half of the tokens are replaced by a learned mask token and their normalised pixels are
regressed by a linear head, L1 loss) on random crops of the user's own H&E; no weights are ever
downloaded (a local checkpoint may be given instead). Token features are read at every SR cell
centre by bilinear interpolation, averaged over shifted passes of the token grid (which removes
patch-grid artefacts), concatenated with the cell's mean colour, and cached on disk keyed by the
image content and the parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import sha256_file
from .errors import Cancelled, InputError
from .torch_setup import get_device

log = logging.getLogger(__name__)

TOKEN_PX = 8  # pixels per token side at every level
WINDOW_TOKENS = 16  # tokens per window side
LEVELS = ("cellular", "regional", "tissue")

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FeatureParams:
    """Feature-extraction settings (all branches share the ViT shape).

    ``ssl_steps`` = 0 keeps the ViTs at their random initialisation (for ablations);
    ``checkpoint`` loads weights from a local file instead of training.
    """

    embed_dim: int = 64
    depth: int = 3
    num_heads: int = 4
    ssl_steps: int = 150
    ssl_batch: int = 16
    ssl_lr: float = 1e-3
    mask_ratio: float = 0.5
    shifts: int = 2  # shifted passes per axis (token grid offsets of 0, 1/2 token...)
    tissue_tokens_msi_px: int = 4  # MSI pixels per token side at the tissue level
    seed: int = 0
    checkpoint: str | None = None

    def cache_key(self) -> dict:
        d = dataclasses.asdict(self)
        if self.checkpoint:
            if not Path(self.checkpoint).is_file():
                raise InputError("checkpoint file not found", self.checkpoint)
            d["checkpoint_sha"] = sha256_file(self.checkpoint)
        return d


FAST_FEATURES = FeatureParams(embed_dim=48, depth=2, ssl_steps=40, shifts=1)


@dataclass(frozen=True)
class FeatureMaps:
    """Per-SR-cell features ``data`` (n_features, rows, cols) float32 and their names."""

    data: np.ndarray
    names: tuple[str, ...]
    ssl_losses: dict
    seconds: float
    from_cache: bool = False




def make_vit(params: FeatureParams):
    """A small timm VisionTransformer accepting any input size (patch = TOKEN_PX)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=TOKEN_PX * WINDOW_TOKENS,
        patch_size=TOKEN_PX,
        in_chans=3,
        num_classes=0,
        global_pool="",
        embed_dim=params.embed_dim,
        depth=params.depth,
        num_heads=params.num_heads,
        mlp_ratio=2.0,
        class_token=False,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )


def _tokens(vit, images):
    """Token features (B, h, w, D) of images (B, 3, H, W) normalised to zero mean, unit-ish std."""
    x = vit.forward_features(images)  # (B, h*w, D) without class token
    b = images.shape[0]
    h = -(-images.shape[2] // TOKEN_PX)
    w = -(-images.shape[3] // TOKEN_PX)
    return x.reshape(b, h, w, -1)


def _simmim_train(vit, image: np.ndarray, params: FeatureParams, level: str, device, progress, should_stop) -> list[float]:
    """Masked image modelling on random crops of ``image`` (H, W, 3) float32 normalised."""
    import torch

    gen = torch.Generator().manual_seed(params.seed + LEVELS.index(level))
    rng = np.random.default_rng(params.seed + 17 * LEVELS.index(level))
    crop = TOKEN_PX * WINDOW_TOKENS
    padded = _pad_to(image, crop)
    src = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))
    head = torch.nn.Linear(params.embed_dim, TOKEN_PX * TOKEN_PX * 3).to(device)
    mask_token = torch.nn.Parameter(torch.zeros(1, 1, params.embed_dim, device=device))
    opt = torch.optim.AdamW(
        list(vit.parameters()) + list(head.parameters()) + [mask_token], lr=params.ssl_lr, weight_decay=0.05
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.ssl_lr, total_steps=max(params.ssl_steps, 1), pct_start=0.15)
    n_tok = WINDOW_TOKENS * WINDOW_TOKENS
    losses = []
    vit.train()
    for step in range(params.ssl_steps):
        if should_stop is not None and should_stop():
            raise Cancelled("feature training cancelled")
        tops = rng.integers(0, src.shape[1] - crop + 1, params.ssl_batch)
        lefts = rng.integers(0, src.shape[2] - crop + 1, params.ssl_batch)
        batch = torch.stack([src[:, t : t + crop, s : s + crop] for t, s in zip(tops, lefts)])
        # augmentations that keep histology meaning: flips, 90° rotations, mild colour jitter
        if rng.random() < 0.5:
            batch = batch.flip(3)
        batch = torch.rot90(batch, int(rng.integers(4)), dims=(2, 3))
        batch = batch * (1 + 0.1 * torch.randn(batch.shape[0], 3, 1, 1, generator=gen)) + 0.1 * torch.randn(
            batch.shape[0], 3, 1, 1, generator=gen
        )
        batch = batch.to(device)
        mask = torch.rand(batch.shape[0], n_tok, generator=gen).to(device) < params.mask_ratio
        x = vit.patch_embed(batch)  # (B, h, w, D): dynamic_img_size keeps the token grid
        grid_mask = mask.reshape(batch.shape[0], WINDOW_TOKENS, WINDOW_TOKENS, 1)
        x = torch.where(grid_mask, mask_token.reshape(1, 1, 1, -1).expand_as(x), x)
        x = vit._pos_embed(x)  # (B, N, D)
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        pred = head(x)  # (B, N, p*p*3)
        target = (
            batch.unfold(2, TOKEN_PX, TOKEN_PX).unfold(3, TOKEN_PX, TOKEN_PX)  # B,3,h,w,p,p
            .permute(0, 2, 3, 1, 4, 5).reshape(batch.shape[0], n_tok, -1)
        )
        target = (target - target.mean(-1, keepdim=True)) / (target.std(-1, keepdim=True) + 1e-3)
        loss = (pred - target).abs().mean(-1)[mask].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vit.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(f"self-supervised training ({level})", step + 1, params.ssl_steps)
    vit.eval()
    return losses


def _pad_to(image: np.ndarray, size: int) -> np.ndarray:
    pad_r = max(0, size - image.shape[0])
    pad_c = max(0, size - image.shape[1])
    if pad_r or pad_c:
        image = np.pad(image, ((0, pad_r), (0, pad_c), (0, 0)), mode="reflect" if min(image.shape[:2]) > 1 else "edge")
    return image


def _level_image(guide: np.ndarray, cell_px: float, factor: int, level: str, params: FeatureParams) -> tuple[np.ndarray, float]:
    """Resize the guide so one token covers the level's footprint; return (image, token size in SR cells)."""
    from skimage.transform import rescale

    cells_per_token = {"cellular": 1.0, "regional": float(factor), "tissue": float(factor * params.tissue_tokens_msi_px)}[level]
    scale = TOKEN_PX / (cells_per_token * cell_px)
    if abs(scale - 1.0) < 1e-6:
        return guide, cells_per_token
    image = rescale(guide, scale, channel_axis=-1, anti_aliasing=scale < 1, order=1, preserve_range=True)
    return image.astype(np.float32), cells_per_token


def _dense_tokens(vit, image: np.ndarray, shift_px: int, device) -> np.ndarray:
    """Token grid (h, w, D) of the whole image shifted by ``shift_px``, computed window by window."""
    import torch

    window = TOKEN_PX * WINDOW_TOKENS
    shifted = np.pad(image, ((shift_px, 0), (shift_px, 0), (0, 0)), mode="reflect") if shift_px else image
    rows, cols = shifted.shape[:2]
    h, w = -(-rows // TOKEN_PX), -(-cols // TOKEN_PX)
    out = None
    with torch.no_grad():
        tiles, places = [], []
        for top in range(0, rows, window):
            for left in range(0, cols, window):
                tile = shifted[top : top + window, left : left + window]
                tiles.append(_pad_to(tile, window))
                places.append((top // TOKEN_PX, left // TOKEN_PX, -(-tile.shape[0] // TOKEN_PX), -(-tile.shape[1] // TOKEN_PX)))
        for start in range(0, len(tiles), 32):
            batch = torch.from_numpy(np.stack(tiles[start : start + 32]).transpose(0, 3, 1, 2).copy()).to(device)
            feats = _tokens(vit, batch).cpu().numpy()
            if out is None:
                out = np.zeros((h, w, feats.shape[-1]), np.float32)
            for f, (r0, c0, nr, nc) in zip(feats, places[start : start + 32]):
                out[r0 : r0 + nr, c0 : c0 + nc] = f[:nr, :nc]
    return out


def _sample_tokens_at_cells(tokens: np.ndarray, sr_shape: tuple[int, int], cells_per_token: float, shift_px: int) -> np.ndarray:
    """Bilinear sample of a token grid at each SR cell centre: (D, rows, cols)."""
    from scipy.ndimage import map_coordinates

    rows, cols = sr_shape
    # cell centre in level-image pixels = (i + 0.5) * TOKEN_PX / cells_per_token; + shift; token centre at (t + 0.5) * TOKEN_PX
    r = ((np.arange(rows) + 0.5) / cells_per_token * TOKEN_PX + shift_px) / TOKEN_PX - 0.5
    c = ((np.arange(cols) + 0.5) / cells_per_token * TOKEN_PX + shift_px) / TOKEN_PX - 0.5
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return np.stack([map_coordinates(tokens[..., d], [rr, cc], order=1, mode="nearest") for d in range(tokens.shape[-1])])


def _load_checkpoint(vits: dict, path: str) -> None:
    """Load a local state dict: either {level: state_dict} or one ViT state dict for every branch."""
    import torch

    path = str(path)
    if not Path(path).exists():
        raise InputError("checkpoint file not found", path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read checkpoint ({exc})", path) from exc
    per_level = state if all(k in state for k in LEVELS) else {lvl: state for lvl in LEVELS}
    for level, vit in vits.items():
        own = vit.state_dict()
        usable = {k: v for k, v in per_level[level].items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise InputError(f"checkpoint has no weights matching the {level} ViT (embed_dim {vit.embed_dim})", path)
        vit.load_state_dict(usable, strict=False)
        log.info("checkpoint %s: %d/%d tensors loaded into the %s branch", path, len(usable), len(own), level)


def extract_features(
    guide_rgb: np.ndarray,
    *,
    sr_shape: tuple[int, int],
    factor: int,
    params: FeatureParams = FeatureParams(),
    cache_dir: str | os.PathLike | None = None,
    device: str = "auto",
    save_weights: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FeatureMaps:
    """Multi-level ViT features for every cell of the SR grid.

    Parameters
    ----------
    guide_rgb : (rows * k, cols * k, 3) array
        The registered H&E resampled onto the SR grid refined ``k`` times (k ≥ 1 integer), so each
        SR cell sees its own k × k patch. uint8 or float in [0, 1].
    sr_shape : (rows, cols)
        The SR grid.
    factor : int
        MSI pixel / SR cell (F).
    cache_dir : path, optional
        Where features are cached (``features-<hash>.npz``); a second call with the same image
        and parameters loads them instead of training.
    save_weights : path, optional
        Where to save the trained ViT weights ({level: state_dict}, a torch file).

    Returns
    -------
    FeatureMaps with ``data`` (n_features, rows, cols).
    """
    import torch

    start = time.perf_counter()
    guide = np.asarray(guide_rgb)
    if guide.dtype == np.uint8:
        guide = guide.astype(np.float32) / 255.0
    guide = guide.astype(np.float32)
    rows, cols = sr_shape
    if guide.ndim != 3 or guide.shape[0] % rows or guide.shape[1] % cols or guide.shape[0] // rows != guide.shape[1] // cols:
        raise InputError(f"guide image {guide.shape} is not an integer refinement of the SR grid {sr_shape}")
    cell_px = guide.shape[0] // rows

    key = hashlib.sha256()
    key.update(np.ascontiguousarray(guide).tobytes())
    key.update(json.dumps({"sr": list(sr_shape), "F": factor, **params.cache_key(), "v": 2}, sort_keys=True).encode())
    cache_file = Path(cache_dir) / f"features-{key.hexdigest()[:24]}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as npz:
            log.info("features loaded from cache %s", cache_file)
            return FeatureMaps(npz["data"], tuple(npz["names"]), json.loads(str(npz["ssl_losses"])), 0.0, from_cache=True)

    torch.manual_seed(params.seed)
    dev = get_device(device)
    vits = {level: make_vit(params).to(dev) for level in LEVELS}
    for vit in vits.values():
        vit.eval()
    if params.checkpoint:
        _load_checkpoint(vits, params.checkpoint)
    # normalise colours with the image's own statistics (no ImageNet prior)
    mean = guide.reshape(-1, 3).mean(0)
    std = guide.reshape(-1, 3).std(0) + 1e-3
    normed = (guide - mean) / std
    blocks, names, ssl_losses = [], [], {}
    for level in LEVELS:
        image, cells_per_token = _level_image(normed, cell_px, factor, level, params)
        if not params.checkpoint and params.ssl_steps > 0:
            losses = _simmim_train(vits[level], image, params, level, dev, progress, should_stop)
            ssl_losses[level] = [losses[0], float(np.mean(losses[-10:]))]
        acc = None
        shifts = [round(TOKEN_PX * s / params.shifts) for s in range(params.shifts)]
        for shift in shifts:  # one isotropic shift per pass keeps the cost linear in `shifts`
            if should_stop is not None and should_stop():
                raise Cancelled("feature extraction cancelled")
            tokens = _dense_tokens(vits[level], image, shift, dev)
            sampled = _sample_tokens_at_cells(tokens, sr_shape, cells_per_token, shift)
            acc = sampled if acc is None else acc + sampled
        feats = acc / len(shifts)
        blocks.append(feats)
        names += [f"{level}_{d}" for d in range(feats.shape[0])]
        if progress is not None:
            progress("feature extraction", LEVELS.index(level) + 1, len(LEVELS))
    colour = guide.reshape(rows, cell_px, cols, cell_px, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    blocks.append(colour)
    names += ["mean_red", "mean_green", "mean_blue"]
    data = np.concatenate(blocks).astype(np.float32)
    if save_weights:
        tmp = Path(save_weights).with_name(Path(save_weights).name + ".tmp")
        torch.save({level: vit.state_dict() for level, vit in vits.items()}, tmp)
        os.replace(tmp, save_weights)
    result = FeatureMaps(data, tuple(names), ssl_losses, time.perf_counter() - start)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(cache_file.stem + ".tmp.npz")
        np.savez(tmp, data=data, names=np.array(names), ssl_losses=json.dumps(ssl_losses))
        os.replace(tmp, cache_file)
    return result
