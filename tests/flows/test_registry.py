"""The flow registry is the one list of families: config validation, tables, the benchmark and tests ask it."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import Tensor

from flowvae import flows
from flowvae.flows.base import FLOWS, Flow, register

CONF = Path(__file__).resolve().parents[2] / "conf" / "flow"


def test_every_registered_family_has_its_config_file_and_every_config_file_a_family():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(FLOWS)
    for name in FLOWS:
        text = (CONF / f"{name}.yaml").read_text()
        assert f"name: {name}" in text
        for option in flows.options(name):  # each option the family takes is set (and so documented) there
            assert f"{option}:" in text, (name, option)


def test_tables_show_the_families_in_the_seed_slides_order():
    assert flows.table_order() == ["planar", "iaf", "householder", "triangular", "orthogonal"]
    assert flows.names()[0] == "none"


def test_a_new_family_is_registered_by_its_own_module_alone():
    @register("shift_for_test", table_rank=7)
    class Shift(Flow):
        def __init__(self, dim: int, *, scale: int = 1) -> None:
            super().__init__()
            self.dim, self.num_params = dim, dim

        def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
            return z + params, z.new_zeros(z.shape[0])

    try:
        assert flows.options("shift_for_test") == {"scale": 1}
        assert "shift_for_test" in flows.table_order()
        assert flows.build("shift_for_test", 3, 2).num_params == 6
        with pytest.raises(ValueError, match="registered twice"):
            register("shift_for_test")(type("Other", (Shift,), {}))
    finally:
        del FLOWS["shift_for_test"]
