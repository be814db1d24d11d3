"""The HTML report: self-contained (every picture inline), built from whatever a run folder holds."""

import json
import re

import pytest

from dsrna import DARTS_V2
from dsrna.evaluation.report import _curve_groups, plot_attack_curve, write_report
from dsrna.plots import save_figure


def _run_folder(path):
    log = []
    for epoch in (1, 2, 3):
        alphas = {"normal": [[1 / 8] * 8] * 14, "reduce": [[0.5] + [0.5 / 7] * 7] * 14}
        log.append({"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.1 / epoch, "train_acc": 0.3 * epoch,
                    "robustness": None if epoch == 1 else -0.1 * epoch,  # R warming up in epoch 1
                    "alphas": alphas, "genotype": DARTS_V2.to_dict()})
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"epoch": 4, "train_lo')  # torn line
    (path / "metrics.json").write_text(json.dumps({"test_acc": 0.9, "parameters": 1234}))
    DARTS_V2.to_json(path / "genotype.json")
    attack = dict(norm="linf", eps=[0.0, 0.1], attacks=["fgsm", "pgd"], steps=5, restarts=1, n=4, clean_acc=0.75,
                  robust_acc={"fgsm": [0.75, 0.5], "pgd": [0.75, 0.25]})
    (path / "attack_linf_fgsm-pgd.json").write_text(json.dumps(attack))
    save_figure(plot_attack_curve(attack), path / "attack_linf_fgsm-pgd.png")  # drawn again from the JSON, not duplicated
    (path / "certify_l2_crown.json").write_text(json.dumps(dict(
        norm="l2", method="crown", n=4, radii=[0.0, 0.1, 0.2, 0.4], correct=[False, True, True, True],
        mean_radius=0.175, median_radius=0.1, clean_acc=0.75, eps=[0.1], certified_acc=[0.75])))
    save_figure(plot_attack_curve(attack), path / "extra_picture.png")


def test_report_embeds_everything_the_folder_holds(tmp_path):
    _run_folder(tmp_path)
    attack = json.loads((tmp_path / "attack_linf_fgsm-pgd.json").read_text())
    (tmp_path / "attack_l2_fgsm-pgd.json").write_text(json.dumps({**attack, "norm": "l2"}))  # another norm's evaluation
    with pytest.warns(UserWarning, match=r"log.jsonl: line\(s\) 4 are not JSON records"):  # said, not silent
        page = write_report(tmp_path).read_text()
    for heading in ("Metrics", "Cells", "Training curves", "Architecture weights over epochs", "Robust accuracy",
                    "Certified robustness", "Pictures"):
        assert f"<h2>{heading}</h2>" in page, heading
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # self-contained
    assert "extra_picture.png" in page and "attack_linf_fgsm-pgd.png</figcaption>" not in page
    assert "http://" not in page and "https://" not in page
    # cells (2) + run-log curves (1) + heatmaps (2) + attacks in two norms (2) + certify (2) + gallery (1)
    assert len(sources) == 2 + 1 + 2 + 2 + 2 + 1
    assert "robust accuracy over eps (l2)" in page and "robust accuracy over eps (linf)" in page


def test_log_curves_skip_the_epochs_without_a_value():
    records = [{"epoch": 1, "train_loss": 2.0, "val_loss": None, "robustness": None, "flag": True},
               {"epoch": 2, "train_loss": 1.0, "val_loss": 1.5, "robustness": -0.3, "flag": False}]
    assert _curve_groups(records, "epoch") == {"loss": ["train_loss", "val_loss"], "robustness": ["robustness"]}
    # a combined search's terms share R's panel
    combined = [{**r, "robustness_cb": r["robustness"], "robustness_jacobian": r["robustness"], "entropy_normal": 2.0}
                for r in records]
    assert _curve_groups(combined, "epoch") == {"loss": ["train_loss", "val_loss"],
                                                "robustness": ["robustness", "robustness_cb", "robustness_jacobian"],
                                                "entropy_normal": ["entropy_normal"]}


def test_report_names_an_unreadable_file_it_leaves_out(tmp_path):
    (tmp_path / "metrics.json").write_text('{"test_acc": 0.9,')
    with pytest.warns(UserWarning, match="metrics.json is unreadable"):
        page = write_report(tmp_path).read_text()
    assert "test_acc" not in page


