"""README.md's code blocks as tests, so that every line a new user copies runs as written.

Every Python block runs, in README order, as one script against a small quickstart's outputs (the
shared `quickstart --no-robust` fixture, copied to `runs/quickstart` of a scratch folder that has
`../shared/data` beside it, like a checkout). Every bash block runs there too, in order, through the
checkout's `safetynet`, unless an HTML comment right above it (`<!-- not run by tests: why -->`)
says what it needs that a test does not have: a download, a GPU, a server, hours. The bash blocks
that take minutes are `slow` (`pytest -m slow`, which CI runs).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run by tests: (.+?) -->\s*$")
# bash blocks that take minutes on 2 CPU cores, by their first line (each must still match a block)
SLOW = (
    "safetynet attack --model runs/quickstart/classifier.keras --data digits --attack pgd --out runs/pgd-train",  # PGD on 1,437 images
    "safetynet attack --model runs/quickstart/classifier.keras --attack cw --out runs/cw-train",  # CW on 1,437 images, retrain
    "safetynet train-classifier --data digits --seed 1 --out runs/surrogate.keras",  # a classifier, then a transfer attack
)


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    not_run: str | None  # why a test does not run it, from the comment above it

    @property
    def first_line(self) -> str:
        return next(line for line in self.code.splitlines() if line.strip() and not line.startswith("#"))


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.search(before)
        blocks.append(Block(match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1,
                            reason.group(1) if reason else None))
    return blocks


BASH = [block for block in readme_blocks() if block.language == "bash" and block.not_run is None]


def _param(block: Block):
    marks = [pytest.mark.slow] if block.first_line.startswith(SLOW) else []
    return pytest.param(block, id=f"line{block.line}", marks=marks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, quickstart_dir, shared_data) -> tuple[Path, dict[str, str]]:
    """A scratch checkout: runs/quickstart from the fixture, ../shared/data, the checkout's `safetynet`
    first on PATH (an installed copy may be older) and a Keras cache holding the shared ImageNet files."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "repo"
    shutil.copytree(quickstart_dir, work / "runs" / "quickstart")
    (root / "shared").symlink_to(shared_data.parent)
    shim = root / "bin" / "safetynet"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m safetynet.cli "$@"\n')
    shim.chmod(0o755)
    keras_home = root / "keras-home"
    (keras_home / "models").mkdir(parents=True)
    for file in (shared_data / "imagenet").iterdir():
        shutil.copy(file, keras_home / "models" / file.name)
    env = {**os.environ, "PATH": os.pathsep.join([str(shim.parent), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": str(ROOT), "KERAS_HOME": str(keras_home), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    return work, env


def _run(command: list[str], workdir: tuple[Path, dict[str, str]], where: str) -> None:
    work, env = workdir
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"README {where} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) > 20 and {block.language for block in blocks} <= {"", "bash", "python", "json"}
    for block in blocks:
        assert block.not_run is None or block.language == "bash", f"line {block.line}: only bash blocks may be skipped"
        assert block.not_run is None or len(block.not_run) > 10, f"line {block.line}: say what it needs"
    for prefix in SLOW:  # no stale entry
        assert any(block.first_line.startswith(prefix) for block in BASH), prefix


@pytest.mark.slow
def test_python_blocks_run_in_order(workdir):
    script = "\n\n".join(block.code for block in readme_blocks() if block.language == "python")
    path = workdir[0] / "readme_blocks.py"
    path.write_text(script)
    _run([sys.executable, str(path)], workdir, "Python blocks")


@pytest.mark.parametrize("block", [_param(block) for block in BASH])
def test_bash_block_runs_as_written(block, workdir):
    _run(["bash", "-euo", "pipefail", "-c", block.code], workdir, f"bash block at line {block.line}")
