"""`flowvae evaluate`: a trained run scored again with other eval.* settings, without training."""

from __future__ import annotations

import pandas as pd
import pytest

from flowvae import stopping
from flowvae.commands.evaluate import main
from tests.conftest import TINY, run_flowvae


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny finished runs (seeds 0 and 1) and their results table."""
    root = tmp_path_factory.mktemp("evaluate")
    for seed in (0, 1):
        out = run_flowvae(["train", *TINY, f"seed={seed}", f"hydra.run.dir=run{seed}", "results_csv=results.csv"],
                          cwd=root)
        assert out.returncode == 0, out.stdout + out.stderr
    return root


@pytest.fixture
def evaluate(capsys, monkeypatch, trained):
    monkeypatch.chdir(trained)

    def call(*args):
        try:
            code = main(list(args))
        finally:
            stopping.reset()
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def _metrics(row):
    return row[[c for c in row.index if c.startswith(("kl_", "w1", "js_", "gen_", "input_", "noise", "fpd", "kpd"))]]


def test_the_runs_own_eval_settings_give_the_training_rows_metrics_exactly(trained, evaluate):
    code, out, err = evaluate("run0", "results_csv=again.csv")
    assert code == 0, err
    training = pd.read_csv(trained / "results.csv").iloc[0]
    again = pd.read_csv(trained / "again.csv").iloc[0]
    assert list(again.index) == list(training.index)  # one row, assembled in one place: the same columns, in order
    assert (_metrics(again) == _metrics(training)).all()
    assert again["config_hash"] == training["config_hash"] and again["train_hash"] == training["train_hash"]
    assert again["epochs_run"] == 0 and again["resumed_from"] == 2
    assert again["epochs_trained"] == training["epochs_trained"] == 2
    assert again["best_epoch"] == training["best_epoch"] == 2  # the weights scored: the last epoch's here


def test_other_eval_settings_give_a_row_that_differs_only_there(trained, evaluate):
    code, out, err = evaluate("run0", "run1", "eval.source=posterior", "eval.bins=30", "results_csv=evals.csv")
    assert code == 0, err
    assert out.count("ok: kl_sum=") == 2
    rows = pd.read_csv(trained / "evals.csv")
    training = pd.read_csv(trained / "results.csv")
    assert list(rows["seed"]) == [0, 1]
    first, trained_first = rows.iloc[0], training[training["seed"] == 0].iloc[0]
    settings = [c for c in rows.columns if "." in c]
    differ = [c for c in settings if str(first[c]) != str(trained_first[c])]
    assert differ == ["eval.source", "eval.bins"]
    assert first["train_hash"] == trained_first["train_hash"] and first["config_hash"] != trained_first["config_hash"]
    assert first["kl_sum"] != trained_first["kl_sum"]
    assert len(pd.read_csv(trained / "run0" / "evaluations.csv")) >= 1
    code, out, _ = evaluate("run0", "eval.source=posterior", "eval.bins=30", "results_csv=evals.csv",
                            "skip_existing=true")
    assert code == 0 and "skipped" in out and len(pd.read_csv(trained / "evals.csv")) == 2


def test_more_posterior_events_than_held_out_ones_are_said_to_reuse_them(trained, evaluate, caplog):
    code, _, err = evaluate("run0", "eval.source=posterior", "eval.n_samples=500", "results_csv=reused.csv")
    assert code == 0, err
    # TINY holds out 200 events: 500 posterior events encode each 2.5 times
    assert ("posterior generation: 500 events from 200 held-out events, each encoded about 2.5 times (event i from "
            "held-out event i mod 200): they are draws from 200 posteriors, not 500 independent events") in caplog.text


def test_generating_and_scoring_say_what_they_do_on_stderr(trained, evaluate):
    """The run's train.progress (log, for TINY): a line when each phase starts, and how long the whole took."""
    code, out, err = evaluate("run0", "eval.n_samples=300", "results_csv=progress.csv")
    assert code == 0, err
    said = [line.split("] ", 1)[1] for line in err.splitlines()]
    assert said[0] == "generating 300 events (prior, sample)"
    assert said[1].startswith("generating 300 events (prior, sample): done in ")
    assert said[2] == "scoring 300 generated against 200 reference events (protocol scaled)"
    assert "  per-feature KL, W1, JS and moments" in said and "    KPD: 10 batches of 100" in said
    assert said[-1].startswith("scoring 300 generated against 200 reference events (protocol scaled): done in ")
    assert "ok: kl_sum=" in out and "[" not in out


@pytest.mark.parametrize("args, message", [
    (["run0", "train.lr=0.1"], "train.lr=0.1 is not allowed: only eval.*, results_csv, skip_existing and logger"),
    (["run0", "n_flows=3"], "n_flows"),
    (["run0", "eval.bins=0"], "eval.bins=0"),
    (["run0", "eval.nope=1"], "eval"),
    (["missing"], "no such run directory"),
    ([], "usage"),
])
def test_what_would_need_training_or_is_wrong_is_refused_in_one_line(evaluate, args, message):
    code, out, err = evaluate(*args)
    assert code == 2
    text = out + err
    assert message in text and "Traceback" not in text
