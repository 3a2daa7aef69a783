"""``lcss-prior``: train, export, sample and evaluate LCSS diffusion priors.

    lcss-prior train  --data digits --method lcss --out runs/digits-lcss
    lcss-prior train  --out runs/digits-lcss --resume --steps 8000      # continue (bit-for-bit on CPU)
    lcss-prior export --checkpoint runs/digits-lcss/checkpoints/last.ckpt --out priors/digits
    lcss-prior sample --prior priors/digits --caption "digit 3" --n 16 --out grid.png
    lcss-prior eval   ...                                               (lcss_prior.evaluate)

``sample`` and ``eval`` belong to ``lcss_prior.sampling`` and ``lcss_prior.evaluate``; they are
imported only when their subcommand runs. Every ``train`` setting is checked before training
starts; errors exit with status 2 and a one-line message, and nothing in the output folder is
deleted or overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from typing import Any

PROG = "lcss-prior"
DELEGATED = {
    "sample": ("lcss_prior.sampling", "draw samples from an exported prior into a PNG grid"),
    "eval": ("lcss_prior.evaluate", "bits/dim, FID, KID and classifier accuracy of an exported prior"),
}
TRAIN_LAZY_DEFAULTS = (
    "default: per data set (digits: 8 px, tiny, batch 64, 4000 steps; shapes: 32 px, tiny, 32, 3000)"
)


def _sde_kwarg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as int, float, true/false, or kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--sde-arg must be KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lcss-prior train``. Unset flags are ``None``: they take the data set's defaults,
    or, with ``--resume``, the resumed run's settings."""
    from lcss_prior.train import METHODS

    g = p.add_argument_group("data")
    g.add_argument("--data", help="'digits', 'shapes' or an image folder (class subfolders = captions)")
    g.add_argument("--resolution", type=int, help=TRAIN_LAZY_DEFAULTS)
    g.add_argument("--data-size", type=int, help="shapes: number of rendered views (default 2000)")
    g.add_argument(
        "--data-cache", help="shapes: 'memory' (default) or a file the renders are saved to and reused from"
    )
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")

    g = p.add_argument_group("objective")
    g.add_argument("--method", choices=METHODS, help="score-matching objective (default lcss)")
    g.add_argument("--sde", help="forward SDE: vp, subvp, ve, tanh (non-affine) (default vp)")
    g.add_argument(
        "--sde-arg", type=_sde_kwarg, action="append", metavar="KEY=VALUE", help="SDE constructor argument"
    )
    g.add_argument("--smoothing", type=float, help="LCSS radius c, s_t = c std(t) (default 0.01; keep c^4 D / 2 << 1)")
    g.add_argument("--weighting", help="loss weighting lambda(t): std2 (default) or likelihood")
    g.add_argument("--reduction", choices=("mean", "sum"), help="over data dimensions (default mean)")

    g = p.add_argument_group("network")
    g.add_argument("--preset", help="UNet size: tiny, small, base")
    g.add_argument("--block-out-channels", type=_int_list, help="explicit widths per level, e.g. 32,64,64")
    g.add_argument("--layers-per-block", type=int)
    g.add_argument("--input-scaling", choices=("edm", "none"), help="UNet input scaling (default edm)")
    g.add_argument(
        "--output-scaling",
        choices=("edm", "none"),
        help="edm: eps_hat = c_skip x_t + c_out UNet (stable at large t; default); none: eps_hat = UNet",
    )
    g.add_argument("--p-uncond", type=float, help="classifier-free-guidance label dropout (default 0.1)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", dest="batch_size", type=int, help="batch size per device")
    g.add_argument("--steps", type=int, help="total optimiser steps (may be raised on --resume)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--warmup", dest="warmup_steps", type=int, help="linear warm-up steps (default 200)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--grad-clip", type=float, help="gradient-norm clipping, 0 = off (default 1)")
    g.add_argument(
        "--ema", dest="ema_decay", type=float, help="EMA decay of the exported weights (default 0.999)"
    )
    g.add_argument("--seed", type=int, help="seed of every random draw (default 0)")

    g = p.add_argument_group("output")
    g.add_argument(
        "--out", dest="out_dir", required=True, help="run folder (checkpoints, tb, samples, prior)"
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CKPT",
        help="continue from <out>/checkpoints/last.ckpt (or CKPT)",
    )
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    g.add_argument("--keep-best", action="store_true", default=None, help="also keep best.ckpt (by loss)")
    g.add_argument("--sample-every", type=int, help="steps between sample grids (default 500)")
    g.add_argument("--n-samples", type=int, help="images per sample grid (default 36)")
    g.add_argument("--sample-steps", type=int, help="sampler steps for the grids (default 100)")
    g.add_argument("--log-every", type=int, help="steps between TensorBoard scalars (default 10)")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )

    g = p.add_argument_group("Lightning (multi-GPU / multi-node; passed to pytorch_lightning.Trainer)")
    g.add_argument("--accelerator", help="cpu, gpu, auto (default auto)")
    g.add_argument("--devices", help="number or list of devices, or auto (default auto)")
    g.add_argument("--num-nodes", type=int, help="number of nodes (default 1)")
    g.add_argument(
        "--strategy", help="auto (default) or ddp; sharded (fsdp, deepspeed) and spawning strategies are refused"
    )
    g.add_argument("--precision", help="32-true (default), bf16-mixed, 16-mixed, ...")


