"""Tests that run every script as a user does: subprocesses, real flags, tiny data, temporary folders.

python -m pytest test_scripts.py -q              # everything (a few minutes on 2 CPU cores)
python -m pytest test_scripts.py -q -m "not slow"  # the quick half
"""

import csv
import hashlib
import json
import math
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
COLUMNS = ["step", "epoch", "loss_d", "loss_g", "d_real", "d_fake"]
CKPT_KEYS = ["generator", "discriminator", "opt_g", "opt_d", "step", "epoch", "args", "fixed_noise"]
# per script: resolution, channels, and flags that make a run tiny and quick on a CPU
SCRIPTS = {
    "dcgan_mnist.py": (
        28,
        1,
        ["--dataset", "synthetic", "--max-images", "256", "--batch-size", "32", "--ngf", "8", "--ndf", "8"],
    ),
}
slow = pytest.mark.slow


def run(script, *args, cwd=ROOT, ok=True, timeout=300, **kw):
    """Run a script like a user; ok=True asserts exit 0, ok=int asserts that exit code. No traceback, ever."""
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True, check=False,
                       text=True, timeout=timeout, **kw)  # fmt: skip
    want = 0 if ok is True else ok
    assert want is False or p.returncode == want, f"exit {p.returncode}, wanted {want}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def tiny(script, out, *extra):
    return [*SCRIPTS[script][2], "--out", out, *extra]


def rows(run_dir):
    with open(Path(run_dir) / "losses.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader)[:6] == COLUMNS
        return [r for r in reader]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def check_run(run_dir, size, channels, steps=None):
    """SPEC §3, as shared/check_run.py checks it (copied here: the tests must not depend on ../shared)."""
    run_dir = Path(run_dir)
    assert isinstance(json.loads((run_dir / "config.json").read_text()), dict)
    last = 0
    for r in rows(run_dir):
        step, epoch, *vals = int(r[0]), int(r[1]), *map(float, r[2:6])
        assert step == last + 1, f"step {step} follows {last}"
        assert epoch >= 1 and all(map(math.isfinite, vals)) and 0 <= vals[2] <= 1 and 0 <= vals[3] <= 1, r
        last = step
    if steps is not None:
        assert last == steps
    grids = sorted((run_dir / "samples").glob("epoch_*.png"))
    assert grids and all(re.fullmatch(r"epoch_\d{3,}\.png", g.name) for g in grids)
    for g in [run_dir / "samples" / "real.png", *grids]:
        im = Image.open(g)
        assert im.mode == ("L" if channels == 1 else "RGB")
        assert all(8 * size <= s <= 8 * size + 36 for s in im.size), im.size
    ck = load(run_dir / "checkpoint.pt")
    assert all(k in ck for k in CKPT_KEYS), set(CKPT_KEYS) - set(ck)
    assert int(ck["step"]) == last
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["generator"])
    assert all(torch.isfinite(v).all() for v in ck["generator"].values() if v.is_floating_point())
    return ck


def digest(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(folder).rglob("*")
        if p.is_file()
    }


