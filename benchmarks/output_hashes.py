"""sha256 of every file a fixed set of merges writes: run it before and after a refactor, diff the two.

The outputs are built from scratch each run, from fixed seeds, in a temp folder:

- two tiny random Llama bases (fp32): one with SmolLM2's byte-level BPE tokenizer (49152 tokens; a
  GGUF needs a tokenizer llama.cpp knows), one with the synthetic word-level tokenizer (hidden 64,
  4 heads / 2 KV heads: what onnxruntime-genai's builder and the ONNX export take);
- a random adapter per method (lora, dora, d2lora, dual_lora), r=4 on every linear layer, seed 0;
- per method, ``merge_as`` to: hf (fp32 and bf16), safetensors, gguf f16 / q8_0 / q4_k_m (the last through
  llama.cpp's quantizer), onnx fp32 (the word-level base), and onnx-genai fp32 (d2lora only: seconds each);
- ``export_gguf`` of the fp32 merged folder (f16), ``convert --to gguf-lora`` of the LoRA, and a merge-many
  run of two jobs (hf + safetensors).

Every file under each output is hashed (names relative to the output). Nothing is normalised; instead the
outputs are built in one fixed folder (``--workdir``, emptied first and removed at the end), because the
random adapters record their base's path (``base_model_name_or_path``), so the adapter's sha256, which the
card, the single-file header and the GGUF metadata carry, depends on where the run happens. Nothing
records a time. The ONNX graphs are the exception to comparing bytes across trees: torch's exporter
writes stack traces into each node's metadata, naming the source file and line of d2merge's
``export/onnx.py`` wrapper, so a checkout at another path, or a line moved in that file, gives other
``model.onnx`` bytes for the same graph (export twice from one tree: the same bytes). Compare those with
the node metadata stripped (``onnx.load``, clear every node's ``metadata_props``, compare the serialised
models). The script runs under ``PYTHONHASHSEED=0`` (it re-executes itself) so that nothing ordered by
Python's string hashing can differ between two runs.

    PYTHONPATH=$PWD python benchmarks/output_hashes.py [--json hashes.json] [--smollm2 FOLDER] [--workdir DIR]

``--smollm2`` names a converted SmolLM2 folder (tests/conftest.py's cache), for its tokenizer files only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

METHODS = ("lora", "dora", "d2lora", "dual_lora")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_SMOLLM2 = Path(__file__).resolve().parent.parent / ".pytest_cache" / "d2merge-real-models"


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_output(path: Path) -> dict[str, str]:
    """Every file of an output (a file, or a folder walked in sorted order), by name relative to it."""
    if path.is_file():
        return {path.name: _sha(path)}
    return {str(p.relative_to(path)): _sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _smollm2_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    root = Path(os.environ.get("D2MERGE_TEST_CACHE") or DEFAULT_SMOLLM2)
    found = sorted(root.glob("smollm2-135m-*"))
    if not found:
        sys.exit(f"no converted SmolLM2 under {root}: run the GGUF tests once, or pass --smollm2")
    return found[0]


def build(root: Path, smollm2: Path) -> dict[str, dict[str, str]]:
    from d2merge.export.formats import merge_as
    from d2merge.export.gguf import convert_to_gguf_lora, export_gguf
    from d2merge.many import merge_many
    from d2merge.options import MergeOptions
    from d2merge.synthetic import DEFAULT_TARGETS, save_random_adapter, save_tiny_base

    hashes: dict[str, dict[str, str]] = {}
    bpe = save_tiny_base(root / "base-bpe", "llama", vocab_size=49152, tokenizer=False)
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, bpe / name)
    wide = save_tiny_base(root / "base-wide", "llama", hidden_size=64, num_heads=4, num_kv_heads=2)
    targets = DEFAULT_TARGETS["llama"]
    for method in METHODS:
        adapter = save_random_adapter(bpe, root / f"adapter-{method}", method, r=4, target_modules=targets)
        wide_adapter = save_random_adapter(wide, root / f"adapter-wide-{method}", method, r=4, target_modules=targets)
        runs = [("hf-fp32", "hf", bpe, adapter, "merged", {"options": MergeOptions(dtype="fp32")}),
                ("hf-bf16", "hf", bpe, adapter, "merged-bf16", {"options": MergeOptions(dtype="bf16")}),
                ("safetensors", "safetensors", bpe, adapter, "merged.safetensors", {}),
                ("gguf-f16", "gguf", bpe, adapter, "f16.gguf", {"gguf_type": "f16", "gguf_modelfile": True}),
                ("gguf-q8_0", "gguf", bpe, adapter, "q8_0.gguf", {"gguf_type": "q8_0"}),
                ("gguf-q4_k_m", "gguf", bpe, adapter, "q4_k_m.gguf", {"gguf_type": "q4_k_m"}),
                ("onnx-fp32", "onnx", wide, wide_adapter, "onnx/model.onnx", {})]
        if method == "d2lora":
            runs.append(("onnx-genai-fp32", "onnx-genai", wide, wide_adapter, "genai", {}))
        (root / method).mkdir()
        for label, fmt, base, adp, out, kwargs in runs:
            target = root / method / out
            print(f"{method} {label} ...", file=sys.stderr, flush=True)
            outcome = merge_as(base, adp, target, format=fmt, **kwargs)
            where = outcome.output if fmt != "onnx" else outcome.output.parent
            hashes[f"{method}/{label}"] = hash_output(where)
            if fmt == "gguf" and kwargs.get("gguf_modelfile"):
                modelfile = outcome.output.with_suffix(".Modelfile")
                hashes[f"{method}/{label}"][modelfile.name] = _sha(modelfile)
        exported = export_gguf(root / method / "merged", root / method / "export-f16.gguf", gguf_type="f16")
        hashes[f"{method}/export-gguf-f16"] = hash_output(exported.output)
        if method == "lora":
            result = convert_to_gguf_lora(adapter, bpe, root / method / "adapter.gguf")
            hashes[f"{method}/convert-gguf-lora"] = hash_output(Path(result.out))
    jobs = root / "jobs.json"
    jobs.write_text(json.dumps({"jobs": [{"adapter": str(root / "adapter-d2lora"), "name": "a"},
                                         {"adapter": str(root / "adapter-dora"), "name": "b",
                                          "format": "safetensors"}]}))
    print("merge-many ...", file=sys.stderr, flush=True)
    merge_many(bpe, jobs, root / "many")
    hashes["many/a"] = hash_output(root / "many" / "a")
    hashes["many/b"] = hash_output(root / "many" / "b.safetensors")
    return hashes


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":  # two runs hash strings alike (see above)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the hashes here")
    parser.add_argument("--smollm2", help="a converted SmolLM2 folder (its tokenizer files)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "d2merge-output-hashes"),
                        help="where the outputs are built (the same path in every run; emptied first)")
    args = parser.parse_args()
    torch.manual_seed(0)
    smollm2 = _smollm2_folder(args.smollm2)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        hashes = build(root, smollm2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [f"{digest}  {output}/{name}" for output, files in hashes.items() for name, digest in files.items()]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
