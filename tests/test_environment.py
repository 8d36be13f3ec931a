"""The pinned environment: scripts/setup_venv.sh installs from requirements/lock.txt, and the .venv it made holds
exactly the pinned versions (a drifted environment would move the demo's figures without anyone noticing)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def test_lock_pins_the_stack_and_setup_installs_from_it() -> None:
    pins = _pins()
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "numpy", "deepspeed"):
        assert name in pins, name
    assert not any(n.lower() in ("torch", "medllava") for n in pins)  # torch is pinned per machine kind
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    assert '-c "$lock"' in setup and "requirements/lock.txt" in setup


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the .venv made by scripts/setup_venv.sh")
def test_the_venv_holds_the_pinned_versions() -> None:
    drift = {}
    for name, pinned in _pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = None
        if got != pinned:
            drift[name] = (pinned, got)
    assert not drift, f"the environment drifted from requirements/lock.txt (pinned, installed): {drift}"


def test_cpu_setup_installs_a_torch_torchvision_pair_and_qwen_vl_processors_load() -> None:
    """Qwen-VL processors need torchvision in transformers 5.x: CPU machines install a torch + torchvision pair that
    imports together (scripts/cpu_torch.sh), and the environment has it."""
    from transformers.utils import is_torchvision_available

    pair = (ROOT / "scripts" / "cpu_torch.sh").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in pair and "cpu_torch.sh" in (ROOT / "scripts" / "setup_venv.sh").read_text()
    assert is_torchvision_available()
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor  # the fast (torchvision) classes

    assert Qwen2VLImageProcessor().patch_size and Qwen2VLVideoProcessor().merge_size
