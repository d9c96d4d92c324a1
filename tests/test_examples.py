"""The examples run (tiny settings) and train; .ci/run mirrors the README's set-up commands."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"^loss: ([0-9.]+) -> ([0-9.]+)", re.M)


def run_example(name, *args, timeout=120):
    env = dict(os.environ)
    # Works whether or not the package is installed (the examples just `import mlx_fastrnn`).
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MLX_RNN_IMPL", None)
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", name), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def assert_loss_fell(out):
    m = LOSS_LINE.search(out)
    assert m, f"no 'loss: A -> B' line in:\n{out}"
    first, last = float(m.group(1)), float(m.group(2))
    assert last < first, f"loss did not fall ({first} -> {last}):\n{out}"


def test_swap_import_example():
    out = run_example("swap_import.py", "--steps", "8", "--hidden", "16", "--frames", "12", "--batch", "4")
    assert_loss_fell(out)
    assert "mlx_fastrnn.layers.GRU" in out and "mlx.nn.layers.recurrent.GRU" in out, out
    diffs = [float(v) for v in re.findall(r"^max \|[^:]*: ([0-9.e+-]+)$", out, re.M)]
    assert len(diffs) == 3, out
    assert max(diffs) < 1e-3, f"stock and fast disagree:\n{out}"


def test_train_char_lstm_example():
    out = run_example(
        "train_char_lstm.py", "--steps", "40", "--hidden", "32", "--seq", "16", "--batch", "16",
        "--lr", "1e-2", "--log-every", "10", "--bench-steps", "2", "--sample", "20",
    )
    assert_loss_fell(out)
    rates = dict(re.findall(r"^\s+(legacy|fast)\s+([0-9.]+) tokens/s$", out, re.M))
    assert set(rates) == {"legacy", "fast"}, out
    assert all(float(r) > 0 for r in rates.values()), out


# --------------------------------------------------------------------------- .ci/run vs README

def readme_setup_commands():
    """The commands in the fenced blocks of the README's "Install" and "Test" sections."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for section in ("Install", "Test"):
        m = re.search(rf"^## {section}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
        assert m, f"README has no '## {section}' section"
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", m.group(1), re.M | re.S)
        assert len(blocks) == 1, f"README '## {section}' should hold exactly one fenced block, has {len(blocks)}"
        lines = [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
        commands += lines
    return commands


def ci_run_commands():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^README_COMMANDS=\((.*?)^\)", text, re.M | re.S)
    assert m, ".ci/run has no README_COMMANDS=( ... ) array"
    return shlex.split(m.group(1))


def test_ci_run_is_executable_bash():
    path = os.path.join(ROOT, ".ci", "run")
    assert os.access(path, os.X_OK), ".ci/run is not executable"
    with open(path, encoding="utf-8") as f:
        assert f.readline().startswith("#!/usr/bin/env bash")
    subprocess.run(["bash", "-n", path], check=True)


def test_ci_run_mirrors_readme():
    readme = readme_setup_commands()
    assert len(readme) == 2, f"README should give exactly two set-up commands, gives {readme}"
    assert readme[0].startswith("pip install") and readme[1] == "pytest", readme
    assert ci_run_commands() == readme


FAKE_PYTHON3 = """#!/usr/bin/env bash
# Stands in for python3 in test_ci_run_exit_codes: `python3 -m venv DIR` makes a
# venv whose activate script defines pip/pytest/python as shell functions.
[[ "$1 $2" == "-m venv" ]] || exit 99
mkdir -p "$3/bin"
cat > "$3/bin/activate" <<'ACT'
python() { echo "Python fake"; }
pip() { echo "fake pip $*"; }
pytest() { echo "fake pytest"; return "$FAKE_PYTEST_RC"; }
ACT
"""


@pytest.mark.parametrize("pytest_rc,expect_ok", [(0, True), (1, False), (5, False)])
def test_ci_run_exit_codes(tmp_path, pytest_rc, expect_ok):
    """Run the real .ci/run with fake python3/pip/pytest: it fails when pytest fails,
    including exit code 5 (no tests collected)."""
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        script = f.read()
    (checkout / ".ci" / "run").write_text(script)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python3").write_text(FAKE_PYTHON3)
    (fake_bin / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
               FAKE_PYTEST_RC=str(pytest_rc))
    proc = subprocess.run(["bash", str(checkout / ".ci" / "run")], env=env,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_ok, out
    for cmd in ci_run_commands():
        assert f"+ {cmd}" in out, f".ci/run did not print {cmd!r}:\n{out}"
    if pytest_rc == 5:
        assert "no tests" in out, out


@pytest.mark.parametrize("example", ["swap_import.py", "train_char_lstm.py"])
def test_example_help(example):
    out = run_example(example, "--help", timeout=60)
    assert "--steps" in out
