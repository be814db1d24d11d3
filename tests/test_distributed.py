"""Distributed search on CPU with 2 gloo processes.

BatchNorm in train mode normalises with per-rank batch statistics, so a 2-process run with 2 x B/2
examples is a different computation from a 1-process run with B (as with any DDP model without
SyncBatchNorm). To compare exactly, the step comparison puts the BN layers in eval mode (fixed
statistics, every example independent of the others): then the 2-process run must equal the
1-process run on the same global batch up to float32 rounding of the gradient averages (checked at
atol 1e-5 on weights and alphas after three steps). The full-run check below uses ordinary train-mode BN.

The last test launches the user-facing command itself, ``torchrun --standalone --nproc_per_node 2
-m dsrna search ...``, on mnist-mini (about 10 s for the two processes on one CPU core).
"""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 8

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    train = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    val = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    return train, val


CASES = {"order1": dict(order=1), "order2": dict(order=2),
         # R_Jac's random rows: each rank draws its own images' rows of the global batch's draw
         "order1-jacobian": dict(order=1, robustness="jacobian")}


def _search_steps(case, rank=0, world=1):
    """STEPS search iterations on this rank's share of fixed global batches, BN in eval mode: the
    alphas after each step, the final state and each step's architecture gradient. The ranks hold
    images r, r + world, ... of each global batch, as DistributedSampler deals them."""
    from dsrna import SearchNetwork
    from dsrna.robustness import RobustnessConfig
    from dsrna.search import SearchConfig, Searcher
    from dsrna.space.ops import BatchNorm2d

    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=3, in_channels=1)
    for m in net.modules():
        if isinstance(m, BatchNorm2d):
            m.eval()
    if rank == 1:
        with torch.no_grad():  # a different start on rank 1: the searcher must broadcast rank 0's
            net.alphas_normal.add_(1.0)
    kind = CASES[case].get("robustness", "none")
    robustness = RobustnessConfig(kind=kind, dataset="mnist-mini", **(dict(gamma=20.0) if kind != "none" else {}))
    searcher = Searcher(net, SearchConfig(layers=3, init_channels=4, order=CASES[case]["order"], robustness=robustness))
    gradients, arch_gradient = [], searcher.arch_gradient

    def recorded(*args, **kwargs):  # the averaged architecture gradient each step applies
        grads, metrics = arch_gradient(*args, **kwargs)
        gradients.append([g.detach().clone() for g in grads])
        return grads, metrics

    searcher.arch_gradient = recorded
    alphas = []
    for step in range(STEPS):
        (xt, yt), (xv, yv) = _global_batches(step)
        local = slice(rank, None, world)
        searcher.step((xt[local], yt[local]), (xv[local], yv[local]))
        alphas.append([a.detach().clone() for a in net.arch_parameters()])
    return alphas, {k: v.clone() for k, v in net.state_dict().items()}, gradients


class _Stop(Exception):
    """Interrupts a run between epochs, as a killed job would."""


