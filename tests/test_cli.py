"""End to end through the console script, as a user types it."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy, wasserstein_distance

from flowvae import __version__
from flowvae.metrics.row import metric_columns
from tests.conftest import TINY, flowvae_command, run_flowvae


def _train(tmp_path, tiny, *overrides, run_dir="run"):
    args = ["train", *tiny, f"hydra.run.dir={tmp_path / run_dir}", f"results_csv={tmp_path / 'results.csv'}",
            *overrides]
    return run_flowvae(args, cwd=tmp_path)


def test_version_and_help(tmp_path):
    out = run_flowvae(["--version"], cwd=tmp_path)
    assert out.returncode == 0 and __version__ in out.stdout
    out = run_flowvae(["--help"], cwd=tmp_path)
    assert out.returncode == 0 and "flowvae train" in out.stdout and "flowvae table" in out.stdout
    out = run_flowvae(["frobnicate"], cwd=tmp_path)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_train_passes_hydra_flags_through(tmp_path):
    out = run_flowvae(["train", "--cfg", "job", "flow=planar", "n_flows=3"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "n_flows: 3" in out.stdout and "name: planar" in out.stdout
    out = run_flowvae(["train", "--help"], cwd=tmp_path)
    assert out.returncode == 0 and "flow: householder, iaf, none, orthogonal, planar, triangular" in out.stdout


def test_train_writes_row_outputs_and_is_deterministic(tmp_path, tiny):
    first = _train(tmp_path, tiny, "flow=planar", "n_flows=2", run_dir="a")
    assert first.returncode == 0, first.stdout + first.stderr
    second = _train(tmp_path, tiny, "flow=planar", "n_flows=2", run_dir="b")
    assert second.returncode == 0, second.stdout + second.stderr

    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 2
    row = table.iloc[0]
    assert row["status"] == "ok" and row["flow"] == "planar" and row["n_flows"] == 2
    kls = [row[f"kl_{i}"] for i in range(3)]
    assert all(math.isfinite(v) and v >= 0 for v in kls)
    assert row["kl_sum"] == pytest.approx(sum(kls), rel=1e-12)
    metric_values = table.loc[0, metric_columns(3)].astype(float)
    assert all(map(math.isfinite, metric_values)), metric_values[~metric_values.map(math.isfinite)]
    # Same config and seed: the same numbers, to the bit.
    metric_cols = [c for c in table.columns if c.startswith(("kl_", "w1_", "js_", "gen_", "final_"))]
    assert (table.loc[0, metric_cols] == table.loc[1, metric_cols]).all()
    assert table.loc[0, "config_hash"] == table.loc[1, "config_hash"]

    run_dir = tmp_path / "a"
    for name in ("result.csv", "training_curves.csv", "checkpoint.pt", "histograms.png", "status.json",
                 ".hydra/config.yaml", "train.log"):
        assert (run_dir / name).exists(), name
    curves = pd.read_csv(run_dir / "training_curves.csv")
    assert list(curves["epoch"]) == [1, 2]
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".lock", ".runs")] == []  # finished: no locks left
    assert pd.read_csv(run_dir / "result.csv").iloc[0]["kl_sum"] == row["kl_sum"]


def _histogram_kl(p: np.ndarray, q: np.ndarray, bins: int, eps: float = 1e-10) -> float:
    """The README's KL definition, written independently: shared bins on the pooled range, eps, renormalised."""
    edges = np.linspace(min(p.min(), q.min()), max(p.max(), q.max()), bins + 1)
    p_prob = np.histogram(p, edges)[0] / p.size + eps
    q_prob = np.histogram(q, edges)[0] / q.size + eps
    return float(entropy(p_prob, q_prob))  # normalises both, sum p log(p/q)


