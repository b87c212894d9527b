"""Jobs (one loop for every caller), typed run configs, the run store, presets."""
from .config import RunConfig
from .data import UnlearningData
from .evaluate import Baseline, evaluate_final, evaluate_step
from .job import JobCancelled, NonFiniteLossError, RunResult, run_unlearning, seed_everything
from .presets import PRESETS, Preset, get_preset
from .store import DEFAULT_RUNS_DIR, RunWriter, SavedRun, list_runs, load_run

__all__ = ["RunConfig", "UnlearningData", "Baseline", "evaluate_final", "evaluate_step", "JobCancelled",
           "NonFiniteLossError", "RunResult", "run_unlearning", "seed_everything", "PRESETS", "Preset", "get_preset",
           "DEFAULT_RUNS_DIR", "RunWriter", "SavedRun", "list_runs", "load_run"]
