"""``stein-vertex-color-mesh-exporter``: threestudio's mesh export without a rasteriser.

threestudio's ``mesh-exporter`` builds an nvdiffrast context in ``configure`` (for UV texture
baking), so ``--export`` fails on a machine without CUDA/OpenGL even when no texture is baked. This
exporter is the same class with that context left out and only its rasteriser-free path allowed:
``isosurface()`` of the geometry (use ``isosurface_method: mc-cpu`` on a CPU; ``mt`` needs
``load/tets``), per-vertex colours from ``material.export`` at the vertices, written as an OBJ
with vertex colours (``fmt: obj``, ``save_uv: false``). On a GPU, threestudio's own
``mesh-exporter`` (UV atlas and texture maps) remains the better choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from threestudio.models.exporters.base import Exporter
from threestudio.models.exporters.mesh_exporter import MeshExporter

from threestudio_ssd.threestudio.registry import register


@register("stein-vertex-color-mesh-exporter")
class VertexColorMeshExporter(MeshExporter):
    @dataclass
    class Config(MeshExporter.Config):
        fmt: str = "obj"
        save_uv: bool = False

    cfg: Config

    def configure(self, geometry, material, background) -> None:
        if self.cfg.fmt != "obj" or self.cfg.save_uv:
            raise ValueError(
                "stein-vertex-color-mesh-exporter writes OBJ with vertex colours only "
                f"(exporter.fmt: obj, exporter.save_uv: false), got fmt={self.cfg.fmt!r}, "
                f"save_uv={self.cfg.save_uv}; use threestudio's mesh-exporter for UV textures (needs nvdiffrast)"
            )
        Exporter.configure(self, geometry, material, background)  # no NVDiffRasterizerContext
