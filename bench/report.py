"""docs/BENCHMARKS.md is shared by several benchmarks: each owns the text between its two markers."""

from __future__ import annotations

from pathlib import Path

BENCH_MD = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
TITLE = "# Benchmarks\n\nEvery number below was produced by the command printed with it.\n"


def replace_section(name: str, body: str, path: Path = BENCH_MD) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->`, appending the section if new."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else TITLE
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
