"""What a pruned output folder holds (issue 17, "Outputs"): weights in the dtype the model declares (or
`--save-dtype`), a clean config.json, a Hub model card, and `--push-to-hub` through huggingface_hub."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import make_tiny_model, tiny_input_ids
from transformers import AutoModelForCausalLM

from alpsprune import io
from alpsprune.errors import OutputError


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tiny_input_ids(2, 16), use_cache=False).logits


def _saved_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())  # a safe_open handle is not a dict
        return {str(f.get_slice(k).get_dtype()) for k in names}


@pytest.fixture
def bf16_checkpoint(tmp_path: Path, bundled_tokenizer) -> Path:
    """A tiny Llama checkpoint that declares (and stores) bfloat16, like most Hub LLMs."""
    folder = tmp_path / "bf16"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    bundled_tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


# --- dtype -------------------------------------------------------------------------------------------------


def test_declared_dtype_survives_a_float32_load_and_is_saved(bf16_checkpoint: Path, tmp_path: Path) -> None:
    """Pruning on a CPU loads in float32; the output must come back in the checkpoint's bfloat16, half the
    size, and score exactly what the rounded in-memory model scores."""
    model, _ = io.load_model(bf16_checkpoint, dtype="float32")
    assert model.dtype == torch.float32 and io.declared_dtype(model) == torch.bfloat16
    with torch.no_grad():  # "pruning" that leaves values bfloat16 cannot hold
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)

    out32 = io.save_pruned(model, None, tmp_path / "f32", save_dtype="float32")
    out = io.save_pruned(model, None, tmp_path / "auto")
    assert _saved_dtypes(out) == {"BF16"} and _saved_dtypes(out32) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    ratio = (out / "model.safetensors").stat().st_size / (out32 / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52
    assert (
        model.dtype == torch.float32 and model.config.dtype == torch.float32
    )  # the caller's model untouched

    attn = model.config._attn_implementation  # the same attention kernel, so the same code path
    # reloaded in float32: bit-identical to the in-memory model rounded to bfloat16 (same code path)
    rounded = copy.deepcopy(model)
    assert io.round_to_dtype(rounded, torch.bfloat16) > 0
    assert io.round_to_dtype(rounded, torch.bfloat16) == 0  # idempotent
    reloaded32 = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation=attn
    ).eval()
    for key, value in rounded.state_dict().items():
        assert torch.equal(reloaded32.state_dict()[key], value), key
    assert torch.equal(_logits(reloaded32), _logits(rounded))
    assert not torch.equal(_logits(rounded), _logits(model))  # the rounding was real
    # reloaded as transformers does by default (the declared bfloat16): the in-memory model cast to it
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation=attn).eval()
    cast = copy.deepcopy(model).to(torch.bfloat16)
    for name, buffer in model.named_buffers():  # transformers keeps non-saved buffers (rotary) in float32
        if name not in cast.state_dict():
            owner, _, attr = name.rpartition(".")
            setattr(cast.get_submodule(owner), attr, buffer.clone())
    assert reloaded.dtype == torch.bfloat16
    for key, value in cast.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert torch.equal(_logits(reloaded), _logits(cast))


def test_tied_weights_stay_tied_when_cast(tmp_path: Path) -> None:
    model = make_tiny_model("gpt2")  # GPT-2 ties lm_head to the token embedding
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out = io.save_pruned(model, None, tmp_path / "o", save_dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, model.transformer.wte.weight.to(torch.bfloat16).float())


def test_save_dtype_errors(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    with pytest.raises(OutputError, match="unknown save dtype 'int8'"):
        io.save_pruned(model, None, tmp_path / "a", save_dtype="int8")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6  # beyond float16's 65504
    with pytest.raises(OutputError, match="down_proj.weight has values outside float16's range"):
        io.save_pruned(model, None, tmp_path / "b", save_dtype="float16")
    assert not (tmp_path / "b").exists()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OutputError, match="down_proj.weight has values outside float16's range"):
        io.round_to_dtype(model, torch.float16)  # before any evaluation, not at the save
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "layers.0.mlp" not in k)


def test_gguf_declared_dtype_from_the_header(tmp_path: Path) -> None:
    """general.file_type, read past string arrays and other keys, against files written by gguf itself."""
    gguf = pytest.importorskip("gguf")  # the demo extra

    def write(name: str, file_type: int | None) -> Path:
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_name("Some Model")
        w.add_token_list(["<s>", "hello", "wörld"])  # an array of strings before the key
        w.add_array("test.numbers", [1.5, 2.5, 3.5])
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    for file_type, expected in [
        (0, torch.float32),
        (1, torch.float16),
        (32, torch.bfloat16),
        (3, torch.bfloat16),
    ]:
        path = write(f"t{file_type}.gguf", file_type)
        field = gguf.GGUFReader(str(path)).fields["general.file_type"]
        assert int(field.parts[field.data[0]][0]) == io._gguf_file_type(path) == file_type
        assert io.gguf_declared_dtype(path) == expected
    assert io._gguf_file_type(write("none.gguf", None)) is None
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")  # truncated
    assert io._gguf_file_type(tmp_path / "junk.gguf") is None


@pytest.mark.slow
def test_bundled_model_saves_bfloat16_without_gguf_name(tmp_path: Path) -> None:
    model, tokenizer = io.load_model(None)
    assert model.dtype == torch.float32 and io.declared_dtype(model) == torch.bfloat16
    out = io.save_pruned(model, tokenizer, tmp_path / "o")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "_model_name_or_path" not in config
    assert _saved_dtypes(out) == {"BF16"}
    # 134.5 M parameters (embedding tied, stored once) at 2 bytes, plus the JSON header
    stored = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    size = (out / "model.safetensors").stat().st_size
    assert 2 * stored < size < 2 * stored + 100_000


# --- model card and --push-to-hub, end to end through the CLI ----------------------------------------------


class StubHub:
    """Records what alpsprune asks of `huggingface_hub.HfApi` and keeps a copy of each uploaded folder, as the
    Hub would hold it; no network."""

    calls: list[tuple[str, dict]] = []
    remote: dict[str, dict[str, bytes]] = {}
    fail: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": Path(folder_path), **kwargs}))
        if self.fail is not None:
            raise self.fail
        root = Path(folder_path)
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        kept = filter_repo_objects(names, ignore_patterns=kwargs.get("ignore_patterns"))
        self.remote[repo_id] = {n: (root / n).read_bytes() for n in kept}


@pytest.fixture
def stub_hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", StubHub)
    monkeypatch.setattr(StubHub, "calls", [])
    monkeypatch.setattr(StubHub, "remote", {})
    monkeypatch.setattr(StubHub, "fail", None)
    monkeypatch.setenv("HF_TOKEN", "hf_stub_token_for_tests")
    return StubHub


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama folder that declares bfloat16 (with the bundled tokenizer) and a tiny local corpus."""
    from cli_helpers import make_corpus, make_model_dir

    root = tmp_path_factory.mktemp("outputs")
    folder = make_model_dir(root / "model")
    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    calib, held_out = make_corpus(root / "corpus")
    return {"root": root, "model": folder, "calib": calib, "eval": held_out}


