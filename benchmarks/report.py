"""Turn the rows of a run (``bench.jsonl``) into a markdown report and a bar chart of speedups.

The report holds the speedup of every backend over the reference per configuration and metric,
the reference rows next to BASELINE.md's figures when the run was on a GPU with the same model,
and every row in full.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import CHART_FILE, GRAPH_SUFFIX, REPORT_FILE, ROWS_FILE, read_rows

BASELINE_FILE = Path(__file__).resolve().parent / "baseline_h200.json"
BACKEND_ORDER = ("reference", "reference" + GRAPH_SUFFIX, "native", "triton", "auto", "auto" + GRAPH_SUFFIX)
# A reference row this far from BASELINE.md's figure means the harness or the model differs from the
# baseline's: find out why before quoting any speedup.
BASELINE_TOLERANCE = (0.67, 1.5)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _backends(rows: list[dict]) -> list[str]:
    present = {r["backend"] for r in rows}
    return [b for b in BACKEND_ORDER if b in present] + sorted(present.difference(BACKEND_ORDER))


def _groups(rows: list[dict]) -> list[tuple[str, str]]:
    groups: list[tuple[str, str]] = []
    for r in rows:
        if (r["config"], r["metric"]) not in groups:
            groups.append((r["config"], r["metric"]))
    return groups


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def speedups(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """(config, metric, backend) -> reference median / backend median, for rows measured on both."""
    ok = {(r["config"], r["metric"], r["backend"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    return {key: ok[key[:2] + ("reference",)] / ms for key, ms in ok.items()
            if key[2] != "reference" and key[:2] + ("reference",) in ok}


def speedup_table(rows: list[dict]) -> str:
    """Median ms per backend, with the speedup over the reference in parentheses."""
    backends, ratio = _backends(rows), speedups(rows)
    by_key = {(r["config"], r["metric"], r["backend"]): r for r in rows}
    body = []
    for config, metric in _groups(rows):
        cells = [config, metric]
        for backend in backends:
            row = by_key.get((config, metric, backend))
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(row["status"].split(":")[0])
            elif (config, metric, backend) in ratio:
                cells.append(f"{_ms(row['median_ms'])} ({ratio[(config, metric, backend)]:.2f}x)")
            else:
                cells.append(_ms(row["median_ms"]))
        body.append(cells)
    return _table(["config", "metric"] + [f"{b} ms" for b in backends], body)


def load_baseline(path: Path = BASELINE_FILE) -> dict:
    return json.loads(path.read_text())


def baseline_comparison(rows: list[dict], baseline: dict) -> str | None:
    """The reference rows of a GPU run next to BASELINE.md's, or None when no row matches its model."""
    model = baseline["model"]
    ours = {(r["metric"], r["batch"], r["backend"]): r for r in rows
            if r["backend"] in ("reference", "reference+graph") and r["status"] == "ok" and r["device_type"] == "cuda"
            and all(r[k] == v for k, v in model.items())}
    body = []
    for b in baseline["rows"]:
        backend = b.get("backend", "reference")
        row = ours.get((b["metric"], b["batch"], backend))
        if row is None:
            continue
        ratio = row["median_ms"] / b["median_ms"]
        verdict = "near" if BASELINE_TOLERANCE[0] <= ratio <= BASELINE_TOLERANCE[1] else "CHECK: find out why"
        gb = [("" if v is None else f"{v:.2f}") for v in (b["peak_gb"], row.get("peak_mem_gb"))]
        body.append([b["metric"], str(b["batch"]), backend, _ms(b["median_ms"]), _ms(row["median_ms"]), f"{ratio:.2f}",
                     *gb, verdict])
    if not body:
        return None
    devices = sorted({r["device"] for r in ours.values()})
    note = f"Baseline: {baseline['device']}, torch {baseline['torch']} ({baseline['source']}). This run: {', '.join(devices)}."
    if baseline["device"] not in devices:
        note += " Different cards: expect some difference."
    note += (" An eager step waits for the host: where the graph row is near and the eager one is not, the"
             " gap is this host's cost of launching the step's kernels, not GPU work.")
    return note + "\n\n" + _table(
        ["metric", "batch", "ours as", "BASELINE ms", "ours ms", "ratio", "BASELINE GB", "our GB", ""], body)


