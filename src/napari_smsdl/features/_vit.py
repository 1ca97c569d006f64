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
downloaded (a local checkpoint may be given instead). This module holds the networks, their
training and their checkpoints; :mod:`napari_smsdl.features._extract` runs them over the image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import sha256_file
from ..errors import Cancelled, InputError

log = logging.getLogger(__name__)

TOKEN_PX = 8  # pixels per token side at every level
WINDOW_TOKENS = 16  # tokens per window side
LEVELS = ("cellular", "regional", "tissue")

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
    # 1: single tokens are masked. SimMIM as published for ViTs masks 60 % in blocks of 2 x 2 tokens
    # (mask_ratio=0.6, mask_block_tokens=2): at 150 steps it did not beat this on the bladder ions and
    # lost on the cerebellum at F = 4 (docs/benchmarks.md, "Block masking"), so it is an option
    mask_block_tokens: int = 1
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




@dataclass(frozen=True)
class VitShape:
    """Architecture of the branch ViTs: from :class:`FeatureParams`, or read off a checkpoint."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 2.0
    class_token: bool = False


def make_vit(params: FeatureParams, shape: VitShape | None = None):
    """A timm VisionTransformer accepting any input size (patch = TOKEN_PX), of ``shape`` or the params' shape."""
    from timm.models.vision_transformer import VisionTransformer

    shape = shape or VitShape(params.embed_dim, params.depth, params.num_heads)
    return VisionTransformer(
        img_size=TOKEN_PX * WINDOW_TOKENS,
        patch_size=TOKEN_PX,
        in_chans=3,
        num_classes=0,
        global_pool="",
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mlp_ratio=shape.mlp_ratio,
        class_token=shape.class_token,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )


def build_vits(params: FeatureParams, device) -> dict:
    """The three branch ViTs on ``device``, in eval mode: random (seeded), or loaded from the checkpoint.

    A checkpoint sets the architecture (embed dim, depth, MLP ratio, class token, read off its
    tensors), so a HIPT-style ViT-256 (DINO ViT-S/16, 384-d, 12 blocks) works as well as our own
    saved weights; see :func:`load_checkpoint_states`.
    """
    import torch

    torch.manual_seed(params.seed)
    if not params.checkpoint:
        vits = {level: make_vit(params) for level in LEVELS}
    else:
        states = load_checkpoint_states(params.checkpoint)
        vits = {}
        for level in LEVELS:
            vit = make_vit(params, _shape_from_state(states[level], params, params.checkpoint))
            _load_state(vit, states[level], params.checkpoint, level)
            vits[level] = vit
    return {level: vit.to(device).eval() for level, vit in vits.items()}


def feature_dim(params: FeatureParams) -> int:
    """Token features per level: the params' embed dim, or the checkpoint's."""
    if not params.checkpoint:
        return params.embed_dim
    states = load_checkpoint_states(params.checkpoint)
    return _shape_from_state(states[LEVELS[0]], params, params.checkpoint).embed_dim


def _tokens(vit, images):
    """Token features (B, h, w, D) of images (B, 3, H, W) normalised to zero mean, unit-ish std."""
    x = vit.forward_features(images)[:, vit.num_prefix_tokens :]  # (B, h*w, D) without class token
    b = images.shape[0]
    h = -(-images.shape[2] // TOKEN_PX)
    w = -(-images.shape[3] // TOKEN_PX)
    return x.reshape(b, h, w, -1)


def _simmim_module(vit, embed_dim: int, device):
    """ViT + linear pixel head + learned mask token as one module whose forward returns the loss."""
    import torch

    class SimMIM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit
            self.head = torch.nn.Linear(embed_dim, TOKEN_PX * TOKEN_PX * 3)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))

        def forward(self, batch, mask):
            n_tok = WINDOW_TOKENS * WINDOW_TOKENS
            x = self.vit.patch_embed(batch)  # (B, h, w, D): dynamic_img_size keeps the token grid
            grid_mask = mask.reshape(batch.shape[0], WINDOW_TOKENS, WINDOW_TOKENS, 1)
            x = torch.where(grid_mask, self.mask_token.reshape(1, 1, 1, -1).expand_as(x), x)
            x = self.vit._pos_embed(x)  # (B, N, D)
            x = self.vit.norm(self.vit.blocks(self.vit.norm_pre(x)))
            pred = self.head(x[:, self.vit.num_prefix_tokens :])  # (B, N, p*p*3)
            target = (
                batch.unfold(2, TOKEN_PX, TOKEN_PX).unfold(3, TOKEN_PX, TOKEN_PX)  # B,3,h,w,p,p
                .permute(0, 2, 3, 1, 4, 5).reshape(batch.shape[0], n_tok, -1)
            )
            target = (target - target.mean(-1, keepdim=True)) / (target.std(-1, keepdim=True) + 1e-3)
            return (pred - target).abs().mean(-1)[mask].mean()

    return SimMIM().to(device)


