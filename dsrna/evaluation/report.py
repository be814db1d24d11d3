"""One self-contained HTML page per run folder: everything the folder holds, pictures embedded.

:func:`write_report` reads what a search, train, attack, certify or compare run left in a folder and
writes ``report.html`` beside it, with every picture inline as a base64 PNG (the page can be mailed
or archived alone):

- ``metrics.json`` / ``config.json``: key-value tables;
- ``compare.json``: the comparison table;
- ``genotype.json``: the normal and reduction cells (drawn here unless the folder has them);
- ``log.jsonl``: curves of every numeric field over epochs (losses, accuracies, robustness term...)
  and, when lines carry the softmax of the architecture parameters, heatmaps of them over epochs;
- ``attack_<norm>_<attacks>.json`` / ``certify_<norm>_<method>.json`` (each evaluation's own file; also the
  ``attack.json`` / ``certify.json`` of older runs): robust-accuracy curves, the radius histogram and
  the certified-accuracy curve;
- any other PNG in the folder (e.g. the search's cell pictures and its latest alpha heatmap).

The plotting functions here are also what ``dsrna attack`` and ``dsrna certify`` save as PNG.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsrna.errors import DsrnaError  # noqa: E402
from dsrna.search.checkpoint import atomic_write_text, check_writable  # noqa: E402

# The evaluations' files; their PNGs are drawn here again from the JSON, so the gallery leaves them out.
EVALUATION_PREFIXES = ("attack", "certify")


def plot_attack_curve(result: dict):
    """Robust accuracy over eps, one line per attack (from :func:`evaluate_attacks`)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhline(100 * result["clean_acc"], color="gray", linestyle=":", label="clean")
    for attack in result["attacks"]:
        ax.plot(result["eps"], [100 * a for a in result["robust_acc"][attack]], marker="o", label=attack)
    ax.set_xlabel(f"eps ({result['norm']})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_radius_histogram(result: dict):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(result["radii"], bins=30, color="tab:blue")
    ax.axvline(result["mean_radius"], color="tab:red", linestyle="--", label=f"mean {result['mean_radius']:.3g}")
    ax.set_xlabel(f"certified radius ({result['norm']}, {result['method']})")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_certified_curve(result: dict):
    """Certified accuracy as a step function of eps, from the per-image radii."""
    radii = sorted(r for r, ok in zip(result["radii"], result["correct"]) if ok)
    n = max(result["n"], 1)
    top = max(radii + list(result["eps"]) + [1e-6])
    xs = [0.0] + radii + [top]
    ys = [100 * len(radii) / n] + [100 * (len(radii) - i - 1) / n for i in range(len(radii))] + [0.0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.step(xs, ys, where="post")
    ax.set_xlabel(f"eps ({result['norm']})")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, caption: str) -> str:
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[list], head: list[str] | None = None) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else ""
    return f"<table>{header}{cells}</table>"


