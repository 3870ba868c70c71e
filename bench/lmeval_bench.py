"""Evaluation prompts per second: ``retain eval`` against lm-evaluation-harness's ``HFLM`` on one local task.

The task: the knowledge-graph composition task's test split (252 prompts such as "friend of mentor of ruby?",
one exact answer each; the embedded model gets a fair share of them right, so agreement is informative), written to
a jsonl file. retain scores it as a dataset task with the ``exact`` verifier — what ``retain eval --tasks
FILE.jsonl:exact`` runs (``retain.evaluate.evaluate``); lm-eval scores the same file through a local YAML task
definition: ``output_type: generate_until``, greedy, ``until: ["\\n"]``, at most 24 new tokens, ``exact_match`` with
case ignored and surrounding whitespace stripped (retain's ``exact``: the first line, stripped, casefolded), the
tokenizer's chat template applied (``apply_chat_template=True``), so both send the same prompt tokens. Both get the
model object already loaded and the same batch size (256, retain's default); each is timed from the call that
starts the evaluation (lm-eval's task loading and request building included, as retain's file loading is) to the
scores, in wall-clock seconds (the rate) and in this process's CPU seconds (reported beside it: on a machine other
jobs keep busy the CPU time still compares the work each side did). The accuracies and every item's verdict are
compared.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

BATCH = 256
MAX_NEW = 24

TASK_YAML = """\
task: retain_kg_exact
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_new}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        return False
    return True


def write_task(folder: Path) -> Path:
    from retain import tasks

    data = folder / "kg_test.jsonl"
    with data.open("w") as f:
        for e in tasks.get("kg").examples("test", None, seed=0):
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    (folder / "retain_kg_exact.yaml").write_text(TASK_YAML.format(data=data, max_new=MAX_NEW))
    return data


def retain_eval(repeats: int) -> dict:
    from retain import tasks
    from retain.evaluate import evaluate
    from retain.models.loading import load_model

    model, tok = load_model("base")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_task(Path(tmp))
        evaluate(model, tok, [f"{data}:exact"], n=16, batch_size=BATCH)  # warm-up (both sides get one)
        best = None
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            scores = evaluate(model, tok, [f"{data}:exact"], n=None, batch_size=BATCH)[f"{data}:exact"]
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            if best is None or seconds < best["seconds"]:
                order = [e.prompt for e in tasks.get(f"{data}:exact").examples("test", None, seed=0)]
                best = {"seconds": seconds, "cpu_seconds": cpu, "prompts": scores["n"], "accuracy": scores["accuracy"],
                        "verdicts": dict(zip(order, scores["correct"]))}
    best["prompts_per_s"] = best["prompts"] / best["seconds"]
    return best


def disagreements(ours: dict, ref: dict) -> int:
    """Prompts whose verdict differs between the two evaluations (a prompt one side lacks counts too)."""
    prompts = set(ours["verdicts"]) | set(ref["verdicts"])
    return sum(ours["verdicts"].get(p) != ref["verdicts"].get(p) for p in prompts)


def lm_eval_eval(repeats: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from retain.models.loading import load_model

    model, tok = load_model("base")
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp))
        manager = TaskManager(include_path=tmp)
        best = None
        for attempt in range(repeats + 1):  # the first is the warm-up
            start, cpu = time.perf_counter(), time.process_time()
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH, max_length=256)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["retain_kg_exact"], task_manager=manager, apply_chat_template=True,
                log_samples=True, limit=16 if attempt == 0 else None, random_seed=0, numpy_random_seed=0,
                torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0,
            )
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            if attempt == 0:
                continue
            samples = out["samples"]["retain_kg_exact"]
            if best is None or seconds < best["seconds"]:
                best = {"seconds": seconds, "cpu_seconds": cpu, "prompts": len(samples),
                        "accuracy": float(out["results"]["retain_kg_exact"]["exact_match,none"]),
                        "verdicts": {s["doc"]["prompt"]: "1" if s["exact_match"] else "0" for s in samples}}
    best["prompts_per_s"] = best["prompts"] / best["seconds"]
    return best
