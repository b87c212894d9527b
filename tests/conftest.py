"""Test-session settings: one torch thread per process.

The suite runs beside a Streamlit server, notebook kernels and worker processes on 2 cores;
spinning OpenMP threads of several processes slow each other down many times over, and one
thread also keeps CPU numerics identical from run to run.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # inherited by the subprocesses tests start

import torch  # noqa: E402

torch.set_num_threads(1)
