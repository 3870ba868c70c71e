"""A Hugging Face model card (``README.md``) for each stage's model directory, so ``stages/k/model`` is ready for
``huggingface_hub.upload_folder``: YAML front matter (the hub's metadata block) and a body that says where the
weights came from — the starting model, every stage up to this one with its method's parts and data, its steps —,
this stage's evaluation row, the KL shift from the starting model, and the retain version that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from retain import tasks as task_registry
from retain.config import ExperimentConfig
from retain.methods.config import MethodConfig
from retain.version import __version__

EMBEDDED = "base"


def method_parts(method: MethodConfig) -> dict[str, Any]:
    """The method as its three axes (data source × token loss × regularisers) plus replay and adapter."""
    return {
        "data": method.data.model_dump(mode="json"),
        "loss": method.loss.model_dump(mode="json"),
        "regularizers": [r.model_dump(mode="json") for r in method.regularizers],
        "replay": None if method.replay is None else method.replay.model_dump(mode="json"),
        "adapter": None if method.adapter is None else method.adapter.model_dump(mode="json"),
        "lr": method.train.lr,
    }


def _hub_id(model: str) -> str | None:
    """``model`` when it names a hub repository (``org/name``), not the embedded model or a local directory."""
    if model == EMBEDDED or Path(model).exists() or model.count("/") != 1:
        return None
    return model


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(cfg: ExperimentConfig, stage: int, row: dict[str, dict[str, Any]], shift: dict[str, Any]) -> str:
    """The README.md of the model after ``stage`` (1-based) of ``cfg``, with ``row`` its evaluation and ``shift`` its
    measured shift (``runner.measure_shift``)."""
    methods = [cfg.stage_method(k) for k in range(stage)]
    tags = ["retain", "continual-learning", *dict.fromkeys(m.name for m in methods)]
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    hub = _hub_id(cfg.model)
    if hub:
        meta["base_model"] = hub
    starting = "retain's embedded base model" if cfg.model == EMBEDDED else f"`{cfg.model}`"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {cfg.name}: after stage {stage} of {len(cfg.stages)}", "",
        f"Continual post-training with retain {__version__}, seed {cfg.seed}, "
        f"starting from {starting}. Load it with `AutoModelForCausalLM.from_pretrained(<this directory>)`.", "",
        "## Stages", "",
        "| stage | task | method | data | loss | regularizers | steps | lr |", "|---|---|---|---|---|---|---|---|",
    ]
    for k, method in enumerate(methods):
        parts = method_parts(method)
        regs = ", ".join(r["kind"] for r in parts["regularizers"]) or "none"
        lines.append(f"| {k + 1} | {cfg.stages[k].task} | {method.name} | {parts['data']['kind']} | "
                     f"{parts['loss']['kind']} | {regs} | {method.train.steps} | {method.train.lr:g} |")
    task = task_registry.get(cfg.stages[stage - 1].task)
    lines += ["", f"Stage {stage}'s data: {task.description or task.name}.", "",
              f"## Evaluation after stage {stage}", "",
              "| column | accuracy | n | pass@k |", "|---|---|---|---|"]
    for column, cell in row.items():
        lines.append(f"| {column} | {_fmt(cell.get('accuracy'))} | {cell.get('n')} | {_fmt(cell.get('pass_at_k'))} |")
    lines += ["", "## Shift from the starting model", "",
              "| measure | value |", "|---|---|"]
    for name, path in (("forward KL (per sequence)", ("from_base", "forward", "per_sequence")),
                       ("reverse KL (per sequence)", ("from_base", "reverse", "per_sequence")),
                       ("forward KL from the previous stage", ("from_previous", "forward", "per_sequence")),
                       ("weight L2 distance", ("weight_l2",))):
        node: Any = shift
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        lines.append(f"| {name} | {_fmt(node)} |")
    lines += ["", "## Method of this stage", "", "```yaml",
              yaml.safe_dump(method_parts(methods[-1]), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
