"""The ``retain`` command line: a thin layer over library calls a user could make from Python.

Every user error (unknown task, missing file, malformed flag) prints one line ``retain: error: ...`` to stderr
and exits with code 2, having written nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from retain.errors import RetainError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("retain").addHandler(logging.NullHandler())  # its warnings reach the user as progress events
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@app.command()
def pretrain(
    out: Optional[Path] = typer.Option(None, help="directory to write the HF model to (default runs/base, runs/vlm)"),
    preset: str = typer.Option("tiny", help="model size preset (of the vision tower with --vision)"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps (default 2000; --vision: joint steps, 200)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="default 128 (--vision: 64)"),
    lr: Optional[float] = typer.Option(None, min=0.0, help="default 2e-3 (--vision: 1e-3)"),
    seed: int = typer.Option(0),
    eval_n: Optional[int] = typer.Option(None, min=1, help="prompts per task in the final evaluation"),
    vision: bool = typer.Option(False, "--vision", help="train the embedded VLM on the embedded base (--base)"),
    base: str = typer.Option("base", help="with --vision: the text model the VLM's language model starts from"),
    aux_steps: Optional[int] = typer.Option(None, min=0, help="with --vision: vision-tower steps (default 400)"),
    phase: str = typer.Option("scratch", help="scratch, or sort: continue --init's pretraining with the sort task "
                                             "added (the embedded base's second phase)"),
    init: Optional[str] = typer.Option(None, help="a model directory to continue pretraining (--phase sort)"),
) -> None:
    """Train the embedded base model from scratch on the prior-skill mixture (--phase sort: its second phase;
    --vision: the embedded VLM on it)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    given = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, eval_n=eval_n).items() if v is not None}
    if vision:
        from retain.vision.pretrain import VisionPretrainConfig
        from retain.vision.pretrain import pretrain_vision as run_pretrain

        extra = {"aux_steps": aux_steps} if aux_steps is not None else {}
        cfg = _validated(VisionPretrainConfig, base=base, vision=preset, seed=seed, **given, **extra)
        out = out or Path("runs/vlm")
        total = cfg.aux_steps + cfg.steps
    else:
        from retain.pretrain import PHASES, PretrainConfig
        from retain.pretrain import pretrain as run_pretrain

        if phase not in PHASES:
            raise RetainError(f"unknown --phase {phase!r} (phases: {', '.join(PHASES)})")
        if (phase == "scratch") != (init is None):
            raise RetainError("--phase sort continues a model: give --init DIR" if init is None
                              else "--init continues a model: give --phase sort")
        cfg = _validated(PretrainConfig, **{**PHASES[phase], "preset": preset, "seed": seed, "init": init, **given})
        out = out or Path("runs/base")
        total = cfg.steps
    console = Console(stderr=True)
    with Progress(TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        job = bar.add_task("pretrain", total=total, loss="-")

        def log(record: dict) -> None:
            done = record["step"] + (getattr(cfg, "aux_steps", 0) if record.get("phase") == "joint" else 0)
            bar.update(job, completed=done, loss=f"{record.get('loss', 0):.3f}")
            if not console.is_terminal and done % max(1, total // 20) == 0:  # logs, CI: plain lines
                console.print(f"pretrain step {done}/{total} loss {record.get('loss', 0):.4f}")

        result = run_pretrain(cfg, out, log=log)
    console.print(f"wrote {out} ({result['parameters']:,} parameters, {result['train_seconds']} s training, "
                  f"peak RSS {result['peak_rss_mb']} MB)")
    _print_scores(result["eval"])


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("base", help="HF model directory, hub name, or 'base' (the embedded model)"),
    tasks: str = typer.Option("prior,sequence", help="comma-separated task names or groups (prior, sequence)"),
    samples: int = typer.Option(0, min=0, help="K samples per prompt for pass@K (0: greedy only)"),
    n: int = typer.Option(200, min=1, help="prompts per task"),
    split: str = typer.Option("test", help="split to evaluate (test, ood, ...)"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print JSON: {task: {accuracy, pass_at_k, k, n}}"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code to run (off by default)"),
) -> None:
    """Evaluate a model: greedy accuracy and pass@K per task."""
    from retain import tasks as task_registry
    from retain.evaluate import evaluate
    from retain.models.loading import load_model

    names = task_registry.resolve(tasks)  # validate names before loading anything
    lm, tok = load_model(model, trust_remote_code=trust_remote_code)
    scores = evaluate(lm, tok, names, n=n, samples=samples, split=split, seed=seed)
    if as_json:
        print(json.dumps(scores))
    else:
        _print_scores(scores)


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment YAML"),
    out: Path = typer.Option(..., "--out", help="run directory (resumed if it holds an interrupted run)"),
    quiet: bool = typer.Option(False, help="no progress display"),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="trackers, comma-separated: tensorboard, "
                                            "mlflow, trackio, wandb (or none); replaces the config's report_to"),
) -> None:
    """Run a continual experiment: stages, evaluation after each, metrics and shift in OUT/results.json."""
    from retain.config import load_experiment
    from retain.distributed import is_main
    from retain.runner import run_experiment
    from retain.tracking import parse_report_to

    cfg = load_experiment(config)  # every config error surfaces here, before OUT exists
    if report_to is not None:
        cfg = cfg.model_copy(update={"report_to": parse_report_to(report_to)})
    main = is_main()  # under accelerate launch / torchrun only the main process shows progress and results
    with _stage_progress(quiet or not main) as progress:
        results = run_experiment(cfg, out, progress)
    if main:
        _print_results(results)


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="sweep YAML: an experiment plus grid: (and resources:)"),
    backend: str = typer.Option("local", help="ray (one Ray task per run) or local (processes on this machine)"),
    out: Path = typer.Option(..., "--out", help="sweep directory: one run directory per grid point, sweep.json"),
    address: Optional[str] = typer.Option(None, help="Ray cluster to connect to (default: start a local one)"),
    workers: Optional[int] = typer.Option(None, min=0, help="runs at once (local: default 1, 0 = in this process; "
                                          "ray: a local cluster of WORKERS × resources.cpus CPUs)"),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="trackers, comma-separated: tensorboard, "
                                            "mlflow, trackio, wandb (or none); replaces the config's report_to"),
) -> None:
    """Run a grid of experiments (methods, seeds, any field) on Ray or locally; retry failures once; skip finished runs."""
    from rich.console import Console
    from rich.markup import escape

    from retain.sweep import run_sweep

    console = Console(stderr=True)

    def update(event: str, data: dict) -> None:
        if event == "plan":
            console.print(f"sweep: {data['runs']} runs ({data['skipped']} already finished) into {data['out']}")
        elif event == "start":
            console.print(f"start {data['name']}" + (f" (attempt {data['attempt']})" if data["attempt"] > 1 else ""))
        elif event == "done":
            console.print(f"[green]done[/green] {data['name']} ({data['seconds']:.1f} s)")
        elif event == "failed":
            then = "retrying once" if data["retry"] else "failed twice, giving up"
            console.print(f"[red]failed[/red] {escape(data['name'])} (attempt {data['attempt']}, {then}): "
                          f"{escape(str(data['error']))}", highlight=False)

    from retain.tracking import parse_report_to

    summary = run_sweep(config, out, backend=backend, address=address, workers=workers, progress=update,
                        report_to=parse_report_to(report_to) if report_to is not None else None)
    runs = summary["runs"]
    counts = {s: sum(r["status"] == s for r in runs) for s in ("done", "skipped", "failed")}
    print(f"{counts['done']} done, {counts['skipped']} skipped (already finished), {counts['failed']} failed; "
          f"{out / 'sweep.json'}; compare with: retain compare {out}")
    if summary["failed"]:
        print(f"retain: {len(summary['failed'])} run(s) failed twice: {', '.join(summary['failed'])}", file=sys.stderr)
        sys.exit(1)  # not typer.Exit: main() runs the app with standalone_mode=False, which returns its code


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories, or directories of runs (a sweep's --out)"),
    csv_out: bool = typer.Option(False, "--csv", help="CSV instead of a markdown table"),
    parquet: Optional[Path] = typer.Option(None, help="also write every row to this parquet file (DuckDB-queryable)"),
) -> None:
    """Compare finished runs: one row per run with its metrics and shift."""
    from retain.comparison import compare_rows, to_csv, to_markdown, to_parquet

    rows = compare_rows(runs)
    print(to_csv(rows) if csv_out else to_markdown(rows))
    if parquet is not None:
        to_parquet(rows, parquet)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="demo directory (re-running resumes it)"),
    quick: bool = typer.Option(False, "--quick", help="a few minutes: one seed, two learning rates, SFT and GRPO"),
    full: bool = typer.Option(False, "--full", help="8 seeds, 5 learning rates, 17 methods, sort → GeneralPoints (days here)"),
    vision: bool = typer.Option(False, "--vision", help="the embedded VLM: SFT against GRPO on GeneralPoints-VL → "
                                "vcolor, the visual findings (= --preset vision)"),
    preset_name: Optional[str] = typer.Option(None, "--preset", help="a preset by name: quick, default, core (SFT "
                                              "against GRPO with 8 seeds at 320 steps, about an hour here), full, "
                                              "atomic (finding 13: atomic-fact SFT, then SFT or GRPO on kg two-hop), "
                                              "vision"),
    methods: Optional[str] = typer.Option(None, help="comma-separated methods (default: the preset's)"),
    workers: int = typer.Option(2, min=1, help="runs in parallel (one torch thread each)"),
    backend: str = typer.Option("local", help="where the runs execute: local (processes) or ray"),
    address: Optional[str] = typer.Option(None, help="a Ray cluster to connect to (HOST:PORT; backend ray)"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds replacing the preset's (e.g. 0,1)"),
    lrs: Optional[str] = typer.Option(None, help="comma-separated learning rates replacing the preset's grid"),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="trackers, comma-separated: tensorboard, "
                                            "mlflow, trackio, wandb (or none); for every run"),
) -> None:
    """The main job: the preset's methods × an lr grid × seeds as a sweep, then the report with its verdicts."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from retain.demo import run_demo
    from retain.tracking import parse_report_to

    if quick + full + vision + (preset_name is not None) > 1:
        raise RetainError("--quick, --full, --vision and --preset exclude each other")
    preset = preset_name or ("quick" if quick else "full" if full else "vision" if vision else "default")
    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console)
    state: dict = {}

    def update(event: str, data: dict) -> None:
        if event == "plan":
            state["job"] = bar.add_task(f"demo ({preset}): runs", total=data["runs"])
        elif event == "done":
            bar.update(state["job"], advance=data["count"])
        elif event == "run_done":
            bar.update(state["job"], advance=1, description=f"demo ({preset}): {data['name']} {data['seconds']:.0f}s")
        elif event == "failed":
            console.print(f"[red]run {data['name']} failed: {data['error']}[/red]")
            bar.update(state["job"], advance=1)
        elif event == "tokens":
            console.log("token analysis of the SFT targets under the base model")
        elif event == "report":
            console.log("writing the report")

    with bar:
        summary = run_demo(out, preset, methods.split(",") if methods else None, workers, progress=update,
                           backend=backend, address=address, seeds=_numbers(seeds, int, "--seeds"),
                           lrs=_numbers(lrs, float, "--lrs"),
                           report_to=parse_report_to(report_to) if report_to is not None else None)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"report: {out / 'report.html'}  ({summary['wall_seconds']:.0f} s, peak memory ~{summary['peak_rss_mb']:.0f} MB)")


def _numbers(text: Optional[str], kind: type, option: str) -> list | None:
    if not text:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RetainError(f"{option}: expected comma-separated numbers, got {text!r}") from None


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a demo directory or a directory of runs")) -> None:
    """Write RUN_DIR/report.html (self-contained) and report.md from the result files."""
    from retain.report import build_report

    if not run_dir.is_dir():
        raise RetainError(f"no such directory: {run_dir}")
    path = build_report(run_dir)
    print((run_dir / "report.md").read_text(encoding="utf-8"))
    print(f"report: {path}")


class _stage_progress:
    """A rich progress bar per stage (steps, loss, ETA) on stderr; silent when asked or not on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self.console = console
        self.bar = None if self.quiet else Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        )
        if self.bar:
            self.bar.start()
        self.job = None
        return self.update

    def update(self, event: str, data: dict) -> None:
        from rich.markup import escape

        if event == "warning":  # a fault the run recovered from (a damaged checkpoint redone): shown even when quiet
            self.console.print(f"retain: warning: {data['message']}", markup=False, highlight=False)
            return
        if self.bar is None:
            return
        if event == "stage_start":
            self.job = self.bar.add_task(escape(f"stage {data['stage']} {data['task']} ({data['method']})"),
                                         total=data["steps"], info="")
        elif event == "step" and self.job is not None and "step" in data:
            info = " ".join(f"{k} {data[k]:.3f}" for k in ("loss", "reward") if isinstance(data.get(k), float))
            self.bar.update(self.job, completed=data["step"], info=info)
        elif event == "eval":
            self.console.log(f"evaluating after stage {data['stage']}")

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()


