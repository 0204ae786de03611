"""The README's Python snippets run, and its Quickstart is two commands."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet_runs(index):
    exec(compile(blocks("python")[index], f"README.md[python {index}]", "exec"), {})


def test_quickstart_is_two_commands():
    quickstart = blocks("sh")[0].strip().splitlines()
    assert len(quickstart) == 2
    assert "kvmemu" in quickstart[0] and "pytest" in quickstart[1]
