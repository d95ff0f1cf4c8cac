"""Builders shared by the CLI and distributed tests: a tiny local model folder and a tiny local corpus."""

from __future__ import annotations

from pathlib import Path

from tiny_models import make_tiny_model


def make_model_dir(path: Path) -> Path:
    """A tiny random Llama saved with the bundled SmolLM2 tokenizer (vocab = len(tokenizer))."""
    from alpsprune.io import load_tokenizer

    tokenizer = load_tokenizer(None)
    model = make_tiny_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=True)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_corpus(folder: Path) -> tuple[Path, Path]:
    """Two disjoint .txt files (calibration, evaluation) of Wikipedia-excerpt articles, one per paragraph."""
    from alpsprune.data import load_text

    docs = [" ".join(d.split()) for d in load_text("wiki-excerpt", split="all")]
    docs = [d for d in docs if 2000 < len(d) < 8000]
    folder.mkdir(parents=True, exist_ok=True)
    calib, held_out = folder / "calib.txt", folder / "eval.txt"
    calib.write_text("\n\n".join(docs[:4]) + "\n", encoding="utf-8")
    held_out.write_text("\n\n".join(docs[4:8]) + "\n", encoding="utf-8")
    return calib, held_out
