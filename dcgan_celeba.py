"""DCGAN on 64x64 (or 32x32) images: CelebA, any folder or zip of images (gray ones in gray), CIFAR-10, synthetic faces.

The DCGAN of Radford, Metz & Chintala 2015 (https://arxiv.org/abs/1511.06434), as in the paper at 64x64:
transposed convolutions, BatchNorm and ReLU in G, strided convolutions, BatchNorm and LeakyReLU(0.2) in D; unlike
the paper: batch 64, Adam at 6e-4, an EMA of G, a lazy R1 penalty on D (README: why; --batch-size 128 --lr-g 2e-4
--lr-d 2e-4 --ema 0 --r1 0 is the paper's recipe). Images are decoded once into a uint8 cache next to the data.

Train:
    python dcgan_celeba.py --epochs 10 --size 64                        # ./data/celeba -> runs/celeba64
    python dcgan_celeba.py --data ~/Downloads/img_align_celeba.zip      # the zip, read in place
    python dcgan_celeba.py --data ~/photos --crop 140 --flip            # any folder of images, searched recursively
    python dcgan_celeba.py --dataset cifar10 --size 32                  # torchvision download -> runs/cifar1032
    python dcgan_celeba.py --dataset synthetic --epochs 1 --size 32     # CPU smoke test: no download, no GPU
Continue a run to 20 epochs in total and sample from it (also --interpolate K, --summary, --benchmark N):
    python dcgan_celeba.py --epochs 20 --resume
    python dcgan_celeba.py --generate 1000
From Python:
    from dcgan_celeba import load_generator
    G = load_generator("runs/celeba64/checkpoint.pt")
    images = G(torch.randn(16, G.nz, 1, 1))  # (16, 3, 64, 64) in [-1, 1]
"""

import argparse
import contextlib
import copy
import csv
import glob
import hashlib
import importlib.metadata
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import warnings
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import ExifTags, Image
from tqdm import tqdm

