"""Reading a run's event files: all tags and steps, a resumed run's files merged (later wins), hparams.yaml."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_lightning.diagnose.events import NoEventsError, event_files, read_hparams, read_run


def test_reads_every_point_and_hparams(tmp_path, synth):
    points = synth.healthy_points()
    synth.write_events(tmp_path, points, synth.hparams)
    h = read_run(tmp_path)
    assert set(h.scalars) == set(points)
    kl = h.get("objective/kl")
    assert kl.steps.tolist() == list(range(synth.n))  # no reservoir sampling: every point is kept
    assert np.allclose(kl.values, [points["objective/kl"][i] for i in range(synth.n)], rtol=1e-6)
    assert h.get("eval/gold_reward").steps.tolist() == sorted(points["eval/gold_reward"])
    assert h.hparams == synth.hparams and h.last_step == synth.n - 1


def test_resumed_run_merges_files_later_wins(tmp_path, synth):
    synth.write_events(tmp_path, {"objective/kl": {i: 1.0 for i in range(10)}, "only/first": {0: 5.0}})
    synth.write_events(tmp_path, {"objective/kl": {i: 2.0 for i in range(6, 15)}})  # resumed from iteration 6
    assert len(event_files(tmp_path)) == 2
    h = read_run(tmp_path)
    kl = h.get("objective/kl")
    assert kl.steps.tolist() == list(range(15))
    assert kl.values.tolist() == [1.0] * 6 + [2.0] * 9
    assert h.get("only/first").values.tolist() == [5.0]
    assert h.hparams == {}


def test_python_tags_in_hparams_are_read_as_plain_values(tmp_path):
    (tmp_path / "hparams.yaml").write_text(
        "kl_controller: adaptive\nsampling: !!python/object:rlhf.SamplingConfig\n  temperature: 0.7\n"
    )
    assert read_hparams(tmp_path) == {"kl_controller": "adaptive", "sampling": {"temperature": 0.7}}


def test_a_folder_without_event_files_is_a_clear_error(tmp_path, synth):
    with pytest.raises(NoEventsError, match="no such directory"):
        event_files(tmp_path / "missing")
    nested = tmp_path / "lightning_logs" / "version_0"
    nested.mkdir(parents=True)
    synth.write_events(nested, {"objective/kl": {0: 1.0}})
    with pytest.raises(NoEventsError, match="version_0"):  # names where the event files are
        read_run(tmp_path)