def _read_json(path: Path):
    """The file's JSON; None if it is absent, or unreadable (said in a warning: the report leaves it out)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        warnings.warn(f"{path} is unreadable ({type(exc).__name__}): left out of the report")
        return None


def _read_log(path: Path) -> list[dict]:
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):  # bad bytes: a torn line
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(number)
    if torn:
        warnings.warn(f"{path}: line(s) {', '.join(map(str, torn))} are not JSON records: left out of the report")
    return records


def _curve_groups(records: list[dict], x_key: str | None) -> dict[str, list[str]]:
    """The numeric fields of the log by panel: losses together, accuracies together, R with its terms
    (a combined search's R_CB and R_Jac), each other field alone. None marks an epoch without the value
    (R in its warm-up, val_loss before the architecture starts): the curve skips it."""
    present = {k: [r[k] for r in records if r.get(k) is not None] for k in dict.fromkeys(k for r in records for k in r)}
    groups: dict[str, list[str]] = {}
    for key, values in present.items():
        if key == x_key or not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        group = ("loss" if "loss" in key else "accuracy" if key.endswith("acc") or "accuracy" in key
                 else "robustness" if key.startswith("robustness") else key)
        groups.setdefault(group, []).append(key)
    return groups


def _curves(records: list[dict]) -> list[str]:
    """One figure, one panel per group of numeric fields (:func:`_curve_groups`), drawn at once: a
    figure per panel would cost a render each."""
    x_key = "epoch" if all("epoch" in r for r in records) else None
    xs = [r["epoch"] for r in records] if x_key else list(range(1, len(records) + 1))
    groups = _curve_groups(records, x_key)
    if not groups:
        return []
    columns = min(3, len(groups))
    rows = -(-len(groups) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), squeeze=False)
    for ax, (group, keys) in zip(axes.flat, groups.items()):
        for key in keys:
            points = [(x, r[key]) for x, r in zip(xs, records) if r.get(key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None, label=key)
        ax.set_title(group, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(x_key or "record")
    fig.tight_layout()
    return [_img(_png(fig), f"run log over {x_key or 'records'}s")]


def _alpha_heatmaps(records: list[dict]) -> list[str]:
    """Heatmaps of softmax(alpha) per cell type at a few epochs, when the log lines carry them
    (``{"alphas": {"normal": [[...]], "reduce": [[...]]}}``: rows are edges, columns ops)."""
    from dsrna.space import PRIMITIVES

    carrying = [r for r in records if isinstance(r.get("alphas"), dict)]
    if not carrying:
        return []
    picks = sorted({0, len(carrying) // 2, len(carrying) - 1})
    figures = []
    for kind in ("normal", "reduce"):
        if not all(kind in carrying[i]["alphas"] for i in picks):
            continue
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 4), squeeze=False)
        for ax, i in zip(axes[0], picks):
            weights = carrying[i]["alphas"][kind]
            image = ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0)
            ax.set_title(f"epoch {carrying[i].get('epoch', i + 1)}")
            ax.set_xticks(range(len(PRIMITIVES)))
            ax.set_xticklabels(PRIMITIVES, rotation=90, fontsize=7)
            ax.set_ylabel("edge")
            fig.colorbar(image, ax=ax, fraction=0.05)
        fig.suptitle(f"softmax(alpha), {kind} cell")
        fig.tight_layout()
        figures.append(_img(_png(fig), f"architecture weights of the {kind} cell over epochs"))
    return figures


def _cell_pictures(genotype_path: Path) -> list[str]:
    """The two cells drawn by :func:`dsrna.plots.plot_cell` (a run folder without its own pictures)."""
    from dsrna.plots import plot_cell
    from dsrna.space import Genotype

    try:
        genotype = Genotype.from_json(genotype_path)
    except ValueError as exc:
        return [f"<p>{html.escape(str(exc))}</p>"]
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for reduction, kind in ((False, "normal"), (True, "reduction")):
            path = plot_cell(genotype, reduction, Path(tmp) / f"{kind}.png", f"{kind} cell")
            figures.append(_img(base64.b64encode(Path(path).read_bytes()).decode(), f"{kind} cell"))
    return figures


def _compare_section(result: dict) -> str:
    from dsrna.evaluation.compare import compare_table_rows

    head, rows = compare_table_rows(result)
    return _table(rows, head)


def _built(source: Path, build: Callable[[], list[str]]) -> list[str]:
    """``build()``, or nothing (said in a warning) when ``source`` does not hold what dsrna writes there,
    e.g. a file edited by hand: one odd file must not cost the whole report."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        plt.close("all")  # a figure the failed part had opened
        warnings.warn(f"{source} does not hold what dsrna writes there ({type(exc).__name__}: {exc}): "
                      "left out of the report")
        return []


def write_report(run_dir: str | Path, require_outputs: bool = False) -> Path:
    """Write ``run_dir/report.html`` from whatever the folder holds; returns its path. A folder with no
    run outputs gets a page saying so, or with ``require_outputs`` a one-line error and no page."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    check_writable(run_dir, "make the folder writable")  # before drawing every picture
    sections: list[tuple[str, list[str]]] = []
    compare = _read_json(run_dir / "compare.json")
    if isinstance(compare, dict):
        sections.append(("Comparison", _built(run_dir / "compare.json", lambda: [_compare_section(compare)])))
    for name, title in (("metrics.json", "Metrics"), ("config.json", "Configuration")):
        data = _read_json(run_dir / name)
        if isinstance(data, dict):
            sections.append((title, [_table([[k, json.dumps(v) if isinstance(v, (list, dict)) else v]
                                             for k, v in data.items()])]))
    # A search folder has its own cell pictures (normal.png, reduce.png): they come with the gallery.
    if (run_dir / "genotype.json").is_file() and not (run_dir / "normal.png").is_file():
        sections.append(("Cells", _cell_pictures(run_dir / "genotype.json")))
    log = run_dir / "log.jsonl"
    if log.is_file():
        records = _read_log(log)
        if records:
            sections.append(("Training curves", _built(log, lambda: _curves(records))))
            sections.append(("Architecture weights over epochs", _built(log, lambda: _alpha_heatmaps(records))))
    from dsrna.evaluation.attack import attack_table
    from dsrna.evaluation.certify import certify_table

    def attack_parts(a):
        return [_img(_png(plot_attack_curve(a)), f"robust accuracy over eps ({a['norm']})"),
                f"<pre>{html.escape(attack_table(a))}</pre>"]

    def certify_parts(c):
        what = f"({c['norm']}, {c['method']})"
        return [_img(_png(plot_certified_curve(c)), f"certified accuracy over eps {what}"),
                _img(_png(plot_radius_histogram(c)), f"certified radius per image {what}"),
                f"<pre>{html.escape(certify_table(c))}</pre>"]

    for title, pattern, parts in (("Robust accuracy", "attack*.json", attack_parts),
                                  ("Certified robustness", "certify*.json", certify_parts)):
        sections.append((title, [part for path in sorted(run_dir.glob(pattern))
                                 if isinstance(data := _read_json(path), dict)
                                 for part in _built(path, lambda: parts(data))]))
    gallery = [p for p in sorted(run_dir.glob("*.png")) if not p.name.startswith(EVALUATION_PREFIXES)]
    if gallery:
        sections.append(("Pictures", [_img(base64.b64encode(p.read_bytes()).decode(), p.name) for p in gallery]))

    body = "".join(f"<h2>{html.escape(title)}</h2>" + "".join(parts) for title, parts in sections if parts)
    if not body:
        if require_outputs:
            raise DsrnaError(f"{run_dir} holds no run outputs (of dsrna search, train, attack, certify or compare): "
                             "nothing to report")
        body = "<p>This folder holds no run outputs yet.</p>"
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>dsrna report: {html.escape(run_dir.name)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "figure{display:inline-block;margin:0.5em}img{max-width:100%}figcaption{font-size:0.85em;color:#555}"
        f"</style></head><body><h1>dsrna report: {html.escape(str(run_dir))}</h1>{body}</body></html>\n"
    )
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
