"""The shape of the code: coordinator/ and worker/ never import each other, no import circle
among the project's modules (imports inside functions count), and no module in coordinator/ or
worker/ over MAX_LINES lines. Read with `ast`, without importing anything."""

from __future__ import annotations

from tests.harness.import_graph import circles, import_graph, project_modules

MAX_LINES = 400  # small modules with one job each
SEPARATE = ("coordinator", "worker")  # two programs on two machines: configs/ and protos/ join them


def test_the_graph_reads_every_module_and_sees_lazy_imports() -> None:
    graph = import_graph()
    assert {"coordinator.app.cli", "worker.app.cli", "configs.schema", "protos.swarmtrain_pb2"} <= set(graph)
    # worker/app/cli.py imports the lifecycle inside a function, once the arguments are good
    assert "worker.app.lifecycle" in graph["worker.app.cli"]


def test_coordinator_and_worker_never_import_each_other() -> None:
    crossing = sorted(f"{name} imports {target}" for name, targets in import_graph().items()
                      for target in targets for side in SEPARATE
                      if name.split(".")[0] == side and target.split(".")[0] in set(SEPARATE) - {side})
    assert not crossing, "\n".join(crossing)


def test_no_import_circles() -> None:
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_module_in_coordinator_or_worker_is_over_the_line_limit() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in project_modules().items()
             if name.split(".")[0] in SEPARATE}
    over = sorted((n, name) for name, n in sizes.items() if n > MAX_LINES)
    assert not over, f"over {MAX_LINES} lines:\n" + "\n".join(f"{name}: {n}" for n, name in over)
