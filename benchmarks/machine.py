"""The CPU a figure comes from: its model name and the instruction-set flags that decide transformer speed.

An int8 graph runs several times faster with AVX-512 VNNI or AMX than with AVX2 alone, so a speed
figure means little without them.
"""

from __future__ import annotations

import platform
from pathlib import Path

RELEVANT_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
CPUINFO = Path("/proc/cpuinfo")


def cpu_description(cpuinfo: Path = CPUINFO) -> dict:
    """{"model": name, "flags": the RELEVANT_FLAGS it has, "flags_known": whether they could be read}."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: the model name only
        return {"model": platform.processor() or platform.machine(), "flags": [], "flags_known": False}
    fields = dict(
        line.split(":", 1) for line in text.splitlines() if ":" in line and line.split(":", 1)[0].strip()
    )
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", platform.processor() or platform.machine()),
        "flags": [flag for flag in RELEVANT_FLAGS if flag in flags],
        "flags_known": "flags" in fields,
    }


def describe_cpu(cpu: dict) -> str:
    """One line for a report header, e.g. 'AMD EPYC (avx2 avx512f avx512_vnni)'."""
    if not cpu["flags_known"]:
        return f"{cpu['model']} (instruction-set flags unknown)"
    return f"{cpu['model']} ({' '.join(cpu['flags']) or 'none of ' + ', '.join(RELEVANT_FLAGS)})"
