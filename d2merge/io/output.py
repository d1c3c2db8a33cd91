"""Atomic output folders and the small files that travel with a merged model.

Everything is written into a hidden temp folder beside the destination and
renamed into place at the end, so an interrupted run never leaves a folder that
looks complete. A rerun removes temp folders left by runs that are gone.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, TypeVar

from d2merge.errors import D2MergeError, escaped, option_error

# Names of work in progress beside an output (one set, shared with hub.py, which refuses to push
# a folder holding any of them): a temp folder or file, a previous output set aside during a
# commit (a folder, or a folder of previous files), and the lock of the run writing the output.
TEMP_MARKER = ".d2merge-tmp-"
OLD_MARKER = ".d2merge-old-"
OLD_FILES_MARKER = ".d2merge-oldfiles-"
LOCK_SUFFIX = ".d2merge-lock"
WORK_MARKERS = (TEMP_MARKER, OLD_MARKER, OLD_FILES_MARKER, LOCK_SUFFIX)
# What other writers (huggingface_hub, curl, browsers) name a file they are still writing.
TEMP_SUFFIXES = (".tmp", ".partial", ".incomplete")
# A model folder's weights and shard indexes, as check_complete looks for them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
MOVING_IN = "moving-in.json"
# Inside every output folder: what d2merge wrote there. --overwrite replaces a folder only when it
# holds nothing else (an existing project folder passed as -o by mistake is refused, not deleted).
OUTPUT_MARKER = ".d2merge-output.json"
# Files copied from the base folder: tokenizer, generation settings, chat templates, licence.
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md",
)
COPIED_PATTERNS = ("*.tiktoken", "additional_chat_templates/*.jinja")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _short_write(exc: OSError) -> bool:
    """numpy's ``tofile`` (gguf-py writes tensors with it) reports a full disk as a short write, no errno."""
    return exc.errno is None and " requested and " in str(exc) and str(exc).rstrip().endswith("written")


def disk_error(exc: OSError, path: Path) -> D2MergeError:
    """One line for the usual write failures, with what to do about them."""
    if exc.errno in _NO_SPACE or _short_write(exc):
        return D2MergeError("no space left (or file size limit reached) while writing", path=path,
                            hint="free disk space or write the output elsewhere")
    if exc.errno in _NOT_ALLOWED:
        return D2MergeError("permission denied while writing", path=path, hint="choose a writable output location")
    return D2MergeError(f"cannot write: {exc.strerror or exc}", path=path)


def _disk_fault(exc: BaseException | None, final: Path, temp: Path) -> OSError | None:
    """The full disk or refused write behind an exception that left a writer unexplained: a bare
    OSError from a library's save (onnx, numpy), or one that a library wrapped in its own error.
    Only a failure on the output's own paths (or on no named path: a write) counts, never an input's."""
    if not isinstance(exc, Exception):
        return None  # Ctrl-C stays Ctrl-C
    cause: BaseException | None = exc.__cause__ if isinstance(exc, D2MergeError) else exc
    for _ in range(4):  # a library's wrapper, torch.onnx's, ours: a short chain
        if isinstance(cause, OSError) and (cause.errno in _NO_SPACE + _NOT_ALLOWED or _short_write(cause)):
            filename = cause.filename
            named = Path(os.fsdecode(filename)).absolute() if isinstance(filename, (str, bytes)) else None
            if named is None or _inside(named, temp.absolute()) or (
                    named.parent == final.parent and final.name in named.name):
                return cause
            return None
        if cause is None:
            return None
        cause = cause.__cause__ or cause.__context__
    return None


