"""The exported prior: the one folder format that ``threestudio_ssd`` (and ``lcss-prior sample`` /
``eval``) load.

A prior folder holds ``unet/`` (diffusers ``UNet2DModel.save_pretrained``, safetensors) and
``prior.json``::

    {"format": "lcss-prior", "version": 1,
     "sde": sde.config,                      # rebuilt with lcss_prior.sde.build_sde
     "resolution": 32, "channels": 3,
     "captions": ["a red cube", ...],        # label i <-> captions[i]
     "null_class": 24,                       # = len(captions), or null for an unconditional prior
     "prediction": "epsilon", "data_range": [-1, 1], "n_levels": 256,
     "network": {"input_scaling": "edm", "output_scaling": "edm", "sigma_data": 0.5,
                 "time_scale": 999.0},
     "training": {...}, "lcss_prior_version": "0.1.0"}

``load_prior`` turns the folder back into a frozen ``Prior`` whose ``eps`` is the classifier-free
guided noise prediction of ``lcss_prior.guidance.classifier_free_guidance``. Every way a folder
can be broken raises ``PriorFormatError`` with the offending file in the message. ``"network"``
is optional on reading (absent means the UNet sees ``x_t`` unscaled and ``999 t``), and so is each
of its keys (``output_scaling`` absent: ``"none"``, the network's output is ``eps_hat`` itself, as
in every prior exported before that key existed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from jaxtyping import Float, Int
from torch import Tensor, nn

from lcss_prior import __version__
from lcss_prior.guidance import classifier_free_guidance
from lcss_prior.manifest import ManifestError, sha256, verify_manifest
from lcss_prior.model import EpsNetwork

FORMAT = "lcss-prior"
VERSION = 1
PRIOR_JSON = "prior.json"
UNET_DIR = "unet"
DEFAULT_NETWORK = {"input_scaling": "none", "output_scaling": "none", "sigma_data": 0.5, "time_scale": 999.0}
_REQUIRED = ("sde", "resolution", "channels", "captions", "null_class", "prediction")


class PriorFormatError(ValueError):
    """A prior folder that cannot be loaded (missing, truncated, wrong format/version, bad UNet)."""


def _build_sde(config: dict[str, Any]) -> Any:
    """Rebuild an SDE from its ``config`` (the one round trip of ``lcss_prior.sde``)."""
    from lcss_prior.sde import build_sde

    return build_sde(**config)


class Prior(nn.Module):
    """A frozen, exported LCSS prior: noise prediction with classifier-free guidance, and its SDE.

    ``x_t = alpha(t) x0 + sigma(t) eps`` with ``x0`` in ``[-1, 1]`` (``x0 = 2 rgb - 1``), ``t`` a
    float tensor ``[B]`` in ``[0, 1]``, ``class_labels`` integer ids ``[B]`` into ``captions``
    (``null_class`` or ``None`` = unconditional).
    """

    def __init__(
        self,
        network: EpsNetwork,
        sde: Any,
        *,
        resolution: int,
        channels: int,
        captions: Sequence[str],
        null_class: int | None,
        n_levels: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.__dict__["sde"] = sde  # plain attribute: no state of its own
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.captions = list(captions)
        self.null_class = null_class
        self.n_levels = n_levels
        self.metadata = dict(metadata or {})
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Prior:  # frozen: always eval
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Signal coefficient ``alpha(t)`` of the forward process (``sde.alpha``)."""
        return self.sde.alpha(t)

    def sigma(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Noise standard deviation ``sigma(t)`` of the forward process (``sde.std``)."""
        return self.sde.std(t)

    def caption_to_label(self, text: str) -> int:
        """The class id of caption ``text``; the error lists the valid captions."""
        try:
            return self.captions.index(text)
        except ValueError:
            listing = (
                "\n".join(f"  {i}: {c}" for i, c in enumerate(self.captions)) or "  (none: unconditional)"
            )
            raise KeyError(f"unknown caption {text!r}; this prior knows:\n{listing}") from None

    def eps(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Float[Tensor, " B"],
        class_labels: Int[Tensor, " B"] | None = None,
        guidance_scale: float = 1.0,
    ) -> Float[Tensor, "B C H W"]:
        """Guided noise prediction ``eps_u + s (eps_c - eps_u)`` (``classifier_free_guidance``).

        The conditional and NULL-class predictions are one batched call of size ``2B``; ``s = 1``
        (conditional only) and ``s = 0`` (unconditional only) skip the unneeded half.
        ``class_labels=None`` (or an unconditional prior) gives ``eps_u``. Differentiable in
        ``x_t`` (the parameters are frozen); wrap in ``torch.no_grad()`` when no gradient is needed.
        """
        out_dtype = x_t.dtype
        x = x_t.to(self.dtype)
        t = torch.as_tensor(t, device=x.device).to(self.dtype)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if class_labels is not None and self.null_class is None:
            raise ValueError("this prior is unconditional (no captions): class_labels must be None")
        if class_labels is None or guidance_scale == 0.0:
            return self.network(x, t, None).to(out_dtype)
        labels = torch.as_tensor(class_labels, device=x.device).long()
        if guidance_scale == 1.0:
            return self.network(x, t, labels).to(out_dtype)
        null = torch.full_like(labels, self.null_class)
        both = self.network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        eps_c, eps_u = both.chunk(2)
        return classifier_free_guidance(eps_c, eps_u, guidance_scale).to(out_dtype)

    def forward(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Float[Tensor, " B"],
        class_labels: Int[Tensor, " B"] | None = None,
        guidance_scale: float = 1.0,
    ) -> Float[Tensor, "B C H W"]:
        """Same as ``eps`` (so a ``Prior`` is a ``model_fn`` for ``get_score_fn``)."""
        return self.eps(x_t, t, class_labels, guidance_scale)


def _unwrap(model_or_unet: EpsNetwork | UNet2DModel) -> tuple[UNet2DModel, dict[str, Any]]:
    if isinstance(model_or_unet, EpsNetwork):
        return model_or_unet.unet, model_or_unet.config
    if isinstance(model_or_unet, UNet2DModel):
        return model_or_unet, dict(DEFAULT_NETWORK)
    raise TypeError(f"export_prior needs an EpsNetwork or a UNet2DModel, got {type(model_or_unet).__name__}")


def export_prior(
    model_or_unet: EpsNetwork | UNet2DModel,
    sde: Any,
    out_dir: str | os.PathLike,
    captions: Sequence[str],
    resolution: int,
    channels: int,
    null_class: int | None,
    training_info: dict[str, Any] | None = None,
    *,
    n_levels: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the prior folder ``out_dir`` (``unet/`` + ``prior.json``) and return its path.

    ``model_or_unet`` is an ``EpsNetwork`` (its input scaling and time scale are recorded) or a bare
    ``UNet2DModel`` (recorded as unscaled input, ``999 t``). The folder is assembled next to
    ``out_dir`` and moved into place, so a reader never sees half a prior; an existing prior is
    replaced only with ``overwrite=True``, and any other non-empty folder never.
    """
    unet, network = _unwrap(model_or_unet)
    out_dir = Path(out_dir)
    cfg = unet.config
    if int(cfg.sample_size) != int(resolution) or int(cfg.in_channels) != int(channels):
        raise ValueError(
            f"UNet is for {cfg.in_channels}x{cfg.sample_size}px but resolution={resolution}, channels={channels}"
        )
    expected_null = None if cfg.num_class_embeds is None else int(cfg.num_class_embeds) - 1
    if null_class != expected_null:
        raise ValueError(f"null_class={null_class!r} but the UNet's NULL class is {expected_null!r}")
    if expected_null is not None and len(captions) != expected_null:
        raise ValueError(f"{len(captions)} captions for a UNet with {expected_null} classes")
    sde_config = dict(sde.config)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "sde": sde_config,
        "resolution": int(resolution),
        "channels": int(channels),
        "captions": [str(c) for c in captions],
        "null_class": null_class,
        "prediction": "epsilon",
        "data_range": [-1, 1],
        "n_levels": None if n_levels is None else int(n_levels),
        "network": network,
        "training": dict(training_info or {}),
        "lcss_prior_version": __version__,
    }
    json.dumps(meta)  # fails here, before anything is written, if not JSON
    if _build_sde(sde_config).config != sde_config:
        raise ValueError(f"sde.config {sde_config} does not round-trip through lcss_prior.sde.build_sde")

    recover_interrupted_export(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            if not (out_dir / PRIOR_JSON).exists():
                raise FileExistsError(f"{out_dir} is a non-empty folder that is not a prior; not touching it")
            if not overwrite:
                raise FileExistsError(f"{out_dir} already holds a prior; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: the exported prior is a folder to share
    try:
        unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
        # the network files' SHA-256, checked by every load: safetensors carries no checksum, so a
        # flipped byte in the weights would otherwise load silently as other weights
        meta["checksums"] = {
            f"{UNET_DIR}/{p.name}": sha256(p) for p in sorted((tmp / UNET_DIR).iterdir()) if p.is_file()
        }
        (tmp / PRIOR_JSON).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "prior")  # a kill between the two renames: recovered next time
            os.replace(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):  # ours and any killed export's
        if leftover.is_dir() and leftover.name.split(".")[-1].startswith(("tmp-", "old-")):
            shutil.rmtree(leftover, ignore_errors=True)
    return out_dir


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync the directory); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_interrupted_export(out_dir: str | os.PathLike) -> Path | None:
    """An export killed between its two renames leaves no ``out_dir`` and the previous prior in
    ``.<name>.old-*/prior``: move the newest such prior back (returns its old path), else None."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return None
    kept = sorted(
        (p / "prior" for p in out_dir.parent.glob(f".{out_dir.name}.old-*") if (p / "prior" / PRIOR_JSON).is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    if not kept:
        return None
    os.replace(kept[-1], out_dir)
    fsync_dir(out_dir.parent)
    warnings.warn(f"{out_dir} was missing after an interrupted export; restored the previous prior", stacklevel=2)
    return kept[-1]


def read_prior_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``<path>/prior.json`` (and the folder's ``MANIFEST.json`` checksums when it
    has one, ``lcss_prior.manifest``); every problem is a ``PriorFormatError``."""
    folder = Path(path)
    recover_interrupted_export(folder)
    if not folder.is_dir():
        raise PriorFormatError(f"prior folder {folder} does not exist (or is not a folder)")
    meta_path = folder / PRIOR_JSON
    if not meta_path.is_file():
        raise PriorFormatError(f"{meta_path} is missing: {folder} is not an exported lcss-prior folder")
    try:
        verify_manifest(folder)  # shipped priors: every file as trained (no manifest: not checked)
    except ManifestError as err:
        raise PriorFormatError(str(err)) from err
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PriorFormatError(f"{meta_path} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(meta, dict):
        raise PriorFormatError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise PriorFormatError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise PriorFormatError(
            f"{meta_path}: version {meta.get('version')!r} is not supported (this lcss_prior {__version__} "
            f"reads version {VERSION})"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise PriorFormatError(f"{meta_path}: missing keys {missing}")
    if meta["prediction"] != "epsilon":
        raise PriorFormatError(f"{meta_path}: prediction {meta['prediction']!r} is not supported ('epsilon')")
    for key in ("resolution", "channels"):
        if not isinstance(meta[key], int) or meta[key] < 1:
            raise PriorFormatError(f"{meta_path}: {key} must be a positive integer, got {meta[key]!r}")
    if not isinstance(meta["captions"], list) or not all(isinstance(c, str) for c in meta["captions"]):
        raise PriorFormatError(f"{meta_path}: captions must be a list of strings")
    null = meta["null_class"]
    if null is not None and (not isinstance(null, int) or null != len(meta["captions"])):
        raise PriorFormatError(
            f"{meta_path}: null_class must be len(captions)={len(meta['captions'])} or null, got {null!r}"
        )
    if not isinstance(meta["sde"], dict) or "name" not in meta["sde"]:
        raise PriorFormatError(f"{meta_path}: sde must be an SDE config object with a 'name'")
    network = {**DEFAULT_NETWORK, **(meta.get("network") or {})}
    for key in ("input_scaling", "output_scaling"):
        if network[key] not in ("edm", "none"):
            raise PriorFormatError(f"{meta_path}: unknown network.{key} {network[key]!r}")
    for key in ("sigma_data", "time_scale"):
        value = network[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise PriorFormatError(f"{meta_path}: network.{key} must be a positive number, got {value!r}")
    levels = meta.get("n_levels")
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 2):
        raise PriorFormatError(f"{meta_path}: n_levels must be null or an integer >= 2, got {levels!r}")
    meta["network"] = network
    return meta


def _verify_checksums(folder: Path, meta: dict[str, Any]) -> None:
    """The network files against the SHA-256 that ``prior.json`` recorded at export (priors exported
    before checksums existed have none and are not checked)."""
    checksums = meta.get("checksums") or {}
    if not isinstance(checksums, dict):
        raise PriorFormatError(f"{folder / PRIOR_JSON}: checksums must be an object of file -> SHA-256")
    for rel, digest in checksums.items():
        path = folder / rel
        if not path.is_file():
            raise PriorFormatError(f"{path} is missing (listed in {folder / PRIOR_JSON}): the prior is incomplete")
        if sha256(path) != digest:
            raise PriorFormatError(
                f"{path} is corrupted: its SHA-256 differs from the one {folder / PRIOR_JSON} recorded at export; "
                "re-export the prior (lcss-prior export) or copy it again"
            )


def load_prior(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Prior:
    """Load an exported prior folder as a frozen, eval-mode ``Prior`` on ``device`` in ``dtype``.

    Raises ``PriorFormatError`` (naming the file) for a missing folder, a missing, truncated or
    invalid ``prior.json``, a wrong format or version, and a missing or corrupt ``unet/``.
    """
    folder = Path(path)
    meta = read_prior_json(folder)
    meta_path = folder / PRIOR_JSON
    try:
        sde = _build_sde(meta["sde"])
    except Exception as e:  # noqa: BLE001 - any failure here means a bad "sde" entry
        raise PriorFormatError(f"{meta_path}: cannot build the SDE {meta['sde']!r}: {e}") from e
    unet_dir = folder / UNET_DIR
    if not unet_dir.is_dir():
        raise PriorFormatError(f"{unet_dir} is missing: the prior has no network weights")
    _verify_checksums(folder, meta)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a corrupt folder
        raise PriorFormatError(f"{unet_dir} cannot be loaded as a diffusers UNet2DModel: {e}") from e
    cfg = unet.config
    expected_null = None if cfg.num_class_embeds is None else int(cfg.num_class_embeds) - 1
    if (
        int(cfg.in_channels) != meta["channels"]
        or int(cfg.sample_size) != meta["resolution"]
        or expected_null != meta["null_class"]
    ):
        raise PriorFormatError(
            f"{unet_dir} does not match {meta_path}: UNet has {cfg.in_channels} channels, "
            f"{cfg.sample_size}px, NULL class {expected_null}; prior.json says {meta['channels']}, "
            f"{meta['resolution']}px, {meta['null_class']}"
        )
    net = meta["network"]
    network = EpsNetwork(
        unet,
        sde,
        input_scaling=net["input_scaling"],
        output_scaling=net["output_scaling"],
        sigma_data=float(net["sigma_data"]),
        time_scale=float(net["time_scale"]),
        p_uncond=0.0,
    )
    prior = Prior(
        network,
        sde,
        resolution=meta["resolution"],
        channels=meta["channels"],
        captions=meta["captions"],
        null_class=meta["null_class"],
        n_levels=meta.get("n_levels"),
        metadata=meta,
    )
    return prior.to(device=device, dtype=dtype)
