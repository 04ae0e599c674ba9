"""``hydra/launcher=stacked``: a sweep's seeds trained as one model write the rows the basic launcher writes, in
the same directories with the same identities; a seed that is done or in use is left to its own job; a stop
during the group's training leaves every seed resumable."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from flowvae.sweeps.group import group_key
from tests.conftest import compose_config, flowvae_command, run_flowvae, wait_until

# The columns a stacked seed's row must share with its basic-launcher row exactly.
SAME = ["flow", "n_flows", "seed", "status", "config_hash", "train_hash", "epochs_run", "resumed_from",
        "epochs_trained", "best_epoch"]
# Tiny runs of enough steps for a stack to pay (group.MIN_STEPS): 200 events in batches of 8, 25 steps an epoch.
ENOUGH_STEPS = "train.batch_size=8"


def _sweep(tmp_path, tiny, launcher, *overrides, name=None):
    name = name or launcher
    args = ["train", "-m", *tiny, f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path / name}",
            f"results_csv={tmp_path / name / 'results.csv'}", "train.epochs=3", ENOUGH_STEPS, *overrides]
    return run_flowvae(args, cwd=tmp_path, timeout=600)


def test_configs_that_differ_in_seed_alone_share_a_group():
    base = group_key(compose_config("flow=planar", "n_flows=2", "seed=0"))
    assert group_key(compose_config("flow=planar", "n_flows=2", "seed=7")) == base
    assert group_key(compose_config("flow=planar", "n_flows=3", "seed=0")) != base
    assert group_key(compose_config("flow=planar", "n_flows=2", "seed=0", "data.seed=1")) != base
    assert group_key(compose_config("flow=planar", "n_flows=2", "seed=0", "train.lr=0.01")) != base


@pytest.mark.parametrize(("flow", "n_jobs"), [("planar", 1), ("triangular", 2)])
def test_a_stacked_sweep_writes_the_rows_the_basic_launcher_writes(tmp_path, tiny, flow, n_jobs):
    """Two stacks (n_flows 1 and 2) of three seeds, one after the other or in two worker processes."""
    overrides = [f"flow={flow}", "n_flows=1,2", "seed=0,1,2", "train.val_fraction=0.2"]
    basic = _sweep(tmp_path, tiny, "basic", *overrides)
    stacked = _sweep(tmp_path, tiny, "stacked", *overrides, f"hydra.launcher.n_jobs={n_jobs}")
    assert basic.returncode == 0, basic.stdout + basic.stderr
    assert stacked.returncode == 0, stacked.stdout + stacked.stderr
    assert (stacked.stdout + stacked.stderr).count("training 3 seeds (0, 1, 2)") == 2
    rows = {name: pd.read_csv(tmp_path / name / "results.csv").sort_values(["n_flows", "seed"]).reset_index(drop=True)
            for name in ("basic", "stacked")}
    assert list(rows["stacked"].columns) == list(rows["basic"].columns)
    pd.testing.assert_frame_equal(rows["stacked"][SAME], rows["basic"][SAME])
    assert (rows["stacked"]["epochs_run"] == 3).all() and (rows["stacked"]["resumed_from"] == 0).all()
    # the same training up to the rounding of batched matrix products: the losses to 4 digits, and the
    # generated events, drawn from the same streams, to within the histograms' resolution
    for column in ("final_train_loss", "final_test_loss", "final_recon", "final_kl_term"):
        assert rows["stacked"][column].to_numpy() == pytest.approx(rows["basic"][column].to_numpy(), rel=1e-4)
    assert rows["stacked"]["kl_sum"].to_numpy() == pytest.approx(rows["basic"]["kl_sum"].to_numpy(), rel=0.05)
    # each seed in its own directory, with the files a run of its own leaves
    for run_dir in map(Path, rows["stacked"]["run_dir"]):
        assert run_dir.parent == tmp_path / "stacked"
        names = {path.name for path in run_dir.iterdir()}
        assert {"checkpoint.pt", "best.pt", "training_curves.csv", "result.csv", "status.json"} <= names
        assert list(pd.read_csv(run_dir / "training_curves.csv")["epoch"]) == [1, 2, 3]
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".lock", ".runs")] == []  # no lock outlives the sweeps


def test_a_seed_with_a_row_is_skipped_and_the_others_train_together(tmp_path, tiny):
    first = _sweep(tmp_path, tiny, "stacked", "flow=planar", "n_flows=1", "seed=1", name="s")
    assert first.returncode == 0, first.stdout + first.stderr
    again = _sweep(tmp_path, tiny, "stacked", "flow=planar", "n_flows=1", "seed=0,1,2", "skip_existing=true",
                   name="s")
    text = again.stdout + again.stderr
    assert again.returncode == 0, text
    assert "training 2 seeds (0, 2)" in text and "1 skipped" in text
    rows = pd.read_csv(tmp_path / "s" / "results.csv")
    assert sorted(rows["seed"]) == [0, 1, 2] and set(rows["status"]) == {"ok"}


@pytest.mark.slow
def test_sigterm_during_the_groups_training_leaves_every_seed_to_resume(tmp_path, tiny):
    """SIGTERM in the group's second epoch: no rows, every job interrupted (exit 3); the same command again
    finishes from the checkpoints with the rows an uninterrupted stacked sweep writes."""
    overrides = ["flow=planar", "n_flows=2", "seed=0,1", "train.epochs=40", "data.n_train=2000"]
    args = ["train", "-m", *tiny, "hydra/launcher=stacked", f"results_csv={tmp_path / 'results.csv'}", *overrides]
    process = subprocess.Popen([*flowvae_command(), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def two_epochs_each():  # the curves' header and two rows; a line count, so a poll takes no time
        curves = list(tmp_path.glob("outputs/multirun/*/*/training_curves.csv"))
        return len(curves) == 2 and all(len(c.read_text().splitlines()) >= 3 for c in curves)

    try:
        wait_until(two_epochs_each, "second epoch of both seeds", process=process)
    except BaseException:
        process.kill()
        raise
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 3, out
    statuses = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/*/*/status.json")]
    assert [s["status"] for s in statuses] == ["interrupted", "interrupted"], out
    assert not (tmp_path / "results.csv").exists()
    again = run_flowvae(args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = pd.read_csv(tmp_path / "results.csv")
    assert sorted(rows["seed"]) == [0, 1] and set(rows["status"]) == {"ok"}
    assert (rows["epochs_trained"] == 40).all() and (rows["resumed_from"] > 0).all()


def test_a_worker_started_after_the_launchers_stop_request_stops_too(tmp_path, monkeypatch):
    """loky replaces a worker whose memory grew: one that starts after the launching process was signalled
    learns of it from the sweep folder, and its stack's jobs record themselves interrupted."""
    from hydra import compose, initialize_config_module
    from hydra.core.singleton import Singleton

    from flowvae import stopping
    from flowvae.app import register_configs
    from flowvae.sweeps import stacked_launcher
    from flowvae.sweeps.stacked_launcher import STOP_FILE, _run_stack_in_worker

    monkeypatch.setattr(stacked_launcher, "configure_log", lambda *args: None)  # this process's logging stays
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        config = compose("config", return_hydra_config=True)
    stop_file = tmp_path / STOP_FILE
    try:
        assert _run_stack_in_worker(None, config, None, [], Singleton.get_state(), stop_file) == []
        assert not stopping.requested()
        stop_file.write_text("SIGTERM")
        assert _run_stack_in_worker(None, config, None, [], Singleton.get_state(), stop_file) == []
        assert stopping.requested() and stopping.received() == "SIGTERM"
    finally:
        stopping.reset()