def _simmim_train(vit, image: np.ndarray, params: FeatureParams, level: str, device, progress, should_stop) -> list[float]:
    """Masked image modelling on random crops of ``image`` (H, W, 3) float32 normalised; the losses per step."""
    import torch

    gen = torch.Generator().manual_seed(params.seed + LEVELS.index(level))
    rng = np.random.default_rng(params.seed + 17 * LEVELS.index(level))
    crop = TOKEN_PX * WINDOW_TOKENS
    padded = _pad_to(image, crop)
    src = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))
    model = _simmim_module(vit, vit.embed_dim, device)
    opt = torch.optim.AdamW(model.parameters(), lr=params.ssl_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.ssl_lr, total_steps=max(params.ssl_steps, 1), pct_start=0.15)
    losses = []
    model.train()
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
        mask = block_mask(batch.shape[0], params.mask_ratio, params.mask_block_tokens, gen).to(device)
        loss = model(batch, mask)
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


def block_mask(batch: int, ratio: float, block_tokens: int, gen):
    """(batch, tokens) bool SimMIM mask of the window: ``round(ratio · blocks)`` of its square blocks of
    ``block_tokens`` × ``block_tokens`` tokens, drawn at random per sample; with 1, each token masked
    with probability ``ratio`` (the draw the features have always used, so they stay as they were)."""
    import torch

    b = int(block_tokens)
    if b <= 1:
        return torch.rand(batch, WINDOW_TOKENS * WINDOW_TOKENS, generator=gen) < ratio
    side = -(-WINDOW_TOKENS // b)  # blocks per window side (the last ones cut at the window's edge)
    count = int(round(ratio * side * side))
    ranks = torch.rand(batch, side * side, generator=gen).argsort(dim=1).argsort(dim=1)
    blocks = (ranks < count).reshape(batch, side, side)
    full = blocks.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)[:, :WINDOW_TOKENS, :WINDOW_TOKENS]
    return full.reshape(batch, WINDOW_TOKENS * WINDOW_TOKENS)


def _pad_to(image: np.ndarray, size: int) -> np.ndarray:
    pad_r = max(0, size - image.shape[0])
    pad_c = max(0, size - image.shape[1])
    if pad_r or pad_c:
        image = np.pad(image, ((0, pad_r), (0, pad_c), (0, 0)), mode="reflect" if min(image.shape[:2]) > 1 else "edge")
    return image


def choose_cell_px(he_pixel_size_um: float, sr_pixel_size_um: float, max_cell_px: int) -> int:
    """H&E pixels per SR cell side for the guide: the native ratio, clipped to [2, max_cell_px]."""
    return int(np.clip(round(sr_pixel_size_um / he_pixel_size_um), 2, max(2, max_cell_px)))


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


def save_vits(vits: dict, path: str | os.PathLike) -> None:
    """Save the branch ViTs atomically as {level: state dict, "num_heads": n} (a valid --checkpoint)."""
    import torch

    tmp = Path(path).with_name(Path(path).name + ".tmp")
    heads = int(vits[LEVELS[0]].blocks[0].attn.num_heads)
    torch.save({**{level: vit.state_dict() for level, vit in vits.items()}, "num_heads": heads}, tmp)
    os.replace(tmp, path)


