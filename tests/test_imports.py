"""Importing the package, the simulation and the CLI must not load a deep-learning framework."""

from __future__ import annotations

import subprocess
import sys

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
