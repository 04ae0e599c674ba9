"""`flowvae table`: means over seeds, and refusals of tables that would average different settings."""

from __future__ import annotations

import pandas as pd
import pytest

from flowvae import __version__
from flowvae.identity import run_hash, run_settings
from flowvae.results.table import load_results, main, seed_table
from tests.conftest import compose_config, run_flowvae


def _row(kl_sum, *overrides, status="ok"):
    """A results row as a run of ``overrides`` writes it (its settings and hash from the real config)."""
    cfg = compose_config(*overrides)
    return {**run_settings(cfg), "kl_sum": kl_sum, "status": status, "config_hash": run_hash(cfg),
            "flowvae_version": __version__}


def _write(tmp_path, rows):
    path = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class _Out:
    def __init__(self, returncode, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


@pytest.fixture
def table(capsys):
    """``flowvae table PATH --no-plot ARGS`` in this process (the console script is tested once, below)."""

    def call(path, *args):
        code = main([str(path), "--no-plot", *args])
        return _Out(code, capsys.readouterr())

    return call


def test_table_mean_std_over_seeds_and_zero_flows_in_every_column(tmp_path):
    rows = []
    for seed, (p1, i1, plain) in enumerate([(0.10, 0.30, 0.24), (0.14, 0.34, 0.26), (0.12, 0.32, 0.25)]):
        rows += [{**_row(p1, "flow=planar", "n_flows=1", f"seed={seed}"), "noise_floor": 0.001 * (seed + 1)},
                 _row(i1, "flow=iaf", "n_flows=1", f"seed={seed}"),
                 _row(plain, "flow=planar", "n_flows=0", f"seed={seed}")]
    rows.append(_row("", "flow=iaf", "n_flows=1", "seed=9", status="failed"))
    path = _write(tmp_path, rows)
    table, not_ok = load_results(path)
    assert not_ok == 1 and len(table) == 9
    cells, flows = seed_table(table, "kl_sum")
    assert flows == ["planar", "iaf"]
    assert cells.loc[(1, "planar"), "mean"] == pytest.approx(0.12)
    assert cells.loc[(1, "planar"), "std"] == pytest.approx(0.02)
    assert cells.loc[(0, "iaf"), "mean"] == pytest.approx(0.25) and cells.loc[(0, "iaf"), "count"] == 3
    out = run_flowvae(["table", str(path)], cwd=tmp_path)  # the console script, with its picture
    assert out.returncode == 0 and "1 failed or unfinished rows left out" in out.stdout
    assert "0.1200 ± 0.0200 (n=3)" in out.stdout and (tmp_path / "r_kl_sum.png").stat().st_size > 0
    assert "noise floor of kl_sum (the metric between two halves of the held-out events): 0.002" in out.stdout


@pytest.mark.parametrize(("protocol", "jet_floor"), [
    ("scaled", "the metric between two halves of the held-out events"),
    ("jetnet", "the metric between the held-out and the training jets: eval.protocol=jetnet's truth row"),
])
def test_the_noise_floor_says_what_it_is_under_each_protocol(tmp_path, table, protocol, jet_floor):
    """A jet-level floor is two halves of the held-out events under scaled, held-out against training jets under
    jetnet (its truth row); kl_sum's is two halves under both."""
    floors = {"noise_floor": 0.002, "w1m": 0.01, "w1m_floor": 0.003}
    path = _write(tmp_path, [{**_row(0.1, "flow=planar", "n_flows=1", f"seed={seed}", "data=jetnet",
                                     f"eval.protocol={protocol}"), **floors} for seed in (0, 1)])
    out = table(path, "--metric", "w1m")
    assert out.returncode == 0, out.stderr
    assert f"noise floor of w1m ({jet_floor}): 0.003" in out.stdout
    out = table(path)
    assert "noise floor of kl_sum (the metric between two halves of the held-out events): 0.002" in out.stdout


@pytest.mark.parametrize("other", ["train.grad_clip=1.0", "train.warmup_epochs=2", "model.hidden=[64]",
                                   "eval.bins=50", "eval.eps=1e-8", "eval.n_samples=500", "data.n_test=500",
                                   "model.sigma_x=0.3"])
def test_runs_that_differ_in_any_setting_are_never_averaged(tmp_path, table, other):
    path = _write(tmp_path, [_row(0.1, "flow=planar", "n_flows=1", "seed=0"),
                             _row(0.2, "flow=planar", "n_flows=1", "seed=1", other)])
    key, value = other.split("=")
    out = table(path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert key in out.stderr and "--filter" in out.stderr
    out = table(path, "--filter", other)
    assert out.returncode == 0, out.stderr
    assert "0.2000 (n=1)" in out.stdout


def test_a_blank_setting_counts_as_a_value_on_every_pandas(tmp_path, table):
    """model.sigma_x=null beside 0.3: blank cells must not be dropped by the mixed-settings check."""
    path = _write(tmp_path, [_row(0.6, "flow=planar", "n_flows=1"),
                             _row(0.62, "flow=planar", "n_flows=1", "model.sigma_x=0.3")])
    out = table(path)
    assert out.returncode == 2 and "model.sigma_x in ['(blank)', '0.3']" in out.stderr
    out = table(path, "--filter", "model.sigma_x=")
    assert out.returncode == 0 and "0.6000 (n=1)" in out.stdout


def test_flow_options_may_differ_between_families_not_within_one(tmp_path, table):
    rows = [_row(0.1, "flow=iaf", "n_flows=1"), _row(0.2, "flow=householder", "n_flows=1"),
            _row(0.3, "flow=none")]
    assert table(_write(tmp_path, rows)).returncode == 0
    rows.append(_row(0.4, "flow=iaf", "n_flows=1", "flow.hidden=32", "seed=1"))
    out = table(_write(tmp_path, rows))
    assert out.returncode == 2 and "flow.hidden" in out.stderr


def test_gaussian_and_npy_rows_in_one_csv_are_refused_in_one_line(tmp_path, table):
    rows = [_row(0.1, "flow=planar", "n_flows=1"),
            _row(3.4, "flow=planar", "n_flows=1", "data=npy", "data.path=p.npy", "data.feature_names=[pt,eta,phi]")]
    path = _write(tmp_path, rows)
    out = table(path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "data.name" in out.stderr
    out = table(path, "--filter", "data.name=gaussian", "--filter", "data.n_train=10000.0")
    assert out.returncode == 0 and "0.1000 (n=1)" in out.stdout


def test_files_that_are_not_results_tables_get_one_line(tmp_path, table):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/:\nx,y\n1,2,3,4\n")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "empty.csv").write_text("")
    for name, message in [("passwd", "is not a CSV file"), ("other.csv", "not a flowvae results table"),
                          ("empty.csv", "is not a CSV file"), ("missing.csv", "does not exist"), (".", "directory")]:
        out = table(tmp_path / name)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, name
    path = _write(tmp_path, [_row(0.1, "flow=planar", "n_flows=1")])
    out = table(path, "--metric", "nope")
    assert out.returncode == 2 and "--metric nope" in out.stderr
    out = table(path, "--metric", "train.lr")
    assert out.returncode == 2 and "--metric train.lr" in out.stderr
    out = table(path, "--filter", "lr=0.001")
    assert out.returncode == 2 and "no column 'lr'" in out.stderr and "train.lr" in out.stderr


def test_old_tables_say_how_to_convert_and_the_conversion_reads_the_run_directories(tmp_path, table):
    """A 0.2 table (setting columns data_mu, lr, ...) is converted from each row's .hydra/config.yaml."""
    from omegaconf import OmegaConf

    old = []
    for seed, lr in [(0, 0.001), (1, 0.001), (2, 0.01)]:
        cfg = compose_config("flow=planar", "n_flows=1", f"seed={seed}", f"train.lr={lr}")
        run_dir = tmp_path / f"run{seed}"
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        old.append({"flow": "planar", "n_flows": 1, "seed": seed, "kl_sum": 0.1 * (seed + 1), "status": "ok",
                    "data": "gaussian", "data_mu": "1.0", "lr": lr, "run_dir": str(run_dir),
                    "config_hash": f"old{seed}", "flowvae_version": "0.2.0"})
    old.append({**old[0], "seed": 3, "run_dir": str(tmp_path / "gone"), "config_hash": "old3"})
    path = _write(tmp_path, old)
    out = table(path)
    assert out.returncode == 2 and f"flowvae table {path} --upgrade" in out.stderr
    out = table(path, "--upgrade")
    assert out.returncode == 0, out.stderr
    assert "3 rows in the current format" in out.stdout and "1 rows whose run directory is gone" in out.stdout
    assert (tmp_path / "r.csv.orig").exists() and (tmp_path / "r.unconverted.csv").exists()
    converted = pd.read_csv(path)
    assert "lr" not in converted.columns and list(converted["train.lr"]) == [0.001, 0.001, 0.01]
    out = table(path)
    assert out.returncode == 2 and "train.lr" in out.stderr
    out = table(path, "--filter", "train.lr=0.001")
    assert out.returncode == 0 and "0.1500 ± 0.0707 (n=2)" in out.stdout


@pytest.fixture
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _cells(rows):
    """``seed_table``'s cells from (n_flows, flow, mean, std) rows."""
    index = pd.MultiIndex.from_tuples([(k, f) for k, f, _, _ in rows], names=["n_flows", "flow"])
    return pd.DataFrame({"mean": [m for *_, m, _ in rows], "std": [s for *_, s in rows], "count": 3}, index=index)


def test_plot_labels_every_n_flows_run_and_keeps_the_bands_inside_a_log_axis(close_figures):
    """A sweep over n_flows 0, 2 whose means span decades and whose std exceeds the mean at n_flows = 2: the
    ticks are 0 and 2 (not symlog's 0 and 10^0), and every band lies within the y-limits, which are positive."""
    import numpy as np

    from flowvae.results.plots import table_figure

    cells = _cells([(0, "planar", 0.001, 0.0005), (2, "planar", 0.05, 0.08),
                    (0, "iaf", 0.001, 0.0005), (2, "iaf", 0.2, 0.3)])
    fig = table_figure(cells, ["planar", "iaf"], "kl_sum", floor=0.0008)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2"]
    assert list(ax.get_xticks()) == [0, 2] and not len(ax.get_xticks(minor=True))
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log" and 0 < low <= 0.0008 and high >= 0.2 + 0.3
    bands = [c for c in ax.collections if len(c.get_paths())]
    assert len(bands) == 2
    for band in bands:
        y = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
        assert y.min() >= low * (1 - 1e-9) and y.max() <= high * (1 + 1e-9), (y, low, high)
    assert max(np.concatenate([b.get_paths()[0].vertices[:, 1] for b in bands])) == pytest.approx(0.5)
    for line in ax.get_lines()[:2]:  # the means
        assert low < min(line.get_ydata()) and max(line.get_ydata()) < high


def test_plot_ticks_the_seed_sweep_and_thins_only_crowded_labels(close_figures):
    from flowvae.results.plots import table_figure

    seed_sweep = [0, 1, 2, 5, 10, 15, 20, 30, 40, 60, 80]
    fig = table_figure(_cells([(k, "planar", 0.002, 0.001) for k in seed_sweep]), ["planar"], "kl_sum",
                       floor=0.0008)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    assert list(ax.get_xticks()) == seed_sweep
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in seed_sweep]
    left, right = ax.get_xlim()
    assert -1 < left < 0 and 80 < right < 200  # margins on the symlog scale, not 5 % of 0..80 in linear units
    dense = list(range(101))
    fig = table_figure(_cells([(k, "planar", 0.002, 0.001) for k in dense]), ["planar"], "kl_sum")
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[:3] == ["0", "1", "2"] and labels[-1] in ("", "100") and 10 < sum(map(bool, labels)) < 40
