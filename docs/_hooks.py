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
    docs_dir = config["docs_dir"]
    root = os.path.dirname(os.path.abspath(docs_dir))
    for shared in SHARED_DIRS:
        folder = os.path.join(root, shared)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not os.path.isfile(os.path.join(folder, name)):
                continue
            rel = f"{shared}/{name}"
            files.append(
                File(
                    f"../{rel}",  # the path as pages write it, relative to docs/
                    docs_dir,
                    config["site_dir"],
                    config["use_directory_urls"],
                    dest_uri=rel,
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
    return files
