"""The built wheel, installed into a fresh virtual environment, carries what a user points a framework at:
``pkg://grape_rewards.adapters.verl`` imports through verl's loader, ``grape-rewards adapters path`` prints installed
reward files that OpenRLHF's and verl's loaders accept, and the installed adapter scores. The sdist carries the
license and what its tests need.

The venv sees the running interpreter's site-packages through a ``.pth`` file (torch & co. are not reinstalled:
``pip install --no-deps``), so the test works whether pytest runs in a base interpreter or inside a user's venv (a
nested ``--system-site-packages`` venv would see the base interpreter's packages, not the outer venv's). Only the
folders are added, not their ``.pth`` hooks, so an editable install of the checkout stays invisible; every check runs
from a folder outside the source tree, with ``PYTHONPATH`` unset, and asserts that the import resolved to the venv's
copy."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_adapters_support import REPO, demo_index_dir, require

SOURCE_FILES = ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in")
SOURCE_FOLDERS = ("grape_rewards", "tests", "adapters", "examples", "benchmarks", "docs")
PAYLOAD = ("grape_rewards/adapters/verl.py", "grape_rewards/adapters/openrlhf.py", "grape_rewards/adapters/trl.py",
           "grape_rewards/adapters/files/openrlhf/reward_func.py", "grape_rewards/adapters/files/verl/reward_fn.py",
           "grape_rewards/prepare/cli.py", "grape_rewards/demo/data/captions.jsonl")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(venv folder, the wheel, a working folder outside the source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    src = source_copy(root)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next((root / "dist").glob("grape_rewards-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    see_outer_packages(root / "venv")
    install = subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    work = root / "elsewhere"
    work.mkdir()
    yield root / "venv", wheel, work


def source_copy(root: Path) -> Path:
    """The checkout's source tree (what the sdist is built from), copied under ``root`` without build leftovers."""
    src = root / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, src / name)
    for name in SOURCE_FOLDERS:
        shutil.copytree(REPO / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache"))
    return src


def see_outer_packages(venv: Path) -> None:
    """Let ``venv`` import what the running interpreter has installed: its site folders go into a ``.pth``."""
    outer = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_path("purelib"),
             sysconfig.get_path("platlib")]
    python = venv / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    folders = dict.fromkeys(p for p in outer if Path(p).is_dir() and Path(p) != Path(inner))
    (Path(inner) / "outer_site_packages.pth").write_text("".join(f"{p}\n" for p in folders))


def in_venv(venv: Path, work: Path, *args: str, env: dict[str, str] | None = None) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("GRAPE_")}
    out = subprocess.run(args, capture_output=True, text=True, cwd=work, env={**environ, **(env or {})},
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


@pytest.mark.slow
def test_wheel_carries_the_adapters(venv: tuple[Path, Path, Path]) -> None:
    names = set(zipfile.ZipFile(venv[1]).namelist())
    missing = [p for p in PAYLOAD if p not in names]
    assert not missing, f"the wheel lacks {missing}"
    packages = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "grape_rewards").rglob("__init__.py"))
    unlisted = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not unlisted, f"packages missing from pyproject.toml's [tool.setuptools] packages: {unlisted}"
    with zipfile.ZipFile(venv[1]) as wheel:  # the one copy of each reward file, mapped from adapters/
        for source in ("openrlhf/reward_func.py", "verl/reward_fn.py"):
            assert wheel.read(f"grape_rewards/adapters/files/{source}") == (REPO / "adapters" / source).read_bytes()


@pytest.mark.slow
def test_installed_paths_load_in_the_frameworks(venv: tuple[Path, Path, Path]) -> None:
    require("verl", "openrlhf")
    env_dir, _, work = venv
    site = str(env_dir)
    bin_dir = env_dir / "bin"
    openrlhf_file = in_venv(env_dir, work, str(bin_dir / "grape-rewards"), "adapters", "path", "openrlhf")
    verl_file = in_venv(env_dir, work, str(bin_dir / "grape-rewards"), "adapters", "path", "verl")
    for path in (openrlhf_file, verl_file):
        assert path.startswith(site) and Path(path).is_file()
    code = f"""
import inspect, sys
from verl.utils.import_utils import load_extern_object
from openrlhf.utils.agent import SingleTurnAgentExecutor
fn = load_extern_object("pkg://grape_rewards.adapters.verl", "compute_score")
assert inspect.iscoroutinefunction(fn), fn
assert sys.modules["grape_rewards"].__file__.startswith({site!r}), sys.modules["grape_rewards"].__file__
by_path = load_extern_object({verl_file!r}, "compute_score")
assert by_path is fn, (by_path, fn)
executor = SingleTurnAgentExecutor([{openrlhf_file!r}])
assert executor.reward_func is sys.modules["grape_rewards.adapters.openrlhf"].reward_func
print("ok")
"""
    assert in_venv(env_dir, work, str(bin_dir / "python"), "-c", code).splitlines()[-1] == "ok"


@pytest.mark.slow
def test_installed_adapter_scores_in_process(venv: tuple[Path, Path, Path]) -> None:
    env_dir, _, work = venv
    code = """
import json, sys
from grape_rewards.adapters.openrlhf import reward_lists
prompt = "<|im_start|>user\\nA dog with a frisbee<|im_end|>\\n<|im_start|>assistant\\n"
out = reward_lists([prompt + "<answer>A brown dog catches a frisbee in a sunny park.</answer><|im_end|>"], [prompt],
                   [json.dumps({"target_ids": ["cap000"]})])
assert sys.modules["grape_rewards"].__file__.startswith(sys.prefix)
print(out["rewards"][0], out["extra_logs"]["rank"][0])
"""
    out = in_venv(env_dir, work, str(env_dir / "bin" / "python"), "-c", code,
                  env={"GRAPE_INDEX": demo_index_dir(), "GRAPE_DEVICE": "cpu"})
    assert out.splitlines()[-1] == "1.0 1.0"


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_license_and_what_the_tests_need(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    dist = tmp_path / "dist"
    for hook in ("build_sdist", "build_wheel"):  # PEP 517, one process each (as pip and build call them)
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        out = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "would be ignored" not in out.stdout + out.stderr, "setuptools warns about an unlisted package"
    (sdist_path,), (wheel_path,) = dist.glob("grape_rewards-*.tar.gz"), dist.glob("grape_rewards-*.whl")
    with tarfile.open(sdist_path) as sdist:
        top = sdist_path.name.removesuffix(".tar.gz")
        names = {name.removeprefix(top + "/") for name in sdist.getnames()}
    wanted = {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "grape_rewards/py.typed", "tests/conftest.py",
              "tests/test_adapters_support.py", "tests/install_frameworks.sh", "examples/serve.yaml",
              "adapters/README.md", "grape_rewards/demo/data/captions.jsonl"}
    assert not wanted - names, f"the sdist lacks {sorted(wanted - names)}"
    assert not [n for n in names if "__pycache__" in n], "the sdist carries __pycache__"
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = wheel.read(metadata).decode()
    assert "grape_rewards/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the wheel lacks the license file"
    assert "License-Expression: Apache-2.0" in text and "Classifier: " in text and "Project-URL: " in text
