"""`list --json` streams: the array is written item by item, and must be the very text
`print_json` writes for the whole list (scripts parse it; schemas/list.json validates it)."""

from __future__ import annotations

import json

import pytest

from trustdb.cli.output import print_json, print_json_array

CASES = [
    [],
    [{"path": "/bin/true", "origin": None}],
    [{"path": "/odd\nname \"quoted\"", "nested": {"a": [1, 2], "b": {}}}, {"x": []}, 3, "s"],
]


@pytest.mark.parametrize("items", CASES)
def test_the_streamed_array_is_the_text_of_the_whole_list(
        items: list[object], capsys: pytest.CaptureFixture[str]) -> None:
    print_json(items)
    whole = capsys.readouterr().out
    print_json_array(iter(items))
    streamed = capsys.readouterr().out
    assert streamed == whole
    assert json.loads(streamed) == items


def test_items_are_written_as_they_come(capsys: pytest.CaptureFixture[str]) -> None:
    """A generator is consumed one item at a time: what was made so far is already out."""
    seen: list[str] = []

    def items():  # type: ignore[no-untyped-def]
        for i in range(3):
            seen.append(capsys.readouterr().out)
            yield {"i": i}

    print_json_array(items())
    assert seen[0] == "" and '"i": 0' in seen[1] and '"i": 1' in seen[2]
