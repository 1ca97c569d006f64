"""Assemble docs/benchmarks.md from the tables the benchmark scripts wrote into docs/benchmarks/.

    python benchmarks/make_docs.py

Each section's table is the file a benchmark script wrote (regenerate the script, then this); the
text around them is in TEMPLATE below and states what the numbers mean and where we stand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"

TEMPLATE = """# Benchmarks

Every number on this page was produced by a script in `benchmarks/` on the development machine
(x86_64, **2 CPU cores shared with other jobs**, no GPU), except section 6, measured on a lent
single-GPU machine (NVIDIA H200, 16 CPU cores) with `benchmarks/gpu_run.sh`. Each script writes its
raw results to `benchmarks/results/*.json` and its table to `docs/benchmarks/*.md`;
`python benchmarks/make_docs.py` assembles this page from those tables.

## 1. Does the histology earn its keep? SMSDL vs bicubic, the H&E-free control and the CNN

`python benchmarks/bench_guided.py` — the benchmark protocol of `smsdl benchmark`: the ground truth
at native resolution is block-averaged by F, reconstructed back by each method from the same LR
image, the same H&E and the same SR grid, and scored on tissue pixels after min–max normalisation by
the truth's range (`napari_smsdl.evaluation`; SSIM is scikit-image's SSIM map with `data_range=1`,
background set to 0 in both images, averaged over tissue pixels). Every case runs for seeds 0, 1
and 2 (one seed drives the ViT training, the held-out folds and the networks): mean ± standard
deviation over seeds. The **H&E-free control** is bicubic interpolation followed by iterative
back-projection to the measured block means, the very conservation SMSDL and the CNN get: the
three differ only in what they start from, so SMSDL's margin over the control is what the
histology adds.

