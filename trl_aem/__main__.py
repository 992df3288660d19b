"""``python -m trl_aem ...``: the ``trl-aem`` command line (see :mod:`trl_aem.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
