"""The whole chain on mnist-mini with tiny settings: search, train, attack, certify, report, and
the comparison of DARTS against a DSRNA variant through `dsrna compare`."""

import json

import pytest
import torch
from conftest import refuse_new_files

from dsrna.cli import main
from dsrna.evaluation.compare import compare_markdown

TINY_SEARCH = ["--dataset", "mnist-mini", "--epochs", "1", "--batch-size", "8", "--layers", "3",
               "--init-channels", "4", "--max-steps-per-epoch", "2", "--no-progress"]


def test_search_train_attack_certify_report(tmp_path, capsys):
    search, train = tmp_path / "search", tmp_path / "train"
    assert main(["search", *TINY_SEARCH, "--out", str(search)]) == 0
    assert (search / "genotype.json").is_file()
    assert main(["train", str(search / "genotype.json"), "--layers", "3", "--init-channels", "4", "--epochs", "1",
                 "--batch-size", "16", "--max-steps-per-epoch", "3", "--eval-limit", "16", "--out", str(train),
                 "--no-progress"]) == 0
    assert (train / "report.html").is_file()
    model = str(train / "model.pt")
    assert main(["attack", model, "--eps", "0.05,0.1", "--attacks", "fgsm,pgd", "--steps", "3", "--limit", "8",
                 "--no-progress"]) == 0
    attack = json.loads((train / "attack_linf_fgsm-pgd.json").read_text())
    assert attack["n"] == 8 and set(attack["robust_acc"]) == {"fgsm", "pgd"}
    assert all(0 <= a <= attack["clean_acc"] for accs in attack["robust_acc"].values() for a in accs)
    assert (train / "attack_linf_fgsm-pgd.png").is_file()
    assert main(["certify", model, "--norm", "l2", "--method", "ibp", "--eps", "0.01", "--limit", "4",
                 "--max-eps", "1", "--tol", "0.01", "--no-progress"]) == 0
    certify = json.loads((train / "certify_l2_ibp.json").read_text())
    assert certify["n"] == 4 and len(certify["radii"]) == 4
    assert (train / "certify_l2_ibp_hist.png").is_file() and (train / "certify_l2_ibp_curve.png").is_file()
    out = capsys.readouterr().out
    assert "pgd" in out and "certified radius" in out
    assert main(["report", str(train)]) == 0
    page = (train / "report.html").read_text()
    assert "Robust accuracy" in page and "Certified robustness" in page and "Training curves" in page
    assert main(["report", str(search)]) == 0


