"""``rlhf diagnose`` on synthetic runs: report.md names what fired, PNGs exist, errors are clear, exit status 0."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_lightning.cli import main as rlhf_main
from rlhf_lightning.diagnose.detectors import FAMILIES
from rlhf_lightning.diagnose.report import FAMILY_TITLES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("overoptimisation.png", "diversity.png", "length.png", "beta.png")


@pytest.fixture
def two_runs(tmp_path, synth):
    """A healthy run and one whose gold peaks at iteration 30 and falls while the proxy keeps rising."""
    t = np.arange(synth.n, dtype=np.float64)
    healthy, hacked = tmp_path / "healthy", tmp_path / "hacked"
    synth.write_events(healthy, synth.healthy_points(), synth.hparams)
    points = synth.healthy_points(seed=1)
    synth.set_series(points, "objective/proxy_reward", 0.03 * t)
    synth.set_series(
        points, "objective/gold_reward", 0.8 * synth.rise(np.minimum(t, 30)) - 0.03 * np.maximum(t - 30, 0)
    )
    synth.write_events(hacked, points, synth.hparams)
    return healthy, hacked


def test_two_runs_side_by_side(tmp_path, two_runs, capsys):
    healthy, hacked = two_runs
    out = tmp_path / "report"
    rlhf_main(["diagnose", str(healthy), str(hacked), "--out", str(out)])  # returns: exit status 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert printed.startswith(report.rstrip("\n"))
    assert f"## {healthy}" in report and f"## {hacked}" in report
    assert "### `reward_hacking.gold_divergence`" in report
    hacked_section = report.split(f"## {hacked}")[1]
    assert "**triggered**: `reward_hacking.gold_divergence`" in hacked_section
    assert "triggered" not in report.split(f"## {hacked}")[0]  # the healthy run's section
    assert all(FAMILY_TITLES[f] in report for f in FAMILIES)
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
        assert f"]({name})" in report
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_no_gold_reports_gold_free_evidence_only(tmp_path, two_runs, capsys):
    _, hacked = two_runs
    out = tmp_path / "blind"
    rlhf_main(["diagnose", str(hacked), "--no-gold", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert "`--no-gold`: gold-free evidence only" in report
    assert "could not evaluate: annotation_shift" in report  # every detector of that family compares with gold
    assert "gold_divergence` (iteration" not in report  # the gold detector that fires with gold is set aside
    assert "`reward_hacking.gold_divergence`" in report.split("### Not evaluated")[1]


def test_one_run_defaults_to_its_diagnose_folder(two_runs, capsys):
    _, hacked = two_runs
    rlhf_main(["diagnose", str(hacked)])
    assert (hacked / "diagnose" / "report.md").is_file()
    assert (hacked / "diagnose" / "overoptimisation.png").is_file()


def test_folder_without_events_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        rlhf_main(["diagnose", str(tmp_path)])
    assert exc.value.code == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_family_titles_cover_every_family():
    assert set(FAMILY_TITLES) == set(FAMILIES)


def test_run_without_a_gold_judge_says_so_once_and_prints_no_nan(tmp_path, synth, capsys):
    """A user's own data: no gold reward; a short run (2 iterations: no trend yet) with a fixed KL controller."""
    run = tmp_path / "own_data"
    points = {tag: {k: v for k, v in pts.items() if k < 2} for tag, pts in synth.healthy_points().items()}
    points = {tag: pts for tag, pts in points.items() if pts and "gold" not in tag}
    points["objective/kl_coef_at_bound"] = {0: 0.0, 1: 0.0}
    synth.write_events(run, points, {"kl": {"controller": "fixed", "coef": 0.05}})
    rlhf_main(["diagnose", str(run), "--out", str(tmp_path / "report")])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "nan" not in report.lower() and "None" not in report
    assert report.count("no gold judge for this data") == 2  # the family's verdict, and the one line that says why
    assert "| annotation distribution shift (flawed reward model) | not evaluated (no gold judge for this data) |" in (
        report
    )
    assert ("- no gold judge for this data: gold reward and win rate are not measured, so "
            "`reward_hacking.gold_divergence`, `annotation_shift.length_bias`, "
            "`annotation_shift.proxy_gold_disagreement` (which compare the proxy with the gold reward) were not "
            "evaluated") in report  # fmt: skip
    quiet = report.split("### Quiet")[1].split("###")[0]
    assert "beta_at_bound" not in quiet and "`kl_trouble.beta_at_bound`: not evaluated: kl.controller is fixed" in (
        report
    )
