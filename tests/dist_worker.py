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


def lean_worker(rank: int, world_size: int, port: int, out_dir: str, model_dir: str) -> None:
    """The CLI's loading under torchrun on a bfloat16 checkpoint run in float32: rank 0 loads float32,
    rank 1 the checkpoint's bfloat16 (memory-mapped) and casts a block only while it visits."""
    import contextlib
    from pathlib import Path

    from tiny_models import tiny_input_ids

    import alpsprune.allocation
    import alpsprune.pipeline
    from alpsprune.checkpoint import model_identity
    from alpsprune.io import load_model
    from alpsprune.models import find_decoder_blocks, get_weight, list_target_layers
    from alpsprune.parallel import Distributed, finalize
    from alpsprune.streaming import visiting

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    parallel = Distributed()
    model, _ = load_model(model_dir, dtype="float32" if parallel.is_main else "auto")
    parallel.align_model(model)
    _, blocks = find_decoder_blocks(model)

    def float32_bytes() -> int:  # what this rank holds in the run's dtype (bf16 is the mapped checkpoint)
        params = {id(p): p for p in model.parameters()}.values()
        return sum(p.numel() * 4 for p in params if p.device.type != "meta" and p.dtype == torch.float32)

    result = {
        "identity": model_identity(model),
        "block_dtypes_before": sorted({str(p.dtype) for b in blocks for p in b.parameters()}),
        "block_bytes": sum(p.numel() * 4 for p in blocks[0].parameters()),
        "outside_bytes": float32_bytes() if not parallel.is_main else None,
        "during_visits": [],
    }

    @contextlib.contextmanager
    def counted(block, *args, **kwargs):
        with visiting(block, *args, **kwargs) as visited:
            result["during_visits"].append(float32_bytes())
            yield visited

    alpsprune.pipeline.visiting = alpsprune.allocation.visiting = counted
    try:
        alpsprune.pipeline.prune_model(
            model,
            tiny_input_ids(5, 32, seed=1),
            method="alps",
            sparsity=0.7,  # ALPS's default recipe above 60%: OWL's statistics pass visits every block too
            device="cpu",
            progress=False,
            parallel=parallel,
            release_blocks=not parallel.is_main,
            checkpoint_dir=Path(out_dir) / "ckpt",
        )
    finally:
        alpsprune.pipeline.visiting = alpsprune.allocation.visiting = visiting
    if parallel.is_main:
        result["weights"] = {name: get_weight(m) for name, m in list_target_layers(model).items()}
    torch.save(result, Path(out_dir) / f"lean{rank}.pt")
    parallel.barrier()
    finalize(parallel)
