"""Capture real (weight, gram) pairs from the bundled SmolLM2-135M model and cache them.

The dense model runs block by block on calibration windows of the Wikipedia excerpt; for each
chosen block, forward pre-hooks on its linears accumulate one :class:`alpsprune.Gram` per
*distinct* input tensor (q/k/v share one, gate/up share one). All grams use the dense model's
inputs (nothing is pruned here). Results go to a folder outside the repository::

    ~/.cache/alpsprune/grams/<settings>/      (or --out DIR; $ALPSPRUNE_CACHE moves ~/.cache/alpsprune)
        index.json                             layers: name, shape, block, gram key, weight file
        gram_<key>.pt                          {"G": float64 (in,in), "sum": float64 (in,), "count": int,
                                                "samples": int, "sample_sq": float64 (in,)}
        weight_<layer>.pt                      float32 (out, in)

Re-running with the same settings reuses the cache (missing blocks are captured, present ones
skipped). Usage::

    python bench/capture_grams.py                       # blocks 0,14,29, 32×512 tokens
    python bench/capture_grams.py --blocks 0,5 --nsamples 8 --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("capture_grams")

INDEX = "index.json"
DEFAULT_BLOCKS = (0, 14, 29)
DEFAULT_SOURCE = "wiki-excerpt"


@dataclass(frozen=True)
class CaptureSettings:
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    source: str = DEFAULT_SOURCE

    @property
    def tag(self) -> str:
        return f"smollm2-135m_{self.source}_n{self.nsamples}_l{self.seqlen}_s{self.seed}"


@dataclass
class LayerPair:
    """One real layer: its dense weight and the gram of its dense-model inputs."""

    name: str
    block: int
    weight: torch.Tensor  # float32 (out, in)
    gram_key: str
    G: torch.Tensor  # float64 (in, in)
    mean: torch.Tensor  # float64 (in,)
    count: int
    samples: int = 1  # calibration windows (DSnoT's per-sample statistics)
    sample_sq: torch.Tensor | None = None  # Σ_n (Σ_t x)² / L_n; None in caches of older versions

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def short(self) -> str:
        return f"b{self.block}.{self.kind}"

    def gram(self):
        """A fresh :class:`alpsprune.Gram` of this layer's inputs (no cached factorisation)."""
        from alpsprune.stats import Gram

        gram = Gram.from_matrix(self.G, mean=self.mean, count=self.count, samples=self.samples)
        if self.sample_sq is not None:
            gram.sample_sq = self.sample_sq.clone()
        return gram


def default_cache_root() -> Path:
    from alpsprune.io import cache_root

    return cache_root() / "grams"


def cache_dir_for(settings: CaptureSettings, out: Path | None = None) -> Path:
    return Path(out).expanduser() if out is not None else default_cache_root() / settings.tag


def _safe(name: str) -> str:
    return name.replace("/", "_")


def read_index(folder: Path) -> dict | None:
    path = folder / INDEX
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _group_by_input(block: nn.Module, linears: dict[str, nn.Module], hidden, kwargs) -> list[list[str]]:
    """Linears grouped by the exact input tensor they receive (same storage, shape and stride)."""
    from alpsprune.models import run_block

    seen: list[tuple[tuple, str, torch.Tensor]] = []
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, n=name: seen.append(
                ((args[0].data_ptr(), tuple(args[0].shape), args[0].stride()), n, args[0])
            )
        )
        for name, m in linears.items()
    ]
    try:
        with torch.no_grad():
            run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for key, name, _ in seen:
        if not any(name in g for g in groups.values()):
            groups.setdefault(key, []).append(name)
    ordered = list(groups.values())
    reached = {n for g in ordered for n in g}
    return ordered + [[n] for n in linears if n not in reached]


