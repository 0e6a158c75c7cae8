"""Classify texts with a run's prompt, or score the prompt on a labelled file.

    PYTHONPATH=src python -m fedbpt.predict --prompt RUN_DIR/best_prompt.npz "a gorgeous , witty film" "dull"
    cat texts.txt | PYTHONPATH=src python -m fedbpt.predict --prompt RUN_DIR/best_prompt.npz
    PYTHONPATH=src python -m fedbpt.predict --prompt RUN_DIR/best_prompt.npz --eval ../shared/data/sst2/dev.tsv

Model and task come from the prompt file (``--model_name`` and ``--task_name`` override them); the prompt
enters where the search put it. Texts are one per line (a two-text task's pair tab-separated); each gets
its label word and the class probabilities. ``--eval FILE`` (a .tsv, .csv or .jsonl file with the task's
columns, as ``--data_dir`` takes) prints accuracy (F1 for MRPC) and writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .blackbox import DTYPES, BlackBox
from .config import AUTO, int_or_auto
from .data import Split, load_file
from .prompt_file import PromptFile, PromptFileError, one_line, open_blackbox, read_prompt
from .tasks import Task

PROG = "fedbpt.predict"
CHUNK = 512  # texts read, encoded and scored together (each chunk in as few forwards as the token budget allows)


@dataclass
class Predictor:
    """A prompt in the model it was searched in; ``z`` is the prompt (zeros: none)."""

    blackbox: BlackBox
    z: np.ndarray

    @property
    def task(self) -> Task:
        return self.blackbox.task

    def scores(self, texts: list[tuple[str, ...]]) -> tuple[torch.Tensor, np.ndarray]:
        """Class scores (n, C) of BlackBox's scorer, on the model's device in its row order, and each row's
        input index (numpy, on the host)."""
        batch = self.blackbox.encode(Split(texts=texts, labels=np.zeros(len(texts), dtype=np.int64)))
        return self.blackbox.class_scores(self.z[None], batch)[0], batch.index

    def probabilities(self, texts: list[tuple[str, ...]]) -> np.ndarray:
        """(n, C) class probabilities, in input order."""
        if not texts:
            return np.zeros((0, self.task.num_labels))
        scores, index = self.scores(texts)
        probs = np.empty((len(texts), scores.shape[1]))
        probs[index] = torch.softmax(scores.double(), dim=-1).cpu().numpy()
        return probs

    def evaluate(self, split: Split) -> dict:
        """Loss, metric and predictions on a labelled split, computed as the sites compute the test figures."""
        scores, index = self.scores(split.texts)
        truth = torch.as_tensor(split.labels[index]).to(scores.device)
        loss = float(self.blackbox.losses(scores[None], truth)[0])
        value = float(self.blackbox.metric(scores[None], truth)[0])
        predictions = np.empty(len(split), dtype=np.int64)
        predictions[index] = scores.argmax(-1).cpu().numpy()
        correct = int((predictions == split.labels).sum())
        c = self.task.num_labels
        confusion = np.zeros((c, c), dtype=np.int64)  # rows: true label, columns: predicted
        np.add.at(confusion, (split.labels, predictions), 1)
        return {"metric": "f1" if self.task.metric == "f1" else "accuracy", "value": value, "loss": loss,
                "n": len(split), "correct": correct, "accuracy": correct / max(1, len(split)),
                "confusion": confusion.tolist(), "predictions": predictions.tolist()}  # fmt: skip


def parse_line(line: str, task: Task, where: str) -> tuple[str, ...]:
    """One example from a line of text: the task's text fields, tab-separated."""
    fields = tuple(line.rstrip("\r\n").split("\t"))
    if len(fields) != len(task.text_fields):
        hint = "; to score a labelled file use --eval" if len(fields) > len(task.text_fields) else ""
        raise ValueError(
            f"{where}: {len(fields)} tab-separated field(s), task {task.name} takes {len(task.text_fields)} "
            f"({', '.join(task.text_fields)}){hint}"
        )
    return fields


