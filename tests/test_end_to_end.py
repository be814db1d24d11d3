"""The whole chain on mnist-mini with tiny settings: search, train, attack, certify, report, and
the comparison of DARTS against a DSRNA variant through `dsrna compare`."""

import json

from dsrna.cli import main

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
    attack = json.loads((train / "attack.json").read_text())
    assert attack["n"] == 8 and set(attack["robust_acc"]) == {"fgsm", "pgd"}
    assert all(0 <= a <= attack["clean_acc"] for accs in attack["robust_acc"].values() for a in accs)
    assert (train / "attack.png").is_file()
    assert main(["certify", model, "--norm", "l2", "--method", "ibp", "--eps", "0.01", "--limit", "4",
                 "--max-eps", "1", "--tol", "0.01", "--no-progress"]) == 0
    certify = json.loads((train / "certify.json").read_text())
    assert certify["n"] == 4 and len(certify["radii"]) == 4
    assert (train / "certify_hist.png").is_file() and (train / "certify_curve.png").is_file()
    out = capsys.readouterr().out
    assert "pgd" in out and "certified radius" in out
    assert main(["report", str(train)]) == 0
    page = (train / "report.html").read_text()
    assert "Robust accuracy" in page and "Certified robustness" in page and "Training curves" in page
    assert main(["report", str(search)]) == 0


def test_compare_writes_the_table(tmp_path, capsys):
    out = tmp_path / "compare"
    argv = ["compare", "--methods", "darts,dsrna-jacobian", "--out", str(out), "--search-epochs", "1",
            "--search-layers", "3", "--search-channels", "4", "--search-batch-size", "8", "--search-max-steps", "1",
            "--train-epochs", "1", "--train-layers", "3", "--train-channels", "4", "--train-batch-size", "16",
            "--train-max-steps", "1", "--eps", "0.1", "--pgd-steps", "2", "--eval-limit", "8",
            "--certify-method", "ibp", "--certify-limit", "4", "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert list(result["methods"]) == ["darts", "dsrna-jacobian"]
    for row in result["methods"].values():
        assert 0 <= row["pgd"] <= row["clean_acc"] and 0 <= row["fgsm"] <= row["clean_acc"]
        assert row["parameters"] > 0 and row["search_time_s"] > 0 and row["mean_radius"] >= 0
    table = (out / "compare.md").read_text()
    assert "| darts |" in table and "| dsrna-jacobian |" in table
    assert (out / "report.html").is_file() and "<h2>Comparison</h2>" in (out / "report.html").read_text()
    stages = json.loads((out / "darts" / "stages.json").read_text())
    assert set(stages) == {"search", "train", "attack", "certify"}  # what a second run would skip
    assert main([*argv, "--pgd-steps", "3"]) == 2  # the same folder with other settings is refused
    assert "other settings" in capsys.readouterr().err
