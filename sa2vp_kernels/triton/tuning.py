"""Launch settings of the Triton kernels measured on one GPU model, applied on that model.

The Triton launchers have built-in defaults: the switches and launch plans of ``local_attn.py`` and
``prompt_add.py``. A JSON file per GPU model in ``sa2vp_kernels/triton/tuned/`` replaces some of them
for float16 / bfloat16 inputs on that model. ``bench/apply_tuning.py`` writes it from the side-by-side
timings of ``bench/gpu_variants.py`` (``make gpu-tune``), keeping a variant only where it beat the
default. Every setting changes the speed, never the result beyond rounding: each variant is tested
against the float64 references (under the Triton interpreter and on the GPU).

Which file applies, by ``SA2VP_TRITON_TUNED`` (read at every call):

* unset or empty: the file named after the GPU model (``NVIDIA H200`` -> ``nvidia-h200.json``), if the
  package has one;
* ``0``, ``off`` or ``none``: none (the built-in defaults);
* a path: that file, on every GPU model.

The file::

    {"format": 1, "device": "NVIDIA H200", "source": "...",
     "local_attention": [{"max_head_dim": 64, "settings": {"fwd_fused_prefix": true, "rows": 4}},
                         {"min_head_dim": 65, "settings": {...}}],
     "prompt_add": [{"max_rank": 16, "settings": {"block_m": 32, "num_warps": 8, "block_c": 128}}]}

An op uses the settings of the first entry whose bounds hold for its call (``min_head_dim`` /
``max_head_dim`` for the attention, ``min_channels`` / ``max_channels`` / ``max_rank`` for
``prompt_add``); other keys of an entry (e.g. ``measured``) are notes. The settings (any subset):

* local attention: ``fwd_fused_prefix``, ``fwd_early_v``, ``bwd_fused_prefix``, ``fwd_prefix_splits``,
  ``fwd_stream``, ``bwd_stream``, ``fwd_inline_combine`` (the module switches of the same names in
  capitals; ``fwd_prefix_splits`` an int, the number of programs that share each prefix query's keys); ``rows``, ``fwd_num_warps``, ``stages`` (the
  forward's tile plan, as ``local_attn.tuned_tile_plan``; the default plan where a tile of ``rows`` rows
  does not fit); ``stream_num_warps``, ``stream_stages``, ``stream_segments``, ``stream_reload``,
  ``stream_prefetch`` (the row-streaming forward's warps, pipelining depth, programs per slice, and how
  it loads its rows: ``STREAM_RELOAD``, ``STREAM_PREFETCH``);
* prompt_add: ``fwd_one_pass``, ``bwd_from_z``, ``bwd_finalize_kernel`` (the module switches);
  ``block_m``, ``num_warps``, ``block_c`` (the forward's chunked-row tiles, as
  ``prompt_add.tuned_row_blocks``; only where the default is chunked rows and the tiles fit).

``override(...)`` forces settings for a block of code on every device and dtype (benchmarks, tests).
``python -m sa2vp_kernels.triton.show_tuning [FILE]`` prints the settings in force (or checks a file).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
ENV = "SA2VP_TRITON_TUNED"
FORMAT = 1

ATTENTION_SETTINGS = {"fwd_fused_prefix": bool, "fwd_early_v": bool, "bwd_fused_prefix": bool, "rows": int,
                      "fwd_num_warps": int, "stages": int, "fwd_prefix_splits": int, "fwd_stream": bool,
                      "stream_num_warps": int, "stream_stages": int, "stream_segments": int,
                      "stream_reload": bool, "stream_prefetch": bool, "bwd_stream": bool,
                      "fwd_inline_combine": bool}
PROMPT_ADD_SETTINGS = {"fwd_one_pass": bool, "bwd_from_z": bool, "bwd_finalize_kernel": bool, "block_m": int,
                       "num_warps": int, "block_c": int}
_OPS = {"local_attention": (ATTENTION_SETTINGS, ("min_head_dim", "max_head_dim")),
        "prompt_add": (PROMPT_ADD_SETTINGS, ("min_channels", "max_channels", "max_rank"))}
_NOTE_KEYS = ("measured", "note")
_HALF = (torch.float16, torch.bfloat16)
_EMPTY: dict = {}

_forced: Optional[dict] = None


def device_tag(name: str) -> str:
    """The file stem of a GPU model's name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _check_settings(where: str, settings, allowed: dict) -> dict:
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: 'settings' must be an object, got {type(settings).__name__}")
    for key, value in settings.items():
        if key not in allowed:
            raise ValueError(f"{where}: unknown setting {key!r}; expected some of {sorted(allowed)}")
        kind = allowed[key]
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{where}: {key!r} must be true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
            raise ValueError(f"{where}: {key!r} must be an integer >= -1 (0: the default's), got {value!r}")
    for key in ("rows", "fwd_num_warps", "stages", "block_m", "num_warps", "fwd_prefix_splits", "stream_num_warps",
                "stream_stages", "stream_segments"):
        if settings.get(key, 0) < 0:
            raise ValueError(f"{where}: {key!r} must be >= 0 (0: the default's), got {settings[key]}")
    for key in ("fwd_num_warps", "num_warps", "block_m", "stream_num_warps"):
        v = settings.get(key, 0)
        if v and v & (v - 1):
            raise ValueError(f"{where}: {key!r} must be a power of two, got {v}")
    bc = settings.get("block_c", 0)
    if bc not in (0, -1) and (bc < 16 or bc & (bc - 1)):
        raise ValueError(f"{where}: 'block_c' must be a power of two >= 16, 0 (the default's) or -1 (whole rows), "
                         f"got {bc}")
    return dict(settings)


