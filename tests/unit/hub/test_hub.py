"""`d2merge push` against a local fake Hub driven by the real huggingface_hub client.

The server (tests/fake_hub.py) implements the wire protocol the client speaks for create_repo,
create_branch and upload_folder on the plain git-LFS path, and records every request, so these
tests check what actually reaches a Hub: paths, bytes, revision, flags, and nothing when a push
must not happen. Subprocess tests run the CLI exactly as a user would, with HF_ENDPOINT set.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from huggingface_hub.utils import disable_progress_bars

from d2merge import __version__
from d2merge.cli import main
from d2merge.errors import D2MergeError
from d2merge.hub import check_folder_complete, folder_files, push_folder, scrub
from d2merge.synthetic import save_tiny_base
from fake_hub import FakeHub
from helpers import REPO_ROOT, checkout_env
from helpers import assert_one_line_error as assert_refusal

# huggingface_hub streams LFS uploads with httpx2's deprecated `data=<file>`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_FAKEsecretTOKEN1234567890"
WRONG_TOKEN = "hf_FAKEwrongTOKEN0987654321"
MODEL_CARD = """---
license: apache-2.0
base_model: tiny/llama
tags: [d2merge, merged]
---
# tiny-llama-merged

Merged with d2merge for the push tests.
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded tiny model with a model card, plus hidden clutter that must never be pushed."""
    folder = save_tiny_base(tmp_path_factory.mktemp("hub") / "m", "llama", max_shard_size="20KB")
    (folder / "README.md").write_text(MODEL_CARD, encoding="utf-8")
    (folder / ".notes.txt").write_text("private scratch notes\n")
    download_meta = folder / ".cache" / "huggingface" / "download"
    download_meta.mkdir(parents=True)
    (download_meta / "config.json.metadata").write_text("abc\n")
    return folder


@pytest.fixture(scope="module")
def expected_files(model_dir: Path) -> dict[str, bytes]:
    """What a push must deliver: the model's own files, hidden ones excluded."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    names = ["README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", *shards]
    assert len(shards) > 1, "the fixture must be sharded"
    assert {p.name for p in model_dir.iterdir() if p.is_file() and not p.name.startswith(".")} == set(names)
    return {name: (model_dir / name).read_bytes() for name in names}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(token=TOKEN, max_requests=200, lifetime_s=60) as server:
        yield server


@pytest.fixture
def hub_in_process(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """Point the already-imported client at the fake hub.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET into constants at
    import time, so the constants are patched (CI exports HF_HUB_OFFLINE=1 for the whole run).
    Upload progress bars are switched off so that stderr holds only what d2merge prints.
    """
    point_client_at(hub.url, monkeypatch, tmp_path)
    with disable_progress_bars():
        yield hub


def point_client_at(url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The in-process huggingface_hub client talks to ``url``, online, with no token of its own."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-cached-token"))
    # The client fetches an agent registry from the endpoint once a day and caches it under HF_HOME:
    # a fresh cached copy here keeps request counts deterministic and the fake one out of ~/.cache.
    registry = tmp_path / "agent_harnesses.json"
    registry.write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(registry))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)


