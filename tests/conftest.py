"""Test-session settings: one torch thread per process.

The suite runs beside a Streamlit server, notebook kernels and worker processes on 2 cores;
spinning OpenMP threads of several processes slow each other down many times over, and one
thread also keeps CPU numerics identical from run to run.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # inherited by the subprocesses tests start

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    """The shipped demo MoE, loaded once per test module (a module may change it: diagnose in place)."""
    from grip_core.moe import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def data():
    """The demo's domain scenario, seed 0, 16 retained evaluation questions (a module may override it)."""
    from grip_core.runs import UnlearningData

    return UnlearningData.from_scenario("domain", seed=0, retain_eval_size=16)


@pytest.fixture(scope="session")
def real_width_checkpoint(tmp_path_factory):
    """A random OLMoE at OLMoE-1B-7B's real width (hidden 2048, 64 experts, top-8), one layer, sharded Hub
    layout in bfloat16: 0.42 B parameters, 0.84 GB on disk. Built once per test session (~10 s)."""
    from grip_core.moe.tiny import build_real_width_checkpoint

    return build_real_width_checkpoint(tmp_path_factory.mktemp("real_width") / "olmoe-real-width", num_layers=1)