Data: the **real bladder ion images** (`../shared/data/mouse-bladder-dev`: 20 noisy AP-SMALDI ion
images, 124 × 244 at 10 µm, with the stained optical image of the section; LR 62 × 122 at F = 2 and
31 × 61 at F = 4) — the case nothing was tuned on and the one that decides whether the H&E is worth
using; the real mouse-cerebellum pair (a 40 × 36 UMAP summary, F = 2 and 4); the built-in sample
(F = 4). On every case SMSDL is also run, on the same folds and settings, with colour-only
features (each SR cell's mean colour) and with the ViTs left at random weights (on the bladder
since the start, on the cerebellum and the sample since 2026-12-07). Every SMSDL
setting is chosen from held-out LR pixels, never from the ground truth
([method.md](method.md#3-regression-through-the-forward-model-napari_smsdlreconstruction)).

All tables of this section were re-measured (every method, seeds 0–2, the bladder ablations) after
the tissue rule changed (an all-zero pixel inside the tissue now counts as a measurement,
[method.md](method.md#grids-and-coordinates)): 87 bladder and 35 sample pixels more are tissue and
scored, the methods' SSIM there is 0.001–0.002 (bladder) and about 0.004 (sample) lower than before
(the scattered zero pixels are hard to predict), and SMSDL's margins over the control are unchanged
within seed noise. The cerebellum's mask is unchanged, and so are its SMSDL, bicubic and control
scores; the CNN's SSIM there moved by −0.002 (F = 2) and +0.010 (F = 4, old seed std 0.020).

The SMSDL rows and the bladder ablations were re-measured again (seeds 0–2, 2026-12-06, on a
fresh machine) after the network's input became a choice made from the data (the features with or
without the bicubic image, [method.md](method.md#settings-chosen-from-the-measurement-never-from-a-ground-truth)):
the choice keeps the bicubic input on every bladder, cerebellum F = 2 and sample run, whose means
moved by at most 0.0007 SSIM and 0.0009 R² (sample F = 4, seed std 0.0026 and 0.0018; machine-level
differences in the features and networks, the bicubic-input path being unchanged), and takes the features alone on the cerebellum at F = 4, whose margin over the control
nearly doubles (SSIM +0.0228 ± 0.0082 → +0.0418 ± 0.0067). Bicubic, the control and the CNN do
not depend on it and were not re-run; the uncertainty-variant and fallback-rule tables below are
from the previous run.

The SMSDL rows of the bladder and the cerebellum at F = 2 were re-measured once more (seeds 0–2,
2026-12-07) after a used channel's output became the blend control + w · (SMSDL − control), w the
scale-transfer check's least-squares weight clipped to [0, 1]
([method.md](method.md#settings-chosen-from-the-measurement-never-from-a-ground-truth); where the
check cannot run, as on the cerebellum and the sample at F = 4, w = 1 and nothing changed). The
cerebellum F = 2 margin over the control went from RMSE +0.0004 ± 0.0002, SSIM −0.0002 ± 0.0003,
R² −0.0009 ± 0.0006 to +0.0002 ± 0.0003, +0.0000 ± 0.0002, −0.0004 ± 0.0006, and its worst channel
is no longer below the control (−0.0007 → +0.0000). On the bladder the used channels' weights clip
at 1, and the margins moved within seed noise (F = 4 SSIM +0.0013 ± 0.0005 → +0.0010 ± 0.0003, with
8.0 → 7.3 channels passing the check: run-to-run differences of the fits, not the blend); the
bladder ablation rows were not re-run.

Every SMSDL row was re-measured again (seeds 0–2, 2026-12-07, the ablation rows not) after two
changes to how SMSDL decides without a ground truth
([method.md](method.md#per-channel-histology-gain-and-the-fallback)): the scale-transfer check now
runs with 3–4 blocked folds where the LR pooled by F holds too few tiles for 5 (the sample at F = 4;
the cerebellum at F = 4 still has too few), and the conservation is chosen one scale up (without the
check, between exact and none only: held-out pixels cannot tell exact from smooth back-projection,
and the held-out choice among all three had followed rounding). The bladder and cerebellum F = 2
rows are unchanged to the printed digits; the cerebellum at F = 4 moved within seed noise (SSIM
+0.0418 ± 0.0067 → +0.0429 ± 0.0083 over the control); on the sample the check chooses the features
alone as the network input and the margin grows (SSIM +0.0847 ± 0.0026 → +0.0952 ± 0.0071, RMSE
−0.0087 → −0.0091, R² +0.0652 → +0.0679). On two halves of the bladder section (MSI columns 0–121
and 122–243, F = 4, LR 31 × 30, a case nothing was tuned on; `python benchmarks/bench_guided_halves.py`,
results in `benchmarks/results/guided_halves/`) the held-out rule had used the histology on 17–18 of 20 ions and lost to the control on the
right half (RMSE +0.0004 ± 0.0001, R² −0.0019 ± 0.0004, 14 ions below the control by more than
their seed spread); with the check it uses 0.7 (right) and 5.3 (left) ions, SMSDL − control is
RMSE −0.0000 / −0.0002, SSIM +0.0001 ± 0.0001 / +0.0029 ± 0.0016, R² +0.0000 / +0.0009, and no ion is
below its seed spread (the check pooled by F = 4, 3 folds). Re-run 2026-12-07 with the check as it
runs now, pooled by 2 (LLR 15 × 15, 5 folds): 7.0 (right) and 4.7 (left) ions use the H&E, SMSDL −
control is RMSE −0.0002 / −0.0002, SSIM +0.0014 ± 0.0002 / +0.0019 ± 0.0006, R² +0.0008 ± 0.0001 /
+0.0007 ± 0.0003, still no ion below its seed spread: the right half now gains, the left a little
less than before. At F = 2 (LR 62 × 61, the 5-fold check runs) the halves tie the control
(SSIM −0.0000 ± 0.0001 left, +0.0001 ± 0.0001 right; 8.0 and 8.3 ions use the H&E), with 2 and 4
ions below the control by more than their seed spread by at most a few 1e-4: the guarantee holds
there only to that precision.

Smaller still (2026-12-07): on the section's four 60 × 100 crops at F = 4 (LR 15 × 25, too small
for the check pooled by 4 even with 3 folds; `python benchmarks/bench_guided_crops.py`, seeds 0–2,
mean over crops), with the held-out gain deciding, as before the check could pool by less than F,
SMSDL − control was RMSE +0.0005 ± 0.0001, SSIM +0.0035 ± 0.0004, R² −0.0029 ± 0.0005 with 14.8 of
20 ions using the H&E (worst crop R² −0.0061); with the check pooled by 3 (LLR 5 × 8, 3 folds)
+0.0001 ± 0.0002, +0.0022 ± 0.0003, −0.0007 ± 0.0008 with 5.5 ions (worst crop −0.0038); with the
check as it runs now, pooled by 2 (LLR 7 × 12, 5 folds; re-run 2026-12-07), −0.0000 ± 0.0001,
+0.0017 ± 0.0004, +0.0002 ± 0.0006 with 5.3 ions, worst crop R² −0.0015: on average no longer
below the control on any metric, one crop of four still slightly below on R² and RMSE.

The bladder and sample rows at F = 4 were re-measured (seeds 0–2, 2026-12-07, SMSDL and the
bladder ablation rows) after the scale-transfer check became pooled by 2 at every F instead of
by F (F² / 4 times more pixels to decide each channel on;
[method.md](method.md#settings-chosen-from-the-measurement-never-from-a-ground-truth)). Bladder
F = 4, SMSDL − control: RMSE −0.0001 → −0.0003, SSIM +0.0010 ± 0.0003 → +0.0022 ± 0.0000, R²
+0.0004 → +0.0011 ± 0.0001, 7.3 → 8.7 ions using the H&E, none below the control on any metric.
The bladder F = 4 ablation rows were re-run with it. Sample F = 4: SSIM +0.0952 ± 0.0071 → +0.0851 ± 0.0025 (the network input chosen one scale up is
now bicubic + features), and its nuclei-density ion no longer loses to the control (R² −0.0077 →
+0.0000). The F = 2 cases pooled by 2 already; the cerebellum at F = 4 is still too small. The
forced study behind the fallback-rule table below was re-run for the bladder and the sample at
F = 4 with the check pooled by 2 (the F = 2 and cerebellum entries are unchanged by it): on the
bladder at F = 4 the check now wrongly uses the H&E on 0 of 60 ion decisions (pooled by 4: 1) and
wrongly falls back on 25 (30); on the sample it runs where it could not before and agrees with
the held-out gain (4 of 5 right; the nuclei-density ion, slightly worse when forced, R² −0.005,
passes both and is the one its blend weight, 0.77, brings back to the control).

The cerebellum F = 4 SMSDL row and its ablations were re-measured (seeds 0–2, 2026-12-07) after the
check learned to run on single-pixel folds where the LR pooled by 2 holds too few 3 × 3 tiles for
blocked ones (LLR 5 × 4 there; it decides each channel's use and weight, the held-out folds still
choose the input and conservation;
[method.md](method.md#settings-chosen-from-the-measurement-never-from-a-ground-truth)). SMSDL −
control: RMSE −0.0064 ± 0.0005 → −0.0088 ± 0.0017, SSIM +0.0429 ± 0.0083 → +0.0454 ± 0.0100, R²
+0.0239 ± 0.0028 → +0.0364 ± 0.0058. UMAP 3, which the held-out gain had used on every seed at R²
0.022–0.060 below the control, falls back on every seed; UMAP 2 is used on every seed (weights
0.78–0.97; before, on 1 of 3). No other case is affected (their checks run on blocked folds). The
margins table now also counts, per metric, the channels worse than the control by more than their
seed spread (it counted SSIM only): the cerebellum at F = 4 had one on RMSE and R² before this change
(UMAP 3) and has none now; the bladder at F = 2 has 3 of 20 ions below on RMSE and R², by at most
0.0002 RMSE and 0.0009 R² (seed spread 0.0008). On tiny images, which nothing was tuned on (`python benchmarks/bench_guided_tiny.py`, results in
`benchmarks/results/guided_tiny/`): six 40 × 40 crops of the bladder section at F = 4 (LR 10 × 10,
the cerebellum's size; LLR 5 × 5, too few tiles for blocked folds), seeds 0–2, SMSDL − control as
the mean over crops (mean ± std over seeds): with the held-out gain deciding, as before, RMSE
+0.0004 ± 0.0006, SSIM −0.0056 ± 0.0092, R² −0.0029 ± 0.0041, 7.7 of 20 ions using the H&E, worst
crop R² −0.0150, and 44 of 360 (crop, seed, ion) decisions more than 0.01 R² below the control;
with the check on single-pixel folds −0.0002 ± 0.0001, +0.0018 ± 0.0002, +0.0016 ± 0.0010, 2.8
ions, worst crop −0.0010, 7 of 360.

{guided}

{guided_verdict}

**What this says.**

- **Real bladder ions (the case that decides):** most of the SR error is pixel noise no method can
  predict. The H&E-free control already recovers what the measurement supports; SMSDL adds a
  small margin (F = 4: SSIM +0.0022 ± 0.0000, RMSE −0.0003 ± 0.0000 and R² +0.0011 ± 0.0001;
  F = 2: SSIM +0.0003 ± 0.0000, R² +0.0001 ± 0.0001), from the ions whose scale-transfer check (the same fit one scale up, scored
  on the measured pixels) shows the H&E helps; the other ions fall back to the control and score
  as it does. The check is stricter than the held-out test it replaced for this decision (F = 4
  margin was SSIM +0.0025 with channels below the control): pooled by F it fell back on ions that
  would have gained a little, and it uses the histology wrongly less often (pooled by 2, over the
  134 channel decisions where it runs: 11 vs 20 wrong uses, 43 vs 35 wrong fallbacks, 80 vs 79
  right); pooled by 2 (more pixels per decision than by F) it uses 8.7 ions and no ion is below the control. The CNN, at its honest best with SMSDL's guide, its budget
  and the same conservation, scores as the control to 4 decimals ([cnn-baseline.md](cnn-baseline.md)).
- **The CNN still wins on SSIM on the cerebellum pair**: with SMSDL's k × k guide and the same
  conservation it beats SMSDL on all three metrics at F = 2 (SSIM 0.839 vs 0.835; an H&E-free
  learned interpolation, see the ceiling below) and on SSIM at F = 4 (0.646 ± 0.005 vs 0.638 ±
  0.010; the gap was 0.031 before the features-only input, 0.011 before the single-pixel check),
  where SMSDL wins RMSE and R² (0.1452 ± 0.0017 vs 0.1540 ± 0.0038, 0.712 ± 0.006 vs 0.675 ±
  0.015). On noisy ion images the CNN adds nothing. SMSDL does not beat the CNN "in every case".
- **Self-supervised ViT features vs colour-only and random ViT features**, bladder F = 4 (all
  three with the scale-transfer fallback pooled by 2, re-run 2026-12-07): colour-only features
  score SSIM 0.4025 ± 0.0001 against the ViT's 0.4017 ± 0.0000, random ViT weights 0.4018 ±
  0.0002; RMSE equal to 4 decimals, R² within 0.0002. With the check pooled by F the three were
  within seed noise (SSIM +0.0010 and +0.0001 for the ViT, seed std 0.0025–0.0036). The
  multi-level features do not earn their keep over colour on noisy ion images: colour does
  slightly better. **Block masking**: SimMIM's masking as published for ViTs (60 % of the window in
  random 2 × 2-token blocks, `FeatureParams(mask_ratio=0.6, mask_block_tokens=2)`, which a masked
  token cannot fill in from its neighbours' colour; the same 150 steps), SMSDL only, seeds 0–2
  (2026-12-07, `benchmarks/results/guided_block_mask/`): bladder F = 4 SSIM 0.4017 ± 0.0002, margin
  over the control +0.0022 ± 0.0002 (per-token masking: the same), still below colour-only; on the
  cerebellum at F = 4, where the histology matters, 0.619 ± 0.029 against 0.635 ± 0.008 (seeds 1
  and 2 0.638 and 0.632 vs 0.636 and 0.643; on seed 0 the held-out gain dropped UMAP 0, 0.586 vs
  0.627). It is not the default; the option stays for longer (GPU) training. **More steps**: 450
  self-supervised steps per branch instead of 150 (per-token masking; SMSDL only, seeds 0–2,
  `benchmarks/results/guided_ssl_steps/`): bladder F = 4 SSIM 0.4017 ± 0.0003, the same; cerebellum
  F = 4 0.621 ± 0.021 (seed 0 0.598: again the held-out gain's decision on a 10 × 9 LR). On these
  cases neither the published masking nor three times the training moves the features past colour.
  **Where the histology matters, they do** (the same ablation on the cerebellum and the sample,
  seeds 0–2, 2026-12-07; SSL ViT − ablation, mean ± std of the per-seed differences): on the
  cerebellum at F = 4 the SSL features beat colour-only by RMSE −0.0113 ± 0.0050, SSIM +0.0434 ±
  0.0117, R² +0.0483 ± 0.0227 (with colour only the check finds almost nothing worth using: 0, 1
  and 0 channels; when the held-out gain still decided there, colour-only SMSDL fell 0.19 R² below
  the control) and random ViT weights by −0.0067 ± 0.0022, +0.0143 ± 0.0104, +0.0263 ± 0.0077; at
  F = 2, random weights lose RMSE 0.0017 ± 0.0008, SSIM 0.0018 ± 0.0008, R² 0.0040 ± 0.0018, and
  colour ties (SSIM +0.0003 ± 0.0004). On the sample, SSIM +0.0070 ± 0.0038 over colour-only and
  +0.0068 ± 0.0029 over random weights (RMSE −0.0014 / −0.0008, R² +0.0070 / +0.0048). The
  self-supervised multi-level features earn their keep where the ion's distribution has structure
  the H&E shows beyond its colour; on the noisy bladder ions they tie.
- **Cerebellum UMAP, F = 2: SMSDL ties the control on SSIM and still loses on RMSE and R², by
  less** (RMSE +0.0002 ± 0.0003, SSIM +0.0000 ± 0.0002, R² −0.0004 ± 0.0006; before the blend
  weight +0.0004, −0.0002, −0.0009; with the held-out rule +0.0013, −0.0027, −0.0041).
  The held-out LR pixels said the H&E helps on all three channels (gains 0.26–0.51); they measure
  prediction *between* LR pixels, SR needs detail *within* them. The scale-transfer check tests
  that and drops two of the three; its one wrong pass (UMAP 1, +0.3 ± 0.2–0.3 on 10 × 9 LLR pixels)
  is the remaining loss, halved by the blend weight (0.89–0.96 on UMAP 1). At F = 4 on the
  cerebellum (LR 10 × 9) the LR pooled by 2 is too small for blocked check folds; the check runs on
  single-pixel folds there (since 2026-12-07; the held-out gain decided before) and the margin is
  large and positive, with no channel below the control on any metric. The sample at F = 4 gets the
  check pooled by 2 (+0.085 SSIM); its nuclei-density ion, which the check pooled by 4 let through
  (weight 0.99–1.0), no longer loses to the control.
- **Uncertainty:** Spearman(uncertainty, |error|) is 0.69 / 0.67 on the bladder ions (F = 2 / 4)
  and 0.33 on the sample, where the counting-noise part carries most of the calibrated weight; on
  the UMAP summary, whose error sits in texture below the pixel, the structure part (the SR's
  change across one measured pixel, weighted by a calibration one scale up, no ground truth) lifts
  it from 0.24 to 0.27 at F = 2 and from −0.08 to 0.22 at F = 4, and the histology part (that
  change where the H&E features vary inside the measured pixel, calibrated the same way) to
  0.276 ± 0.005 and 0.275 ± 0.006 (seeds 0–2; without it, on the same fits, 0.269 ± 0.004 and
  0.245 ± 0.004; the lowest cerebellum channel at F = 4 0.18 → 0.22; bladder and sample within
  0.002): it ranks the error there, but stays under the 0.3 asked for; an oracle, the truth's own local 3 × 3 spread,
  reaches 0.38 ([method.md](method.md#uncertainty); the uncertainty-variants table above).

### A factor nothing was developed on (F = 3), and the held-out veto

Both real pairs at F = 3 were added on 2026-12-07 (`bench_guided.py --only bladder3,mouse3`): no
setting, rule or constant of the method was developed at this factor. Seeds 0–2, every method
(tables above):

- **Bladder, F = 3** (LR 41 × 81): SMSDL − control RMSE −0.0001 ± 0.0000, SSIM +0.0008 ± 0.0000,
  R² +0.0002 ± 0.0000, with 7.7 of 20 ions using the histology; the CNN equals the control to 4
  decimals, so SMSDL is ahead of all three baselines on all three metrics. Two small losses remain:
  - m/z 918.594 is below the control by more than its seed spread on RMSE and R² (R² −0.0010,
    spread 0.0004). Both ground-truth-free tests pass it on every seed: held-out gain 0.11–0.17,
    scale gain 0.044–0.053. It is also a wrong use at F = 2 on 2 of 3 seeds.
  - Colour-only features tie the ViT (SSIM +0.0004 for colour).
  - The uncertainty ranks the error: Spearman 0.68, lowest channel 0.33.
- **Cerebellum, F = 3** (LR 13 × 12), SMSDL against the control and the CNN:

  | | RMSE | SSIM | R² |
  |---|---|---|---|
  | SMSDL | 0.1291 ± 0.0010 | 0.7107 ± 0.0026 | 0.7710 ± 0.0035 |
  | control | 0.1297 | 0.7001 | 0.7690 |
  | CNN | 0.1327 ± 0.0072 | 0.7068 ± 0.0056 | 0.7581 ± 0.0263 |

  - SMSDL is ahead of all three baselines on all metrics.
  - Self-supervised features against colour-only: RMSE −0.0084, SSIM +0.0112, R² +0.0310.
  - Against random ViT weights: RMSE −0.0010 and R² +0.0034, but SSIM −0.0048 (random weights
    ahead on SSIM here).
  - Uncertainty Spearman 0.25 ± 0.03, under the 0.3 asked for. It was 0.16 before a channel whose
    calibrated map came out flat got the unit weights instead ([method.md](method.md#uncertainty)).

**The held-out veto** ([method.md](method.md#per-channel-histology-gain-and-the-fallback)) was
found with the command line, as a new user would try it: five other bladder ions (m/z 447.025,
487.015, 557.095, 793.014, 896.604) fitted on their own at F = 3 (`smsdl benchmark --msi five.npy
--factor 3`, seed 0). Before the veto, SMSDL scored below the control: SSIM 0.4122 vs 0.4129, R²
0.5237 vs 0.5240. The cause was m/z 896.604:
- it passed the scale-transfer check narrowly (+0.029 ± 0.028 over 5 folds);
- its held-out gain was −0.29 ± 0.21, clearly negative;
- it lost to the control by SSIM 0.0038 and R² 0.0016.

That case is now `bladderfive3` in `bench_guided.py` (seeds 0–2, with the veto): {five_ions}
Over the seeds, SMSDL − control is RMSE +0.0000 ± 0.0001, SSIM −0.0002 ± 0.0004, R² −0.0002 ±
0.0003. Before the veto, seed 0 alone was at SSIM −0.0008 (CLI run). On seed 1 the held-out gain of
m/z 896.604, −0.21 ± 0.26, is negative but not clearly so: the ion keeps the H&E and loses R²
0.0029. **On this case SMSDL still does not beat the control**, and the CNN ties it; the loss is
within the seed spread (0 channels below it).

On every other case — the 20-ion bladder at F = 2, 3 and 4, the cerebellum at F = 2, 3 and 4, the
sample — no channel's held-out gain is clearly negative. The veto changes none of their results,
and the rules table shows it equal to "scale only" everywhere.

**How much could the histology add at all? (ceiling)** `python benchmarks/bench_ceiling.py`, seeds 0–2
everywhere: oracles fitted *on the ground truth* to the detail the control misses (truth − control)
on one fold and scored on the other (both ways), then conserved exactly like every method here —
(a) ridge on the ViT features, (b) ridge on colour only (penalty chosen on the training fold),
(c) gradient boosting on ViT principal components + the bicubic value + the sub-pixel position, all
three on image halves; (d) ridge on the ViT features on a checkerboard of tiles two ViT tokens wide
(an ion found in one region only is in both folds); (e) as (d) with the control's own within-block
detail as a free regressor (the features may replace the bicubic detail, as SMSDL does); (f) that
detail rescaled alone, no H&E (the part of (e)'s gain that needs no histology) — beside SMSDL's
margin, and the CNN with the real guide and with a constant (blank) guide at a fixed 150 joint
iterations.

{ceiling}

On the sample, whose ions the histology largely explains, the best oracle (e) gains RMSE −0.0087,
SSIM +0.085 ± 0.001, R² +0.064, and SMSDL reaches it (−0.0085, +0.084 ± 0.002, +0.064 ± 0.001).
The half-split oracles sit below SMSDL: the one-region stroma ion is not in both halves, and they
can only add to the bicubic detail. On the bladder ions the detail the control misses is 31 %
(F = 2) and 44 % (F = 4) of the truth variance but nearly white (lag-1 −0.07 / +0.11). At F = 2 no
H&E oracle gains beyond the seed spread in SSIM (at most +0.0001; SMSDL +0.0004 ± 0.0001); the
free oracle's R² +0.005 is almost all H&E-free, since rescaling the bicubic detail alone (f) gives
+0.0045 at an SSIM cost of 0.002. At F = 4 the ceiling is SSIM +0.0029 (ViT ridge), SMSDL's
+0.0013 ± 0.0005 is about half of it, and the CNN does not move from its conserved start with the
real guide (a blank one scores the same): no method on these features would change the verdict
there. On the cerebellum at F = 2 the missed detail is white too (13 %, lag-1 −0.05), the ceiling
is SSIM +0.004 to +0.005, and the CNN with a blank guide gains as much as with the real one
(+0.0021 ± 0.0002 vs +0.0020 ± 0.0011): its edge there is an H&E-free learned interpolation. At
F = 4 the missed detail is spatially coherent (33 %, lag-1 +0.33) and the histology matters: the
ViT-ridge oracles reach SSIM +0.053 to +0.056 and the CNN with the real guide +0.050 ± 0.006,
against +0.011 ± 0.002 with a blank one, while SMSDL takes +0.042 ± 0.007, about four fifths of the
ceiling (+0.023 ± 0.008 while its network always saw the bicubic image).
The oracles bound per-pixel models of SMSDL's features fitted on one fold, not every method: the
CNN, with the full-resolution guide and spatial context, beats them on RMSE and R² at F = 4 (150
fixed iterations here, fewer than section 1's wall-clock budget, so its margins differ from that
table).

**Time.** `smsdl benchmark` on the 5-ion bladder case (ions 0, 5, 10, 14, 19; 124 × 244, F = 4;
SMSDL, bicubic, the control and the CNN), whole process, 2 CPU cores, nothing else running
(2026-12-07, with the uncertainty's histology part and the check pooled by 2): 3 min 31 s, peak
RSS 1.7 GB (SMSDL 128 s of it: the ViT features 63 s, the regression 49 s, the two
scale-transfer fits that choose the network input 7 s; the CNN 139 s: its training stopped at
the 75 s budget, the rest is setup, prediction and conservation on the k = 4 guide; target
< 5 min). The same day, before the pooling by 2: 3 min 50 s (SMSDL 146 s, features 70 s, the
checks 8 s): the machine is shared, and the difference is in parts that did not change.
The CNN's preset is a wall-clock budget (75 s, the same on any device), so its iteration count
depends on the machine; `--cnn-iterations N` makes it reproducible.

**Against the paper.** The SMSDL-Net paper reports RMSE 0.015, SSIM 0.84 and R² 0.853 on its own
data. Our numbers are not comparable one to one: different data (real pixel noise in the bladder
ions; a 40 × 36 UMAP summary whose per-pixel noise no method can recover from a 10 × 9 or 20 × 18
input), and we have not reproduced the paper's exact intensity normalisation for RMSE.

## 2. CNN baseline at its honest best

{cnn_baseline}

## 3. Registration accuracy and speed

{registration}

## 4. Reading imzML: ion images

`python benchmarks/bench_ion_images.py` — a generated processed imzML, 100 ion images with 10 ppm
windows, against pyimzML's `getionimage` in the same run (it reads one window per pass over all
pixels, so it was timed on 3 windows and scaled; results were checked equal).

{ion_images}

Target: ≥ 20× faster than `getionimage` and peak memory below the size of the `.ibd`: both met.

## 5. Whole slides, many channels, several processes

`python benchmarks/bench_wsi.py` — see [scaling.md](scaling.md) for how to run on GPUs and
clusters; GPU figures for the same runs are in section 6.

{wsi}

## 6. On a GPU (NVIDIA H200)

**Measured by an earlier session, before the regression was rebuilt on held-out folds (section 1),
with the old 600-step / 3-restart regression and without the H&E-free control; no GPU was lent to
the session that rebuilt it, so these figures are not re-measured.** Read them as the speed of the
feature extraction and of a regression of that size on a GPU, not as today's scores.

`bash benchmarks/gpu_run.sh` on a lent machine: one NVIDIA H200, 16 CPU cores, its own Python 3.12
with torch {gpu_torch} (the other dependencies carried as wheels). Raw results:
`benchmarks/results/reconstruction_gpu.json` and `benchmarks/results/gpu.json`. The CPU figures
they are set against come from the 2-core development machine, a different machine: read the ratios
as what a GPU node gives over a laptop-class CPU, not as a kernel-level comparison.

Reconstruction benchmark, default preset, the protocol of section 1 on the sample and the cerebellum pair (no ablation), old regression:

{reconstruction_gpu}

The scores agree with the CPU run within 0.004 (same seeds, different kernels) and every verdict is
the same; the whole
sample benchmark takes **{gpu_sample_s:.0f} s on the GPU against {sample_default_s:.0f} s** on the 2 CPU cores.

| run | GPU (H200) | CPU (2 cores) |
|---|---|---|
| whole-slide features, 20k × 20k H&E, tiled, 1 process | {gpu_wsi_s:.1f} s ({gpu_wsi_mp:.3f} s / H&E MP), peak RSS {gpu_wsi_rss:.0f} MB | {cpu_wsi_s:.1f} s ({cpu_wsi_mp:.3f} s / H&E MP), peak RSS {cpu_wsi_rss:.0f} MB |
| 1024 channels, 100 × 100 MSI, F = 4, chunks of 64 (`reconstruct_channels`) | {gpu_ch_s:.1f} s ({gpu_ch_pc:.3f} s / channel) | {cpu_ch_s:.1f} s ({cpu_ch_pc:.3f} s / channel) |
| `smsdl reconstruct --fast --baselines bicubic`, 1024 channels, 32 × 32 MSI, F = 4 (chunked path) | {gpu_cli_total:.1f} s (SMSDL {gpu_cli_smsdl:.1f} s), peak RSS {gpu_cli_rss:.0f} MB; under `torchrun`, 1 rank: {gpu_cli_tr:.1f} s | {cpu_cli_total:.1f} s (SMSDL {cpu_cli_smsdl:.1f} s), peak RSS {cpu_cli_rss:.0f} MB |

On the GPU, SimMIM training of the three ViTs drops to {gpu_wsi_ssl:.1f} s of the {gpu_wsi_s:.1f} s
({cpu_wsi_ssl:.1f} s on the CPU); the token passes (reading and resampling tiles on the CPU, then ViT
inference) take {gpu_wsi_tokens:.1f} s and the colour statistics {gpu_wsi_colour:.1f} s. We did not
profile how those split between tile I/O and the GPU (the GPU run's slide was written with zlib tiles, the CPU run's with JPEG tiles: the same pixels,
a different decoder, as the GPU machine has no imagecodecs).

Several processes: `smsdl benchmark --fast` on the sample under `torchrun --nproc_per_node=1`
(NCCL process group on the GPU) gave the same scores as the plain run (SMSDL RMSE {tr_rmse:.4f} both;
{tr_plain_s:.1f} s plain, {tr_run_s:.1f} s under torchrun). With one GPU there is no multi-GPU
figure: NCCL needs one GPU per rank, so DistributedDataParallel over NCCL was not exercised; on
that machine's 16 CPU cores, 2 gloo ranks took {cpu2_s:.1f} s for SMSDL against {cpu1_s:.1f} s for one
process (same RMSE {cpu_rmse:.4f}): at this size the time is feature extraction, which every rank
repeats, so more ranks do not pay. They should pay where the work divides — many channels, whose
chunks are dealt out to the ranks — which was not measured on that machine.

## 7. Compare view toggles in napari

{compare_toggle}
"""


def _strip_title(text: str) -> str:
    return re.sub(r"\A# [^\n]*\n+", "", text.strip())


def _gpu_figures(default: dict) -> dict:
    """Numbers for section 6 from results/reconstruction_gpu.json, results/gpu.json and results/wsi.json."""
    rec = json.loads((HERE / "results" / "reconstruction_gpu.json").read_text())
    gpu = json.loads((HERE / "results" / "gpu.json").read_text())
    wsi = json.loads((HERE / "results" / "wsi.json").read_text())
    cpu_wsi = next(r for r in wsi["runs"] if (r["size"], r["procs"], r["mode"]) == (20000, 1, "tiled"))
    cpu_ch = next(r for r in wsi["channels"] if r["channels"] == 1024)
    g_wsi, g_ch = gpu["wsi_20k_tiled_cuda"], gpu["channels_1024_cuda"]
    tr = gpu["smsdl_benchmark_fast_sample_cuda"]
    cpu = gpu["smsdl_benchmark_fast_sample_cpu_16_cores"]
    return {
        "gpu_torch": rec["device"].split("torch ")[-1],
        "gpu_sample_s": rec["sample"]["wall_seconds"],
        "gpu_wsi_s": g_wsi["seconds"], "gpu_wsi_mp": g_wsi["seconds_per_he_megapixel"],
        "gpu_wsi_rss": g_wsi["peak_rss_mb_per_proc"],
        "gpu_wsi_ssl": sum(v for k, v in g_wsi["stages_s"].items() if k.startswith("self-supervised")),
        "cpu_wsi_ssl": sum(v for k, v in cpu_wsi["stages_s"].items() if k.startswith("self-supervised")),
        "gpu_wsi_tokens": sum(v for k, v in g_wsi["stages_s"].items() if k.startswith("tokens")),
        "gpu_wsi_colour": g_wsi["stages_s"].get("colour statistics", float("nan")),
        "cpu_wsi_s": cpu_wsi["seconds"], "cpu_wsi_mp": cpu_wsi["seconds_per_he_megapixel"],
        "cpu_wsi_rss": cpu_wsi["peak_rss_mb_per_proc"],
        "gpu_ch_s": g_ch["seconds"], "gpu_ch_pc": g_ch["seconds_per_channel"],
        "cpu_ch_s": cpu_ch["seconds"], "cpu_ch_pc": cpu_ch["seconds_per_channel"],
        "tr_rmse": tr["torchrun_1_rank_nccl"]["smsdl"]["rmse"], "tr_plain_s": tr["plain"]["smsdl"]["seconds"],
        "tr_run_s": tr["torchrun_1_rank_nccl"]["smsdl"]["seconds"],
        "cpu1_s": cpu["plain"]["smsdl"]["seconds"], "cpu2_s": cpu["torchrun_2_ranks_gloo"]["smsdl"]["seconds"],
        "cpu_rmse": cpu["plain"]["smsdl"]["rmse"],
        "gpu_cli_total": gpu["reconstruct_cli_1024_channels_cuda"]["plain"]["seconds"]["total"],
        "gpu_cli_smsdl": gpu["reconstruct_cli_1024_channels_cuda"]["plain"]["seconds"]["smsdl"],
        "gpu_cli_rss": gpu["reconstruct_cli_1024_channels_cuda"]["plain"]["peak_memory_mb"],
        "gpu_cli_tr": gpu["reconstruct_cli_1024_channels_cuda"]["torchrun1"]["seconds"]["total"],
        "cpu_cli_total": gpu["reconstruct_cli_1024_channels_cpu_dev_machine"]["seconds"]["total"],
        "cpu_cli_smsdl": gpu["reconstruct_cli_1024_channels_cpu_dev_machine"]["seconds"]["smsdl"],
        "cpu_cli_rss": gpu["reconstruct_cli_1024_channels_cpu_dev_machine"]["peak_memory_mb"],
    }


def _guided_verdict() -> str:
    """One line per case: which baselines SMSDL beats on which mean metric (seed means)."""
    path = HERE / "results" / "guided.json"
    if not path.exists():
        return ""
    label = {"rmse": "RMSE", "ssim": "SSIM", "r2": "R²"}
    names = {"bicubic": "bicubic", "backprojection": "the H&E-free control", "cnn": "the CNN"}
    lines = []
    for case, entry in json.loads(path.read_text()).items():
        m = entry["methods"]
        if "smsdl" not in m:
            continue
        said = []
        for other in ("bicubic", "backprojection", "cnn"):
            if other not in m:
                continue
            wins = [k for k in label if (m["smsdl"][k][0] < m[other][k][0]) == (k == "rmse")]
            said.append(f"{names[other]} on " + (", ".join(label[k] for k in wins) if wins else "none")
                        + ("" if len(wins) == 3 else f" (not {', '.join(label[k] for k in label if k not in wins)})"))
        line = f"- **{case[:-1]}, F = {entry['factor']}**: SMSDL beats " + "; ".join(said) + "."
        for key, what in (("smsdl_colour", "colour-only features"), ("smsdl_random_vit", "random ViT weights")):
            if key in m:
                diff = {k: m["smsdl"][k][0] - m[key][k][0] for k in label}
                line += (f" Self-supervised ViT features vs {what}: RMSE {diff['rmse']:+.4f}, SSIM {diff['ssim']:+.4f}, "
                         f"R² {diff['r2']:+.4f}.")
        if entry.get("smsdl_rerun") and ("smsdl_colour" in m or "smsdl_random_vit" in m):
            line += " (SMSDL was re-run since, the ablations not: not like-for-like differences.)"
        lines.append(line)
    return "\n".join(lines)


def _five_ions() -> str:
    """The ``bladderfive3`` case with the veto: per seed, which ion was vetoed and the margin over the control."""
    files = sorted((HERE / "results" / "guided").glob("bladderfive3_s*.json"))
    if not files:
        return "*(not run yet)*"
    cells, margins = [], []
    for f in files:
        e = json.loads(f.read_text())
        s, c = e["metrics"]["smsdl"], e["metrics"]["backprojection"]
        veto = [e["channels"][i] for i, v in enumerate(s["guidance"].get("held_out_veto") or []) if v]
        used = [e["channels"][i] for i, u in enumerate(s["guidance"]["used_histology"]) if u]
        d = {k: s[k]["mean"] - c[k]["mean"] for k in ("rmse", "ssim", "r2")}
        margins.append(d)
        cells.append(f"seed {e['seed']}: vetoed {', '.join('m/z ' + v for v in veto) or 'none'}, uses the H&E on "
                     f"{', '.join('m/z ' + u for u in used) or 'no ion'}; SMSDL − control RMSE {d['rmse']:+.4f}, "
                     f"SSIM {d['ssim']:+.4f}, R² {d['r2']:+.4f}")
    return "; ".join(cells) + "."


def main() -> None:
    parts = {}
    for name in ("guided", "reconstruction_gpu", "cnn_baseline", "registration",
                 "ion_images", "wsi", "compare_toggle", "ceiling"):
        path = DOCS / "benchmarks" / f"{name}.md"
        text = path.read_text() if path.exists() else f"*(not run yet: {path.name} is missing)*"
        parts[name] = _strip_title(text).replace("\n## ", "\n### ")
    default = json.loads((HERE / "results" / "reconstruction_default.json").read_text())  # section 6's CPU side
    parts["guided_verdict"] = _guided_verdict()
    parts["five_ions"] = _five_ions()
    text = TEMPLATE.format(
        **_gpu_figures(default),
        sample_default_s=default["sample"]["wall_seconds"],
        **parts,
    )
    (DOCS / "benchmarks.md").write_text(text)
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
