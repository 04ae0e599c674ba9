"""Sweeps: the preset grid, a multirun on the basic and joblib launchers, failures that do not sink a sweep,
and `flowvae table` on what they wrote."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_module

from flowvae.app import register_configs
from flowvae.flows import table_order
from flowvae.sweeps.callbacks import count_jobs
from tests.conftest import run_flowvae


def _sweep(tmp_path, tiny, *overrides, name="sweep"):
    args = ["train", "-m", *tiny, f"hydra.sweep.dir={tmp_path / name}", f"results_csv={tmp_path / 'results.csv'}",
            *overrides]
    return run_flowvae(args, cwd=tmp_path, timeout=600)


def test_seed_table_preset_expands_to_the_full_grid(tmp_path):
    out = run_flowvae(["train", "+experiment=seed_table", "--cfg", "hydra"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    params = yaml.safe_load(out.stdout)["hydra"]["sweeper"]["params"]
    assert params["flow"].split(",") == table_order()  # every family, in the slides' order
    assert [int(k) for k in params["n_flows"].split(",")] == [0, 1, 2, 5, 10, 15, 20, 30, 40, 60, 80]
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=seed_table"], return_hydra_config=True)
        assert count_jobs(cfg) == 5 * 11 * 3
        cfg = compose("config", overrides=["+experiment=seed_table"], return_hydra_config=True)
        cfg.hydra.overrides.task = ["+experiment=seed_table", "seed=0,1,2,3,4"]  # the command line wins
        assert count_jobs(cfg) == 5 * 11 * 5


def test_the_jetnet_study_preset_is_each_model_by_plain_and_two_flows_under_jetnets_protocol():
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=jetnet_study", "data.path=jets.npz"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["model"].split(",") == ["default", "conditional_flow"]
    assert (params["flow"], params["n_flows"], params["seed"]) == ("orthogonal,triangular", "0,10", "0,1,2")
    assert count_jobs(cfg) == 2 * 2 * 2 * 3  # n_flows=0 twice per model and seed: one trains, one is skipped
    assert (cfg.data.name, cfg.data.test_fraction, cfg.eval.protocol, cfg.eval.n_samples) == ("npy", 0.5, "jetnet",
                                                                                             50_000)
    assert (cfg.train.val_fraction, cfg.train.patience, cfg.train.lr_schedule) == (0.1, 4, "constant")


def test_the_prior_study_preset_is_the_conditional_flow_with_jets_that_add_up_under_jetnets_protocol():
    """Plain and triangular-10 posteriors x 3 seeds of the conditional flow, its pT fractions through `fraction`
    (under logit a few jets that carry more than their pT decide FPD: docs/priors.md), jetnet's protocol."""
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=prior_study", "data.path=jets.npz"],
                      return_hydra_config=True)
    assert (cfg.hydra.sweeper.params["n_flows"], cfg.hydra.sweeper.params["seed"]) == ("0,10", "0,1,2")
    assert count_jobs(cfg) == 2 * 3
    assert (cfg.model.name, cfg.flow.name, cfg.prior.name) == ("conditional_flow", "triangular", "standard")
    assert list(cfg.data.transforms) == ["none", "none", "fraction", "none"]
    assert (cfg.data.test_fraction, cfg.eval.protocol, cfg.eval.n_samples) == (0.5, "jetnet", 50_000)
    assert (cfg.train.val_fraction, cfg.train.patience, cfg.train.grad_clip) == (0.1, 4, 1.0)


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_writes_a_row_per_job_and_table_gives_the_means(tmp_path, tiny, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    out = _sweep(tmp_path, tiny, "flow=planar,householder", "n_flows=1,2", *extra)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sweep finished: 4 ok" in out.stdout + out.stderr
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"ok"}

    table_out = run_flowvae(["table", str(tmp_path / "results.csv")], cwd=tmp_path)
    assert table_out.returncode == 0, table_out.stderr
    printed = pd.read_csv(tmp_path / "results_kl_sum.csv", index_col="n_flows")
    assert list(printed.columns) == ["planar", "householder"] and list(printed.index) == [1, 2]
    for flow in ("planar", "householder"):
        for k in (1, 2):
            value = results[(results.flow == flow) & (results.n_flows == k)]["kl_sum"].iloc[0]
            assert printed.loc[k, flow] == f"{value:.4f} (n=1)"
    assert (tmp_path / "results_kl_sum.png").stat().st_size > 0
    assert "| n_flows | planar | householder |" in (tmp_path / "results_kl_sum.md").read_text()
    # what resuming and concurrency needed went with the runs: no lock beside the table, in the index or in a run
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".lock", ".runs")] == []


def test_a_failing_job_does_not_sink_the_sweep(tmp_path, tiny):
    out = _sweep(tmp_path, tiny, "flow=planar", "n_flows=1,-1,2")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "2 ok" in text and "1 invalid" in text and "n_flows=-1" in text
    results = pd.read_csv(tmp_path / "results.csv")
    assert sorted(results["n_flows"]) == [1, 2]


@pytest.mark.slow
def test_submitit_local_runs_a_real_job(tmp_path, tiny):
    out = _sweep(tmp_path, tiny, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "n_flows=1",
                 "flow=planar")
    assert out.returncode == 0, out.stdout + out.stderr
    results = pd.read_csv(tmp_path / "results.csv")
    assert len(results) == 1 and results["status"].iloc[0] == "ok"
    assert list((tmp_path / "sweep" / ".submitit").iterdir())


@pytest.mark.slow
def test_submitit_requeues_a_job_at_its_time_limit_and_it_resumes(tmp_path):
    """submitit's warning before a job's time limit (SIGUSR2) during training: the job checkpoints, is requeued,
    resumes, finishes. submitit_local sends it timeout_min minus 30 s after the start, so whether it came during
    training depended on this machine's speed (too fast: no warning; too busy: every attempt warned until
    submitit gave up, "timed-out too many times"). The test sends the same signal to the job itself once
    training is under way; with timeout_min <= 10 submitit counts any warning as a time-out, as at the limit,
    and none of its own comes before 9.5 minutes."""
    import os
    import signal
    import subprocess

    import psutil

    from tests.conftest import flowvae_command, wait_until

    # 300 epochs: ~10 s on a quiet 2-core AMD EPYC, so even a machine ten times faster is still training when the
    # signal comes (it is sent within 0.1 s of the first checkpoint)
    long = ["data.n_train=2000", "data.n_test=200", "data.n_particles=10", "model.hidden=[32]", "model.latent_dim=4",
            "train.epochs=300", "train.batch_size=50", "eval.n_samples=200", "train.threads=1", "train.progress=log"]
    args = ["train", "-m", *long, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_csv={tmp_path / 'results.csv'}"]
    process = subprocess.Popen([*flowvae_command(), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: any((tmp_path / "sweep").glob("0_*/checkpoint.pt")), "first checkpoint", process=process)
        tasks = []

        def the_job():  # submitit_local's task process, under its controller, under flowvae
            tasks[:] = [child for child in psutil.Process(process.pid).children(recursive=True)
                        if "submitit.core._submit" in " ".join(child.cmdline())]
            return bool(tasks)

        wait_until(the_job, "submitit task process", timeout=60, process=process)
        tasks[0].send_signal(signal.SIGUSR2)
        out, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, out
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["status"] == "ok" and 0 < row["resumed_from"] < 300  # the second attempt went on from there
    log = next((tmp_path / "sweep").glob("0_*/train.log")).read_text()
    assert "SIGUSR2 received" in log and "requeueing the job" in log and "resumed from" in log
