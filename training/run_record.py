"""The record a long command of several stages keeps in its output folder (harden.json,
quickstart.json): what the run is (its identity: settings and fingerprints of what it started from)
and what it has finished. The same command run again resumes after its last finished stage; an
interrupted run of another command is refused, naming what differs, rather than mixed into this one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from foundation.storage import atomic_write_json
from training.data import ImageDataset


def run_identity(settings: dict[str, Any], data: ImageDataset, **started_from: Any) -> dict[str, Any]:
    """The identity of a run (as JSON reads it back): its settings, what it `started_from` (e.g. the
    classifier's fingerprint) and the data's name and sha256."""
    return json.loads(json.dumps({"settings": settings, **started_from,
                                  "data": {"name": data.name, "sha256": data.fingerprint()}}))


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at `path`, or None when there is none or it cannot be read."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def differences(record: dict[str, Any], identity: dict[str, Any]) -> str:
    """What the run recorded in `record` has that another `identity`: "setting epochs, data"."""
    earlier = record.get("identity") or {}
    settings = [f"setting {name}" for name, value in identity["settings"].items()
                if (earlier.get("settings") or {}).get(name) != value]
    others = [name for name in identity if name != "settings" and earlier.get(name) != identity[name]]
    return ", ".join(settings + others) or "identity"


def new_record(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """A record for a run that starts now, written at `path`."""
    record = {"identity": identity, "finished": False}
    atomic_write_json(path, record)
    return record


def mark(path: Path, record: dict[str, Any], **done: Any) -> dict[str, Any]:
    """`record` with `done` added (e.g. a finished stage's results), written at `path` atomically."""
    record = {**record, **done}
    atomic_write_json(path, record)
    return record


@dataclasses.dataclass
class Stages:
    """The numbered stages `names` of the run recorded at `path`: `begin` logs one and says whether it
    must run (not when the record has it finished), `finish` records it, `close` the whole run."""

    path: Path
    record: dict[str, Any]
    names: tuple[str, ...]
    log: Callable[[str], Any] = print

    def begin(self, name: str, title: str) -> bool:
        number = f"[{self.names.index(name) + 1}/{len(self.names)}] {title}"
        if name in self.record.get("done", []):
            self.log(f"{number}: finished by the interrupted run, kept")
            return False
        self.log(number)
        return True

    def finish(self, name: str) -> None:
        self.record = mark(self.path, self.record, done=[*self.record.get("done", []), name])

    def close(self) -> None:
        self.record = mark(self.path, self.record, finished=True)
