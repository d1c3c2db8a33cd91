"""What the demo promises a newcomer, in one torch-free place: its measured times and the three commands
it ends with. ``d2merge demo --help`` and README.md state the same (tests/system/test_docs.py checks both), and
README's figure note says when they were measured and at which commit.
"""

from __future__ import annotations

# The whole demo's target, on the machine it runs on (torch's import before it not counted): the demo
# fits its ONNX exporter and timing grid into what is left of it, and skips both past twice it.
DEMO_SECONDS = 40.0
# `d2merge demo` on the shared 2-core development machine, wall time from the CLI's start to its last
# line, at the commits README's figure note names: both cores busy with the test suite's two workers;
# other sessions' jobs at load average 17-19; the same plus two more busy processes.
MEASURED = {"busy": "24 s", "loaded": "66 s", "overloaded": "2 min 56 s"}
# What to do next, with one's own base and adapter: README's first screen shows the same three.
THREE_COMMANDS = (
    "d2merge merge ./base ./my-adapter -o ./merged             # exact streaming merge (--dry-run: the plan first)",
    "d2merge verify ./base ./my-adapter ./merged               # merged vs unmerged: exit 0 pass, 1 drift",
    "d2merge export-gguf ./merged -o model.gguf --modelfile    # llama.cpp / Ollama: model.gguf + model.Modelfile",
)
