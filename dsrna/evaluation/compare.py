"""The paper's comparison: plain DARTS against DSRNA-CB, DSRNA-Jacobian and DSRNA-Combined.

Each method runs the same chain with the same budget, through the Python APIs, in its own folder
``OUT/<method>/``: search (``search/``), final training of the found genotype (``train/``), attacks
and certification of the trained network (``train/attack_<norm>_<attacks>.json``, ``train/certify_<norm>_<method>.json``). The
table (``OUT/compare.md`` and ``OUT/compare.json``) has, per method: clean accuracy, FGSM and PGD
robust accuracy at ``eps`` (``norm``), C&W and AutoAttack l_2 robust accuracy at ``l2_eps`` (when
the optional torchattacks is installed), mean certified radius, search time and parameter count.

Completed stages are recorded in ``OUT/<method>/stages.json`` and skipped when the command is run
again with the same settings, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dsrna.errors import DataError, changed_settings, check_finite
from dsrna.evaluation.common import evaluation_loader, pick_device, result_name, write_json
from dsrna.search.checkpoint import atomic_write_text, check_writable, refuse_existing_run, run_kind

# Method name -> kind of robustness term in the architecture objective (METHOD.md §4).
METHODS = {"darts": "none", "dsrna-cb": "cb", "dsrna-jacobian": "jacobian", "dsrna-combined": "combined"}


@dataclass
class CompareConfig:
    """One budget for every method. ``None`` train settings take the data set's preset."""

    dataset: str = "mnist-mini"
    data_root: str | None = None
    out: str = "runs/compare"
    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    # search
    search_epochs: int = 50
    search_layers: int = 8
    search_channels: int = 16
    search_batch_size: int = 64
    search_order: int = 1
    search_max_steps: int | None = None
    gamma: float = 0.01
    robust_eps: float | None = None  # None: the data set's, R_CB's and R_Jac's apart (as dsrna search)
    robust_norm: str = "linf"
    robust_batch: int | None = None
    # final training
    train_epochs: int | None = None
    train_layers: int | None = None
    train_channels: int | None = None
    train_batch_size: int | None = None
    train_max_steps: int | None = None
    amp: str = "none"
    # evaluation
    norm: str = "linf"
    eps: list[float] = field(default_factory=lambda: [0.1])
    l2_eps: float = 0.5
    extra_attacks: bool = True  # C&W and AutoAttack at l2_eps, where torchattacks is installed
    pgd_steps: int = 100
    certify_norm: str = "l2"
    certify_method: str = "crown"
    certify_max_eps: float | None = None  # None: dsrna.evaluation.certify's default cap
    eval_limit: int | None = 1000
    certify_limit: int | None = 200
    progress: bool = True

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            given = ", ".join(unknown) or "(none given)"
            raise ValueError(f"unknown method(s) {given}; choose from {', '.join(METHODS)}")


def compare(config: CompareConfig) -> dict:
    """Run every method's chain and write the table; returns the ``compare.json`` content."""
    from dsrna.attacks import has_torchattacks, require_torchattacks

    pick_device(config.device)  # a bad --device fails now, not after the first search
    out = Path(config.out)
    _check_settings(config, out)
    if run_kind(out) != "comparison":  # a comparison continues where it stopped; another run stays as it is
        refuse_existing_run(out, "comparison")
    check_writable(out)
    settings = json.loads(json.dumps(dataclasses.asdict(config)))  # as it reads back: tuples become lists
    # What does not change the results (as a search's RESUMABLE fields): a moved folder, data or backend
    for volatile in ("progress", "device", "methods", "out", "data_root", "backend"):
        settings.pop(volatile)
    saved = out / "compare_config.json"
    if saved.is_file():
        differing = changed_settings(_read_json_object(saved), settings)
        if differing:
            raise ValueError(f"{out} holds a comparison run with other settings: {', '.join(differing)}; "
                             "choose another --out")
    write_json(settings, saved)
    extra = config.extra_attacks and has_torchattacks()
    if extra:
        require_torchattacks("C&W and AutoAttack")  # a broken install fails now, not after hours of search
    rows = {}
    for method in config.methods:
        rows[method] = _run_method(method, config, out / method, extra)
        result = dict(dataset=config.dataset, norm=config.norm, eps=config.eps[-1], l2_eps=config.l2_eps,
                      certify_norm=config.certify_norm, certify_method=config.certify_method,
                      torchattacks=extra, extra_attacks=config.extra_attacks, methods=rows)
        write_json(result, out / "compare.json")  # after every method, so partial results are visible
        atomic_write_text(out / "compare.md", compare_markdown(result))
    from dsrna.evaluation.report import write_report

    write_report(out)
    return result


# The stages' own names of their settings (the flags of dsrna search/train/certify and the config
# fields) -> compare's flags for them, for messages in the terms of the command the user ran.
_SEARCH_NAMES = {"epochs": "--search-epochs", "layers": "--search-layers", "init_channels": "--search-channels",
                 "batch_size": "--search-batch-size", "max_steps_per_epoch": "--search-max-steps",
                 "robust_batch": "--robust-batch"}
