"""The project as a new user gets it: build the sdist from the repository, build the wheel from that sdist, install
the wheel into a fresh virtual environment (pip, from the package index this machine is configured with; torch at the
version running these tests, which the local wheel store holds as a CPU build), then work from a folder outside the
repository: the README's Python snippets, `load_model()` with the shipped weights (the same logits as the checkout's
model, not a random initialisation), `superlinear-lab report`, the CLI's program names, and the clear error when
the shipped weight files are missing.

One install for the module (about 1-2 minutes: torch is unpacked into the new environment).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import tomllib
import venv
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_close
from superlinear_lab.model.io import SHIPPED  # every shipped model's files must reach the sdist and the wheel

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
MODEL_FILES = ("config.json", "model.safetensors", "MODEL_CARD.md")
PROBE_IDS = list(b"The shipped model reads this sentence.")


def run(cmd, *, cwd, env=None, timeout=900, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                             f"\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def build(hook: str, source: Path, out: Path) -> Path:
    """Run setuptools' PEP 517 hook `hook` ("build_sdist" / "build_wheel") in `source`; the built file's path."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    name = run([sys.executable, "-c", code], cwd=source).stdout.strip().splitlines()[-1]
    return out / name


def user_env(home: Path) -> dict:
    """The environment of a user outside the repository: nothing points back at the checkout or its venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SUPERLINEAR_LAB_MODELS", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", SUPERLINEAR_LAB_SNAPSHOT_DIR=str(home / "snapshots"),
               XDG_CACHE_HOME=str(home / "cache"), MPLCONFIGDIR=str(home / "mpl"))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    dist = tmp / "dist"
    dist.mkdir()
    sdist = build("build_sdist", REPO, dist)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "src", filter="data")
    unpacked = tmp / "src" / f"superlinear_lab-{VERSION}"
    wheel = build("build_wheel", unpacked, dist)  # from the sdist, as pip does: proves the sdist is enough

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    home = tmp / "home"
    (home / "work").mkdir(parents=True)
    env = user_env(home)
    torch_pin = "torch==" + torch.__version__.split("+")[0]  # the build the local wheel store holds
    run([python, "-m", "pip", "install", "--quiet", torch_pin, wheel], cwd=home, env=env)
    return SimpleNamespace(sdist=sdist, wheel=wheel, unpacked=unpacked, python=python, bin=env_dir / "bin",
                           venv=env_dir, cwd=home / "work", env=env)


def in_venv(installed, code: str, check=True) -> subprocess.CompletedProcess:
    return run([installed.python, "-c", textwrap.dedent(code)], cwd=installed.cwd, env=installed.env, check=check)


def test_sdist_holds_what_tests_and_readers_need(installed):
    with tarfile.open(installed.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("LICENSE", "README.md", "Makefile", "pyproject.toml", "tests/conftest.py", "tests/helpers.py",
                 "tests/server_process.py", "tests/test_install.py", "docs/algorithm.md", "docs/design.md",
                 "notebooks/00_quickstart.ipynb",
                 *(f"superlinear_lab/models/{name}/{f}" for name in SHIPPED for f in MODEL_FILES)):
        assert need in names, f"sdist lacks {need}"
    tracked = run(["git", "ls-files", "tests", "docs", "notebooks"], cwd=REPO, check=False).stdout.split()
    missing = [f for f in tracked if f.endswith((".py", ".md", ".ipynb")) and f not in names]
    assert not missing, f"sdist lacks tracked files {missing[:10]}"


def test_wheel_holds_every_package_the_model_and_the_licence(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    sources = {"superlinear_kernels": installed.unpacked / "kernels",
               "superlinear_lab": installed.unpacked / "superlinear_lab"}
    for package, folder in sources.items():
        for py in folder.rglob("*.py"):
            assert f"{package}/{py.relative_to(folder).as_posix()}" in names, f"wheel lacks {package}/{py.name} " \
                f"({py.relative_to(installed.unpacked)}): add its package to pyproject.toml"
        assert f"{package}/py.typed" in names
    for name in SHIPPED:
        for f in MODEL_FILES:
            assert f"superlinear_lab/models/{name}/{f}" in names
    assert not [n for n in names if n.endswith(".html")], "the evaluation heatmap stays out of the wheel"
    assert f"superlinear_lab-{VERSION}.dist-info/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(installed.wheel).read(f"superlinear_lab-{VERSION}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_installed_package_is_the_wheel_and_names_its_version(installed):
    out = in_venv(installed, """
        import json, superlinear_kernels, superlinear_lab
        print(json.dumps([superlinear_lab.__file__, superlinear_lab.__version__, superlinear_kernels.__version__]))
    """).stdout
    path, lab_version, kernels_version = json.loads(out)
    assert Path(path).is_relative_to(installed.venv), f"imported {path}, not the installed wheel"
    assert lab_version == kernels_version == VERSION


def test_readme_python_snippets_run_outside_the_repo(installed):
    snippets = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert snippets, "README.md has no ```python snippet"
    (installed.cwd / "notes.txt").write_text("Meeting notes. The launch code is 4417. Bring the blue folder.\n" * 40)
    for i, code in enumerate(snippets):
        proc = run([installed.python, "-c", code], cwd=installed.cwd, env=installed.env, check=False, timeout=600)
        assert proc.returncode == 0, f"README snippet {i + 1} failed:\n{code}\n--- stderr\n{proc.stderr[-3000:]}"


def test_load_model_gives_the_shipped_weights_not_random_ones(installed):
    out = in_venv(installed, f"""
        import json, torch
        from superlinear_lab import describe_model, load_model
        model = load_model(backend="torch")
        with torch.no_grad():
            logits = model(torch.tensor([{PROBE_IDS!r}]))[0, -1]
        print(json.dumps({{"source": model.source, "id": model.model_id, "line": describe_model(model),
                          "logits": logits.tolist()}}))
    """).stdout
    got = json.loads(out)
    assert got["id"] == "superlinear-lab/tiny" and got["source"]["kind"] == "shipped"
    assert Path(got["source"]["path"]).is_relative_to(installed.venv), got["source"]["path"]
    from superlinear_lab.model import load_model
    from superlinear_lab.model.io import sha256_file

    assert got["source"]["weights_sha256"] == sha256_file(REPO / "superlinear_lab/models/tiny/model.safetensors")
    assert got["line"] == f"superlinear-lab/tiny (shipped, weights sha256 {got['source']['weights_sha256'][:12]})"
    ids = torch.tensor([PROBE_IDS])
    with torch.no_grad():
        checkout = load_model(backend="torch")(ids)[0, -1]
        random = load_model(random_init=True, backend="torch")(ids)[0, -1]
    assert_close("installed vs checkout logits", checkout, torch.tensor(got["logits"]), 1e-5)
    assert (checkout - random).abs().max() > 1.0, "the probe cannot tell trained from random weights"


def test_report_command_names_its_model(installed):
    out = installed.cwd / "report.html"
    proc = run([installed.bin / "superlinear-lab", "report", "pydoc", "--max-tokens", "2K", "--backend", "torch",
                "-o", out], cwd=installed.cwd, env=installed.env)
    assert "superlinear-lab/small (shipped, weights sha256" in proc.stdout  # the report's default model
    html = out.read_text()
    assert "superlinear-lab/small" in html, "the report page does not name its model"


def test_cli_program_names_and_version(installed):
    cli = installed.bin / "superlinear-lab"
    for command in ("train", "evaluate"):
        usage = run([cli, command, "--help"], cwd=installed.cwd, env=installed.env).stdout
        assert usage.startswith(f"usage: superlinear-lab {command}"), usage[:200]
    assert run([cli, "--version"], cwd=installed.cwd, env=installed.env).stdout.strip() == f"superlinear-lab {VERSION}"


OFF_REPO_DOCS = re.compile(r"shared/docs|(?<![\w/])(?:SPEC ?§|SPEC\.md|DESIGN\.md)")  # docs users do not have


def test_installed_files_cite_only_the_repositorys_docs(installed):
    site = next(installed.venv.glob("lib/python*/site-packages"))
    cites = []
    for package in ("superlinear_lab", "superlinear_kernels"):
        for f in (site / package).rglob("*"):
            if f.suffix in (".py", ".md", ".json") and OFF_REPO_DOCS.search(f.read_text(errors="replace")):
                cites.append(str(f.relative_to(site)))
    assert not cites, f"installed files cite SPEC/DESIGN documents that are not in the repo (use docs/): {cites[:10]}"


def test_missing_weight_files_raise_a_clear_error(installed):
    weights = next(installed.venv.glob("lib/python*/site-packages")) / "superlinear_lab/models/tiny/model.safetensors"
    hidden = weights.with_name("model.safetensors.hidden")
    weights.rename(hidden)
    try:
        proc = in_venv(installed, "from superlinear_lab import load_model; load_model()", check=False)
        assert proc.returncode != 0 and "FileNotFoundError: model 'tiny': its weight files" in proc.stderr, \
            proc.stderr[-2000:]
        assert "random_init=True" in proc.stderr
        report = run([installed.bin / "superlinear-lab", "report", "pydoc", "--model", "tiny", "-o",
                      installed.cwd / "r.html"],
                     cwd=installed.cwd, env=installed.env, check=False)
        assert report.returncode == 2 and "its weight files" in report.stderr, report.stderr[-2000:]
    finally:
        hidden.rename(weights)


def test_readme_and_docs_links_resolve_in_the_repo():
    def anchors(md: Path) -> set[str]:  # GitHub's heading slugs
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", md.read_text(), flags=re.M)}

    for md in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (md.parent / path).resolve() if path else md
            assert resolved.is_file(), f"{md.name}: link {target!r} points at nothing in the repo"
            assert resolved.is_relative_to(REPO), f"{md.name}: link {target!r} leaves the repository"
            if anchor:
                assert anchor in anchors(resolved), f"{md.name}: link {target!r}: no heading #{anchor}"
