"""Turn a run's fixed-noise sample grids into an animated GIF (or MP4) of training progress.

    python make_gif.py runs/celeba64                      # samples/epoch_*.png -> runs/celeba64/training.gif
    python make_gif.py runs/celeba64 --steps --label      # samples/step_*.png -> runs/celeba64/training_steps.gif
    python make_gif.py runs/mnist28 --first 16 --fps 4 --hold-last 3
    python make_gif.py "runs/celeba64/samples/epoch_0*.png" --out progress.gif    # a quoted glob pattern
    python make_gif.py runs/celeba128 --max-size 512 --out runs/celeba128/training.mp4    # needs imageio-ffmpeg

A directory is a run directory (its samples/ folder is read) or a folder of sample PNGs. Files from a directory or
a glob pattern go in the numeric order of the last number in their names; files named one by one keep their order.
"""

import argparse
import functools
import glob
import importlib.util
import math
import re
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

PAD, NROW = 2, 8  # grid geometry of the training scripts: 8 images per row, 2 px padding between and around


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # a default of None is described in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("inputs", nargs="+", help="run directory, or PNG files / quoted glob patterns of sample grids")
    p.add_argument("--steps", action="store_true", help="use samples/step_*.png instead of samples/epoch_*.png")
    p.add_argument(
        "--out",
        help="output .gif or .mp4 [default: training.gif (training_steps.gif with --steps) in the run directory: "
        "the first input if a directory, else its folder; the one above if that is a samples/ folder]",
    )
    p.add_argument("--fps", type=float, default=2.0, help="frames per second")
    p.add_argument("--hold-last", type=float, default=2.0, help="seconds the last frame stays on screen (0: 1/fps)")
    p.add_argument("--label", action="store_true", help="stamp 'epoch N' / 'step N' from the file name in a band above")
    p.add_argument("--max-size", type=int, default=0, help="downscale frames whose longer side exceeds this (0: off)")
    p.add_argument("--first", type=int, default=0, help="keep the first N images of each grid, re-tiled (0: all)")
    p.add_argument("--loop", type=int, default=0, help="how many times the GIF loops (0: forever)")
    args = p.parse_args(argv)
    if args.fps <= 0 or min(args.hold_last, args.max_size, args.first, args.loop) < 0:
        p.error("--fps must be > 0; --hold-last, --max-size, --first and --loop must be >= 0")
    return args


def numeric_order(path):
    nums = re.findall(r"\d+", path.stem)
    return (int(nums[-1]) if nums else -1, path.name)


def find_frames(args):
    """Expand the positional arguments to a list of PNG paths (order: see the module docstring)."""
    kind, files = "step" if args.steps else "epoch", []
    for arg in args.inputs:
        path = Path(arg)
        if path.is_file():
            files.append(path)
            continue
        if path.is_dir():
            folder = path / "samples" if (path / "samples").is_dir() else path
            pattern = str(folder / f"{kind}_*.png")
        elif glob.has_magic(arg):
            pattern = arg
        else:
            raise UsageError(f"no such file or directory: {arg}")
        found = sorted((Path(f) for f in glob.glob(pattern)), key=numeric_order)
        if not found:
            raise UsageError(f"no samples found: looked for {pattern}")
        files += found
    return files


