"""The architecture contracts in pyproject.toml hold on the real tree, and provably fail on
a tree that breaks them.

The contracts are import-linter's (``lint-imports``, run by ``make lint``). They name no
domain: any package ``soko.<name>`` other than the platform is one, so the synthetic tree
below uses domain names that appear nowhere in the configuration.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

PLATFORM_CONTRACT = "The platform imports no domain (nor soko.app or soko.cli)"
DOMAIN_CONTRACT = "Domains meet only through each other's public and events modules"


def _importlinter_section() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        section: dict[str, Any] = tomllib.load(handle)["tool"]["importlinter"]
    return section


def _toml_value(value: Any) -> str:
    # Strings, booleans and lists of strings are all the contracts use; JSON spells
    # them the way TOML does.
    return json.dumps(value)


def _write_config(path: Path, section: dict[str, Any]) -> None:
    lines = ["[tool.importlinter]"]
    lines += [f"{key} = {_toml_value(v)}" for key, v in section.items() if key != "contracts"]
    for contract in section["contracts"]:
        lines.append("")
        lines.append("[[tool.importlinter.contracts]]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in contract.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _lint(cwd: Path, config: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


_VERDICT = re.compile(r"^(?P<name>.+) (?P<verdict>KEPT|BROKEN)(?: \(\d+ ignored imports?\))?$")


def _verdicts(output: str) -> dict[str, str]:
    """Each contract's name and whether lint-imports kept or broke it."""
    found = {}
    for line in output.splitlines():
        match = _VERDICT.match(line.strip())
        if match:
            found[match["name"]] = match["verdict"]
    return found


def _write_tree(src: Path, files: dict[str, str]) -> None:
    for name, body in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")


# A tree shaped like Soko's: entry points, the platform, and two domains that talk only
# through the allowed doors.
CLEAN_TREE = {
    "soko/__init__.py": "",
    "soko/__main__.py": "from soko.cli import main\n",
    "soko/cli.py": "import soko.app\n",
    "soko/app.py": "import soko.platform.db\nimport soko.pantry.routes\n",
    "soko/platform/__init__.py": "",
    "soko/platform/db.py": "",
    "soko/platform/outbox.py": "from soko.platform import db\n",
    "soko/pantry/__init__.py": "",
    "soko/pantry/models.py": "from soko.platform.db import *\n",
    "soko/pantry/public.py": "from soko.pantry import models\n",
    "soko/pantry/events.py": "",
    "soko/pantry/routes.py": "from soko.pantry import models\n",
    "soko/delivery/__init__.py": "",
    "soko/delivery/models.py": "import soko.platform\n",
    "soko/delivery/public.py": "from soko.delivery import models\n",
    "soko/delivery/service.py": (
        "from soko.pantry import public\n"
        "from soko.pantry.events import *\n"
        "from soko.platform.outbox import *\n"
        "from soko.delivery import models\n"
    ),
}


def test_real_tree_keeps_every_contract() -> None:
    result = _lint(ROOT, ROOT / "pyproject.toml", ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _verdicts(result.stdout) == {PLATFORM_CONTRACT: "KEPT", DOMAIN_CONTRACT: "KEPT"}


def _module_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split("->") if part.strip().startswith("soko.")]
    if isinstance(value, list):
        return [name for item in value for name in _module_names(item)]
    return []


def test_the_contracts_name_no_domain() -> None:
    """A domain added later is covered without editing the configuration."""
    named = {
        name.split(".")[1]
        for contract in _importlinter_section()["contracts"]
        for value in contract.values()
        for name in _module_names(value)
    }
    assert "*" in named
    assert named <= {"platform", "app", "cli", "__main__", "*", "**"}


def test_clean_tree_passes(tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", CLEAN_TREE)
    _write_config(tmp_path / "pyproject.toml", _importlinter_section())
    result = _lint(tmp_path, tmp_path / "pyproject.toml", tmp_path / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _verdicts(result.stdout) == {PLATFORM_CONTRACT: "KEPT", DOMAIN_CONTRACT: "KEPT"}


@pytest.mark.parametrize(
    ("broken_files", "contract", "reported"),
    [
        pytest.param(
            {"soko/platform/outbox.py": "from soko.pantry import public\n"},
            PLATFORM_CONTRACT,
            "soko.platform.outbox -> soko.pantry.public",
            id="platform-imports-domain-public",
        ),
        pytest.param(
            {"soko/platform/outbox.py": "import soko.app\n"},
            PLATFORM_CONTRACT,
            "soko.platform.outbox -> soko.app",
            id="platform-imports-app",
        ),
        pytest.param(
            {"soko/delivery/service.py": "from soko.pantry.models import *\n"},
            DOMAIN_CONTRACT,
            "soko.delivery.service -> soko.pantry.models",
            id="domain-imports-other-domain-models",
        ),
        pytest.param(
            {"soko/delivery/public.py": "import soko.pantry.routes\n"},
            DOMAIN_CONTRACT,
            "soko.delivery.public -> soko.pantry.routes",
            id="domain-public-imports-other-domain-routes",
        ),
        pytest.param(
            {"soko/delivery/__init__.py": "from soko.pantry import routes\n"},
            DOMAIN_CONTRACT,
            "soko.delivery -> soko.pantry.routes",
            id="domain-package-imports-other-domain-internals",
        ),
    ],
)
def test_each_breach_is_reported(
    tmp_path: Path, broken_files: dict[str, str], contract: str, reported: str
) -> None:
    _write_tree(tmp_path / "src", {**CLEAN_TREE, **broken_files})
    _write_config(tmp_path / "pyproject.toml", _importlinter_section())
    result = _lint(tmp_path, tmp_path / "pyproject.toml", tmp_path / "src")
    assert result.returncode == 1, result.stdout + result.stderr
    assert _verdicts(result.stdout)[contract] == "BROKEN", result.stdout
    assert reported in result.stdout


def test_both_breaches_together_are_both_reported(tmp_path: Path) -> None:
    """A platform->domain import and a domain->other-domain-internals import, side by side:
    each is named, and the allowed imports through public and events are not."""
    _write_tree(
        tmp_path / "src",
        {
            **CLEAN_TREE,
            "soko/platform/outbox.py": "import soko.delivery.public\n",
            "soko/delivery/service.py": CLEAN_TREE["soko/delivery/service.py"]
            + "from soko.pantry import models as pantry_models\n",
        },
    )
    _write_config(tmp_path / "pyproject.toml", _importlinter_section())
    result = _lint(tmp_path, tmp_path / "pyproject.toml", tmp_path / "src")
    assert result.returncode == 1, result.stdout + result.stderr
    assert _verdicts(result.stdout) == {PLATFORM_CONTRACT: "BROKEN", DOMAIN_CONTRACT: "BROKEN"}
    assert "soko.platform.outbox -> soko.delivery.public" in result.stdout
    assert "soko.delivery.service -> soko.pantry.models" in result.stdout
    assert "-> soko.pantry.public" not in result.stdout
    assert "-> soko.pantry.events" not in result.stdout
