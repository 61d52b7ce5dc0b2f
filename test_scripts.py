"""Tests that run every script as a user does: subprocesses, real flags, tiny data, temporary folders.

python -m pytest test_scripts.py -q              # everything (a few minutes on 2 CPU cores)
python -m pytest test_scripts.py -q -m "not slow"  # the quick half
"""

import contextlib
import csv
import glob
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from functools import partial
from pathlib import Path
from types import SimpleNamespace

# every script runs in its own process: one thread each keeps two test workers (-n 2) from fighting over the cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

import dcgan_celeba as d

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
    "dcgan_celeba.py": (
        32,
        3,
        [
            "--dataset",
            "synthetic",
            "--size",
            "32",
            "--max-images",
            "128",
            "--batch-size",
            "16",
            "--ngf",
            "8",
            "--ndf",
            "8",
            "--amp",
            "off",
        ],
    ),
    "dcgan_hires.py": (
        128,
        3,
        [
            "--dataset",
            "synthetic",
            "--size",
            "128",
            "--max-images",
            "64",  # 8 steps an epoch: fewer epoch ends (a 1024 x 1024 grid each) in the 40 steps of the fault runs
            "--batch-size",
            "8",
            "--ngf",
            "4",
            "--ndf",
            "4",
            "--amp",
            "off",
        ],
    ),
}
slow = pytest.mark.slow


def run(script, *args, cwd=ROOT, ok=True, timeout=300, **kw):
    """Run a script like a user; ok=True asserts exit 0, ok=int asserts that exit code. No traceback, ever."""
    p = subprocess.run(command(script, *args), cwd=cwd, capture_output=True, check=False, text=True, timeout=timeout,
                       **kw)  # fmt: skip
    want = 0 if ok is True else ok
    assert want is False or p.returncode == want, f"exit {p.returncode}, wanted {want}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def command(script, *args, nproc=0):
    """The command line of `script`; with nproc, under `torchrun --standalone --nproc_per_node nproc`."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    return [sys.executable, *launcher, str(ROOT / script), *map(str, args)]


def start(script, *args, stdout=subprocess.PIPE, nproc=0):
    """Start a script in the background, unbuffered so that a file given as stdout shows how far it got. Its output
    is small: pipes cannot fill up and block it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(command(script, *args, nproc=nproc), cwd=ROOT, env=env, text=True, stdout=stdout,
                            stderr=subprocess.PIPE)  # fmt: skip


def stop(proc, sig, code=None):
    """Send sig and wait for the end: exit code `code` (default 128 + sig), no traceback -> (stdout, stderr)."""
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (128 + sig if code is None else code), (proc.returncode, out, err)
    assert "Traceback" not in err, err
    return out, err


def call(script, *args, ok=True):
    """`python script args` run in this process, as run() checks it, for what a script does before it loads data
    or a model (--help, argument errors, refusals): the same main(), without the 3 s that starting Python with torch
    and torchvision takes."""
    module, argv, out, err = importlib.import_module(script[:-3]), sys.argv, io.StringIO(), io.StringIO()
    sys.argv, code = [str(ROOT / script), *map(str, args)], 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train() installs its own
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    p = subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())
    want = 0 if ok is True else ok
    assert want is False or p.returncode == want, f"exit {p.returncode}, wanted {want}\n{p.stdout}\n{p.stderr}"
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


def config(run_dir):
    return json.loads((Path(run_dir) / "config.json").read_text())


def check_run(run_dir, size, channels, steps=None):
    """SPEC §3, as shared/check_run.py checks it (copied here: the tests must not depend on ../shared)."""
    run_dir = Path(run_dir)
    assert isinstance(config(run_dir), dict)
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


def made_once(*flags):
    """A fixture: get(script) -> the run directory of `script` with tiny(script, ..., *flags), made once per test
    session and shared by its processes (pytest -n), its stdout in stdout.txt beside it. Tests read it; a test that
    changes it works on a copy (copy_run)."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        shared = tmp_path_factory.getbasetemp()
        shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared  # the workers' common folder

        def get(script):
            key = hashlib.sha256(repr((script, flags)).encode()).hexdigest()[:12]
            out = shared / f"made-{key}" / "run"
            with FileLock(shared / f"made-{key}.lock"):
                if not (out.parent / "stdout.txt").exists():
                    shutil.rmtree(out, ignore_errors=True)  # left by a worker that failed to make it
                    p = run(script, *tiny(script, out, *flags))
                    (out.parent / "stdout.txt").write_text(p.stdout)
            return out

        return get

    return fixture


def copy_run(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# the uninterrupted, deterministic run that resumed and interrupted runs are compared with, bit for bit
FAULT_STEPS = 40  # its length (the interruptions below take about 10 steps; the disk-full test needs 30 rows)
# bit-exact on a CPU, --max-steps binds first; EMA, step grids and --log-every as their resumption must be exact too
FAULT_EXACT = ["--deterministic", "--amp", "off", "--epochs", 1000, "--ema", 0.9, "--sample-every", 10,
               "--log-every", 4]  # fmt: skip
fault_reference = made_once(*FAULT_EXACT, "--max-steps", FAULT_STEPS)
dry_run = made_once("--dry-run")
# dcgan_celeba.py trains with dcgan_mnist.py's code, word for word (train, prepare_run, atomic_write, save_checkpoint,
# Log: test_shared_helpers_are_identical_across_scripts): what only the training loop does is tried on these two
TRAIN_LOOPS = ["dcgan_mnist.py", "dcgan_hires.py"]


# ----------------------------------------------------------------------------------------------------------------
# The contract of every training script: SPEC §2 and §3


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_default(script):
    out = " ".join(call(script, "--help").stdout.split())
    for flag in ["--dataset", "--data", "--out", "--epochs", "--max-steps", "--dry-run", "--batch-size", "--nz",
                 "--ngf", "--ndf", "--lr-g", "--lr-d", "--beta1", "--beta2", "--seed", "--device", "--amp",
                 "--compile", "--deterministic", "--resume", "--generate", "--interpolate", "--summary", "--benchmark",
                 "--sample-every", "--log-every", "--tensorboard", "--label-smoothing", "--instance-noise", "--g-steps",
                 "--d-optim", "--spectral-norm", "--d-dropout", "--clip-grad", "--ema"]:  # fmt: skip
        assert flag in out, flag
    assert "(default: 0.0002)" in out and "(default: 0)" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_writes_a_complete_run_directory(script, dry_run):
    size, nc, _ = SCRIPTS[script]
    out = dry_run(script)
    stdout = (out.parent / "stdout.txt").read_text()
    for line in ("seed: 0", "device: cpu", "amp: ", "data: "):
        assert line in stdout
    ck = check_run(out, size, nc, steps=1)
    assert ck["fixed_noise"].shape[0] == 64 and ck["args"]["dry_run"] is True
    conf = config(out)
    assert conf["resolved_device"] == "cpu" and conf["data_size"] > 0
    assert conf["parameters"]["generator"] > 0 and "torch" in conf["versions"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_epochs_and_step_grids(script, fault_reference):
    size, nc, _ = SCRIPTS[script]
    out = fault_reference(script)  # --max-steps 40 --sample-every 10 --log-every 4
    spe = config(out)["steps_per_epoch"]
    epochs = FAULT_STEPS // spe
    ck = check_run(out, size, nc, steps=FAULT_STEPS)
    assert FAULT_STEPS % spe == 0 and ck["epoch"] == epochs
    names = sorted(p.name for p in (out / "samples").glob("*_*.png"))
    steps = [f"step_{s:07d}.png" for s in range(10, FAULT_STEPS + 1, 10)]
    assert names == [f"epoch_{e:03d}.png" for e in range(1, epochs + 1)] + steps
    assert [int(r[1]) for r in rows(out)] == [e for e in range(1, epochs + 1) for _ in range(spe)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_generate_interpolate_summary_benchmark(script, tmp_path, fault_reference):
    size, nc, flags = SCRIPTS[script]
    out = copy_run(fault_reference(script), tmp_path)  # with --ema 0.9: its EMA weights make the images
    before = digest(out)
    run(script, "--out", out, "--generate", 10)
    files = sorted((out / "generated").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(10)] + ["grid.png"]
    for f in files[:10]:
        im = Image.open(f)
        assert im.size == (size, size) and im.mode == ("L" if nc == 1 else "RGB")
    after = digest(out)  # --generate in a finished run writes generated/ and nothing else
    assert {k: after[k] for k in before} == before and len(after) == len(before) + len(files)
    call(script, "--out", out, "--interpolate", 3)  # nothing trains: in this process
    gif = Image.open(out / "interpolation.gif")
    assert gif.n_frames == 4 * 3
    p = call(script, *flags, "--summary")
    G = importlib.import_module(script[:-3]).load_generator(out / "checkpoint.pt")  # the same flags as the summary
    assert f"total parameters: {sum(q.numel() for q in G.parameters()):,}" in p.stdout
    assert "ConvTranspose2d" in p.stdout and "Discriminator" in p.stdout
    bench = tmp_path / "bench"
    bench.mkdir()
    p = run(script, *flags, "--benchmark", 2, cwd=bench)
    assert re.search(r"[\d,]+ images/s, [\d.]+ TFLOP/s", p.stdout), p.stdout
    assert list(bench.iterdir()) == []  # no data, no files


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_training_trick_runs_and_g_act_d_norm_are_kept_on_resume(script, tmp_path):
    """Every trick at once, --g-act leaky and --d-norm none among them (one launch): --g-act and --d-norm are kept in
    the checkpoint, and a --resume that types other values is refused."""
    size, nc, _ = SCRIPTS[script]
    tricks = ["--label-smoothing", 0.1, "--instance-noise", 0.1, "--g-steps", 2, "--d-optim", "sgd", "--spectral-norm",
              "--d-dropout", 0.2, "--clip-grad", 1.0, "--ema", 0.99, "--lr-g", 4e-4, "--lr-d", 1e-4, "--g-act", "leaky",
              "--d-norm", "none"]  # fmt: skip
    run(script, *tiny(script, tmp_path / "run", "--max-steps", 3, *tricks))
    ck = check_run(tmp_path / "run", size, nc, steps=3)
    assert any("parametrizations" in k for k in ck["discriminator"]) and "ema" in ck
    assert ck["opt_d"]["param_groups"][0]["momentum"] == 0.9
    assert (ck["args"]["g_act"], ck["args"]["d_norm"]) == ("leaky", "none")
    assert not any("running_mean" in k for k in ck["discriminator"])  # --d-norm none
    p = call(script, "--out", tmp_path / "run", "--resume", "--g-act", "relu", "--d-norm", "batch", ok=2)
    assert_one_line_error(p, "--g-act leaky (checkpoint) vs relu", "--d-norm none (checkpoint) vs batch")


@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_tensorboard_is_optional(script, tmp_path):
    p = call(script, *tiny(script, tmp_path / "run", "--dry-run", "--tensorboard"), ok=False)  # refused before training
    try:
        import tensorboard  # noqa: F401

        assert p.returncode == 0 and any((tmp_path / "run" / "tb").iterdir())
    except ImportError:
        assert p.returncode == 2 and "pip install tensorboard" in p.stderr


# what may differ between the scripts: resolution, data, layers (STYLE.md); with dcgan_hires.py also DDP
MAY_DIFFER = {"parse_args", "load_dataset", "preprocess", "Generator", "Discriminator", "build", "load_generator",
              "benchmark", "BatchSource"}  # fmt: skip
MAY_DIFFER_DDP = MAY_DIFFER | {"setup", "train", "main", "Log"}


def test_shared_helpers_are_identical_across_scripts():
    import ast
    import itertools

    def definitions(script):
        src = (ROOT / script).read_text()
        return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body if hasattr(n, "name")}

    scripts = {s: definitions(s) for s in SCRIPTS}
    shared = 0
    for a, b in itertools.combinations(scripts, 2):
        allowed = MAY_DIFFER_DDP if "dcgan_hires.py" in (a, b) else MAY_DIFFER
        for name in sorted(set(scripts[a]) & set(scripts[b]) - allowed):
            assert scripts[a][name] == scripts[b][name], f"{name} differs between {a} and {b}"
            shared += 1
    assert shared >= 20 * (len(scripts) - 1)


# ----------------------------------------------------------------------------------------------------------------
# SPEC §5: errors and safety


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_argument_values_are_argparse_errors(script, tmp_path):
    for i, bad in enumerate((["--batch-size", 1], ["--epochs", -1], ["--amp", "fp8"], ["--label-smoothing", 1.5])):
        p = (run if i == 0 else call)(script, *tiny(script, tmp_path / "run", *bad), ok=2)  # the first one for real
        assert "usage:" in p.stderr and bad[0] in p.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", TRAIN_LOOPS)  # the refusal is in train(), dcgan_celeba.py's is mnist's
def test_existing_run_is_never_clobbered(script, tmp_path, fault_reference):
    """A new run into a finished run's --out is refused whatever its flags (a dry run, other --epochs, --max-steps,
    --seed): checkpoint, losses, config and samples stay byte for byte as they were. (--generate there writes only
    generated/: test_generate_interpolate_summary_benchmark.)"""
    out = copy_run(fault_reference(script), tmp_path)
    before = digest(out)
    p = run(script, *tiny(script, out, "--epochs", 3, "--max-steps", 5, "--save-every", 1, "--seed", 1), ok=2)
    assert_one_line_error(p, "--resume", "--out", str(out))
    assert_one_line_error(call(script, *tiny(script, out, "--dry-run"), ok=2), "--resume", "--out", str(out))
    assert digest(out) == before


class Payload:  # unpickling this would run a shell command
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED']}",))


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_other_architecture_and_bad_checkpoints(script, tmp_path, fault_reference, monkeypatch):
    """--resume with other architecture arguments, and --resume, --generate or --interpolate with a checkpoint that is
    missing, truncated, not a checkpoint, another script's, or a pickle that would run code: exit 2, one line, nothing
    written, nothing in the file executed. (In this process: these refusals come before any data or model.)"""
    out = copy_run(fault_reference(script), tmp_path)
    before = digest(out)
    p = call(script, *tiny(script, out, "--resume", "--nz", 50, "--ngf", 16), ok=2)
    flags = SCRIPTS[script][2]
    assert_one_line_error(
        p, "--nz 100 (checkpoint) vs 50", f"--ngf {flags[flags.index('--ngf') + 1]} (checkpoint) vs 16"
    )
    assert digest(out) == before
    p = call(script, "--out", tmp_path / "empty", "--resume", ok=2)
    assert_one_line_error(p, "no checkpoint at")
    good = (out / "checkpoint.pt").read_bytes()
    torch.save({"script": "dcgan_other.py", "step": 3}, tmp_path / "other.pt")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    torch.save({"script": script, "generator": Payload()}, tmp_path / "evil.pt")
    unreadable, refused = "not a readable checkpoint", "refused, nothing in it was executed"
    evil = (tmp_path / "evil.pt").read_bytes()
    cases = {
        "truncated": (good[: len(good) // 2], unreadable, "--resume"),
        "random": (os.urandom(4096), unreadable, "--resume"),
        "empty": (b"", unreadable, "--resume"),
        "other": ((tmp_path / "other.pt").read_bytes(), "written by dcgan_other.py", "--resume"),
        "pickle": (pickle.dumps({"script": script}), unreadable, "--resume"),
        "evil": (evil, refused, "--resume"),
        "evil-generate": (evil, refused, "--generate"),
        "evil-interpolate": (evil, refused, "--interpolate"),
        "truncated-generate": (good[: len(good) // 2], unreadable, "--generate"),  # the same loader as --resume
    }
    for name, (data, words, mode) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(data)
        args = {"--resume": [], "--generate": [1], "--interpolate": [2]}[mode]
        p = call(script, "--out", tmp_path / name, mode, *args, ok=2)
        assert_one_line_error(p, words)
        assert sorted(os.listdir(tmp_path / name)) == ["checkpoint.pt"], name
    assert not marker.exists()


# dcgan_celeba.py stops and resumes with mnist's train(); its BatchSource resumed mid-epoch, batch for batch, is
# test_batch_source_order_resume_and_paths
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_signal_finishes_the_step_saves_and_resumes_exactly(script, tmp_path, fault_reference):
    """Ctrl-C (SIGINT) while training: the step finishes, checkpoint and samples are written, exit 130 with the
    command that resumes. --resume, given no other argument than --max-steps, continues from the step it names;
    stopped there by SIGTERM (exit 143), resumed to a --max-steps in mid-epoch, then to the end, the run has the
    losses.csv, byte for byte, the samples and the G, D, EMA, optimizer and RNG states of a run never stopped
    (--deterministic --amp off on a CPU)."""
    size, nc, _ = SCRIPTS[script]
    out, stopped = tmp_path / "run", 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        args = tiny(script, out, *FAULT_EXACT) if not stopped else ["--out", out, "--resume"]
        proc = start(script, *args, "--max-steps", FAULT_STEPS)
        assert fault_wait(proc, lambda last=stopped: max(fault_csv_steps(out), default=0) > last)  # this run's rows
        stdout, _ = stop(proc, sig)
        assert "--resume" in stdout and (not stopped or f"resume: step {stopped} " in stdout), stdout
        stopped = check_run(out, size, nc)["step"]
        assert 0 < stopped < FAULT_STEPS - 4
    middle = (stopped + FAULT_STEPS) // 2
    middle += middle % config(out)["steps_per_epoch"] == 0  # stop mid-epoch
    run(script, "--out", out, "--resume", "--max-steps", middle)
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS)
    assert f"resume: step {middle} " in p.stdout
    ck = check_run(out, size, nc, steps=FAULT_STEPS)
    ref = fault_reference(script)
    assert (out / "losses.csv").read_bytes() == (ref / "losses.csv").read_bytes()
    fault_same_training_state(ck, load(ref / "checkpoint.pt"))
    assert digest(out / "samples") == digest(ref / "samples")


@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_divergence_stops_and_keeps_the_last_good_checkpoint(script, tmp_path, fault_reference):
    out = copy_run(fault_reference(script), tmp_path)
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS + 40, "--lr-d", 1e30, "--lr-g", 1e30, ok=3)
    assert "NaN or infinite" in p.stderr and f"step {FAULT_STEPS}" in p.stderr
    ck = load(out / "checkpoint.pt")
    assert ck["step"] == FAULT_STEPS
    for sd in (ck["generator"], ck["discriminator"]):
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def fault_small_disk(limit):
    """A preexec_fn: no file may grow past `limit` bytes, like a disk that fills up; writes fail with EFBIG."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_unwritable_out_and_full_disk(script, tmp_path, dry_run, fault_reference):
    """An --out that cannot be made: exit 1 at once. The disk fills while the checkpoint, the sample grid or the
    losses.csv row of the next step is written: exit 1 and one line naming the file, the previous checkpoint
    untouched, no temporary file left; and the run resumes where it was, the rows after its checkpoint dropped."""
    size, nc, _ = SCRIPTS[script]
    (tmp_path / "file").write_text("not a folder")
    p = call(script, *tiny(script, tmp_path / "file" / "run", "--dry-run"), ok=1)  # before any model: in this process
    assert_one_line_error(p, "cannot create --out")

    def disk_full_at(out, limit, *words, extra=()):
        good = (out / "checkpoint.pt").read_bytes()
        p = run(script, "--out", out, "--resume", "--max-steps", load(out / "checkpoint.pt")["step"] + 1, *extra, ok=1,
                preexec_fn=fault_small_disk(limit))  # fmt: skip
        assert_one_line_error(p, "could not write", *words, "intact")
        assert (out / "checkpoint.pt").read_bytes() == good
        assert not list(out.rglob("*.tmp*"))

    # the checkpoint: a file may grow to half a checkpoint (after 1 step the grids are much smaller than that)
    out = copy_run(dry_run(script), tmp_path / "dry")
    limit = (out / "checkpoint.pt").stat().st_size // 2
    assert all(p.stat().st_size < limit // 2 for p in out.rglob("*.*") if p.name != "checkpoint.pt")
    disk_full_at(out, limit, "checkpoint.pt")
    # the grid of the last step, written after its losses.csv row and before its checkpoint: a row or two to spare
    out = copy_run(fault_reference(script), tmp_path)
    limit = max((out / f).stat().st_size for f in ("losses.csv", "config.json")) + 1000
    assert limit < min(p.stat().st_size for p in (out / "samples").glob("*.png"))
    disk_full_at(out, limit, "samples", ".png")
    # a row of losses.csv: the resume's rewrite of the file fits, the next row does not
    limit = (fault_reference(script) / "losses.csv").stat().st_size + 10
    assert (out / "config.json").stat().st_size < limit - 100
    disk_full_at(out, limit, "losses.csv", extra=("--log-every", 1))
    assert rows(out)[FAULT_STEPS - 1][0] == str(FAULT_STEPS)
    run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS + 3)
    check_run(out, size, nc, steps=FAULT_STEPS + 3)