def _print_results(results: dict) -> None:
    from rich.console import Console
    from rich.markup import escape  # names and task paths are the user's text, not rich markup ("[/x]" would raise)
    from rich.table import Table

    table = Table(title=escape(f"accuracy matrix — {results['config']['name']} (rows: after stage k; 0 = base)"))
    table.add_column("stage")
    for column in results["eval_tasks"]:
        table.add_column(escape(column), justify="right")
    for k, row in enumerate(results["matrix"]):
        table.add_row(str(k) if k == 0 else escape(f"{k} {results['tasks'][k - 1]}"), *[f"{v:.3f}" for v in row])
    console = Console()
    console.print(table)
    m = results["metrics"]
    fmt = lambda v: "-" if v is None else f"{v:+.4f}"  # noqa: E731
    console.print(
        "AA " + fmt(m["average_accuracy"]) + "  FM " + fmt(m["forgetting_measure"]) + "  BWT "
        + fmt(m["backward_transfer"]) + "  FWT " + fmt(m["forward_transfer"]) + "  gain " + fmt(m["target_gain"])
        + "  prior drop " + fmt(m["prior_drop"])
    )


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="print the table as JSON")) -> None:
    """List every method: its data source, token loss, regulariser, and the paper it comes from."""
    from retain.methods.catalog import method_table

    rows = method_table()
    if as_json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="methods: data source × token loss × regulariser")
    for col in ("name", "data", "loss", "regularizer", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(escape(r[c]) for c in ("name", "data", "loss", "regularizer", "source")))
    Console(width=200).print(table)