def test_files_of_another_shape_are_left_out_with_a_warning_and_the_rest_is_reported(tmp_path):
    """A JSON file edited by hand (or by another tool) costs its own section, not the whole report,
    which a finished search or training writes last."""
    _run_folder(tmp_path)
    (tmp_path / "attack_l2_fgsm-pgd.json").write_text("{}")
    (tmp_path / "certify_l2_ibp.json").write_text(json.dumps({"norm": "l2"}))
    (tmp_path / "compare.json").write_text("{}")
    (tmp_path / "config.json").write_bytes(b'{"lr": "\xff"}')  # not UTF-8
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('\n{"epoch": 5, "alphas": {"normal": "abc", "reduce": "abc"}}\n')
    with pytest.warns(UserWarning) as caught:
        page = write_report(tmp_path).read_text()
    said = "\n".join(str(w.message) for w in caught)
    for name in ("attack_l2_fgsm-pgd.json", "certify_l2_ibp.json", "compare.json"):
        assert f"{name} does not hold what dsrna writes there" in said, said
    assert "config.json is unreadable" in said and "log.jsonl does not hold what dsrna writes there" in said
    for heading in ("Metrics", "Cells", "Training curves", "Robust accuracy", "Certified robustness", "Pictures"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert "robust accuracy over eps (linf)" in page and "certified radius per image (l2, crown)" in page


def test_report_of_an_empty_or_missing_folder(tmp_path):
    assert "no run outputs" in write_report(tmp_path).read_text()
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def test_report_command(tmp_path, capsys):
    from dsrna.cli import main

    assert main(["report", str(tmp_path)]) == 2  # an empty folder: a mistyped run folder, most likely
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{tmp_path} holds no run outputs (of dsrna search, train, attack, certify or compare): "
                        "nothing to report") and err.count("\n") == 0, err
    assert not (tmp_path / "report.html").exists()
    (tmp_path / "metrics.json").write_text('{"test_acc": 0.5}')
    assert main(["report", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out


def test_pictures_are_written_atomically_with_the_mode_of_any_other_file(tmp_path):
    """Written through a temporary file (mkstemp creates it 0600), a PNG still gets the umask's mode."""
    import os

    import matplotlib.pyplot as plt

    old = os.umask(0o022)
    try:
        path = save_figure(plt.figure(), tmp_path / "picture.png")
    finally:
        os.umask(old)
    assert path.read_bytes()[:4] == b"\x89PNG" and os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]  # no temporary file left behind



def test_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from pathlib import Path

    (tmp_path / "report.html").write_text("old")
    write_text = Path.write_text

    def torn(self, text, *args, **kwargs):  # a disk that fills up half way
        write_text(self, text[:10], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError):
        write_report(tmp_path)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert (tmp_path / "report.html").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_log_with_epochs_on_some_lines_still_gets_its_curves(tmp_path):
    import warnings

    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"train_loss": 0.5}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "<h2>Training curves</h2>" in write_report(tmp_path).read_text()


def _drawn_figures(monkeypatch):
    """The report's figures, kept for inspection instead of being rendered into the page."""
    import matplotlib.pyplot as plt

    import dsrna.evaluation.report

    figures = []

    def keep(fig):
        figures.append(fig)
        plt.close(fig)
        return ""

    monkeypatch.setattr(dsrna.evaluation.report, "_png", keep)
    return figures


def _report_of_run_folder(tmp_path, monkeypatch):
    _run_folder(tmp_path)
    figures = _drawn_figures(monkeypatch)
    with pytest.warns(UserWarning, match="not JSON records"):  # the fixture's torn last line
        write_report(tmp_path)
    return figures


def _figure(figures, ylabel=None, suptitle=None):
    found = [f for f in figures
             if (ylabel is None or f.axes[0].get_ylabel() == ylabel)
             and (suptitle is None or f.get_suptitle() == suptitle)]
    assert len(found) == 1, [f.axes[0].get_ylabel() for f in figures]
    return found[0]


def test_certified_curve_counts_the_correctly_classified_images(tmp_path, monkeypatch):
    """Certified accuracy over eps: of the fixture's 4 images, the misclassified one (radius 0) is never
    certified, so the curve starts at 75% and drops by 25% at each correct radius (0.1, 0.2, 0.4).
    Guards against counting misclassified images and an off-by-one in the steps."""
    figures = _report_of_run_folder(tmp_path, monkeypatch)
    (line,) = _figure(figures, ylabel="certified accuracy (%)").axes[0].lines
    assert list(line.get_xdata()) == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    assert list(line.get_ydata()) == pytest.approx([75.0, 50.0, 25.0, 0.0, 0.0])


def test_attack_curve_draws_clean_and_robust_accuracy_in_percent(tmp_path, monkeypatch):
    """The clean-accuracy line sits on the robust curves' scale (%), not at the fraction 0.75."""
    figures = _report_of_run_folder(tmp_path, monkeypatch)
    clean, fgsm, pgd = _figure(figures, ylabel="robust accuracy (%)").axes[0].lines
    assert list(clean.get_ydata()) == pytest.approx([75.0, 75.0])
    assert list(fgsm.get_xdata()) == pytest.approx([0.0, 0.1]) and list(fgsm.get_ydata()) == pytest.approx([75, 50])
    assert list(pgd.get_xdata()) == pytest.approx([0.0, 0.1]) and list(pgd.get_ydata()) == pytest.approx([75, 25])


