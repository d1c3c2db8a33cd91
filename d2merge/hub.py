"""Publish a finished model folder to the Hugging Face Hub (`d2merge push`).

A push is one `upload_folder` call made by the real huggingface_hub client, so the endpoint
(HF_ENDPOINT), token resolution (--token, HF_TOKEN, `hf auth login`), retries and LFS handling
are exactly the client's. What d2merge adds is what the client cannot know:

- the folder is refused unless it is a complete model (config, every shard the index names,
  no half-written temp files), because a merge interrupted mid-write must never be published;
- exactly the folder's own files are sent (no hidden or temp files), listed up front, so the
  dry run shows precisely what a real push would send;
- every failure is one line that says what to do, with the token scrubbed from it.

huggingface_hub is imported inside the functions so that other commands start fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from d2merge.version import __version__
from d2merge.errors import D2MergeError, Spelled, escaped, option_error
from d2merge.io.output import WEIGHT_SUFFIXES, check_complete
from d2merge.options.push import PushOptions
from d2merge.sizes import format_size

MODEL_CARD_NAME = "README.md"

_AUTH_HINT = "check your token: `hf auth login` or {token} / HF_TOKEN"  # an OptionError's hint
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_MAX_SERVER_MESSAGE = 200


@dataclasses.dataclass(frozen=True)
class PushedFile:
    """One file of the folder as it lands in the repo: its path there and its size in bytes."""

    path: str
    size: int


@dataclasses.dataclass(frozen=True)
class PushResult:
    """What a push sent (or, for a dry run, would send) and where it landed.

    commit_url/commit_oid/pr_url are None for a dry run; pr_url is set only with create_pr.
    `private` is what was asked for: it applies only if this push created the repo.
    The token is deliberately not part of the result.
    """

    repo_id: str
    repo_url: str
    revision: str
    files: tuple[PushedFile, ...]
    commit_message: str
    model_card: str | None
    private: bool
    create_pr: bool
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def default_commit_message() -> str:
    return f"Upload merged model with d2merge {__version__}"


def folder_files(folder: str | Path) -> tuple[PushedFile, ...]:
    """The files a push sends: regular files under `folder`, skipping hidden files and folders.

    Symlinks to files count (a Hub cache snapshot is all symlinks) and are sent with their
    target's content, as huggingface_hub does. Sorted, paths in POSIX form relative to `folder`.
    """
    folder = _existing_folder(folder)
    files = []
    for relpath, path, is_dir in _walk(folder):
        if not is_dir and not _is_hidden(relpath) and path.is_file():
            files.append(PushedFile(relpath, path.stat().st_size))
    return tuple(sorted(files, key=lambda f: f.path))


def check_folder_complete(folder: str | Path) -> None:
    """Refuse (D2MergeError naming the file) a folder that is not a complete model, or that links outside itself.

    Complete is ``io.output.check_complete``'s one definition (the one merge-many's reruns use): no
    leftover temp/partial files anywhere, a readable config.json, at least one weights file, every
    shard that an index names present, every safetensors file as long as its own header says, and
    every file d2merge's marker lists. A folder without the marker (made elsewhere) may be pushed.
    """
    folder = _existing_folder(folder)
    check_complete(folder)
    present = {f.path for f in folder_files(folder)}
    weights = [p for p in present if p.endswith(WEIGHT_SUFFIXES)]
    # A link sends its target's bytes: only targets inside the folder, or where its weights live
    # (a Hub cache snapshot links into blobs/), never ~/.cache/huggingface/token and the like.
    trusted = {folder.resolve(), *((folder / w).resolve().parent for w in weights)}
    for relpath in sorted(present):
        target = (folder / relpath).resolve()
        if not any(target == t or t in target.parents for t in trusted):
            raise D2MergeError("a link to a file outside the folder; refusing to send it", path=folder / relpath,
                               hint="replace the link by the file it should contain, or remove it")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
                dry_run: bool = False, endpoint: str | None = None) -> PushResult:
    """Publish a complete model folder to the Hub; with dry_run, only say what would be sent.

    One commit for a model-sized folder (huggingface_hub's Xet path splits folders of more than
    256 files, or 100 MB of non-LFS files, into commits suffixed "(part N)").

    The repo is created if needed (`private` applies only then; an existing repo keeps its
    visibility); a `revision` other than main is created as a branch from main if missing, and
    `refs/pr/N` pushes onto an open pull request. `create_pr` opens a pull request against main
    instead of committing to it. `endpoint` defaults to huggingface_hub's (HF_ENDPOINT).
    Raises D2MergeError (one line, token scrubbed) for anything the user can fix.
    """
    folder = _existing_folder(folder)
    _check_repo_id(repo_id)
    branch = revision or "main"
    # --create-pr with a branch, an empty message: refused by the push options' own rules
    PushOptions(private=private, revision=revision, create_pr=create_pr, commit_message=commit_message)
    message = commit_message if commit_message is not None else default_commit_message()
    check_folder_complete(folder)
    files = folder_files(folder)
    card_path = folder / MODEL_CARD_NAME
    model_card = card_path.read_text(encoding="utf-8", errors="replace") if card_path.is_file() else None

    from huggingface_hub import constants

    hub_url = (endpoint or constants.ENDPOINT).rstrip("/")
    result = PushResult(repo_id=repo_id, repo_url=f"{hub_url}/{repo_id}", revision=branch, files=files,
                        commit_message=message, model_card=model_card, private=private, create_pr=create_pr,
                        dry_run=dry_run)
    if dry_run:
        return result

    if _offline():
        raise option_error("HF_HUB_OFFLINE is set, so nothing can be pushed",
                           hint="unset HF_HUB_OFFLINE to push, or use {dry_run=} to see what would be sent",
                           dry_run=True)
    secrets = _known_secrets(token)
    with _hub_errors(secrets, step="looking up the token", repo_id=repo_id, endpoint=hub_url, revision=branch):
        from huggingface_hub import get_token

        resolved = token or get_token()
    if not resolved:
        raise option_error("no Hugging Face token found",
                           hint="run `hf auth login`, set HF_TOKEN, or pass {token}")
    secrets.add(resolved)
    check_token(resolved, "{token}" if token else "the token (HF_TOKEN or the `hf auth login` cache)")
    with scrubbed_channels(secrets):
        result = _push(folder, repo_id, result, secrets, endpoint=endpoint, hub_url=hub_url, branch=branch,
                       private=private, create_pr=create_pr, message=message, files=files, resolved=resolved)
    return result


_TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: what an HTTP header can carry


def check_token(token: str, where: str) -> None:
    """Refuse a token that cannot be sent (whitespace, a newline, control or non-ASCII characters).
    ``where``: the token's source, ``{token}`` for the option (an :class:`OptionError` template).

    Sent as is it fails deep in the HTTP stack with an error that quotes the header, token
    included ("Illegal header value b'Bearer secret\\n'"), and reads as a network failure.
    """
    if not _TOKEN_CHARACTERS.fullmatch(token):
        bad = next((c for c in token if not _TOKEN_CHARACTERS.fullmatch(c)), " ")
        what = {"\n": "a newline", "\r": "a carriage return", " ": "a space", "\t": "a tab"}.get(
            bad, f"the character U+{ord(bad):04X}")
        raise option_error(f"{where} contains {what}; a Hugging Face token is printable ASCII without spaces",
                           hint="pass the token without surrounding whitespace, e.g. {token=}",
                           token=Spelled("open('token-file').read().strip()", "\"$(tr -d '[:space:]' < token-file)\""))


class _ScrubFilter(logging.Filter):
    """Rewrites every log record's text with the known tokens removed (X-HF-Warning headers and such)."""

    def __init__(self, secrets: set[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        cleaned = scrub(text, self.secrets)
        if cleaned != text:
            record.msg, record.args = cleaned, None
        return True


@contextlib.contextmanager
def scrubbed_channels(secrets: set[str]) -> Iterator[None]:
    """While talking to the Hub: no token on any channel, and no retry chatter before the one line.

    huggingface_hub logs server warnings (X-HF-Warning) and one line per retry, and emits
    README metadata warnings through ``warnings.warn``; any of them may quote what the server
    sent back. Its log level is raised to ERROR (a failure is reported by d2merge's own line),
    every handler in reach scrubs records, and warnings are caught and re-issued scrubbed, on
    one line each, when the block ends (so that a recorder outside sees only the scrubbed text).
    """
    import warnings

    hub_logger = logging.getLogger("huggingface_hub")
    filt = _ScrubFilter(secrets)
    handlers = {id(h): h for lg in (logging.getLogger(), hub_logger) for h in lg.handlers}
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    hub_logger.addFilter(filt)
    for handler in handlers.values():
        handler.addFilter(filt)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for handler in handlers.values():
            handler.removeFilter(filt)
        hub_logger.removeFilter(filt)
        hub_logger.setLevel(level)
        for w in caught:
            text = " ".join(scrub(str(w.message), secrets).split())
            warnings.warn_explicit(text, w.category if isinstance(w.category, type) else UserWarning,
                                   w.filename, w.lineno)


def _push(folder: Path, repo_id: str, result: PushResult, secrets: set[str], *, endpoint: str | None, hub_url: str,
          branch: str, private: bool, create_pr: bool, message: str, files: tuple[PushedFile, ...],
          resolved: str) -> PushResult:
    """The Hub calls of :func:`push_folder`, each turned into a one-line error by ``_hub_errors``."""
    from huggingface_hub import HfApi

    # endpoint=None lets HfApi read HF_ENDPOINT itself; never replace it with a default of ours.
    api = HfApi(endpoint=endpoint, token=resolved, library_name="d2merge", library_version=__version__)
    with _hub_errors(secrets, step=f"creating repo {repo_id}", repo_id=repo_id, endpoint=hub_url, revision=branch):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if branch != "main" and not branch.startswith("refs/pr/"):
        with _hub_errors(secrets, step=f"creating branch '{branch}' in {repo_id}", repo_id=repo_id,
                         endpoint=hub_url, revision=branch):
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
    with _hub_errors(secrets, step=f"uploading to {repo_id}", repo_id=repo_id, endpoint=hub_url, revision=branch):
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            # Exactly the listed files: glob-escaped so that a '[' or '*' in a name matches only itself.
            allow_patterns=[glob.escape(f.path) for f in files],
            revision=None if create_pr else branch,
            create_pr=create_pr,
            commit_message=message,
        )
    # URLs as the server sent them: a misbehaving endpoint may put the token in them.
    return dataclasses.replace(result, repo_url=scrub(str(repo_url), secrets), dry_run=False,
                               commit_url=scrub(str(commit.commit_url), secrets), commit_oid=commit.oid,
                               pr_url=None if commit.pr_url is None else scrub(str(commit.pr_url), secrets))


def format_push(result: PushResult) -> str:
    """Human-readable report of a push or dry run: where, which files with sizes, and the model card."""
    where = "pull request against main" if result.create_pr else f"branch {result.revision}"
    target = f"{result.repo_url} ({where})"
    verb = "would push" if result.dry_run else "pushed"
    lines = [f"{verb} {len(result.files)} files ({format_size(result.total_size)}) to {target}"]
    width = max((len(f.path) for f in result.files), default=0)
    lines += [f"  {f.path:<{width}}  {format_size(f.size):>9}" for f in result.files]
    lines.append(f"commit message: {result.commit_message}")
    if result.dry_run:
        if result.private:
            lines.append("visibility: private (if the repo is created by this push)")
        if result.model_card is None:
            lines.append(f"model card: none (no {MODEL_CARD_NAME} in the folder)")
        else:
            lines.append(f"model card ({MODEL_CARD_NAME}):")
            lines += [f"  | {line}" for line in result.model_card.splitlines()]
        lines.append("dry run: nothing was contacted or sent")
    else:
        lines.append(f"commit: {result.commit_url}")
        if result.pr_url:
            lines.append(f"pull request: {result.pr_url}")
    return "\n".join(lines)


# -- folder helpers -------------------------------------------------------------------------------


def _existing_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise D2MergeError("not a folder" if folder.exists() else "no such folder", path=folder,
                           hint="pass the merged model folder, the -o of `d2merge merge`")
    return folder


def _walk(folder: Path) -> Iterator[tuple[str, Path, bool]]:
    """(relative POSIX path, path, is_dir) for every entry, not descending into hidden folders
    (.git, .cache/huggingface download metadata): they are never pushed."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in sorted(dirnames):
            yield (here / name).relative_to(folder).as_posix(), here / name, True
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield (here / name).relative_to(folder).as_posix(), here / name, False


def _is_hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


def _check_repo_id(repo_id: str) -> None:
    """Require owner/name so that URLs are known without asking the Hub who we are."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise D2MergeError(f"repo id '{repo_id}' must be OWNER/NAME", hint="e.g. my-user/llama-merged")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise D2MergeError(f"invalid repo id '{repo_id}': {exc}") from None


# -- Hub errors -----------------------------------------------------------------------------------


def check_can_push() -> None:
    """Refuse a push that cannot happen (HF_HUB_OFFLINE) before any work is done for it.

    ``merge --push-to`` calls this before merging: an offline run must not spend a
    merge and a verify to fail at the last step.
    """
    if _offline():
        raise option_error("HF_HUB_OFFLINE is set, so nothing can be pushed",
                           hint="unset HF_HUB_OFFLINE to push, or merge without {push}", flags={"push": "--push-to"})


def _offline() -> bool:
    from huggingface_hub import constants

    # The constant is read when huggingface_hub is imported; the variable catches a later export.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.is_offline_mode() or env


def _known_secrets(token: str | None) -> set[str]:
    """Tokens that must never be echoed: the explicit one and the ones in the environment."""
    candidates = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    return {c for c in candidates if c} | {c.strip() for c in candidates if c and c.strip()}


def scrub(text: str, secrets: set[str]) -> str:
    """Remove tokens from text about to be shown: the known ones, and anything shaped like one."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP stack this huggingface_hub version uses."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        with contextlib.suppress(ImportError):
            imported = importlib.import_module(module)
            types.extend(getattr(imported, name) for name in names if hasattr(imported, name))
    return tuple(types)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@contextlib.contextmanager
def _hub_errors(secrets: set[str], *, step: str, repo_id: str, endpoint: str, revision: str) -> Iterator[None]:
    """Turn the client's exceptions into one-line D2MergeErrors that say what to do.

    `from None` everywhere: the chained original may quote the token (a server or proxy echoing
    it), and --debug prints chains.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    try:
        yield
    except D2MergeError:
        raise
    except Exception as exc:
        chain = list(_causes(exc))
        http = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
        transport = next((e for e in chain if isinstance(e, _transport_errors())), None)
        if isinstance(transport, OfflineModeIsEnabled):
            raise D2MergeError("HF_HUB_OFFLINE is set, so nothing can be pushed",
                               hint="unset HF_HUB_OFFLINE to push") from None
        if http is not None and getattr(http, "response", None) is not None:
            raise _http_error(http, secrets, step=step, repo_id=repo_id, endpoint=endpoint, revision=revision,
                              revision_missing=isinstance(http, RevisionNotFoundError)) from None
        if transport is not None:
            reason = _one_line(scrub(str(transport), secrets)) or type(transport).__name__
            raise D2MergeError(f"cannot reach the Hub at {endpoint} while {step} ({reason})",
                               hint="check your network, proxy and HF_ENDPOINT, then retry") from None
        if isinstance(exc, ValueError):  # the client's own validation, e.g. invalid README.md metadata
            raise D2MergeError(f"{step} failed: {_one_line(scrub(str(exc), secrets))}") from None
        if any(secret in str(e) for e in chain for secret in secrets):
            raise RuntimeError(scrub(str(exc), secrets)) from None  # a bug, but never one that leaks the token
        raise


def _http_error(error: Any, secrets: set[str], *, step: str, repo_id: str, endpoint: str, revision: str,
                revision_missing: bool) -> D2MergeError:
    status = error.response.status_code
    server = _one_line(scrub(getattr(error, "server_message", None) or "", secrets))
    if len(server) > _MAX_SERVER_MESSAGE:
        server = server[:_MAX_SERVER_MESSAGE] + "..."
    said = f": {server}" if server else ""
    where = f"{step} on {endpoint}"
    if status == 401:
        return option_error(escaped(f"the Hub rejected the token (401) while {where}{said}"), hint=_AUTH_HINT)
    if status == 403:
        return option_error(escaped(f"the token may not write to {repo_id} (403) while {where}{said}"),
                            hint="use a token with write access to this user or organization "
                                 "(fine-grained tokens need 'write' on it): `hf auth login` or {token} / HF_TOKEN")
    if status == 404 and revision_missing:
        return option_error(escaped(f"revision '{revision}' not found in {repo_id} (404) while {where}{said}"),
                            hint="check {revision}; open pull requests are refs/pr/N")
    if status == 404:
        return option_error(escaped(f"repository {repo_id} not found (404) while {where}{said}"),
                            hint=f"check REPO_ID and HF_ENDPOINT ({escaped(endpoint)}), and that your token can see "
                                 "it; " + _AUTH_HINT)
    if status == 409:
        return D2MergeError(f"conflict (409) while {where}{said}",
                            hint="someone pushed at the same time or the name is taken; retry")
    if status == 429:
        return D2MergeError(f"rate limited (429) while {where}{said}", hint="wait a few minutes and retry")
    if status >= 500:
        return D2MergeError(f"the Hub had a server error ({status}) while {where}{said}",
                            hint="retry later; LFS files already uploaded are not sent again")
    return D2MergeError(f"the Hub answered {status} while {where}{said}")


def _one_line(text: str) -> str:
    return " ".join(text.split())
