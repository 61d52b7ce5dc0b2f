"""Plot one or more runs' losses.csv: D and G losses on top, D's mean outputs on real and fake images below.

    python plot_losses.py runs/celeba64                       # -> runs/celeba64/losses.png
    python plot_losses.py runs/celeba64 runs/celeba64_sn --out compare.png --log
    python plot_losses.py runs/mnist28/losses.csv --x epoch --smooth 0.98 --size 12 8 --dpi 150

Raw values are drawn faint with an exponential moving average on top; epoch boundaries of the first run are
marked with faint vertical lines. A truncated last line (a run still writing) is skipped with a warning.
"""

import argparse
import csv
import io
import math
import sys
from pathlib import Path

import matplotlib
import numpy as np

COLUMNS = ("step", "epoch", "loss_d", "loss_g", "d_real", "d_fake")


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # a default of None is described in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("runs", nargs="+", help="run directories (their losses.csv is read) or CSV files")
    p.add_argument(
        "--out",
        help="output PNG [default: losses.png in the run directory for one run (<name>.png next "
        "to a CSV given directly), losses.png in the current directory for several]",
    )
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight of the past in [0, 1); 0: no smoothing")
    p.add_argument("--x", choices=("step", "epoch"), default="step", help="x axis: global step or fractional epoch")
    p.add_argument("--log", action="store_true", help="log scale on the loss panel's y axis")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG in pixels per inch")
    p.add_argument("--size", type=float, nargs=2, default=(10.0, 7.0), metavar=("W", "H"), help="figure size, inches")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1 or args.dpi < 1 or min(args.size) <= 0:
        p.error("--smooth must be in [0, 1); --dpi and --size must be positive")
    return args


def read_csv(path):
    """The columns of COLUMNS as float arrays, or None when the file holds no row yet."""
    if not path.is_file():
        hint = " (is the run directory right?)" if path.name == "losses.csv" else ""
        raise UsageError(f"no such file: {path}{hint}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise UsageError(f"cannot parse {path}: {e}") from None
    if not lines:
        raise UsageError(f"{path} is empty: no header")
    header, rows = [name.strip() for name in lines[0]], lines[1:]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)} in the header")
    index = [header.index(c) for c in COLUMNS]
    values = []
    for n, row in enumerate(rows, start=2):
        last = n == len(lines)
        try:
            if last and not text.endswith(("\n", "\r")):  # a writer caught mid-line: the last number may be cut
                raise ValueError
            values.append([float(row[i]) for i in index])
        except (ValueError, IndexError):
            if row:
                what = "truncated last" if last else "malformed"
                print(f"warning: {path}: ignoring {what} line {n}", file=sys.stderr)
    return dict(zip(COLUMNS, np.array(values).T)) if values else None


def ema(x, alpha):
    """Debiased exponential moving average (as TensorBoard's smoothing); non-finite values are skipped."""
    if alpha == 0:
        return x
    out, s, weight = np.empty_like(x), 0.0, 0.0
    for i, v in enumerate(x.tolist()):
        if math.isfinite(v):
            s, weight = alpha * s + (1 - alpha) * v, alpha * weight + (1 - alpha)
        out[i] = s / weight if weight else np.nan
    return out


def epoch_x(step, epoch):
    """Fractional epoch: epoch e covers (e-1, e], each row placed by its step's share of the epoch's steps."""
    keys = np.unique(epoch)
    ends = np.array([step[epoch == e].max() for e in keys])
    starts = np.concatenate([[0 if keys[0] == 1 else step.min() - 1], ends[:-1]])  # step numbers are contiguous
    lengths = ends - starts
    if len(keys) > 1:  # the last epoch may be unfinished: give it the usual length
        lengths[-1] = max(lengths[-1], np.median(lengths[:-1]))
    i = np.searchsorted(keys, epoch)
    return epoch - 1 + (step - starts[i]) / np.maximum(lengths[i], 1)


def plot(runs, args, out):
    matplotlib.use("Agg")  # no display needed (works over SSH); set before pyplot is imported
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=args.size, dpi=args.dpi)
    single = len(runs) == 1
    for k, (name, d) in enumerate(runs):
        x = epoch_x(d["step"], d["epoch"]) if args.x == "epoch" else d["step"]
        for ax, pair in ((top, ("loss_d", "loss_g")), (bottom, ("d_real", "d_fake"))):
            for j, col in enumerate(pair):
                color = f"C{2 * (ax is bottom) + j}" if single else f"C{k % 10}"
                style = "-" if single or j == 0 else "--"
                label = col if single else f"{name} {col}"
                if args.smooth:
                    ax.plot(x, d[col], color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, d[col + "_ema"], color=color, linewidth=1.5, linestyle=style, label=label)
        if k == 0:  # epoch boundaries of the first run, thinned out to at most ~50 lines
            epochs = np.unique(d["epoch"])[:-1]
            for e in epochs[:: 1 + len(epochs) // 50]:
                boundary = e if args.x == "epoch" else d["step"][d["epoch"] == e].max()
                for ax in (top, bottom):
                    ax.axvline(boundary, color="gray", alpha=0.3, linewidth=0.8)
    bottom.axhline(0.5, color="gray", alpha=0.5, linewidth=0.8, linestyle=":")
    top.set(ylabel="loss", yscale="log" if args.log else "linear", title=runs[0][0] if single else None)
    bottom.set(ylabel="D output (probability)", xlabel=args.x, ylim=(-0.02, 1.02))
    for ax in (top, bottom):
        ax.grid(alpha=0.2)
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = None
    try:
        paths = [Path(run) / "losses.csv" if Path(run).is_dir() else Path(run) for run in args.runs]
        runs, empty = [], []
        for path in paths:
            name = str(path.parent if path.name == "losses.csv" else path)
            data = read_csv(path)
            if data is None:
                empty.append(str(path))
            else:
                data.update({c + "_ema": ema(data[c], args.smooth) for c in COLUMNS[2:]})
                runs.append((Path.cwd().name if name == "." else name, data))
        if not runs:
            raise UsageError(f"no rows yet in {', '.join(empty)}: nothing to plot")
        for path in empty:
            print(f"warning: {path}: no rows yet, skipped", file=sys.stderr)
        out = Path(args.out or ("losses.png" if len(paths) > 1 else paths[0].with_suffix(".png")))
        plot(runs, args, out)
    except UsageError as e:
        print(f"plot_losses.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"plot_losses.py: error: cannot write {out}: {e}", file=sys.stderr)
        return 2
    for name, d in runs:
        values = " ".join(f"{c} {d[c + '_ema'][-1]:.3g}" for c in COLUMNS[2:])
        print(f"{name}: step {int(d['step'][-1])} {values}")
    w, h = args.size
    print(f"wrote {out} ({round(w * args.dpi)}x{round(h * args.dpi)} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