_TRAIN_NAMES = {"epochs": "--train-epochs", "layers": "--train-layers", "init_channels": "--train-channels",
                "batch_size": "--train-batch-size", "max_steps_per_epoch": "--train-max-steps"}
_TRAIN_NAMES.update({"--" + name.replace("_", "-"): flag for name, flag in _TRAIN_NAMES.items()})
_CERTIFY_NAMES = {"--max-eps": "--certify-max-eps"}


def _in_compare_terms(stage: str, names: dict[str, str], check: Callable[[], object]) -> None:
    """Run ``check``; a ``ValueError`` comes back as ``stage: message`` with the stage's names of its
    settings replaced by compare's flags (compare has no --no-auxiliary: that alternative goes)."""
    try:
        check()
    except ValueError as exc:
        message = str(exc).replace(" or --no-auxiliary", "")
        message = re.sub(r"--[a-z-]+|\b[a-z_]+\b", lambda word: names.get(word.group(), word.group()), message)
        raise ValueError(f"{stage}: {message}") from None


def _check_settings(config: CompareConfig, out: Path) -> None:
    """Refuse, before the first search and before the folder is claimed for these settings, what a
    later stage would refuse: a typo must not cost the searches before it."""
    from dsrna.attacks import NORMS, check_pgd_options
    from dsrna.bounds.engine import METHODS as BOUND_METHODS
    from dsrna.data import get_dataset
    from dsrna.evaluation.certify import bisection_options

    for method in config.methods:
        _in_compare_terms(f"search ({method})", _SEARCH_NAMES, lambda: _search_config(method, config, out / method))
    for train in (True, False):  # a wrong --data-root or layout, before the folder is claimed
        get_dataset(config.dataset, config.data_root, train=train)
    _in_compare_terms("final training", _TRAIN_NAMES,  # with any valid genotype: the searched one comes later
                      lambda: dataclasses.replace(_train_config(config, out), genotype="DARTS_V2").resolved())
    for name, norm in (("--norm", config.norm), ("--certify-norm", config.certify_norm)):
        if norm not in NORMS:
            raise ValueError(f"{name}: unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if config.certify_method not in BOUND_METHODS:
        raise ValueError(f"--certify-method: unknown method {config.certify_method!r}; "
                         f"choose one of {', '.join(BOUND_METHODS)}")
    if not config.eps:
        raise ValueError("--eps: give one or more budgets")
    for eps in config.eps:
        check_finite("--eps", eps)
    check_finite("--l2-eps", config.l2_eps)
    check_pgd_options(config.pgd_steps, 1)
    for name, limit in (("--eval-limit", config.eval_limit), ("--certify-limit", config.certify_limit)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1, got {limit}")
    _in_compare_terms("certification", _CERTIFY_NAMES, lambda: bisection_options(config.certify_max_eps, None, None))


def _train_config(config: CompareConfig, method_folder: Path):
    from dsrna.evaluation.train import TrainConfig

    return TrainConfig(genotype=str(method_folder / "search" / "genotype.json"), dataset=config.dataset,
                       data_root=config.data_root, out=str(method_folder / "train"), epochs=config.train_epochs,
                       batch_size=config.train_batch_size, layers=config.train_layers,
                       init_channels=config.train_channels, max_steps_per_epoch=config.train_max_steps,
                       amp=config.amp, seed=config.seed, device=config.device, eval_limit=config.eval_limit,
                       progress=config.progress, report=False,
                       # a stage cut off by an interruption continues from its checkpoint
                       resume=(method_folder / "train" / "checkpoint.pt").exists())


def _read_json_object(path: Path) -> dict:
    """A JSON object this command wrote, or a one-line error naming the file (torn or edited by hand)."""
    try:
        value = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path} is not valid JSON ({exc}): delete it to redo what it records") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} holds a {type(value).__name__}, not the JSON object dsrna compare writes: "
                        "delete it to redo what it records")
    return value


def _stages(folder: Path) -> dict:
    path = folder / "stages.json"
    return _read_json_object(path) if path.is_file() else {}


def _done(folder: Path, stages: dict, name: str, value) -> None:
    stages[name] = value
    write_json(stages, folder / "stages.json")


