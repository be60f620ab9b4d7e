"""The documentation site: its generated pages are current, every public name has an API entry,
every page is in the navigation, and the README stays a front page."""

import re
import subprocess
import sys
from pathlib import Path

import fieldkit.training

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_generated_pages_are_current():
    """Troubleshooting from the code's messages, the tables from the benchmarks' JSON."""
    done = subprocess.run(
        [sys.executable, str(DOCS / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_troubleshooting_lists_the_messages_the_code_raises():
    page = (DOCS / "troubleshooting.md").read_text()
    for message in (
        "the snapshot is entered; save it outside `with snap:`",
        "another thread has this model's parameters swapped",
        "does not match the live adapter exactly",
    ):
        assert message in page, message


def test_every_public_name_has_an_api_entry():
    api = (DOCS / "api.md").read_text()
    entries = set(re.findall(r"^::: (\S+)$", api, flags=re.M))
    public = {f"fieldkit.training.{n}" for n in fieldkit.training.__all__}
    public |= {
        "fieldkit.training.hf.WeightDeltaCallback",
        "fieldkit.training.hf.ReferenceSyncCallback",
        "fieldkit.training.trl.use_snapshot_reference",
        "fieldkit.training.trl.SnapshotReference",
    }
    assert public <= entries, sorted(public - entries)


def test_every_page_is_in_the_navigation_and_every_entry_is_a_page():
    nav = set(re.findall(r":\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert nav == pages


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "zensical serve" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
