"""The README's test command is the one CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    tests_section = (REPO / "README.md").read_text().split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", tests_section, re.S).group(1)
    assert block.splitlines() == ['pip install -e ".[test]" && python -m pytest -q -m "not slow" -n auto']
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert block.splitlines()[0] in ci
    # ...and CI also runs what the quick check leaves out.
    assert any(line.startswith("python -m pytest -q -m slow") for line in ci)
