"""``clipforge report``: the Markdown report and its figures for a short run."""

from __future__ import annotations

from clipforge.cli import main
from clipforge.train import TrainConfig, train


def test_report_of_a_short_run(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(
        model="tiny", data="shapes://?n=64", out=str(run), steps=2, batch_size=8, warmup=1, vocab_size=600,
        save_every=2, log_every=1, eval_samples=16, progress=False,
        eval_zeroshot=["shapes://?split=heldout"], eval_retrieval="shapes://?split=val",
    ))
    assert main(["report", str(run)]) == 0
    assert str(run / "report.md") in capsys.readouterr().out
    text = (run / "report.md").read_text()
    for name in ("curves.png", "similarity.png", "confusion-0.png", "retrieval.png"):
        assert (run / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in text
    assert "text_to_image_R@1" in text and "acc1" in text