def _prune_argv(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "prune", str(setup["model"]), "--method", "wanda", "--sparsity", "0.5", "--dtype", "float32",
        "--calib", str(setup["calib"]), "--eval", str(setup["eval"]),
        "--nsamples", "4", "--seqlen", "64", "--max-windows", "4", "-q", "--output", str(out), *extra,
    ]  # fmt: skip


def test_cli_writes_bf16_model_card_and_pushes(cli_setup: dict[str, Path], stub_hub) -> None:
    import yaml
    from huggingface_hub import ModelCard
    from test_cli import run_cli

    out = cli_setup["root"] / "run"
    argv = _prune_argv(cli_setup, out, "--push-to-hub", "someone/tiny-pruned")
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr

    # weights: the declared bfloat16, although pruned in float32
    assert _saved_dtypes(out) == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["alpsprune"]["save_dtype"] == "bfloat16"
    # the pruned perplexity is that of the saved model: `alpsprune eval` of the folder in float32 agrees exactly
    report = json.loads((out / "report.json").read_text())
    key = str(cli_setup["eval"])
    pruned_ppl = report["extra"]["perplexity"]["pruned"][key]["ppl"]
    eval_json = cli_setup["root"] / "eval.json"
    code, _, stderr = run_cli(
        [
            "eval",
            str(out),
            "--dtype",
            "float32",
            "--ppl",
            key,
            "--seqlen",
            "64",
            "--max-windows",
            "4",
            "-q",
            "--output",
            str(eval_json),
        ]  # fmt: skip
    )
    assert code == 0, stderr
    evaluated = json.loads(eval_json.read_text())
    assert json.dumps(evaluated).count(repr(pruned_ppl)) == 1  # the same float, bit for bit

    # the model card: Hub YAML header, what was done, the command, the perplexity table, the plots
    card_text = (out / "README.md").read_text()
    assert card_text.startswith("---\n")
    header = yaml.safe_load(card_text.split("---\n")[1])
    assert header == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["alpsprune", "pruned", "sparse", "wanda"],
    }  # a local folder is no Hub id: no base_model
    card = ModelCard(card_text)  # huggingface_hub's own parser
    assert card.data.library_name == "transformers" and "sparse" in card.data.tags
    assert "| pattern | 50% unstructured |" in card_text
    assert "| calibration | 4 × 64 tokens from `" in card_text and "| weights | `bfloat16` |" in card_text
    assert "alpsprune prune " + str(cli_setup["model"]) + " --method wanda --sparsity 0.5" in card_text
    dense_ppl = report["extra"]["perplexity"]["dense"][key]["ppl"]
    assert f"| {key} | {dense_ppl:.3f} | {pruned_ppl:.3f} | 4 × 64 |" in card_text
    assert "![relative reconstruction error of every pruned layer, by block](layers.png)" in card_text
    assert (out / "layers.png").is_file()
    assert 'from_pretrained("someone/tiny-pruned")' in card_text
    manifest = json.loads((out / io.MANIFEST).read_text())
    assert "README.md" in {entry["path"] for entry in manifest["files"]}

    # the push: one repository, one upload of the complete folder, as it is on disk
    assert [name for name, _ in stub_hub.calls] == ["create_repo", "upload_folder"]
    create, upload = (kwargs for _, kwargs in stub_hub.calls)
    assert create["repo_id"] == "someone/tiny-pruned" and create["exist_ok"] and create["private"] is None
    assert upload["folder_path"] == out and upload["repo_type"] == "model"
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert stub_hub.remote["someone/tiny-pruned"] == local
    assert "pushed to https://huggingface.co/someone/tiny-pruned" in stdout