def assert_one_line_error(p, *words):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------------------------------------------
# The contract of every training script: SPEC §2 and §3


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_default(script):
    out = run(script, "--help").stdout
    for flag in ["--dataset", "--data", "--out", "--epochs", "--max-steps", "--dry-run", "--batch-size", "--nz",
                 "--ngf", "--ndf", "--lr-g", "--lr-d", "--beta1", "--beta2", "--seed", "--device", "--amp",
                 "--compile", "--deterministic", "--resume", "--generate", "--interpolate", "--summary", "--benchmark",
                 "--sample-every", "--log-every", "--tensorboard", "--label-smoothing", "--instance-noise", "--g-steps",
                 "--d-optim", "--spectral-norm", "--d-dropout", "--clip-grad", "--ema"]:  # fmt: skip
        assert flag in out, flag
    assert "(default: 0.0002)" in out and "(default: 0)" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_writes_a_complete_run_directory(script, tmp_path):
    size, nc, _ = SCRIPTS[script]
    p = run(script, *tiny(script, tmp_path / "run", "--dry-run"))
    for line in ("seed: 0", "device: cpu", "amp: ", "data: "):
        assert line in p.stdout
    ck = check_run(tmp_path / "run", size, nc, steps=1)
    assert ck["fixed_noise"].shape[0] == 64 and ck["args"]["dry_run"] is True
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved_device"] == "cpu" and config["data_size"] > 0
    assert config["parameters"]["generator"] > 0 and "torch" in config["versions"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_epochs_and_step_grids(script, tmp_path):
    size, nc, _ = SCRIPTS[script]
    run(script, *tiny(script, tmp_path / "run", "--epochs", 2, "--sample-every", 3, "--log-every", 4))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    spe = config["steps_per_epoch"]
    ck = check_run(tmp_path / "run", size, nc, steps=2 * spe)
    assert ck["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("epoch_*")) == ["epoch_001.png", "epoch_002.png"]
    assert len(list((tmp_path / "run" / "samples").glob("step_*.png"))) == 2 * spe // 3
    assert [int(r[1]) for r in rows(tmp_path / "run")] == [1] * spe + [2] * spe


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_reaches_the_same_losses_and_weights(script, tmp_path):
    det = ["--deterministic", "--amp", "off"]
    run(script, *tiny(script, tmp_path / "a", "--max-steps", 4, *det))
    run(script, *tiny(script, tmp_path / "b", "--max-steps", 2, *det))
    p = run(script, "--out", tmp_path / "b", "--resume", "--max-steps", 4)  # other arguments come from the checkpoint
    assert "resume: step 2" in p.stdout
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    a, b = load(tmp_path / "a" / "checkpoint.pt"), load(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for k in a["generator"]:
        assert torch.equal(a["generator"][k], b["generator"][k]), k


@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_interpolate_summary_benchmark(script, tmp_path):
    size, nc, flags = SCRIPTS[script]
    run(script, *tiny(script, tmp_path / "run", "--dry-run", "--ema", 0.9))
    assert "ema" in load(tmp_path / "run" / "checkpoint.pt")
    run(script, "--out", tmp_path / "run", "--generate", 10)
    files = sorted((tmp_path / "run" / "generated").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(10)] + ["grid.png"]
    for f in files[:10]:
        im = Image.open(f)
        assert im.size == (size, size) and im.mode == ("L" if nc == 1 else "RGB")
    run(script, "--out", tmp_path / "run", "--interpolate", 3)
    gif = Image.open(tmp_path / "run" / "interpolation.gif")
    assert gif.n_frames == 4 * 3
    p = run(script, *flags, "--summary")
    import importlib

    module = importlib.import_module(script[:-3])  # importing a script has no side effects
    G = module.Generator(100, 8)
    assert f"total parameters: {sum(q.numel() for q in G.parameters()):,}" in p.stdout
    assert "ConvTranspose2d" in p.stdout and "Discriminator" in p.stdout
    bench = tmp_path / "bench"
    bench.mkdir()
    p = run(script, *flags, "--benchmark", 2, cwd=bench)
    assert re.search(r"[\d,]+ images/s, [\d.]+ TFLOP/s", p.stdout), p.stdout
    assert list(bench.iterdir()) == []  # no data, no files


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_training_trick_runs(script, tmp_path):
    size, nc, _ = SCRIPTS[script]
    tricks = ["--label-smoothing", 0.1, "--instance-noise", 0.1, "--g-steps", 2, "--d-optim", "sgd", "--spectral-norm",
              "--d-dropout", 0.2, "--clip-grad", 1.0, "--ema", 0.99, "--lr-g", 4e-4, "--lr-d", 1e-4]  # fmt: skip
    run(script, *tiny(script, tmp_path / "run", "--max-steps", 3, *tricks))
    ck = check_run(tmp_path / "run", size, nc, steps=3)
    assert any("parametrizations" in k for k in ck["discriminator"]) and "ema" in ck
    assert ck["opt_d"]["param_groups"][0]["momentum"] == 0.9


@pytest.mark.parametrize("script", SCRIPTS)
def test_tensorboard_is_optional(script, tmp_path):
    p = run(script, *tiny(script, tmp_path / "run", "--dry-run", "--tensorboard"), ok=False)
    try:
        import tensorboard  # noqa: F401

        assert p.returncode == 0 and any((tmp_path / "run" / "tb").iterdir())
    except ImportError:
        assert p.returncode == 2 and "pip install tensorboard" in p.stderr


# ----------------------------------------------------------------------------------------------------------------
# SPEC §5: errors and safety


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_argument_values_are_argparse_errors(script, tmp_path):
    for bad in (["--batch-size", 1], ["--epochs", -1], ["--amp", "fp8"], ["--label-smoothing", 1.5]):
        p = run(script, *tiny(script, tmp_path / "run", *bad), ok=2)
        assert "usage:" in p.stderr and bad[0] in p.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_run_is_never_clobbered(script, tmp_path):
    run(script, *tiny(script, tmp_path / "run", "--dry-run"))
    before = digest(tmp_path / "run")
    p = run(script, *tiny(script, tmp_path / "run", "--dry-run"), ok=2)
    assert_one_line_error(p, "--resume", "--out", str(tmp_path / "run"))
    assert digest(tmp_path / "run") == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_other_architecture_and_bad_checkpoints(script, tmp_path):
    run(script, *tiny(script, tmp_path / "run", "--dry-run"))
    p = run(script, *tiny(script, tmp_path / "run", "--resume", "--nz", 50, "--ngf", 16), ok=2)
    assert_one_line_error(p, "--nz 100 (checkpoint) vs 50", "--ngf 8 (checkpoint) vs 16")
    p = run(script, "--out", tmp_path / "empty", "--resume", ok=2)
    assert_one_line_error(p, "no checkpoint at")
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    torch.save({"script": "dcgan_other.py", "step": 3}, tmp_path / "other.pt")
    cases = {
        "truncated": (good[: len(good) // 2], "not a readable checkpoint"),
        "random": (os.urandom(4096), "not a readable checkpoint"),
        "empty": (b"", "not a readable checkpoint"),
        "other": ((tmp_path / "other.pt").read_bytes(), "written by dcgan_other.py"),
        "pickle": (pickle.dumps({"script": script}), "not a readable checkpoint"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(data)
        p = run(script, "--out", tmp_path / name, "--resume", ok=2)
        assert_one_line_error(p, words)
        p = run(
            script, "--checkpoint", tmp_path / name / "checkpoint.pt", "--generate", 1, "--out", tmp_path / name, ok=2
        )
        assert_one_line_error(p, words)


class Payload:  # unpickling this would run a shell command
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED']}",))


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_carrying_code_is_refused_without_running_it(script, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    evil = {"script": script, "generator": Payload()}
    (tmp_path / "run").mkdir()
    torch.save(evil, tmp_path / "run" / "checkpoint.pt")
    for mode in (["--resume"], ["--generate", 1], ["--interpolate", 2]):
        p = run(script, "--out", tmp_path / "run", *mode, ok=2)
        assert_one_line_error(p, "refused, nothing in it was executed")
    assert not marker.exists()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_resumes(script, sig, tmp_path):
    size, nc, _ = SCRIPTS[script]
    args = tiny(script, tmp_path / "run", "--epochs", 10000, "--log-every", 5)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "losses.csv").exists():
        time.sleep(0.2)
    time.sleep(3)  # well into training
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    assert "--resume" in out and "Traceback" not in err
    ck = check_run(tmp_path / "run", size, nc)
    step = ck["step"]
    assert step > 0
    p = run(script, "--out", tmp_path / "run", "--resume", "--max-steps", step + 3)
    assert f"resume: step {step} " in p.stdout
    check_run(tmp_path / "run", size, nc, steps=step + 3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_divergence_stops_and_keeps_the_last_good_checkpoint(script, tmp_path):
    run(script, *tiny(script, tmp_path / "run", "--max-steps", 3, "--amp", "off"))
    p = run(script, "--out", tmp_path / "run", "--resume", "--max-steps", 40, "--lr-d", 1e30, "--lr-g", 1e30, ok=3)
    assert "NaN or infinite" in p.stderr and "step 3" in p.stderr
    ck = load(tmp_path / "run" / "checkpoint.pt")
    assert ck["step"] == 3
    for sd in (ck["generator"], ck["discriminator"]):
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.mark.parametrize("script", SCRIPTS)
def test_unwritable_out_and_full_disk(script, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    p = run(script, *tiny(script, tmp_path / "file" / "run", "--dry-run"), ok=1)
    assert_one_line_error(p, "cannot create --out")
    run(script, *tiny(script, tmp_path / "run", "--max-steps", 2))
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    limit = len(good) // 2  # a file may grow to half a checkpoint: like a disk that fills up during the save

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = run(script, "--out", tmp_path / "run", "--resume", "--max-steps", 4, ok=1, preexec_fn=small_disk)
    assert_one_line_error(p, "could not write", "checkpoint.pt", "intact")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good
    assert not list((tmp_path / "run").glob("*.tmp*"))
    run(script, "--out", tmp_path / "run", "--resume", "--max-steps", 4)  # and the run goes on where it was


# ----------------------------------------------------------------------------------------------------------------
# dcgan_mnist.py


def test_mnist_offline_download_fails_cleanly(tmp_path):
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    p = run("dcgan_mnist.py", "--data", tmp_path / "data", "--out", tmp_path / "run", ok=2, env=env)
    assert_one_line_error(p, "MNIST/raw", "train-images-idx3-ubyte.gz", "ossci-datasets")
    p = run("dcgan_mnist.py", "--dataset", "fashion-mnist", "--data", tmp_path / "data", ok=2, env=env)
    assert_one_line_error(p, "FashionMNIST/raw")
    assert not (tmp_path / "run").exists()


def test_mnist_synthetic_is_deterministic_digits():
    import dcgan_mnist

    a, b = dcgan_mnist.synthetic_digits(500), dcgan_mnist.synthetic_digits(500)
    assert a.dtype == torch.uint8 and a.shape == (500, 1, 28, 28) and torch.equal(a, b)
    ink = (a > 127).float().mean((1, 2, 3))
    assert 0.05 < ink.mean() < 0.4 and ink.min() > 0.01  # every image has a glyph on a dark background


def image_stats(files):
    x = np.concatenate([np.asarray(Image.open(f), dtype=np.float32).ravel() / 255 for f in files])
    return x.mean(), (x < 0.25).mean()  # mean intensity, and the share of dark (background) pixels


@slow
def test_mnist_learns_the_synthetic_digits(tmp_path):
    """Statistic: mean pixel intensity of 256 generated digits. An untrained G draws mid-gray (about 0.5), the data
    is mostly black background (about 0.11); after 400 CPU steps G must have closed >= 50% of that gap (about 60%
    measured), and its
    share of dark pixels must be within 0.2 of the data's."""
    flags = ["--dataset", "synthetic", "--max-images", "2048", "--batch-size", "64", "--ngf", "16", "--ndf", "16"]
    run("dcgan_mnist.py", *flags, "--dry-run", "--out", tmp_path / "start")
    run("dcgan_mnist.py", *flags, "--max-steps", 400, "--out", tmp_path / "end")
    for name in ("start", "end"):
        run("dcgan_mnist.py", "--out", tmp_path / name, "--generate", 256)
    import dcgan_mnist

    data = dcgan_mnist.synthetic_digits(2048).float().div(255)
    data_mean, data_dark = data.mean().item(), (data < 0.25).float().mean().item()
    start_mean, _ = image_stats(sorted((tmp_path / "start" / "generated").glob("0*.png")))
    end_mean, end_dark = image_stats(sorted((tmp_path / "end" / "generated").glob("0*.png")))
    assert abs(end_mean - data_mean) <= 0.5 * abs(start_mean - data_mean), (start_mean, end_mean, data_mean)
    assert abs(end_dark - data_dark) < 0.2, (end_dark, data_dark)