def crop_first(img, n, path):
    """Cut the first n cells out of an 8-per-row grid and tile them again, as square as they go."""
    w, h = img.size
    step, rest = divmod(w - PAD, NROW)  # a cell and the padding after it
    if rest or step <= PAD or (h - PAD) % step:
        raise UsageError(f"--first: {path} ({w}x{h}) is not a grid of {NROW} images per row with {PAD}px padding")
    size, count, cols = step - PAD, NROW * ((h - PAD) // step), math.ceil(math.sqrt(n))
    if n > count:
        raise UsageError(f"--first {n}: {path} holds only {count} images")
    out = Image.new(img.mode, (cols * step + PAD, math.ceil(n / cols) * step + PAD), img.getpixel((0, 0)))  # border
    for i in range(n):
        x, y = PAD + (i % NROW) * step, PAD + (i // NROW) * step
        out.paste(img.crop((x, y, x + size, y + size)), (PAD + (i % cols) * step, PAD + (i // cols) * step))
    return out


@functools.lru_cache
def label_font(width):
    """The font of the label on a frame this wide, and the height of the band that holds it."""
    try:  # a size readable on a 242 px MNIST grid, not shouting on a 530 px one
        font = ImageFont.load_default(size=max(10, width // 24))
    except (ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    return font, font.getbbox("epoch 0123456789")[3] + 6


def load_frames(files, args):
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.copy())
        except OSError as e:
            raise UsageError(f"cannot read {f}: {e}") from None
        if images[-1].size != images[0].size:
            (w, h), (w0, h0) = images[-1].size, images[0].size
            raise UsageError(f"frame size differs: {f} is {w}x{h} but {files[0]} is {w0}x{h0}")
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"  # gray MNIST grids stay gray
    frames = []
    for f, im in zip(files, images):
        im = im.convert(mode)
        if args.first:
            im = crop_first(im, args.first, f)
        if args.max_size:  # the band shrinks with the width, so the one of the unlabelled fit leaves room enough
            scale = min(1.0, args.max_size / max(im.size))
            room = args.max_size - (label_font(round(im.width * scale))[1] if args.label else 0)
            if room < 1:
                raise UsageError(f"--max-size {args.max_size} is too small for a labelled frame")
            scale = min(scale, room / im.height)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        if args.label:
            m = re.match(r"(epoch|step)_0*(\d+)$", f.stem)
            font, band = label_font(im.width)
            im = ImageOps.expand(im, (0, band, 0, 0), fill=0)  # a black band above
            ImageDraw.Draw(im).text((4, 3), f"{m[1]} {m[2]}" if m else f.stem, fill="white", font=font)
        frames.append(np.asarray(im))
    return frames


def main(argv=None):
    args = parse_args(argv)
    out = None
    try:
        files = find_frames(args)
        run_dir = files[0].parent.parent if files[0].parent.name == "samples" else files[0].parent
        out = Path(args.out) if args.out else run_dir / ("training_steps.gif" if args.steps else "training.gif")
        if out.suffix.lower() == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
            raise UsageError("writing .mp4 needs imageio's ffmpeg plugin: pip install imageio-ffmpeg (or write a .gif)")
        frames = load_frames(files, args)
        h, w = frames[0].shape[:2]
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".mp4":  # yuv420p wants even sides: pad with black rather than let imageio rescale
            video = [np.pad(np.atleast_3d(f), ((0, h % 2), (0, w % 2), (0, 0))) for f in frames]
            video = [np.repeat(f, 3, axis=2) if f.shape[2] == 1 else f for f in video]
            video += [video[-1]] * max(0, round(args.hold_last * args.fps) - 1)  # --hold-last repeats the last frame
            out.open("wb").close()  # fail here, with a clear message, if out cannot be written
            iio.imwrite(out, np.stack(video), plugin="FFMPEG", fps=args.fps, macro_block_size=2)
        else:
            ms = [round(1000 / args.fps)] * len(frames)  # imageio v3's pillow plugin takes milliseconds
            ms[-1] = round(1000 * args.hold_last) or ms[-1]
            # Pillow merges identical consecutive frames (adding up their durations); it wants a number for one frame
            kwargs = {"plugin": "pillow", "is_batch": True, "loop": args.loop, "duration": ms if len(ms) > 1 else ms[0]}
            out.write_bytes(iio.imwrite("<bytes>", frames, extension=".gif", **kwargs))  # no half-written file
    except UsageError as e:
        print(f"make_gif.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"make_gif.py: error: {'cannot write ' + str(out) + ': ' if out else ''}{e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(frames)} frame{'s' * (len(frames) != 1)}, {w}x{h}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
