"""A QLoRA merge's cost: the same LoRA merged from an nf4 (double-quant) base and from its bf16 original.

Builds the random 1.1B Llama-shaped bf16 checkpoint of benchmarks/merge_speed.py and its LoRA r=16
on every linear layer, quantizes every linear weight with bitsandbytes' own ``quantize_4bit``
(nf4, blocksize 64, double quant; the tensors and quant-state blobs transformers' save_pretrained
writes, with the quantization_config it writes), then runs, each in its own process (wall, CPU,
peak RSS from ``os.wait4``), round-robin ``--repeat`` times after one unmeasured prime each:

- ``bf16 base``: ``d2merge merge BF16 ADAPTER -o OUT --no-hash-sources``
- ``nf4 base``:  ``d2merge merge NF4 ADAPTER -o OUT --no-hash-sources`` (bf16 output, dequantized)

    python benchmarks/qlora_merge.py --repeat 2          # 1.1B; about 5 GB of disk while it runs
    python benchmarks/qlora_merge.py --layers 2 --repeat 1   # a quick small run

bitsandbytes is needed only to build the nf4 checkpoint (the benchmark's oracle of the layout).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import SHAPES, build_checkpoint, build_lora, run_measured  # noqa: E402

from d2merge.io.safetensors_file import SafetensorsFile, save_tensors  # noqa: E402

QUANTIZATION_CONFIG = {  # what transformers 5 writes for BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16)
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def quantize_nf4(base: Path, folder: Path) -> None:
    """Every ``*_proj.weight`` of ``base`` in bitsandbytes' saved nf4 layout; the rest as stored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as BF

    source = SafetensorsFile(base / "model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for name in source.keys():
        tensor = source.read(name).clone()
        if not name.endswith("_proj.weight"):
            tensors[name] = tensor
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            packed, state = BF.quantize_4bit(tensor, blocksize=64, quant_type="nf4", compress_statistics=True)
        tensors[name] = packed
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{name}.{key}"] = value
    folder.mkdir(parents=True)
    save_tensors(folder / "model.safetensors", tensors, {"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["layers"] = args.layers
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-qlora-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base, nf4, adapter = root / "bf16", root / "nf4", root / "adapter"
    try:
        if not base.exists():
            params = build_checkpoint(base, dtype=torch.bfloat16, **shape)
            print(f"built {params / 1e9:.2f}B-parameter bf16 checkpoint", flush=True)
        if not adapter.exists():
            build_lora(base, adapter, rank=args.rank, hidden=shape["hidden"], layers=shape["layers"],
                       intermediate=shape["intermediate"],
                       kv_dim=shape["kv_heads"] * (shape["hidden"] // shape["heads"]))
        if not nf4.exists():
            quantize_nf4(base, nf4)
            print(f"quantized to nf4: {(nf4 / 'model.safetensors').stat().st_size / 1e9:.2f} GB", flush=True)
        env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
               "PATH": "/usr/bin:/bin"}
        runs = {"bf16 base": base, "nf4 base": nf4}
        figures: dict[str, list[dict[str, float]]] = {label: [] for label in runs}
        for _ in range(args.repeat):
            for label, source in runs.items():
                out = root / "out"
                argv = [sys.executable, "-m", "d2merge.cli", "merge", str(source), str(adapter), "-q", "-o", str(out),
                        "--no-hash-sources"]
                for measured in (False, True):  # one unmeasured prime: the base's pages warm, as in merge_speed
                    shutil.rmtree(out, ignore_errors=True)
                    result = run_measured(argv, env=env, cwd=root)
                    if result["code"] != 0:
                        raise SystemExit(f"{label}: {result['stderr']}")
                    if measured:
                        figures[label].append(result)
                shutil.rmtree(out, ignore_errors=True)
        summary = {label: {key: statistics.median(r[key] for r in rs) for key in ("wall", "user", "sys", "rss")}
                   for label, rs in figures.items()}
        print(f"{'':12} {'wall s':>8} {'cpu s':>8} {'peak RSS GB':>12}")
        for label, s in summary.items():
            print(f"{label:12} {s['wall']:8.2f} {s['user'] + s['sys']:8.2f} {s['rss'] / 1e9:12.2f}")
        ratio = summary["nf4 base"]["rss"] / summary["bf16 base"]["rss"]
        print(f"peak RSS nf4/bf16: {ratio:.2f}x; wall nf4/bf16: "
              f"{summary['nf4 base']['wall'] / summary['bf16 base']['wall']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps({"shape": shape, "summary": summary, "runs": figures}, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