SCRIPT = "dcgan_celeba.py"
DATASETS = ("celeba", "cifar10", "synthetic")
SIZES = (32, 64)
NC, MAX_MULT = 3, 8  # RGB; widest layer ngf*8 / ndf*8
ARCH = ("nz", "ngf", "ndf", "size", "channels", "g_act", "d_norm", "spectral_norm")  # network shape: --resume keeps it
FRESH = ["out", "resume", "max_steps", "dry_run", "generate", "checkpoint", "interpolate", "summary", "benchmark"]
COLUMNS = ["step", "epoch", "loss_d", "loss_g", "d_real", "d_fake"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default of None is described in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def number(kind, lo, hi=math.inf):  # an argparse type: kind(text), checked against [lo, hi)
    def parse(text):
        if not lo <= kind(text) < hi:
            raise argparse.ArgumentTypeError(f"{text} is outside [{lo}, {hi})")
        return kind(text)

    return parse


def parse_args(argv=None):
    """-> (args, checkpoint). With --resume the flags typed win and every other argument comes from the checkpoint."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--dataset", default="celeba", choices=DATASETS, help="celeba: any folder/zip of images")
    p.add_argument("--data", default=None, help="folder or .zip of images, or torchvision root (default ./data/celeba; "
                   "./data for cifar10)")  # fmt: skip
    p.add_argument("--size", type=int, default=64, choices=SIZES, help="image size (cifar10: 32)")
    p.add_argument("--crop", type=number(int, 1), default=None, help="centre crop of N pixels before resizing")
    p.add_argument("--channels", type=int, choices=(1, 3), help="channels of G, D (default: 1 if all images are gray)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<dataset><size>)")
    p.add_argument("--max-images", type=number(int, 1), default=None, help="train on the first N images (default: all)")
    p.add_argument("--download", action="store_true", help="try torchvision's CelebA download when --data is empty")
    p.add_argument("--cache-dir", default=None, help="where the uint8 cache goes (default: beside --data)")
    p.add_argument("--workers", type=number(int, 1), default=os.cpu_count(), help="processes decoding the images")
    p.add_argument("--data-memory", type=number(float, 0), default=None, help="GB the data set may take on the GPU, 0 "
                   "keeps it on the host (default: 40%% of free GPU memory)")  # fmt: skip
    p.add_argument("--epochs", type=number(int, 1), default=10, help="total epochs of the run (also with --resume)")
    p.add_argument("--max-steps", type=number(int, 1), default=None, help="stop after N optimisation steps in total")
    p.add_argument("--dry-run", action="store_true", help="one step, all artifacts written; a smoke test")
    p.add_argument("--batch-size", type=number(int, 2), default=64, help="images per step")
    p.add_argument("--nz", type=number(int, 1), default=100, help="size of the latent vector z")
    p.add_argument("--ngf", type=number(int, 1), default=64, help="width of the generator")
    p.add_argument("--ndf", type=number(int, 1), default=64, help="width of the discriminator")
    p.add_argument("--lr-g", type=number(float, 0), default=6e-4, help="generator learning rate (the paper: 2e-4)")
    p.add_argument("--lr-d", type=number(float, 0), default=6e-4, help="discriminator learning rate (TTUR if != lr-g)")
    p.add_argument("--beta1", type=number(float, 0, 1), default=0.5, help="Adam beta1 (0.5 as in the paper)")
    p.add_argument("--beta2", type=number(float, 0, 1), default=0.999, help="Adam beta2")
    p.add_argument("--seed", type=int, default=0, help="seeds everything; same seed + device = same run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision (auto: "
                   "bf16 where the GPU or CPU runs it natively, else fp16 on GPUs, off on CPUs)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower; exact reruns)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    mode.add_argument("--generate", type=number(int, 1), metavar="N", help="write N images from --checkpoint")
    mode.add_argument("--interpolate", type=number(int, 2), metavar="K", help="latent walk, K frames per segment")
    mode.add_argument("--summary", action="store_true", help="print both networks layer by layer and exit")
    mode.add_argument("--benchmark", type=number(int, 1), metavar="N", help="time N training steps, no data/files")
    p.add_argument("--checkpoint", default=None, help="for --generate/--interpolate (default: <out>/checkpoint.pt)")
    p.add_argument("--sample-every", type=number(int, 0), default=0, help="extra fixed-noise grid every N steps")
    p.add_argument("--log-every", type=number(int, 1), default=50, help="flush device-side statistics every N steps")
    p.add_argument("--save-every", type=number(int, 0), default=1000, help="checkpoint every N steps (and per epoch)")
    p.add_argument("--tensorboard", action="store_true", help="also log to <out>/tb (needs tensorboard)")
    tricks = p.add_argument_group("architecture and training tricks (all off by default but --ema, --r1)")
    tricks.add_argument("--g-act", default="relu", choices=["relu", "leaky"], help="G's activation (leaky: slope 0.2)")
    tricks.add_argument("--d-norm", default="auto", choices=["auto", "batch", "none"], help="BN in D (auto: unless SN)")
    tricks.add_argument("--label-smoothing", type=number(float, 0, 1), default=0.0, help="real target 1-S")
    tricks.add_argument("--instance-noise", type=number(float, 0), default=0.0, help="N(0, SIGMA) noise on D's inputs")
    tricks.add_argument("--noise-schedule", default="anneal", choices=["anneal", "constant"], help="anneal: SIGMA to 0")
    tricks.add_argument("--g-steps", type=number(int, 1), default=1, help="G updates per D update")
    tricks.add_argument("--d-optim", default="adam", choices=["adam", "sgd"], help="D optimizer (sgd: momentum 0.9)")
    tricks.add_argument("--spectral-norm", action="store_true", help="spectral norm on D's convolutions")
    tricks.add_argument("--d-dropout", type=number(float, 0, 1), default=0.0, help="spatial dropout in D")
    tricks.add_argument("--clip-grad", type=number(float, 0), default=0.0, help="clip gradient norm (0: off)")
    tricks.add_argument("--r1", type=number(float, 0), default=0.3, help="R1 gradient penalty weight on D (0: off)")
    tricks.add_argument("--r1-every", type=number(int, 1), default=16, help="R1 every N steps (lazy)")
    tricks.add_argument("--ema", type=number(float, 0, 1), default=0.999, help="EMA decay of G's weights (0: off)")
    tricks.add_argument("--flip", action="store_true", help="random horizontal flip of real images")
    args, ck = p.parse_args(argv), None
    out = args.out or os.path.join("runs", f"{args.dataset}{args.size}")
    if args.resume:  # parse again with the run's arguments as defaults: what was typed wins, FRESH is never taken
        ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
        old = {"r1": 0.0, "channels": NC}  # a run from before --r1 or --channels: without R1, in colour
        p.set_defaults(**old | {k: v for k, v in ck["args"].items() if k in vars(args) and k not in FRESH})
        args = p.parse_args(argv)
        diff = [f"--{k.replace('_', '-')} {ck['args'][k]} (checkpoint) vs {getattr(args, k)}"
                for k in ARCH if k in ck["args"] and ck["args"][k] != getattr(args, k)]  # fmt: skip
        if diff:
            die(f"--resume: architecture arguments differ from the checkpoint's: {'; '.join(diff)}")
    if args.dataset == "cifar10" and args.size != 32:
        p.error("--dataset cifar10 is 32x32: add --size 32")
    args.out, args.data = out, args.data or ("./data" if args.dataset == "cifar10" else "./data/celeba")
    return args, ck


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------------------------
# The DCGAN: networks and training step


def weights_init(m):
    # the paper: every weight from N(0, 0.02), BatchNorm scale from N(1, 0.02)
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight  # spectral norm's
        nn.init.normal_(w, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)  # and the bias at BatchNorm's own 0


def widths(size):
    """Channel multipliers of the feature maps from 4x4 up to size/2: [8, 4, 2, 1] at 64 (the paper's), capped at 8."""
    return [min(2**i, MAX_MULT) for i in reversed(range(int(math.log2(size)) - 2))]


class Generator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=NC, size=64, act="relu"):
        super().__init__()
        self.nz, m = nz, widths(size)
        # ReLU as in the paper; LeakyReLU(0.2) as in the TensorFlow DCGAN tutorial (--g-act leaky)
        relu = nn.ReLU if act == "relu" else lambda inplace: nn.LeakyReLU(0.2, inplace)
        layers = [
            # input: nz x 1 x 1
            nn.ConvTranspose2d(nz, ngf * m[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * m[0]),
            relu(True),
            # state size: (ngf*8) x 4 x 4 at --size 64
        ]
        for a, b in itertools.pairwise(m):
            layers += [
                nn.ConvTranspose2d(ngf * a, ngf * b, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ngf * b),
                relu(True),
            ]  # state size: (ngf*a) x s x s -> (ngf*b) x 2s x 2s; at 64: 8x8, 16x16, 32x32
        layers += [
            nn.ConvTranspose2d(ngf * m[-1], nc, 4, 2, 1, bias=False),
            nn.Tanh(),
            # state size: nc x size x size
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self, ndf=64, nc=NC, size=64, spectral_norm=False, dropout=0.0, batch_norm=True):
        super().__init__()
        # spectral norm (Miyato et al. 2018, https://arxiv.org/abs/1802.05957); BatchNorm: see --d-norm
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        # spatial dropout in D, as in the PyTorch CelebA notebook with spectral norm
        drop = (lambda: nn.Dropout2d(dropout)) if dropout else nn.Identity
        m = widths(size)[::-1]
        layers = [
            # input: nc x size x size
            sn(nn.Conv2d(nc, ndf * m[0], 4, 2, 1, bias=False)),
            nn.LeakyReLU(0.2, inplace=True),
            drop(),
            # state size: ndf x size/2 x size/2
        ]
        for a, b in itertools.pairwise(m):
            layers += [
                sn(nn.Conv2d(ndf * a, ndf * b, 4, 2, 1, bias=False)),
                norm(ndf * b),
                nn.LeakyReLU(0.2, inplace=True),
                drop(),
            ]  # state size: (ndf*a) x s x s -> (ndf*b) x s/2 x s/2; at 64: 16x16, 8x8, 4x4
        layers += [
            sn(nn.Conv2d(ndf * m[-1], 1, 4, 1, 0, bias=False)),
            # output: 1 x 1 x 1, a logit: BCE-with-logits is safe under autocast, Sigmoid + BCELoss is not
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x).view(-1)


def memory_format(device):  # channels-last is faster, but MPS's BatchNorm backward got it wrong in some versions
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


def build(args, device, amp):
    """Networks, EMA copy, optimizers and grad scalers: everything a checkpoint holds."""
    nc = args.channels or NC  # None: --summary and --benchmark of a fresh run
    G = Generator(args.nz, args.ngf, nc, args.size, args.g_act).to(device, memory_format=memory_format(device))
    batch_norm = args.d_norm == "batch" or (args.d_norm == "auto" and not args.spectral_norm)
    D = Discriminator(args.ndf, nc, args.size, args.spectral_norm, args.d_dropout, batch_norm)
    D = D.to(device, memory_format=memory_format(device))
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}  # one kernel per update, also under GradScaler
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), **fused)
    if args.d_optim == "sgd":  # with momentum for D, as in ganhacks; unfused: fused SGD moves its momentum on the steps
        opt_d = torch.optim.SGD(D.parameters(), lr=args.lr_d, momentum=0.9)  # fp16's GradScaler skips (inf, then NaN)
    else:
        opt_d = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), **fused)
    # EMA of G's weights (Yazici et al. 2019, https://arxiv.org/abs/1806.04498), used for every image written
    ema = copy.deepcopy(G).eval().requires_grad_(False) if args.ema else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    net_g, net_d = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    return SimpleNamespace(
        G=G, D=D, net_g=net_g, net_d=net_d, ema=ema, opt_g=opt_g, opt_d=opt_d,
        scaler_d=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),  # one per optimizer
        scaler_g=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),
        autocast=lambda: torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
    )  # fmt: skip


