"""Copies the generated result sections (bench/README_*.md) into README.md.

Each benchmark script writes its own markdown section next to its JSON results; this script
splices those sections, in a fixed order, between the `results:begin` / `results:end` markers of
README.md, so every figure in the README comes from a script's latest run.

    python bench/update_readme.py
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ("README_perf.md", "README_memory.md", "README_throughput.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def demote_headings(markdown: str) -> str:
    """Sections are written with "##" headings; in the README they sit under "## Results"."""
    in_code = False
    lines = []
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        lines.append("#" + line if line.startswith("#") and not in_code else line)
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    parts = []
    for name in SECTIONS:
        path = ROOT / "bench" / name
        if path.exists():
            parts.append(demote_headings(path.read_text().strip()))
        else:
            parts.append(f"_{name} has not been generated yet: run the matching bench script._")
    readme.write_text(head + BEGIN + "\n" + "\n\n".join(parts) + "\n" + END + tail)


if __name__ == "__main__":
    main()