def check_output_location(out: Path, inputs: Iterable[Path], *, overwrite: bool, is_file: bool = False,
                          missing_parents: bool = False, sidecars: Iterable[str] = ()) -> Path:
    """Refuse outputs that would clobber inputs or an existing result; return the absolute path.

    ``is_file`` is for single-file outputs (a .safetensors or .onnx file) rather than folders;
    ``missing_parents`` for writers that create the parent folders (export-onnx -o NEW_DIR);
    ``sidecars`` the names of files written beside ``out`` (a GGUF's Modelfile), checked now
    rather than found in the way when the finished output is moved into place.
    """
    out = Path(out).expanduser().absolute()
    recover_output(out)  # before any work: a killed run's previous output is back, its temps gone
    check_not_locked(out)
    resolved = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise D2MergeError("output path overlaps an input", path=out,
                               hint=f"write the output outside {source}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise option_error("output already exists", path=out, hint="pass {overwrite=} or choose another path",
                               overwrite=True)
        if out.is_symlink() or (out.is_dir() == is_file):
            what = "a folder" if out.is_dir() else "not a folder"
            raise D2MergeError(f"output exists and is {what}; refusing to replace it", path=out,
                               hint="remove it or choose another path")
        if not is_file:
            check_replaceable(out)
    for name in sidecars:
        beside = out.parent / name
        if (beside.exists() or beside.is_symlink()) and not overwrite:
            raise option_error("a file this output writes beside it already exists", path=beside,
                               hint="pass {overwrite=} or choose another output name", overwrite=True)
    parent = out.parent
    if missing_parents:
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        if parent.exists() or parent.is_symlink():
            raise D2MergeError("the output's parent is not a folder", path=parent, hint="choose another output path")
        raise D2MergeError("the output's parent folder does not exist", path=parent,
                           hint="create it first or choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise D2MergeError("the output's parent folder is not writable", path=parent,
                           hint="choose a writable output location")
    return out