def test_accuracy_fields_share_a_panel():
    """Accuracies are drawn together (as losses), not each in a panel of its own."""
    records = [{"epoch": 1, "train_acc": 0.5, "val_acc": 0.4, "test_accuracy": 0.3, "train_loss": 1.0, "lr": 0.1}]
    assert _curve_groups(records, "epoch") == {"accuracy": ["train_acc", "val_acc", "test_accuracy"],
                                               "loss": ["train_loss"], "lr": ["lr"]}


def test_run_log_curves_are_drawn_over_the_epochs(tmp_path, monkeypatch):
    """One panel per group, each curve over the epochs it has a value at (R from epoch 2 on)."""
    figures = _report_of_run_folder(tmp_path, monkeypatch)
    (fig,) = [f for f in figures if f.axes[0].get_title() == "loss"]
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["loss", "accuracy", "robustness"]
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
              for ax in panels.values() for line in ax.lines}
    assert curves["train_loss"] == ([1, 2, 3], pytest.approx([2.0, 1.0, 2 / 3]))
    assert curves["val_loss"] == ([1, 2, 3], pytest.approx([2.1, 1.05, 0.7]))
    assert [line.get_label() for line in panels["accuracy"].lines] == ["train_acc"]
    assert curves["train_acc"] == ([1, 2, 3], pytest.approx([0.3, 0.6, 0.9]))
    assert curves["robustness"] == ([2, 3], pytest.approx([-0.2, -0.3]))


def test_alpha_heatmaps_show_each_cells_own_weights(tmp_path, monkeypatch):
    """The reduction cell's heatmap shows the reduce alphas (0.5 on the first op), not the normal ones."""
    import numpy as np

    figures = _report_of_run_folder(tmp_path, monkeypatch)
    expected = {"normal": [[1 / 8] * 8] * 14, "reduce": [[0.5] + [0.5 / 7] * 7] * 14}
    for kind, table in expected.items():
        fig = _figure(figures, suptitle=f"softmax(alpha), {kind} cell")
        panels = [ax for ax in fig.axes if ax.get_title().startswith("epoch")]
        assert [ax.get_title() for ax in panels] == ["epoch 1", "epoch 2", "epoch 3"]
        for ax in panels:
            np.testing.assert_allclose(ax.images[0].get_array(), table)


def test_a_search_folders_cells_are_embedded_once(tmp_path):
    """A search folder has its own normal.png and reduce.png: the report shows them, and does not draw
    the genotype's cells a second time."""
    from dsrna.plots import plot_cell

    DARTS_V2.to_json(tmp_path / "genotype.json")
    plot_cell(DARTS_V2, False, tmp_path / "normal.png")
    plot_cell(DARTS_V2, True, tmp_path / "reduce.png")
    page = write_report(tmp_path).read_text()
    assert "<h2>Cells</h2>" not in page
    assert re.findall(r"<figcaption>([^<]*)</figcaption>", page) == ["normal.png", "reduce.png"]
    assert page.count("<img ") == 2


@pytest.mark.parametrize("reduction", [False, True])
def test_cell_picture_draws_the_genotypes_edges(monkeypatch, tmp_path, reduction):
    """Each op's arrow starts at its source node and ends at its own intermediate node (edges 2k and
    2k+1 feed node k), labelled with the op, from the cell asked for; every concatenated node feeds
    the output."""
    from matplotlib.text import Annotation

    import dsrna.plots

    drawn = []
    monkeypatch.setattr(dsrna.plots, "save_figure", lambda fig, path: drawn.append(fig) or path)
    dsrna.plots.plot_cell(DARTS_V2, reduction, tmp_path / "cell.png")
    (ax,) = drawn[0].axes
    names = {"$c_{k-2}$": 0, "$c_{k-1}$": 1, "$c_{k}$": "out", "0": 2, "1": 3, "2": 4, "3": 5}
    node_at = {tuple(t.get_position()): names[t.get_text()] for t in ax.texts
               if not isinstance(t, Annotation) and t.get_text() in names}
    assert sorted(map(str, node_at.values())) == sorted(map(str, names.values()))

    def node(xy):
        (hit,) = [n for at, n in node_at.items() if at == pytest.approx(tuple(xy))]
        return hit

    arrows = [(node(a.xyann), node(a.xy)) for a in ax.texts if isinstance(a, Annotation)]
    edges = DARTS_V2.reduce if reduction else DARTS_V2.normal
    concat = DARTS_V2.reduce_concat if reduction else DARTS_V2.normal_concat
    targets = [2, 2, 3, 3, 4, 4, 5, 5]  # two edges into each of the four intermediate nodes, in order
    assert arrows == [(source, target) for (op, source), target in zip(edges, targets)] + [(n, "out") for n in concat]
    labels = [t.get_text() for t in ax.texts if not isinstance(t, Annotation) and t.get_text() not in names]
    assert labels == [op for op, source in edges]
