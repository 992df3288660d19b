"""MkDocs hook (not a page): serve result files that pages link to outside docs/.

Pages link to measured results the way GitHub shows them, relative to docs/, e.g.
``![step times](../benchmarks/results/overhead.png)``. MkDocs only knows files inside docs_dir, so in strict mode
such a link fails. This hook adds every file of ``benchmarks/results/`` to the site under the same relative path
(``benchmarks/results/...`` inside the site), so one link works on GitHub and on the site alike.
"""

from __future__ import annotations

import os

from mkdocs.structure.files import File, InclusionLevel

SHARED_DIRS = ("benchmarks/results",)


def on_files(files, config):
    """Add every file under ``SHARED_DIRS`` (recursively) to the site."""
    docs_dir = config["docs_dir"]
    root = os.path.dirname(os.path.abspath(docs_dir))
    for shared in SHARED_DIRS:
        folder = os.path.join(root, shared)
        if not os.path.isdir(folder):
            continue
        for here, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                _add(files, config, f"{shared}/{os.path.relpath(os.path.join(here, name), folder)}")
    return files


def _add(files, config, rel: str) -> None:
    """Add the repository file ``rel`` (e.g. ``benchmarks/results/overhead.png``) to the site under the same path."""
    files.append(
        File(
            f"../{rel}",  # the path as pages write it, relative to docs/
            config["docs_dir"],
            config["site_dir"],
            config["use_directory_urls"],
            dest_uri=rel,
            inclusion=InclusionLevel.NOT_IN_NAV,
        )
    )