def run_train(args: argparse.Namespace) -> Any:
    """``lcss-prior train``: merge flags (and a resumed run's settings), check, train, export."""
    from lcss_prior.train import (
        TrainConfig,
        checkpoint_dir,
        merge_resumed_config,
        read_checkpoint_config,
        train,
    )

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.sde_arg:
        given["sde_kwargs"] = dict(args.sde_arg)
    if args.resume is not None:
        path = checkpoint_dir(args.out_dir) / "last.ckpt" if args.resume == "last" else args.resume
        saved, _ = read_checkpoint_config(path)
        cfg = merge_resumed_config(saved, given)
        return train(cfg, resume=str(path))
    return train(TrainConfig(**given))


def run_export(args: argparse.Namespace) -> Any:
    """``lcss-prior export``: the EMA weights of a training checkpoint as a prior folder."""
    from lcss_prior.train import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} to {path}")
    return path


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The ``lcss-prior`` parser. ``sample`` / ``eval`` get their arguments from their own modules,
    imported only when ``load`` names them (so ``train`` never depends on them)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="LCSS diffusion priors: train, export, sample, eval"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,export,sample,eval}")
    p = sub.add_parser("train", help="train a prior (PyTorch Lightning)")
    add_train_arguments(p)
    p.set_defaults(handler=run_train)
    p = sub.add_parser("export", help="export a training checkpoint's EMA weights as a prior folder")
    p.add_argument(
        "--checkpoint", required=True, help="Lightning checkpoint (e.g. <out>/checkpoints/last.ckpt)"
    )
    p.add_argument("--out", required=True, help="prior folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prior folder")
    p.set_defaults(handler=run_export)
    for name, (module, help_text) in DELEGATED.items():
        p = sub.add_parser(name, help=help_text, add_help=load == name)
        if load == name:
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                parser.error(f"'{name}' needs {module}, which cannot be imported: {e}")
            mod.add_cli_arguments(p)
            p.set_defaults(handler=mod.cli_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lcss-prior``; returns 0. Bad settings exit with status 2 before any work
    starts."""
    from lcss_prior.export import PriorFormatError
    from lcss_prior.train import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command)
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (ConfigError, PriorFormatError, FileExistsError) as e:
        parser.exit(2, f"{PROG} {args.command}: error: {e}\n")
    except FloatingPointError as e:  # a diverged run: the checkpoints are intact, the message says how to go on
        parser.exit(1, f"{PROG} {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
