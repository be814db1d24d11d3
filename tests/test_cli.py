"""The ``dsrna`` command: user errors are one line on stderr with exit status 2, never a traceback."""

import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import dsrna
from dsrna import cli
from dsrna.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def run_dsrna(*args):
    """``python -m dsrna ARGS`` in a fresh interpreter, importable from the checkout without installing."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "dsrna", *args], capture_output=True, text=True, env=environment, timeout=120)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_entry_point_reports_a_data_error_in_one_line(tmp_path):
    missing = run_dsrna("data", "--dataset", "cifar10", "--data-root", str(tmp_path))
    assert missing.returncode == 2 and missing.stdout == ""
    assert one_line_error(missing.stderr).startswith(
        "dsrna data: error: CIFAR-10 not found: expected the python batches data_batch_1")
    assert str(tmp_path / "cifar-10-batches-py") in missing.stderr


@pytest.mark.parametrize("argv,expected", [
    (["data", "--dataset", "svhn"], "dsrna data: error: argument --dataset: invalid choice: 'svhn'"),
    (["data", "--no-such-flag"], "dsrna: error: unrecognized arguments: --no-such-flag"),
    (["frobnicate"], "dsrna: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_bad_arguments(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert one_line_error(capsys.readouterr().err).startswith(expected)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"dsrna {dsrna.__version__}"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_help_shows_each_options_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    lines, option = {}, None  # option -> its entry, wrapped lines joined
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            option = line.split()[0]
            lines[option] = line.strip()
        elif line.startswith("     ") and option:
            lines[option] += " " + line.strip()
        else:
            option = None
    assert lines["--search-epochs"].endswith("default: 50")  # an option without help text
    assert lines["--gamma"].endswith("weight of the robustness term (default: 0.01)")
    assert lines["--dataset"].endswith("(default: mnist-mini)")
    # said by the help itself, the preset's (None) or a flag's: no second default
    assert lines["--certify-max-eps"].count("default") == 1
    assert "default" not in lines["--train-epochs"] and "default" not in lines["--no-progress"]


def test_data_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    assert cli.main(["data", "--dataset", "mnist", "--data-root", str(tmp_path)]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert error.startswith("dsrna data: error: MNIST not found") and "missing: train-labels-idx1-ubyte" in error


def test_data_summary_of_the_shipped_subset(capsys):
    assert cli.main(["data"]) == 0
    out = capsys.readouterr().out
    assert "mnist-mini (shipped with dsrna): 10 classes, 1x28x28" in out
    assert "4,000 images of shape (1, 28, 28) in 10 classes, 400 to 400 per class" in out
    assert "1,000 images" in out


@pytest.fixture
def fake_command(monkeypatch):
    """Install a subcommand ``fake`` whose ``run`` warns ``module.warning`` if set, then raises
    ``module.error`` if set, else succeeds."""
    module = types.ModuleType("dsrna_test_fake_command")
    module.HELP = "a command for the tests"
    module.warning = module.error = None
    module.add_arguments = lambda parser: None

    def run(args):
        if module.warning:
            warnings.warn(module.warning, RuntimeWarning)
        if module.error:
            raise module.error
        return 0

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", module.__name__)
    return module


@pytest.mark.parametrize("error", [
    DataError("no data here\nsecond line that must not show"),
    FileNotFoundError(2, "No such file or directory", "genotype.json"),
    ValueError("eps must be positive"),
])
def test_user_errors_from_a_command_are_one_line(fake_command, error, capsys):
    fake_command.error = error
    assert cli.main(["fake"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == f"dsrna fake: error: {str(error).splitlines()[0]}"


def test_terminal_escape_codes_are_stripped_from_errors(fake_command, capsys):
    fake_command.error = ValueError("load failed, \x1b[1mdo those steps only if you trust it\x1b[0m.")
    assert cli.main(["fake"]) == 2
    assert one_line_error(capsys.readouterr().err) == "dsrna fake: error: load failed, do those steps only if you trust it."


def test_debug_switch_and_bugs_keep_their_traceback(fake_command, monkeypatch):
    fake_command.error = RuntimeError("an internal bug")
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["fake"])
    fake_command.error = DataError("shown with its traceback under DSRNA_DEBUG")
    monkeypatch.setenv("DSRNA_DEBUG", "1")
    with pytest.raises(DataError):
        cli.main(["fake"])


def test_warnings_are_one_line(fake_command, capsys):
    fake_command.warning = "native backend unusable on cpu; using a slower path"
    assert cli.main(["fake"]) == 0
    assert capsys.readouterr().err.splitlines() == ["dsrna: warning: native backend unusable on cpu; using a slower path"]


def test_unavailable_subcommand_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", "dsrna.commands.not_written_yet")
    assert cli.main(["later"]) == 2
    assert one_line_error(capsys.readouterr().err) == "dsrna later: error: this subcommand is not available in this version"


def test_a_bad_backend_variable_fails_before_a_command_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSRNA_BACKEND", "bogus")
    out = tmp_path / "run"
    assert cli.main(["search", "--layers", "3", "--init-channels", "4", "--epochs", "1", "--no-progress",
                     "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == "dsrna search: error: DSRNA_BACKEND='bogus' is not a backend; choose one of auto, reference, triton, native"
    assert not out.exists()
    monkeypatch.setenv("DSRNA_BACKEND", "reference")
    assert cli.main(["info", "--json"]) == 0


@pytest.mark.parametrize("command,hint", [("search", "with --resume continues"), ("compare", "continues from the last"),
                                          ("fake", None)])
def test_an_interrupted_command_says_how_to_continue(fake_command, monkeypatch, command, hint, capsys):
    if command != "fake":
        monkeypatch.setitem(cli.SUBCOMMANDS, command, fake_command.__name__)
    fake_command.error = KeyboardInterrupt()
    assert cli.main([command]) == 130
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"dsrna {command}: interrupted") and (hint in line if hint else line.endswith("interrupted"))


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_no_option_shows_an_empty_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "(default: )" not in " ".join(capsys.readouterr().out.split())
