"""The committed generated code matches protos/swarmtrain.proto."""

from __future__ import annotations

from protos import swarmtrain_pb2
from protos.generate import stale_outputs


def test_generated_code_is_up_to_date() -> None:
    assert stale_outputs() == [], "run: python -m protos.generate"


def test_every_enum_has_an_unspecified_zero_value() -> None:
    # proto3 convention: 0 means "not set", so a missing field never reads as a real choice.
    for enum in swarmtrain_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name
