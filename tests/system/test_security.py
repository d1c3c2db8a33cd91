"""Security: no unpickling without --allow-pickle, bounded header sizes, no Hub token in any output.

- Every unpickling entry point (torch.load, pickle.load/loads/Unpickler) is replaced by one that
  fails loudly, then merges, plans, dry runs and inspections run over .bin inputs without the
  flag: each must refuse with the pickle hint before anything is unpickled. With the flag,
  every load goes through torch.load(weights_only=True) and a code-execution payload is refused.
- Header lengths are checked against hard limits and the file size before anything is read.
- `d2merge push` never prints or writes the token: dry run, an unreachable endpoint (in a fresh
  interpreter, with HF_ENDPOINT set as a user would) and a server that echoes the token back.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

import d2merge.cli
from d2merge.api import merge, plan
from d2merge.errors import D2MergeError
from d2merge.io.adapter import load_adapter
from d2merge.io.checkpoint import MAX_JSON_BYTES, PICKLE_HINT, open_base
from d2merge.io.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile, save_tensors
from d2merge.planning import build_plan
from helpers import REPO_ROOT, checkout_env
from malformed import MARKER, Workspace, adapter_tensors, base_tensors, write_pickle_payload, write_templates

TOKEN = "hf_SECRETsecurityTOKEN0123456789"
ENV_TOKEN = "hf_ENVsecurityTOKEN9876543210"


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_templates(tmp_path_factory.mktemp("security-templates"))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
            ) -> tuple[int, str, str]:
    monkeypatch.setitem(d2merge.cli._DEBUG, "on", False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        d2merge.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    monkeypatch.setitem(d2merge.cli._DEBUG, "on", False)
    return int(exited.value.code or 0), out, err


# -- pickle: never without the opt-in ------------------------------------------------------------


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way to unpickle fails the test loudly (and is recorded, in case a caller swallows it)."""
    calls: list[str] = []

    def forbidden(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called without --allow-pickle")
        return fail

    class ForbiddenUnpickler(pickle.Unpickler):  # a class still, so that libraries may subclass it
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            forbidden("pickle.Unpickler")()

    for target, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, forbidden(f"{target.__name__}.{name}"))
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    return calls