def _files_under(folder: Path) -> list[str]:
    """Every entry under ``folder`` (files, links, empty folders), relative, in POSIX form, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink() or not any((here / d).iterdir())]:
            found.append((here / name).relative_to(folder).as_posix())
    return sorted(found)


def write_output_marker(folder: Path) -> None:
    """Record, inside a finished output folder, every file d2merge put there."""
    files = [name for name in _files_under(folder) if name != OUTPUT_MARKER]
    write_json(folder / OUTPUT_MARKER, {"written_by": "d2merge", "files": files})


def _marked_files(folder: Path) -> set[str] | None:
    """The files the folder's marker says d2merge put there (the marker included); None without a valid marker."""
    from d2merge.io.json_file import parse_json

    marker = folder / OUTPUT_MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        data = parse_json(marker.read_text(encoding="utf-8"), OUTPUT_MARKER, marker)
    except (D2MergeError, OSError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("written_by") == "d2merge" and isinstance(data.get("files"), list):
        return {f for f in data["files"] if isinstance(f, str)} | {OUTPUT_MARKER}
    return None


def check_replaceable(folder: Path) -> None:
    """--overwrite may replace an empty folder or one that d2merge wrote, and nothing else."""
    present = _files_under(folder)
    if not present:
        return
    listed = _marked_files(folder)
    hint = "{overwrite} replaces only a folder that d2merge wrote; remove it yourself or choose another path"
    if listed is None:
        raise option_error(f"the output folder was not written by d2merge (it holds {escaped(present[0])})",
                           path=folder, hint=hint)
    unexpected = [name for name in present if name not in listed]
    if unexpected:
        raise option_error(f"the output folder holds a file d2merge did not write: {escaped(unexpected[0])}",
                           path=folder, hint=hint)


def is_work_in_progress(name: str) -> bool:
    """A name left by an interrupted or still-running write (d2merge's work markers, others' temp suffixes)."""
    return any(marker in name for marker in WORK_MARKERS) or name.endswith(TEMP_SUFFIXES)


def check_complete(path: Path, *, written_by_d2merge: bool = False, needs_config: bool = True) -> None:
    """Refuse, in one line naming the file, an output that is not finished: the one definition of a finished
    output (``d2merge push`` checks a folder with it, merge-many's reruns skip only an output it accepts).

    A file: present, not a work file, and a ``.safetensors`` as long as its header says (the main
    file of ``AtomicFiles`` moves in last, so its presence means its set is whole). A folder: nothing
    half-written anywhere under it (a work marker or a temp suffix), a readable ``config.json``, at
    least one weights file, every shard an index names, every ``.safetensors`` as long as its header
    says, and every file its marker (:data:`OUTPUT_MARKER`, written by the commit) lists. The marker
    is required with ``written_by_d2merge`` (merge-many's outputs); a folder made elsewhere (a Hub
    snapshot, a training run's) has none, and push takes it on the other checks. ``needs_config=False``:
    the merge of a base without config.json, which writes none either.
    """
    from d2merge.io.safetensors_file import SafetensorsFile

    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise D2MergeError("no such output", path=path)
        if is_work_in_progress(path.name):
            raise _leftover(path)
        if path.name.endswith(".safetensors"):
            SafetensorsFile(path)  # a file cut short is refused by its header's promise
        return
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(path):  # hidden folders (.git, .cache) hold no output
        here = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            if is_work_in_progress(name):
                raise _leftover(here / name)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        present.update((here / n).relative_to(path).as_posix() for n in filenames
                       if not n.startswith(".") and (here / n).is_file())
    if "config.json" in present:
        _json_object(path / "config.json")
    elif needs_config:
        raise D2MergeError("no config.json: this is not a complete model folder", path=path,
                           hint="push the merge output folder, which has config.json next to the weights")
    if not any(p.endswith(WEIGHT_SUFFIXES) for p in present):
        raise D2MergeError("no weights (*.safetensors, *.bin, *.gguf, *.onnx) in the folder", path=path,
                           hint="the merge did not finish; re-run it")
    for index in sorted(p for p in present if p.endswith(INDEX_SUFFIXES)):
        weight_map = _json_object(path / index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise D2MergeError("index has no 'weight_map'", path=path / index)
        base = index.rsplit("/", 1)[0] + "/" if "/" in index else ""
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or base + shard not in present:
                raise D2MergeError(f"index references shard '{shard}', which is missing", path=path / index,
                                   hint="the merge did not finish writing; re-run it")
    for name in sorted(p for p in present if p.endswith(".safetensors")):
        SafetensorsFile(path / name)
    listed = _marked_files(path)
    if listed is None and written_by_d2merge:
        raise D2MergeError(f"no {OUTPUT_MARKER}: not a finished d2merge output", path=path,
                           hint="d2merge records every file of an output when it finishes; re-run the merge")
    for name in sorted(listed or ()):
        if not ((path / name).exists() or (path / name).is_symlink()):
            raise D2MergeError(f"{name} is missing: {OUTPUT_MARKER} lists it", path=path / name,
                               hint="the output is no longer whole; re-run the merge")


def _leftover(path: Path) -> D2MergeError:
    return D2MergeError("leftover temporary file: a write was interrupted or is still running", path=path,
                        hint="wait for it to finish or re-run the merge into a fresh folder")


def _json_object(path: Path) -> dict[str, Any]:
    from d2merge.io.json_file import read_json

    data = read_json(path, path.name)
    if not isinstance(data, dict):
        raise D2MergeError("expected a JSON object", path=path)
    return data


def _marked_pid(name: str, prefix: str) -> int | None:
    """The pid in ``<prefix><pid>`` or ``<prefix><pid>-<what>``; None for any other name."""
    if not name.startswith(prefix):
        return None
    pid_text = name[len(prefix):].split("-", 1)[0]
    return int(pid_text) if pid_text.isdigit() else None


# Work paths this process is using right now: recovery skips them (an export's scratch merge
# sits beside the graph that the same process is about to write).
_IN_USE: set[str] = set()


def _gone(pid: int, path: Path) -> bool:
    """The run that owns a marked name is over: dead, or this process and no longer in use."""
    if pid == os.getpid():
        return str(path.absolute()) not in _IN_USE
    return not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(final: Path) -> None:
    """Remove ``.<name>.d2merge-tmp-<pid>[-what]`` folders or files left by killed runs (their pid is gone)."""
    prefix = f".{final.name}{TEMP_MARKER}"
    # escaped: a name like "run[1]" or "a*" must match only its own temp entries
    for candidate in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = _marked_pid(candidate.name, prefix)
        if pid is not None and _gone(pid, candidate):
            _remove(candidate)


def recover_output(final: Path) -> None:
    """Undo what a killed run left at ``final``, before any new work: temps go, a previous output comes back.

    A run killed between the renames of a commit left the previous output aside: a folder
    output as ``.<name>.d2merge-old-<pid>``, file outputs inside ``.<name>.d2merge-oldfiles-<pid>/``
    with the journal of its commit (:func:`_settle_files_commit` decides from it whether the
    commit had finished; if not, the previous files come back).
    """
    final = Path(final)
    if not final.parent.is_dir():
        return
    remove_stale_temps(final)
    for marker in (OLD_MARKER, OLD_FILES_MARKER):
        prefix = f".{final.name}{marker}"
        for candidate in sorted(final.parent.glob(f"{glob.escape(prefix)}*")):
            pid = _marked_pid(candidate.name, prefix)
            if pid is None or not _gone(pid, candidate):
                continue
            if marker == OLD_FILES_MARKER:
                _settle_files_commit(candidate, final)
            elif final.exists() or final.is_symlink():
                _remove(candidate)
            else:
                os.replace(candidate, final)


def _read_journal(folder: Path) -> tuple[list[str], list[str]] | None:
    """(new names moving in, previous names set aside) from a commit's journal; None when it was
    never completely written (killed, or a full disk, while writing it: no file had moved yet)."""
    try:
        data = json.loads((folder / MOVING_IN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, list):  # written by an earlier d2merge: the new names only
        data = {"incoming": data, "set_aside": [p.name for p in folder.iterdir() if p.name != MOVING_IN]}
    if not isinstance(data, dict):
        return None
    names = [[n for n in data.get(key, []) if isinstance(n, str) and n and Path(n).name == n and n != MOVING_IN]
             for key in ("incoming", "set_aside")]
    return names[0], names[1]


def _settle_files_commit(old: Path, final: Path) -> None:
    """Finish a files commit that stopped (a kill, a full disk, Ctrl-C): keep the new set if it
    was complete, else put the previous one back; either way the folder ``old`` goes.

    The commit's order makes this decidable: the journal is complete before any rename; the
    previous main file is set aside first (so a main file at ``final`` is the new one once
    it left), then the previous sidecars, then the new sidecars and the new main file last;
    a finished commit renames ``old`` away before deleting it.
    """
    parent, main = final.parent, final.name
    journal = _read_journal(old)
    if journal is None:  # no rename had happened
        _remove(old)
        return
    incoming, set_aside = journal
    previous_main_aside = (old / main).exists() or main not in set_aside
    if previous_main_aside and (final.exists() or final.is_symlink()):
        _remove(old)  # the new main file arrived: the commit was complete
        return
    for name in [*incoming, main]:
        # a new file that moved in; a name still holding its previous file (not yet set aside) stays
        if name not in set_aside or (old / name).exists():
            _remove(parent / name)
    for previous in old.iterdir():
        if previous.name != MOVING_IN:
            os.replace(previous, parent / previous.name)
    _remove(old)


class OutputLock:
    """``.<name>.d2merge-lock`` beside an output, held (flock) by the one run writing it.

    A second run on the same output fails at once with one line instead of racing the first
    through the commit renames. The kernel drops the lock when its holder dies, so a kill -9
    never leaves a lock that blocks; the file itself is removed by whoever releases it.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.path = self.final.parent / f".{self.final.name}{LOCK_SUFFIX}"
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise disk_error(exc, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise D2MergeError("another d2merge run is writing this output right now", path=self.final,
                                   hint="wait for it to finish, or choose another output path") from None
            try:  # the file may have been removed by its previous holder after we opened it: try again
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.fd = fd
                    return self
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: no one else can be between
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_not_locked(final: Path) -> None:
    """Fail fast, before any work, when another live run holds the output's lock."""
    lock = OutputLock(final)
    if lock.path.exists():
        lock.acquire().release()


_Output = TypeVar("_Output", bound="_StagedOutput")


class _StagedOutput:
    """A temp folder ``.<name>.d2merge-tmp-<pid>`` beside ``final``, holding the output's lock.

    Entering recovers what a killed earlier run left and creates the temp folder; leaving
    removes whatever of it a commit did not move into place, and releases the lock.
    """

    def __init__(self, final: Path, *, overwrite: bool = False):
        self.final = Path(final)
        self.overwrite = overwrite
        self.temp = self.final.parent / f".{self.final.name}{TEMP_MARKER}{os.getpid()}"
        self.committed = False
        self.lock = OutputLock(self.final)

    def __enter__(self: _Output) -> _Output:
        self.lock.acquire()
        try:
            recover_output(self.final)
            if self.temp.exists():
                shutil.rmtree(self.temp)
            self.temp.mkdir()
            _IN_USE.add(str(self.temp.absolute()))
        except OSError as exc:
            self.lock.release()
            raise disk_error(exc, self.temp) from None
        except BaseException:
            self.lock.release()
            raise
        return self

    def path(self, name: str) -> Path:
        return self.temp / name

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            # after AtomicFolder's commit the temp is the output (renamed away); after
            # AtomicFiles' it is an empty folder; uncommitted, it is a partial output
            shutil.rmtree(self.temp, ignore_errors=True)
        finally:
            _IN_USE.discard(str(self.temp.absolute()))
            self.lock.release()
        fault = _disk_fault(exc, self.final.absolute(), self.temp)
        if fault is not None:  # every writer's full disk reads the same, whichever library hit it
            raise disk_error(fault, self.final) from exc


class AtomicFolder(_StagedOutput):
    """A temp folder that becomes ``final`` on :meth:`commit`, and vanishes on error or interrupt.

    Holds the output's lock from start to end; what a killed earlier run left is recovered first.
    """

    def commit(self) -> Path:
        """fsync and rename into place; an existing output is replaced only after the new one is whole."""
        old = self.final.parent / f".{self.final.name}{OLD_MARKER}{os.getpid()}"
        try:
            write_output_marker(self.temp)
            _fsync(self.temp)
            if self.final.exists():
                if not self.overwrite:
                    raise option_error("output appeared while merging", path=self.final,
                                       hint="pass {overwrite=} or choose another path", overwrite=True)
                check_replaceable(self.final)
                os.replace(self.final, old)
            os.replace(self.temp, self.final)
            _fsync(self.final.parent)
        except BaseException as exc:
            # Ctrl-C or a failed rename between the two renames: the previous output goes back now
            # (or, when the new one had arrived, the previous one goes)
            try:
                if old.exists():
                    if self.final.exists():
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.replace(old, self.final)
            except OSError:
                pass  # left for the next run's recover_output
            if isinstance(exc, OSError):
                raise disk_error(exc, self.final) from None
            raise
        shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.final


class AtomicFiles(_StagedOutput):
    """One output file and its sidecars (``model.onnx`` + ``model.onnx.data``, a GGUF + Modelfile).

    They are written under their final names into ``.<name>.d2merge-tmp-<pid>/`` beside the
    output and moved into place at :meth:`commit`: previous versions aside first, then the
    sidecars, the main file last, so the main file's presence means the set is complete.
    :func:`recover_output` undoes a commit that a kill interrupted.
    """

    def __init__(self, final: Path, *, overwrite: bool = False, sidecars: Iterable[str] = ()):
        super().__init__(final, overwrite=overwrite)
        self.sidecars = tuple(sidecars)

    @property
    def staged(self) -> Path:
        """Where the main file is written (its final name, inside the temp folder)."""
        return self.temp / self.final.name

    def commit(self) -> tuple[Path, ...]:
        """Move the set into place; a failure or an interrupt part way puts the previous set back.

        A full disk can strike after the files are written (the journal needs a block, a
        rename may need a directory block), and Ctrl-C can land between two renames: both are
        undone here, at once, by the same code that recovers a killed run's commit.
        """
        parent = self.final.parent
        incoming = [p.name for p in sorted(self.temp.iterdir()) if p.name != self.final.name]
        if not self.staged.exists():
            raise D2MergeError("nothing was written", path=self.final)
        names = [*incoming, self.final.name]
        present = [n for n in dict.fromkeys([self.final.name, *names, *self.sidecars])
                   if (parent / n).exists() or (parent / n).is_symlink()]
        if present and not self.overwrite:
            raise option_error("output appeared while writing", path=parent / present[0],
                               hint="pass {overwrite=} or choose another path", overwrite=True)
        old = parent / f".{self.final.name}{OLD_FILES_MARKER}{os.getpid()}"
        try:
            for name in names:
                _fsync(self.temp / name)
            old.mkdir()
            _write_synced(old / MOVING_IN, {"incoming": incoming, "set_aside": present})
            _fsync(old)
            for name in present:  # the previous main file first (see _settle_files_commit)
                os.replace(parent / name, old / name)
            for name in names:  # sidecars first, the main file last
                os.replace(self.temp / name, parent / name)
            _fsync(parent)
        except BaseException as exc:
            try:
                if old.exists():
                    _settle_files_commit(old, self.final)
            except OSError:
                pass  # left for the next run's recover_output, which finishes the same way
            if isinstance(exc, OSError):
                raise disk_error(exc, self.final) from None
            raise
        done = self.temp.parent / f"{self.temp.name}-done"  # one rename: the commit is finished
        try:
            os.replace(old, done)
        except OSError:
            pass  # recover_output sees the new main file in place and removes the folder
        finally:  # Ctrl-C right after the rename included
            _remove(done)
        self.committed = True
        return tuple(parent / n for n in [self.final.name, *incoming])


@contextmanager
def scratch_beside(final: Path, what: str) -> Iterator[Path]:
    """A work folder ``.<name>.d2merge-tmp-<pid>-<what>`` beside an output (the fp32 merge an export
    reads), removed at the end; a killed run's is removed by the next run's :func:`recover_output`."""
    final = Path(final).absolute()
    folder = final.parent / f".{final.name}{TEMP_MARKER}{os.getpid()}-{what}"
    try:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
    except OSError as exc:
        raise disk_error(exc, folder) from None
    _IN_USE.add(str(folder))
    try:
        yield folder
    finally:
        _IN_USE.discard(str(folder))
        shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path) -> None:
    """fsync a file or a folder (its entries) where the filesystem allows it; best effort, never raises."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: Any) -> None:
    """JSON written and fsynced before the caller goes on (a commit's journal); OSError as it comes."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, trailing newline)."""
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise disk_error(exc, path) from None


def save_json(path: Path, data: Any) -> Path:
    """A report file (verify's, merge-many's, bench's) written whole: see :func:`save_text`."""
    return _save_report(path, lambda staged: write_json(staged, data))


def save_text(path: Path, text: str) -> Path:
    """A one-file text report (the HTML pages) written whole: see :func:`_save_report`."""
    return _save_report(path, lambda staged: write_text(staged, text))


def _save_report(path: Path, write: Callable[[Path], None]) -> Path:
    """Every one-file report goes through :class:`AtomicFiles`, the path the merge outputs take:
    a reader, a browser, a CI artifact upload, a kill or a full disk never sees half a report;
    an existing report is replaced (a folder or a link at that path is refused, never set aside)."""
    path = check_output_location(Path(path), (), overwrite=True, is_file=True)
    with AtomicFiles(path, overwrite=True) as staging:
        write(staging.staged)
        staging.commit()
    return path


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise disk_error(exc, path) from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def support_files(source_folder: Path | None, weight_files: Iterable[Path] = ()) -> tuple[list[str], list[str]]:
    """The support files a merge copies, and the ones it skips, each with the reason.

    A name such as LICENSE may be a symlink to anything (``ln -s ~/.cache/huggingface/token
    LICENSE``), and a merged folder is pushed to the Hub as it is. So a file is copied only when
    it is a regular file that resolves inside the base folder, or inside the folder the base's
    own weights resolve into (the Hub cache keeps a snapshot's files as links into ``blobs/``).
    """
    if source_folder is None:
        return [], []
    trusted = {source_folder.resolve(), *(Path(w).resolve().parent for w in weight_files)}
    candidates = [n for n in COPIED_FILES if (source_folder / n).exists() or (source_folder / n).is_symlink()]
    for pattern in COPIED_PATTERNS:
        candidates += sorted(str(p.relative_to(source_folder)) for p in source_folder.glob(pattern))
    names, skipped = [], []
    for name in candidates:
        path = source_folder / name
        resolved = path.resolve()
        if not any(_inside(resolved, folder) for folder in trusted):
            skipped.append(f"{name} (a link to a file outside the base folder)")
        elif not resolved.is_file():
            skipped.append(f"{name} (not a regular file)")
        else:
            names.append(name)
    return names, skipped


def copy_support_files(source_folder: Path | None, destination: Path, weight_files: Iterable[Path] = ()) -> list[str]:
    """Copy tokenizer, generation config, templates and licence files; returns the names copied.

    Only what :func:`support_files` allows; the merge plan lists the skipped ones as a note.
    """
    names, _ = support_files(source_folder, weight_files)
    for name in names:
        target = destination / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_folder / name, target)
        except OSError as exc:
            raise disk_error(exc, target) from None
    return names


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