def train_step(m, real, args, step, steps):
    """Step `step` of `steps` planned: one D update and --g-steps G updates; returns [loss_d, loss_g, d_real, d_fake] as
    a device tensor. No .item() in here: it would make the CPU wait for the GPU every step."""
    z = torch.randn(real.size(0), args.nz, 1, 1, device=real.device)
    # instance noise (Sonderby et al. 2016, https://arxiv.org/abs/1610.04490) on D's inputs, to 0 over the planned run
    sigma = args.instance_noise * (max(0.0, 1 - step / steps) if args.noise_schedule == "anneal" else 1.0)
    # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
    with m.autocast():
        fake = m.net_g(z)
        out_real = m.net_d(noisy(real, sigma)).float()  # logits; targets and losses in float32
        out_fake = m.net_d(noisy(fake.detach(), sigma)).float()
    # one-sided label smoothing (Salimans et al. 2016, https://arxiv.org/abs/1606.03498): real target 1 - S
    loss_d = F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, 1 - args.label_smoothing))
    loss_d = loss_d + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake))
    penalty = 0  # R1 (Mescheder et al. 2018, https://arxiv.org/abs/1801.04406): gamma/2 |grad D(x)|^2 at real x,
    if args.r1 and step % args.r1_every == 0:  # lazily: every N steps, N times as heavy (as StyleGAN2)
        x = real.detach().requires_grad_(True)  # a double backward through the plain D (not compiled, not DDP), in
        with contextlib.nullcontext() if m.scaler_d.is_enabled() else m.autocast():  # float32 under fp16 (unscaled)
            (grad,) = torch.autograd.grad(m.D(x).float().sum(), x, create_graph=True)
        penalty = args.r1 / 2 * args.r1_every * grad.square().sum([1, 2, 3]).mean()
    optimizer_step(m.opt_d, m.D, m.scaler_d, loss_d + penalty, args.clip_grad)
    # (2) Update G: maximize log D(G(z)) (the non-saturating loss), reusing the batch D just saw
    m.D.requires_grad_(False)  # G's step needs gradients through D, not for D's weights
    for k in range(args.g_steps):
        with m.autocast():
            if k:  # extra G steps draw fresh noise
                fake = m.net_g(torch.randn_like(z))
            out = m.net_d(noisy(fake, sigma)).float()
        loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        optimizer_step(m.opt_g, m.G, m.scaler_g, loss_g, args.clip_grad)
        if m.ema is not None:  # warm-up: early on the average must not be mostly the random initialisation
            update_ema(m.ema, m.G, min(args.ema, (1 + step) / (10 + step)))
    m.D.requires_grad_(True)
    return torch.stack([loss_d, loss_g, out_real.sigmoid().mean(), out_fake.sigmoid().mean()]).detach()


def noisy(x, sigma):
    return x + sigma * torch.randn_like(x) if sigma else x


def optimizer_step(opt, net, scaler, loss, clip):
    """Backward and step; with fp16 through the optimizer's own GradScaler, updated after each of its steps."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(net.parameters(), clip)  # foreach norm on the device, no sync
    scaler.step(opt)
    scaler.update()


def update_ema(ema, G, decay):  # ema <- decay * ema + (1 - decay) * G, BatchNorm statistics too: they fit the average
    for e, g in zip(ema.state_dict().values(), G.state_dict().values()):
        if e.is_floating_point():  # not BatchNorm's num_batches_tracked: with a momentum it is never read
            e.lerp_(g, 1 - decay)


# ----------------------------------------------------------------------------------------------------------------
# Data: images decoded once into a uint8 cache; batches gathered from it, on the GPU when it fits


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CACHE_VERSION = 2  # part of every cache fingerprint: bump it when decoding changes, and old caches are rebuilt
HOW_TO_GET = {
    "celeba": "get img_align_celeba.zip from Kaggle (jessicali9530/celeba-dataset) or the official Google Drive "
    "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html) and put the zip, or the folder it unpacks to, at --data; "
    "or pass --download",
}
T = Image.Transpose  # EXIF Orientation -> the turn that shows a photo upright, as PIL.ImageOps.exif_transpose
UPRIGHT = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
           7: T.TRANSVERSE, 8: T.ROTATE_90}  # fmt: skip
_worker = {}  # a decoding process's state: its open zip serves all its images


def show(path):  # a path as the user would type it: relative to the working directory when below it
    return path if (rel := os.path.relpath(path)).startswith("..") else rel


def is_image(name):
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(IMAGE_EXTS) and not base.startswith(".") and "__MACOSX/" not in name


def find_images(path):
    """--data -> (source, entries): a folder or zip, and its images as sorted (name, size, mtime or CRC) tuples.
    A folder holding no image but exactly one zip (a torchvision CelebA root before unpacking) means that zip."""
    if os.path.isfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                return path, sorted((i.filename, i.file_size, i.CRC) for i in zf.infolist() if is_image(i.filename))
        except (zipfile.BadZipFile, OSError) as e:
            die(f"{path} is not a readable zip file ({e}); --data takes a folder of images or a .zip of them")
    entries, zips = [], []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
        for f in files:
            full = os.path.join(folder, f)
            if is_image(f):
                st = os.stat(full) if os.path.exists(full) else os.stat_result((0,) * 10)  # broken link: fails later
                entries.append((os.path.relpath(full, path).replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
            elif f.lower().endswith(".zip") and not f.startswith("."):
                zips.append(full)
    if not entries and len(zips) > 1:
        die(f"{path} holds no images but several zips ({', '.join(map(show, zips))}); pass one of them with --data")
    return find_images(zips[0]) if not entries and zips else (path, sorted(entries))


def decode_image(fp, size, crop=None):
    """One image (path or file object) -> uint8 (3, size, size), RGB, upright: the centred square (of `crop` original
    pixels when given) resized with antialiasing, which is the same as: shorter side to `size`, then centre crop."""
    with Image.open(fp) as img:
        w, h = img.size
        turn = UPRIGHT.get(img.getexif().get(ExifTags.Base.Orientation))
        side = min(w, h, crop or w)
        scale = max([s for s in (2, 4, 8) if side // s >= size], default=1)
        # JPEG: libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, the crop box then scaled (else a no-op)
        s = 1 / scale if img.draft("RGB", (w // scale, h // scale)) else 1
        x0, y0, side = (w - side) / 2 * s, (h - side) / 2 * s, side * s
        if img.mode.startswith("I"):  # 16/32-bit gray: scale, where convert() would clip at 255
            img = Image.fromarray((np.asarray(img, np.float32) / 257).clip(0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # composite on white, not on black
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, (x0, y0, x0 + side, y0 + side), 3.0)
        img = img if turn is None else img.transpose(turn)  # the centred square of the upright photo, turned
        return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


def init_worker(source, size, crop):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool, removes the temp
    _worker.update(source=source, size=size, crop=crop, zip=zipfile.ZipFile(source) if os.path.isfile(source) else None)


def decode_chunk(names):
    """-> (uint8 (k, 3, S, S) of the readable images among names, the names that could not be read)."""
    rows, bad, zf = [], [], _worker["zip"]
    for name in names:
        try:
            fp = io.BytesIO(zf.read(name)) if zf else os.path.join(_worker["source"], name)
            rows.append(decode_image(fp, _worker["size"], _worker["crop"]))
        except Exception:  # noqa: BLE001 -- OSError, SyntaxError, ValueError, DecompressionBombError...: unreadable
            bad.append(name)
    return np.stack(rows) if rows else np.empty((0, 3, _worker["size"], _worker["size"]), np.uint8), bad


def open_cache(path):
    """-> (read-only memmap, "reused") if `path` has the shape and CRC-32 recorded by its build, else (None, how it is
    to be built). CRC-32: 0.26 s per GB on one core (BLAKE2b: 1.2 s), plus the disk read; a truncated file won't map."""
    if not os.path.exists(path):
        return None, "built"
    try:
        meta, data, crc = json.loads(Path(path + ".json").read_text()), np.load(path, mmap_mode="r"), 0
        step = max(1, (16 << 20) // data[0].nbytes)  # images per 16 MB
        for i in tqdm(range(0, len(data), step), desc="checking cache", unit="chunk", disable=None, leave=False):
            crc = zlib.crc32(data[i : i + step], crc)
        if crc == meta["crc32"] and list(data.shape) == meta["shape"]:
            return data, "reused"
        why = "its checksum is not the one recorded"
    except Exception as e:  # noqa: BLE001 -- a damaged header, a missing sidecar...: rebuild
        why = f"{type(e).__name__}: {e}"
    return None, f"rebuilt, the old one was damaged: {why}"


def build_cache(source, names, path, size, crop, workers):
    """Decode every image, in parallel, into `path`.tmp-PID, renamed to `path` only when complete (with its JSON
    sidecar: shape, CRC-32, skipped files), so an interrupted build never leaves a cache that looks usable."""
    tmp = f"{path}.tmp-{os.getpid()}"
    n, bad, crc = 0, [], 0  # images decoded, names of those that could not be, CRC-32 of the decoded ones
    chunk = max(4, 2**18 // size**2)  # images per task: ~0.8 MB of results, a progress bar that moves
    tasks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    workers = min(workers or 1, len(tasks))
    # fork: no re-import of torch per worker. Not multiprocessing.Pool: its imap hangs forever when a worker dies
    context = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=init_worker, initargs=(source, size, crop))
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(names), 3, size, size)}
    try:
        with open(tmp, "wb") as f, tqdm(total=len(names), unit="img", desc=f"caching {size}px", disable=None) as bar:
            np.lib.format.write_array_header_1_0(f, header)
            for rows, failed in pool.map(decode_chunk, tasks):  # in order; unreadable images leave no gap
                f.write(rows)
                crc = zlib.crc32(rows, crc)
                n += len(rows)
                bad += failed
                bar.update(len(rows) + len(failed))
            f.seek(0)  # numpy pads the header for the first axis to change in place: now n rows
            np.lib.format.write_array_header_1_0(f, header | {"shape": (n, 3, size, size)})
        if n == 0:
            die(f"none of the {len(names)} image files in {show(source)} could be read (first: {names[0]})")
        meta = {"shape": [n, 3, size, size], "crc32": crc, "source": os.path.abspath(source), "skipped": len(bad)}
        Path(tmp + ".json").write_text(json.dumps(meta | {"skipped_names": bad[:5]}))
        os.replace(tmp + ".json", path + ".json")
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C, disk full, a worker's error, die() above
        for p in (tmp, tmp + ".json"):
            Path(p).unlink(missing_ok=True)
        if isinstance(e, OSError):
            die(f"could not write the cache {show(tmp)}: {e.strerror or e}; free space there or use --cache-dir", 1)
        raise
    finally:
        pool.shutdown(cancel_futures=True)  # waits for the workers: none is left writing to a closed pipe at exit


