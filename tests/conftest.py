import os

# interpreted Triton kernels on the CPU: the flag must be set before any kernel module is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cli():
    """Run the sigma CLI in-process: cli("train-tokenizer", "--steps", "2") -> Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from sigmacli.app import app

    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args])

    return run