def test_push_problems_are_one_line_errors(
    cli_setup: dict[str, Path], stub_hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cli import run_cli

    out = cli_setup["root"] / "never"
    for repo, message in [("not a repo", "is not a valid repository id"), ("justname", "USER/NAME")]:
        code, _, stderr = run_cli(_prune_argv(cli_setup, out, "--push-to-hub", repo))
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run_cli(_prune_argv(cli_setup, out, "--private"))
    assert code == 2 and "--private only applies with --push-to-hub" in stderr
    with monkeypatch.context() as m:
        m.delenv("HF_TOKEN")
        m.setattr("huggingface_hub.get_token", lambda: None)
        code, _, stderr = run_cli(_prune_argv(cli_setup, out, "--push-to-hub", "someone/x"))
    assert code == 2 and "needs a Hugging Face token" in stderr
    with monkeypatch.context() as m:
        m.setenv("HF_HUB_OFFLINE", "1")
        m.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        code, _, stderr = run_cli(_prune_argv(cli_setup, out, "--push-to-hub", "someone/x"))
    assert code == 2 and "offline mode" in stderr
    assert not out.exists() and stub_hub.calls == []  # refused before any work

    # the Hub refuses the upload: the saved folder stays complete and the message says how to retry
    monkeypatch.setattr(StubHub, "fail", OSError("403 Forbidden"))
    code, _, stderr = run_cli(_prune_argv(cli_setup, out, "--push-to-hub", "someone/x"))
    assert code == 2 and "saved in" in stderr and "hf upload someone/x" in stderr
    assert io.is_complete_output(out)


def test_model_card_header_from_python(tmp_path: Path) -> None:
    """`save_pruned` with a pruning report writes the card too; base_model names the Hub source."""
    import yaml

    from alpsprune.report import PruneReport

    settings = {"method": "alps", "sparsity": None, "mask_structure": "2:4", "model": "org/base-model",
                "sequential": "block", "dense_target": False, "allocation": "uniform", "nsamples": 8,
                "seqlen": 32}  # fmt: skip
    out = io.save_pruned(
        make_tiny_model("llama"), None, tmp_path / "o", report=PruneReport(settings=settings)
    )
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["base_model"] == "org/base-model" and header["tags"][-1] == "alps"
    assert "2:4 semi-structured: at most 2 non-zero weights in every 4 consecutive inputs" in text
    bundled = io.save_pruned(
        make_tiny_model("llama"), None, tmp_path / "b",
        report=PruneReport(settings={**settings, "model": "bundled:SmolLM2-135M-Instruct"}),
    )  # fmt: skip
    header = yaml.safe_load((bundled / "README.md").read_text().split("---\n")[1])
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and header["license"] == "apache-2.0"
    # the caller's own README wins; a report without settings gives no card
    mine = io.save_pruned(make_tiny_model("llama"), None, tmp_path / "m", report=PruneReport(settings=settings),
                          extra_files={"README.md": "mine\n"})  # fmt: skip
    assert (mine / "README.md").read_text() == "mine\n"
    assert not (
        io.save_pruned(make_tiny_model("llama"), None, tmp_path / "n", report={"x": 1}) / "README.md"
    ).exists()