def parse(data, where: str = "tuned settings") -> dict:
    """Check a tuned-settings document (the JSON object); a clear error naming ``where`` and the
    offending key. Returns {op: [(bounds, settings), ...]}."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"{where}: 'format' must be {FORMAT}, got {data.get('format')!r}")
    unknown = set(data) - {"format", "device", "triton", "torch", "source", "date", *_OPS, *_NOTE_KEYS}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    parsed = {}
    for op, (allowed, bound_keys) in _OPS.items():
        entries = data.get(op, [])
        if not isinstance(entries, list):
            raise ValueError(f"{where}: {op!r} must be a list of entries, got {type(entries).__name__}")
        parsed[op] = []
        for i, entry in enumerate(entries):
            at = f"{where}: {op}[{i}]"
            if not isinstance(entry, dict) or "settings" not in entry:
                raise ValueError(f"{at}: expected an object with 'settings'")
            extra = set(entry) - {"settings", *bound_keys, *_NOTE_KEYS}
            if extra:
                raise ValueError(f"{at}: unknown keys {sorted(extra)}; bounds are {list(bound_keys)}")
            bounds = {}
            for key in bound_keys:
                if key in entry:
                    if isinstance(entry[key], bool) or not isinstance(entry[key], int) or entry[key] < 0:
                        raise ValueError(f"{at}: {key!r} must be a non-negative integer, got {entry[key]!r}")
                    bounds[key] = entry[key]
            parsed[op].append((bounds, _check_settings(at, entry["settings"], allowed)))
    return parsed


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{ENV}: cannot read the tuned settings {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"tuned settings {path}: not valid JSON ({exc})") from None
    return parse(data, f"tuned settings {path}")


@functools.lru_cache(maxsize=None)
def _device_file(index: int) -> Optional[str]:
    path = TUNED_DIR / f"{device_tag(torch.cuda.get_device_name(index))}.json"
    return str(path) if path.is_file() else None


def active_file(device: Optional[torch.device] = None) -> Optional[str]:
    """The tuned-settings file that applies on ``device`` (default: the current CUDA device), or None."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in ("0", "off", "none"):
        return None
    if env:
        return env
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    return _device_file(device.index if device.index is not None else torch.cuda.current_device())


def _within(bounds: dict, values: dict) -> bool:
    for key, limit in bounds.items():
        kind, name = key.split("_", 1)
        value = values[name]
        if (kind == "min" and value < limit) or (kind == "max" and value > limit):
            return False
    return True


def _settings(op: str, device: torch.device, dtype: torch.dtype, values: dict) -> dict:
    if _forced is not None:
        return _forced.get(op, _EMPTY)
    if dtype not in _HALF or device.type != "cuda":
        return _EMPTY
    path = active_file(device)
    if path is None:
        return _EMPTY
    for bounds, settings in _load(path)[op]:
        if _within(bounds, values):
            return settings
    return _EMPTY


def attention_settings(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    """The tuned settings of a local-attention call ({} where none apply)."""
    return _settings("local_attention", device, dtype, {"head_dim": head_dim})


def prompt_add_settings(device: torch.device, dtype: torch.dtype, channels: int, rank: int) -> dict:
    """The tuned settings of a prompt_add call ({} where none apply)."""
    return _settings("prompt_add", device, dtype, {"channels": channels, "rank": rank})


@contextlib.contextmanager
def override(local_attention: Optional[dict] = None, prompt_add: Optional[dict] = None):
    """Force these settings (checked as in a file) on every device and dtype within the block; no
    tuned file applies meanwhile. Not thread-safe: for benchmarks and tests."""
    global _forced
    forced = {"local_attention": _check_settings("override(local_attention)", local_attention or {},
                                                 ATTENTION_SETTINGS),
              "prompt_add": _check_settings("override(prompt_add)", prompt_add or {}, PROMPT_ADD_SETTINGS)}
    saved, _forced = _forced, forced
    try:
        yield
    finally:
        _forced = saved


def describe(path: Optional[str] = None) -> str:
    """What applies: the file (``path``, or the one in force on the current GPU) and its entries."""
    if path is None:
        path = active_file()
        if path is None:
            env = os.environ.get(ENV, "").strip()
            why = (f"{ENV}={env}" if env else
                   "no CUDA device" if not torch.cuda.is_available() else
                   f"no file {TUNED_DIR / (device_tag(torch.cuda.get_device_name()) + '.json')}")
            return f"no tuned settings in force ({why}): the built-in defaults"
    lines = [f"tuned settings: {path} (float16/bfloat16 inputs)"]
    for op, entries in _load(str(path)).items():
        for bounds, settings in entries:
            where = ", ".join(f"{k} {v}" for k, v in bounds.items()) or "every call"
            lines.append(f"  {op} ({where}): " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        if not entries:
            lines.append(f"  {op}: the built-in defaults")
    return "\n".join(lines)

