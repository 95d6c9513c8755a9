import os

# interpreted Triton kernels on the CPU: the flag must be set before any kernel module is imported. One process
# cannot mix interpreted and compiled kernels, so the GPU suite (SIGMA_TEST_GPU=1 pytest -m gpu) leaves it unset.
if os.environ.get("SIGMA_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # fp32 tl.dot exact (IEEE) rather than TF32, for the tight fp32 comparisons of the GPU suite
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA and the compiled-kernel process (SIGMA_TEST_GPU=1); elsewhere they are skipped."""
    if os.environ.get("SIGMA_TEST_GPU") == "1" and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU suite: run `SIGMA_TEST_GPU=1 python -m pytest -m gpu` on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