# ----------------------------------------------------------------------------------------------------------------
# Fault injection (issue 6): hard kills, signals before training, stale temporary files


def fault_slow_data(script):
    """--max-images for about 2 s of loading synthetic data on a CPU: as many pixels as 40000 MNIST digits."""
    return ["--max-images", 40000 * 28**2 // SCRIPTS[script][0] ** 2]


def fault_wait(proc, condition, timeout=180, poll=0.001):
    """Poll until condition() holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the script"
        time.sleep(poll)
    return True


def fault_newer(path, t0):
    """path was (re)written after t0 (time.time_ns()): the process started after t0 has got that far."""
    try:
        return path.stat().st_mtime_ns > t0
    except FileNotFoundError:
        return False


def fault_trained(run_dir, t0, steps):
    """The process started after t0 has written the row of step `steps` to losses.csv."""
    return fault_newer(Path(run_dir) / "losses.csv", t0) and steps in fault_csv_steps(run_dir)


def fault_csv_steps(run_dir):
    """The step of every row of losses.csv, leniently: a row cut short by a kill still counts if its step is whole."""
    path = Path(run_dir) / "losses.csv"
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    return [int(line.split(",")[0]) for line in lines if line.split(",")[0].isdigit()]


def fault_same_training_state(a, b):
    """Two checkpoints hold the same weights, buffers, optimizer states and RNG state, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("generator", "discriminator", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("opt_g", "opt_d"):
        assert a[key]["state"].keys() == b[key]["state"].keys()
        for i, state in a[key]["state"].items():
            for name, value in state.items():
                other = b[key]["state"][i][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (key, i, name)
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    assert torch.equal(a["fixed_noise"], b["fixed_noise"])


@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_fault_sigkill_at_five_moments_then_resume_matches_an_uninterrupted_run(script, tmp_path, fault_reference):
    """SIGKILL a run (--save-every 1: a checkpoint is written every step) at 5 moments, each start resuming the last
    one's checkpoint: while loading data, as the first checkpoint appears, while a resume rewrites config.json and
    losses.csv, during a checkpoint write, and 1 to 6 steps into training. After every kill the checkpoint loads and
    the rows it covers are in losses.csv; after the last, --resume completes the run with the losses, weights,
    optimizer states and sample grids of a run that was never interrupted, and leaves no temporary file behind."""
    size, nc, _ = SCRIPTS[script]
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    rng = random.Random(6)
    step, report = 0, []
    for i, moment in enumerate(["loading", "checkpoint", "config", "write", "delay"]):
        fresh, started = not ckpt.exists(), time.monotonic()
        if moment == "checkpoint" and not fresh:  # the kill while loading came late: that start left a checkpoint
            moment = "config"
        t0 = time.time_ns()
        args = tiny(script, out, *FAULT_EXACT, "--max-steps", FAULT_STEPS, "--save-every", 1)
        proc = start(script, *(args + ["--resume"] if not fresh else args))
        if moment == "loading":  # --out is made just before the data is loaded
            hit = fault_wait(proc, (out / "samples").is_dir)
        elif moment == "checkpoint":  # step 0's checkpoint, written before config.json and losses.csv
            hit = fault_wait(proc, ckpt.exists)
        elif moment == "config":  # a resume rewrites config.json, then truncates losses.csv, then trains
            hit = fault_wait(proc, partial(fault_newer, out / "config.json", t0))
        elif moment == "write":  # this process's checkpoint temp file exists: torch.save or fsync in progress
            tmp = out / f"checkpoint.pt.tmp{proc.pid}"
            hit = fault_wait(proc, tmp.exists, poll=0.0002)
        else:  # 1 to 6 steps into this process's training (its losses.csv rewritten), then up to 30 ms more
            target = step + rng.randint(1, 6)
            hit = fault_wait(proc, partial(fault_trained, out, t0, target), poll=0.002)
            time.sleep(rng.uniform(0, 0.03))
        proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
        assert hit and proc.returncode == -signal.SIGKILL, (moment, proc.returncode, stdout, stderr)
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp*"))
        if ckpt.exists():
            ck = load(ckpt)  # the previous checkpoint or the new one, never a torn one
            assert ck["step"] >= step and {"generator", "discriminator", "opt_g", "opt_d"} <= ck.keys()
            step = ck["step"]
            assert fault_csv_steps(out)[:step] == list(range(1, step + 1))  # later rows are dropped on resume
        else:  # killed before its first checkpoint: no run there yet, and a fresh start is accepted
            assert not (out / "losses.csv").exists() and not (out / "config.json").exists()
        report.append(f"kill {i} {moment}: checkpoint step {step if ckpt.exists() else None}, temp files left {left}, "
                      f"{time.monotonic() - started:.1f} s")  # fmt: skip
    print("\n".join(report))
    assert step > 0
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS)
    assert f"resume: step {step} " in p.stdout
    assert not list(out.rglob("*.tmp*"))
    ck = check_run(out, size, nc, steps=FAULT_STEPS)
    ref = fault_reference(script)
    assert (out / "losses.csv").read_bytes() == (ref / "losses.csv").read_bytes()
    fault_same_training_state(ck, load(ref / "checkpoint.pt"))
    assert digest(out / "samples") == digest(ref / "samples")


@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_fault_sigint_before_training_exits_130_and_leaves_a_usable_run_or_none(script, tmp_path):
    """Ctrl-C before the training loop: while the step-0 checkpoint is written (made large with --nz 4000, so that
    the write takes a while), just as a first run's step-0 checkpoint appears, and while a resume loads its data.
    Exit 130, no traceback, no half-written checkpoint.pt.tmp<pid> left; the run resumes, and the interrupted resume
    changed nothing in it. (Ctrl-C while a first run loads its data:
    test_fault_sigint_while_a_first_run_loads_its_data_leaves_no_run_dir.)"""
    size, nc, _ = SCRIPTS[script]
    out, ckpt, log = tmp_path / "run", tmp_path / "run" / "checkpoint.pt", tmp_path / "stdout.txt"

    def interrupt(args, condition, delay=0.0, poll=0.001):
        with open(log, "w") as stdout:
            proc = start(script, *args, stdout=stdout)
            assert fault_wait(proc, condition(proc), poll=poll)
            time.sleep(delay)
            return stop(proc, signal.SIGINT, 130)[1]

    def loading(proc):  # setup() has printed the amp line: the data is being loaded, nothing has been written
        return lambda: "amp: " in log.read_text()

    # 1. during the step-0 checkpoint write: no temp file left (and no checkpoint, unless the signal came late)
    interrupt(tiny(script, out, "--nz", 4000), lambda proc: (out / f"checkpoint.pt.tmp{proc.pid}").exists, poll=0.0002)
    assert not list(out.rglob("*.tmp*"))
    ckpt.unlink(missing_ok=True)  # a fresh start again
    # 2. a first run interrupted as its step-0 checkpoint appears leaves a run that loads
    interrupt(tiny(script, out), lambda proc: ckpt.exists)
    assert load(ckpt)["step"] >= 0
    # 3. a resume interrupted while it loads its data changes nothing in the run (but removes stale temp files)
    before = {k: v for k, v in digest(out).items() if ".tmp" not in k.name}
    assert "interrupted" in interrupt(["--out", out, "--resume", *fault_slow_data(script)], loading, 0.1)
    assert digest(out) == before
    # 4. and the run goes on
    step = load(ckpt)["step"]
    run(script, "--out", out, "--resume", "--max-steps", step + 3)
    check_run(out, size, nc, steps=step + 3)


# dcgan_celeba.py stops here with mnist's main() and train(); its cache build interrupted: interrupted_chunk below
@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_fault_sigint_while_a_first_run_loads_its_data_leaves_no_run_dir(script, tmp_path):
    """Ctrl-C while a first run loads its data: exit 130, "interrupted", no traceback, no file written, and, as when
    the data set is missing, no empty run directory left behind."""
    out, log = tmp_path / "run", tmp_path / "stdout.txt"
    with open(log, "w") as stdout:
        proc = start(script, *tiny(script, out, *fault_slow_data(script)), stdout=stdout)
        assert fault_wait(proc, lambda: "amp: " in log.read_text())
        time.sleep(0.1)
        _, stderr = stop(proc, signal.SIGINT, 130)
    assert "interrupted" in stderr
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing written: a fresh start is not refused
    assert not out.exists(), sorted(map(str, out.rglob("*")))


@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_fault_resume_removes_stale_temp_files(script, tmp_path, fault_reference):
    """A write killed half-way leaves <name>.tmp<pid>: --resume removes every one, and nothing else."""
    size, nc, _ = SCRIPTS[script]
    out = copy_run(fault_reference(script), tmp_path)
    half = (out / "checkpoint.pt").read_bytes()[:100_000]
    stale = {
        "checkpoint.pt.tmp4242": half,
        "losses.csv.tmp4243": b"step,epoch,loss_d\n1,1,0.",
        "config.json.tmp1": b'{"seed": ',
        "samples/epoch_003.png.tmp99999": b"\x89PNG\r\n",
        "samples/step_0000004.png.tmp17": b"",
    }
    for name, data in stale.items():
        (out / name).write_bytes(data)
    (out / "notes.tmp").write_text("the user's, not ours")
    run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS + 2)
    assert not list(out.rglob("*.tmp[0-9]*"))
    assert (out / "notes.tmp").read_text() == "the user's, not ours"
    check_run(out, size, nc, steps=FAULT_STEPS + 2)


# ----------------------------------------------------------------------------------------------------------------
# dcgan_mnist.py


@slow
def test_compile_trains_and_checkpoints_the_plain_modules(tmp_path):
    import dcgan_mnist

    run("dcgan_mnist.py", *tiny("dcgan_mnist.py", tmp_path / "run", "--max-steps", 3, "--compile"))
    ck = check_run(tmp_path / "run", 28, 1, steps=3)  # no "_orig_mod." keys: saved from the uncompiled modules
    assert ck["args"]["compile"] is True and not any("_orig_mod" in k for k in ck["discriminator"])
    dcgan_mnist.load_generator(tmp_path / "run" / "checkpoint.pt")  # --generate's plain Generator reads it (strict)


def test_mnist_offline_download_fails_cleanly(tmp_path, monkeypatch):
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    p = run("dcgan_mnist.py", "--data", tmp_path / "data", "--out", tmp_path / "run", ok=2, env=env)
    assert_one_line_error(p, "MNIST/raw", "train-images-idx3-ubyte.gz", "ossci-datasets")
    assert re.search(r"\(tried https?://\S+/, got: <urlopen error [^<>]+>\)\. Download", p.stderr), p.stderr  # whole
    for name, value in env.items():  # the second one in this process: refused before any model
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    p = call("dcgan_mnist.py", "--dataset", "fashion-mnist", "--data", tmp_path / "data", ok=2)
    assert_one_line_error(p, "FashionMNIST/raw")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs" / "fashion-mnist28").exists()


def test_mnist_synthetic_is_deterministic_digits():
    import dcgan_mnist

    a, b = dcgan_mnist.synthetic_digits(500), dcgan_mnist.synthetic_digits(500)
    assert a.dtype == torch.uint8 and a.shape == (500, 1, 28, 28) and torch.equal(a, b)
    ink = (a > 127).float().mean((1, 2, 3))
    assert 0.05 < ink.mean() < 0.4 and ink.min() > 0.01  # every image has a glyph on a dark background


def generated(script, run_dir, n):
    """--generate n from the run in run_dir -> (n, channels, size, size) floats in [0, 1], as written. Nothing trains:
    in this process (the same main(), as test_generate_interpolate_summary_benchmark runs it for real)."""
    call(script, "--out", run_dir, "--generate", n)
    files = sorted(Path(run_dir, "generated").glob("0*.png"))
    images = np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def learning_runs(script, tmp_path, flags, steps, n):
    """A run of `steps` steps and an untrained one (--dry-run) with the same flags -> their --generate n images. The
    run under test as a user starts it; the untrained reference (one step) in this process."""
    call(script, *flags, "--dry-run", "--out", tmp_path / "untrained")
    run(script, *flags, "--max-steps", steps, "--out", tmp_path / "trained")
    return generated(script, tmp_path / "untrained", n), generated(script, tmp_path / "trained", n)


def correlations(images, templates):
    """Normalised correlation (Pearson's r) of every image with every template, flattened: (images, templates)."""

    def unit(x):
        x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    return unit(images) @ unit(templates).T


def digit_templates():
    """The glyphs of dcgan_mnist.synthetic_digits (Pillow's default font, 40 px on 56 x 56, strokes 0 to 2) under a
    grid of the jitter it draws from (rotation, scale, shift), 28 x 28 -> (templates, 784) floats, and their digits."""
    from PIL import ImageDraw, ImageFont

    font, glyphs = ImageFont.load_default(size=40), []
    for digit, stroke in itertools.product(range(10), (0, 1, 2)):
        im = Image.new("L", (56, 56))
        ImageDraw.Draw(im).text((28, 28), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke,
                                stroke_fill=255)  # fmt: skip
        glyphs.append(np.asarray(im))
    glyphs = torch.from_numpy(np.stack(glyphs)).float().div(255).unsqueeze(1)
    templates = []
    for angle, scale, dx, dy in itertools.product((-0.25, -0.1, 0.1, 0.25), (0.9, 1.1), *[(-0.1, 0, 0.1)] * 2):
        cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
        theta = torch.tensor([[cos, -sin, dx], [sin, cos, dy]]).expand(len(glyphs), 2, 3)
        grid = torch.nn.functional.affine_grid(theta, [len(glyphs), 1, 28, 28], align_corners=False)
        templates.append(torch.nn.functional.grid_sample(glyphs, grid, align_corners=False).flatten(1))
    return torch.stack(templates, 1).flatten(0, 1).numpy(), np.arange(10).repeat(len(templates) * 3)


@slow
def test_mnist_learns_the_synthetic_digits(tmp_path):
    """Each of 500 generated digits is matched against the data set's own glyphs (every digit and stroke under a grid
    of its jitter) by normalised correlation: its best r says how much it looks like a digit, the template that gives
    it which one. The data set's own digits score a median of 0.90 (1% of them below 0.76); an untrained G's blurs
    0.08 to 0.11, none above 0.6. After 200 steps at the default sizes (30 s on one core), seeds 0, 1 and 2 gave
    medians of 0.72, 0.73 and 0.74, with all ten digits among the samples above 0.6 (the rarest 3.2% to 5% of them):
    G must reach 0.6 with at least 9 digits that each make 1% of its samples, the untrained G stay below 0.3 with no
    sample above 0.6."""
    templates, digit = digit_templates()
    flags = ["--dataset", "synthetic", "--amp", "off", "--seed", 0]  # default sizes, batch and learning rates
    for images, trained in zip(learning_runs("dcgan_mnist.py", tmp_path, flags, 200, 500), (False, True)):
        r = correlations(images, templates)
        best, which = r.max(1), digit[r.argmax(1)]
        counts = np.bincount(which[best >= 0.6], minlength=10)
        print(f"trained {trained}: median best r {np.median(best):.3f}, digits above 0.6: {counts.tolist()}")
        if trained:
            assert np.median(best) >= 0.6 and (counts >= 0.01 * len(images)).sum() >= 9, (np.median(best), counts)
        else:
            assert np.median(best) < 0.3 and counts.sum() == 0, (np.median(best), counts)


# ----------------------------------------------------------------------------------------------------------------
# The image data section of dcgan_celeba.py (dcgan_hires.py holds the same code): unit tests on generated files


def make_image_zoo(folder):
    """Write, in nested subfolders of `folder`, one file of every kind the loader must read (odd-sized JPEG and PNG,
    gray 8 and 16 bit, gray+alpha, RGBA, palette with transparency, CMYK JPEG, BMP, WebP) and three it must skip
    (truncated JPEG, zero-byte .jpg, text named .jpg), plus files it must ignore. Returns (readable, unreadable):
    sorted relative names."""
    rng = np.random.default_rng(0)

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgba = np.concatenate([rng.integers(0, 256, (40, 60, 3)), np.full((40, 60, 1), 255)], 2).astype(np.uint8)
    rgba[:, :30, 3] = 0  # left half fully transparent: must come out white
    palette = rgb(50, 50).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    images = {
        "a/face_178x218.jpg": (rgb(178, 218), {"quality": 90}),
        "a/b/odd_97x131.JPEG": (rgb(97, 131), {"format": "JPEG"}),
        "a/b/wide_300x200.png": (rgb(300, 200), {}),
        "gray/l.png": (rgb(64, 48).convert("L"), {}),
        "gray/i16.png": (Image.fromarray(np.full((33, 47), 65535 // 2, np.uint16)), {}),
        "gray/la.png": (rgb(40, 40).convert("LA"), {}),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), {}),
        "palette.png": (palette, {}),
        "c/cmyk.jpg": (Image.new("CMYK", (70, 90), (255, 0, 0, 0)), {}),  # pure cyan
        "c/d/img.bmp": (rgb(45, 61), {}),
        "c/d/img.webp": (rgb(80, 60), {"quality": 90}),
    }
    for name, (img, kw) in images.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        img.save(os.path.join(folder, name), **kw)
    with open(os.path.join(folder, "a/face_178x218.jpg"), "rb") as f:
        jpeg = f.read()
    os.makedirs(os.path.join(folder, "broken"), exist_ok=True)
    broken = {"broken/truncated.jpg": jpeg[: len(jpeg) // 2], "broken/empty.jpg": b"", "broken/text.jpg": b"hello\n"}
    ignored = {".hidden.jpg": jpeg, "a/._face_178x218.jpg": b"AppleDouble", "notes.txt": b"not an image"}
    for name, data in {**broken, **ignored}.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return sorted(images), sorted(broken)


def make_zip(folder, zip_path):
    """Zip `folder` (members relative to it), plus the macOS junk a zip made on a Mac holds."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
            if os.path.isfile(path):
                zf.write(path, os.path.relpath(path, folder))
        zf.writestr("__MACOSX/a/._face_178x218.jpg", b"resource fork")
    return zip_path


def make_args(data, **kw):
    kw = {"data": str(data), "size": 32, "crop": None, "max_images": None, "cache_dir": None, "workers": 1, **kw}
    return SimpleNamespace(
        **{"dataset": "celeba", "download": False, "seed": 0, "batch_size": 4, "data_memory": None, **kw}
    )


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo") / "zoo"
    good, bad = make_image_zoo(str(folder))
    return folder, good, bad


def fresh_zoo(zoo, tmp_path):
    folder = tmp_path / "faces"
    shutil.copytree(zoo[0], folder)
    return folder


def caches(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.npy*")))


def test_folder_nested_folder_zip_and_celeba_roots_agree(zoo, tmp_path, capsys):
    folder, good, _ = zoo
    reference = np.array(d.load_dataset(make_args(folder, cache_dir=str(tmp_path / "c0"))))
    assert reference.shape == (len(good), 3, 32, 32) and reference.dtype == np.uint8
    zipped = make_zip(folder, tmp_path / "zoo.zip")
    root = tmp_path / "root"  # torchvision's CelebA layout, unpacked...
    shutil.copytree(folder, root / "celeba" / "img_align_celeba")
    zip_root = tmp_path / "zip_root"  # ...and as downloaded, before unpacking
    os.makedirs(zip_root / "celeba")
    shutil.copy(zipped, zip_root / "celeba" / "img_align_celeba.zip")
    for i, source in enumerate([zipped, root, zip_root]):
        data = d.load_dataset(make_args(source, cache_dir=str(tmp_path / f"c{i + 1}"), workers=2))
        np.testing.assert_array_equal(data, reference)
    assert "data: 11 images from" in capsys.readouterr().out


def test_every_mode_becomes_rgb_at_the_right_size(zoo):
    folder, good, _ = zoo
    for name in good:
        x = d.decode_image(os.path.join(folder, name), 24)
        assert x.shape == (3, 24, 24) and x.dtype == np.uint8, name
    assert (d.decode_image(os.path.join(folder, "rgba.png"), 24)[:, :, :8] == 255).all()  # transparent -> white
    assert abs(int(d.decode_image(os.path.join(folder, "gray/i16.png"), 24).mean()) - 127) <= 1  # scaled, not clipped
    cyan = d.decode_image(os.path.join(folder, "c/cmyk.jpg"), 24).reshape(3, -1).mean(1)
    assert cyan[0] < 20 and cyan[1] > 235 and cyan[2] > 235


def test_jpeg_draft_matches_full_decode(zoo):
    path = os.path.join(zoo[0], "a/face_178x218.jpg")  # draft decodes at 1/2 scale for 32 px
    img = Image.open(path).convert("RGB")
    y0 = (218 - 178) / 2
    full = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC, (0, y0, 178, y0 + 178))).transpose(2, 0, 1)
    assert np.abs(d.decode_image(path, 32).astype(int) - full).mean() < 6  # noise image: the hardest case


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_exif_orientation_turns_phone_photos_upright(tmp_path, orientation):
    """Phones store a portrait photo sideways with an EXIF Orientation tag: 6, turn it 90 degrees clockwise to see it
    upright; 8, counter-clockwise. Stored here: 400 x 240, red left half, blue right half (as a JPEG, decoded at 1/4
    scale for 32 px). Upright, the red half is on top (6), at the bottom (8), or stays left (1, no turn)."""
    stored = np.zeros((240, 400, 3), np.uint8)
    stored[:, :200] = (255, 0, 0)
    stored[:, 200:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation  # the Orientation tag
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    for ext in ("jpg", "png"):
        img.save(tmp_path / f"photo.{ext}", exif=exif.tobytes(), quality=95)
        x = d.decode_image(tmp_path / f"photo.{ext}", 32).astype(int)  # (3, 32, 32): channel, row, column
        halves = {"top": x[:, :12], "bottom": x[:, -12:], "left": x[:, :, :12], "right": x[:, :, -12:]}
        colour = {name: half.mean((1, 2)) for name, half in halves.items()}
        first, second = {1: ("left", "right"), 6: ("top", "bottom"), 8: ("bottom", "top")}[orientation]
        assert np.abs(colour[first] - red).max() < 30 and np.abs(colour[second] - blue).max() < 30, (ext, colour)


def test_unreadable_files_skipped_counted_and_named(zoo, tmp_path, capsys):
    d.load_dataset(make_args(zoo[0], cache_dir=str(tmp_path)))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "skipped 3 unreadable" in warnings[0]
    assert all(name in warnings[0] for name in zoo[2])


def test_no_readable_image_is_an_error(zoo, tmp_path, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(zoo[0] / "broken", folder)
    with pytest.raises(SystemExit) as e:
        d.load_dataset(make_args(folder))
    assert e.value.code == 2 and "none of the 3 image files" in capsys.readouterr().err
    assert caches(tmp_path) == []


@pytest.mark.parametrize("dataset", ["celeba", "celeba-hq"])
def test_missing_data_says_where_and_how(tmp_path, capsys, dataset):
    import dcgan_hires as h

    script = d if dataset == "celeba" else h  # celeba-hq: dcgan_hires.py's
    for download in (False, True):
        with pytest.raises(SystemExit) as e:
            script.load_dataset(make_args(tmp_path / "nowhere", dataset=dataset, download=download))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error:") == 1 and "nowhere" in err and "--data" in err
        assert ("jessicali9530/celeba-dataset" if dataset == "celeba" else "lamsimon/celebahq") in err


def test_download_failure_is_one_message(tmp_path, capsys, monkeypatch):
    def offline(*a, **kw):
        raise RuntimeError("Google Drive quota exceeded")

    monkeypatch.setattr(d.torchvision.datasets, "CelebA", offline)
    with pytest.raises(SystemExit) as e:
        d.load_dataset(make_args(tmp_path / "celeba", download=True))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "quota" in err and "jessicali9530/celeba-dataset" in err


def test_download_success_is_then_read_from_the_folder(zoo, tmp_path, monkeypatch):
    def fake_celeba(root, split, download):  # what torchvision leaves behind
        shutil.copytree(zoo[0], os.path.join(root, "celeba", "img_align_celeba"))

    monkeypatch.setattr(d.torchvision.datasets, "CelebA", fake_celeba)
    assert len(d.load_dataset(make_args(tmp_path / "celeba", download=True))) == len(zoo[1])


def test_cifar10(tmp_path, capsys, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(d.torchvision.datasets, "CIFAR10", lambda *a, **kw: SimpleNamespace(data=pixels))
    data = d.load_dataset(make_args(tmp_path, dataset="cifar10", max_images=7))
    assert data.shape == (7, 3, 32, 32) and torch.equal(data.permute(0, 2, 3, 1), torch.from_numpy(pixels[:7]))

    def offline(*a, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(d.torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        d.load_dataset(make_args(tmp_path, dataset="cifar10"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and os.path.join(str(tmp_path), "cifar-10-batches-py") in err and "cs.toronto" in err


def test_a_zip_that_is_not_a_zip(tmp_path, capsys):
    (tmp_path / "faces.zip").write_text("not a zip")
    with pytest.raises(SystemExit) as e:
        d.load_dataset(make_args(tmp_path / "faces.zip"))
    assert e.value.code == 2 and "not a readable zip" in capsys.readouterr().err


def test_cache_reused_without_decoding(zoo, tmp_path, capsys, monkeypatch):
    folder = fresh_zoo(zoo, tmp_path)
    first = np.array(d.load_dataset(make_args(folder)))
    assert "built" in capsys.readouterr().out
    monkeypatch.setattr(d, "decode_image", None)  # any decoding now would fail
    again = d.load_dataset(make_args(folder))
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(again, first)
    out = capsys.readouterr().out
    assert "reused" in out and f"cache {d.show(str(tmp_path))}" in out


def test_cache_rebuilt_when_the_source_changes(zoo, tmp_path):
    folder = fresh_zoo(zoo, tmp_path)
    n = len(d.load_dataset(make_args(folder)))
    before = caches(tmp_path)
    shutil.copy(folder / "a/face_178x218.jpg", folder / "a/new.jpg")
    assert len(d.load_dataset(make_args(folder))) == n + 1
    after_add = caches(tmp_path)
    assert len(after_add) == 2 and set(after_add).isdisjoint(before)  # the stale cache and its sidecar are gone
    os.utime(folder / "a/new.jpg", ns=(1, 1))
    d.load_dataset(make_args(folder))
    assert set(caches(tmp_path)).isdisjoint(after_add)
    os.remove(folder / "a/new.jpg")
    assert len(d.load_dataset(make_args(folder))) == n
    assert caches(tmp_path) == before  # same source again: same fingerprint


@pytest.mark.parametrize("damage", ["truncate", "edit", "header", "sidecar"])
def test_damaged_cache_is_rebuilt(zoo, tmp_path, capsys, damage):
    folder = fresh_zoo(zoo, tmp_path)
    first = np.array(d.load_dataset(make_args(folder)))
    (path,) = glob.glob(str(tmp_path / "*.u8.npy"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(size - 100)
        elif damage == "edit":
            f.seek(size - 7)
            f.write(b"\x00\x01\x02")
        elif damage == "header":
            f.write(b"garbage")
    if damage == "sidecar":
        os.remove(path + ".json")
    capsys.readouterr()
    np.testing.assert_array_equal(d.load_dataset(make_args(folder)), first)
    assert "rebuilt, the old one was damaged" in capsys.readouterr().out


def failing_chunk(names):  # module level: the workers find it by name
    raise RuntimeError("disk on fire")


def interrupted_chunk(names, decode_chunk=d.decode_chunk):
    if any(name.startswith("c/") for name in names):  # a later chunk: the first ones are decoded and written
        raise KeyboardInterrupt  # as by Ctrl-C
    return decode_chunk(names)


@pytest.mark.parametrize("failure", [failing_chunk, interrupted_chunk])
def test_worker_failure_or_interrupted_build_leaves_no_cache(zoo, tmp_path, monkeypatch, failure):
    folder = fresh_zoo(zoo, tmp_path)
    monkeypatch.setattr(d, "decode_chunk", failure)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        d.load_dataset(make_args(folder, workers=2, size=256))
    assert caches(tmp_path) == []


def test_full_disk_while_caching_is_one_line_and_leaves_no_cache(zoo, tmp_path):
    folder = fresh_zoo(zoo, tmp_path)
    p = run("dcgan_celeba.py", "--data", folder, "--out", tmp_path / "run", "--dry-run", "--workers", 2, ok=1,
            preexec_fn=fault_small_disk(20_000))  # fmt: skip
    assert_one_line_error(p, "could not write the cache", "--cache-dir")
    assert caches(tmp_path) == [] and not list(tmp_path.glob("*.tmp-*")) and not (tmp_path / "run").exists()


def test_stale_temporaries_removed_live_ones_kept(zoo, tmp_path):
    folder = fresh_zoo(zoo, tmp_path)
    dead, live = (tmp_path / f"faces.32px.0badc0de.u8.npy.tmp-{pid}" for pid in (999999999, os.getpid()))
    for path in (dead, live):  # the cache and its sidecar, as a build writes them
        path.write_bytes(b"being written")
        path.with_name(path.name + ".json").write_bytes(b"{")
    d.load_dataset(make_args(folder))
    assert not dead.exists() and not os.path.exists(f"{dead}.json") and live.exists() and os.path.exists(f"{live}.json")


def test_cache_folder_falls_back_when_not_writable(zoo, tmp_path, monkeypatch, capsys):
    folder = fresh_zoo(zoo, tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    d.load_dataset(make_args(folder, cache_dir=str(tmp_path / "ro")))
    assert len(caches(tmp_path / "home" / ".cache" / "dcgan")) == 2 and "not writable" in capsys.readouterr().out


def test_max_images_and_crop(zoo, tmp_path):
    folder = fresh_zoo(zoo, tmp_path)
    full = d.load_dataset(make_args(folder))
    np.testing.assert_array_equal(d.load_dataset(make_args(folder, max_images=3)), full[:3])
    target = np.zeros((240, 200, 3), np.uint8)
    target[..., 2] = 255
    target[70:170, 50:150] = (255, 0, 0)  # a centred 100 x 100 red square on blue
    for ext in ("png", "jpg"):  # the JPEG is drafted at 1/2 scale: the crop must follow it
        Image.fromarray(target).save(tmp_path / f"target.{ext}", quality=95)
        x = d.decode_image(tmp_path / f"target.{ext}", 32, crop=100).astype(int)
        assert (x[0] > 200).all() and (x[2] < 60).all(), ext
        x = d.decode_image(tmp_path / f"target.{ext}", 32, crop=140).astype(int)
        assert x[0, 16, 16] > 200 and x[2, 1, 1] > 200, ext


def test_synthetic_faces(monkeypatch):
    args = make_args(None, dataset="synthetic", size=64, max_images=64)
    a, b = d.load_dataset(args), d.load_dataset(make_args(None, dataset="synthetic", size=64, max_images=64, seed=9))
    assert a.shape == (64, 3, 64, 64) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(d.synthetic_faces(8, 32), d.synthetic_faces(100, 32)[:8])
    per_image = a.float().flatten(1)
    assert (per_image.std(1) > 20).all() and torch.cdist(per_image, per_image).add(torch.eye(64) * 1e9).min() > 100
    counts = {}
    monkeypatch.setattr(d, "synthetic_faces", lambda n, size: counts.setdefault(size, n) and torch.zeros(n, 3, 1, 1))
    for size in (32, 64, 128, 256):
        d.load_dataset(make_args(None, dataset="synthetic", size=size))
    assert counts == {32: 4096, 64: 4096, 128: 2048, 256: 1024}


def numbered(n, size=8):
    """n images whose first two pixels hold their own index."""
    data = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data[:, 0, 0, 0], data[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    return data


def ids(batch):
    return (batch[:, 0, 0, 0].long() + 256 * batch[:, 0, 0, 1].long()).tolist()


@pytest.fixture
def on_disk(tmp_path):
    data = numbered(1003)
    np.save(tmp_path / "data.npy", data.numpy())
    return data, np.load(tmp_path / "data.npy", mmap_mode="r")


def test_batch_source_order_resume_and_paths(on_disk, capsys):
    """The same batches from the cache's memory map and from an array in memory: each image at most once per epoch,
    the order a function of (seed, epoch) alone, a batch's images in index order, an epoch resumed mid-way exact."""
    data, mm = on_disk
    disk = d.BatchSource(mm, make_args(None, batch_size=10, seed=3), "cpu")
    assert "batches: gathered from the cache file" in capsys.readouterr().out and len(disk) == 100
    ram = d.BatchSource(data, make_args(None, batch_size=10, seed=3, data_memory=0), "cpu")
    assert "batches: gathered from host memory" in capsys.readouterr().out and len(disk.data) == len(ram.data) == 1003
    for epoch in (0, 1):
        batches = list(disk.epoch(epoch))  # kept all at once: each batch is its own tensor
        seen = [i for b in batches for i in ids(b)]
        assert len(batches) == 100 and all(b.shape == (10, 3, 8, 8) and b.dtype == torch.uint8 for b in batches)
        assert len(set(seen)) == 1000 and set(seen) <= set(range(1003))  # each image at most once, 3 dropped
        order = torch.randperm(1003, generator=torch.Generator().manual_seed(3 * 100003 + epoch))[:1000]
        assert seen == order.view(100, 10).sort(dim=1).values.flatten().tolist()
        assert all(torch.equal(b, data[ids(b)]) for b in batches)
        assert all(torch.equal(x, y) for x, y in zip(batches, ram.epoch(epoch), strict=True))
        for source in (ram, disk):
            assert all(torch.equal(x, y) for x, y in zip(batches[37:], source.epoch(epoch, start=37), strict=True))
    assert list(disk.epoch(0, start=100)) == []
    assert all(torch.equal(x, y) for x, y in zip(disk.epoch(2), disk.epoch(2), strict=True))  # two at once


def test_batch_source_keeps_the_cache_it_opened(zoo, tmp_path):
    """A run reads the cache it opened to its end, even when another run deletes that file (its source changed) or
    renames a new one over it (it found the file damaged) meanwhile."""
    folder = fresh_zoo(zoo, tmp_path)
    data = d.load_dataset(make_args(folder))
    source = d.BatchSource(data, make_args(None, batch_size=4), "cpu")
    first = list(source.epoch(0))
    shutil.copy(folder / "a/face_178x218.jpg", folder / "a/new.jpg")
    assert len(d.load_dataset(make_args(folder))) == len(data) + 1  # another run: a new cache, this one deleted
    assert not os.path.exists(data.filename)
    assert all(torch.equal(x, y) for x, y in zip(first, source.epoch(0), strict=True))
    assert len(list(source.epoch(1))) == len(source)
    numbers = numbered(100)
    np.save(tmp_path / "data.npy", numbers.numpy())
    source = d.BatchSource(np.load(tmp_path / "data.npy", mmap_mode="r"), make_args(None, batch_size=10), "cpu")
    assert all(torch.equal(b, numbers[ids(b)]) for b in source.epoch(0))
    np.save(tmp_path / "new.npy", np.zeros_like(numbers.numpy()))
    os.replace(tmp_path / "new.npy", tmp_path / "data.npy")  # as a rebuild does
    assert all(torch.equal(b, numbers[ids(b)]) for epoch in (0, 1) for b in source.epoch(epoch))


def test_batch_source_refuses_fewer_images_than_a_batch(capsys):
    with pytest.raises(SystemExit):
        d.BatchSource(numbered(3), make_args(None, batch_size=4), "cpu")
    assert "fewer than --batch-size 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# make_gif.py and plot_losses.py, on hand-made run directories and on a real one

GRID_SIZE = 8  # images of 8x8 px -> 82x82 px grids
HEADER = "step,epoch,loss_d,loss_g,d_real,d_fake"


helper_run = partial(run, ok=False, timeout=120)  # a helper script; the caller checks the exit code


def cell_value(seed, i):
    """The flat gray level of cell i in grid number seed: distinct per cell and per grid."""
    return (37 * seed + 3 * i) % 200 + 40


def grid(seed, mode="RGB", size=GRID_SIZE, rows=8):
    """An 8-per-row grid whose cells are flat, distinct gray levels on a black border."""
    arr = np.zeros((rows * (size + 2) + 2, 8 * (size + 2) + 2), np.uint8)
    for i in range(8 * rows):
        y, x = 2 + (i // 8) * (size + 2), 2 + (i % 8) * (size + 2)
        arr[y : y + size, x : x + size] = cell_value(seed, i)
    return Image.fromarray(arr).convert(mode)


def make_run(root, epochs=3, mode="RGB", steps=()):
    samples = root / "samples"
    samples.mkdir(parents=True)
    grid(99, mode).save(samples / "real.png")
    for e in range(1, epochs + 1):
        grid(e, mode).save(samples / f"epoch_{e:03d}.png")
    for s in steps:
        grid(s, mode).save(samples / f"step_{s:07d}.png")
    return root


def losses_csv(path, epochs=4, steps_per_epoch=25, extra="", tail=""):
    rng = np.random.default_rng(0)
    lines = [HEADER + extra]
    for step in range(1, epochs * steps_per_epoch + 1):
        d = rng.uniform(0.3, 0.7, 4)
        row = f"{step},{(step - 1) // steps_per_epoch + 1},{d[0] * 2:.4f},{d[1] * 4:.4f},{d[2]:.4f},{d[3]:.4f}"
        lines.append(row + (",0.0002,1.5" if extra else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def gif_frames(path):
    """[(size, duration ms, gray level of the first cell)] for each frame, and the loop count."""
    with Image.open(path) as im:
        frames = []
        for k in range(im.n_frames):
            im.seek(k)
            frames.append((im.size, im.info["duration"], im.convert("L").getpixel((3, 3))))
        return frames, im.info.get("loop")


def assert_clean_error(p, *words):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for word in words:
        assert word in p.stderr


# make_gif.py


def test_gif_epochs_in_order_with_durations(tmp_path):
    make_run(tmp_path / "r", epochs=3)
    p = helper_run("make_gif.py", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "r" / "training.gif"
    assert p.stdout.strip() == f"wrote {out}: 3 frames, 82x82"
    frames, loop = gif_frames(out)
    assert [f[0] for f in frames] == [(82, 82)] * 3
    assert [f[1] for f in frames] == [500, 500, 2000]  # --fps 2, --hold-last 2 (real.png is not a frame)
    assert [f[2] for f in frames] == [cell_value(e, 0) for e in (1, 2, 3)]
    assert loop == 0


def test_gif_fps_loop_many_frames_numeric_order(tmp_path):
    run_dir = make_run(tmp_path / "r", epochs=0)
    for e in (1, 2, 10, 30, 9, 100, 3) + tuple(range(11, 30)) + (4, 5, 6, 7, 8):
        grid(e).save(run_dir / "samples" / f"epoch_{e}.png")  # unpadded numbers: numeric, not lexical order
    p = helper_run("make_gif.py", run_dir, "--fps", 4, "--hold-last", 0, "--loop", 3)
    assert p.returncode == 0, p.stderr
    frames, loop = gif_frames(run_dir / "training.gif")
    assert len(frames) == 31 and loop == 3
    assert {f[1] for f in frames} == {250}
    assert [f[2] for f in frames] == [cell_value(e, 0) for e in list(range(1, 31)) + [100]]


def test_gif_one_frame(tmp_path):
    make_run(tmp_path / "r", epochs=1)
    p = helper_run("make_gif.py", tmp_path / "r", "--out", tmp_path / "one.gif")
    assert p.returncode == 0, p.stderr
    frames, _ = gif_frames(tmp_path / "one.gif")
    assert len(frames) == 1 and frames[0][0] == (82, 82)


def test_gif_gray_first_16(tmp_path):
    make_run(tmp_path / "r", epochs=2, mode="L")
    p = helper_run("make_gif.py", tmp_path / "r", "--first", 16)
    assert p.returncode == 0, p.stderr
    with Image.open(tmp_path / "r" / "training.gif") as im:
        assert im.n_frames == 2 and im.size == (4 * (GRID_SIZE + 2) + 2,) * 2  # a 4x4 grid
        im.seek(1)
        gray = im.convert("L")
    for i in range(16):  # cell i of the source lands at row i // 4, column i % 4
        assert gray.getpixel((3 + (i % 4) * (GRID_SIZE + 2), 3 + (i // 4) * (GRID_SIZE + 2))) == cell_value(2, i)
    assert gray.getpixel((1, 1)) == 0  # the padding keeps the border colour


def test_gif_label_and_max_size(tmp_path):
    make_run(tmp_path / "r", epochs=2, steps=(500, 1000))
    plain = helper_run("make_gif.py", tmp_path / "r", "--out", tmp_path / "plain.gif")
    labelled = helper_run("make_gif.py", tmp_path / "r", "--label", "--out", tmp_path / "label.gif")
    small = helper_run("make_gif.py", tmp_path / "r", "--max-size", 41, "--out", tmp_path / "small.gif")
    small_label = helper_run("make_gif.py", tmp_path / "r", "--max-size", 60, "--label", "--out", tmp_path / "sl.gif")
    for p in (plain, labelled, small, small_label):
        assert p.returncode == 0, p.stderr
    with Image.open(tmp_path / "plain.gif") as a, Image.open(tmp_path / "label.gif") as b:
        a, b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    band = b.shape[0] - a.shape[0]
    assert b.shape[1] == a.shape[1] and band > 8  # a band above the grid...
    assert b[:band].max() > 200  # ...with white text on it (quantised to the GIF palette)
    assert np.array_equal(b[band:], a)  # the grid itself untouched
    assert Image.open(tmp_path / "small.gif").size == (41, 41)
    assert max(Image.open(tmp_path / "sl.gif").size) <= 60


def test_gif_steps_and_glob_and_files(tmp_path):
    samples = make_run(tmp_path / "r", epochs=3, steps=(500, 1000, 1500, 2000)) / "samples"
    p = helper_run("make_gif.py", tmp_path / "r", "--steps")
    assert p.returncode == 0, p.stderr
    assert [f[2] for f in gif_frames(tmp_path / "r" / "training_steps.gif")[0]] == [
        cell_value(s, 0) for s in (500, 1000, 1500, 2000)
    ]
    p = helper_run("make_gif.py", samples / "epoch_00[23].png", "--out", tmp_path / "glob.gif")  # pattern, not expanded
    assert p.returncode == 0, p.stderr
    assert [f[2] for f in gif_frames(tmp_path / "glob.gif")[0]] == [cell_value(2, 0), cell_value(3, 0)]
    p = helper_run(
        "make_gif.py", samples / "epoch_003.png", samples / "epoch_001.png"
    )  # explicit files keep their order
    assert p.returncode == 0, p.stderr
    assert [f[2] for f in gif_frames(tmp_path / "r" / "training.gif")[0]] == [cell_value(3, 0), cell_value(1, 0)]


def test_gif_mismatched_sizes(tmp_path):
    run_dir = make_run(tmp_path / "r", epochs=3)
    grid(4, size=GRID_SIZE + 2).save(run_dir / "samples" / "epoch_004.png")
    p = helper_run("make_gif.py", run_dir)
    assert_clean_error(p, "epoch_004.png", "98x98", "82x82")
    assert not (run_dir / "training.gif").exists()


def test_gif_no_samples_and_missing_input(tmp_path):
    (tmp_path / "empty" / "samples").mkdir(parents=True)
    assert_clean_error(helper_run("make_gif.py", tmp_path / "empty"), "no samples found", "epoch_*.png")
    assert_clean_error(helper_run("make_gif.py", tmp_path / "nowhere"), "nowhere")


def test_gif_mp4_without_ffmpeg(tmp_path):
    try:
        import imageio_ffmpeg  # noqa: F401

        pytest.skip("imageio-ffmpeg is installed")
    except ImportError:
        pass
    make_run(tmp_path / "r", epochs=2)
    p = helper_run("make_gif.py", tmp_path / "r", "--out", tmp_path / "train.mp4")
    assert_clean_error(p, "pip install imageio-ffmpeg")
    assert not (tmp_path / "train.mp4").exists()


# plot_losses.py


def final_line(stdout, name):
    return next(line for line in stdout.splitlines() if line.startswith(f"{name}: step"))


def test_plot_single_run_size_and_summary(tmp_path):
    losses_csv(tmp_path / "r" / "losses.csv")
    p = helper_run("plot_losses.py", tmp_path / "r", "--dpi", 50, "--size", 6, 4)
    assert p.returncode == 0, p.stderr
    with Image.open(tmp_path / "r" / "losses.png") as im:
        assert im.size == (300, 200)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # something was drawn
    words = final_line(p.stdout, str(tmp_path / "r")).split()
    assert words[1:3] == ["step", "100"] and words[3::2] == ["loss_d", "loss_g", "d_real", "d_fake"]
    assert 0.3 < float(words[8]) < 0.7  # smoothed d_real stays inside the range of its raw values


def test_plot_two_runs_and_default_out(tmp_path):
    a, b = losses_csv(tmp_path / "a" / "losses.csv"), losses_csv(tmp_path / "b" / "losses.csv", epochs=2)
    p = helper_run("plot_losses.py", a.parent, b, cwd=tmp_path)  # several runs: losses.png in the current directory
    assert p.returncode == 0, p.stderr
    assert "step 100 " in final_line(p.stdout, str(a.parent)) and "step 50 " in final_line(p.stdout, str(b.parent))
    assert Image.open(tmp_path / "losses.png").size == (1000, 700)


def test_plot_header_only(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "losses.csv").write_text(HEADER + "\n")
    assert_clean_error(helper_run("plot_losses.py", tmp_path / "empty"), "no rows yet")
    losses_csv(tmp_path / "good" / "losses.csv")
    p = helper_run("plot_losses.py", tmp_path / "empty", tmp_path / "good", "--out", tmp_path / "both.png")
    assert p.returncode == 0 and "no rows yet" in p.stderr and "Traceback" not in p.stderr
    assert len([line for line in p.stdout.splitlines() if ": step " in line]) == 1
    assert (tmp_path / "both.png").exists()


def test_plot_missing_file(tmp_path):
    assert_clean_error(helper_run("plot_losses.py", tmp_path / "nowhere"), "nowhere")
    assert_clean_error(helper_run("plot_losses.py", tmp_path / "nowhere.csv"), "nowhere.csv")


@pytest.mark.parametrize("tail", ["101,5,0.5\n", "101,5,0.5,1.2,0.6,0.4"])  # missing columns / no newline: cut
def test_plot_truncated_last_line(tmp_path, tail):
    path = losses_csv(tmp_path / "r" / "losses.csv", tail=tail)
    p = helper_run("plot_losses.py", path, "--out", tmp_path / "t.png")
    assert p.returncode == 0, p.stderr
    assert "warning" in p.stderr and "truncated last line 102" in p.stderr and "Traceback" not in p.stderr
    assert "step 100 " in final_line(p.stdout, str(tmp_path / "r"))


def test_plot_extra_columns_epoch_axis_log_no_smoothing(tmp_path):
    path = losses_csv(tmp_path / "r" / "losses.csv", extra=",lr,grad_norm")
    p = helper_run("plot_losses.py", path, "--x", "epoch", "--log", "--smooth", 0, "--out", tmp_path / "e.png")
    assert p.returncode == 0, p.stderr
    last_row = path.read_text().splitlines()[-1].split(",")
    words = final_line(p.stdout, str(tmp_path / "r")).split()
    assert [float(w) for w in words[4::2]] == pytest.approx([float(v) for v in last_row[2:6]], rel=1e-2)
    assert Image.open(tmp_path / "e.png").size == (1000, 700)


def test_plot_epoch_axis_and_smoothing_in_process():
    sys.path.insert(0, str(ROOT))
    import plot_losses

    step = np.arange(1.0, 26.0)
    epoch = np.repeat([1.0, 2.0, 3.0], [10, 10, 5])  # the last epoch is half done
    x = plot_losses.epoch_x(step, epoch)
    assert x[0] == pytest.approx(0.1) and x[9] == pytest.approx(1.0) and x[-1] == pytest.approx(2.5)
    assert np.all(np.diff(x) > 0)
    raw = np.array([1.0, 3.0, np.nan, 3.0])
    assert plot_losses.ema(raw, 0) is raw
    assert plot_losses.ema(raw, 0.9)[0] == 1.0 and plot_losses.ema(np.full(5, 2.0), 0.9) == pytest.approx(2.0)


def test_helpers_on_a_real_run(tmp_path, fault_reference):
    copy_run(fault_reference("dcgan_mnist.py"), tmp_path)  # 5 epochs, a step grid every 10 steps
    epochs = len(list((tmp_path / "run" / "samples").glob("epoch_*.png")))
    p = helper_run("make_gif.py", tmp_path / "run", "--label", "--first", 16)
    assert p.returncode == 0, p.stderr
    gif = Image.open(tmp_path / "run" / "training.gif")
    assert epochs > 1 and gif.n_frames == epochs and gif.size[0] == 4 * 28 + 10
    assert helper_run("make_gif.py", tmp_path / "run", "--steps").returncode == 0
    assert Image.open(tmp_path / "run" / "training_steps.gif").n_frames == len(
        list((tmp_path / "run" / "samples").glob("step_*"))
    )
    p = helper_run("plot_losses.py", tmp_path / "run", "--dpi", 50)
    assert p.returncode == 0, p.stderr
    assert Image.open(tmp_path / "run" / "losses.png").size[0] > 100
    assert f"step {len(rows(tmp_path / 'run'))} loss_d" in p.stdout


# ----------------------------------------------------------------------------------------------------------------
# dcgan_celeba.py on real files, as a user runs it

CELEBA = ["--size", "32", "--batch-size", "4", "--ngf", "8", "--ndf", "8", "--amp", "off", "--workers", "2"]


def check_odd_images_run(p, zoo, run_dir):
    """A --dry-run on the image zoo: every readable file is an image, the unreadable ones skipped in one warning."""
    _, good, bad = zoo
    assert f"data: {len(good)} images" in p.stdout and "built" in p.stdout
    warning = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"skipped {len(bad)} unreadable" in warning[0] and "truncated.jpg" in warning[0]
    check_run(run_dir, 32, 3, steps=1)


# a plain folder: the first run of test_celeba_cache_is_reused_and_rebuilt_when_the_source_changes
@pytest.mark.parametrize("source", ["nested", "zip", "torchvision-root"])
def test_celeba_trains_on_folders_and_zips_of_odd_images(zoo, tmp_path, source):
    folder = zoo[0]
    data = {"nested": tmp_path / "x" / "y" / "zoo", "zip": tmp_path / "img_align_celeba.zip",
            "torchvision-root": tmp_path / "root"}[source]  # fmt: skip
    if source == "nested":
        shutil.copytree(folder, data)
    elif source == "zip":
        make_zip(str(folder), str(data))
    elif source == "torchvision-root":  # what CelebA(root, download=True) leaves before unpacking
        make_zip(str(folder), str(tmp_path / "img_align_celeba.zip"))
        (data / "celeba").mkdir(parents=True)
        shutil.move(tmp_path / "img_align_celeba.zip", data / "celeba" / "img_align_celeba.zip")
    cache = tmp_path / "cache"
    p = run("dcgan_celeba.py", "--data", data, "--cache-dir", cache, *CELEBA, "--dry-run", "--out", tmp_path / "run")
    check_odd_images_run(p, zoo, tmp_path / "run")
    assert len(list(cache.glob("*.u8.npy"))) == 1


def test_celeba_cache_is_reused_and_rebuilt_when_the_source_changes(zoo, tmp_path):
    """The image zoo as a plain folder (its unreadable files too), the cache next to it by default. The first run as a
    user starts it, the next six in this process (the same main(); what they check happens before the one step)."""
    folder = tmp_path / "faces"
    shutil.copytree(zoo[0], folder)

    def train(name, *extra):
        return call("dcgan_celeba.py", "--data", folder, *CELEBA, "--dry-run", "--out", tmp_path / name, *extra).stdout

    p = run("dcgan_celeba.py", "--data", folder, *CELEBA, "--dry-run", "--out", tmp_path / "a")
    check_odd_images_run(p, zoo, tmp_path / "a")  # built
    assert "reused" in train("b")
    caches = sorted(tmp_path.glob("faces.*.u8.npy"))  # next to the data by default
    assert len(caches) == 1
    Image.new("RGB", (50, 60), "red").save(folder / "new.png")  # a file added: rebuilt, the stale cache removed
    assert f"data: {len(zoo[1]) + 1} images" in (out := train("c")) and "built" in out
    assert sorted(tmp_path.glob("faces.*.u8.npy")) != caches and len(list(tmp_path.glob("faces.*.u8.npy"))) == 1
    (folder / "new.png").unlink()  # files removed: rebuilt (the unreadable ones too: --max-images counts files)
    shutil.rmtree(folder / "broken")
    assert "built" in train("d")
    out = train("e", "--max-images", 5)
    assert "data: 5 images" in out and "built" in out
    assert "reused" in train("f", "--max-images", 5)
    with open(min(tmp_path.glob("faces.32px.max5.*.u8.npy")), "r+b") as f:  # edited behind our back
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    assert "rebuilt, the old one was damaged" in train("g", "--max-images", 5)


def test_celeba_data_errors_are_one_line(zoo, tmp_path, monkeypatch):
    """Refused while loading the data, before any model: the first case as a user runs it, the others in this
    process (the same main())."""
    env = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    (tmp_path / "broken").mkdir()
    for name in zoo[2]:
        shutil.copy(zoo[0] / name, tmp_path / "broken")
    (tmp_path / "fake.zip").write_text("not a zip")
    cases = [
        (["--data", tmp_path / "nothing"], ["no images", "nothing", "img_align_celeba.zip", "--download"]),
        (["--data", tmp_path / "broken"], ["none of the 3 image files"]),
        (["--data", tmp_path / "fake.zip"], ["not a readable zip"]),
        (["--data", tmp_path / "dl", "--download"], ["could not download CelebA", "Kaggle"]),
        (["--dataset", "cifar10", "--data", tmp_path / "c10"], ["cifar-10-batches-py", "cifar-10-python.tar.gz"]),
    ]
    for i, (flags, words) in enumerate(cases):
        if i == 0:
            p = run("dcgan_celeba.py", *flags, *CELEBA, "--out", tmp_path / "run", ok=2, env=env)
            for name in ("http_proxy", "https_proxy"):
                monkeypatch.setenv(name, env[name])
        else:
            p = call("dcgan_celeba.py", *flags, *CELEBA, "--out", tmp_path / "run", ok=2)
        assert_one_line_error(p, *words)
        assert not (tmp_path / "run").exists()
    p = call("dcgan_celeba.py", "--dataset", "cifar10", "--size", "64", ok=2)
    assert "--size 32" in p.stderr


@slow
def test_celeba_learns_the_synthetic_faces(tmp_path):
    """Each of 256 generated faces is compared with the 4096 training faces by normalised correlation over all pixels
    and colours (so that a flat gray image is not close to a pale face): its best r says how much it looks like a
    face of the data, the face that gives it which one. The layout: how far the colour of its centre (the face) is
    from that of its top corners (the background), summed over R, G, B. Held-out faces of the data score medians of
    r 0.87 and layout 0.63 (245 distinct nearest faces); an untrained G's flat gray 0.08 to 0.26 and 0.002; 256
    copies of the mean face r 0.85, layout 0.36 but 1 distinct nearest face; blurred noise r 0.39. After 400 steps at
    32 x 32 with G and D half the default width (35 s on one core), seeds 0, 1 and 2 gave r 0.63, 0.65, 0.65, layout
    0.44, 0.36, 0.33 and 132, 133, 216 distinct nearest faces (with the dcgan_celeba.py of the EMA warm-up: r 0.67,
    0.64, 0.59, layout 0.26, 0.35, 0.39, and 76, 144, 190 faces): G must reach r 0.5, layout 0.15 and 32 faces, while
    the untrained G stays below r 0.3 and layout 0.05."""
    flags = ["--dataset", "synthetic", "--size", 32, "--ngf", 32, "--ndf", 32, "--batch-size", 32, "--amp", "off",
             "--seed", 0]  # fmt: skip
    faces = d.synthetic_faces(4096, 32).float().div(255).numpy()  # the training set: --max-images is 4096 at 32
    for images, trained in zip(learning_runs("dcgan_celeba.py", tmp_path, flags, 400, 256), (False, True)):
        r = correlations(images, faces)
        best, nearest = np.median(r.max(1)), len(set(r.argmax(1).tolist()))
        corners = np.concatenate([images[:, :, :4, :4], images[:, :, :4, -4:]], 3).mean((2, 3))
        layout = np.median(np.abs(images[:, :, 12:20, 12:20].mean((2, 3)) - corners).sum(1))
        print(f"trained {trained}: median best r {best:.3f}, layout {layout:.3f}, {nearest} distinct nearest faces")
        if trained:
            assert best >= 0.5 and layout >= 0.15 and nearest >= 32, (best, layout, nearest)
        else:
            assert best < 0.3 and layout < 0.05, (best, layout)


# ----------------------------------------------------------------------------------------------------------------
# dcgan_hires.py: DDP under torchrun, the streaming cache, 256x256, its own defaults

HIRES = "dcgan_hires.py"


def torchrun(*args, nproc=2, ok=True, timeout=300):
    """dcgan_hires.py under `torchrun --standalone --nproc_per_node 2` on the CPU (DDP over gloo), one thread per
    process so that two of them share two cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(command(HIRES, *args, nproc=nproc), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=env, check=False)  # fmt: skip
    assert ok is not True or p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@slow
def test_hires_torchrun_two_processes_write_one_run_and_resume_it_exactly(tmp_path):
    """2 ranks, gloo on the CPU: rank 0 alone prints and writes; an epoch is half as many steps as in one process.
    Stopped mid-epoch (--max-steps), refused without --resume, resumed under torchrun, stopped there by a SIGTERM to
    torchrun, which passes it on to both ranks (they agree on a step, rank 0 saves), and resumed to the end: the run
    matches an uninterrupted one bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    exact = ["--epochs", 5, "--deterministic", "--log-every", 2]
    p = torchrun(*tiny(HIRES, a, *exact))
    assert p.stdout.count("seed: 0") == 1 and "ddp: 2 processes over gloo" in p.stdout and "Traceback" not in p.stderr
    conf = config(a)
    assert conf["world_size"] == 2 and conf["steps_per_epoch"] == 64 // (8 * 2)  # 8 in one process
    ck = check_run(a, 128, 3, steps=20)
    assert ck["epoch"] == 5 and [int(r[1]) for r in rows(a)] == [e for e in range(1, 6) for _ in range(4)]
    assert sorted(f.name for f in (a / "samples").iterdir()) == [f"epoch_{e:03d}.png" for e in range(1, 6)] + [
        "real.png"
    ]
    torchrun(*tiny(HIRES, b, *exact, "--max-steps", 5))  # in the middle of epoch 2
    check_run(b, 128, 3, steps=5)
    before = digest(b)
    p = torchrun(*tiny(HIRES, b, *exact), ok=False)  # no --resume: every rank refuses
    assert p.returncode != 0 and "add --resume to continue it" in p.stderr and digest(b) == before
    proc = start(HIRES, "--out", b, "--resume", nproc=2)  # the other arguments come from the checkpoint
    assert fault_wait(proc, lambda: len(fault_csv_steps(b)) >= 8, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "resume: step 5 (epoch 1)" in out and "SIGTERM: stopped after step" in out and "--resume" in out, (out, err)
    step = int(re.search(r"stopped after step (\d+)", out).group(1))
    assert check_run(b, 128, 3)["step"] == step and 8 <= step < 20
    stale = [b / "checkpoint.pt.tmp999999", b / "samples" / "epoch_002.png.tmp999998"]  # left by a killed run
    for f in stale:
        f.write_bytes(b"half-written")
    p = torchrun("--out", b, "--resume")  # rank 0 alone removes them: no race between the ranks over one file
    assert f"resume: step {step} " in p.stdout and "Traceback" not in p.stderr
    assert not any(f.exists() for f in stale)
    check_run(b, 128, 3, steps=20)
    assert rows(a) == rows(b)
    ck_a, ck_b = load(a / "checkpoint.pt"), load(b / "checkpoint.pt")
    for net in ("generator", "discriminator", "ema"):
        assert ck_a[net].keys() == ck_b[net].keys(), net
        assert all(torch.equal(ck_a[net][k], ck_b[net][k]) for k in ck_a[net]), net
    call(HIRES, "--out", b, "--generate", 2)  # a DDP checkpoint is a plain one (nothing trains: in this process)
    assert Image.open(b / "generated" / "000001.png").size == (128, 128)


def test_hires_torchrun_refusals_are_clean(tmp_path, dry_run):
    """What a rank of `torchrun --nproc_per_node 2` refuses before it joins the others, each rank alike: --generate
    (one process), --sync-bn on CPUs. Tried on one rank, in the environment torchrun gives it."""
    rank = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2")
    ckpt = dry_run(HIRES) / "checkpoint.pt"
    p = run(HIRES, "--checkpoint", ckpt, "--out", tmp_path / "run", "--generate", 1, ok=2, env=rank)
    assert "runs in one process" in p.stderr and not (tmp_path / "run").exists()
    p = run(HIRES, *tiny(HIRES, tmp_path / "sync", "--dry-run", "--sync-bn"), ok=2, env=rank)
    assert "--sync-bn needs CUDA GPUs" in p.stderr and not (tmp_path / "sync").exists()


def test_hires_batch_source_shards_every_step_between_the_ranks(tmp_path, capsys):
    """Every rank draws the same permutation; at each step the ranks' batches together are the one-process batch of
    world x batch_size images, from the cache's memory map or from memory; a resume mid-epoch is exact per rank."""
    import dcgan_hires as h

    data = numbered(203, size=2)
    np.save(tmp_path / "data.npy", data.numpy())
    mm = np.load(tmp_path / "data.npy", mmap_mode="r")

    def args(batch_size):
        return SimpleNamespace(batch_size=batch_size, seed=5, data_memory=None)

    whole = h.BatchSource(mm, args(20), "cpu")
    ranks = [h.BatchSource(source, args(5), "cpu", rank, 4) for rank in range(4) for source in (mm, data)]
    assert len(whole) == 10 and all(len(r) == 10 for r in ranks)
    for epoch in (0, 3):
        for step, (batch, *parts) in enumerate(zip(whole.epoch(epoch), *(r.epoch(epoch) for r in ranks))):
            assert torch.equal(torch.cat(parts[::2]), torch.cat(parts[1::2])), step  # memory map and memory agree
            assert sorted(ids(torch.cat(parts[::2]))) == ids(batch), step
        for r in ranks:
            assert all(
                torch.equal(x, y) for x, y in zip(list(r.epoch(epoch))[7:], r.epoch(epoch, start=7), strict=True)
            )
    with pytest.raises(SystemExit):
        h.BatchSource(mm, args(60), "cpu", 0, 4)
    assert "fewer than --batch-size 60 times 4 processes" in capsys.readouterr().err


def training_memory_mb(*args):
    """Run dcgan_hires.py; -> (its output, the peak of the memory it owns while it trains, in MB): RssAnon, from the
    moment it prints "training:" on. Not VmRSS, which also counts the pages of the memory-mapped cache file that the
    OS keeps in its cache (reclaimable, not the process's), nor the peak over the whole run (VmHWM), which importing
    torch sets."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / HIRES), *map(str, args)], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines, training = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("training:"):
                training.set()

    reader = threading.Thread(target=read)
    reader.start()
    rss = []
    while proc.poll() is None:
        if training.is_set():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss.append(int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) / 1024)
            except (OSError, AttributeError):  # the process ended between poll() and here
                pass
        time.sleep(0.01)
    reader.join()
    out = "".join(lines)
    assert proc.returncode == 0 and "Traceback" not in out and len(rss) > 10, out
    return out, max(rss)


@slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status (Linux)")
def test_hires_streams_a_cache_larger_than_its_memory_budget_in_bounded_memory(tmp_path):
    """--data-memory 0: batches are gathered from the cache file's memory map, whose pages are the OS's file cache,
    not memory the process owns: a whole epoch over an 8x larger cache (+164 MB) takes no more of its own memory
    (RssAnon) than one over the small cache (measured here: 444 and 451 MB; 447 and 627 MB when the cache is read
    into memory instead)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 128, dtype=np.float32)
    for name, n in (("small", 500), ("large", 4000)):
        (tmp_path / name).mkdir()
        for i in range(n):  # smooth colour ramps: small JPEGs, quick to write and to decode
            c = rng.random((2, 3), dtype=np.float32) * 255
            img = c[0] + (c[1] - c[0]) * (ramp[:, None, None] * ramp[None, :, None])
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / name / f"{i:05d}.jpg", quality=90)
    flags = ["--size", 128, "--batch-size", 25, "--ngf", 1, "--ndf", 1, "--amp", "off", "--workers", 2, "--ema", 0,
             "--log-every", 10, "--epochs", 1, "--data-memory", 0]  # fmt: skip
    peak = {}
    for name, steps in (("small", 20), ("large", 160)):  # one epoch each
        text, peak[name] = training_memory_mb("--data", tmp_path / name, *flags, "--out", tmp_path / f"{name}-run")
        assert f"epoch 1/1  step {steps} " in text and "batches: gathered from the cache file" in text, text
    cache = {n: sum(f.stat().st_size for f in tmp_path.glob(f"{n}.128px.*.u8.npy")) / 2**20 for n in peak}
    print(f"\ncaches {cache} MB; peak of the memory owned while training an epoch over them {peak} MB")
    assert cache["large"] - cache["small"] > 160
    assert peak["large"] - peak["small"] < 0.15 * (cache["large"] - cache["small"]), (peak, cache)


def test_hires_256_model_is_under_50m_parameters_and_trains(tmp_path):
    p = call(HIRES, "--size", 256, "--summary")  # default widths: ngf = ndf = 64, capped at 8x
    totals = [int(t.replace(",", "")) for t in re.findall(r"total parameters: ([\d,]+)", p.stdout)]
    assert len(totals) == 2 and sum(totals) < 50e6, totals
    assert "(512, 4, 4)" in p.stdout and "(3, 256, 256)" in p.stdout
    flags = ["--dataset", "synthetic", "--size", 256, "--max-images", 8, "--batch-size", 4, "--ngf", 4, "--ndf", 4,
             "--amp", "off"]  # fmt: skip
    run(HIRES, *flags, "--dry-run", "--out", tmp_path / "run")
    check_run(tmp_path / "run", 256, 3, steps=1)
    call(HIRES, "--out", tmp_path / "run", "--generate", 2)  # nothing trains: in this process
    assert Image.open(tmp_path / "run" / "generated" / "000000.png").size == (256, 256)


def test_hires_defaults_differ_from_celeba_and_each_turns_off(tmp_path, dry_run):
    help_text = " ".join(call(HIRES, "--help").stdout.split())
    assert "--spectral-norm, --no-spectral-norm" in help_text and "BatchNorm (default: True)" in help_text
    size, nc, _ = SCRIPTS[HIRES]
    on = dry_run(HIRES)  # tiny(HIRES) --dry-run: the defaults but for the sizes
    conf = config(on)
    assert (conf["spectral_norm"], conf["label_smoothing"], conf["ema"]) == (True, 0.1, 0.999)
    assert conf["batch_size"] == 8 and conf["size"] == 128 and conf["world_size"] == 1
    ck = check_run(on, size, nc, steps=1)
    assert "ema" in ck and any("parametrizations" in k for k in ck["discriminator"])
    off = ["--no-spectral-norm", "--label-smoothing", 0, "--ema", 0]
    run(HIRES, *tiny(HIRES, tmp_path / "off", "--dry-run", *off))
    conf = config(tmp_path / "off")
    assert (conf["spectral_norm"], conf["label_smoothing"], conf["ema"]) == (False, 0.0, 0.0)
    ck = check_run(tmp_path / "off", size, nc, steps=1)
    assert "ema" not in ck and not any("parametrizations" in k for k in ck["discriminator"])
    assert any("running_mean" in k for k in ck["discriminator"])  # BatchNorm in D, as in the paper
    p = call(HIRES, "--out", tmp_path / "off", "--resume", "--spectral-norm", ok=2)
    assert_one_line_error(p, "--spectral-norm False (checkpoint) vs True")
    p = call(HIRES, "--dataset", "celeba-hq", "--data", tmp_path / "nothing", "--out", tmp_path / "hq", ok=2)
    assert_one_line_error(p, "no images", "CelebA-HQ", "--download cannot fetch them")
    assert not (tmp_path / "hq").exists()


# ----------------------------------------------------------------------------------------------------------------
# Flag combinations a review found broken: fp16, resume with other flags, EMA, amp auto, label-smoothing dtype


def test_fp16_with_several_g_steps_and_amp_switched_on_resume(tmp_path):
    """One GradScaler per optimizer, each updated after its own step; --amp may change in every direction on resume.
    train_step, optimizer_step and restore are the same in every script (test_shared_helpers_are_identical...)."""
    script = "dcgan_mnist.py"
    run(script, *tiny(script, tmp_path / "run", "--amp", "fp16", "--g-steps", 2, "--max-steps", 2))
    ck = load(tmp_path / "run" / "checkpoint.pt")
    assert ck["scaler_g"]["scale"] > 0 and ck["scaler_d"]["scale"] > 0  # two scalers, each with its own state
    for step, amp in enumerate(["off", "fp16", "bf16"], start=3):
        p = run(script, "--out", tmp_path / "run", "--resume", "--amp", amp, "--max-steps", step)
        assert f"amp: {amp}" in p.stdout
    check_run(tmp_path / "run", *SCRIPTS[script][:2], steps=5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_typed_with_resume_take_effect_also_on_an_old_checkpoint(script, tmp_path, dry_run):
    """The flags typed with --resume win; the first resume is of a checkpoint written before --g-act and --d-norm
    existed: missing keys mean ReLU and BatchNorm unless spectral norm."""
    out = copy_run(dry_run(script), tmp_path)
    ck = load(out / "checkpoint.pt")
    del ck["args"]["g_act"], ck["args"]["d_norm"]
    torch.save(ck, out / "checkpoint.pt")
    run(script, "--out", out, "--resume", "--max-steps", 2, "--beta1", 0.3, "--lr-g", 1e-3)
    assert isinstance(importlib.import_module(script[:-3]).load_generator(out / "checkpoint.pt").main[2], torch.nn.ReLU)
    ck = load(out / "checkpoint.pt")
    assert ck["args"]["beta1"] == 0.3 and ck["args"]["lr_g"] == 1e-3
    for opt in ("opt_g", "opt_d"):
        assert ck[opt]["param_groups"][0]["betas"] == (0.3, 0.999), opt
    assert ck["opt_g"]["param_groups"][0]["lr"] == 1e-3 and ck["opt_d"]["param_groups"][0]["lr"] == 2e-4
    p = run(script, "--out", out, "--resume", "--max-steps", 3, "--d-optim", "sgd")
    assert "resume: --d-optim sgd: D's optimizer starts afresh (the run used adam)" in p.stdout
    ck = load(out / "checkpoint.pt")
    assert ck["opt_d"]["param_groups"][0]["momentum"] == 0.9 and ck["args"]["beta1"] == 0.3  # the rest from the run
    before = digest(out)
    p = call(script, "--out", out, "--resume", "--max-steps", 4, "--batch-size", 4, ok=2)
    assert_one_line_error(p, "--resume", "--batch-size", "an epoch is")
    assert digest(out) == before


def test_ema_warms_up_and_averages_batchnorm_statistics(tmp_path):
    """--ema 0.999 for 80 steps: without warm-up 92% of the EMA weights would still be the random initialisation.
    With it, EMA samples are close to the live generator's, far from an untrained one's (BatchNorm statistics in
    the average too). At half the default widths (--ngf 16: 7 s instead of 13; seeds 0, 1, 2 gave EMA-to-live
    distances of 0.18, 0.16, 0.20 of the untrained-to-live one, EMA contrast 0.93 to 0.96 of the live G's)."""
    import dcgan_mnist as m

    flags = ["--dataset", "synthetic", "--max-images", 2048, "--max-steps", 80, "--ema", 0.999, "--amp", "off", "--ngf",
             16, "--ndf", 16]  # fmt: skip
    run("dcgan_mnist.py", *flags, "--out", tmp_path / "run")
    ck = load(tmp_path / "run" / "checkpoint.pt")
    assert not any(k.startswith("module.") for k in ck["ema"])
    assert not torch.equal(ck["ema"]["main.1.running_mean"], ck["generator"]["main.1.running_mean"])
    torch.manual_seed(0)  # the run's seed: the generator the run started from
    nets = {"untrained": m.Generator(100, 16), "live": m.Generator(100, 16), "ema": m.Generator(100, 16)}
    nets["live"].load_state_dict(ck["generator"])
    nets["ema"].load_state_dict(ck["ema"])
    with torch.no_grad():
        z = torch.randn(256, 100, 1, 1)
        out = {k: g.eval()(z) for k, g in nets.items()}
    ema_vs_live = (out["ema"] - out["live"]).abs().mean().item()
    untrained_vs_live = (out["untrained"] - out["live"]).abs().mean().item()
    assert ema_vs_live < 0.5 * untrained_vs_live, (ema_vs_live, untrained_vs_live)
    stds = {k: round(v.std().item(), 3) for k, v in out.items()}  # contrast: strokes on black, not a flat gray
    assert stds["ema"] > 0.7 * stds["live"] and stds["ema"] > 2 * stds["untrained"], stds


@pytest.mark.parametrize("script", SCRIPTS)
def test_amp_auto_takes_bf16_only_where_it_is_native(script, monkeypatch):
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # setup() on a pretend GPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def amp(flag, native):
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native
        )
        return module.setup(module.parse_args(["--device", "cuda", "--amp", flag])[0])[1]

    assert amp("auto", native=False) == "fp16"  # a T4/V100: emulated bf16 only
    assert amp("auto", native=True) == "bf16"
    assert amp("off", native=True) == "off"


def test_label_smoothing_targets_and_losses_are_float32_under_bf16(monkeypatch):
    import dcgan_mnist as m

    seen = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits, target):
        seen.append((logits.dtype, target.dtype, target.flatten()[0].item()))
        return bce(logits, target)

    monkeypatch.setattr(m.F, "binary_cross_entropy_with_logits", spy)
    args, _ = m.parse_args(["--dataset", "synthetic", "--ngf", "4", "--ndf", "4", "--label-smoothing", "0.1"])
    net = m.build(args, torch.device("cpu"), "bf16")
    m.train_step(net, torch.rand(4, 1, 28, 28) * 2 - 1, args, 0, 1)
    assert [s[2] for s in seen] == [pytest.approx(0.9, abs=1e-7), 0.0, 1.0]
    assert all(s[:2] == (torch.float32, torch.float32) for s in seen)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_one_true_default_per_flag(script):
    out = call(script, "--help").stdout
    assert "(default: None)" not in out and "default: runs/<dataset>" in out
    for block in re.split(r"\n  (?=-)", out):
        assert block.count("(default") <= 1, block


# ----------------------------------------------------------------------------------------------------------------
# The original projects' knobs: --g-act, --d-norm, --noise-schedule; load_generator


@pytest.mark.parametrize("script", SCRIPTS)
def test_g_act_and_d_norm_shape_the_networks(script):
    """(Kept on resume: test_every_training_trick_runs_and_g_act_d_norm_are_kept_on_resume; an old checkpoint without
    them: test_flags_typed_with_resume_take_effect_also_on_an_old_checkpoint.)"""
    flags = SCRIPTS[script][2]
    summary = call(script, *flags, "--summary", "--g-act", "leaky", "--spectral-norm", "--d-norm", "batch").stdout
    g, d = summary.split("Discriminator")
    assert "LeakyReLU" in g and "ReLU " not in g.replace("LeakyReLU", "")
    assert "ParametrizedConv2d" in d and "BatchNorm2d" in d
    assert "BatchNorm2d" not in call(script, *flags, "--summary", "--d-norm", "none").stdout.split("Discriminator")[1]


def test_instance_noise_annealed_or_constant(tmp_path, monkeypatch):
    import dcgan_mnist as m

    sigmas, handlers = {}, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for schedule in ("anneal", "constant"):
        seen = sigmas[schedule] = []
        monkeypatch.setattr(m, "noisy", lambda x, sigma, seen=seen: seen.append(sigma) or x)
        flags = tiny("dcgan_mnist.py", tmp_path / schedule, "--epochs", 1, "--instance-noise", 0.5)
        m.main([*map(str, flags), "--noise-schedule", schedule])  # in this process, to see every sigma
        assert load(tmp_path / schedule / "checkpoint.pt")["args"]["noise_schedule"] == schedule
    for sig, handler in handlers.items():  # train() installed its own
        signal.signal(sig, handler)
    steps = 256 // 32  # one epoch; noisy() is called 3 times a step (real, fake for D, fake for G)
    assert sigmas["constant"] == [0.5] * 3 * steps
    assert sigmas["anneal"][::3] == [0.5 * (1 - s / steps) for s in range(steps)]


def readme_block(heading):
    """The first ```python block (or every ```bash block) under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:python|bash)\n(.*?)```", section, re.DOTALL)


@pytest.mark.parametrize("script", SCRIPTS)
def test_load_generator_and_the_readme_python_example(script, tmp_path, monkeypatch, fault_reference):
    out = fault_reference(script)  # a run with --ema
    module = importlib.import_module(script[:-3])
    G = module.load_generator(out / "checkpoint.pt")
    ck = load(out / "checkpoint.pt")
    assert not G.training and all(torch.equal(v, ck["ema"][k]) for k, v in G.state_dict().items())
    size, nc, _ = SCRIPTS[script]
    assert G(torch.randn(2, G.nz, 1, 1)).shape == (2, nc, size, size)
    code = readme_block("Use a trained generator from Python")[0]
    code = code.replace("dcgan_celeba", script[:-3]).replace("runs/celeba64", str(out))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own example, run as a user would)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] >= 4 * size


def test_readme_recipes_of_the_original_projects_run(tmp_path):
    """Every command line of "Reproduce the original projects", on synthetic data for one step (--dry-run), with
    narrow networks (the last --ngf/--ndf wins): each script's first line as a user runs it, the others in this
    process (the same main(), without starting Python with torch again)."""
    lines = [line for block in readme_block("Reproduce the original projects") for line in block.splitlines()]
    commands = [shlex.split(line.split("#")[0]) for line in lines if line.startswith("python dcgan_")]
    assert len(commands) >= 5
    for i, cmd in enumerate(commands):
        script, flags = cmd[1], cmd[2:]
        for flag in ("--dataset", "--data", "--out"):  # synthetic data, a run directory of the test's
            while flag in flags:
                del flags[flags.index(flag) : flags.index(flag) + 2]
        batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 128
        if "--tensorboard" in flags and importlib.util.find_spec("tensorboard") is None:
            flags.remove("--tensorboard")  # an optional package: test_tensorboard_is_optional covers its absence
        tiny_nets = ["--ngf", 8, "--ndf", 8]  # every flag of the line is parsed and used; narrow networks: a quick step
        first = script not in {c[1] for c in commands[:i]}
        (run if first else call)(
            script,
            *flags,
            *tiny_nets,
            "--dataset",
            "synthetic",
            "--max-images",
            batch,
            "--dry-run",
            "--out",
            tmp_path / str(i),
        )
