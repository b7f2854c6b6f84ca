"""The README's Python examples run as written."""

import re

from conftest import REPO


def test_readme_python_examples_run():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
