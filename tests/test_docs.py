"""The documentation site: the strict MkDocs build passes, every page is in the nav, every API target imports."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def nav_pages(nav) -> list[str]:
    """Every page file named in a MkDocs nav (nested sections included)."""
    pages = []
    for item in nav:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return [page for page in pages if not re.match(r"[a-z]+://", page)]


def config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def test_strict_build(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"
    for page in nav_pages(config()["nav"]):
        assert (site / page.replace(".md", ".html")).is_file(), f"{page} was not built"
    # Pages link to measured results under ../benchmarks/results/; docs/_hooks.py serves them with the site.
    assert (site / "benchmarks" / "results" / "overhead.png").is_file()


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    cfg = config()
    assert cfg["strict"] is True and cfg["docs_dir"] == "docs"
    in_nav = nav_pages(cfg["nav"])
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(in_nav)) == on_disk, (
        f"pages missing from the nav: {sorted(set(on_disk) - set(in_nav))}; "
        f"nav entries without a file: {sorted(set(in_nav) - set(on_disk))}"
    )
    assert len(in_nav) == len(set(in_nav)), "a page appears twice in the nav"


def api_targets() -> list[str]:
    targets = []
    for page in DOCS.rglob("*.md"):
        targets += re.findall(r"^:::\s*([\w.]+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return sorted(set(targets))


def test_api_page_has_targets():
    assert {"trl_aem.AEMGRPOConfig", "trl_aem.AEMGRPOTrainer", "trl_aem.aem", "trl_aem.rollout", "trl_aem.agents",
            "trl_aem.envs", "trl_aem.tiny"} <= set(api_targets())


@pytest.mark.parametrize("target", api_targets())
def test_api_target_imports(target):
    """A `::: a.b.c` target is a module, or an attribute of the longest importable module prefix."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            assert hasattr(obj, name), f"{target}: {'.'.join(parts[:cut])} has no attribute {name!r}"
            obj = getattr(obj, name)
        return
    pytest.fail(f"{target}: no importable module")


def test_docs_have_no_machine_specific_paths():
    pattern = re.compile(r"(/home/\w|/Users/\w|/work/\w|[A-Z]:\\\\)")
    for page in DOCS.rglob("*.md"):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{page.name}:{number} has a machine-specific path: {line.strip()}"


def test_readme_doc_links_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert links, "the README links no docs page"
    for link in links:
        assert (ROOT / link).is_file(), f"README links {link}, which does not exist"