def load_checkpoint_states(path: str | os.PathLike) -> dict:
    """{level: ViT state dict} from a local file; nothing is downloaded.

    Accepted: our own saved weights ({level: state dict}), one timm/torch or safetensors ViT state
    dict for every branch, or a HIPT-style DINO checkpoint (``{"teacher": ...}``, keys prefixed
    ``module.`` / ``backbone.``, a ``head.`` projection that is dropped).
    """
    import torch

    path = str(path)
    if not Path(path).is_file():
        raise InputError("checkpoint file not found", path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            import argparse

            # DINO / HIPT training checkpoints keep their argparse options beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read checkpoint ({exc})", path) from exc
    if not isinstance(state, dict):
        raise InputError(f"checkpoint holds a {type(state).__name__}, not a state dict", path)
    for wrapper in ("teacher", "model", "state_dict"):  # DINO / HIPT and common training wrappers
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    ours = all(k in state for k in LEVELS)  # our own {level: state dict} files
    per_level = state if ours else {lvl: state for lvl in LEVELS}
    heads = None
    if ours:  # they record their heads; files written before that always had the default 4
        heads = state["num_heads"] if isinstance(state.get("num_heads"), int) else FeatureParams().num_heads
    cleaned = {}
    for level in LEVELS:
        sd = {}
        for key, value in per_level[level].items():
            for prefix in ("module.", "backbone."):
                key = key[len(prefix):] if key.startswith(prefix) else key
            if not key.startswith("head.") and hasattr(value, "shape") and key != "num_heads":
                sd[key] = value
        if heads:
            sd["num_heads"] = heads
        cleaned[level] = sd
    return cleaned


def _shape_from_state(state: dict, params: FeatureParams, path) -> VitShape:
    """Read the ViT architecture off its tensors. Heads are not in the tensors: our own files store
    them; any other checkpoint gets 64 dimensions per head (the ViT-S/B/L and DINO/HIPT convention)."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise InputError("checkpoint has no ViT patch embedding (patch_embed.proj.weight)", path)
    dim = int(weight.shape[0])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if not blocks:
        raise InputError("checkpoint has no ViT blocks (blocks.N.*)", path)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / dim if fc1 is not None else 2.0
    heads = int(state.get("num_heads") or max(1, dim // 64))
    if dim % heads:
        raise InputError(f"checkpoint ViT width {dim} is not divisible into {heads} attention heads", path)
    log.info("checkpoint %s: ViT width %d, depth %d, %d heads", path, dim, max(blocks) + 1, heads)
    return VitShape(dim, max(blocks) + 1, heads, mlp_ratio, "cls_token" in state)


def _load_state(vit, state: dict, path, level: str) -> None:
    """Load ``state`` into ``vit`` completely: patch size and position grid resampled to ours, else strict."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    state = dict(state)
    weight = state["patch_embed.proj.weight"]
    if tuple(weight.shape[-2:]) != (TOKEN_PX, TOKEN_PX):
        # e.g. HIPT's 16-px patches: FlexiViT's pseudo-inverse resize keeps each token's response
        state["patch_embed.proj.weight"] = resample_patch_embed(weight, [TOKEN_PX, TOKEN_PX])
    pos = state.get("pos_embed")
    own_pos = vit.state_dict().get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape:
        prefix = vit.num_prefix_tokens
        old = int(round((pos.shape[1] - prefix) ** 0.5))
        if old * old + prefix != pos.shape[1]:
            raise InputError(f"checkpoint pos_embed {tuple(pos.shape)} is not a square token grid", path)
        state["pos_embed"] = resample_abs_pos_embed(pos, [WINDOW_TOKENS, WINDOW_TOKENS], old_size=[old, old],
                                                    num_prefix_tokens=prefix)
    state.pop("num_heads", None)
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        raise InputError(
            f"checkpoint does not fit the {level} ViT: missing {missing[:4]}{' …' if len(missing) > 4 else ''}, "
            f"wrong shape {wrong[:4]}{' …' if len(wrong) > 4 else ''}", path,
        )
    unused = sorted(set(state) - set(own))
    vit.load_state_dict({k: state[k] for k in own})
    log.info("checkpoint %s: all %d tensors of the %s branch loaded%s", path, len(own), level,
             f" ({len(unused)} unused: {unused[:3]})" if unused else "")
