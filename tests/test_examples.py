"""Every script in examples/ runs to the end with tiny settings.

Each runs as a fresh process, as a user would start it: without the eight
simulated devices that conftest.py requests for the tests (data_parallel.py
requests its own), and from a temporary folder, which receives the plots.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Script, tiny settings, lines its output must contain, the plot it writes.
CASES = {
    "quickstart": (["--steps", "2"],
                   ["parameters match the full-batch run", "N=8:"], None),
    "data_parallel": (["--steps", "2", "--microbatches", "2", "--microbatch-size", "4"],
                      ["inside loops:  CollectivesByKind()",
                       "parameters match the single-device run"], None),
    "digits_cnn": (["--steps", "3", "--batch", "64", "--eval-every", "2"],
                   ["full batch         test accuracy", "N=8 micro-batches  test accuracy",
                    "compiled temporary memory of one training step"], "digits_cnn.png"),
    "char_lm": (["--steps", "3", "--batch", "8", "--microbatches", "4", "--length", "32",
                 "--dim", "32", "--heads", "2", "--layers", "1", "--eval-every", "2"],
                ["tokens/s", "gradient noise scale B_simple", "sample (temperature 0.5):"],
                "char_lm.png"),
}


def example_env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags.strip()
  return env


@pytest.fixture(scope="module")
def started(tmp_path_factory):
  """Starts every example at once (their compilations overlap); output to files."""
  runs = {}
  for name, (args, _, plot) in CASES.items():
    folder = tmp_path_factory.mktemp(name)
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), *args]
    if plot:
      command += ["--out", str(folder / "out")]
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
      runs[name] = folder, subprocess.Popen(command, cwd=folder, env=example_env(),
                                            stdout=out, stderr=err)
  yield runs
  for _, process in runs.values():
    if process.poll() is None:
      process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, started):
  _, expected, plot = CASES[name]
  folder, process = started[name]
  returncode = process.wait(timeout=300)
  stdout = (folder / "stdout").read_text()
  log = f"stdout:\n{stdout}\nstderr:\n{(folder / 'stderr').read_text()[-3000:]}"
  assert returncode == 0, log
  for line in expected:
    assert line in stdout, f"{line!r} not printed\n{log}"
  if plot:
    path = folder / "out" / plot
    assert path.is_file() and path.stat().st_size > 10_000, log
    assert f"wrote {path}" in stdout, log


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_help_shows_every_default(script):
  result = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], env=example_env(),
                          capture_output=True, text=True, timeout=120, check=True)
  options = re.findall(r"^  (--[\w-]+)", result.stdout, flags=re.MULTILINE)
  assert options, result.stdout
  assert result.stdout.count("(default:") == len(options), result.stdout
