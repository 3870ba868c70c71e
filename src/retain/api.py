"""The notebook API: run an experiment, open a finished run, compare runs — as pandas tables.

```python
import retain
res = retain.run("configs/quick.yaml", "runs/quick")   # or a dict, or an ExperimentConfig
res.matrix                                            # rows = stages (0 = before training), columns = eval columns
res.metrics["forgetting_measure"], res.shift, res.steps
retain.compare(["runs/quick", "runs/sweep"])          # one row per run (a sweep's directory = all its runs)
```

Everything here reads the files a run writes (``results.json``, ``steps.jsonl``, ``events.jsonl``), so a run made
from the command line opens the same way. pandas is an optional extra (``pip install 'retain[notebook]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from retain.errors import RetainError

INSTALL = "pip install 'retain[notebook]'"


def require_pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise RetainError(f"the notebook API returns pandas tables: {INSTALL}") from None
    return pandas


@dataclass(frozen=True)
class Results:
    """A finished run: ``results`` is its ``results.json``; the properties are tables built from it."""

    dir: Path
    results: dict[str, Any]

    @property
    def matrix(self):
        """Accuracy matrix: index (stage, task) — stage 0 is the starting model, task ``base`` —, one column per
        evaluation column."""
        pd = require_pandas()
        index = pd.MultiIndex.from_arrays(
            [list(range(len(self.results["matrix"]))), ["base", *self.results["tasks"]]], names=["stage", "task"]
        )
        return pd.DataFrame(self.results["matrix"], index=index, columns=list(self.results["eval_tasks"]))

    @property
    def metrics(self) -> dict[str, Any]:
        """The continual-learning metrics exactly as ``results.json`` holds them (AA, FM, BWT, FWT, prior drop...)."""
        return dict(self.results["metrics"])

    @property
    def shift(self):
        """Distributional shift at the end of each stage: index = stage (1..T), one column per measure."""
        pd = require_pandas()
        table = self.results["shift"]
        stages = pd.Index(range(1, len(self.results["tasks"]) + 1), name="stage")
        return pd.DataFrame(dict(table), index=stages)

    @property
    def steps(self):
        """The training log (``steps.jsonl``): one row per logged step, with its stage and task."""
        from retain.files import read_jsonl

        return require_pandas().DataFrame(read_jsonl(self.dir / "steps.jsonl"))

    @property
    def events(self) -> list[dict[str, Any]]:
        """What the run warned about (``events.jsonl``): damaged stages redone, GRPO stages with no signal..."""
        from retain.files import read_jsonl

        return read_jsonl(self.dir / "events.jsonl")

    def model_dir(self, stage: int) -> Path:
        """The HF model directory after ``stage`` (1..T): ``from_pretrained`` loads it; its README.md is the card."""
        if not 1 <= stage <= len(self.results["tasks"]):
            raise RetainError(f"{self.dir}: no stage {stage} (stages 1..{len(self.results['tasks'])})")
        return self.dir / "stages" / str(stage) / "model"

    def __repr__(self) -> str:
        return f"Results({str(self.dir)!r}, tasks={self.results['tasks']})"


def run(config: Any, out: str | Path, progress=None, eval_cache: str | Path | None = None) -> Results:
    """Run (or resume) ``config`` — a YAML path, a dict or an ``ExperimentConfig`` — into ``out``."""
    from retain.config import ExperimentConfig, load_experiment, parse_experiment
    from retain.runner import run_experiment

    if isinstance(config, ExperimentConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = parse_experiment(config)
    elif isinstance(config, (str, Path)):
        cfg = load_experiment(config)
    else:
        raise RetainError(f"retain.run: config must be a YAML path, a dict or an ExperimentConfig, "
                          f"got {type(config).__name__}")
    results = run_experiment(cfg, out, progress, eval_cache=eval_cache)
    return Results(Path(out), results)


def load(run_dir: str | Path) -> Results:
    """A finished run directory (it holds ``results.json``)."""
    from retain.comparison import load_results

    return Results(Path(run_dir), load_results(run_dir))


def compare(dirs: str | Path | Sequence[str | Path]):
    """One row per run (``retain compare``'s table); a directory that is not a run stands for every run below it."""
    from retain.comparison import compare_rows

    pd = require_pandas()
    given = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    return pd.DataFrame(compare_rows(given))