def run_cli(args: list[str], endpoint: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`d2merge ARGS` in a fresh interpreter, with no token or offline mode inherited from this one."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                              "HF_OIDC_RESOURCE")}
    clean = checkout_env(inherited, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
                         NO_PROXY="127.0.0.1,localhost", **env)
    return subprocess.run([sys.executable, "-m", "d2merge.cli", *args], cwd=REPO_ROOT, env=clean,
                          capture_output=True, text=True, timeout=120)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI entry point in-process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    """A one-line refusal (tests/helpers.py) that prints no token."""
    assert_refusal(code, out, err, *needles)
    assert TOKEN not in out + err and WRONG_TOKEN not in out + err


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


# -- a real push, end to end ----------------------------------------------------------------------


def test_cli_push_delivers_exactly_the_folder(model_dir: Path, expected_files: dict[str, bytes], hub: FakeHub,
                                              tmp_path: Path) -> None:
    result = run_cli(["push", str(model_dir), "me/tiny-merged", "--token", TOKEN, "--commit-message", "merge v1"],
                     hub.url, tmp_path)

    assert result.returncode == 0, result.stderr
    [commit] = hub.commits
    assert commit.repo_id == "me/tiny-merged" and commit.ref == "main" and not commit.create_pr
    assert commit.summary == "merge v1"
    assert commit.files == expected_files  # exact paths, byte for byte, hidden files absent
    assert commit.lfs_paths == {n for n in expected_files if n.endswith(".safetensors")}
    assert hub.repos["me/tiny-merged"].visibility == "public"
    routes = hub.routes_called()
    assert "unknown" not in routes  # never reached for an endpoint a plain Hub does not serve (e.g. Xet)
    assert routes.count("lfs_upload") == len(commit.lfs_paths)
    for request, route in zip(hub.requests, routes):
        sent = request.headers.get("authorization")
        # Pre-signed upload URLs and the public agent registry get no token; every Hub API call does.
        assert sent is None if route in ("lfs_upload", "agent_harnesses") else sent == f"Bearer {TOKEN}", route
    assert commit.oid in result.stdout and f"{hub.url}/me/tiny-merged" in result.stdout
    assert "README.md" in result.stdout and ".notes.txt" not in result.stdout
    assert TOKEN not in result.stdout + result.stderr


def test_token_from_hf_token_env_and_default_commit_message(model_dir: Path, expected_files: dict[str, bytes],
                                                           hub_in_process: FakeHub,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    result = push_folder(model_dir, "me/env-token")

    [commit] = hub_in_process.commits
    assert commit.summary == f"Upload merged model with d2merge {__version__}"
    assert commit.files == expected_files
    assert result.commit_oid == commit.oid and result.commit_url.endswith(commit.oid)
    assert [(f.path, f.size) for f in result.files] == sorted((n, len(b)) for n, b in expected_files.items())
    assert result.model_card == MODEL_CARD
    assert TOKEN not in repr(result)


def test_private_and_revision_reach_the_server(model_dir: Path, expected_files: dict[str, bytes],
                                               hub_in_process: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["push", str(model_dir), "me/branchy", "--private", "--revision", "exp/lr-1e-4",
                               "--token", TOKEN], capsys)

    assert code == 0, err
    repo = hub_in_process.repos["me/branchy"]
    assert repo.visibility == "private"
    create = next(r for r in hub_in_process.requests if r.path == "/api/repos/create")
    assert create.json() == {"name": "branchy", "organization": "me", "visibility": "private", "type": "model"}
    assert "create_branch" in hub_in_process.routes_called()
    [commit] = hub_in_process.commits
    assert commit.ref == "exp/lr-1e-4" and commit.files == expected_files
    assert repo.refs["main"] == {}  # nothing landed on main
    assert "(branch exp/lr-1e-4)" in out


def test_create_pr_reaches_the_server(model_dir: Path, expected_files: dict[str, bytes], hub_in_process: FakeHub,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["push", str(model_dir), "me/pr-target", "--create-pr", "--token", TOKEN], capsys)

    assert code == 0, err
    [commit] = hub_in_process.commits
    assert commit.create_pr and commit.revision == "main" and commit.ref == "refs/pr/1"
    assert commit.files == expected_files
    assert hub_in_process.repos["me/pr-target"].refs["main"] == {}
    commit_calls = [r for r in hub_in_process.requests if r.path.endswith("/commit/main")]
    assert [r.query for r in commit_calls] == [{"create_pr": ["1"]}]
    assert f"pull request: {hub_in_process.url}/me/pr-target/discussions/1" in out


def test_revision_refs_pr_adds_to_the_open_pull_request(model_dir: Path, hub_in_process: FakeHub,
                                                        tmp_path: Path) -> None:
    push_folder(model_dir, "me/pr-update", create_pr=True, token=TOKEN)
    folder = copy_model(model_dir, tmp_path)
    (folder / "README.md").write_text(MODEL_CARD + "\nRevised.\n")

    push_folder(folder, "me/pr-update", revision="refs/pr/1", token=TOKEN, commit_message="revise card")

    assert "create_branch" not in hub_in_process.routes_called()  # a PR ref is never created as a branch
    first, second = hub_in_process.commits
    assert second.ref == "refs/pr/1" and not second.create_pr and second.summary == "revise card"
    assert set(second.files) == {"README.md"}  # the Hub already had everything else
    assert hub_in_process.repos["me/pr-update"].refs["refs/pr/1"]["README.md"].endswith(b"Revised.\n")


def test_pushing_the_same_folder_twice_uploads_nothing_new(model_dir: Path, hub_in_process: FakeHub) -> None:
    first = push_folder(model_dir, "me/twice", token=TOKEN)
    uploads_before = hub_in_process.routes_called().count("lfs_upload")

    second = push_folder(model_dir, "me/twice", token=TOKEN)

    assert len(hub_in_process.commits) == 1
    assert hub_in_process.routes_called().count("lfs_upload") == uploads_before
    assert second.commit_oid == first.commit_oid


def test_file_names_with_glob_characters_are_pushed_literally(model_dir: Path, hub_in_process: FakeHub,
                                                              tmp_path: Path) -> None:
    folder = copy_model(model_dir, tmp_path)
    (folder / "eval[v1]*.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes?.md").write_text("x")

    push_folder(folder, "me/globby", token=TOKEN)

    [commit] = hub_in_process.commits
    assert commit.files["eval[v1]*.json"] == b"{}" and commit.files["sub/notes?.md"] == b"x"
    assert ".notes.txt" not in commit.files


# -- failures: one line, exit 2, no token ---------------------------------------------------------


def test_server_error_500_at_commit_is_one_line(model_dir: Path, hub_in_process: FakeHub,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    hub_in_process.fail("commit", 500, "Internal Error", echo_token=True)  # an echoed token must not leak

    code, out, err = run_main(["push", str(model_dir), "me/boom", "--token", TOKEN], capsys)

    assert_one_line_error(code, out, err, "500", "uploading to me/boom", "Internal Error", "retry later")
    assert hub_in_process.commits == [] and "lfs_upload" in hub_in_process.routes_called()


def test_cli_rejected_token_401_is_one_line(model_dir: Path, hub: FakeHub, tmp_path: Path) -> None:
    hub.fail("create_repo", 401, "Invalid credentials in Authorization header", echo_token=True)

    result = run_cli(["push", str(model_dir), "me/denied"], hub.url, tmp_path, HF_TOKEN=WRONG_TOKEN)

    assert_one_line_error(result.returncode, result.stdout, result.stderr, "401", "hf auth login", "HF_TOKEN")
    api_calls = [r for r, route in zip(hub.requests, hub.routes_called()) if route != "agent_harnesses"]
    assert api_calls and all(r.headers["authorization"] == f"Bearer {WRONG_TOKEN}" for r in api_calls)
    assert hub.commits == []


def test_cli_offline_fails_at_once_without_contacting(model_dir: Path, hub: FakeHub, tmp_path: Path) -> None:
    result = run_cli(["push", str(model_dir), "me/offline", "--token", TOKEN], hub.url, tmp_path,
                     HF_HUB_OFFLINE="1")

    assert_one_line_error(result.returncode, result.stdout, result.stderr, "HF_HUB_OFFLINE")
    assert hub.requests == []


@pytest.mark.parametrize(("route", "status", "needles"), [
    ("create_repo", 403, ("403", "write access")),
    ("create_branch", 500, ("500", "creating branch 'dev' in me/errs")),
    ("preupload", 404, ("404", "not found", "HF_ENDPOINT")),
    ("commit", 409, ("409", "conflict")),
    ("lfs_batch", 401, ("401", "hf auth login")),
])
def test_hub_errors_become_actionable_one_liners(model_dir: Path, hub_in_process: FakeHub,
                                                 capsys: pytest.CaptureFixture[str], route: str, status: int,
                                                 needles: tuple[str, ...]) -> None:
    hub_in_process.fail(route, status, "nope", echo_token=True)

    code, out, err = run_main(["push", str(model_dir), "me/errs", "--revision", "dev", "--token", TOKEN], capsys)

    assert_one_line_error(code, out, err, *needles)
    assert hub_in_process.commits == []


def test_a_wrong_token_is_rejected_by_the_server_and_not_shown(model_dir: Path, hub_in_process: FakeHub) -> None:
    with pytest.raises(D2MergeError, match="401") as raised:
        push_folder(model_dir, "me/wrong", token=WRONG_TOKEN)
    assert WRONG_TOKEN not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # --debug shows no chained echo


def test_unreachable_endpoint_is_one_line(model_dir: Path, hub_in_process: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)

    code, out, err = run_main(["push", str(model_dir), "me/nowhere", "--token", TOKEN], capsys)

    assert_one_line_error(code, out, err, "cannot reach the Hub at " + dead, "HF_ENDPOINT")


def test_no_token_anywhere_is_refused_before_contacting(model_dir: Path, hub_in_process: FakeHub) -> None:
    with pytest.raises(D2MergeError, match="no Hugging Face token found"):
        push_folder(model_dir, "me/anon")
    assert hub_in_process.requests == []


def test_offline_constant_is_honoured_in_process(model_dir: Path, hub_in_process: FakeHub,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(D2MergeError, match="HF_HUB_OFFLINE"):
        push_folder(model_dir, "me/offline", token=TOKEN)
    assert hub_in_process.requests == []


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"create_pr": True, "revision": "dev"}, "cannot be combined"),
    ({"commit_message": "  "}, "commit message is empty"),
])
def test_contradictory_options_are_refused_before_contacting(model_dir: Path, hub_in_process: FakeHub,
                                                             kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(D2MergeError, match=needle):
        push_folder(model_dir, "me/opts", token=TOKEN, **kwargs)  # type: ignore[arg-type]
    assert hub_in_process.requests == []


@pytest.mark.parametrize("repo_id", ["just-a-name", "a/b/c", "me/bad--name", "/x"])
def test_repo_id_must_be_owner_slash_name(model_dir: Path, hub_in_process: FakeHub, repo_id: str) -> None:
    with pytest.raises(D2MergeError, match="repo id"):
        push_folder(model_dir, repo_id, token=TOKEN)
    assert hub_in_process.requests == []


def test_scrub_removes_known_and_token_shaped_secrets() -> None:
    enterprise = "corp-sso-7f3a9b2c1d"  # a known secret that does not look like an hf_ token
    cleaned = scrub(f"Bearer {TOKEN}; proxy said {enterprise}; stray hf_SomeOtherToken42.", {TOKEN, enterprise})
    assert cleaned == "Bearer ***; proxy said ***; stray hf_***."


# -- dry run ---------------------------------------------------------------------------------------


def test_dry_run_contacts_nothing_and_lists_files(model_dir: Path, expected_files: dict[str, bytes],
                                                  hub_in_process: FakeHub,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # No token anywhere: a dry run must not need one.
    code, out, err = run_main(["push", str(model_dir), "me/dry", "--dry-run", "--private"], capsys)

    assert code == 0, err
    assert hub_in_process.requests == []
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  |")}
    assert listed == set(expected_files)
    assert f"would push {len(expected_files)} files" in out and f"{hub_in_process.url}/me/dry" in out
    for line in MODEL_CARD.splitlines():
        assert f"  | {line}".rstrip() in out
    assert "nothing was contacted" in out


def test_dry_run_result_carries_files_sizes_and_card(model_dir: Path, expected_files: dict[str, bytes],
                                                     hub_in_process: FakeHub) -> None:
    result = push_folder(model_dir, "me/dry", dry_run=True)

    assert result.dry_run and result.commit_url is None and result.commit_oid is None
    assert {f.path: f.size for f in result.files} == {n: len(b) for n, b in expected_files.items()}
    assert result.total_size == sum(len(b) for b in expected_files.values())
    assert result.model_card == MODEL_CARD
    assert hub_in_process.requests == []


# -- incomplete folders are refused before anything is contacted ----------------------------------


def _drop_one_shard(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    return shard


def _truncate_a_shard(folder: Path) -> str:
    shard = next(iter(sorted(folder.glob("model-*.safetensors"))))
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    return shard.name


def _drop_all_weights(folder: Path) -> str:
    for path in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        path.unlink()
    return "no weights"


@pytest.mark.parametrize(("damage", "needles"), [
    (_drop_one_shard, ("model.safetensors.index.json", "missing")),
    (lambda f: (f / "config.json").unlink(), ("no config.json",)),
    (lambda f: (f / ".d2merge-tmp-3f2a").write_bytes(b"x"), (".d2merge-tmp-3f2a", "temporary")),
    (lambda f: (f / ".model.safetensors.d2merge-tmp-4242").mkdir(), (".model.safetensors.d2merge-tmp-4242",)),
    (lambda f: (f / "model-00001-of-00007.safetensors.partial").write_bytes(b"x"), (".partial",)),
    (lambda f: (f / "tokenizer.json.tmp").write_bytes(b"x"), ("tokenizer.json.tmp",)),
    (lambda f: (f / "sub").mkdir() or (f / "sub" / "x.incomplete").write_bytes(b"x"), ("sub/x.incomplete",)),
    (_truncate_a_shard, ("truncated",)),
    (_drop_all_weights, ("no weights",)),
    (lambda f: (f / "config.json").write_text("{not json"), ("config.json", "is not valid JSON")),
], ids=["missing-shard", "no-config", "d2merge-tmp", "d2merge-staging-dir", "partial", "tmp",
        "incomplete-in-subfolder", "truncated-shard", "no-weights", "bad-config"])
def test_incomplete_folder_is_refused_before_contacting(model_dir: Path, hub_in_process: FakeHub, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        damage: Callable[[Path], object],
                                                        needles: tuple[str, ...]) -> None:
    folder = copy_model(model_dir, tmp_path)
    detail = damage(folder)
    check_folder_complete(model_dir)  # the undamaged original passes

    code, out, err = run_main(["push", str(folder), "me/broken", "--token", TOKEN], capsys)

    assert_one_line_error(code, out, err, *needles)
    if isinstance(detail, str) and detail != "no weights":
        assert detail in err
    assert hub_in_process.requests == []
    with pytest.raises(D2MergeError):
        push_folder(folder, "me/broken", dry_run=True)  # a dry run checks the folder too


def test_folder_files_skip_hidden_files_and_folders(model_dir: Path, expected_files: dict[str, bytes]) -> None:
    assert [f.path for f in folder_files(model_dir)] == sorted(expected_files)


def test_missing_folder_is_one_line(hub_in_process: FakeHub, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["push", str(tmp_path / "nope"), "me/x", "--token", TOKEN], capsys)
    assert_one_line_error(code, out, err, "no such folder")
    assert hub_in_process.requests == []


# -- the fake hub itself stays bounded ------------------------------------------------------------


def test_fake_hub_caps_requests(model_dir: Path, hub_in_process: FakeHub) -> None:
    hub_in_process.max_requests = 2

    with pytest.raises(D2MergeError, match="request cap"):
        push_folder(model_dir, "me/capped", token=TOKEN)

    assert hub_in_process.routes_called() == ["create_repo", "validate_yaml", "validate_yaml"]
    assert hub_in_process.commits == []


# ----- merge --push-to / --verify / --require-verify ---------------------------------------------


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from d2merge.synthetic import save_random_adapter

    root = tmp_path_factory.mktemp("publish")
    base = save_tiny_base(root / "base", "llama")
    return base, save_random_adapter(base, root / "adapter", "d2lora", r=4, tau=0.5)


def test_merge_push_to_with_require_verify_pushes_a_verified_card(base_and_adapter, hub_in_process: FakeHub,
                                                                  tmp_path: Path, capsys) -> None:
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    code, stdout, err = run_main(["merge", str(base), str(adapter), "-o", str(out), "--push-to", "me/merged",
                                  "--require-verify", "--token", TOKEN], capsys)
    assert code == 0, err
    assert [c.repo_id for c in hub_in_process.commits] == ["me/merged"]
    pushed = hub_in_process.commits[0].files
    assert pushed["README.md"] == (out / "README.md").read_bytes()
    card = pushed["README.md"].decode()
    assert "## Verification (merged vs unmerged)" in card and "PASS" in card
    assert set(pushed) == {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert TOKEN not in stdout + err


def test_merge_require_verify_failure_pushes_nothing(base_and_adapter, hub_in_process: FakeHub, tmp_path: Path,
                                                     capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import d2merge.verify as verify_module

    strict = verify_module.Thresholds(floor_multiple=0.0, alpha=1.0, max_ulp=0.0, max_abs_diff=0.0, max_gap_pp=0.0,
                                      min_top1=1.0)
    monkeypatch.setattr(verify_module, "thresholds_for", lambda dtype, overrides=None: strict)
    base, adapter = base_and_adapter
    code, _, err = run_main(["merge", str(base), str(adapter), "-o", str(tmp_path / "merged"), "--push-to",
                             "me/merged", "--require-verify", "--token", TOKEN], capsys)
    assert code == 1
    assert "nothing was pushed" in err.splitlines()[-1]
    assert hub_in_process.commits == [] and hub_in_process.requests == []
    # the merge itself is complete and its card records the failed verification
    assert "FAIL" in (tmp_path / "merged" / "README.md").read_text()


def test_merge_push_to_without_verify(base_and_adapter, hub_in_process: FakeHub, tmp_path: Path, capsys) -> None:
    base, adapter = base_and_adapter
    code, _, err = run_main(["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--push-to", "me/plain",
                             "--revision", "exp-1", "--token", TOKEN], capsys)
    assert code == 0, err
    assert [(c.repo_id, c.ref) for c in hub_in_process.commits] == [("me/plain", "exp-1")]
    assert "Verification" not in hub_in_process.commits[0].files["README.md"].decode()


def test_require_verify_without_push_is_a_usage_error(base_and_adapter, tmp_path: Path, capsys) -> None:
    base, adapter = base_and_adapter
    code, _, err = run_main(["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "--require-verify"], capsys)
    assert code == 2 and "--push-to" in err
    assert not (tmp_path / "m").exists()


# -- the token on every channel (issue 10, findings 2 and 15) -------------------------------------

# Not shaped like hf_...: only the exact-token scrubbing can catch it.
ODD_TOKEN = "SECRET-odd-shaped-token-4d9c"


class LeakyHub(FakeHub):
    """A Hub that misbehaves: every reply quotes the caller's token in an X-HF-Warning header (which
    huggingface_hub logs), README validation warns with it (emitted through warnings.warn), and the
    repo and commit URLs it returns contain it."""

    def _handle(self, request):  # type: ignore[no-untyped-def]
        status, headers, body = super()._handle(request)
        auth = request.headers.get("authorization", "")
        headers = {**headers, "X-HF-Warning": f"deprecated client; {auth} will expire"}
        if status == 200 and body:
            payload = json.loads(body)
            if isinstance(payload, dict):
                if "warnings" in payload:
                    payload["warnings"] = [{"message": f"metadata for {auth} looks odd"}]
                for key in ("url", "commitUrl"):
                    if key in payload:
                        payload[key] += f"?t={auth.removeprefix('Bearer ')}"
            body = json.dumps(payload).encode()
        return status, headers, body


def test_a_leaky_hub_never_gets_the_token_shown(model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import warnings

    with LeakyHub(token=ODD_TOKEN, max_requests=200, lifetime_s=60) as server:
        point_client_at(server.url, monkeypatch, tmp_path)
        caplog.set_level(logging.DEBUG)
        with disable_progress_bars(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, out, err = run_main(["push", str(model_dir), "me/leaky", "--token", ODD_TOKEN], capsys)
        assert code == 0, err
        assert server.commits, "the push went through"
    shown = [out, err, caplog.text, *(str(w.message) for w in caught)]
    assert all(ODD_TOKEN not in text for text in shown), shown
    assert "commit: " in out and "?t=***" in out  # the URL is printed, scrubbed
    assert "Retry" not in err  # no huggingface_hub chatter before d2merge's own lines


@pytest.mark.parametrize("bad", ["\n", " ", "\t", "\r\n", "\u00e9"])
def test_a_token_with_stray_characters_is_refused_before_use(bad: str, model_dir: Path, hub_in_process: FakeHub,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["push", str(model_dir), "me/merged", "--token", TOKEN + bad], capsys)
    assert_one_line_error(code, out, err, "--token contains", "printable ASCII without spaces")
    assert TOKEN not in out + err and "Illegal header" not in err and "cannot reach" not in err
    assert hub_in_process.requests == []  # refused before anything was sent


def test_server_errors_print_no_retry_lines(model_dir: Path, hub_in_process: FakeHub,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A 500 at pre-upload: huggingface_hub retries (and logs each retry); the user sees one line."""
    import huggingface_hub.utils._http as hub_http

    # The client's back-off sleeps 1+2+4+8+8 s between its five retries: the retries and their log
    # lines are what this test is about, not the waiting.
    monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    hub_in_process.fail("preupload", 500, "internal error")
    code, out, err = run_main(["push", str(model_dir), "me/merged", "--token", TOKEN], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1, err
