"""What the benchmark scripts share: writing the report JSON they print from."""
from __future__ import annotations

import json
import time
from pathlib import Path


def write_report(report: dict, out: str | Path, name: str, t0: float) -> Path:
    """Stamp ``report["total_s"]`` (since ``t0``, a ``time.perf_counter()``), write it to ``out``
    (a ``.json`` file, or a folder to hold ``name``) and say where; returns the path."""
    report["total_s"] = time.perf_counter() - t0
    out = Path(out)
    if out.suffix != ".json":
        out = out / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out} ({report['total_s']:.0f} s)")
    return out
