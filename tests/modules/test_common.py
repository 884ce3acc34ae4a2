"""The phase modules' shared helpers: the learning-rate schedule and the markdown tables."""

import math

import pytest

from rlhf_lightning.modules.common import lr_factor, markdown_table


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_factor_warms_up_then_decays_to_the_floor(decay):
    # 2 warmup steps, then 4 steps of decay to 0.2: halfway (step 4) linear gives 0.6, cosine 0.2 + 0.8 * 0.5 = 0.6.
    f = [lr_factor(step, 2, 6, 0.2, decay) for step in range(8)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[4] == pytest.approx(0.6) and f[6] == f[7] == pytest.approx(0.2)
    quarter = 1 - 0.8 * 0.25 if decay == "linear" else 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))
    assert f[3] == pytest.approx(quarter)


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", "z"]]) == "| a | b |\n|---|---|\n| x\\|y | z |"