def read_examples(lines: Iterable[str], task: Task, source: str) -> Iterator[tuple[str, ...]]:
    """Examples from lines of text (blank lines skipped); errors name the source and the line."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield parse_line(line, task, f"{source} line {number}")


def chunks(examples: Iterable[tuple[str, ...]], size: int = CHUNK) -> Iterator[list[tuple[str, ...]]]:
    chunk = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def print_predictions(predictor: Predictor, examples: Iterable[tuple[str, ...]], out=None) -> int:
    """One line per example: label word, class probabilities, the text; returns the number of examples."""
    out = out or sys.stdout
    words = predictor.task.verbalizer
    header = "\t".join(["label", *(f"p({w})" for w in words), "text"])
    n = 0
    for chunk in chunks(examples):
        probabilities = predictor.probabilities(chunk)
        if not n:  # after the first chunk is read: a file with the wrong columns prints nothing but the error
            print(header, file=out)
        for example, p in zip(chunk, probabilities):
            print("\t".join([words[int(p.argmax())], *(f"{v:.4f}" for v in p), *example]), file=out)
        out.flush()
        n += len(chunk)
    if not n:
        print(header, file=out)
    return n


def evaluate_file(predictor: Predictor, prompt: PromptFile, path: Path, report: Path | None,
                  no_prompt: bool = False) -> dict:  # fmt: skip
    """Score the prompt (``no_prompt``: z = 0) on a labelled file, print the figure and write the JSON report."""
    split = load_file(predictor.task, path)
    if not len(split):
        raise ValueError(f"--eval {path}: no labelled examples in it")
    result = predictor.evaluate(split)
    d = prompt.description
    out = {
        "prompt": str(prompt.path),
        "round": prompt.round,
        "no_prompt": no_prompt,
        "fingerprint": d["fingerprint"],
        "model_name": predictor.blackbox.cfg.model_name,
        "task_name": predictor.task.name,
        "data": str(path),
        **result,
    }
    report = report or Path(f"eval_{path.stem}_{prompt.path.stem}{'_no_prompt' if out['no_prompt'] else ''}.json")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(out, indent=1) + "\n")
    what = "z = 0 (--no_prompt)" if no_prompt else f"the prompt of round {prompt.round} in {prompt.path}"
    if not no_prompt and not np.any(predictor.z):
        what += " (its z is 0: the run kept the start of its search)"
    print(f"{result['metric']} {result['value']:.4f} ({result['correct']} of {result['n']} correct, loss "
          f"{result['loss']:.4f}) on {path} with {what}")  # fmt: skip
    print(f"wrote {report}")
    return out


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=formatter)
    parser.add_argument("texts", nargs="*", help="texts to classify (a pair: tab-separated); none: standard input")
    parser.add_argument("--prompt", required=True, type=Path, help="a run's best_prompt.npz or final_prompt.npz")
    parser.add_argument("--input", help="a file of texts, one per line ('-': standard input)")
    parser.add_argument("--eval", type=Path, help="a labelled .tsv/.csv/.jsonl file: print accuracy (F1 for MRPC)")
    parser.add_argument("--report", type=Path, help="where --eval writes its JSON (default: eval_<data>_<prompt>.json)")
    parser.add_argument("--no_prompt", action="store_true", help="score with z = 0 instead of the prompt")
    parser.add_argument("--model_name", help="the model (default: the prompt file's model_name)")
    parser.add_argument("--task_name", help="the task (default: the prompt file's task_name)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--dtype", default=AUTO, choices=[AUTO, *DTYPES], help="as the site flag (auto: the sites' choice)"
    )
    parser.add_argument("--batch_size", type=int_or_auto, default=AUTO, help="most sequences in one forward")
    parser.add_argument("--token_budget", type=int_or_auto, default=AUTO, help="most tokens in one forward")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    try:
        modes = [m for m, given in (("texts", args.texts), ("--input", args.input), ("--eval", args.eval)) if given]
        if len(modes) > 1:
            raise ValueError(f"give one of texts, --input or --eval, not {' and '.join(modes)}")
        if args.input and args.input != "-" and not Path(args.input).is_file():
            raise FileNotFoundError(f"--input {args.input}: no such file")
        if args.eval and not args.eval.is_file():
            raise FileNotFoundError(f"--eval {args.eval}: no such file")
        prompt = read_prompt(args.prompt)
        bb = open_blackbox(prompt, args.model_name, args.task_name, args.device, args.dtype, args.batch_size,
                           args.token_budget)  # fmt: skip
        predictor = Predictor(bb, np.zeros_like(prompt.z) if args.no_prompt else prompt.z)
        if args.eval:
            evaluate_file(predictor, prompt, args.eval, args.report, args.no_prompt)
        elif args.texts:
            examples = [parse_line(t, bb.task, f"text {i}") for i, t in enumerate(args.texts, start=1)]
            print_predictions(predictor, examples)
        elif args.input and args.input != "-":
            with open(args.input, encoding="utf-8") as f:
                print_predictions(predictor, read_examples(f, bb.task, args.input))
        else:
            if sys.stdin.isatty():
                print("reading texts from standard input, one per line (end with Ctrl-D)", file=sys.stderr)
            print_predictions(predictor, read_examples(sys.stdin, bb.task, "standard input"))
    except (PromptFileError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
