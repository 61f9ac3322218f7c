"""metrics.jsonl: appended per step, read back, and cut back on resume without overlap."""

from gflows.training.records import log_metrics, read_metrics, truncate_metrics


def test_log_read_truncate(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    truncate_metrics(path, 3)  # nothing to cut
    for step in range(1, 6):
        log_metrics(path, {"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    log_metrics(path, {"step": 4, "loss": 0.0})
    assert [r["loss"] for r in read_metrics(path)] == [1.0, 0.5, 1.0 / 3, 0.0]
    assert not (tmp_path / "metrics.tmp").exists()