def _worker(rank, port, results_dir, run_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a rank left waiting in a collective fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        _fail_on_one_rank(rank, results_dir, run_dir)
        for case in CASES:
            torch.save(_search_steps(case, rank, WORLD), os.path.join(results_dir, f"{case}_rank{rank}.pt"))
        # a whole run, stopped after its first epoch: files from rank 0 only, resumed below by one process
        from dsrna.search import run_search

        def stop(epoch, record):
            raise _Stop

        try:
            run_search(_run_config(run_dir, epochs=2), _run_data(), on_epoch_end=stop)
        except _Stop:
            pass
    finally:
        dist.destroy_process_group()


def _outcome(block) -> str:
    try:
        block()
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _fail_on_one_rank(rank, results_dir, run_dir):
    """What each rank sees when only one of them fails: inside a ``fail_together`` block (rank 1, a
    plain exception), and in a whole run whose ``--out`` only rank 0 checks (a regular file stands
    in the way of the folder)."""
    from dsrna.search import distributed, run_search

    def rank_one_fails():
        with distributed.fail_together():
            if rank == 1:
                raise OSError("no space left on device\nsecond line")

    blocked = Path(run_dir).parent / "not-a-folder"
    if rank == 0:
        blocked.write_text("")
    dist.barrier()
    outcomes = [_outcome(rank_one_fails),
                _outcome(lambda: run_search(_run_config(blocked / "search", epochs=1), _run_data()))]
    Path(results_dir, f"one_rank_fails_rank{rank}.json").write_text(json.dumps(outcomes))


def _run_config(out, epochs, resume=False, batch_size=2):
    from dsrna.search import SearchConfig

    return SearchConfig(layers=3, init_channels=4, epochs=epochs, batch_size=batch_size, max_steps_per_epoch=2,
                        out=str(out), resume=resume, progress=False, log_every=1)


def _run_data():
    from dsrna.search import SearchData

    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    return SearchData(TensorDataset(x[:12], y[:12]), TensorDataset(x[12:], y[12:]), num_classes=3, in_channels=1)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("ddp")
    run_dir = tmp_path_factory.mktemp("ddp_run") / "search"
    mp.start_processes(_worker, args=(_free_port(), str(results), str(run_dir)), nprocs=WORLD, join=True,
                       start_method="spawn")
    return results, run_dir


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_process_and_agree_on_alpha(two_process_results, case):
    results, _ = two_process_results
    per_rank = [torch.load(results / f"{case}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # the architecture is identical on every rank after every step
    for step in range(STEPS):
        for a0, a1 in zip(per_rank[0][0][step], per_rank[1][0][step]):
            assert torch.equal(a0, a1), f"ranks disagree on alpha after step {step}"
    torch.set_num_threads(1)
    alphas, state, gradients = _search_steps(case)
    # Adam's step hardly depends on the gradient's scale: compare the averaged gradients themselves
    # (a sum over the ranks instead of their mean moved one alpha by 1.6e-5 only).
    for step in range(STEPS):
        for g_single, g_ddp in zip(gradients[step], per_rank[0][2][step]):
            torch.testing.assert_close(g_ddp, g_single, atol=1e-6, rtol=1e-4)
    for a_single, a_ddp in zip(alphas[-1], per_rank[0][0][-1]):
        torch.testing.assert_close(a_ddp, a_single, atol=1e-5, rtol=1e-4)
    for name, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(per_rank[0][1][name], value, atol=1e-5, rtol=1e-4, msg=name)
            torch.testing.assert_close(per_rank[1][1][name], per_rank[0][1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_distributed_run_writes_on_rank_zero_and_resumes_on_one_process(two_process_results, tmp_path):
    from dsrna.errors import CheckpointError
    from dsrna.search import run_search

    _, run_dir = two_process_results
    same_global_batch = tmp_path / "search"
    shutil.copytree(run_dir, same_global_batch)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["alphas.png", "checkpoint.pt", "genotype.json", "log.jsonl", "normal.png", "reduce.png"])
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["world_size"] == WORLD and saved["epoch"] == 1
    # 2 steps x 2 ranks x 2 examples of the validation half consumed
    assert saved["data"] == {"val_epoch": 0, "val_consumed": 8}
    result = run_search(_run_config(run_dir, epochs=2, resume=True), _run_data())
    assert [r["epoch"] for r in result.history] == [1, 2] and [r["world_size"] for r in result.history] == [2, 1]
    assert result.history[1]["step"] == 4
    # one process with the global batch of the two (2 x 2): the same run, dealt otherwise
    with pytest.raises(CheckpointError, match="batch_size=2 \\(now 3\\)"):
        run_search(_run_config(same_global_batch, epochs=2, resume=True, batch_size=3), _run_data())
    result = run_search(_run_config(same_global_batch, epochs=2, resume=True, batch_size=4), _run_data())
    assert [r["epoch"] for r in result.history] == [1, 2] and result.history[1]["step"] == 4


def test_when_one_rank_fails_every_rank_stops_and_names_it(two_process_results):
    results, _ = two_process_results
    (block0, run0), (block1, run1) = (json.loads((results / f"one_rank_fails_rank{r}.json").read_text())
                                      for r in range(WORLD))
    # the failing rank raises its own exception; the other one names it in one line instead of waiting
    assert block1 == "OSError: no space left on device\nsecond line"
    assert block0 == "PeerFailure: rank 1 failed: OSError: no space left on device"
    assert run0.startswith("CheckpointError: cannot write in ") and run0.endswith("choose another --out")
    assert run1 == "PeerFailure: rank 0 failed: " + run0.removeprefix("CheckpointError: ")


REPO = Path(__file__).resolve().parents[1]
SEARCH_ARGS = ["search", "--dataset", "mnist-mini", "--layers", "3", "--init-channels", "4", "--epochs", "1",
               "--batch-size", "4", "--max-steps-per-epoch", "3", "--no-progress"]


def _torchrun(nproc, out, *extra, cwd):
    """``torchrun --standalone --nproc_per_node NPROC -m dsrna search ...`` in fresh processes (gloo on CPU)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "dsrna", *SEARCH_ARGS, "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=240)


def test_torchrun_launch_of_the_search_command(tmp_path):
    from dsrna import SearchNetwork
    from dsrna.space import Genotype

    out = tmp_path / "run"
    ran = _torchrun(2, out, "--device", "cpu", cwd=tmp_path)  # what gloo runs on: accepted
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr and "dsrna search: error" not in ran.stderr, ran.stderr[-3000:]
    # output and files from rank 0 only: one summary, one log line, no second writer's temporary files
    assert ran.stdout.count("genotype: ") == 1 and ran.stdout.count("run folder: ") == 1, ran.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["alphas.png", "checkpoint.pt", "genotype.json", "log.jsonl", "normal.png", "reduce.png", "report.html"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["world_size"] == 2 and log[0]["step"] == 3
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    # 3 steps x 2 processes x 4 examples of the validation half
    assert saved["world_size"] == 2 and saved["epoch"] == 1 and saved["data"] == {"val_epoch": 0, "val_consumed": 24}

    # the architecture in the checkpoint is the one the log, genotype.json and the summary describe
    net = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1)
    net.load_state_dict(saved["model"])
    with torch.no_grad():
        for kind in ("normal", "reduce"):
            torch.testing.assert_close(net.edge_weights(kind == "reduce")[0], torch.tensor(log[0]["alphas"][kind]))
    genotype = net.genotype()
    assert Genotype.from_json(out / "genotype.json") == genotype
    assert f"genotype: {json.dumps(genotype.to_dict())}" in ran.stdout

    # one process resumes the two-process run: it continues from exactly that architecture
    # (nothing is left to run, so the run folder's checkpoint and log stay as they were)
    checkpoint_bytes, log_text = (out / "checkpoint.pt").read_bytes(), (out / "log.jsonl").read_text()
    resumed = _torchrun(1, out, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"genotype: {json.dumps(genotype.to_dict())}" in resumed.stdout
    assert (out / "checkpoint.pt").read_bytes() == checkpoint_bytes and (out / "log.jsonl").read_text() == log_text

    # a second launch into the same folder without --resume: one line per rank, status 2, no hang
    again = _torchrun(2, out, cwd=tmp_path)
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("dsrna search: error:")]
    assert errors and all("already holds a search" in line for line in errors), again.stderr[-3000:]
    # the only traceback is torchrun's own report of the failed workers
    assert again.stderr.count("Traceback") <= 1 and "[rank" not in again.stderr, again.stderr[-3000:]


def test_device_under_torchrun_is_each_process_own(monkeypatch):
    from dsrna.search import SearchConfig, distributed, loop

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "default_device", lambda: torch.device("cuda", 1))  # LOCAL_RANK 1's GPU
    assert loop._search_device(SearchConfig(device="cuda")) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cpu under torchrun: .* here cuda:1 .*CUDA_VISIBLE_DEVICES="):
        loop._search_device(SearchConfig(device="cpu"))
    with pytest.raises(ValueError, match=r"--device cuda:0 under torchrun: .*drop --device$"):
        loop._search_device(SearchConfig(device="cuda:0"))
