"""Progress on the command line: tqdm bars on a terminal (a pseudo-terminal here), log lines in a pipe.

Each case runs a real process, its stderr a pty or a pipe, so that the choice is made the way a
user's shell makes it (``isatty``), not by a flag the test sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tqdm")

FEED = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from napari_smsdl.commands._progress import cli_progress
    with cli_progress() as progress:
        print("bars" if progress.bars else "lines", file=sys.stdout, flush=True)
        for i in range(1, 9):
            progress("self-supervised training (256)", i, 8)
        logging.getLogger("napari_smsdl.test").info("between the stages")
        for i in range(1, 4):
            progress("feature extraction", i, 3)
""")


def _run_in_pty(argv: list[str], timeout: float = 300.0) -> str:
    """Run ``argv`` with stdin/stdout/stderr on a pseudo-terminal; everything it wrote, decoded."""
    import pty
    import select

    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    env = dict(os.environ, TERM="xterm")
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {timeout} s from {argv}")
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        proc.wait(timeout=60)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_terminal_gets_a_bar_per_stage():
    out = _run_in_pty([sys.executable, "-c", FEED])
    assert out.splitlines()[0].strip() == "bars"
    assert "\r" in out  # bars redraw in place
    assert "self-supervised training (256): 100%" in out and "8/8" in out
    assert "feature extraction: 100%" in out and "3/3" in out
    # the log record is printed on its own line, not inside a bar
    line = next(x for x in out.replace("\r", "\n").splitlines() if "between the stages" in x)
    assert line.strip() == "INFO napari_smsdl.test: between the stages"


def test_pipe_gets_plain_log_lines():
    proc = subprocess.run([sys.executable, "-c", FEED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lines"
    lines = proc.stderr.splitlines()
    ours = [x.split(": ", 1)[1] for x in lines if x.startswith("INFO napari_smsdl.progress")]
    # the first step, every quarter, the end with its seconds; nothing else
    assert ours[:4] == ["self-supervised training (256): 1/8 (12%)", "self-supervised training (256): 2/8 (25%)",
                        "self-supervised training (256): 4/8 (50%)", "self-supervised training (256): 6/8 (75%)"]
    assert ours[4].startswith("self-supervised training (256): 8/8 done in ") and ours[4].endswith(" s")
    assert ours[5] == "feature extraction: 1/3 (33%)" and ours[-1].startswith("feature extraction: 3/3 done in")
    assert len(ours) == 8  # 1/3, 2/3 (66%, a new quarter), 3/3
    assert "\r" not in proc.stderr and "%|" not in proc.stderr


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    from skimage import io as skio

    from napari_smsdl.sample import make_sample

    s = make_sample()
    folder = tmp_path_factory.mktemp("progress")
    skio.imsave(folder / "he.png", s.he_rgb[:64, :64], check_contrast=False)
    np.save(folder / "msi.npy", s.ground_truth[:2, :16, :16].astype(np.float32))
    return folder


def _reconstruct(folder, out):
    return [sys.executable, "-m", "napari_smsdl", "reconstruct", "--he", str(folder / "he.png"),
            "--msi", str(folder / "msi.npy"), "--factor", "2", "--fast", "--ssl-steps", "2",
            "--regression-steps", "10", "-o", str(out)]


def test_smsdl_reconstruct_on_a_terminal_and_in_a_pipe(small_inputs, tmp_path):
    out = _run_in_pty(_reconstruct(small_inputs, tmp_path / "tty"))
    assert "feature extraction: 100%" in out and "\r" in out
    assert "wrote " in out and (tmp_path / "tty" / "sr_smsdl.ome.tif").exists()
    proc = subprocess.run(_reconstruct(small_inputs, tmp_path / "pipe"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "INFO napari_smsdl.progress: feature extraction: 1/" in proc.stderr
    assert "feature extraction: 3/3 done in" in proc.stderr or "feature extraction: 4/4 done in" in proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr


def test_nested_stages_keep_their_own_clock_and_an_unreported_end_is_closed(caplog):
    import logging
    import time

    from napari_smsdl.commands._progress import CliProgress

    caplog.set_level(logging.INFO, logger="napari_smsdl.progress")
    with CliProgress(bars=False) as progress:
        progress("inner", 1, 2)  # the core reports an inner stage before its outer one
        progress("outer", 1, 2)
        time.sleep(0.2)
        progress("inner", 2, 2)
        progress("outer", 2, 2)
        progress("resampling", 0, 1)  # a stage whose end is never reported
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["inner: 1/2 (50%)", "outer: 1/2 (50%)"]
    outer_seconds = float(lines[3].split(" in ")[1].rstrip(" s"))
    assert lines[3].startswith("outer: 2/2 done in") and outer_seconds >= 0.2  # from its first report
    assert lines[-1].startswith("resampling: done in")  # the with block ended normally: done
    caplog.clear()
    with pytest.raises(RuntimeError), CliProgress(bars=False) as progress:
        progress("stage", 1, 4)
        raise RuntimeError("stopped")
    assert [r.getMessage() for r in caplog.records] == ["stage: 1/4 (25%)"]  # not claimed done


def test_bars_are_completed_at_a_normal_end(tmp_path):
    from napari_smsdl.commands._progress import CliProgress

    with (tmp_path / "tty").open("w") as stream:
        with CliProgress(stream, bars=True) as progress:
            progress("resampling H&E", 0, 1)
    text = (tmp_path / "tty").read_text()
    assert "resampling H&E: 100%" in text and "1/1" in text


def test_every_stage_the_core_starts_it_also_finishes(tmp_path):
    """A stage reported only at its start was closed by the CLI at exit and logged with the whole run's
    seconds ("resampling H&E onto the SR grid: done in 291.5 s" for a step of a fraction of a second)."""
    import dataclasses

    from napari_smsdl.evaluation import run_benchmark
    from napari_smsdl.features import FeatureParams
    from napari_smsdl.reconstruction import RegressionParams, Settings
    from napari_smsdl.sample import make_sample

    s = make_sample()
    tiny = dataclasses.replace(
        Settings.preset("fast", factor=2),
        features=FeatureParams(embed_dim=32, depth=1, num_heads=2, ssl_steps=2, ssl_batch=4, shifts=1),
        regression=RegressionParams(hidden=16, steps=10, folds=2, pca_dims=4),
    )
    calls: list[tuple[str, int, int]] = []
    run_benchmark(s.ground_truth[:2, :32, :32], s.he_rgb[:80, :80], factor=2, truth_pixel_size_um=10.0,
                  he_pixel_size_um=s.he_pixel_size_um, settings=tiny, methods=["smsdl", "backprojection"],
                  cache_dir=tmp_path, progress=lambda stage, done, total: calls.append((stage, done, total)))
    started = {stage for stage, _, _ in calls}
    finished = {stage for stage, done, total in calls if total > 0 and done >= total}
    assert {"refining the same-field-of-view registration", "resampling H&E onto the SR grid"} <= started
    assert started == finished, f"stages never reported as done: {sorted(started - finished)}"