def _run_method(method: str, config: CompareConfig, folder: Path, extra: bool) -> dict:
    from dsrna.evaluation.attack import evaluate_attacks
    from dsrna.evaluation.certify import certify
    from dsrna.evaluation.train import load_model, train

    folder.mkdir(parents=True, exist_ok=True)
    stages = _stages(folder)
    if "search" not in stages:
        _done(folder, stages, "search", _search(method, config, folder / "search"))
    if "train" not in stages:
        train(_train_config(config, folder))
        _done(folder, stages, "train", True)
    device = pick_device(config.device)
    model, meta = load_model(folder / "train" / "model.pt", device)
    num_classes = meta["model_config"]["num_classes"]
    if "attack" not in stages:
        loader = evaluation_loader(config.dataset, config.data_root, config.eval_limit)
        linf = evaluate_attacks(model, loader, config.eps, ("fgsm", "pgd"), config.norm, steps=config.pgd_steps,
                                num_classes=num_classes, device=device, progress=config.progress)
        write_json(linf, folder / "train" / f"{result_name('attack', config.norm, ('fgsm', 'pgd'))}.json")
        l2 = None
        if extra:
            l2 = evaluate_attacks(model, loader, [config.l2_eps], ("cw", "autoattack"), "l2",
                                  num_classes=num_classes, device=device, progress=config.progress)
            write_json(l2, folder / "train" / f"{result_name('attack', 'l2', ('cw', 'autoattack'))}.json")
        _done(folder, stages, "attack", dict(clean_acc=linf["clean_acc"],
                                             fgsm=linf["robust_acc"]["fgsm"][-1], pgd=linf["robust_acc"]["pgd"][-1],
                                             cw=l2["robust_acc"]["cw"][0] if l2 else None,
                                             autoattack=l2["robust_acc"]["autoattack"][0] if l2 else None))
    if "certify" not in stages:
        loader = evaluation_loader(config.dataset, config.data_root, config.certify_limit, batch_size=32)
        result = certify(model, loader, config.certify_norm, config.certify_method, max_eps=config.certify_max_eps,
                         device=device, progress=config.progress)
        write_json(result, folder / "train" / f"{result_name('certify', config.certify_norm, config.certify_method)}.json")
        _done(folder, stages, "certify", {key: result[key] for key in ("mean_radius", "median_radius", "n", "at_max_eps",
                                                                       "max_eps")})
    from dsrna.evaluation.report import write_report
    from dsrna.space import count_parameters

    write_report(folder / "train")
    return dict(**stages["attack"], **stages["certify"], search_time_s=stages["search"]["time_s"],
                parameters=count_parameters(model), genotype=meta["genotype"])


def _search_config(method: str, config: CompareConfig, folder: Path):
    from dsrna.robustness import RobustnessConfig
    from dsrna.search import SearchConfig

    kind = METHODS[method]
    # plain DARTS has no robustness term: its settings would be refused as unused
    robustness = RobustnessConfig(kind=kind, dataset=config.dataset) if kind == "none" else RobustnessConfig(
        kind=kind, gamma=config.gamma, eps=config.robust_eps, norm=config.robust_norm,
        robust_batch=config.robust_batch, dataset=config.dataset)
    return SearchConfig(dataset=config.dataset, data_root=config.data_root, epochs=config.search_epochs,
                        batch_size=config.search_batch_size, layers=config.search_layers,
                        init_channels=config.search_channels, order=config.search_order, robustness=robustness,
                        seed=config.seed, backend=config.backend, device=config.device, out=str(folder),
                        max_steps_per_epoch=config.search_max_steps, progress=config.progress,
                        resume=(folder / "checkpoint.pt").exists())


def _search(method: str, config: CompareConfig, folder: Path) -> dict:
    from dsrna.search import run_search

    result = run_search(_search_config(method, config, folder))
    # The epochs' own times, summed over the history: a resumed search counts its earlier sessions too.
    return dict(time_s=sum(record["time_s"] for record in result.history))


COLUMNS = ("method", "clean", "FGSM", "PGD", "C&W", "AutoAttack", "mean cert. radius", "search time", "params")


def compare_table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (accuracies in %)."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}"

    head = list(COLUMNS)
    head[2] = f"FGSM {result['norm']} {result['eps']:g}"
    head[3] = f"PGD {result['norm']} {result['eps']:g}"
    head[4] = f"C&W l2 {result['l2_eps']:g}"
    head[5] = f"AutoAttack l2 {result['l2_eps']:g}"
    head[6] = f"mean cert. radius ({result['certify_norm']}, {result['certify_method']})"
    rows = [[method, pct(r["clean_acc"]), pct(r["fgsm"]), pct(r["pgd"]), pct(r["cw"]), pct(r["autoattack"]),
             _radius(r), _duration(r["search_time_s"]), f"{r['parameters'] / 1e6:.3f}M"]
            for method, r in result["methods"].items()]
    return head, rows


def _radius(row: dict) -> str:
    """The mean radius, and how many radii stopped at the bisection's cap (the mean is then a lower
    bound of the true mean: raise --certify-max-eps)."""
    text = f"{row['mean_radius']:.4g}"
    if row.get("at_max_eps"):
        text += f" ({row['at_max_eps']} of {row['n']} at the cap {row['max_eps']:g})"
    return text


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def compare_markdown(result: dict) -> str:
    head, rows = compare_table_rows(result)
    lines = [f"# DARTS vs DSRNA on {result['dataset']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if not result.get("extra_attacks", True):
        lines += ["", "C&W and AutoAttack were skipped (--no-extra-attacks)."]
    elif not result["torchattacks"]:
        lines += ["", "C&W and AutoAttack need the optional extra: pip install 'dsrna[attacks]'"]
    return "\n".join(lines) + "\n"
