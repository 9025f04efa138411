"""The codecs' layering: each codec module imports only the codec base, the registry imports the
codecs, and the typed codec choice in configs needs neither protos nor the worker."""

from __future__ import annotations

from tests.harness.import_graph import import_graph

CODEC_MODULES = ("blockwise", "casts", "feedback", "powersgd", "topk")


def test_codec_modules_import_only_the_base() -> None:
    graph = import_graph()
    for name in CODEC_MODULES:
        assert graph[f"worker.compression.{name}"] <= {"worker.compression.base"}, name
    assert graph["worker.compression.base"] == set()
    assert graph["worker.compression.registry"] >= {f"worker.compression.{m}" for m in CODEC_MODULES
                                                     if m != "feedback"}  # error feedback wraps a codec


def test_configs_codecs_needs_no_protos() -> None:
    assert not {m for m in import_graph()["configs.codecs"] if m.startswith(("protos", "worker", "coordinator"))}