def pickle_inputs(ws: Workspace, layout: str) -> tuple[Path, Path]:
    """(base, adapter) where one of them is pickle in the given layout, the other safetensors."""
    ws.copy("base")
    ws.copy("adapter")
    if layout == "adapter-bin":
        (ws.adapter / "adapter_model.safetensors").unlink()
        torch.save(adapter_tensors(), ws.adapter / "adapter_model.bin")
        return ws.base, ws.adapter
    (ws.base / "model.safetensors").unlink()
    tensors = base_tensors()
    if layout == "base-bin":
        torch.save(tensors, ws.base / "pytorch_model.bin")
        return ws.base, ws.adapter
    if layout == "base-bin-file":
        torch.save(tensors, ws.base / "weights.pt")
        return ws.base / "weights.pt", ws.adapter
    assert layout == "base-bin-sharded"
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, ws.base / shard)
        weight_map.update({n: shard for n in part})
    (ws.base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ws.base, ws.adapter


LAYOUTS = ("base-bin", "base-bin-file", "base-bin-sharded", "adapter-bin")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_library_refuses_pickle_without_opt_in(layout: str, templates: Path, tmp_path: Path,
                                               no_unpickling: list[str]) -> None:
    base, adapter = pickle_inputs(Workspace(tmp_path, templates), layout)
    attempts = [lambda: plan(base, adapter), lambda: build_plan(base, adapter),
                lambda: merge(base, adapter, tmp_path / "out")]
    attempts.append((lambda: load_adapter(adapter)) if layout == "adapter-bin" else (lambda: open_base(base)))
    for attempt in attempts:
        with pytest.raises(D2MergeError) as refused:
            attempt()
        # the option as Python spells it (the CLI prints --allow-pickle: test_cli_refuses_pickle_without_opt_in)
        assert PICKLE_HINT.replace("{allow_pickle=}", "allow_pickle=True") in str(refused.value)
    assert no_unpickling == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_refuses_pickle_without_opt_in(layout: str, templates: Path, tmp_path: Path, no_unpickling: list[str],
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = pickle_inputs(Workspace(tmp_path, templates), layout)
    commands = [["merge", base, adapter, "-o", tmp_path / "out", "-q"],
                ["merge", base, adapter, "--dry-run"],
                ["merge", base, adapter, "-o", tmp_path / "out.safetensors", "--format", "safetensors", "-q"]]
    if layout == "adapter-bin":
        commands.append(["inspect", adapter])
    for argv in commands:
        code, out, err = run_cli(argv, capsys, monkeypatch)
        assert code == 2, (argv, out, err)
        assert err.startswith("d2merge: error: ") and "--allow-pickle" in err and len(err.splitlines()) == 1, err
    assert no_unpickling == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    if layout == "adapter-bin":  # merge-many's job line names the flag too, not the Python option
        manifest = tmp_path.parent / f"{tmp_path.name}-manifest.json"
        manifest.write_text(json.dumps([str(adapter)]))
        code, out, err = run_cli(["merge-many", base, manifest, "-o", tmp_path / "many", "-q"], capsys, monkeypatch)
        assert code == 2 and "--allow-pickle" in err and "allow_pickle=" not in err + out, (out, err)
        assert no_unpickling == []


def test_runtime_and_export_loaders_refuse_pickle(templates: Path, tmp_path: Path, no_unpickling: list[str]) -> None:
    """Loading a base through transformers (bench, the unmerged runtime, ONNX export) is no back door."""
    from d2merge.runtime import load_base_model

    base, _ = pickle_inputs(Workspace(tmp_path, templates), "base-bin")
    with pytest.raises(D2MergeError, match="safetensors"):
        load_base_model(base)
    assert no_unpickling == []


def test_safetensors_is_preferred_over_a_pickle_beside_it(templates: Path, tmp_path: Path, no_unpickling: list[str],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path, templates)
    ws.copy("base")
    ws.copy("adapter")
    write_pickle_payload(ws.base / "pytorch_model.bin", ws.marker, zip_format=False)
    write_pickle_payload(ws.adapter / "adapter_model.bin", ws.marker, zip_format=False)
    code, _, err = run_cli(["merge", ws.base, ws.adapter, "-o", ws.out, "-q"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert no_unpickling == []
    assert not ws.marker.exists()


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """torch.load still works but records its keyword arguments."""
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_opt_in_loads_only_with_weights_only_and_gives_the_same_merge(templates: Path, tmp_path: Path,
                                                                      load_calls: list[dict[str, Any]]) -> None:
    pickled = Workspace(tmp_path / "pickled", templates)
    base, adapter = pickle_inputs(pickled, "base-bin-sharded")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(adapter_tensors(), adapter / "adapter_model.bin")

    result = merge(base, adapter, tmp_path / "from-pickle", allow_pickle=True)
    expected = merge(templates / "base", templates / "adapter", tmp_path / "from-safetensors")
    assert len(load_calls) == 3  # two base shards and the adapter
    assert all(call.get("weights_only") is True for call in load_calls)
    assert (result.output / "model.safetensors").read_bytes() == (expected.output / "model.safetensors").read_bytes()


@pytest.mark.parametrize("zip_format", [False, True], ids=["raw-pickle", "torch-save-zip"])
@pytest.mark.parametrize("where", ["base", "adapter"])
def test_code_execution_payload_is_refused_even_with_opt_in(zip_format: bool, where: str, templates: Path,
                                                            tmp_path: Path, load_calls: list[dict[str, Any]]) -> None:
    ws = Workspace(tmp_path, templates)
    ws.copy("base")
    ws.copy("adapter")
    if where == "base":
        (ws.base / "model.safetensors").unlink()
        payload = ws.base / "pytorch_model.bin"
    else:
        (ws.adapter / "adapter_model.safetensors").unlink()
        payload = ws.adapter / "adapter_model.bin"
    write_pickle_payload(payload, ws.marker, zip_format=zip_format)

    with pytest.raises(D2MergeError) as refused:
        merge(ws.base, ws.adapter, ws.out, allow_pickle=True)
    message = str(refused.value)
    assert str(payload) in message and "refused to load pickle" in message and "system" in message
    # torch's own text advises weights_only=False: that advice must not reach the user
    assert "weights_only` set to `False`" not in message and "set to False" not in message
    assert load_calls and all(call.get("weights_only") is True for call in load_calls)
    assert not ws.marker.exists() and not (Path.cwd() / MARKER).exists()
    assert not ws.out.exists()


# -- header sizes are bounded before anything is allocated ----------------------------------------


def peak_allocation(fn: Any) -> tuple[int, BaseException | None]:
    """Peak Python allocation (bytes) and the exception raised by fn().

    Memory, not time, shows that nothing was allocated for the claimed size
    (timings on these machines vary too much to assert on).
    """
    tracemalloc.start()
    error = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - inspected by the caller
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


@pytest.mark.parametrize("header_len", [2**60, 2**64 - 1, MAX_HEADER_BYTES + 1])
def test_huge_header_length_is_refused_before_allocation(header_len: int, tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", header_len) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
        # sparse: as large as the claimed header, so only the limit (not the file size) can refuse it
        fh.truncate(min(header_len, MAX_HEADER_BYTES + 64) + 8)
    peak, error = peak_allocation(lambda: SafetensorsFile(path))
    assert isinstance(error, D2MergeError), error
    assert "exceeds" in str(error)
    assert peak < 1024 * 1024


def test_header_length_past_the_end_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES - 8) + b"{}")
    peak, error = peak_allocation(lambda: SafetensorsFile(path))
    assert isinstance(error, D2MergeError) and "larger than the file" in str(error)
    assert peak < 1024 * 1024


def test_huge_shapes_are_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "shapes.safetensors"
    header = {"big": {"dtype": "F64", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 8]}}
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    peak, error = peak_allocation(lambda: SafetensorsFile(path))
    assert isinstance(error, D2MergeError) and "needs" in str(error)
    assert peak < 1024 * 1024


def test_oversized_json_files_are_refused_before_reading(templates: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path, templates)
    ws.copy("adapter")
    with open(ws.adapter / "adapter_config.json", "r+b") as fh:
        fh.truncate(MAX_JSON_BYTES + 1)  # sparse
    peak, error = peak_allocation(lambda: load_adapter(ws.adapter))
    assert isinstance(error, D2MergeError) and "larger than" in str(error)
    assert peak < 1024 * 1024


def test_a_tensor_is_read_only_after_its_size_is_checked(tmp_path: Path) -> None:
    """read() allocates exactly the validated byte count, never what a header merely claims."""
    path = tmp_path / "ok.safetensors"
    save_tensors(path, {"w": torch.ones(4, 4)})
    sf = SafetensorsFile(path)
    with open(path, "r+b") as fh:  # shrink the file after the header was validated
        fh.truncate(path.stat().st_size - 8)
    with pytest.raises(D2MergeError, match="file ended after"):
        sf.read("w")


# -- the Hub token never reaches any output -------------------------------------------------------


@pytest.fixture(scope="module")
def merged_folder(templates: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("push") / "merged"
    merge(templates / "base", templates / "adapter", out)
    return out


def files_containing(token: str, *roots: Path) -> list[Path]:
    needle = token.encode()
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_file() and needle in path.read_bytes():
                found.append(path)
    return found


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private HF_HOME and no token or offline mode inherited from the environment."""
    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    home.mkdir()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return home


def closed_port() -> int:
    with socket.socket() as probe:  # free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_no_token(texts: list[str], *roots: Path) -> None:
    for token in (TOKEN, ENV_TOKEN):
        for text in texts:
            assert token not in text, text
        assert files_containing(token, *roots) == []


def test_dry_run_never_shows_the_token(merged_folder: Path, hub_env: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    before = {p.name: p.read_bytes() for p in merged_folder.iterdir()}
    for debug, extra in (([], []), ([], ["--token", TOKEN]), (["--debug"], ["--token", TOKEN])):
        code, out, err = run_cli([*debug, "push", merged_folder, "me/merged", "--dry-run", *extra], capsys,
                                 monkeypatch)
        assert code == 0, err
        assert "would push" in out
        assert_no_token([out, err], merged_folder, hub_env)
    assert {p.name: p.read_bytes() for p in merged_folder.iterdir()} == before


class EchoTokenHandler(BaseHTTPRequestHandler):
    """Answers every request with an error that quotes the request's Authorization header."""

    status = 401

    def do_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        auth = self.headers.get("Authorization", "")
        body = json.dumps({"error": f"bad credentials {auth} for {self.path}"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Message", f"token {auth} rejected")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_any  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(params=[401, 500])
def echo_server(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Handler", (EchoTokenHandler,), {"status": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_echoing_the_token_does_not_leak_it(merged_folder: Path, hub_env: Path, echo_server: str,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", echo_server)
    monkeypatch.setenv("HF_ENDPOINT", echo_server)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    for debug, extra in (([], ["--token", TOKEN]), (["--debug"], ["--token", TOKEN]), ([], [])):
        code, out, err = run_cli([*debug, "push", merged_folder, "me/merged", *extra], capsys, monkeypatch)
        assert code == 2, err
        assert "d2merge: error: " in err and "while creating repo me/merged" in err, err
        if debug:
            assert "Traceback" in err
        else:
            assert len(err.splitlines()) == 1, err
        assert_no_token([out, err], merged_folder, hub_env)


@pytest.mark.slow
def test_unreachable_endpoint_in_a_real_process_never_shows_the_token(merged_folder: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    home.mkdir()
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = checkout_env(drop=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                             "HF_OIDC_RESOURCE"),
                       HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_TOKEN=ENV_TOKEN, HF_HUB_DISABLE_XET="1",
                       NO_PROXY="127.0.0.1,localhost", PYTHONDONTWRITEBYTECODE="1")
    runs = [subprocess.Popen([sys.executable, "-m", "d2merge.cli", *debug, "push", str(merged_folder), "me/merged",
                              "--token", TOKEN], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for debug in ([], ["--debug"])]
    for proc, debug in zip(runs, (False, True)):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert f"cannot reach the Hub at {endpoint}" in err, err
        if not debug:
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert_no_token([out, err], merged_folder, home, tmp_path)


# -- never run code from a model folder (issue 10, finding 1) -------------------------------------


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_user_saying_yes_still_runs_no_folder_code(where: str, templates: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers asks "Do you wish to run the custom code? [y/N]"; here stdin answers y to every prompt.

    d2merge must refuse the folder before anything can ask: the prompt is never shown, the folder's
    code never imported (its marker file stays absent), and the one line names the auto_map.
    """
    from malformed import add_custom_code

    prompts: list[str] = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompts.append(prompt) or "y")
    ws = Workspace(tmp_path, templates)
    ws.copy("base")
    ws.copy("adapter")
    add_custom_code(ws.base, ws.marker, where)
    (tmp_path / "prompts.txt").write_text("hello\n")
    loaders = [["verify", ws.base, ws.adapter, "--prompts", tmp_path / "prompts.txt", "--probe-length", "4"],
               ["export-onnx", ws.base, "-o", tmp_path / "model.onnx"]]
    if where == "config.json":
        loaders.append(["bench", ws.base, ws.adapter, "--variants", "base", "--batch-sizes", "1", "--seq-lens", "4",
                        "--decode-tokens", "0", "--warmup", "0", "--repeats", "1"])
    for argv in loaders:
        code, out, err = run_cli(argv, capsys, monkeypatch)
        assert code == 2, err
        assert err.count("\n") == 1 and "auto_map" in err and where in err, err
    assert prompts == []
    assert not ws.marker.exists(), "code from the model folder ran"
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_library_loaders_refuse_folder_code(where: str, templates: Path, tmp_path: Path) -> None:
    from malformed import add_custom_code

    from d2merge.io.transformers_folder import load_config, load_model, load_tokenizer

    ws = Workspace(tmp_path, templates)
    ws.copy("base")
    add_custom_code(ws.base, ws.marker, where)
    for load in (load_model, load_tokenizer, load_config):
        with pytest.raises(D2MergeError, match="auto_map"):
            load(ws.base)
    assert not ws.marker.exists()


def test_transformers_is_called_from_one_loader_only() -> None:
    """Every from_pretrained goes through d2merge.io.transformers_folder (trust_remote_code=False there)."""
    import re

    calls = []
    for path in sorted((REPO_ROOT / "d2merge").rglob("*.py")):
        if path.name == "transformers_folder.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\.from_pretrained\(", code) and not re.search(r"""['"][^'"]*from_pretrained""", code):
                calls.append(f"{path.relative_to(REPO_ROOT)}:{number}")
    assert calls == []
    source = (REPO_ROOT / "d2merge" / "io" / "transformers_folder.py").read_text()
    loads = [line for line in source.splitlines() if ".from_pretrained(" in line]
    assert len(loads) == 4 and all("trust_remote_code=False" in line for line in loads)


# -- only files from inside the base folder travel (issue 10, finding 3) --------------------------


def test_support_file_links_out_of_the_base_are_not_copied_or_pushed(templates: Path, tmp_path: Path, hub_env: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "elsewhere" / "token"
    secret.parent.mkdir()
    secret.write_text(TOKEN)
    ws = Workspace(tmp_path / "case", templates)
    ws.root.mkdir()
    ws.copy("base")
    ws.copy("adapter")
    (ws.base / "LICENSE").symlink_to(secret)  # ln -s ~/.cache/huggingface/token base/LICENSE
    (ws.base / "additional_chat_templates").symlink_to(secret.parent, target_is_directory=True)
    (secret.parent / "tool.jinja").write_text(TOKEN)
    (ws.base / "NOTICE").write_text("a real notice")  # a regular file inside the base: copied
    (ws.base / "tokenizer.json").mkdir()  # not a regular file
    code, out, err = run_cli(ws.merge_args(), capsys, monkeypatch)
    assert code == 0, err
    assert "note: not copied from the base folder: " in out
    assert "LICENSE (a link to a file outside the base folder)" in out
    assert "additional_chat_templates/tool.jinja (a link" in out and "tokenizer.json (not a regular file)" in out
    assert sorted(p.name for p in ws.out.iterdir()) == [".d2merge-output.json", "NOTICE", "README.md", "config.json",
                                                        "model.safetensors",
                                                        "tokenizer_config.json"]
    code, out, err = run_cli(["push", ws.out, "me/merged", "--dry-run"], capsys, monkeypatch)
    assert code == 0, err
    import re

    assert re.search(r"^\W*LICENSE\b", out, re.M) is None, out  # not in the file list (the card's note names it)
    assert_no_token([out, err], ws.out)


def test_push_refuses_a_link_out_of_the_folder(merged_folder: Path, tmp_path: Path, hub_env: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(shutil.copytree(merged_folder, tmp_path / "merged"))
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    (folder / "LICENSE").symlink_to(secret)
    code, out, err = run_cli(["push", folder, "me/merged", "--dry-run"], capsys, monkeypatch)
    assert code == 2
    assert "LICENSE: a link to a file outside the folder; refusing to send it" in err
    assert_no_token([out, err])


# -- quiet pickle loading and a truthful model card (issue 10, findings 15 and 17) ----------------


def test_allowed_plain_pickle_prints_no_torch_warning(templates: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path, templates)
    ws.copy("base")
    ws.copy("adapter")
    tensors = {k: v.clone() for k, v in adapter_tensors().items()}
    (ws.adapter / "adapter_model.safetensors").unlink()
    with open(ws.adapter / "adapter_model.bin", "wb") as fh:  # a plain (non-zip) pickle of tensors
        torch.save(tensors, fh, _use_new_zipfile_serialization=False)
    code, out, err = run_cli(ws.merge_args("--allow-pickle"), capsys, monkeypatch)
    assert (code, err) == (0, ""), err


def test_model_card_names_only_the_base_actually_used(templates: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path, templates)
    ws.copy("base")
    ws.copy("adapter")
    config = json.loads((ws.adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"  # the adapter's claim, not our tiny base
    (ws.adapter / "adapter_config.json").write_text(json.dumps(config))
    code, out, err = run_cli(ws.merge_args(), capsys, monkeypatch)
    assert code == 0, err
    card = (ws.out / "README.md").read_text()
    assert "meta-llama" not in card and "Llama-3.1-8B" not in card
