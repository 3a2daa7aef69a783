"""``python -m threestudio_ssd.launch``: threestudio's ``launch.py``, also on a CPU.

Takes ``launch.py``'s arguments (``--config X.yaml --train|--validate|--test|--export [--gpu N]
[resume=...] [overrides...]``) plus ``--threestudio-root`` (default: the working directory when it
is a threestudio checkout, else the pinned threestudio of ``threestudio_ssd.checkout``:
``$THREESTUDIO_SRC``, the cache, the vendored snapshot or a clone). On a machine with a GPU it runs
threestudio's own ``launch.py`` ``main`` unchanged; without one it builds the same data module,
system, callbacks and loggers with a CPU Lightning trainer (``threestudio_ssd/threestudio/
launcher.py``).

This file stays free of torch and threestudio imports: like ``launch.py`` it sets
``CUDA_VISIBLE_DEVICES`` from ``--gpu`` before anything initialises CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The arguments of threestudio's ``launch.py`` plus ``--threestudio-root``."""
    parser = argparse.ArgumentParser(
        prog="python -m threestudio_ssd.launch",
        description="Run a threestudio config (GPU: threestudio's launch.py; CPU: a CPU trainer).",
    )
    parser.add_argument("--config", required=True, help="path to the YAML config")
    parser.add_argument(
        "--gpu",
        default="0",
        help="GPU(s) to use, as in launch.py (ignored when CUDA_VISIBLE_DEVICES is set or without a GPU)",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    for flag in ("--train", "--validate", "--test", "--export"):
        mode.add_argument(flag, action="store_true")
    parser.add_argument("--gradio", action="store_true", help="launch.py's gradio mode")
    parser.add_argument("--verbose", action="store_true", help="DEBUG logging")
    parser.add_argument("--typecheck", action="store_true", help="jaxtyping+typeguard checks")
    parser.add_argument(
        "--threestudio-root",
        default=None,
        help="threestudio checkout (with launch.py, threestudio/, load/, custom/); default: the "
        "working directory if it is one, else the pinned checkout (python -m threestudio_ssd.checkout)",
    )
    return parser


def select_gpus(gpu: str) -> None:
    """``launch.py``'s rule: respect an existing ``CUDA_VISIBLE_DEVICES``, else use ``--gpu``."""
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def is_threestudio_root(path: str | None) -> bool:
    """A folder holding threestudio's ``launch.py`` and ``threestudio/`` package."""
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "launch.py"))
        and os.path.isdir(os.path.join(path, "threestudio"))
    )


def find_threestudio_root(explicit: str | None = None) -> str:
    """``explicit`` (``--threestudio-root``), else the working directory if it is a checkout,
    else the pinned threestudio (``$THREESTUDIO_SRC``, the cache, the vendored snapshot or a clone:
    :func:`threestudio_ssd.checkout.get_threestudio`); raises naming what was tried."""
    if explicit is not None:
        if not is_threestudio_root(explicit):
            raise FileNotFoundError(
                f"--threestudio-root={explicit!r} is not a threestudio checkout (needs launch.py and threestudio/)"
            )
        return os.path.abspath(explicit)
    if is_threestudio_root(os.getcwd()):
        return os.getcwd()
    from threestudio_ssd.checkout import get_threestudio

    try:
        return str(get_threestudio())
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(
            f"No threestudio checkout found: the working directory {os.getcwd()!r} is not one, and "
            f"the pinned checkout could not be obtained ({err}). Run from a checkout, pass "
            "--threestudio-root, or set THREESTUDIO_SRC."
        ) from err


def main(argv: list[str] | None = None) -> None:
    args, extras = build_parser().parse_known_args(argv)
    select_gpus(args.gpu)
    root = find_threestudio_root(args.threestudio_root)
    if root not in sys.path:
        sys.path.insert(0, root)  # ``import threestudio`` and threestudio's ``launch`` module
    if args.typecheck:  # before threestudio is imported, as in launch.py
        from jaxtyping import install_import_hook

        install_import_hook("threestudio", "typeguard.typechecked")
    from threestudio_ssd.threestudio.launcher import run

    run(args, extras, root)


if __name__ == "__main__":
    main(sys.argv[1:])
