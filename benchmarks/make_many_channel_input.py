"""A many-channel MSI for timing `smsdl reconstruct` on the chunked path: the built-in sample's H&E
and C channels made from its 5 ground-truth ion images (random positive mixtures, block-averaged
to the 32 × 32 MSI grid, 2 % noise).

    python benchmarks/make_many_channel_input.py --channels 1024 -o DIR   # DIR/he.png, DIR/msi.npy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from skimage import io

    from napari_smsdl.evaluation import degrade
    from napari_smsdl.sample import make_sample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    s = make_sample()
    lr, mask_lr = degrade(np.where(s.mask_hr, s.ground_truth, 0), s.mask_hr, s.factor)  # (5, 32, 32)
    rng = np.random.default_rng(0)
    msi = np.lib.format.open_memmap(out / "msi.npy", mode="w+", dtype=np.float32, shape=(args.channels, *lr.shape[1:]))
    for c0 in range(0, args.channels, 256):
        c1 = min(c0 + 256, args.channels)
        w = rng.random((c1 - c0, lr.shape[0])).astype(np.float32) ** 3
        block = np.tensordot(w, lr, 1)
        block *= 1 + 0.02 * rng.standard_normal(block.shape).astype(np.float32)
        msi[c0:c1] = np.where(mask_lr[None], np.clip(block, 0, None), 0)
    msi.flush()
    io.imsave(out / "he.png", s.he_rgb, check_contrast=False)
    print(f"wrote {out / 'he.png'} and {out / 'msi.npy'} {msi.shape}; MSI pixel {s.msi_pixel_size_um} µm, "
          f"H&E pixel {s.he_pixel_size_um} µm")


if __name__ == "__main__":
    main()
