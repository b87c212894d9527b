"""Where the study's tasks run: this process / a process pool, submitit's local executor, or Slurm.

One call, `map_tasks(fn, args, launch)`, runs `fn(*a)` for every `a` in `args` and returns the
results in order. Tasks are small (a cell spec dict and a folder path): each task loads its
model and data itself, so nothing big is pickled, and a task is the same function whichever
launcher runs it. The Slurm launcher is submitit's (one job array per call, waited on); written
by hand here is only the choice of launcher and the dry run, which prints the sbatch script
submitit would submit (submitit has no public dry-run, so it is made by submitit's own
`_make_sbatch_string` from the executor's validated parameters, exactly as its array
submission does).

Footguns:
- `fn` must be importable by name on the workers (a module-level function of grip_core): Slurm nodes
  need the same checkout / environment, reachable at the same paths (a shared file system).
- submitit's LocalExecutor starts every submitted job at once; `workers` bounds how many run together
  by submitting in waves.
- The Slurm folder (logs, pickles) must be on the shared file system, not /tmp.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..moe.errors import ConfigError

LAUNCHERS = ("pool", "local", "slurm")


@dataclass
class SlurmSettings:
    """sbatch settings of the Slurm launcher (submitit SlurmExecutor parameters)."""

    partition: str | None = None          # --partition
    gpus_per_task: int | None = None      # --gpus-per-task (one cell per task: 1 is plenty)
    cpus_per_task: int | None = None      # --cpus-per-task
    mem_gb: float | None = None           # --mem, in GB
    time_min: int = 60                    # --time, minutes per task (a demo cell: ~2 min on one CPU core)
    array_parallelism: int = 64           # the %N of --array: tasks of the array running at once
    account: str | None = None            # --account
    qos: str | None = None                # --qos
    constraint: str | None = None         # --constraint
    setup: tuple[str, ...] = ()           # shell lines run before the task (module load, source venv, ...)
    job_name: str = "grip-study"          # --job-name

    def __post_init__(self):
        for name, low in (("gpus_per_task", 0), ("cpus_per_task", 1), ("mem_gb", 0), ("time_min", 1),
                          ("array_parallelism", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < low
                                      or (name == "mem_gb" and value == 0)):
                raise ConfigError(f"--slurm-{name.replace('_min', '').replace('_', '-')} {value!r}: give a number "
                                  f"{'> 0' if name == 'mem_gb' else f'>= {low}'}")

    def executor_parameters(self) -> dict:
        """The submitit SlurmExecutor.update_parameters(...) keyword arguments (unset ones left out)."""
        p = {"job_name": self.job_name, "time": self.time_min, "array_parallelism": self.array_parallelism,
             "partition": self.partition, "gpus_per_task": self.gpus_per_task, "cpus_per_task": self.cpus_per_task,
             "mem": f"{self.mem_gb:g}GB" if self.mem_gb else None, "account": self.account, "qos": self.qos,
             "constraint": self.constraint, "setup": list(self.setup) or None}
        return {k: v for k, v in p.items() if v is not None}


@dataclass
class LaunchConfig:
    """How the study's tasks run."""

    launcher: str = "pool"                # "pool": this process (workers 1) or a spawn pool; "local": submitit
                                          # LocalExecutor (one subprocess per task); "slurm": submitit job arrays
    workers: int = 1                      # pool / local: tasks at once (each with one torch thread when > 1)
    folder: Path | None = None            # submitit's folder (logs, pickles); default <out-dir>/submitit
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    dry_run: bool = False                 # slurm: print the sbatch script instead of submitting

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.dry_run and self.launcher != "slurm":
            raise ConfigError("--dry-run shows a Slurm submission: use it with --launcher slurm")


def map_tasks(fn: Callable, args: Sequence[tuple], launch: LaunchConfig, on_result: Callable[[Any], None] | None = None,
              name: str = "tasks") -> list:
    """[fn(*a) for a in args] on the chosen launcher; `on_result` sees each result as it arrives."""
    args = list(args)
    if not args:
        return []
    if launch.launcher == "pool":
        return _pool(fn, args, launch.workers, on_result)
    folder = Path(launch.folder or "submitit")
    if launch.launcher == "local":
        return _local(fn, args, launch.workers, folder, on_result)
    executor = slurm_executor(folder, launch.slurm)
    if launch.dry_run:
        print(sbatch_script(executor, len(args), name))
        return [None] * len(args)
    jobs = executor.map_array(fn, *zip(*args))
    print(f"submitted {name}: Slurm array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks), logs in {folder}")
    return _collect(jobs, on_result)


def _pool(fn, args, workers, on_result):
    if workers <= 1:
        out = []
        for a in args:
            out.append(fn(*a))
            if on_result:
                on_result(out[-1])
        return out
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(args)), _one_thread) as pool:
        out = []
        for r in [pool.apply_async(fn, a) for a in args]:
            out.append(r.get())                     # raises the task's exception
            if on_result:
                on_result(out[-1])
        pool.close()                                # let the workers exit cleanly (a terminate() leaks semaphores)
        pool.join()
        return out


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _local(fn, args, workers, folder, on_result):
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=24 * 60)
    out = []
    for i in range(0, len(args), workers):        # LocalExecutor starts every job it is given: waves of `workers`
        wave = args[i:i + workers]
        out += _collect(executor.map_array(fn, *zip(*wave)), on_result)
    return out


def _collect(jobs, on_result):
    out = []
    for job in jobs:
        out.append(job.result())                    # raises with the task's traceback if it failed
        if on_result:
            on_result(out[-1])
    return out


def slurm_executor(folder: Path, settings: SlurmSettings):
    """A submitit SlurmExecutor with `settings` (validated by submitit); works without `srun` on PATH.

    submitit refuses to build a SlurmExecutor where no `srun` exists; the subclass only lifts that
    check, so the dry run can be made (and tested) anywhere. A real submission still needs `sbatch`.
    """
    from submitit import SlurmExecutor

    class _Executor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = _Executor(folder=folder)
    try:
        executor.update_parameters(**settings.executor_parameters())
    except ValueError as exc:
        raise ConfigError(f"Slurm settings: {str(exc).splitlines()[0]}") from None
    return executor


def sbatch_script(executor, n_tasks: int, name: str = "tasks") -> str:
    """The sbatch file submitit's SlurmExecutor submits for a job array of `n_tasks` (its array path:
    the executor's parameters plus map_count, rendered by submitit.slurm.slurm._make_sbatch_string)."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                               map_count=n_tasks, **executor.parameters)
    return f"# dry run: {name}, a job array of {n_tasks} tasks (not submitted)\n{text}"


def slurm_settings_from(**kw) -> SlurmSettings:
    """SlurmSettings from CLI values (None = the default)."""
    fields = {f.name for f in dataclasses.fields(SlurmSettings)}
    return SlurmSettings(**{k: v for k, v in kw.items() if k in fields and v is not None})