def _validated(model_cls, **values):
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or model_cls.__name__
        raise RetainError(f"invalid value for {field}: {first['msg']}") from None


def _print_scores(scores: dict, title: str = "evaluation") -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "split", "n", "greedy acc", "pass@k", "k"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for name, s in scores.items():
        table.add_row(escape(name), escape(s.get("split", "")), str(s["n"]), f"{s['accuracy']:.3f}",
                      f"{s['pass_at_k']:.3f}" if "pass_at_k" in s else "-", str(s.get("k", "-")))
    Console().print(table)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: runs the typer app, turning every user error into one line and exit code 2."""
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except RetainError as err:
        print(f"retain: error: {err}", file=sys.stderr)
        sys.exit(2)
    except click_errors.NoArgsIsHelpError as err:
        print(err.ctx.get_help() if err.ctx else "usage: retain COMMAND --help")
        sys.exit(0)
    except click_errors.UsageError as err:
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        print(f"retain: error: {err.format_message()}{where}", file=sys.stderr)
        sys.exit(2)
    except click_errors.ClickException as err:
        print(f"retain: error: {err.format_message()}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        if type(err).__name__ != "NonFiniteLoss":  # training diverged: the config's fault (the lr), said in one line
            raise
        print(f"retain: error: {err} (lower the learning rate?)", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk, an unwritable --out: one line; atomic writes left nothing half-written
        print(f"retain: error: {err}", file=sys.stderr)
        sys.exit(1)
    except typer.Abort:
        print("retain: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)


if __name__ == "__main__":
    main()
