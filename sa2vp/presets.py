"""Training presets: the authors' per-benchmark settings (ViT-B/16 in21k unless a preset says otherwise).

Every preset fixes the inter-dim ``r``, the inter-weight ``s``, the batch size per optimizer step and the
learning rate; the data family decides the transforms (``vtab``: resize to a square, no augmentation;
``fgvc``: resize, random crop, flip).  Command-line flags override any field.

``deep_prompts=1`` keeps only the first deep prompt (Stanford Cars).  The VTAB groups also have one
preset per task, so ``--preset pets`` picks the natural-group settings with Pets' own learning rate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["Preset", "PRESETS", "get_preset", "preset_table"]

VIT_B16 = "vit_base_patch16_224.augreg_in21k"
SWIN_B = "swin_base_patch4_window7_224.ms_in22k"


@dataclass(frozen=True)
class Preset:
    r: int
    s: float
    batch_size: int
    lr: float = 1e-3
    family: str = "vtab"
    deep_prompts: int | None = None
    backbone: str = VIT_B16
    num_classes: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_NATURAL = Preset(r=8, s=0.1, batch_size=64, family="vtab", note="VTAB-1k natural")
_SPECIALIZED = Preset(r=16, s=1.5, batch_size=40, family="vtab", note="VTAB-1k specialized")
_STRUCTURED = Preset(r=32, s=1.5, batch_size=40, family="vtab", note="VTAB-1k structured")
_SWIN = Preset(r=8, s=0.5, batch_size=64, family="vtab", backbone=SWIN_B,
               note="Swin-B on VTAB-1k (the paper tunes s in 0.1-0.5 on natural tasks)")

PRESETS: dict[str, Preset] = {
    # FGVC (VPT json layout)
    "cub": Preset(r=16, s=0.1, batch_size=64, family="fgvc", num_classes=200, note="CUB-200-2011"),
    "nabirds": Preset(r=32, s=0.1, batch_size=64, family="fgvc", num_classes=555, note="NABirds"),
    "flowers": Preset(r=8, s=0.1, batch_size=64, family="fgvc", num_classes=102, note="Oxford Flowers"),
    "dogs": Preset(r=32, s=0.1, batch_size=64, family="fgvc", num_classes=120, note="Stanford Dogs"),
    "cars": Preset(r=64, s=1.5, batch_size=64, family="fgvc", num_classes=196, deep_prompts=1,
                   note="Stanford Cars, one deep prompt only"),
    # VTAB-1k groups
    "vtab-natural": _NATURAL,
    "vtab-specialized": _SPECIALIZED,
    "vtab-structured": _STRUCTURED,
    # VTAB-1k natural tasks
    "cifar100": replace(_NATURAL, num_classes=100, note="VTAB-1k natural: CIFAR-100"),
    "caltech101": replace(_NATURAL, num_classes=102, note="VTAB-1k natural: Caltech101"),
    "dtd": replace(_NATURAL, num_classes=47, note="VTAB-1k natural: DTD"),
    "flowers102": replace(_NATURAL, num_classes=102, note="VTAB-1k natural: Oxford Flowers102"),
    "pets": replace(_NATURAL, lr=5e-4, num_classes=37, note="VTAB-1k natural: Oxford-IIIT Pets, lr 5e-4"),
    "svhn": replace(_NATURAL, num_classes=10, note="VTAB-1k natural: SVHN"),
    "sun397": replace(_NATURAL, num_classes=397, note="VTAB-1k natural: SUN397"),
    # VTAB-1k specialized tasks
    "patch_camelyon": replace(_SPECIALIZED, num_classes=2, note="VTAB-1k specialized: Patch Camelyon"),
    "eurosat": replace(_SPECIALIZED, num_classes=10, note="VTAB-1k specialized: EuroSAT"),
    "resisc45": replace(_SPECIALIZED, num_classes=45, note="VTAB-1k specialized: Resisc45"),
    "diabetic_retinopathy": replace(_SPECIALIZED, num_classes=5, note="VTAB-1k specialized: Retinopathy"),
    # VTAB-1k structured tasks
    "clevr_count": replace(_STRUCTURED, lr=5e-4, num_classes=8,
                           note="VTAB-1k structured: Clevr-count, lr 5e-4"),
    "clevr_dist": replace(_STRUCTURED, num_classes=6, note="VTAB-1k structured: Clevr-distance"),
    "dmlab": replace(_STRUCTURED, num_classes=6, note="VTAB-1k structured: DMLab"),
    "kitti": replace(_STRUCTURED, num_classes=4, note="VTAB-1k structured: KITTI-distance"),
    "dsprites_loc": replace(_STRUCTURED, num_classes=16, note="VTAB-1k structured: dSprites-location"),
    "dsprites_ori": replace(_STRUCTURED, num_classes=16, note="VTAB-1k structured: dSprites-orientation"),
    "smallnorb_azi": replace(_STRUCTURED, num_classes=18, note="VTAB-1k structured: sNORB-azimuth"),
    "smallnorb_ele": replace(_STRUCTURED, num_classes=9, note="VTAB-1k structured: sNORB-elevation"),
    # Other benchmarks
    "hta": Preset(r=64, s=0.1, batch_size=64, family="fgvc", note="HTA benchmark (ImageFolder data)"),
    "swin-vtab-natural": _SWIN,
    "swin-vtab-specialized": replace(_SWIN, batch_size=40, note="Swin-B on VTAB-1k specialized"),
    "swin-vtab-structured": replace(_SWIN, s=1.5, batch_size=40, note="Swin-B on VTAB-1k structured"),
}


def get_preset(name: str) -> Preset:
    key = name.lower().replace("-", "_")
    for candidate, preset in PRESETS.items():
        if candidate.replace("-", "_") == key:
            return preset
    raise ValueError(f"--preset: unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


def preset_table() -> str:
    """A plain-text table of every preset (for ``--help`` and ``sa2vp presets``)."""
    rows = [("preset", "r", "s", "batch", "lr", "data", "note")]
    for name, p in PRESETS.items():
        rows.append((name, str(p.r), f"{p.s:g}", str(p.batch_size), f"{p.lr:g}", p.family, p.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1])
    return "\n".join(lines)
