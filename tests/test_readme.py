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


@pytest.mark.thread_unsafe      # mypy keeps global state
def test_python_snippets_type_check_strictly(tmp_path):
    """Every README example passes ``mypy --strict`` against the package's stubs (the
    kvmemu this process imported, linked into a directory of its own on mypy's path)."""
    api = pytest.importorskip("mypy.api")
    import kvmemu
    path = tmp_path / "path"
    path.mkdir()
    (path / "kvmemu").symlink_to(Path(kvmemu.__file__).resolve().parent)
    files = []
    for index, code in enumerate(blocks("python")):
        files.append(tmp_path / f"readme_{index}.py")
        files[-1].write_text(code)
    import os
    old = os.environ.get("MYPYPATH")
    os.environ["MYPYPATH"] = str(path)
    try:
        out, err, status = api.run(["--strict", "--follow-imports=silent", "--cache-dir",
                                    str(tmp_path / "cache"), *map(str, files)])
    finally:
        if old is None:
            del os.environ["MYPYPATH"]
        else:
            os.environ["MYPYPATH"] = old
    assert status == 0, out + err
