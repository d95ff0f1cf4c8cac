"""Worker of the 2-process tests in ``test_distributed.py`` (importable by ``torch.multiprocessing.spawn``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

# (name, prune_model keyword arguments, number of calibration windows): 5 windows do not split evenly over 2
CONFIGS = [
    # the default recipe: dense target, sub-layer statistics, OWL allocation
    ("alps-unstructured-default", {"method": "alps", "sparsity": 0.6, "batch_size": 1}, 5),
    (
        "sparsegpt-2of4-dense-target",
        {"method": "sparsegpt", "mask_structure": "2:4", "batch_size": 2, "dense_target": True},
        5,
    ),
    ("alps-2of4-faithful", {"method": "alps", "mask_structure": "2:4", "faithful": True}, 4),
    # ALPS's default recipe above 60%: OWL's statistics pass sharded over the ranks like calibration
    ("alps-owl-dense-target", {"method": "alps", "sparsity": 0.7, "batch_size": 1}, 5),
    # reconstruction: each step's gradient from the rank holding its batch, summed over the ranks
    (
        "sparsegpt-reconstruct",
        {
            "method": "sparsegpt",
            "sparsity": 0.6,
            "batch_size": 1,
            "reconstruction": {"epochs": 2, "lr": 1e-3},
        },
        5,
    ),
]


def run_config(parallel, kwargs: dict, nsamples: int, checkpoint_dir) -> tuple[dict, object]:
    from tiny_models import make_tiny_model, tiny_input_ids

    from alpsprune.models import get_weight, list_target_layers
    from alpsprune.pipeline import prune_model
    from alpsprune.reconstruct import Reconstruction

    if isinstance(kwargs.get("reconstruction"), dict):
        kwargs = {**kwargs, "reconstruction": Reconstruction(**kwargs["reconstruction"])}
    model = make_tiny_model("llama")
    calibration = tiny_input_ids(nsamples, 32, seed=1)
    report = prune_model(
        model,
        calibration,
        device="cpu",
        progress=False,
        checkpoint_dir=checkpoint_dir,
        parallel=parallel,
        **kwargs,
    )
    return {name: get_weight(m) for name, m in list_target_layers(model).items()}, report


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    from alpsprune.errors import SolverError
    from alpsprune.parallel import Distributed, finalize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    parallel = Distributed()
    out = Path(out_dir)
    results = {}
    for name, kwargs, nsamples in CONFIGS:
        # one checkpoint folder shared by the ranks: each writes its own shard of the block inputs
        weights, report = run_config(parallel, kwargs, nsamples, out / f"ckpt-{name}")
        results[name] = {"weights": weights, "records": [r.name for r in report.layers]}

    # the CLI frees each block on ranks other than 0 once it is pruned: rank 0's model is unchanged
    name, kwargs, nsamples = CONFIGS[0]
    weights, _ = run_config(parallel, {**kwargs, "release_blocks": not parallel.is_main}, nsamples, None)
    results["released"] = {
        "weights": weights if parallel.is_main else None,
        "all_meta": all(w.device.type == "meta" for w in weights.values()),
    }

    # a failing solve on one rank stops every rank at the same task, with the layer's message
    def fn(name, leader):
        if name == "b":
            raise SolverError(f"{name}: boom")
        return torch.full((2, 3), float(len(name)), dtype=torch.bfloat16), name

    tasks = [("a", "a"), ("b", "b"), ("c", "c")]
    try:
        parallel.solve(tasks, fn, like=lambda n: torch.zeros(2, 3))
        results["error"] = None
    except SolverError as exc:
        results["error"] = str(exc)
    # bf16 weights travel bit-exactly
    ok = parallel.solve([("x", "x"), ("yy", "yy")], lambda n, _: fn(n, n), like=lambda n: torch.zeros(2, 3))
    results["bf16"] = {k: (v[0].dtype, v[0].float().tolist(), v[1]) for k, v in ok.items()}
    torch.save(results, out / f"rank{rank}.pt")
    parallel.barrier()
    finalize(parallel)