def test_default_run_row_equals_values_computed_independently_from_its_files(tmp_path):
    """The default model path end to end: the row's metrics are D_KL(generated || input), W1 and moments of the
    generated events it saved against the held-out events, recomputed here with numpy and scipy."""
    out = run_flowvae(["train", *TINY, "hydra.run.dir=run", "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    generated = np.load(tmp_path / "run" / "generated_sample.npy").astype(np.float64)  # all 200 events
    rng = np.random.default_rng(0)  # data.seed: the gaussian toy draws train, then held-out events
    rng.standard_normal((200, 3, 10))
    held_out = 1.0 + 0.5 * rng.standard_normal((200, 3, 10))
    assert generated.shape == (200, 3, 10)
    for i in range(3):
        gen, ref = generated[:, i].ravel(), held_out[:, i].ravel()
        assert row[f"kl_{i}"] == pytest.approx(_histogram_kl(gen, ref, bins=20), rel=1e-6)
        assert row[f"kl_{i}"] != pytest.approx(_histogram_kl(ref, gen, bins=20), rel=1e-3)  # the order matters
        assert row[f"w1_{i}"] == pytest.approx(wasserstein_distance(gen, ref), rel=1e-6)
        assert row[f"gen_mean_{i}"] == pytest.approx(gen.mean(), rel=1e-6)
        assert row[f"gen_std_{i}"] == pytest.approx(gen.std(), rel=1e-6)
        assert row[f"input_std_{i}"] == pytest.approx(held_out[:, i].std(), rel=1e-5)
    assert row["kl_sum"] == pytest.approx(sum(row[f"kl_{i}"] for i in range(3)), rel=1e-12)


def test_zero_flows_is_the_same_plain_vae_for_every_flow_type(tmp_path, tiny):
    sums = []
    for flow in ("none", "iaf", "orthogonal"):
        out = _train(tmp_path, tiny, f"flow={flow}", "n_flows=0", run_dir=flow)
        assert out.returncode == 0, out.stdout + out.stderr
        sums.append(pd.read_csv(tmp_path / flow / "result.csv").iloc[0][["kl_sum", "w1_sum", "final_test_loss"]])
    for other in sums[1:]:
        assert (other == sums[0]).all()


def test_bad_value_exits_2_with_one_line_and_no_row(tmp_path, tiny):
    out = _train(tmp_path, tiny, "n_flows=-1")
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "n_flows=-1" in text and "Traceback" not in text
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("override, message", [
    ("results_csv=/proc/forbidden.csv", "cannot create the lock file"),
    ("results_csv={tmp}/file/r.csv", "cannot make the folder"),
    ("train.device=cuda", "train.device=cuda"),
])
def test_what_can_be_checked_without_training_is_refused_before_the_first_epoch(tmp_path, tiny, override,
                                                                                  message):
    (tmp_path / "file").write_text("x")
    if override == "train.device=cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = _train(tmp_path, tiny, override.format(tmp=tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert message in text and "Traceback" not in text and "epoch 1" not in text
    assert not (tmp_path / "results.csv").exists()
    assert not (tmp_path / "run").exists()  # a refused single run leaves no run directory


def test_tab_completion_works_as_the_readme_says(tmp_path):
    out = run_flowvae(["train", "-sc", "install=bash"], cwd=tmp_path)
    assert out.returncode == 0 and "-sc query=bash" in out.stdout
    # What Tab runs: the executable's name, then -sc query=bash, with the typed line in COMP_LINE.
    line = "flowvae train flow=pl"
    out = run_flowvae(["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert out.returncode == 0, out.stderr
    assert "flow=planar" in out.stdout.split()
    line = "flowvae train train.l"
    out = run_flowvae(["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert "train.lr=" in out.stdout.split()


def _bash_tab(lines: list[str], cwd: Path) -> tuple[list[list[str]], str]:
    """What bash offers at Tab after each line, through the script `flowvae train -sc install=bash` installs:
    COMP_LINE, COMP_POINT, COMP_WORDS and COMP_CWORD set as bash sets them, then the registered function. Also
    returns `complete -p` for `flowvae` and for `train` (which must have no completion of its own)."""
    command = flowvae_command()
    if len(command) != 1 or shutil.which("bash") is None:
        pytest.skip("needs bash and the flowvae console script")
    script = ['eval "$(flowvae train -sc install=bash)"',
              'tab() { COMP_LINE="$1"; COMP_POINT=${#1}; read -ra COMP_WORDS <<< "$1"; '
              '[[ "$1" == *" " ]] && COMP_WORDS+=(""); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); '
              'hydra_bash_completion; echo "REPLY ${COMPREPLY[*]}"; }']
    script += [f"tab '{line}'" for line in lines]
    script += ["complete -p flowvae", "complete -p train 2>/dev/null || echo 'train: none'"]
    env = {**os.environ, "PATH": os.path.dirname(command[0]) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)  # a flowvae start per line: minutes on a busy machine
    replies = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("REPLY")]
    assert len(replies) == len(lines), out.stdout + out.stderr
    return replies, out.stdout + out.stderr


def test_tab_completes_subcommands_and_each_commands_arguments_in_bash(tmp_path):
    lines = ["flowvae ", "flowvae ev", "flowvae train -m n_fl", "flowvae generate ", "flowvae score a.npz ",
             "flowvae evaluate run eval.so", "flowvae evaluate run fl", "flowvae evaluate run --device c"]
    replies, text = _bash_tab(lines, tmp_path)
    got = dict(zip(lines, replies, strict=True))
    assert {"train", "table", "score", "generate", "evaluate"} <= set(got["flowvae "])
    assert got["flowvae ev"] == ["evaluate"]
    assert got["flowvae train -m n_fl"] == ["n_flows="]
    for line in ("flowvae generate ", "flowvae score a.npz "):
        assert got[line] == [], line  # nothing from flowvae: bash's file names (-o default)
    assert got["flowvae evaluate run eval.so"] == ["eval.source="]
    assert got["flowvae evaluate run fl"] == []  # evaluate refuses flow=...: not offered
    assert got["flowvae evaluate run --device c"] == ["cpu", "cuda"]
    assert "Error" not in text and "Traceback" not in text
    assert "hydra_bash_completion flowvae\n" in text and "train: none" in text


def test_tab_completion_follows_the_cursor(tmp_path):
    line = "flowvae train flow=pl n_flows=3"
    out = run_flowvae(["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": "21"})
    assert out.returncode == 0 and out.stdout.split() == ["flow=planar"]
    (tmp_path / "gen.npy").write_bytes(b"")
    line = "flowvae generate run --out ge"  # fish: one candidate a line, and file names from flowvae itself
    out = run_flowvae(["-sc", "query=fish"], cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert out.returncode == 0 and out.stdout.splitlines() == ["gen.npy"]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["train", "--cfg", "job"],
                                  ["evaluate", "--help"]])
def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path, args):
    """`flowvae ... | head`: stdout is a pipe whose reader has gone (closed before flowvae starts, so every
    write fails with EPIPE). The command ends with its own exit code, no BrokenPipeError, no traceback: our own
    prints, Hydra's (`--help`, and `--cfg` that Hydra reports as a failure) and a subcommand's."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run([*flowvae_command(), *args], cwd=tmp_path, stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=300,
                             env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    finally:
        os.close(write_end)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_the_wheel_holds_every_config_and_builds_without_warnings(tmp_path):
    """A non-editable install gets its configs from the wheel: every YAML of conf/ must be in it, under
    flowvae/conf/, and every module of every subpackage. Built from a copy of the project, so the tree gets no
    build/ folder."""
    pytest.importorskip("setuptools", minversion="77")
    root = Path(__file__).resolve().parents[1]
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("flowvae", "conf", "hydra_plugins"):
        shutil.copytree(root / folder, project / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, project / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-w", str(tmp_path / "wheel"), str(project)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "absent from the `packages` configuration" not in out.stdout + out.stderr  # one per group before
    (wheel,) = (tmp_path / "wheel").glob("flowvae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {name for name in names if name.endswith(".yaml")}
    configs = {"flowvae/conf/" + path.relative_to(root / "conf").as_posix() for path in (root / "conf").rglob("*.yaml")}
    assert len(configs) >= 10 and in_wheel == configs
    modules = {path.relative_to(root).as_posix() for folder in ("flowvae", "hydra_plugins")
               for path in (root / folder).rglob("*.py")}
    assert modules <= set(names), f"modules missing from the wheel: {sorted(modules - set(names))}"  # subpackages


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from hydra import compose, initialize_config_module

    from flowvae.app import register_configs

    register_configs()
    dirs = set()
    for _ in range(20):
        with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
            cfg = compose("config", overrides=["train.lr=0.01"], return_hydra_config=True)
            dirs.add((cfg.hydra.run.dir, cfg.hydra.sweep.dir))
    assert len({d[0] for d in dirs}) == 20 and len({d[1] for d in dirs}) == 20


def test_wrong_type_is_refused_by_hydra(tmp_path, tiny):
    out = _train(tmp_path, tiny, "n_flows=abc")
    assert out.returncode == 2
    assert "n_flows" in out.stdout + out.stderr
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize(("overrides", "name"), [
    ([], "_planar_K2_s1"),  # the default model: the names runs always had
    (["model=conditional_flow"], "_conditional_flow_planar_K2_s1"),
])
def test_run_and_sweep_directories_name_a_model_other_than_the_default(overrides, name):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from flowvae.app import register_configs

    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "flow=planar", "n_flows=2", "seed=1"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    run_dir = cfg.hydra.run.dir
    assert run_dir.endswith(name) and "__" not in run_dir.rsplit("/", 1)[-1]
    assert cfg.hydra.sweep.subdir == "3" + name


@pytest.mark.parametrize("args", [["flow=nope"], ["-m", "flow=planar,nope", "n_flows=1"], ["data=jetnett"],
                                  ["flow=null"]])
def test_an_option_a_config_group_does_not_have_is_one_line_naming_the_options(tmp_path, args):
    out = run_flowvae(["train", *args, f"results_csv={tmp_path / 'results.csv'}"], cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    value = "null" if "flow=null" in args else "nope"
    group, value = ("data", "jetnett") if "data=jetnett" in args else ("flow", value)
    options = ("gaussian, jetnet, jets, npy" if group == "data"
               else "householder, iaf, none, orthogonal, planar, triangular")
    assert out.stderr.splitlines() == [f"flowvae train: {group}={value} is not allowed: one of {options}"]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "results.csv").exists()
