"""Importing the package, the simulation and the CLI must not load a deep-learning framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("tensorflow", "keras", "torch", "lightning", "pytorch_lightning", "transformers", "peft", "accelerate")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return [m for m in done.stdout.strip().split(",") if m]


def test_package_simulation_and_cli_imports_stay_light() -> None:
    assert _loaded_after("import flwr_serverless, flwr_serverless.simulation, flwr_serverless.cli") == []
    assert _loaded_after("from flwr_serverless.simulation import run_simulation, SimulationConfig") == []
    assert _loaded_after("import flwr_serverless.callbacks") == []


def test_torch_and_transformers_entry_points_import_only_what_they_need() -> None:
    loaded = _loaded_after("import flwr_serverless.torch")
    assert "torch" in loaded and not {"transformers", "peft", "tensorflow"} & set(loaded)
    assert "transformers" in _loaded_after("from flwr_serverless.transformers import FlwrFederatedCallback")


def test_keras_shim_imports_the_callback() -> None:
    assert "keras" in _loaded_after("from flwr_serverless.keras import FlwrFederatedCallback")


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flwr_serverless", "simulate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--nodes" in done.stdout and "--strategy" in done.stdout


def test_inspect_and_clean_import_neither_a_framework_nor_the_simulation(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    code = (
        "import sys\n"
        "from flwr_serverless.cli import main\n"
        f"assert main(['inspect', {str(store)!r}]) == 0\n"
        f"assert main(['clean', {str(store)!r}, '--dry-run']) == 0\n"
        f"heavy = {(*HEAVY, 'flwr_serverless.simulation')!r}\n"
        "print('LOADED=' + ','.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "LOADED=\n" in done.stdout, done.stdout
    assert "would delete 0 object(s)" in done.stdout


def test_the_paper_command_moved_out_of_the_package() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flwr_serverless", "experiment", "paper", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "make paper" in done.stderr
