"""Compile records kept on disk (`CompileCache`), keyed by job, target, versions and sources."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.aot.targets import ROOT, TARGETS_DIR, Target


def source_fingerprint() -> str:
    """A hash of everything a compiled record depends on besides the job and the versions: the
    library's sources, this package, `experiments._report` (which builds the step) and the GPU
    target configs."""
    h = hashlib.sha256()
    files = sorted((ROOT / "revjax").rglob("*.py")) + [
        *sorted(Path(__file__).resolve().parent.glob("*.py")),
        ROOT / "experiments" / "_report.py",
        *sorted(TARGETS_DIR.glob("*")),
    ]
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class CompileCache:
    """Compile records kept in a JSON-lines file, so that a search or table interrupted or rerun
    does not compile again what it already compiled (a TPU compile takes minutes).

    A record is reused only for the same job, target, versions (JAX, plugin / libtpu), XLA flags
    and `source_fingerprint`: any change to revjax or to the step builder invalidates it. Lines are
    appended whole, so a killed run leaves every finished compile behind; a truncated last line
    is skipped. Failed compiles are kept only when they ran out of memory (a real answer), not
    when something else went wrong."""

    _lock = threading.Lock()

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fingerprint = source_fingerprint()
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.records[entry["key"]] = entry["record"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def key(self, target: Target, info: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
        blob = json.dumps(
            {
                "target": target.name,
                "versions": info.get("versions"),
                "xla_flags": info.get("xla_flags"),
                "sources": self.fingerprint,
                "job": spec,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        from revjax.measure import is_out_of_memory  # imports JAX: the parent side only

        if "error" in record and not is_out_of_memory(record["error"]):
            return
        with self._lock:
            self.records[key] = dict(record)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "record": record}) + "\n")
                f.flush()


def open_cache(cache: str | Path | CompileCache | None) -> CompileCache | None:
    """A `CompileCache` from a file name (read once; children compiling in parallel share the
    returned object), an existing one, or None."""
    return cache if cache is None or isinstance(cache, CompileCache) else CompileCache(cache)
