"""Time and peak RSS of ``d2merge extract`` and ``d2merge convert`` at a model shape (1.1B by default).

Builds, with merge_speed.py's streaming builder, a random bf16 Llama-layout base of the shape,
a LoRA r=16 on every linear layer, a TUNED model (the base with that LoRA merged, by d2merge)
and a DoRA adapter of the same rank, then measures, each in its own process (wall, CPU and
peak RSS from ``os.wait4``, merge_speed.run_measured):

- ``extract BASE TUNED --rank 16``: one SVD per changed module (154 at 1.1B)
- ``convert DORA --base BASE --rank 16``: the DoRA update (full rank) of each module, its SVD
- ``convert DORA --base BASE --rank 16 --to gguf-lora`` (the same, written as llama.cpp's GGUF)

each with ``--svd full`` and ``--svd randomized`` (``--svd`` picks), and prints the least energy
each kept (extract's is below 1 only by the bf16 rounding of TUNED's merged weights).

    nice -n 10 python benchmarks/adapter_ops.py --shape 1.1b --json adapter_ops.json
    python benchmarks/adapter_ops.py --layers 2        # a quick run at the 1.1B widths
    # the inputs once, then extract and convert with the full SVD side by side, one process each:
    python benchmarks/adapter_ops.py --workdir W --ops ""
    python benchmarks/adapter_ops.py --workdir W --svd full --ops extract --json extract.json &
    python benchmarks/adapter_ops.py --workdir W --svd full --ops convert --json convert.json
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
from merge_speed import SHAPES, build_checkpoint, build_lora, run_measured  # noqa: E402


def build_dora(base: Path, lora: Path, folder: Path) -> None:
    """The LoRA's factors with DoRA magnitudes within 1% of ||W0 + s B A|| per row (as a trained DoRA's)."""
    from d2merge.io.adapter import load_adapter, write_adapter
    from d2merge.io.checkpoint import open_base

    adapter = load_adapter(lora)
    checkpoint = open_base(base)
    tensors = {key: adapter.tensors.read(key) for module in adapter.modules.values() for key in module.keys.values()}
    generator = torch.Generator().manual_seed(2)
    scale = adapter.config.lora_alpha / adapter.config.r
    for module in adapter.modules:
        factors = adapter.factors(module)
        v = checkpoint.tensors.read(f"{module}.weight").float() + scale * factors["lora_B"] @ factors["lora_A"]
        norms = torch.linalg.vector_norm(v, dim=1)
        tensors[f"base_model.model.{module}.lora_magnitude_vector"] = \
            norms * (1 + 0.01 * torch.randn(norms.shape, generator=generator))
    config = {**adapter.config.raw, "use_dora": True}
    write_adapter(folder, config, tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers at the same widths (quick runs)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--svd", default="full,randomized", help="comma-separated: full, randomized")
    parser.add_argument("--ops", default="extract,convert,gguf",
                        help="comma-separated: extract, convert (--to lora), gguf (--to gguf-lora); empty: only build "
                             "the inputs in --workdir (then run ops in parallel processes on them)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2merge-adapter-ops-"))
    root.mkdir(parents=True, exist_ok=True)
    base, lora, tuned, dora = root / "base", root / "lora", root / "tuned", root / "dora"
    if not base.exists():
        params = build_checkpoint(base, dtype=torch.bfloat16, **shape)
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]  # merge_speed's config names none; GGUF needs it
        (base / "config.json").write_text(json.dumps(config, indent=2))
        print(f"built a {params / 1e9:.2f}B-parameter bf16 base in {base}", flush=True)
    if not lora.exists():
        build_lora(base, lora, rank=args.rank, hidden=shape["hidden"], layers=shape["layers"],
                   intermediate=shape["intermediate"], kv_dim=shape["kv_heads"] * (shape["hidden"] // shape["heads"]))
    d2merge = [sys.executable, "-m", "d2merge"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not tuned.exists():
        run_measured([*d2merge, "merge", str(base), str(lora), "-o", str(tuned), "--no-hash-sources"], env=env,
                     cwd=root)
    if not dora.exists():
        build_dora(base, lora, dora)
    runs = {}
    ops = {o for o in args.ops.split(",") if o}
    for kind in [k for k in args.svd.split(",") if k]:
        svd = ["--svd", kind]
        runs[f"extract {kind}"] = [*d2merge, "extract", str(base), str(tuned), "--rank", str(args.rank), *svd, "-o",
                                   str(root / "extracted"), "--report", str(root / f"extract-{kind}.json"),
                                   "--overwrite"]
        runs[f"convert lora {kind}"] = [*d2merge, "convert", str(dora), "--base", str(base), "--rank",
                                        str(args.rank), *svd, "-o", str(root / "converted"), "--report",
                                        str(root / f"convert-{kind}.json"), "--overwrite"]
        runs[f"convert gguf {kind}"] = [*d2merge, "convert", str(dora), "--base", str(base), "--rank",
                                        str(args.rank), *svd, "--to", "gguf-lora", "-o", str(root / "converted.gguf"),
                                        "--overwrite"]
    runs = {label: argv for label, argv in runs.items()
            if {"extract": "extract", "convert lora": "convert", "convert gguf": "gguf"}[label.rsplit(" ", 1)[0]] in ops}
    figures: dict[str, dict[str, float]] = {"shape": {**shape, "rank": args.rank}}  # type: ignore[dict-item]
    for label, argv in runs.items():
        got = run_measured(argv, env=env, cwd=root)
        figures[label] = {"wall_s": got["wall"], "user_s": got["user"], "sys_s": got["sys"],
                          "peak_rss_bytes": got["rss"]}
        print(f"{label:<18} {got['wall']:8.1f} s wall {got['user']:8.1f} s user  peak RSS {got['rss'] / 1e9:.3f} GB",
              flush=True)
    for label in runs:
        if label.startswith("convert gguf"):
            continue
        kind = label.rsplit(" ", 1)[1]
        report = json.loads((root / f"{'extract' if label.startswith('extract') else 'convert'}-{kind}.json").read_text())
        figures[label]["modules"] = len(report["modules"])
        figures[label]["min_retained_energy"] = report["min_retained_energy"]
        print(f"{label}: {len(report['modules'])} modules, least energy kept {report['min_retained_energy']:.6f}")
    figures["base_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))  # type: ignore[assignment]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
