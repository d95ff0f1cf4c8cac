"""Distributed pruning (issue 8): cost-based task assignment, sharding, and 2-process gloo runs on CPU
that must reproduce the single-process result bit for bit, with rank 0 alone writing."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from alpsprune.parallel import Distributed, assign_tasks, layer_cost, single_process

# one Llama-7B decoder block: (out, in) of q, k, v, o, gate, up, down
LLAMA7B_BLOCK = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def _loads(costs, owners, world):
    loads = [0.0] * world
    for c, o in zip(costs, owners):
        loads[o] += c
    return loads


@pytest.mark.parametrize("world", [2, 4, 8])
def test_assign_tasks_balances_llama7b_block(world):
    costs = [layer_cost(o, i) for o, i in LLAMA7B_BLOCK]
    owners = assign_tasks(costs, world)
    assert owners == assign_tasks(costs, world)  # deterministic: every rank computes the same plan
    assert all(0 <= o < world for o in owners)
    lower = max(sum(costs) / world, max(costs))  # no schedule beats the mean load or the largest task
    assert max(_loads(costs, owners, world)) <= 1.34 * lower
    # down_proj (the largest) gets a rank of its own once there are enough ranks
    if world >= 4:
        down = owners[-1]
        assert owners.count(down) == 1


def test_assign_tasks_within_lpt_bound_of_optimum():
    rng = random.Random(0)
    for _ in range(30):
        world = rng.choice([2, 3])
        costs = [rng.uniform(1, 100) for _ in range(rng.randint(1, 7))]
        best = min(
            max(_loads(costs, plan, world)) for plan in itertools.product(range(world), repeat=len(costs))
        )
        got = max(_loads(costs, assign_tasks(costs, world), world))
        assert got <= (4 / 3 - 1 / (3 * world)) * best + 1e-9  # Graham's LPT guarantee


def test_assign_tasks_edge_cases():
    assert assign_tasks([], 4) == []
    assert assign_tasks([5.0, 5.0, 5.0], 1) == [0, 0, 0]
    assert assign_tasks([1.0, 1.0], 4) == [0, 1]  # equal costs: lower index to lower rank
    with pytest.raises(ValueError):
        assign_tasks([1.0], 0)


def _fake(rank: int, world: int) -> Distributed:
    d = object.__new__(Distributed)
    d.rank, d.world_size, d.backend, d.costs = rank, world, "gloo", None
    return d


@pytest.mark.parametrize(
    ("n", "world", "bs"), [(5, 2, 1), (7, 3, 1), (8, 4, 1), (3, 3, 1), (5, 2, 2), (9, 2, 4)]
)
def test_shards_are_contiguous_whole_batches(n, world, bs):
    calibration = torch.arange(n).unsqueeze(1)
    parts = [_fake(r, world).shard(calibration, bs) for r in range(world)]
    assert torch.equal(torch.cat(parts), calibration)
    batches = [-(-len(p) // bs) for p in parts]
    assert max(batches) - min(batches) <= 1 and min(batches) >= 1
    # every rank's batches are batches of the single process (whole, aligned): only the last may be short
    assert all(len(p) % bs == 0 for p in parts[:-1])
    assert sum((_fake(r, world).shard_list(list(range(n))) for r in range(world)), []) == list(range(n))


def test_too_few_windows_is_a_clear_error():
    from alpsprune.errors import DataError

    with pytest.raises(DataError, match="--nsamples"):
        _fake(0, 4).shard(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(DataError, match="batch-size"):
        _fake(0, 2).shard(torch.zeros(4, 8, dtype=torch.long), batch_size=4)


def test_single_process_needs_no_setup(monkeypatch):
    from alpsprune.parallel import init_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    p = init_from_env()
    assert (p.rank, p.world_size, p.is_main) == (0, 1, True)
    assert p.gather_list([1, 2]) == [1, 2]
    assert p.solve([("a", "a")], lambda n, lead: (n, lead)) == {"a": ("a", "a")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    import dist_worker

    mp.spawn(dist_worker.worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    single = single_process()
    expected_of = {}
    for name, kwargs, nsamples in dist_worker.CONFIGS:
        ckpt = tmp_path / f"single-{name}"
        expected, report = dist_worker.run_config(single, kwargs, nsamples, ckpt)
        expected_of[name] = expected
        for rank, res in enumerate(ranks):
            got = res[name]["weights"]
            assert got.keys() == expected.keys()
            for layer, w in expected.items():
                assert torch.equal((got[layer] == 0), (w == 0)), f"{name} rank {rank} {layer}: masks differ"
                assert torch.equal(got[layer], w), f"{name} rank {rank} {layer}: weights differ"
            assert res[name]["records"] == [r.name for r in report.layers]
        # each rank wrote its own shard of the block inputs as safetensors (nothing gathered or pickled);
        # together, in rank order, they are the single run's inputs
        dist_ckpt = tmp_path / f"ckpt-{name}"
        state = json.loads((dist_ckpt / "state.json").read_text())
        assert state["next_block"] == 3
        assert state["inputs"]["files"] == [f"inputs_0002_rank{r}.safetensors" for r in range(2)]
        assert sum(state["inputs"]["windows"]) == nsamples and min(state["inputs"]["windows"]) >= 1
        assert not list(dist_ckpt.glob("*.pt"))
        single_state = json.loads((ckpt / "state.json").read_text())
        streams = ["hidden", "dense"] if state["inputs"]["dense"] else ["hidden"]
        for stream in streams:
            a = torch.cat([load_file(dist_ckpt / f)[stream] for f in state["inputs"]["files"]])
            b = load_file(ckpt / single_state["inputs"]["files"][0])[stream]
            assert torch.equal(a, b), stream

    # with release_blocks on rank 1 only: rank 0 still has the single process's model, rank 1 none of it
    released = ranks[0]["released"]["weights"]
    expected = expected_of[dist_worker.CONFIGS[0][0]]
    assert released.keys() == expected.keys()
    assert all(torch.equal(released[k], w) for k, w in expected.items())
    assert not ranks[0]["released"]["all_meta"] and ranks[1]["released"]["all_meta"]

    for res in ranks:
        assert res["error"] is not None and "b: boom" in res["error"]
        assert res["bf16"] == {
            "x": (torch.bfloat16, [[1.0] * 3] * 2, "x"),
            "yy": (torch.bfloat16, [[2.0] * 3] * 2, "yy"),
        }


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from cli_helpers import make_corpus, make_model_dir

    root = tmp_path_factory.mktemp("dist-cli")
    model = make_model_dir(root / "inputs" / "model")
    calib, held_out = make_corpus(root / "inputs")
    return root, model, calib, held_out


def test_torchrun_cli_matches_single_process(cli_setup):
    from safetensors.torch import load_file

    from alpsprune.cli.main import main

    root, model, calib, held_out = cli_setup
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    work = root / "torchrun"
    work.mkdir()
    common = [str(model), "--calib", str(calib), "--eval", str(held_out), "--nsamples", "5", "--seqlen", "32"]
    common += ["--max-windows", "2", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "alpsprune", "prune"]
        + common
        + ["--output", "out"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone evaluated, wrote and printed: one summary, one output folder, nothing else in the cwd
    assert proc.stdout.count("alpsprune: alps at 60%") == 1, proc.stdout
    assert proc.stdout.count("perplexity") == 1
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    out = work / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["world_size"] == 2
    assert report["extra"]["perplexity"]["pruned"]
    assert len(report["layers"]) == 21
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoint").exists() or not any((out / "checkpoint").glob("*.tmp"))

    single = root / "single-out"
    torch.set_num_threads(1)
    assert main(["prune", *common, "--output", str(single)]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key] == 0, b[key] == 0), key
        assert torch.equal(a[key], b[key]), key
    ppl_dist = report["extra"]["perplexity"]["pruned"]
    ppl_single = json.loads((single / "report.json").read_text())["extra"]["perplexity"]["pruned"]
    assert {k: v["ppl"] for k, v in ppl_dist.items()} == {k: v["ppl"] for k, v in ppl_single.items()}


def test_torchrun_ranks_cast_one_block_at_a_time(tmp_path):
    """A bfloat16 checkpoint pruned in float32 (``--dtype float32``) under torchrun: rank 1 keeps the
    checkpoint's memory-mapped bfloat16 and holds float32 copies of the modules outside the blocks plus
    at most one block at any visit (not a float32 copy of the whole model); rank 0's pruned model is the
    single process's, bit for bit, and both ranks agree on the model's identity (checkpoints)."""
    import dist_worker
    from cli_helpers import make_model_dir
    from tiny_models import tiny_input_ids

    from alpsprune.io import load_model
    from alpsprune.models import get_weight, list_target_layers
    from alpsprune.pipeline import prune_model

    model_dir = make_model_dir(tmp_path / "model")
    bf16, _ = load_model(model_dir, dtype="float32")
    bf16.to(torch.bfloat16).save_pretrained(model_dir)  # the checkpoint in bfloat16
    del bf16
    mp.spawn(
        dist_worker.lean_worker, args=(2, _free_port(), str(tmp_path), str(model_dir)), nprocs=2, join=True
    )
    main_rank, other = (torch.load(tmp_path / f"lean{r}.pt", weights_only=False) for r in range(2))

    assert main_rank["identity"] == other["identity"]
    assert main_rank["block_dtypes_before"] == ["torch.float32"]
    assert other["block_dtypes_before"] == ["torch.bfloat16"]  # nothing cast before its visit
    visits = other["during_visits"]
    assert len(visits) >= 2 * 3  # the allocation pass and the pruning pass visit each of the 3 blocks
    # outside the blocks (float32 embeddings + norm) plus exactly one cast block during each visit
    assert max(visits) == other["outside_bytes"] + other["block_bytes"]
    assert max(main_rank["during_visits"]) >= other["outside_bytes"] + 3 * other["block_bytes"]

    single, _ = load_model(model_dir, dtype="float32")
    torch.set_num_threads(1)
    prune_model(
        single, tiny_input_ids(5, 32, seed=1), method="alps", sparsity=0.7, device="cpu", progress=False
    )
    expected = {name: get_weight(m) for name, m in list_target_layers(single).items()}
    assert main_rank["weights"].keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(main_rank["weights"][name], w), name