def load_image_folder(args):
    """A folder or zip of images -> read-only memmap (N, 3, S, S) of its uint8 cache, (re)built when missing, damaged
    or stale. The cache's name holds the source, size, crop, max-images and a fingerprint of the source's files."""
    source, entries = find_images(args.data)
    if not entries and args.download and args.dataset == "celeba":
        try:
            socket.setdefaulttimeout(30)  # behind a firewall: fail in 30 s rather than hang
            importlib.import_module("torchvision.datasets").CelebA(args.data, split="all", download=True)
        except Exception as e:  # noqa: BLE001 -- offline, Google Drive quota exceeded, gdown missing...
            die(f"could not download CelebA into {args.data} ({type(e).__name__}: {e}); {HOW_TO_GET['celeba']}")
        source, entries = find_images(args.data)
    if not entries:
        where = show(args.data) + ("" if os.path.exists(args.data) else ", which does not exist")
        die(f"no images ({' '.join(IMAGE_EXTS)}, in folders or a .zip) found at {where}; {HOW_TO_GET[args.dataset]}")
    entries = entries[: args.max_images]
    folder = args.cache_dir or os.path.dirname(os.path.abspath(args.data))  # the cache's: next to the data by default
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        print(f"note: {show(folder)} is not writable, caching the decoded images in ~/.cache/dcgan (see --cache-dir)")
        folder = os.path.join(os.path.expanduser("~"), ".cache", "dcgan")
        os.makedirs(folder, exist_ok=True)
    fingerprint = hashlib.blake2b(repr((CACHE_VERSION, args.size, args.crop, entries)).encode(), digest_size=4)
    stem = os.path.join(folder, os.path.basename(os.path.abspath(args.data)).removesuffix(".zip"))
    stem += f".{args.size}px" + (f".crop{args.crop}" if args.crop else "")
    stem += f".max{args.max_images}" if args.max_images else ""
    path = f"{stem}.{fingerprint.hexdigest()}.u8.npy"
    for tmp in glob.glob(glob.escape(stem) + ".*.tmp-*"):  # left by a build that crashed or was killed
        try:  # signal 0 to the process that writes it: is it alive?
            os.kill(int(tmp.rsplit("-", 1)[1].removesuffix(".json")), 0)
        except (ValueError, ProcessLookupError):
            Path(tmp).unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass
    data, status = open_cache(path)
    if data is None:
        t0 = time.perf_counter()
        build_cache(source, [e[0] for e in entries], path, args.size, args.crop, args.workers)
        status += f" in {time.perf_counter() - t0:.1f} s"
        data = np.load(path, mmap_mode="r")
        for old in glob.glob(glob.escape(stem) + "." + "[0-9a-f]" * 8 + ".u8.npy"):  # this source before it changed
            with contextlib.suppress(OSError, ValueError, KeyError):  # another source's, or another run removes it
                if old != path and json.loads(Path(old + ".json").read_text())["source"] == os.path.abspath(source):
                    for p in (old, old + ".json"):
                        Path(p).unlink(missing_ok=True)
    meta = json.loads(Path(path + ".json").read_text())
    if meta["skipped"]:
        names = ", ".join(meta["skipped_names"]) + (", ..." if meta["skipped"] > len(meta["skipped_names"]) else "")
        print(f"warning: skipped {meta['skipped']} unreadable file(s) in {show(source)}: {names}", file=sys.stderr)
    print(f"data: {len(data)} images from {show(args.data)} (cache {show(path)}, {status})")
    return data