@pytest.mark.slow
def test_sigterm_to_a_stacked_sweep_on_two_workers_interrupts_every_job(tmp_path, tiny):
    """Three stacks on two workers, SIGTERM while the first two train: the third is never handed out and its
    jobs, like the others, record themselves interrupted; no rows, exit 3."""
    args = ["train", "-m", *tiny, "hydra/launcher=stacked", "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_csv={tmp_path / 'results.csv'}", "flow=planar",
            "n_flows=1,2,3", "seed=0,1", "train.epochs=200", "data.n_train=2000"]
    process = subprocess.Popen([*flowvae_command(), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: len(list(tmp_path.glob("sweep/*/training_curves.csv"))) >= 4, "curves of four seeds",
                   process=process, poll=0.1)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 3, out
    statuses = [json.loads(p.read_text())["status"] for p in tmp_path.glob("sweep/*/status.json")]
    assert statuses == ["interrupted"] * 6, out
    assert not (tmp_path / "results.csv").exists()


def test_a_stacked_seeds_wall_seconds_holds_its_share_of_the_groups_training(tmp_path, tiny, monkeypatch):
    """The group's wall time (600 s on a stand-in clock) is divided among the three seeds it trained; each job
    adds its 200 s to its own time in wall_seconds, and the file that carried it is gone once the row is in."""
    from flowvae import stopping
    from flowvae.files import RunFiles
    from flowvae.run import job
    from flowvae.sweeps import group
    from flowvae.sweeps.group import Member, train_group

    ticks = iter([1000.0, 1600.0])  # the group's start, and the end of its training
    monkeypatch.setattr(group, "_clock", lambda: next(ticks))
    results = tmp_path / "results.csv"
    members = [Member(compose_config(*tiny, ENOUGH_STEPS, "train.epochs=3", f"seed={seed}",
                                     f"results_csv={results}"), tmp_path / f"s{seed}") for seed in range(3)]
    assert train_group(members, tmp_path, tmp_path) == 3
    for member in members:
        shared = json.loads(RunFiles(member.run_dir).group_training.read_text())
        assert shared == {"seconds": 200.0, "group_seconds": 600.0, "seeds": 3}
    try:
        for member in members:
            assert job.run(member.cfg, member.run_dir, tmp_path, sweep_dir=tmp_path) == 0
    finally:
        stopping.reset()
    rows = pd.read_csv(results)
    assert sorted(rows["seed"]) == [0, 1, 2] and (rows["epochs_run"] == 3).all()  # trained by the group
    own = rows["wall_seconds"] - 200
    assert ((0 < own) & (own < 300)).all(), rows["wall_seconds"]  # its own part: generating, scoring, writing
    assert not any(RunFiles(member.run_dir).group_training.exists() for member in members)


def test_the_groups_time_is_shared_by_the_epochs_each_seed_trained(tmp_path):
    """A seed that stopped early trained fewer epochs of the stack and gets that much less of its time; a seed
    the stop request interrupted gets none written (its rerun counts its own), and a stale share goes."""
    from types import SimpleNamespace

    from flowvae.files import RunFiles
    from flowvae.sweeps.group import _record_shares

    def member(name, status, epochs):
        files = RunFiles(tmp_path / name)
        files.root.mkdir()
        return SimpleNamespace(files=files), SimpleNamespace(status=status, epochs_run=epochs)

    trained = [member("early", "ok", 1), member("whole", "ok", 3), member("stopped", "interrupted", 4)]
    trained[2][0].files.group_training.write_text('{"seconds": 9.0}')
    _record_shares(trained, 800.0)
    shares = [json.loads(j.files.group_training.read_text())["seconds"] for j, _ in trained[:2]]
    assert shares == [100.0, 300.0] and not trained[2][0].files.group_training.exists()


def test_a_training_too_short_to_pay_for_a_stack_is_left_to_the_jobs(tmp_path, tiny, caplog):
    """Seeds of 8 steps each (fewer than group.MIN_STEPS, where stacking measured slower end to end) are not
    stacked: the group says why, trains none and creates nothing; each job then trains its own seed, as on the
    basic launcher."""
    from flowvae.data.events import load_events
    from flowvae.sweeps.group import MIN_STEPS, Member, steps_per_seed, train_group

    members = [Member(compose_config(*tiny, f"seed={seed}", f"results_csv={tmp_path / 'results.csv'}"),
                      tmp_path / f"s{seed}") for seed in range(3)]
    assert steps_per_seed(members[0].cfg, load_events(members[0].cfg.data, tmp_path)) == 8 < MIN_STEPS
    with caplog.at_level(logging.INFO, logger="flowvae.sweeps.group"):
        assert train_group(members, tmp_path, tmp_path) == 0
    assert f"stacked training skipped (each seed trains 8 steps, fewer than the {MIN_STEPS}" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_the_steps_per_seed_are_the_steps_fit_takes(tmp_path, tiny):
    """The rule's count: epochs times the batches of what the validation split leaves (200 events, 40 held out,
    160 in batches of 50: 4 an epoch)."""
    from flowvae.data.events import load_events
    from flowvae.sweeps.group import steps_per_seed

    cfg = compose_config(*tiny, "train.val_fraction=0.2", "train.epochs=3")
    assert steps_per_seed(cfg, load_events(cfg.data, tmp_path)) == 3 * 4
    cfg = compose_config(*tiny, ENOUGH_STEPS, "train.epochs=3")
    assert steps_per_seed(cfg, load_events(cfg.data, tmp_path)) == 3 * 25


def test_a_group_is_cut_into_the_fewest_even_stacks():
    """At most max_seeds a stack, as few stacks as that allows, and as even as can be: no stack of one or two
    left over beside a full one."""
    from flowvae.sweeps.stacked_launcher import cut

    sizes = {n: [len(stack) for stack in cut(list(range(n)), 8)] for n in (1, 3, 8, 9, 10, 17)}
    assert sizes == {1: [1], 3: [3], 8: [8], 9: [5, 4], 10: [5, 5], 17: [6, 6, 5]}
    assert [job for stack in cut(list(range(17)), 8) for job in stack] == list(range(17))  # in order
    assert cut(list(range(3)), 1) == [[0], [1], [2]]


def test_a_conditional_flow_left_to_flowvae_s_threads_is_left_to_the_jobs_on_a_cpu(tmp_path, caplog):
    """model=conditional_flow with train.threads=0 trains on one thread seed after seed (faster than a stack, measured
    end to end): the group says so and trains none; with train.threads set it stacks as any model."""
    from flowvae.sweeps.group import Member, _trains_on_one_thread, train_group

    data = Path(__file__).resolve().parents[1] / "data" / "gluon_30p_slice.npz"
    common = ["model=conditional_flow", "data=jetnet", f"data.path={data}", f"results_csv={tmp_path / 'r.csv'}"]
    members = [Member(compose_config(*common, "train.threads=0", "train.device=cpu", f"seed={seed}"),
                      tmp_path / f"s{seed}") for seed in range(2)]
    with caplog.at_level(logging.INFO, logger="flowvae.sweeps.group"):
        assert train_group(members, tmp_path, tmp_path) == 0
    assert "stacked training skipped (model=conditional_flow trains on one thread on this CPU" in caplog.text
    assert not (tmp_path / "s0").exists()
    assert not _trains_on_one_thread(compose_config(*common, "train.threads=2"))
    assert _trains_on_one_thread(compose_config(*common[:3], "train.threads=0"))
    assert not _trains_on_one_thread(compose_config("train.threads=0"))  # the default model stacks


def test_a_device_the_group_cannot_have_is_left_for_each_job_to_report(tmp_path, tiny, caplog):
    """train.device=gpu (not a device) or cuda without one: the group trains none and raises nothing; each job then
    refuses its config in its own words."""
    import torch

    from flowvae.sweeps.group import Member, train_group

    devices = ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        members = [Member(compose_config(*tiny, f"train.device={device}", f"seed={seed}",
                                         f"results_csv={tmp_path / 'r.csv'}"), tmp_path / device / f"s{seed}")
                   for seed in range(2)]
        with caplog.at_level(logging.INFO, logger="flowvae.sweeps.group"):
            assert train_group(members, tmp_path, tmp_path) == 0
        assert f"train.device={device} is not allowed" in caplog.text
        caplog.clear()
