"""Using what a run learnt: fedbpt.predict, fedbpt.export with the snippet of docs/using-the-prompt.md, fedbpt.plot."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, build_tiny_roberta
from fedbpt import export, plot, predict
from fedbpt.blackbox import BlackBox, BlackBoxConfig
from fedbpt.config import parse_args
from fedbpt.data import load_file
from fedbpt.search import init_state
from fedbpt.server import Guard, RunRecorder
from fedbpt.standalone import ServerConfig, run_federation
from fedbpt.tasks import get_task


@pytest.fixture(scope="module")
def lively_roberta(tmp_path_factory) -> Path:
    """A tiny RoBERTa whose answers move with the prompt (a default-initialised one barely reads it)."""
    return build_tiny_roberta(tmp_path_factory.mktemp("lively-roberta"), initializer_range=1.0)


@pytest.fixture(scope="module")
def tiny_run(lively_roberta, sst2_dir, tmp_path_factory) -> Path:
    """A 3-round run of the standalone loop, site-1 scoring the 872 GLUE validation examples every round."""
    cfg = parse_args(["--task_name", "sst2", "--model_name", str(lively_roberta), "--data_dir", str(sst2_dir),
                      "--n_prompt_tokens", "5", "--intrinsic_dim", "16", "--k_shot", "8", "--device", "cpu",
                      "--seed", "3", "--local_iter", "2", "--local_popsize", "4", "--num_users", "2",
                      "--eval_clients", "site-1"])  # fmt: skip
    run_dir = tmp_path_factory.mktemp("tiny-run")
    # the paper's selection, so that the best prompt is a searched one: on 16 dev examples the bootstrap keeps z = 0
    run_federation(cfg, ServerConfig(num_rounds=3, guard=Guard(selection="lowest")), str(run_dir))
    return run_dir


def write_prompt(run_dir: Path, bb: BlackBox, z: np.ndarray) -> Path:
    """A best_prompt.npz as a run writes it (RunRecorder, from a site's description), for the prompt z."""
    state = replace(init_state(z.size, 1.0, bb.cfg.seed), mean=z, best_round=0, best_mean=z)
    info = {**bb.description(), "sigma": bb.cfg.sigma, "alpha": bb.cfg.alpha, "k_shot": 8, "num_labels": 2}
    RunRecorder(str(run_dir)).record({"round": 0, "dev_loss": 1.0, "dev_acc": 0.5, "test_acc": None}, state, info)
    return run_dir / "best_prompt.npz"


@pytest.fixture(scope="module")
def minilm_prompt(minilm_dir, tmp_path_factory) -> Path:
    """A prompt for the real all-MiniLM-L6-v2, as far from z = 0 as a search gets in a few rounds."""
    bb = BlackBox(BlackBoxConfig(model_name=str(minilm_dir), task=get_task("sst2"), n_prompt_tokens=10,
                                 intrinsic_dim=200, seed=5))  # fmt: skip
    return write_prompt(tmp_path_factory.mktemp("minilm-run"), bb, np.random.default_rng(0).normal(size=200) * 2)


@pytest.fixture(scope="module")
def causal_prompt(tiny_causal, tmp_path_factory) -> Path:
    """A prompt for the tiny Llama, with --prompt_scale relative: predict and export rebuild its scale."""
    bb = BlackBox(BlackBoxConfig(model_name=str(tiny_causal), task=get_task("sst2"), n_prompt_tokens=4,
                                 intrinsic_dim=16, seed=2, prompt_scale="relative", rho=2.0))  # fmt: skip
    return write_prompt(tmp_path_factory.mktemp("causal-run"), bb, np.random.default_rng(1).normal(size=16))


def run_main(module, argv: list[str], capsys) -> tuple[int, str, str]:
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(label words, probabilities, texts) from predict's output."""
    header, *lines = out.rstrip("\n").split("\n")
    columns = header.split("\t")
    assert columns[0] == "label" and columns[-1] == "text"
    rows = [line.split("\t") for line in lines]
    c = len(columns) - 2
    return [r[0] for r in rows], np.array([[float(v) for v in r[1 : 1 + c]] for r in rows]), [r[-1] for r in rows]


# ----------------------------------------------------------------------------------------------
# fedbpt.predict


def test_eval_reproduces_the_runs_recorded_test_figures_exactly(tiny_run, sst2_dir, tmp_path, capsys):
    summary = json.loads((tiny_run / "summary.json").read_text())
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    report = tmp_path / "best.json"
    code, out, _ = run_main(predict, ["--prompt", tiny_run / "best_prompt.npz", "--eval", sst2_dir / "dev.tsv",
                                      "--report", report], capsys)  # fmt: skip
    assert code == 0
    best = json.loads(report.read_text())
    assert best["n"] == 872 and best["metric"] == "accuracy" and best["round"] == summary["best_round"]
    assert best["value"] == summary["best_test_acc"]  # to the last bit
    assert best["loss"] == rows[summary["best_round"]]["test_loss"]
    assert best["correct"] == round(872 * summary["best_test_acc"]) and f"{best['value']:.4f}" in out
    assert sum(map(sum, best["confusion"])) == 872 and len(best["predictions"]) == 872

    # z = 0 is what round 0 broadcast: --no_prompt reproduces round 0's figures, which the prompt changed
    code, _, _ = run_main(predict, ["--prompt", tiny_run / "best_prompt.npz", "--eval", sst2_dir / "dev.tsv",
                                    "--report", tmp_path / "zero.json", "--no_prompt"], capsys)  # fmt: skip
    zero = json.loads((tmp_path / "zero.json").read_text())
    assert code == 0 and zero["no_prompt"] is True
    assert (zero["value"], zero["loss"]) == (rows[0]["test_acc"], rows[0]["test_loss"])
    assert abs(zero["loss"] - best["loss"]) > 1e-3 and zero["predictions"] != best["predictions"]


def test_texts_from_arguments_input_file_and_stdin_give_the_same_table(tiny_run, sst2_dir, tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    texts = [t for (t,) in load_file(get_task("sst2"), sst2_dir / "dev.tsv").texts[:40]]  # lengths differ
    prompt = tiny_run / "best_prompt.npz"
    code, from_args, _ = run_main(predict, ["--prompt", prompt, *texts], capsys)
    assert code == 0
    words, probs, echoed = table(from_args)
    assert echoed == texts  # in input order, although the scorer sorts by length
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=2e-4)
    assert words == [("bad", "great")[i] for i in probs.argmax(1)] and len(set(words)) == 2
    bb_probs = predict.Predictor(*_predictor(prompt)).probabilities([(t,) for t in texts])
    np.testing.assert_allclose(probs, bb_probs, atol=5e-5)  # printed to 4 decimals

    (tmp_path / "texts.txt").write_text("\n".join(texts[:20]) + "\n\n" + "\n".join(texts[20:]) + "\n")
    assert run_main(predict, ["--prompt", prompt, "--input", tmp_path / "texts.txt"], capsys)[1] == from_args
    monkeypatch.setattr(sys, "stdin", io.StringIO((tmp_path / "texts.txt").read_text()))
    assert run_main(predict, ["--prompt", prompt], capsys)[1] == from_args


def _predictor(prompt: Path) -> tuple[BlackBox, np.ndarray]:
    from fedbpt.prompt_file import open_blackbox, read_prompt

    file = read_prompt(prompt)
    return open_blackbox(file, device="cpu"), file.z


def test_two_text_tasks_take_tab_separated_pairs(tiny_run, capsys):
    prompt = tiny_run / "best_prompt.npz"
    code, out, _ = run_main(predict, ["--prompt", prompt, "--task_name", "mrpc", "He left.\tHe went away.",
                                      "It rains.\tThe sun shines."], capsys)  # fmt: skip
    assert code == 0 and out.split("\n")[0] == "label\tp(No)\tp(Yes)\ttext"
    words, probs, _ = table(out)
    assert probs.shape == (2, 2) and set(words) <= {"No", "Yes"}
    code, _, err = run_main(predict, ["--prompt", prompt, "--task_name", "mrpc", "only one sentence"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "fedbpt.predict: error: text 1: 1 tab-separated field(s), task mrpc takes 2 (sentence1, sentence2)"
    )


def damaged(tmp_path: Path, prompt: Path, **changes) -> Path:
    with np.load(prompt) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update({k: np.asarray(v) for k, v in changes.items()})
    out = tmp_path / f"changed_{'_'.join(changes)}.npz"
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing prompt", r"--prompt .*/nope.npz: no such file \(a run writes best_prompt.npz"),
        ("state file as prompt", r"--prompt .*fedbpt_state.npz is not a FedBPT prompt file: it lacks z, soft_prompt, "),
        ("model not here", r"the prompt file's model_name '/nowhere/model' is not on this machine: give the model's "
                           r"folder with --model_name"),
        ("other hidden size", r"was made for .*lively-roberta.* \(mlm\) with hidden size 32; --model_name .* has "
                              r"hidden size 384: give the model the prompt was trained with"),
        ("other model, same size", r"whose word embeddings give projection scale 0\.2\d+; --model_name .* gives "
                                   r"0\.00\d+: it is another model; give the model the prompt was trained with"),
        ("damaged soft prompt", r"its soft_prompt is not A z for its own z and projection: the file is damaged"),
        ("wrong columns in --eval", r"bad.tsv has no column 'sentence' needed by task sst2; columns found: text, "
                                    r"label"),
        ("labelled file as --input", r"bad.tsv line 1: 2 tab-separated field\(s\), task sst2 takes 1 \(sentence\); "
                                     r"to score a labelled file use --eval"),
        ("missing --eval file", r"--eval .*/absent.tsv: no such file"),
        ("unknown task", r"unknown --task_name 'sst3'; choose one of: sst2, "),
    ],
)  # fmt: skip
def test_bad_input_gives_one_line_naming_what_to_fix(case, message, tiny_run, tiny_roberta, minilm_dir, tmp_path,
                                                     capsys):  # fmt: skip
    prompt = tiny_run / "best_prompt.npz"
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\ngreat fun\t1\n")
    argv = {
        "missing prompt": ["--prompt", tmp_path / "nope.npz", "x"],
        "state file as prompt": ["--prompt", tiny_run / "fedbpt_state.npz", "x"],
        "model not here": ["--prompt", damaged(tmp_path, prompt, model_name="/nowhere/model"), "x"],
        "other hidden size": ["--prompt", prompt, "--model_name", minilm_dir, "x"],
        "other model, same size": ["--prompt", prompt, "--model_name", tiny_roberta, "x"],
        "damaged soft prompt": ["--prompt", damaged(tmp_path, prompt, soft_prompt=np.ones((5, 32))), "x"],
        "wrong columns in --eval": ["--prompt", prompt, "--eval", bad],
        "labelled file as --input": ["--prompt", prompt, "--input", bad],
        "missing --eval file": ["--prompt", prompt, "--eval", tmp_path / "absent.tsv"],
        "unknown task": ["--prompt", prompt, "--task_name", "sst3", "x"],
    }[case]
    code, out, err = run_main(predict, argv, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and not out.strip()
    assert last.startswith("fedbpt.predict: error: ") and re.search(message, last), last


def test_predict_runs_as_the_readme_shows(tiny_run):
    """`PYTHONPATH=src python -m fedbpt.predict ...` from the repository root, texts on standard input."""
    proc = subprocess.run([sys.executable, "-m", "fedbpt.predict", "--prompt", str(tiny_run / "best_prompt.npz")],
                          input="a gorgeous , witty film .\ndull\n", capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": "src"}, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    words, probs, texts = table(proc.stdout)
    assert texts == ["a gorgeous , witty film .", "dull"] and probs.shape == (2, 2)


# ----------------------------------------------------------------------------------------------
# fedbpt.export and the snippet of docs/using-the-prompt.md


def readme_python(name: str, page: str = "docs/using-the-prompt.md") -> str:
    """The Python block that follows ``<!-- name -->`` in a page of the documentation."""
    match = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```", (REPO / page).read_text(), re.S)
    assert match, f"{page} has no python block marked <!-- {name} -->"
    return match.group(1)


@pytest.mark.parametrize("which", ["minilm_prompt", "tiny_run", "causal_prompt"])
def test_readme_snippet_predicts_what_fedbpt_predict_does(which, request, sst2_dir, tmp_path, monkeypatch, capsys):
    """The exported prompt in plain transformers, through the page's own code, on 100 validation sentences."""
    fixture = request.getfixturevalue(which)
    prompt = fixture / "best_prompt.npz" if fixture.is_dir() else fixture
    texts = [t for (t,) in load_file(get_task("sst2"), sst2_dir / "dev.tsv").texts[:100]]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    _, out, _ = run_main(predict, ["--prompt", prompt, "--input", tmp_path / "texts.txt"], capsys)
    words, probs, _ = table(out)
    _, out, _ = run_main(predict, ["--prompt", prompt, "--input", tmp_path / "texts.txt", "--no_prompt"], capsys)
    _, plain, _ = table(out)

    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(export, ["--prompt", prompt, "--out", "prompt.safetensors"], capsys)
    assert code == 0 and "wrote prompt.safetensors: soft_prompt (" in out
    namespace: dict = {}
    exec(compile(readme_python("export-snippet"), "docs/using-the-prompt.md (export-snippet)", "exec"), namespace)
    snippet = namespace["predict"](texts).numpy()
    assert snippet.shape == (100, 2)
    assert [("bad", "great")[i] for i in snippet.argmax(1)] == words  # the same answer for all 100
    np.testing.assert_allclose(snippet, probs, atol=1e-4)  # predict prints 4 decimals
    if which != "causal_prompt":  # the prompt matters here: a snippet that put it elsewhere would not agree
        assert np.abs(probs - plain).max() > 100 * 1e-4  # 100 times the tolerance of the comparison above


def test_export_holds_the_rows_fedbpt_adds_and_where(minilm_prompt, tmp_path, capsys):
    from safetensors import safe_open

    from fedbpt.prompt_file import read_prompt

    out = tmp_path / "p.safetensors"
    assert run_main(export, ["--prompt", minilm_prompt, "--out", out], capsys)[0] == 0
    with safe_open(str(out), framework="np") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    file = read_prompt(minilm_prompt)
    assert meta["model_type"] == "encoder" and meta["prompt_at"] == "word_embeddings" and meta["cat_or_add"] == "add"
    np.testing.assert_allclose(t["soft_prompt"], file.soft_prompt, rtol=1e-5, atol=1e-7)
    assert t["placeholder_ids"].tolist() == list(range(1000, 1010)) and t["label_embeddings"].shape == (2, 384)
    start = int(meta["prompt_start"])
    ids = t["template_ids"].tolist()
    assert ids[start : start + 10] == list(range(1000, 1010)) and ids.count(-1) == 1  # [CLS] prompt text [SEP]
    assert (start, ids[0], ids[-1]) == (1, 101, 102) and json.loads(meta["text_prefixes"]) == [" "]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "{tmp}/none.npz", "--out", "{tmp}/p.safetensors"], r"--prompt .*none.npz: no such file"),
        (["--prompt", "{prompt}", "--out", "{tmp}/p.pt"], r"--out .*p.pt: give a file name ending in .safetensors"),
        (["--prompt", "{prompt}", "--out", "{tmp}/p.safetensors", "--model_name", "{minilm}"],
         r"hidden size 32; --model_name .* has hidden size 384"),
    ],
)  # fmt: skip
def test_export_bad_input_gives_one_line(argv, message, tiny_run, minilm_dir, tmp_path, capsys):
    values = {"tmp": tmp_path, "prompt": tiny_run / "best_prompt.npz", "minilm": minilm_dir}
    code, _, err = run_main(export, [a.format(**values) for a in argv], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("fedbpt.export: error: ") and re.search(message, last), last
    assert not (tmp_path / "p.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# fedbpt.plot


def test_plot_marks_the_round_selected_on_dev_and_draws_sigma(tiny_run, tmp_path, capsys):
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((tiny_run / "summary.json").read_text())["best_round"]
    assert best == min(rows, key=lambda r: r["dev_loss"])["round"]
    code, out, _ = run_main(plot, [tiny_run, "--out", tmp_path / "fig.png"], capsys)
    assert code == 0 and f"selected round {best}" in out
    png = (tmp_path / "fig.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "fig.json").read_text()) == rows

    fig = plot.figure(rows, best)
    acc, sig = fig.axes
    star = next(line for line in acc.get_lines() if line.get_marker() == "*")
    assert list(star.get_xdata()) == [best] and list(star.get_ydata()) == [rows[best]["test_acc"]]
    curves = {line.get_label(): list(line.get_ydata()) for line in acc.get_lines()}
    assert curves["test accuracy (evaluator sites)"] == [r["test_acc"] for r in rows]
    assert list(sig.get_lines()[0].get_ydata()) == [r["sigma"] for r in rows]
    # without summary.json the selected round is still the one with the lowest dev loss
    assert plot.selected_round(tmp_path, rows) == best


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing dir", r"RUN_DIR .*/gone: no such directory"),
        ("no metrics", r"metrics.jsonl: no such file; give the run directory that holds metrics.jsonl"),
        ("foreign line", r"metrics.jsonl line 2: not a FedBPT metrics row \(it lacks dev_loss, sigma\)"),
        ("not png", r"--out .*fig.pdf: give a file name ending in .png"),
    ],
)
def test_plot_bad_input_gives_one_line(setup, message, tmp_path, capsys):
    run_dir = tmp_path / ("gone" if setup == "missing dir" else "run")
    if setup != "missing dir":
        run_dir.mkdir()
    good = {"round": 0, "dev_loss": 0.5, "dev_acc": 0.5, "sigma": 1.0}
    if setup in ("foreign line", "not png"):
        second = {"round": 1, "dev_acc": 0.5} if setup == "foreign line" else {**good, "round": 1}
        (run_dir / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(second) + "\n")
    out = tmp_path / ("fig.pdf" if setup == "not png" else "fig.png")
    code, _, err = run_main(plot, [run_dir, "--out", out], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("fedbpt.plot: error: ") and re.search(message, last), last