def rows_table(rows: list[dict]) -> str:
    def num(value, fmt):
        return "" if value is None else fmt.format(value)

    body = [[r["config"], r["metric"], r["backend"], r["status"], num(r.get("median_ms"), "{:.3f}"),
             num(r.get("p20_ms"), "{:.3f}"), num(r.get("p80_ms"), "{:.3f}"), num(r.get("n"), "{}"),
             num(r.get("images_per_s"), "{:.1f}"), num(r.get("peak_mem_gb"), "{:.3f}"), num(r.get("launches"), "{}")]
            for r in rows]
    return _table(["config", "metric", "backend", "status", "median ms", "p20 ms", "p80 ms", "n", "img/s",
                   "peak GB", "kernels"], body)


def _shapes(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        seen.setdefault(r["config"], f"`{r['config']}`: batch {r['batch']}, {r['in_channels']}x{r['image']}x{r['image']}, "
                                     f"C={r['C']}, {r['layers']} cells, {r['num_classes']} classes")
    return "; ".join(seen.values())


def markdown(rows: list[dict], baseline: dict) -> str:
    if not rows:
        return "# dsrna benchmark\n\nNo rows were measured.\n"
    env = rows[0]
    parts = [
        f"# dsrna benchmark on {env['device']}",
        f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, Python {env['python']}, "
        f"dsrna {env['dsrna']} (git {env['git']}), {env['cpu_threads']} CPU threads.",
        f"Configurations: {_shapes(rows)}. Super-network in search (train) mode; `search-*` are "
        "`Searcher.step` (architecture then weight step); `jacobian` is CE - 0.01 R_Jac (one random "
        "Jacobian row per image) and its double backward; bound passes are l_inf at the data set's "
        "default eps; `radius` is full-CROWN bisection on DARTS_V2 (per image: divide by the batch). "
        "`+graph` rows replay the step as one CUDA graph (the search steps as `dsrna search "
        "--cuda-graph` does). Timings are medians with 20th/80th percentiles (CUDA events on a GPU); "
        "peak memory is over the timed steps (for `+graph` rows, since before the capture: a replay "
        "allocates nothing); kernels per step come from torch.profiler.",
        "## Median ms (speedup over the reference)",
        speedup_table(rows),
    ]
    comparison = baseline_comparison(rows, baseline)
    if comparison:
        parts += ["## Reference against BASELINE.md", comparison]
    parts += ["## All rows", rows_table(rows)]
    return "\n\n".join(parts) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    """Grouped bars: speedup over the reference per (config, metric) and backend, log scale."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = speedups(rows)
    groups = [g for g in _groups(rows) if any(k[:2] == g for k in ratio)]
    backends = [b for b in _backends(rows) if any(k[2] == b for k in ratio)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.5))
    if not groups:
        ax.text(0.5, 0.5, "no speedups to plot: no backend measured beside the reference", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            xs = [g + (i - (len(backends) - 1) / 2) * width for g in range(len(groups))]
            ys = [ratio.get(group + (backend,), float("nan")) for group in groups]
            # Bars grow from 1x, so a slowdown points down.
            ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=backend)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        times = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(times)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(groups)), [f"{c}\n{m}" for c, m in groups], fontsize=8)
        ax.set_ylabel("speedup over the reference (x)")
        ax.legend(fontsize=8)
    ax.set_title(f"dsrna benchmark, {rows[0]['device'] if rows else 'no rows'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(out: Path, compare_baseline: bool = False) -> str:
    """Write ``bench.md`` and ``bench.png`` from ``out/bench.jsonl``; return the short text to print
    last: the speedup table, preceded by the BASELINE.md comparison when asked for."""
    rows = read_rows(out / ROWS_FILE)
    baseline = load_baseline()
    (out / REPORT_FILE).write_text(markdown(rows, baseline))
    try:
        chart(rows, out / CHART_FILE)
    except ImportError as exc:  # matplotlib is a dependency, but the table must not depend on it
        print(f"dsrna bench: no chart ({exc})")
    text = speedup_table(rows) if rows else "no rows measured"
    if compare_baseline:
        comparison = baseline_comparison(rows, baseline)
        text = (comparison or "No reference row matches BASELINE.md's model on a GPU: nothing to compare.") + "\n\n" + text
    return text
