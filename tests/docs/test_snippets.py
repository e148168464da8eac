"""Every Python snippet of the README and the docs site runs as written on a CPU
(through the tiled PyTorch path, as on a user's CPU-only machine). The snippets
of one page run in order in one namespace, as a reader would paste them."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "experiments" not in p.parts)
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets(page: pathlib.Path) -> list[str]:
    return FENCE.findall(page.read_text())


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(page, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the tiled path
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes stays out of the checkout
    namespace = {"__name__": "__snippet__"}
    for i, code in enumerate(snippets(page)):
        try:
            exec(compile(code, f"{page.name}[{i}]", "exec"), namespace)
        except Exception as exc:  # name the snippet that failed
            raise AssertionError(f"snippet {i} of {page.relative_to(ROOT)} failed: {exc!r}\n{code}") from exc
