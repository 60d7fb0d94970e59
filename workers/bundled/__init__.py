"""The small model shipped with the package: the demo and the test fixture."""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
