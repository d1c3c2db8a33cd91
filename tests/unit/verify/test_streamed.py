"""verify.streamed: models run one decoder block at a time give the whole model's numbers, bit for bit.

The whole-model forward (``d2merge.forward.WholeModel`` on ``load_fp32_model``) is the oracle:
on every tiny architecture, stored in fp32 and bf16, with an adapter attached and with the
rounding floor's change, the streamed logits must equal it exactly (fp32 on the CPU), and a
whole verify report must be identical whichever way its models ran.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from d2merge.forward import Call, WholeModel
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import open_base
from d2merge.runtime import attach_adapter, load_fp32_model
from d2merge.tasks import MCExample, choice_scores, eval_examples, load_tokenizer, write_jsonl
from d2merge.verify import apply_rounding, probe_logits, random_probes, verify
from d2merge.verify import streamed
from d2merge.verify.streamed import Rounding, StreamedModel, streamable

ARCHS = ("llama", "qwen2", "gpt2")


def whole(base: Path, adapter: Any = None, rounding: Rounding | None = None) -> WholeModel:
    model = load_fp32_model(base)
    if rounding is not None:
        apply_rounding(model, set(rounding.rewritten), rounding.dtype, seed=rounding.seed)
    if adapter is not None:
        attach_adapter(model, adapter)
    return WholeModel(model.eval())


def streamed_model(base: Path, adapter: Any = None, rounding: Rounding | None = None, budget: int = 1 << 30
                   ) -> StreamedModel:
    checkpoint = open_base(base)
    parts = streamable(checkpoint)
    assert not isinstance(parts, str), parts
    return StreamedModel(checkpoint, parts, adapter=adapter, rounding=rounding, budget=budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_logits_equal_the_whole_model_bitwise(arch: str, dtype: torch.dtype, tiny_bases: Callable[..., Path],
                                                       make_adapter: Callable[..., Path]) -> None:
    base = tiny_bases(arch, dtype=dtype)
    adapter = load_adapter(make_adapter(base, "d2lora", seed=1, magnitude=0.05))
    probes = random_probes(128, count=5, length=9, seed=0)
    # Uneven probe lengths: padding masks must be built as the model builds them.
    probes.attention_mask[1, 6:] = 0
    probes.attention_mask[3, 2:] = 0
    rewritten = {name for name, _ in load_fp32_model(base).named_parameters() if name.endswith("proj.weight")
                 or name.endswith("c_attn.weight")}
    rounding = Rounding(torch.bfloat16, frozenset(rewritten), 3)
    for adapted, rounded in ((None, None), (adapter, None), (adapter, rounding)):
        expected = probe_logits(whole(base, adapted, rounded), probes, 2)
        got = probe_logits(streamed_model(base, adapted, rounded), probes, 2)
        assert torch.equal(expected, got), (arch, dtype, adapted is not None, rounded is not None)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_mc_scores_share_prompts_and_match_the_whole_model(arch: str, tiny_bases: Callable[..., Path],
                                                                    make_adapter: Callable[..., Path]) -> None:
    """Prompt + choices calls (one block's KV cache at a time) score as the whole model scores.

    The prompt's last-position logits are a matrix-vector product whose summation order depends
    on its operands' memory alignment, so a score may differ in the last bit (6e-8 measured on
    these models; the probe logits, full matrix products, never do): the answers, hence every
    MC figure of the report, must not.
    """
    base = tiny_bases(arch, dtype=torch.bfloat16)
    adapter = load_adapter(make_adapter(base, "lora", seed=2))
    tokenizer = load_tokenizer(base)
    examples = [*eval_examples(9), MCExample("Dogs", ("bark", "meow loudly at night"), 0)]  # mixed prompt lengths
    expected = choice_scores(whole(base, adapter), tokenizer, examples, batch_size=3)
    model = streamed_model(base, adapter, budget=1 << 12)  # a few KB: several passes over the weights
    assert model.shares_prompts and len(model.chunks([Call(torch.zeros(3, 9, dtype=torch.long),
                                                            torch.ones(3, 9, dtype=torch.long))] * 4)) > 1
    got = choice_scores(model, tokenizer, examples, batch_size=3)
    flat_expected = torch.tensor([x for s in expected for x in s], dtype=torch.float64)
    flat_got = torch.tensor([x for s in got for x in s], dtype=torch.float64)
    assert torch.allclose(flat_got, flat_expected, rtol=0, atol=1e-5)
    from d2merge.tasks import predictions

    assert predictions(got) == predictions(expected)


def test_blocks_reuse_one_blocks_memory_and_never_change_the_source(tiny_bases: Callable[..., Path],
                                                                    make_adapter: Callable[..., Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Block i+1 runs in block i's fp32 tensors; a source that hands out its own tensors keeps them unrounded."""
    from dataclasses import replace

    base = tiny_bases("llama")  # fp32: the reads would be the stored tensors themselves
    adapter = load_adapter(make_adapter(base, "lora", seed=4, magnitude=0.05))
    checkpoint = open_base(base)
    held = {name: checkpoint.tensors.read(name) for name in checkpoint.tensors.keys()}
    pristine = {name: tensor.clone() for name, tensor in held.items()}

    class InMemory:  # as d2merge.io.checkpoint.PickleFiles: read() returns the held tensor, no copy
        keys, info, file_of = checkpoint.tensors.keys, checkpoint.tensors.info, checkpoint.tensors.file_of

        def read(self, name: str, buffer: Any = None) -> torch.Tensor:
            return held[name]

    in_memory = replace(checkpoint, tensors=InMemory())
    pointers: list[set[int]] = []
    kept: list[list[torch.Tensor]] = []
    real = StreamedModel._materialize

    def recording(self: StreamedModel, module: torch.nn.Module, prefix: str, skip: str | None = None, *,
                  block: bool = False) -> None:
        real(self, module, prefix, skip, block=block)
        if block:  # held here too, so without the reuse block 1 could not land in block 0's memory by chance
            pointers.append({p.data_ptr() for p in module.parameters()})
            kept.append([p.data for p in module.parameters()])

    monkeypatch.setattr(StreamedModel, "_materialize", recording)
    rewritten = frozenset(name for name in held if name.endswith("proj.weight"))
    rounding = Rounding(torch.bfloat16, rewritten, 3)
    probes = random_probes(128, count=3, length=6, seed=2)
    parts = streamable(in_memory)
    assert not isinstance(parts, str), parts
    got = probe_logits(StreamedModel(in_memory, parts, adapter=adapter, rounding=rounding), probes, 2)
    assert all(torch.equal(held[name], pristine[name]) for name in held), "the floor rounded the source's tensors"
    assert len(pointers) == 2 and pointers[0] == pointers[1], "block 1 did not reuse block 0's tensors"
    monkeypatch.setattr(StreamedModel, "_materialize", real)
    assert torch.equal(got, probe_logits(whole(base, adapter, rounding), probes, 2))


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_blocks_are_read_ahead_in_order_and_give_the_same_logits(tiny_bases: Callable[..., Path],
                                                                 make_adapter: Callable[..., Path],
                                                                 monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """A thread reads block i+1 while block i runs: every block tensor through it, one block of buffers, same bits."""
    from d2merge.io import tensor_reader
    from d2merge.io.tensor_reader import TensorReader

    base = tiny_bases("llama", dtype=torch.bfloat16, sharded=True)
    adapter = load_adapter(make_adapter(base, "lora", seed=5, magnitude=0.05))
    readers: list[TensorReader] = []
    real_init = TensorReader.__init__

    def init(self: TensorReader, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        if kwargs.get("schedule"):
            readers.append(self)

    monkeypatch.setattr(TensorReader, "__init__", init)
    monkeypatch.setattr(tensor_reader, "cold_enough", lambda paths: direct)
    seen: list[str] = []
    expected: list[list[list[str]]] = []

    class Recorder:
        def expect(self, blocks: Any) -> None:
            expected.append([list(block) for block in blocks])

        def check(self, name: str, tensor: torch.Tensor) -> None:
            seen.append(name)

    model = streamed_model(base, adapter)
    model.checker = Recorder()
    probes = random_probes(128, count=4, length=7, seed=6)
    got = probe_logits(model, probes, 2)
    assert torch.equal(got, probe_logits(whole(base, adapter), probes, 2))
    blocks = [name for name in seen if ".layers." in name]
    per_block = len(blocks) // len(model.blocks)
    # told the block reads, block by block, in the order they came
    assert expected == [[blocks[i:i + per_block] for i in range(0, len(blocks), per_block)]]
    assert len(readers) == 1 and len(readers[0]._slots) == per_block
    assert readers[0].bytes_read == sum(torch.Size(model.checkpoint.tensors.info(n)[1]).numel() * 2 for n in blocks)
    assert (readers[0].direct_bytes > 0) == direct
    assert sorted(set(seen)) == sorted(model.checkpoint.tensors.keys())  # the checker saw every tensor the run read


def test_chunked_passes_give_the_same_logits(tiny_bases: Callable[..., Path]) -> None:
    base = tiny_bases("llama")
    probes = random_probes(128, count=6, length=7, seed=4)
    one_pass = streamed_model(base)
    many = streamed_model(base, budget=1)  # every batch in a pass of its own
    assert len(many.chunks([Call(probes.input_ids[:2], probes.attention_mask[:2])] * 3)) == 3
    assert torch.equal(probe_logits(one_pass, probes, 2), probe_logits(many, probes, 2))


@pytest.mark.slow
def test_verify_report_is_identical_streamed_or_whole(tiny_bases: Callable[..., Path],
                                                      make_adapter: Callable[..., Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_bases("llama")
    adapter = make_adapter(base, "d2lora", seed=1, magnitude=0.05)
    eval_set = write_jsonl(tmp_path / "eval.jsonl", eval_examples(40))
    lines: list[str] = []
    report = verify(base, adapter, dtypes="fp32,bf16", mc_eval=eval_set, echo=lines.append)
    assert any("hidden states between blocks" in line for line in lines)
    monkeypatch.setattr(streamed, "streamable", lambda checkpoint: "the test asks for whole models")
    whole_lines: list[str] = []
    oracle = verify(base, adapter, dtypes="fp32,bf16", mc_eval=eval_set, echo=whole_lines.append)
    assert any("whole, not block by block (the test asks for whole models)" in line and "GiB" in line
               for line in whole_lines)
    assert json.dumps(report.to_json(), sort_keys=True) == json.dumps(oracle.to_json(), sort_keys=True)
    assert report.passed


def test_at_most_one_block_is_alive_at_a_time(tiny_bases: Callable[..., Path], make_adapter: Callable[..., Path],
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One block at a time, and one pass over each model's weights for the probes and the MC items together."""
    base = tiny_bases("qwen2")
    adapter = make_adapter(base, "dora", seed=1)
    alive: list[weakref.ref] = []
    real = StreamedModel._materialize

    def tracking(self: StreamedModel, module: torch.nn.Module, prefix: str, skip: str | None = None, *,
                 block: bool = False) -> None:
        assert all(ref() is None for ref in alive), "a block was still alive when the next one loaded"
        real(self, module, prefix, skip, block=block)
        alive.append(weakref.ref(module))

    monkeypatch.setattr(StreamedModel, "_materialize", tracking)
    report = verify(base, adapter, dtypes="fp32,bf16", mc_eval=write_jsonl(tmp_path / "eval.jsonl", eval_examples(12)))
    # unmerged, then per dtype the floor and the merged model: 5 models x (head + 2 blocks + tail), one pass each
    assert report.passed and report.results[0].mc is not None and len(alive) == 5 * 4


def test_unsplittable_models_run_whole_with_one_line(tiny_bases: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    from d2merge.io.safetensors_file import save_tensors

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_bases("llama"), folder)
    checkpoint = open_base(folder)
    tensors = {name.replace("model.norm.", "model.final_norm."): checkpoint.tensors.read(name).clone()
               for name in checkpoint.tensors.keys()}
    (file,) = checkpoint.weight_files
    save_tensors(file, tensors, {"format": "pt"})
    reason = streamable(open_base(folder))
    assert reason == "parameter model.norm.weight is not stored under its name in the checkpoint"
    lines: list[str] = []
    opened = streamed.open_forward(open_base(folder), say=lines.append, load=lambda location, **_: load_fp32_model(
        tiny_bases("llama")))
    assert isinstance(opened, WholeModel) and len(lines) == 1
    assert reason in lines[0] and "GiB of fp32 weights" in lines[0]


def test_blocks_go_to_the_device_through_the_device_abstraction(tiny_bases: Callable[..., Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda`` runs this path on a GPU; on the CPU every weight still goes through ``upload``."""
    from d2merge.device import ComputeDevice

    uploads: list[tuple[int, ...]] = []
    device = ComputeDevice("cpu")
    real = device.upload
    monkeypatch.setattr(device, "upload", lambda tensor: uploads.append(tuple(tensor.shape)) or real(tensor))
    base = tiny_bases("gpt2")
    checkpoint = open_base(base)
    model = StreamedModel(checkpoint, streamable(checkpoint), device=device)  # type: ignore[arg-type]
    probes = random_probes(128, count=2, length=5, seed=0)
    assert torch.equal(probe_logits(model, probes, 2), probe_logits(whole(base), probes, 2))
    stored = {tuple(checkpoint.tensors.info(name)[1]) for name in checkpoint.tensors.keys()}
    assert uploads and set(uploads) <= stored


def test_a_forward_that_changes_hidden_states_between_blocks_runs_whole(tiny_bases: Callable[..., Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming replays block i on block i-1's output; a model that does more in between runs whole."""
    base = tiny_bases("llama")
    real = streamed._Recorder.forward

    def changing(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return real(self, hidden_states, *args, **kwargs) * 1.0  # a new tensor, as a scaling model makes

    monkeypatch.setattr(streamed._Recorder, "forward", changing)
    lines: list[str] = []
    model = streamed.open_forward(open_base(base), say=lines.append)
    assert isinstance(model, StreamedModel)
    probes = random_probes(128, count=2, length=5, seed=0)
    assert torch.equal(probe_logits(model, probes, 2), probe_logits(whole(base), probes, 2))
    assert any("whole, not block by block (its forward does more between decoder blocks" in line for line in lines)


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "cuda"], "--device cuda was asked for but no CUDA device is available"),
    (["--max-activation-memory", "0"], "max-activation-memory must be at least 1, got 0"),
])
def test_cli_refuses_bad_streaming_options_in_one_line(flags: list[str], message: str, tiny_bases: Callable[..., Path],
                                                      make_adapter: Callable[..., Path], cli_runner: Any) -> None:
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    base = tiny_bases("llama")
    code, out, err = cli_runner(["verify", base, make_adapter(base, "lora"), "--dtypes", "fp32", *flags])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_prints_the_hidden_state_budget(tiny_bases: Callable[..., Path], make_adapter: Callable[..., Path],
                                           cli_runner: Any) -> None:
    base = tiny_bases("gpt2")
    code, out, err = cli_runner(["verify", base, make_adapter(base, "lora"), "--max-activation-memory", "3"])
    assert code == 0, out + err
    assert "MiB of hidden states between blocks, 1 pass(es) over the weights (--max-activation-memory 3 MiB)" in err