def test_compare_writes_the_table(tmp_path, capsys):
    out = tmp_path / "compare"
    # --robust-batch goes to the DSRNA searches only (plain DARTS has no robustness term to cut)
    argv = ["compare", "--methods", "darts,dsrna-jacobian", "--out", str(out), "--search-epochs", "2", "--robust-batch", "4",
            "--search-layers", "3", "--search-channels", "4", "--search-batch-size", "8", "--search-max-steps", "1",
            "--train-epochs", "1", "--train-layers", "3", "--train-channels", "4", "--train-batch-size", "16",
            "--train-max-steps", "1", "--eps", "0.05,0.1", "--pgd-steps", "2", "--eval-limit", "8",
            "--certify-method", "ibp", "--certify-limit", "4", "--certify-max-eps", "0.5", "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["methods"]) == ["darts", "dsrna-jacobian"]
    for row in result["methods"].values():
        assert 0 <= row["pgd"] <= row["clean_acc"] and 0 <= row["fgsm"] <= row["clean_acc"]
        assert row["parameters"] > 0 and row["search_time_s"] > 0 and row["mean_radius"] >= 0
    for method, row in result["methods"].items():  # the search's time is that of all its epochs
        epochs = [json.loads(line) for line in (out / method / "search" / "log.jsonl").read_text().splitlines()]
        epochs = [e["time_s"] for e in epochs if "time_s" in e]
        assert len(epochs) == 2 and row["search_time_s"] == pytest.approx(sum(epochs))
    table = (out / "compare.md").read_text()
    assert "| darts |" in table and "| dsrna-jacobian |" in table
    assert "FGSM linf 0.1 | PGD linf 0.1 |" in table  # the table's robust accuracies are at the last --eps
    attack = json.loads((out / "darts" / "train" / "attack_linf_fgsm-pgd.json").read_text())
    assert result["methods"]["darts"]["pgd"] == attack["robust_acc"]["pgd"][-1]
    assert (out / "report.html").is_file() and "<h2>Comparison</h2>" in (out / "report.html").read_text()
    assert (out / "darts" / "train" / "attack_linf_fgsm-pgd.json").is_file()  # C&W/AutoAttack get their own file
    stages = json.loads((out / "darts" / "stages.json").read_text())
    assert set(stages) == {"search", "train", "attack", "certify"}  # what a second run would skip
    assert stages["certify"]["max_eps"] == 0.5 and stages["certify"]["n"] == 4
    assert main([*argv, "--pgd-steps", "3"]) == 2  # the same folder with other settings is refused
    assert "other settings: pgd_steps=2 (now 3); choose another --out" in capsys.readouterr().err
    assert main([*argv, "--seed", "1"]) == 2  # another seed is another search
    assert "other settings: seed=0 (now 1)" in capsys.readouterr().err
    # a setting one method's search refuses fails before any method runs or the folder is claimed
    fresh = tmp_path / "fresh"
    assert main([*argv[:4], str(fresh), *argv[5:], "--robust-batch", "100"]) == 2
    assert "search (dsrna-jacobian): --robust-batch (100) is larger than the validation batch (--search-batch-size 8)" \
        in capsys.readouterr().err and not fresh.exists()
    # settings that do not change the results may differ on a rerun: the folder's spelling, the backend
    assert main([*argv[:4], str(out) + "/", *argv[5:], "--backend", "reference"]) == 0


def test_attack_and_certify_check_their_inputs_before_any_work(tmp_path, capsys, monkeypatch):
    import dsrna.evaluation.attack
    import dsrna.evaluation.certify
    import dsrna.evaluation.compare

    train = tmp_path / "train"
    assert main(["train", "--layers", "3", "--init-channels", "4", "--epochs", "1", "--batch-size", "16",
                 "--max-steps-per-epoch", "1", "--eval-limit", "8", "--out", str(train), "--no-progress"]) == 0
    capsys.readouterr()
    model = str(train / "model.pt")
    worked = []
    monkeypatch.setattr(dsrna.evaluation.attack, "run_attack", lambda *a, **k: worked.append(1))
    monkeypatch.setattr(dsrna.evaluation.certify, "evaluation_pass", lambda *a, **k: worked.append(1))
    # compare's cases use its default (paper) settings: a setting let through must fail here, not search for hours
    monkeypatch.setattr(dsrna.evaluation.compare, "_run_method", lambda *a, **k: worked.append(1) or 1 / 0)
    attack, certify = ["attack", model, "--limit", "4", "--no-progress"], ["certify", model, "--limit", "4", "--no-progress"]
    for argv, expected in (
        ([*attack, "--eps", "inf"], "--eps: expected one or more finite numbers"),
        ([*attack, "--eps", "0.1", "--dataset", "cifar10"],
         "the model expects 1 input channels but the data set cifar10 has 3"),
        ([*attack, "--eps", "0.1", "--device", "bogus"], "--device 'bogus' is not a device"),
        ([*certify, "--max-eps", "inf"], "--max-eps must be a finite number > 0"),
        ([*certify, "--tol", "1"], "--tol 1 is not below the largest radius tried (--max-eps 1)"),
        ([*certify, "--dataset", "cifar10"], "the model expects 1 input channels"),
        ([*certify, "--device", "cuda:x"], "is not a device"),
        (["compare", "--device", "bogus", "--out", str(tmp_path / "compare")], "--device 'bogus' is not a device"),
        # compare refuses what its training, attack or certify stage would refuse before its first search
        (["compare", "--train-layers", "2", "--out", str(tmp_path / "compare")],
         "final training: the auxiliary head sits after the second reduction cell: use --train-layers >= 3"),
        (["compare", "--pgd-steps", "0", "--out", str(tmp_path / "compare")], "steps and restarts must be >= 1"),
        (["compare", "--l2-eps", "-1", "--out", str(tmp_path / "compare")], "--l2-eps must be a finite number >= 0"),
        (["compare", "--certify-limit", "0", "--out", str(tmp_path / "compare")], "--certify-limit must be >= 1"),
        (["compare", "--certify-max-eps", "nan", "--out", str(tmp_path / "compare")],
         "certification: --certify-max-eps must be a finite number > 0"),
        (["compare", "--certify-max-eps", "5e-5", "--out", str(tmp_path / "compare")],
         "certification: --tol 0.0001 is not below the largest radius tried (--certify-max-eps 5e-05)"),
        (["compare", "--search-layers", "2", "--out", str(tmp_path / "compare")],
         "search (darts): --search-layers must be >= 3, got 2"),
        (["compare", "--train-max-steps", "0", "--out", str(tmp_path / "compare")],
         "final training: --train-max-steps must be >= 1"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, err
    assert main(["compare", "--train-batch-size", "1", "--out", str(tmp_path / "compare")]) == 2
    assert capsys.readouterr().err.strip().endswith("use --train-batch-size >= 2")  # compare has no --no-auxiliary
    assert not (tmp_path / "compare").exists()

    # A model file that does not say which data set it was trained on needs --dataset.
    meta = torch.load(model, weights_only=True)
    del meta["dataset"]
    torch.save(meta, tmp_path / "no-dataset.pt")
    for command in (["attack", "--eps", "0.1"], ["certify"]):
        assert main([*command, str(tmp_path / "no-dataset.pt"), "--limit", "4", "--no-progress"]) == 2
        assert "does not record the data set it was trained on: pass --dataset" in capsys.readouterr().err

    # An output folder that cannot be written is found before the attack, not after it.
    refuse_new_files(monkeypatch)
    for argv in ([*attack, "--eps", "0.1", "--out", str(tmp_path / "out")], [*certify, "--out", str(tmp_path / "out")],
                 ["report", str(train)]):
        assert main(argv) == 2
        assert "cannot write in" in capsys.readouterr().err
    # --out naming a file
    assert main([*attack, "--eps", "0.1", "--out", str(model)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{model} is a file, not a folder: choose another --out")
    assert worked == []


def test_results_table_is_printed_even_when_writing_fails(tmp_path, capsys, monkeypatch):
    import dsrna.evaluation.common

    train = tmp_path / "train"
    assert main(["train", "--layers", "3", "--init-channels", "4", "--epochs", "1", "--batch-size", "16",
                 "--max-steps-per-epoch", "1", "--eval-limit", "8", "--out", str(train), "--no-progress"]) == 0
    capsys.readouterr()

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dsrna.evaluation.common, "write_json", full_disk)
    assert main(["attack", str(train / "model.pt"), "--eps", "0.1", "--attacks", "fgsm", "--limit", "4",
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "| eps (linf) | fgsm |" in captured.out and "No space left" in captured.err
    assert main(["certify", str(train / "model.pt"), "--method", "ibp", "--limit", "2", "--max-eps", "1",
                 "--tol", "0.1", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "certified radius (linf, ibp)" in captured.out and "No space left" in captured.err


def test_compare_without_the_extra_attacks(tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--methods", "darts", "--out", str(out), "--search-epochs", "1", "--search-layers", "3",
                 "--search-channels", "4", "--search-batch-size", "8", "--search-max-steps", "1", "--train-epochs", "1",
                 "--train-layers", "3", "--train-channels", "4", "--train-batch-size", "16", "--train-max-steps", "1",
                 "--pgd-steps", "2", "--eval-limit", "8", "--certify-method", "ibp", "--certify-limit", "2",
                 "--certify-max-eps", "0.5", "--no-extra-attacks", "--no-progress"]) == 0
    row = json.loads((out / "compare.json").read_text())["methods"]["darts"]
    assert row["cw"] is None and row["autoattack"] is None
    assert [f.name for f in (out / "darts" / "train").glob("attack_*.json")] == ["attack_linf_fgsm-pgd.json"]
    assert "C&W and AutoAttack were skipped (--no-extra-attacks)." in (out / "compare.md").read_text()


def test_compare_table_says_when_radii_reached_the_cap():
    """A mean over radii cut at --certify-max-eps understates the true mean: the table says how many."""
    row = dict(clean_acc=0.9, fgsm=0.5, pgd=0.4, cw=None, autoattack=None, mean_radius=0.6671, search_time_s=30,
               parameters=123_000)
    result = dict(dataset="mnist", norm="linf", eps=0.1, l2_eps=0.5, certify_norm="l1", certify_method="crown",
                  torchattacks=False, methods={"darts": dict(row, n=32, at_max_eps=18, max_eps=1.0),
                                               "dsrna-cb": dict(row, n=32, at_max_eps=0, max_eps=1.0),
                                               "older-run": row})
    table = compare_markdown(result)
    assert "| darts | 90.00 | 50.00 | 40.00 | n/a | n/a | 0.6671 (18 of 32 at the cap 1) |" in table
    assert "| dsrna-cb | 90.00 | 50.00 | 40.00 | n/a | n/a | 0.6671 |" in table
    assert "| older-run | 90.00 | 50.00 | 40.00 | n/a | n/a | 0.6671 |" in table


def test_compare_needs_a_method(tmp_path, capsys):
    assert main(["compare", "--methods", ",", "--out", str(tmp_path / "none")]) == 2
    assert "unknown method(s) (none given)" in capsys.readouterr().err and not (tmp_path / "none").exists()


@pytest.mark.parametrize("kind,marker", [("search", "alphas.png"), ("training", "model.pt")])
def test_compare_refuses_a_folder_holding_another_run(tmp_path, capsys, kind, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).write_bytes(b"")
    assert main(["compare", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"already holds a {kind} run: choose another --out") and err.count("\n") == 0, err
    assert sorted(p.name for p in out.iterdir()) == [marker]


def test_compare_table_rows_put_each_figure_in_its_column():
    """Every figure of a row is distinct, so a swapped column (C&W and AutoAttack), a duration in the
    wrong unit or a parameter count at the wrong scale shows in the row."""
    from dsrna.evaluation.compare import compare_table_rows

    row = dict(clean_acc=0.9, fgsm=0.6, pgd=0.5, cw=0.4, autoattack=0.3, mean_radius=0.25, search_time_s=600,
               parameters=123_000, n=4, at_max_eps=0, max_eps=1.0)
    result = dict(dataset="mnist", norm="l2", eps=1.0, l2_eps=0.5, certify_norm="l1", certify_method="ibp",
                  torchattacks=True, methods={"darts": row, "dsrna-cb": dict(row, search_time_s=30)})
    head, rows = compare_table_rows(result)
    assert head == ["method", "clean", "FGSM l2 1", "PGD l2 1", "C&W l2 0.5", "AutoAttack l2 0.5",
                    "mean cert. radius (l1, ibp)", "search time", "params"]
    assert rows == [["darts", "90.00", "60.00", "50.00", "40.00", "30.00", "0.25", "10.0 min", "0.123M"],
                    ["dsrna-cb", "90.00", "60.00", "50.00", "40.00", "30.00", "0.25", "30 s", "0.123M"]]


def test_search_time_is_shown_in_seconds_minutes_or_hours():
    """Guards the unit conversions of the table's search time (60 s a minute, 3600 s an hour)."""
    from dsrna.evaluation.compare import _duration

    assert _duration(30) == "30 s" and _duration(119) == "119 s"
    assert _duration(120) == "2.0 min" and _duration(600) == "10.0 min" and _duration(7199) == "120.0 min"
    assert _duration(7200) == "2.0 h" and _duration(9000) == "2.5 h"


def test_compare_command_defaults_are_compare_configs(monkeypatch):
    """`dsrna compare` without options runs CompareConfig's defaults (the paper's settings): a flag
    whose default differs from the config's (e.g. --certify-norm linf instead of l2) is caught."""
    import dsrna.evaluation.compare
    from dsrna.cli import build_parser
    from dsrna.commands.compare import run
    from dsrna.evaluation.compare import CompareConfig

    args = build_parser(only="compare").parse_args(["compare"])
    assert args.certify_norm == "l2" and args.norm == "linf" and args.gamma == 0.01
    seen = []
    monkeypatch.setattr(dsrna.evaluation.compare, "compare", lambda config: seen.append(config) or dict(
        dataset=config.dataset, norm=config.norm, eps=config.eps[-1], l2_eps=config.l2_eps, torchattacks=False,
        certify_norm=config.certify_norm, certify_method=config.certify_method, methods={}))
    assert run(args) == 0
    assert seen == [CompareConfig()]


def test_compare_hands_its_settings_to_every_stage(tmp_path, monkeypatch):
    """Each stage gets the settings compare was given (faked stages record them): the search's
    --search-order and --gamma, training's --amp, the attacks' --norm, certification's --certify-norm
    (not --norm); the table takes FGSM/PGD at the last --eps and C&W/AutoAttack from their own file."""
    import types

    import dsrna.attacks
    import dsrna.evaluation.attack
    import dsrna.evaluation.certify
    import dsrna.evaluation.compare
    import dsrna.evaluation.report
    import dsrna.evaluation.train
    import dsrna.search
    from dsrna import DARTS_V2

    searches, trains, attacks, certifies = [], [], [], []

    def run_search(config):
        searches.append(config)
        times = [200.0, 400.0] if config.robustness.kind == "none" else [30.0]  # darts: 10 min over 2 epochs
        return types.SimpleNamespace(history=[{"time_s": t} for t in times])

    def evaluate_attacks(model, loader, eps, names, norm, **kwargs):
        attacks.append((tuple(names), norm, list(eps)))
        accs = {"fgsm": [0.8, 0.6], "pgd": [0.7, 0.5], "cw": [0.4], "autoattack": [0.3]}
        return dict(norm=norm, eps=list(eps), attacks=list(names), n=8, clean_acc=0.9,
                    robust_acc={name: accs[name][:len(eps)] for name in names})

    def certify(model, loader, norm, method, **kwargs):
        certifies.append((norm, method))
        return dict(norm=norm, method=method, n=4, radii=[0.0, 0.1, 0.3, 0.6], correct=[False, True, True, True],
                    mean_radius=0.25, median_radius=0.2, at_max_eps=0, max_eps=1.0, clean_acc=0.75, eps=[],
                    certified_acc=[])

    model = torch.nn.Linear(122, 1000)  # 123,000 parameters
    monkeypatch.setattr(dsrna.search, "run_search", run_search)
    monkeypatch.setattr(dsrna.evaluation.train, "train", trains.append)
    monkeypatch.setattr(dsrna.evaluation.train, "load_model", lambda path, device: (
        model, {"model_config": {"num_classes": 10}, "genotype": DARTS_V2.to_dict()}))
    monkeypatch.setattr(dsrna.evaluation.attack, "evaluate_attacks", evaluate_attacks)
    monkeypatch.setattr(dsrna.evaluation.certify, "certify", certify)
    monkeypatch.setattr(dsrna.evaluation.compare, "evaluation_loader", lambda *a, **k: None)
    monkeypatch.setattr(dsrna.evaluation.report, "write_report", lambda *a, **k: None)
    monkeypatch.setattr(dsrna.attacks, "has_torchattacks", lambda: True)
    monkeypatch.setattr(dsrna.attacks, "require_torchattacks", lambda attack: None)

    out = tmp_path / "compare"
    assert main(["compare", "--methods", "darts,dsrna-cb", "--out", str(out), "--search-order", "2",
                 "--gamma", "0.5", "--amp", "bf16", "--norm", "l2", "--eps", "0.5,1", "--l2-eps", "0.25",
                 "--certify-norm", "l1", "--certify-method", "ibp", "--no-progress"]) == 0
    assert [(c.order, c.robustness.kind) for c in searches] == [(2, "none"), (2, "cb")]
    assert searches[1].robustness.gamma == 0.5
    assert [t.amp for t in trains] == ["bf16", "bf16"]
    assert attacks == [(("fgsm", "pgd"), "l2", [0.5, 1.0]), (("cw", "autoattack"), "l2", [0.25])] * 2
    assert certifies == [("l1", "ibp")] * 2
    result = json.loads((out / "compare.json").read_text())
    for method in ("darts", "dsrna-cb"):
        folder = out / method / "train"
        row = result["methods"][method]
        attack = json.loads((folder / "attack_l2_fgsm-pgd.json").read_text())
        assert attack["norm"] == "l2"
        assert row["fgsm"] == attack["robust_acc"]["fgsm"][-1] and row["pgd"] == attack["robust_acc"]["pgd"][-1]
        extra = json.loads((folder / "attack_l2_cw-autoattack.json").read_text())
        assert row["cw"] == extra["robust_acc"]["cw"][0] and row["autoattack"] == extra["robust_acc"]["autoattack"][0]
        assert json.loads((folder / "certify_l1_ibp.json").read_text())["norm"] == "l1"
    table = (out / "compare.md").read_text()
    assert "| method | clean | FGSM l2 1 | PGD l2 1 | C&W l2 0.25 | AutoAttack l2 0.25 | mean cert. radius (l1, ibp) |" \
        in table
    assert "| darts | 90.00 | 60.00 | 50.00 | 40.00 | 30.00 | 0.25 | 10.0 min | 0.123M |" in table
    assert "| dsrna-cb | 90.00 | 60.00 | 50.00 | 40.00 | 30.00 | 0.25 | 30 s | 0.123M |" in table
