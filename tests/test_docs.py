"""Every ```python block of README.md and docs/*.md runs as written, alone.

Each block runs as a fresh process from an empty temporary folder, as a user
pasting it would run it: with the package importable, without the eight
simulated devices that conftest.py requests for the tests (a block that needs
several devices requests them itself). Text not meant to run is fenced as
``text`` or ``bash``, never as ``python``. Every relative link points at a
file of the repository.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
LOCAL_LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")


def python_blocks():
  for document in DOCUMENTS:
    text = document.read_text()
    for index, match in enumerate(PYTHON_BLOCK.finditer(text)):
      line = text.count("\n", 0, match.start()) + 1
      name = document.relative_to(ROOT).as_posix()
      yield pytest.param(match.group(1), line, id=f"{name}-{index}")


def fresh_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
  return env


def test_documents_have_python_blocks():
  assert len(list(python_blocks())) >= 5


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_local_links_point_at_files(document):
  for target in LOCAL_LINK.findall(document.read_text()):
    assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


@pytest.mark.slow
@pytest.mark.parametrize("code, line", list(python_blocks()))
def test_python_block_runs_alone(code, line, tmp_path):
  script = tmp_path / "snippet.py"
  script.write_text(code)
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=fresh_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, (
      f"the block at line {line} failed:\n{code}\nstdout:\n{result.stdout[-2000:]}\n"
      f"stderr:\n{result.stderr[-3000:]}")
