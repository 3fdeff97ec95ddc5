"""README.md's Python example runs as written, in an empty folder, and prints what the README shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_adapters_support import REPO

EXPECTED_PREFIX = "# {"
"""The README shows the snippet's printed line as a comment after the ``print``."""


def python_snippet(readme: str) -> str:
    """The README's Python block that scores with ``RewardScorer`` (exactly one must exist)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "RewardScorer" in b]
    assert len(blocks) == 1, f"expected one ```python block using RewardScorer in README.md, found {len(blocks)}"
    return blocks[0]


def expected_output(snippet: str) -> str:
    """The printed line the README shows: the last ``# {...}`` comment of the snippet, without the ``# ``."""
    shown = [line for line in snippet.splitlines() if line.startswith(EXPECTED_PREFIX)]
    assert shown, "the README's Python snippet shows no printed output ('# {...}' line)"
    return shown[-1][2:]


def test_expected_output_is_read_from_the_snippet() -> None:
    snippet = "x = 1\nprint({'a': 1})\n# {'a': 1}\n"
    assert expected_output(python_snippet(f"```python\nRewardScorer\n{snippet}```\n")) == "{'a': 1}"


@pytest.mark.slow
def test_readme_python_snippet_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """Run twice in the same folder: a reader runs it again (the index it wrote is already there)."""
    snippet = python_snippet((REPO / "README.md").read_text(encoding="utf-8"))
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for run in ("first", "second"):
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=env)
        assert out.returncode == 0, f"the README's Python snippet failed on its {run} run:\n{out.stderr[-3000:]}"
        assert out.stdout.strip() == expected_output(snippet)
        assert (tmp_path / "index" / "manifest.json").is_file()