def synthetic_faces(n, size, seed=0):
    """n cartoon faces, uint8 (n, 3, size, size), the same whatever --seed: soft-edged implicit shapes, in numpy, which
    is single-threaded: OpenMP threads fighting over a busy CPU slow torch's version down 30-fold."""
    p = np.random.default_rng(seed).random((n, 20), dtype=np.float32)  # one row per image: image i ignores n
    skin_tones = np.array([[0.98, 0.84, 0.72], [0.9, 0.7, 0.55], [0.76, 0.55, 0.4], [0.52, 0.36, 0.25]], np.float32)
    hair_tones = np.array([[0.08, 0.06, 0.05], [0.3, 0.18, 0.09], [0.55, 0.38, 0.2], [0.88, 0.74, 0.45],
                           [0.62, 0.24, 0.1], [0.65, 0.65, 0.65]], np.float32)  # fmt: skip
    t = p[:, 0] * 3
    i = np.minimum(t.astype(int), 2)
    skin = skin_tones[i] + (skin_tones[i + 1] - skin_tones[i]) * (t - i)[:, None]
    hair = hair_tones[(p[:, 1] * 6).astype(int)] * (0.8 + 0.4 * p[:, 2:3])
    iris = np.array([[0.3, 0.18, 0.08], [0.2, 0.4, 0.7], [0.25, 0.5, 0.3]], np.float32)[(p[:, 3] * 3).astype(int)]
    bg, lips, white = 0.15 + 0.7 * p[:, 17:20], np.array([0.65, 0.2, 0.2], np.float32), np.ones(3, np.float32)
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(lin, lin, indexing="ij")

    def soft(dist, scale):  # alpha inside an implicit shape (dist < 0), with a one-pixel ramp: antialiased edges
        return np.clip(0.5 - dist * (scale * size / 2), 0, 1)

    def paint(img, colour, alpha):
        return img + (colour.reshape(-1, 3, 1, 1) - img) * alpha[:, None]

    out, per_chunk = np.empty((n, 3, size, size), np.uint8), max(1, 2**18 // size**2)
    for a in range(0, n, per_chunk):
        q, b = p[a : a + per_chunk, 4:15, None, None], slice(a, a + per_chunk)
        cx, cy, rx = (q[:, 0] - 0.5) * 0.3, 0.05 + (q[:, 1] - 0.5) * 0.25, 0.42 + 0.18 * q[:, 2]
        ry, tilt = rx * (1.15 + 0.2 * q[:, 3]), (q[:, 4] - 0.5) * 0.6
        u = ((x - cx) * np.cos(tilt) + (y - cy) * np.sin(tilt)) / rx  # head coordinates: the head is the unit disc
        v = ((y - cy) * np.cos(tilt) - (x - cx) * np.sin(tilt)) / ry
        r = np.sqrt(u**2 + v**2)
        head = soft(r - 1, rx)
        long_hair = soft(np.maximum(np.maximum(np.abs(u) - 1.15, v - 0.4 - 1.2 * q[:, 5]), -0.3 - v), rx)  # a box
        hair_a = np.maximum(soft(np.sqrt((u / 1.15) ** 2 + ((v + 0.12) / 1.1) ** 2) - 1, rx), long_hair)
        fringe = hair_a * soft(v + 0.45 + 0.2 * q[:, 6] * (1 - u**2) + 0.05 * np.sin(u * 9), ry)
        erx, ery = 0.13 + 0.05 * q[:, 7], 0.09 + 0.03 * q[:, 7]
        eye = np.sqrt(((np.abs(u) - 0.38) / erx) ** 2 + ((v + 0.05) / ery) ** 2)  # both eyes: mirrored in u
        smile = v - 0.5 - (0.35 * q[:, 8] - 0.1) * (1 - (u / 0.35) ** 2)
        mouth = soft(np.maximum(np.abs(smile) - 0.04 - 0.04 * q[:, 9], np.abs(u) - 0.3 - 0.1 * q[:, 10]), ry)
        img = bg[b, :, None, None] * (1.1 - 0.25 * (y + 1) / 2)  # background lit from above
        img = paint(img, hair[b], hair_a)
        img = paint(img, skin[b], head) * (1 - 0.15 * np.minimum(r * head, 1) ** 2)[:, None]  # shaded: rounder
        img = paint(img, hair[b], fringe)
        img = paint(img, white, head * soft(eye - 1, erx * rx))
        img = paint(img, iris[b], head * soft(eye - 0.55, erx * rx))
        out[b] = np.clip(paint(img, lips, head * mouth) * 255 + 0.5, 0, 255)
    return torch.from_numpy(out)


def load_dataset(args):
    """The training images, uint8 (N, C, S, S): a tensor (synthetic, cifar10) or the memory map of a cache (celeba)."""
    if args.dataset == "synthetic":
        t0 = time.perf_counter()
        data = synthetic_faces(args.max_images or min(4096, 2**18 // args.size), args.size)  # 4096, 2048 or 1024
        print(f"data: {len(data)} synthetic {args.size}px faces (generated in {time.perf_counter() - t0:.1f} s)")
    elif args.dataset == "cifar10":
        where = os.path.join(args.data, "cifar-10-batches-py")
        try:
            socket.setdefaulttimeout(30)
            cifar = importlib.import_module("torchvision.datasets").CIFAR10(args.data, train=True, download=True)
        except Exception as e:  # noqa: BLE001 -- offline, proxy, disk full...
            die(f"CIFAR-10 is not in {where} and could not be downloaded ({type(e).__name__}: {e}); download "
                "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into "
                f"{args.data}")  # fmt: skip
        data = torch.from_numpy(cifar.data[: args.max_images]).permute(0, 3, 1, 2).contiguous()
        print(f"data: {len(data)} images from {show(where)}")
    else:
        data = load_image_folder(args)
    colour = any((data[i : i + 256, 1:] != data[i : i + 256, :1]).any() for i in range(0, len(data), 256))
    if args.channels == 1 and colour:
        die(f"--channels 1 takes gray images, but some of {args.dataset}'s are in colour: convert them first")
    args.channels = args.channels or (3 if colour else 1)  # gray (R = G = B): a gray G, no colour for D to catch
    return data[:, : args.channels]


class BatchSource:
    """Shuffled uint8 batches (B, C, S, S) on `device`, in an order set by (seed, epoch) alone: a resumed run sees the
    very batches it would have seen. The whole set on the GPU when it fits --data-memory, else gathered on the host from
    the array or the cache's memory map (reclaimable file cache), for CUDA via a pinned buffer copied asynchronously."""

    def __init__(self, data, args, device):
        if len(data) < args.batch_size:
            die(f"the data set has {len(data)} images, fewer than --batch-size {args.batch_size}")
        self.device, self.batch_size, self.seed, self.n = torch.device(device), args.batch_size, args.seed, len(data)
        # a memory map stays open for the whole run: a cache rebuilt or deleted meanwhile is another file
        self.data = data.numpy() if isinstance(data, torch.Tensor) else data
        where = f"the cache file {show(data.filename)}" if isinstance(data, np.memmap) else "host memory"
        where = f"gathered from {where}"
        if self.device.type == "cuda":  # the pinned buffer each batch is gathered into, and the copy out of it
            self.staging = torch.empty((self.batch_size, *data.shape[1:]), dtype=torch.uint8, pin_memory=True)
            self.copied = torch.cuda.Event()
            free = torch.cuda.mem_get_info(self.device)[0]
        elif self.device.type == "mps":  # a Mac's GPU shares the RAM: its recommended share of it
            free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        if self.device.type != "cpu" and self.data.nbytes <= (
            0.4 * free if args.data_memory is None else args.data_memory * 1e9
        ):
            on_gpu = torch.empty(data.shape, dtype=torch.uint8, device=self.device)
            for i in range(0, self.n, self.batch_size):  # batch by batch: no second copy of the set in RAM
                on_gpu[i : i + self.batch_size] = self.gather(np.arange(i, min(i + self.batch_size, self.n)))
            self.data, where = on_gpu, f"the whole set on {self.device}"
        print(f"batches: {where} ({self.data.nbytes / 1e9:.2f} GB; channels: {self.data.shape[1]})")

    def __len__(self):
        return self.n // self.batch_size

    def epoch(self, epoch, start=0):
        """Yield batches start..len-1 of 0-based `epoch`."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        order = order[: len(self) * self.batch_size].view(len(self), self.batch_size)
        order = order.sort(dim=1).values  # sorted: a memory map reads the file front to back
        order = order.to(self.device) if isinstance(self.data, torch.Tensor) else order.numpy()
        for step in range(start, len(self)):
            yield self.gather(order[step])

    def gather(self, idx):  # rows idx -> a batch on the device
        if isinstance(self.data, torch.Tensor):  # on the GPU: a gather kernel, no host work, no sync
            return self.data[idx]
        if self.device.type != "cuda":  # a fresh tensor (CPU; MPS: copied there): callers may keep batches
            return torch.from_numpy(self.data[idx]).to(self.device)
        self.copied.synchronize()  # batch k's copy out of the buffer, which the GPU runs after step k-1
        buf = self.staging[: len(idx)]
        np.take(self.data, idx, axis=0, out=buf.numpy(), mode="clip")  # clip: no intermediate copy (idx is valid)
        batch = buf.to(self.device, non_blocking=True)
        self.copied.record()
        return batch


def preprocess(batch, args):
    """uint8 [0, 255] -> float [-1, 1], randomly mirrored with --flip, in the networks' memory format."""
    x = batch.float().div_(127.5).sub_(1)
    if args.flip:  # on the device, one coin per image, as torchvision's RandomHorizontalFlip
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x.contiguous(memory_format=memory_format(x.device))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and outputs


def atomic_write(path, write, sync=False):
    """write(file) to a temporary file, then rename: a crash at any moment leaves the previous file whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:  # the folder too: the first file written makes it (a run stopped while its data loads leaves none)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C: no half-written temporary file stays behind
        with contextlib.suppress(OSError):  # (nor a folder, when it was the folder that failed)
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save: a RuntimeError raised over the OSError
        if not isinstance(cause, OSError) or not isinstance(e, Exception):
            raise
        die(f"could not write {path}: {cause.strerror or cause}. Files written before are intact.", 1)


def tile(images, nrow):
    """uint8 (N, C, H, W) -> (C, H', W') as torchvision's make_grid, whose import would double --help's start-up."""
    n, c, h, w = images.shape
    grid = images.new_zeros(c, 2 + (h + 2) * -(-n // nrow), 2 + (w + 2) * min(n, nrow))
    for i, image in enumerate(images):
        y, x = 2 + (h + 2) * (i // nrow), 2 + (w + 2) * (i % nrow)
        grid[:, y : y + h, x : x + w] = image
    return grid


def save_png(images, path):
    """uint8 (N, C, H, W) as one PNG: the image when N is 1, else a grid 8 wide; zlib level 1, 5x faster than 6."""
    arr = (images[0] if len(images) == 1 else tile(images, 8)).permute(1, 2, 0).squeeze(-1).numpy()
    atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG", compress_level=1))


def to_uint8(x):
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()


def sample(m, fixed_noise):
    """The fixed-noise images, uint8, from the EMA of G when there is one."""
    net = m.ema if m.ema is not None else m.G.eval()  # the EMA copy is always in eval mode
    with torch.no_grad(), m.autocast():
        images = to_uint8(net(fixed_noise))
    m.G.train()
    return images


def save_checkpoint(path, m, step, steps_per_epoch, args, fixed_noise):
    ck = {
        "script": SCRIPT, "generator": m.G.state_dict(), "discriminator": m.D.state_dict(),
        "opt_g": m.opt_g.state_dict(), "opt_d": m.opt_d.state_dict(),
        "scaler_g": m.scaler_g.state_dict(), "scaler_d": m.scaler_d.state_dict(),
        "step": step, "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch, "args": vars(args),
        "fixed_noise": fixed_noise.cpu(), "rng_cpu": torch.get_rng_state(),
    }  # fmt: skip
    if m.ema is not None:
        ck["ema"] = m.ema.state_dict()
    if fixed_noise.device.type in ("cuda", "mps"):  # the GPU's own generator: torch.cuda's or torch.mps's
        ck[f"rng_{fixed_noise.device.type}"] = getattr(torch, fixed_noise.device.type).get_rng_state()
    atomic_write(path, lambda f: torch.save(ck, f), sync=True)


def load_checkpoint(path):
    """Plain data only: weights_only=True refuses a pickle that would run code, before running any of it."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle makes torch warn before it fails: one message is enough
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (code in the pickle, truncated zip, random bytes, empty file)
        if "GLOBAL " in str(e):  # it names a function or class to call
            die(f"{path} holds objects other than plain data ({str(e).split('GLOBAL ')[1].split()[0]}); refused, "
                "nothing in it was executed")  # fmt: skip
        die(f"{path} is not a readable checkpoint: truncated, corrupt or not a checkpoint ({type(e).__name__})")
    script = ck.get("script", "an unknown program") if isinstance(ck, dict) else "an unknown program"
    if script != SCRIPT:
        die(f"{path} was written by {script}, not {SCRIPT}")
    return ck


def load_weights(net, state):
    try:  # a checkpoint of other networks, from another version of this script: one line, not a traceback
        net.load_state_dict(state)
    except RuntimeError:
        die(f"the checkpoint's {type(net).__name__} has other layers than this version of {SCRIPT} builds")


def own_fused(state, opt):  # load_state_dict would take the saved "fused": a CPU run resumed on CUDA, and back
    return state | {"param_groups": [g | {"fused": opt.param_groups[0]["fused"]} for g in state["param_groups"]]}


def restore(m, ck, args, device):
    """Put a checkpoint's weights, optimizers, scalers and RNG states back; returns (step, fixed_noise).
    The flags of this command line win: learning rates, betas, --d-optim, --amp, --ema may differ from the run's."""
    load_weights(m.G, ck["generator"])
    load_weights(m.D, ck["discriminator"])
    m.opt_g.load_state_dict(own_fused(ck["opt_g"], m.opt_g))
    if ck["args"].get("d_optim", "adam") == args.d_optim:
        m.opt_d.load_state_dict(own_fused(ck["opt_d"], m.opt_d))
    else:
        print(f"resume: --d-optim {args.d_optim}: D's optimizer starts afresh (the run used {ck['args']['d_optim']})")
    for opt, lr in ((m.opt_g, args.lr_g), (m.opt_d, args.lr_d)):
        for group in opt.param_groups:  # SGD ignores the betas
            group.update(lr=lr, betas=(args.beta1, args.beta2))
    if m.ema is not None:
        load_weights(m.ema, ck.get("ema") or ck["generator"])
    for scaler, key in ((m.scaler_g, "scaler_g"), (m.scaler_d, "scaler_d")):
        if scaler.is_enabled() and ck.get(key):  # a run that was not fp16 has no scale yet: start from the default
            scaler.load_state_dict(ck[key])
    torch.set_rng_state(ck["rng_cpu"])
    if device.type != "cpu" and f"rng_{device.type}" in ck:  # cuda or mps: the same kind of GPU wrote it
        getattr(torch, device.type).set_rng_state(ck[f"rng_{device.type}"])
    return ck["step"], ck["fixed_noise"].to(device)


def load_generator(path, device="cpu"):
    """The generator a checkpoint describes, with its EMA weights when it has them, in eval mode on `device`."""
    ck = load_checkpoint(path)
    a = ck["args"]
    G = Generator(a["nz"], a["ngf"], a.get("channels") or NC, a["size"], a.get("g_act", "relu"))
    load_weights(G, ck.get("ema") or ck["generator"])
    return G.to(device).eval()


class Log:
    """losses.csv (and TensorBoard): statistics stay on the device and are written every --log-every steps."""

    def __init__(self, args, step, tensorboard=None):
        self.path, self.out, self.saved = os.path.join(args.out, "losses.csv"), args.out, step
        kept = []
        if os.path.exists(self.path):  # rows past the checkpoint (written before a crash) would repeat
            with open(self.path, newline="") as f:
                kept = [r for r in list(csv.reader(f))[1:] if len(r) >= 6 and r[0].isdigit() and int(r[0]) <= step]
        atomic_write(self.path, lambda f: f.write("".join(",".join(r) + "\n" for r in [COLUMNS, *kept]).encode()))
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 (open for the whole run)
        self.pending = []  # [loss_d, loss_g, d_real, d_fake] of each step since the last flush, on the device
        self.tb = tensorboard.SummaryWriter(os.path.join(args.out, "tb")) if tensorboard else None

    def flush(self, step, epoch):
        """Write the buffered rows and return the last; stop the run at the first non-finite one."""
        values, self.pending = torch.stack(self.pending).tolist(), []
        try:  # the disk write happens at flush(): both belong in the try
            for i, v in enumerate(values, step - len(values) + 1):
                if not all(map(math.isfinite, v)):
                    self.file.flush()
                    self.diverged(f"the losses at step {i}")
                self.file.write(f"{i},{epoch}," + ",".join(f"{x:.6g}" for x in v) + "\n")
                for name, x in zip(COLUMNS[2:], v if self.tb else []):
                    self.tb.add_scalar(name, x, i)
            self.file.flush()
        except OSError as e:
            die(f"could not write {self.path}: {e.strerror}. Files written before are intact.", 1)
        return values[-1]

    def diverged(self, what):
        die(f"{what} became NaN or infinite: training stopped. The last good checkpoint (step {self.saved}) is kept "
            f"in {self.out}. Lower --lr-d/--lr-g or add --spectral-norm or --clip-grad, then --resume.", 3)  # fmt: skip


def setup(args):
    """Seed, device and precision, one line each."""
    torch.manual_seed(args.seed)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(k for k, ok in available.items() if ok) if args.device == "auto" else args.device
    if not available[name]:
        die(f"--device {name}: not available on this machine")
    device = torch.device(name)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not args.deterministic  # fixed shapes: let cuDNN time its kernels once
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.deterministic
    amp = args.amp  # auto: bf16 where the hardware runs it natively, else fp16 with GradScaler on GPUs, off on CPUs
    if amp == "auto" and device.type == "cuda":  # T4/V100-class GPUs emulate bf16, slowly: fp16 there
        amp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    elif amp == "auto":
        cpu = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
        amp = "bf16" if device.type == "cpu" and ("avx512_bf16" in cpu or "amx_bf16" in cpu) else "off"
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"seed: {args.seed}\ndevice: {device}{gpu}\namp: {amp}")
    return device, amp


# ----------------------------------------------------------------------------------------------------------------
# Training


def train(args, ck=None):
    if not ck and any(os.path.exists(os.path.join(args.out, f)) for f in ("checkpoint.pt", "losses.csv")):
        die(f"--out {args.out} already holds a run: add --resume to continue it, or choose another --out")
    try:  # imported lazily, and a refusal at start-up leaves nothing behind
        tensorboard = importlib.import_module("torch.utils.tensorboard") if args.tensorboard else None
    except ImportError:
        die("--tensorboard needs the tensorboard package: pip install tensorboard")
    device, amp = setup(args)
    batches = BatchSource(load_dataset(args), args, device)
    for leftover in Path(args.out).rglob("*.tmp[0-9]*"):  # what a killed run left half-written
        leftover.unlink(missing_ok=True)
    m = build(args, device, amp)
    steps_per_epoch = len(batches)
    total = 1 if args.dry_run else min(args.max_steps or 1 << 62, args.epochs * steps_per_epoch)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if ck:
        if ck.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:  # the epochs and data order would shift
            die(f"--resume: an epoch is {steps_per_epoch} steps here but {ck['steps_per_epoch']} in the run: "
                "keep its --batch-size, --max-images and --data")  # fmt: skip
        step, fixed_noise = restore(m, ck, args, device)
        print(f"resume: step {step} (epoch {step // steps_per_epoch}) from {ckpt_path}")
    else:
        step = 0
        fixed_noise = torch.randn(64, args.nz, 1, 1, generator=torch.Generator().manual_seed(args.seed)).to(device)
        real = torch.cat(list(itertools.islice(batches.epoch(0), -(-64 // args.batch_size))))  # 64, whatever the batch
        real = real.repeat(-(-64 // len(real)), 1, 1, 1)[:64]  # a data set of fewer than 64 images fills the grid
        save_png(to_uint8(preprocess(real, args)), os.path.join(args.out, "samples", "real.png"))
        save_checkpoint(ckpt_path, m, 0, steps_per_epoch, args, fixed_noise)  # a run is resumable from its start
    params = {k: sum(p.numel() for p in net.parameters()) for k, net in (("generator", m.G), ("discriminator", m.D))}
    config = vars(args) | {
        "resolved_device": str(device), "resolved_amp": amp, "data_size": len(batches.data),
        "steps_per_epoch": steps_per_epoch, "total_steps": total, "parameters": params, "resumed_at_step": step,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "torchvision": importlib.metadata.version("torchvision"), "numpy": np.__version__},
    }  # fmt: skip
    atomic_write(os.path.join(args.out, "config.json"), lambda f: f.write(json.dumps(config, indent=2).encode()))
    log = Log(args, step, tensorboard)
    if step >= total:
        print(f"the run in {args.out} is already at step {step} of {total}: raise --epochs or --max-steps to go on")
        return
    stop = []  # the signal that asked us to stop: the step in flight finishes, then everything is saved

    def on_signal(signum, frame):
        stop.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    print(f"training: {total - step} steps to go, {steps_per_epoch} per epoch, batch {args.batch_size}, out {args.out}")
    while step < total and not stop:
        epoch, t0, start = step // steps_per_epoch, time.time(), step
        bar = tqdm(total=steps_per_epoch * args.batch_size, initial=(step % steps_per_epoch) * args.batch_size,
                   unit="img", unit_scale=True, desc=f"epoch {epoch + 1}", disable=None, leave=False)  # fmt: skip
        for real in batches.epoch(epoch, step % steps_per_epoch):
            log.pending.append(train_step(m, preprocess(real, args), args, step, args.epochs * steps_per_epoch))
            step += 1
            bar.update(args.batch_size)
            epoch_end, last = step % steps_per_epoch == 0, step >= total or bool(stop)
            save = epoch_end or last or bool(args.save_every and step % args.save_every == 0)
            if len(log.pending) == args.log_every or save:
                r = log.flush(step, epoch + 1)  # the one host-device sync per --log-every steps
                stats = f"loss_d {r[0]:.3f}  loss_g {r[1]:.3f}  D(x) {r[2]:.2f}  D(G(z)) {r[3]:.2f}"
                bar.set_postfix_str(stats)
            if args.sample_every and step % args.sample_every == 0:
                save_png(sample(m, fixed_noise), os.path.join(args.out, "samples", f"step_{step:07d}.png"))
            if epoch_end or last:
                images = sample(m, fixed_noise)
                save_png(images, os.path.join(args.out, "samples", f"epoch_{epoch + 1:03d}.png"))
                if log.tb:
                    log.tb.add_images("samples", images, step)
            if save:
                if not all(p.isfinite().all() for p in (*m.G.parameters(), *m.D.parameters())):
                    log.diverged(f"weights at step {step}")
                save_checkpoint(ckpt_path, m, step, steps_per_epoch, args, fixed_noise)
                log.saved = step
            if last:
                break
        bar.close()
        dt = time.time() - t0
        print(f"epoch {epoch + 1}/{args.epochs}  step {step}  {stats}  "
              f"{(step - start) * args.batch_size / dt:.0f} img/s  {dt:.1f} s")  # fmt: skip
    if stop:
        name = signal.Signals(stop[0]).name
        print(f"{name}: stopped after step {step}; checkpoint and samples saved in {args.out}. "
              f"Continue with: python {SCRIPT} --out {args.out} --resume")  # fmt: skip
        sys.exit(128 + stop[0])
    print(f"done: {step} steps, samples in {os.path.join(args.out, 'samples')}, checkpoint {ckpt_path}")


# ----------------------------------------------------------------------------------------------------------------
# No-training modes


def generate(args):
    device, _ = setup(args)
    G = load_generator(args.checkpoint or os.path.join(args.out, "checkpoint.pt"), device)
    folder = os.path.join(args.out, "generated")
    with torch.no_grad():
        images = torch.cat([to_uint8(G(torch.randn(min(256, args.generate - i), G.nz, 1, 1, device=device)))
                            for i in range(0, args.generate, 256)])  # fmt: skip
    for i, img in enumerate(tqdm(images, desc="writing", disable=None)):
        save_png(img[None], os.path.join(folder, f"{i:06d}.png"))
    save_png(images[:64], os.path.join(args.out, "generated_grid.png"))  # beside: FID tools read the whole folder
    print(f"wrote {len(images)} images to {folder}, the first 64 as a grid in generated_grid.png beside it")


def interpolate(args):
    import imageio.v3 as iio

    def slerp(a, b, t):  # spherical: Gaussian latents live near a sphere (White 2016, https://arxiv.org/abs/1609.04468)
        omega = torch.acos((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1, keepdim=True).clamp(-1, 1))
        return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega).clamp_min(1e-6)

    device, _ = setup(args)
    G = load_generator(args.checkpoint or os.path.join(args.out, "checkpoint.pt"), device)
    keys = torch.randn(4, 16, G.nz, device=device)  # 16 walks through 4 points and back
    frames = []
    with torch.no_grad():
        for a, b in zip(keys, keys.roll(-1, 0)):
            for t in torch.arange(args.interpolate) / args.interpolate:
                frames.append(tile(to_uint8(G(slerp(a, b, t)[..., None, None])), 4).movedim(0, -1).squeeze(-1).numpy())
    path = os.path.join(args.out, "interpolation.gif")
    atomic_write(path, lambda f: iio.imwrite(f, np.stack(frames), extension=".gif", duration=80, loop=0))
    print(f"wrote {path}: {len(frames)} frames")


def summary(args):
    m = build(args, torch.device("cpu"), "off")
    x = torch.zeros(1, args.nz, 1, 1)  # through G, then its image through D
    for name, net in (("Generator", m.G), ("Discriminator", m.D)):
        print(f"{name}\n  {'layer':<34}{'output shape':>20}{'parameters':>14}")
        layers = [layer for part in net.children() for layer in (part if isinstance(part, nn.Sequential) else [part])]
        for i, layer in enumerate(layers):  # each layer prints its line as the forward pass reaches it
            row = f"  {i:>2} {type(layer).__name__:<31}{{:>20}}{sum(p.numel() for p in layer.parameters()):>14,}"
            layer.register_forward_hook(lambda _, x, y, row=row: print(row.format(str(tuple(y.shape[1:])))))
        with torch.no_grad():
            x = net.eval()(x)
        print(f"  total parameters: {sum(p.numel() for p in net.parameters()):,}\n")


def benchmark(args):
    from torch.utils.flop_counter import FlopCounterMode

    device, amp = setup(args)
    m = build(args, device, amp)
    shape = (args.batch_size, args.channels or NC, args.size, args.size)
    real = preprocess(torch.randint(0, 256, shape, dtype=torch.uint8, device=device), args)
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    no_r1 = SimpleNamespace(**vars(args) | {"r1": 0})  # R1's autograd.grad fails under FlopCounterMode: not counted
    with FlopCounterMode(display=False) as counter:  # counts on the eager modules, before any compilation
        train_step(SimpleNamespace(**vars(m) | {"net_g": m.G, "net_d": m.D}), real, no_r1, 0, 1)
    for step in range(5 + args.benchmark):
        if step == 5:  # after the warm-up: cuDNN autotuning, torch.compile, allocator
            sync()
            t0 = time.perf_counter()
        train_step(m, real, args, step, 5 + args.benchmark)
    sync()
    dt = time.perf_counter() - t0
    flops = counter.get_total_flops()
    print(f"benchmark: {args.benchmark} steps x {args.batch_size} images in {dt:.2f} s: "
          f"{args.benchmark * args.batch_size / dt:,.0f} images/s, {flops * args.benchmark / dt / 1e12:.3f} TFLOP/s "
          f"({flops / 1e9:.2f} GFLOP per step; device {device}, amp {amp}, compile {args.compile})")  # fmt: skip


def main(argv=None):
    args, ck = parse_args(argv)
    try:
        for mode in (summary, benchmark, generate, interpolate):
            if getattr(args, mode.__name__):
                return mode(args)
        train(args, ck)
    except KeyboardInterrupt:  # before training started (data loading): nothing half-written to clean up
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