def capture(
    settings: CaptureSettings,
    blocks: list[int],
    out: Path | None = None,
    force: bool = False,
) -> Path:
    """Capture (weight, gram) pairs for ``blocks`` into the cache folder; return the folder."""
    from alpsprune.data import get_calibration
    from alpsprune.io import load_model
    from alpsprune.models import (
        capture_block_inputs,
        find_decoder_blocks,
        find_target_linears,
        get_weight,
        run_block,
    )
    from alpsprune.stats import Gram

    folder = cache_dir_for(settings, out)
    folder.mkdir(parents=True, exist_ok=True)
    index = None if force else read_index(folder)
    if index is not None and index.get("settings") != settings.__dict__:
        raise SystemExit(
            f"{folder} holds grams captured with other settings ({index.get('settings')}); "
            "use another --out or --force"
        )
    if index is None:
        index = {"settings": settings.__dict__, "layers": {}, "grams": {}, "blocks": []}
    done = set(index["blocks"])
    todo = sorted(set(blocks) - done)
    if not todo:
        log.info("cache hit: %s (blocks %s)", folder, sorted(done))
        return folder

    t0 = time.perf_counter()
    model, tokenizer = load_model(None)
    calib = get_calibration(
        settings.source, tokenizer, settings.nsamples, settings.seqlen, seed=settings.seed
    )
    path, stack = find_decoder_blocks(model)
    if max(todo) >= len(stack) or min(todo) < 0:
        raise SystemExit(f"blocks must lie in [0, {len(stack) - 1}], got {todo}")
    with torch.no_grad():
        inputs = capture_block_inputs(model, calib, "cpu", batch_size=1)
    hidden = inputs.hidden
    log.info("loaded model + calibration %s in %.1f s", tuple(calib.shape), time.perf_counter() - t0)

    for b in range(max(todo) + 1):
        block = stack[b]
        kwargs_of = lambda j, b=b: inputs.kwargs_for(b, j)  # noqa: E731
        if b not in todo:  # just propagate the dense stream
            with torch.no_grad():
                hidden = [run_block(block, h, kwargs_of(j)) for j, h in enumerate(hidden)]
            continue
        t_block = time.perf_counter()
        linears = find_target_linears(block, f"{path}.{b}")
        groups = _group_by_input(block, linears, hidden[0], kwargs_of(0))
        leaders = {g[0]: linears[g[0]] for g in groups}
        grams = {name: Gram(get_weight(m).shape[1]) for name, m in leaders.items()}
        handles = [
            m.register_forward_pre_hook(lambda mod, args, g=grams[name]: g.add_batch(args[0]))
            for name, m in leaders.items()
        ]
        try:
            with torch.no_grad():
                hidden = [run_block(block, h, kwargs_of(j)) for j, h in enumerate(hidden)]
        finally:
            for h in handles:
                h.remove()
        for group in groups:
            leader = group[0]
            key = f"b{b}." + "+".join(n.rsplit(".", 1)[-1] for n in group)
            gram = grams[leader]
            gram_file = f"gram_{_safe(key)}.pt"
            stats = {"G": gram.G, "sum": gram.sum, "count": gram.count}
            torch.save({**stats, "samples": gram.samples, "sample_sq": gram.sample_sq}, folder / gram_file)
            index["grams"][key] = {"file": gram_file, "in_features": gram.in_features, "count": gram.count}
            for name in group:
                weight = get_weight(linears[name]).to(torch.float32)
                weight_file = f"weight_{_safe(name)}.pt"
                torch.save(weight.contiguous(), folder / weight_file)
                index["layers"][name] = {
                    "block": b,
                    "shape": list(weight.shape),
                    "gram": key,
                    "weight_file": weight_file,
                }
        index["blocks"] = sorted(set(index["blocks"]) | {b})
        _write_index(folder, index)  # after every block: an interrupted run keeps what it has
        log.info(
            "block %d: %d linears, %d grams (%.1f s)",
            b,
            len(linears),
            len(groups),
            time.perf_counter() - t_block,
        )
    log.info("captured blocks %s into %s in %.1f s", todo, folder, time.perf_counter() - t0)
    return folder


def _write_index(folder: Path, index: dict) -> None:
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(folder / INDEX)


def load_pairs(
    settings: CaptureSettings | None = None,
    blocks: list[int] | None = None,
    out: Path | None = None,
    capture_missing: bool = True,
) -> list[LayerPair]:
    """The cached (weight, gram) pairs of ``blocks`` (default: every cached block), capturing if needed.

    Layers are returned in block order, then module order. Layers sharing an input share one ``G``
    tensor object (loaded once).
    """
    settings = settings or CaptureSettings()
    folder = cache_dir_for(settings, out)
    index = read_index(folder)
    wanted = list(blocks) if blocks is not None else list(DEFAULT_BLOCKS)
    if index is None or not set(wanted) <= set(index["blocks"]):
        if not capture_missing:
            raise FileNotFoundError(f"no cached grams for blocks {wanted} in {folder}")
        capture(settings, wanted, out)
        index = read_index(folder)
    if blocks is None:
        wanted = index["blocks"]
    loaded: dict[str, dict] = {}
    pairs: list[LayerPair] = []
    for name, meta in index["layers"].items():
        if meta["block"] not in wanted:
            continue
        key = meta["gram"]
        if key not in loaded:
            loaded[key] = torch.load(folder / index["grams"][key]["file"], weights_only=True)
        g = loaded[key]
        count = int(g["count"])
        pairs.append(
            LayerPair(
                name=name,
                block=meta["block"],
                weight=torch.load(folder / meta["weight_file"], weights_only=True),
                gram_key=key,
                G=g["G"],
                mean=g["sum"] / max(count, 1),
                count=count,
                # older caches: equal-length windows, so the sample count is the calibration count
                samples=int(g.get("samples", index["settings"]["nsamples"])),
                sample_sq=g.get("sample_sq"),
            )
        )
    pairs.sort(key=lambda p: p.block)  # stable: module order within a block
    return pairs


def add_capture_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real-layer capture (cached, see bench/capture_grams.py)")
    g.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    g.add_argument("--seed", type=int, default=0, help="calibration seed")
    g.add_argument(
        "--grams-dir",
        type=Path,
        default=None,
        help="gram cache folder (default ~/.cache/alpsprune/grams/<settings>)",
    )


def settings_from_args(args: argparse.Namespace) -> CaptureSettings:
    return CaptureSettings(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--blocks",
        default=",".join(map(str, DEFAULT_BLOCKS)),
        help="comma list of decoder block indices to capture (SmolLM2-135M has 30: 0..29)",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument(
        "--out", type=Path, default=None, help="cache folder (default ~/.cache/alpsprune/grams/<settings>)"
    )
    p.add_argument("--force", action="store_true", help="re-capture even if the cache has these blocks")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    settings = CaptureSettings(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    folder = capture(settings, blocks, args.out, force=args.force)
    index = read_index(folder)
    print(f"grams in {folder}")
    for name, meta in index["layers"].items():
        if meta["block"] in blocks:
            print(f"  {name:45s} {tuple(meta['shape'])!s:14s} gram {meta['gram']}")


if __name__ == "__main__":
    main()
